#pragma once

// Expert-parallel dispatch and combine over MPI (component `mpi`: resonance::mpi, RESONANCE_HAS_MPI).
// The only header that includes <mpi.h>; MPI 3.1 and host buffers only. The exchange itself is
// dist/exchange.hpp's transport-free plan; this header moves its buffers.
//
//   resonance::dist::mpi_exchange ex(MPI_COMM_WORLD);             // duplicates the communicator
//   auto d = ex.dispatch(plan, placement, x);                     // rows of float or bfloat16
//   for (j : local experts) expert_out rows [d.expert_offsets()[j], [j+1]) = expert_j(d.expert_in() rows)
//   ex.combine(d, expert_out, y);                                  // y bitwise resonance::combine's
//   ex.return_rows(d, per_slot, per_assignment);   // combine's way back, un-summed (training: dweight)
//   ex.send_rows(d, per_assignment, per_slot);     // the reverse (training: the weights to the experts)
//
// Every call is collective over the communicator, and every rank must make the same sequence of
// calls. Before any data moves, one MPI_Allreduce settles that every rank has the same configuration
// and that no rank failed a precondition: a disagreement or a failure is a resonance::error on every
// rank (never a hang, and nothing moved), and the exchange stays usable. Receive counts always come
// from the exchange (MPI_Alltoall of per-peer counts) or, in padded mode, from the agreed
// configuration; never from the caller (a receive count larger than the send silently leaves stale
// rows in Open MPI 4.1). What a rank received is checked once every collective of the dispatch is
// over (make_receive_plan): bytes a transport corrupted throw on the rank that got them.
//
// Flat topology: one MPI_Alltoallv per buffer on the whole communicator. Two-level topology (DeepEP's
// normal mode, Tutel's 2DH): with P = placement.ranks_per_node ranks per (virtual) node, stage A sends
// each token once per destination node to the rank of the same local index there (rail_comm), with
// its assignments for all that node's experts; stage B forwards rows inside the node to their owners
// (node_comm). The receiver rebuilds the flat exchange's input from the forwarded metadata, so its
// receive_plan and expert-major rows are the flat ones, and combine returns every expert row along the
// reverse path (no partial sums on the way: those would change the summation order), so y is bitwise
// the flat y. Open MPI 4.1's coll/han has no alltoallv, hence the two stages here. return_rows is that
// way back without the sum (one row per kept assignment, in the plan's token-major order), send_rows
// the same stages run backwards; both settle like combine and take rows of any type and width.

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstring>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <mpi.h>

#include "../backend/backend.hpp"
#include "../backend/serial.hpp"
#include "../core/bfloat16.hpp"
#include "../core/error.hpp"
#include "../core/view.hpp"
#include "../plan/plan.hpp"
#include "exchange.hpp"
#include "placement.hpp"

namespace resonance::dist {

enum class exchange_topology : unsigned char {
  flat,       // one MPI_Alltoallv per buffer over all ranks
  two_level,  // inter-node stage on rail_comm, then intra-node forwarding on node_comm
};

struct mpi_exchange_options {
  exchange_topology topology = exchange_topology::flat;  // the default of dispatch calls that name none
  // The largest count or displacement handed to MPI (its counts are int). Lower it only to exercise the
  // overflow path in a test; it must be in [1, INT_MAX] and the same on every rank.
  std::int64_t count_limit = INT_MAX;
};

// The check MPI's int counts need: "" when every per-peer count, and their running total (the
// displacements), is in [0, limit]; else a message naming the first count that is not. `what` names
// the counts ("rows sent to"), `peer` the kind of peer ("rank", "node").
inline std::string mpi_count_overflow(std::span<const std::int64_t> counts, std::string_view what,
                                      std::string_view peer = "rank", std::int64_t limit = INT_MAX) {
  std::int64_t total = 0;
  for (std::size_t p = 0; p < counts.size(); ++p) {
    std::ostringstream os;
    if (counts[p] < 0) {
      os << "resonance: " << what << " " << peer << " " << p << ": a negative count (" << counts[p] << ")";
      return os.str();
    }
    if (counts[p] > limit) {
      os << "resonance: " << what << " " << peer << " " << p << ": " << counts[p] << ", more than an MPI count may be ("
         << limit << ": MPI counts are int)";
      return os.str();
    }
    total += counts[p];  // no int64 overflow: each term is at most INT_MAX
    if (total > limit) {
      os << "resonance: " << what << " " << peer << "s 0.." << p << ": " << total
         << " in all, more than an MPI displacement may be (" << limit << ": MPI displacements are int)";
      return os.str();
    }
  }
  return {};
}

namespace detail {

inline std::size_t mpi_usz(index n) { return static_cast<std::size_t>(n); }

// An MPI return code as a resonance::error naming the call and MPI_Error_string.
inline void mpi_check(int rc, std::string_view call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  if (MPI_Error_string(rc, text, &length) != MPI_SUCCESS) length = 0;
  std::ostringstream os;
  os << "resonance: " << call << " failed: " << std::string_view(text, static_cast<std::size_t>(length))
     << " (MPI error " << rc << ")";
  throw error(os.str());
}

// A committed contiguous datatype of `count` base elements, freed on scope exit: a row (so counts are
// rows, not values) or one routed_assignment (so metadata counts are assignments, not bytes).
class mpi_datatype {
 public:
  mpi_datatype(int count, MPI_Datatype base) {
    mpi_check(MPI_Type_contiguous(count, base, &type_), "MPI_Type_contiguous");
    const int rc = MPI_Type_commit(&type_);
    if (rc != MPI_SUCCESS) {
      MPI_Type_free(&type_);
      mpi_check(rc, "MPI_Type_commit");
    }
  }
  ~mpi_datatype() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (type_ != MPI_DATATYPE_NULL && !finalized) MPI_Type_free(&type_);
  }
  mpi_datatype(const mpi_datatype&) = delete;
  mpi_datatype& operator=(const mpi_datatype&) = delete;
  MPI_Datatype get() const { return type_; }

 private:
  MPI_Datatype type_ = MPI_DATATYPE_NULL;
};

// The MPI element of a row scalar: bfloat16 moves as its 16 bits.
template <class T>
MPI_Datatype mpi_scalar() {
  if constexpr (std::is_same_v<T, float>) {
    return MPI_FLOAT;
  } else if constexpr (std::is_same_v<T, double>) {
    return MPI_DOUBLE;
  } else {
    static_assert(std::is_same_v<T, bfloat16>, "rows of float, double or bfloat16");
    return MPI_UINT16_T;
  }
}
template <class T>
constexpr std::uint64_t row_type_code() {
  return std::is_same_v<T, float> ? 1 : std::is_same_v<T, double> ? 2 : 3;
}
inline const char* row_type_name(std::uint64_t code) {
  return code == 1 ? "float" : code == 2 ? "double" : code == 3 ? "bfloat16" : "?";
}

// FNV-1a, 64 bits, over a canonical serialisation: every value as 8 little-endian bytes, so the hash
// depends on the values only (not on the host's integer widths or byte order).
struct fnv1a64 {
  std::uint64_t h = 14695981039346656037ull;
  void add(std::uint64_t v) {
    for (int b = 0; b < 8; ++b) {
      h ^= (v >> (8 * b)) & 0xFFu;
      h *= 1099511628211ull;
    }
  }
  void add_signed(std::int64_t v) { add(static_cast<std::uint64_t>(v)); }
};

inline std::uint64_t placement_hash(const expert_placement& p) {
  fnv1a64 f;
  f.add_signed(p.num_ranks);
  f.add_signed(p.ranks_per_node);
  f.add(p.rank_of_expert.size());
  for (id_type r : p.rank_of_expert) f.add_signed(r);
  return f.h;
}

inline std::string hex64(std::uint64_t v) {
  std::ostringstream os;
  os << "0x" << std::hex << v;
  return os.str();
}

inline std::string placement_words(const expert_placement& p) {
  std::ostringstream os;
  os << "num_ranks " << p.num_ranks << ", ranks_per_node " << p.ranks_per_node << ", rank_of_expert [";
  for (std::size_t e = 0; e < p.rank_of_expert.size() && e < 64; ++e) os << (e ? " " : "") << p.rank_of_expert[e];
  if (p.rank_of_expert.size() > 64) os << " ...";
  os << "], hash " << hex64(placement_hash(p));
  return os.str();
}

// One value that every rank must hold alike. A numeric field is a signed integer, shown with the range
// across ranks when it differs; another (a hash) only with this rank's value in words.
struct agreement_field {
  std::string_view name;
  std::uint64_t value = 0;
  std::string shown;
  bool numeric = false;
};
inline agreement_field numeric_field(std::string_view name, std::int64_t v) {
  return {name, static_cast<std::uint64_t>(v), std::to_string(v), true};
}

// A call's name as a settlement value (FNV-1a of its bytes).
inline std::uint64_t name_code(std::string_view name) {
  fnv1a64 f;
  for (char c : name) f.add(static_cast<unsigned char>(c));
  return f.h;
}

// The settlement before any data moves, in ONE MPI_Allreduce(MAX) over uint64: per field v and ~v
// (the max of ~v is ~min v, so min == max says every rank agrees), the highest failing rank + 1 (0:
// none), and `extras` reduced by max (what the count bound needs). Throws on every rank when a rank
// failed a precondition (that rank with its own message) or when a field differs (naming each field
// and this rank's value). Returns the reduced extras.
// Every settlement sends the same number of values, whatever the call (dispatch, combine, ...), so a
// rank that calls something else than its peers meets them in the same MPI_Allreduce and gets an
// error naming the call, instead of a collective whose counts differ (undefined in MPI).
inline constexpr std::size_t settle_fields = 12, settle_extras = 2;

inline std::vector<std::uint64_t> settle(MPI_Comm comm, int rank, std::string_view call,
                                         const std::vector<agreement_field>& fields, const std::string& local_failure,
                                         std::vector<std::uint64_t> extras) {
  constexpr std::uint64_t flip = std::uint64_t{1} << 63;  // signed order as unsigned order
  resonance::detail::require(fields.size() <= settle_fields && extras.size() <= settle_extras, "settle",
                             "at most 12 fields and 2 extras", fields.size());
  // [failing rank + 1][call, ~call][fields v, ~v, zero-padded][extras, zero-padded]
  std::vector<std::uint64_t> buf(3 + 2 * settle_fields + settle_extras, 0);
  buf[0] = local_failure.empty() ? 0 : static_cast<std::uint64_t>(rank) + 1;
  const std::uint64_t call_code = name_code(call);
  buf[1] = call_code;
  buf[2] = ~call_code;
  for (std::size_t i = 0; i < fields.size(); ++i) {
    const std::uint64_t v = fields[i].numeric ? fields[i].value ^ flip : fields[i].value;
    buf[3 + 2 * i] = v;
    buf[4 + 2 * i] = ~v;
  }
  std::copy(extras.begin(), extras.end(), buf.begin() + 3 + 2 * settle_fields);
  mpi_check(MPI_Allreduce(MPI_IN_PLACE, buf.data(), static_cast<int>(buf.size()), MPI_UINT64_T, MPI_MAX, comm),
            "MPI_Allreduce");
  if (buf[1] != ~buf[2])
    throw error("resonance: " + std::string(call) + ": configuration differs across ranks: the call (this rank: " +
                std::string(call) + "; another rank called something else on this exchange); no data was moved");
  if (!local_failure.empty())
    throw error(local_failure + " [" + std::string(call) + ": rank " + std::to_string(rank) +
                "; every rank of the exchange throws, no data was moved]");
  if (buf[0] != 0) {
    throw error("resonance: " + std::string(call) + ": rank " + std::to_string(buf[0] - 1) +
                " failed a precondition (its error names it); every rank throws, no data was moved");
  }
  std::ostringstream os;
  fnv1a64 fp;
  bool differs = false;
  for (std::size_t i = 0; i < fields.size(); ++i) {
    const agreement_field& f = fields[i];
    fp.add(f.value);
    const std::uint64_t max = buf[3 + 2 * i], min = ~buf[4 + 2 * i];
    if (min == max) continue;
    os << (differs ? "; " : "") << f.name << " (this rank: " << f.shown;
    if (f.numeric)
      os << "; across ranks from " << static_cast<std::int64_t>(min ^ flip) << " to "
         << static_cast<std::int64_t>(max ^ flip);
    os << ")";
    differs = true;
  }
  if (differs)
    throw error("resonance: " + std::string(call) + ": configuration differs across ranks: " + os.str() + "; rank " +
                std::to_string(rank) + " has configuration fingerprint " + hex64(fp.h) + "; no data was moved");
  return std::vector<std::uint64_t>(buf.begin() + 3 + 2 * settle_fields,
                                    buf.begin() + 3 + 2 * settle_fields + static_cast<std::ptrdiff_t>(extras.size()));
}

// Whether any rank failed (one MPI_Allreduce of the highest failing rank + 1): a count one rank
// cannot hand to MPI, or received metadata it cannot forward, must stop every rank before the next
// collective, or the others would wait in it forever.
inline void agree_or_throw(MPI_Comm comm, int rank, std::string_view call, const std::string& local_failure) {
  std::uint64_t failing = local_failure.empty() ? 0 : static_cast<std::uint64_t>(rank) + 1;
  mpi_check(MPI_Allreduce(MPI_IN_PLACE, &failing, 1, MPI_UINT64_T, MPI_MAX, comm), "MPI_Allreduce");
  if (!local_failure.empty())
    throw error(local_failure + " [" + std::string(call) + ": rank " + std::to_string(rank) +
                "; every rank of the exchange throws]");
  if (failing != 0)
    throw error("resonance: " + std::string(call) + ": rank " + std::to_string(failing - 1) +
                " failed (its error names the cause); every rank throws");
}

// Per-peer counts of offsets (n+1 entries).
inline std::vector<std::int64_t> counts_of(std::span<const id_type> offsets) {
  std::vector<std::int64_t> c(offsets.empty() ? 0 : offsets.size() - 1);
  for (std::size_t p = 0; p < c.size(); ++p) c[p] = offsets[p + 1] - offsets[p];
  return c;
}
inline std::vector<int> to_int(const std::vector<std::int64_t>& c) {
  std::vector<int> out(c.size());
  for (std::size_t p = 0; p < c.size(); ++p) out[p] = static_cast<int>(c[p]);
  return out;
}
inline std::int64_t sum_of(const std::vector<int>& c) {
  std::int64_t s = 0;
  for (int v : c) s += v;
  return s;
}
inline std::vector<id_type> offsets_from(const std::vector<int>& c) {
  std::vector<id_type> off(c.size() + 1, 0);
  for (std::size_t p = 0; p < c.size(); ++p) off[p + 1] = off[p] + c[p];
  return off;
}

// One MPI_Alltoallv of `type` items (rows, or assignments); displacements are the counts' prefix sums,
// checked against the count limit before.
inline void alltoallv(MPI_Comm comm, MPI_Datatype type, const void* send, const std::vector<int>& send_counts,
                      void* recv, const std::vector<int>& recv_counts) {
  std::vector<int> sd(send_counts.size(), 0), rd(recv_counts.size(), 0);
  for (std::size_t p = 1; p < sd.size(); ++p) sd[p] = sd[p - 1] + send_counts[p - 1];
  for (std::size_t p = 1; p < rd.size(); ++p) rd[p] = rd[p - 1] + recv_counts[p - 1];
  static unsigned char empty[1];  // an empty vector's data() may be null; MPI gets a real address
  mpi_check(MPI_Alltoallv(send != nullptr ? send : empty, send_counts.data(), sd.data(), type,
                          recv != nullptr ? recv : empty, recv_counts.data(), rd.data(), type, comm),
            "MPI_Alltoallv");
}

// The per-peer (rows, assignments) counts of one stage, exchanged with one MPI_Alltoall of 2 ints per
// peer: what each peer will send is learnt from the peer, never assumed.
inline void exchange_counts(MPI_Comm comm, const std::vector<int>& send_rows, const std::vector<int>& send_assigned,
                            std::vector<int>& recv_rows, std::vector<int>& recv_assigned) {
  const std::size_t n = send_rows.size();
  std::vector<int> out(2 * n), in(2 * n);
  for (std::size_t p = 0; p < n; ++p) {
    out[2 * p] = send_rows[p];
    out[2 * p + 1] = send_assigned[p];
  }
  mpi_check(MPI_Alltoall(out.data(), 2, MPI_INT, in.data(), 2, MPI_INT, comm), "MPI_Alltoall");
  recv_rows.assign(n, 0);
  recv_assigned.assign(n, 0);
  for (std::size_t p = 0; p < n; ++p) {
    recv_rows[p] = in[2 * p];
    recv_assigned[p] = in[2 * p + 1];
  }
}

// The first count of a stage over the limit, or "".
inline std::string stage_overflow(std::string_view stage, std::string_view peer, std::int64_t limit,
                                  const std::vector<std::int64_t>& send_rows,
                                  const std::vector<std::int64_t>& recv_rows,
                                  const std::vector<std::int64_t>& send_assigned,
                                  const std::vector<std::int64_t>& recv_assigned) {
  const std::string s(stage);
  for (const auto& [counts, what] :
       {std::pair{&send_rows, s + "rows sent to"}, std::pair{&recv_rows, s + "rows received from"},
        std::pair{&send_assigned, s + "assignments (16 bytes each) sent to"},
        std::pair{&recv_assigned, s + "assignments (16 bytes each) received from"}}) {
    std::string m = mpi_count_overflow(*counts, what, peer, limit);
    if (!m.empty()) return m;
  }
  return {};
}
inline std::vector<std::int64_t> widen(const std::vector<int>& c) { return {c.begin(), c.end()}; }

// Which communicator a stage runs on.
enum class mpi_level : unsigned char { all, node, rail };

// One stage of combine's way back: send row i = row gather[i] of the previous buffer (the expert
// outputs first), send_counts / recv_counts rows per peer of the stage's communicator.
struct return_stage {
  mpi_level level = mpi_level::all;
  std::vector<id_type> gather;
  std::vector<int> send_counts, recv_counts;
};

// The inverse of a one-to-one row map into [0, rows): inverse[map[i]] = i, and -1 (a zero row for
// gather_rows) where no i maps. The way back run backwards (send_rows) is gather_rows on these.
inline std::vector<id_type> inverse_rows(std::span<const id_type> map, index rows) {
  std::vector<id_type> inverse(mpi_usz(rows), -1);
  for (std::size_t i = 0; i < map.size(); ++i) {
    if (map[i] < 0 || map[i] >= rows)
      resonance::detail::fail("return stage", "rows in [0, " + std::to_string(rows) + ")", "row ", i, " maps to ",
                              map[i]);
    inverse[mpi_usz(map[i])] = static_cast<id_type>(i);
  }
  return inverse;
}

inline std::uint64_t next_exchange_id() {
  static std::atomic<std::uint64_t> id{0};
  return ++id;
}

}  // namespace detail

class mpi_exchange;

// What a dispatch delivered to one rank, and what its combine needs. expert_in() is expert-major: rows
// [expert_offsets()[j], expert_offsets()[j+1]) are the inputs of global expert local_experts()[j], in
// receive().slot_source / slot_token order (ascending source rank, then token; padded: source, slot).
// combine takes expert outputs in the same rows. Self-contained (owns copies of the plan arrays
// combine reads), so the routing plan and x may go away after dispatch.
template <class T>
class dispatched {
 public:
  dispatched() = default;

  const receive_plan& receive() const { return receive_; }
  const exchange_plan& send() const { return send_; }
  matrix_view<T> expert_in() { return {rows_.data(), receive_.num_slots(), cols_}; }
  matrix_view<const T> expert_in() const { return {rows_.data(), receive_.num_slots(), cols_}; }
  std::span<const id_type> local_experts() const { return receive_.local_experts; }
  std::span<const id_type> expert_offsets() const { return receive_.expert_offsets; }
  index num_local_experts() const { return static_cast<index>(receive_.local_experts.size()); }
  index cols() const { return cols_; }
  exchange_mode mode() const { return send_.mode; }
  exchange_topology topology() const { return topology_; }

 private:
  friend class mpi_exchange;

  std::uint64_t exchange_id_ = 0;  // the mpi_exchange that made it (0: none)
  std::uint64_t sequence_ = 0;     // its dispatch number there, the same on every rank
  exchange_topology topology_ = exchange_topology::flat;
  index ranks_per_node_ = 1;
  index cols_ = 0;
  exchange_plan send_;
  receive_plan receive_;
  std::vector<T> rows_;
  std::vector<id_type> token_offsets_;  // the plan's, for combine_returns
  std::vector<float> token_weight_;
  std::vector<detail::return_stage> returns_;  // combine's (and return_rows') stages, in order
  exchange_plan back_;                         // two-level: return_row into the stage-A return buffer
};

// Dispatch and combine over a duplicate of an MPI communicator (MPI_ERRORS_RETURN on it, so an MPI
// failure is a resonance::error naming the call). Movable, not copyable; one exchange is not for
// concurrent use from several threads (nor is one communicator).
class mpi_exchange {
 public:
  explicit mpi_exchange(MPI_Comm comm, mpi_exchange_options options = {}) : options_(options) {
    using resonance::detail::require;
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    require(initialized && !finalized, "MPI", "MPI initialised and not finalised (MPI_Init before mpi_exchange)");
    require(comm != MPI_COMM_NULL, "comm", "a communicator, not MPI_COMM_NULL");
    require(options.count_limit >= 1 && options.count_limit <= INT_MAX, "count_limit", "a limit in [1, INT_MAX]",
            options.count_limit);
    require(options.topology == exchange_topology::flat || options.topology == exchange_topology::two_level, "topology",
            "flat or two_level", static_cast<int>(options.topology));
    detail::mpi_check(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
    const int rc = MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    if (rc == MPI_SUCCESS) {
      MPI_Comm_rank(comm_, &rank_);
      MPI_Comm_size(comm_, &size_);
    } else {
      MPI_Comm_free(&comm_);
      detail::mpi_check(rc, "MPI_Comm_set_errhandler");
    }
    id_ = detail::next_exchange_id();
  }
  ~mpi_exchange() { release(); }
  mpi_exchange(const mpi_exchange&) = delete;
  mpi_exchange& operator=(const mpi_exchange&) = delete;
  mpi_exchange(mpi_exchange&& o) noexcept { take(o); }
  mpi_exchange& operator=(mpi_exchange&& o) noexcept {
    if (this != &o) {
      release();
      take(o);
    }
    return *this;
  }

  // The duplicated communicator (MPI_COMM_NULL after a move).
  MPI_Comm comm() const noexcept { return comm_; }
  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }
  const mpi_exchange_options& options() const noexcept { return options_; }

  // Sends each rank's rows to the experts' owners (placement) and returns what this rank received,
  // expert-major. x: one row per token of `plan` (routed on this rank, global expert ids). Padded mode
  // needs a plan padded to its capacity (capacity::factor{.pad_to_capacity = true}) with the same
  // capacity on every rank. Collective.
  template <execution_backend Backend, class X>
  dispatched<std::remove_const_t<X>> dispatch(const Backend& be, const plan_view<>& plan,
                                              const expert_placement& placement, matrix_view<X> x, exchange_mode mode,
                                              exchange_topology topology) {
    return dispatch_impl(be, plan, placement, matrix_view<const std::remove_const_t<X>>(x), mode, topology);
  }
  template <execution_backend Backend, class X>
  dispatched<std::remove_const_t<X>> dispatch(const Backend& be, const plan_view<>& plan,
                                              const expert_placement& placement, matrix_view<X> x,
                                              exchange_mode mode = exchange_mode::dropless) {
    return dispatch(be, plan, placement, x, mode, options_.topology);
  }
  template <class X>
  dispatched<std::remove_const_t<X>> dispatch(const plan_view<>& plan, const expert_placement& placement,
                                              matrix_view<X> x, exchange_mode mode, exchange_topology topology) {
    return dispatch(backend::serial{}, plan, placement, x, mode, topology);
  }
  template <class X>
  dispatched<std::remove_const_t<X>> dispatch(const plan_view<>& plan, const expert_placement& placement,
                                              matrix_view<X> x, exchange_mode mode = exchange_mode::dropless) {
    return dispatch(backend::serial{}, plan, placement, x, mode, options_.topology);
  }

  // Returns the expert outputs (one row per row of d.expert_in(), any width the same on every rank)
  // to their sources, which sum them into y (one row per token) exactly as resonance::combine does.
  // Collective.
  template <execution_backend Backend, class T, class U>
  requires std::is_same_v<std::remove_const_t<U>, T>
  void combine(const Backend& be, const dispatched<T>& d, matrix_view<U> expert_out, matrix_view<T> y) {
    combine_impl(be, d, matrix_view<const T>(expert_out), y);
  }
  template <class T, class U>
  requires std::is_same_v<std::remove_const_t<U>, T>
  void combine(const dispatched<T>& d, matrix_view<U> expert_out, matrix_view<T> y) {
    combine_impl(backend::serial{}, d, matrix_view<const T>(expert_out), y);
  }

  // combine's way back without its sum: one row per row of d.expert_in() (per_slot) goes back to its
  // source, where per_assignment row i is the row of the slot of kept assignment i of the plan
  // dispatched (token-major, plan.token_expert() order). Rows of float, double or bfloat16, of any
  // width (1: a scalar per assignment) the same on every rank, whatever d's row type. Collective.
  template <execution_backend Backend, class T, class V, class U>
  requires std::is_same_v<std::remove_const_t<V>, U>
  void return_rows(const Backend& be, const dispatched<T>& d, matrix_view<V> per_slot, matrix_view<U> per_assignment) {
    return_rows_impl(be, d, matrix_view<const U>(per_slot), per_assignment);
  }
  template <class T, class V, class U>
  requires std::is_same_v<std::remove_const_t<V>, U>
  void return_rows(const dispatched<T>& d, matrix_view<V> per_slot, matrix_view<U> per_assignment) {
    return_rows_impl(backend::serial{}, d, matrix_view<const U>(per_slot), per_assignment);
  }

  // The reverse of return_rows: row i of per_assignment (one per kept assignment of the plan
  // dispatched, token-major) goes to the slot of assignment i on its expert's rank; per_slot has one
  // row per row of d.expert_in(), zeros in the padding slots of a padded exchange. Collective.
  template <execution_backend Backend, class T, class V, class U>
  requires std::is_same_v<std::remove_const_t<V>, U>
  void send_rows(const Backend& be, const dispatched<T>& d, matrix_view<V> per_assignment, matrix_view<U> per_slot) {
    send_rows_impl(be, d, matrix_view<const U>(per_assignment), per_slot);
  }
  template <class T, class V, class U>
  requires std::is_same_v<std::remove_const_t<V>, U>
  void send_rows(const dispatched<T>& d, matrix_view<V> per_assignment, matrix_view<U> per_slot) {
    send_rows_impl(backend::serial{}, d, matrix_view<const U>(per_assignment), per_slot);
  }

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 0;
  mpi_exchange_options options_;
  std::uint64_t id_ = 0;
  std::uint64_t sequence_ = 0;
  struct levels {
    index ranks_per_node = 0;
    MPI_Comm node = MPI_COMM_NULL;  // the ranks of this rank's node, by rank / ranks_per_node
    MPI_Comm rail = MPI_COMM_NULL;  // the ranks of this local index on every node, by rank % ranks_per_node
  };
  std::vector<levels> levels_;  // one per ranks_per_node used, freed with the exchange

  void take(mpi_exchange& o) noexcept {
    comm_ = std::exchange(o.comm_, MPI_COMM_NULL);
    rank_ = o.rank_;
    size_ = o.size_;
    options_ = o.options_;
    id_ = std::exchange(o.id_, 0);
    sequence_ = o.sequence_;
    levels_ = std::move(o.levels_);
    o.levels_.clear();
  }
  void release() noexcept {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) {  // after MPI_Finalize nothing may be freed (nor needs to be)
      for (levels& l : levels_) {
        if (l.node != MPI_COMM_NULL) MPI_Comm_free(&l.node);
        if (l.rail != MPI_COMM_NULL) MPI_Comm_free(&l.rail);
      }
      if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
    }
    levels_.clear();
    comm_ = MPI_COMM_NULL;
  }

  void require_live(std::string_view call) const {
    resonance::detail::require(comm_ != MPI_COMM_NULL, call, "a live mpi_exchange (this one was moved from)");
  }

  // node_comm and rail_comm for P ranks per node, split once (collectively: every rank gets here with
  // the same P, which the settlement checked) and kept for the exchange's lifetime.
  const levels& levels_for(index P) {
    for (const levels& l : levels_)
      if (l.ranks_per_node == P) return l;
    levels l;
    l.ranks_per_node = P;
    const int p = static_cast<int>(P);
    detail::mpi_check(MPI_Comm_split(comm_, rank_ / p, rank_, &l.node), "MPI_Comm_split (node_comm)");
    const int rc = MPI_Comm_split(comm_, rank_ % p, rank_, &l.rail);
    if (rc != MPI_SUCCESS) MPI_Comm_free(&l.node);
    detail::mpi_check(rc, "MPI_Comm_split (rail_comm)");
    MPI_Comm_set_errhandler(l.node, MPI_ERRORS_RETURN);
    MPI_Comm_set_errhandler(l.rail, MPI_ERRORS_RETURN);
    levels_.push_back(l);
    return levels_.back();
  }
  MPI_Comm comm_of(detail::mpi_level level, index P) {
    if (level == detail::mpi_level::all) return comm_;
    const levels& l = levels_for(P);
    return level == detail::mpi_level::node ? l.node : l.rail;
  }

  // --- dispatch ---------------------------------------------------------------------------------

  template <class Backend, class T>
  dispatched<T> dispatch_impl(const Backend& be, const plan_view<>& plan, const expert_placement& placement,
                              matrix_view<const T> x, exchange_mode mode, exchange_topology topology) {
    using resonance::detail::require;
    static_assert(resonance::detail::row_scalar_v<T>, "rows of float, double or bfloat16");
    static_assert(host_accessible_v<memory_space_t<Backend>>, "the MPI exchange moves host memory");
    constexpr std::string_view call = "mpi_exchange::dispatch";
    require_live(call);
    // Counted only once the settlement passed, so a dispatch that throws (on every rank) leaves every
    // rank's count where it was.
    const std::uint64_t sequence = sequence_ + 1;

    // Local preconditions: a failure is reported through the settlement, so that every rank throws.
    std::string failure;
    exchange_plan xp;
    try {
      require(placement.num_ranks == size_, "placement.num_ranks",
              "the communicator size (" + std::to_string(size_) + ")", placement.num_ranks);
      require(mode == exchange_mode::dropless || mode == exchange_mode::padded, "mode", "dropless or padded",
              static_cast<int>(mode));
      require(topology == exchange_topology::flat || topology == exchange_topology::two_level, "topology",
              "flat or two_level", static_cast<int>(topology));
      resonance::detail::check_matrix(x, "x");
      require(x.rows == plan.num_tokens(), "x", std::to_string(plan.num_tokens()) + " rows (one per token)", x.rows);
      require(x.cols >= 1 && x.cols <= INT_MAX, "x", "between 1 and INT_MAX columns", x.cols);
      xp = make_exchange_plan(plan, placement, rank_, mode);
    } catch (const error& e) {
      failure = e.what();
    }

    const std::int64_t capacity = mode == exchange_mode::padded ? plan.capacity() : -1;
    std::vector<detail::agreement_field> fields = {
        detail::numeric_field("num_experts", plan.num_experts()),
        detail::numeric_field("row width d (x.cols)", x.cols),
        {"row type", detail::row_type_code<T>(), detail::row_type_name(detail::row_type_code<T>())},
        {"exchange mode", static_cast<std::uint64_t>(mode), mode == exchange_mode::padded ? "padded" : "dropless"},
        detail::numeric_field("capacity (padded mode)", capacity),
        {"placement", detail::placement_hash(placement), detail::placement_words(placement)},
        detail::numeric_field("communicator size", size_),
        {"topology", static_cast<std::uint64_t>(topology), topology == exchange_topology::flat ? "flat" : "two_level"},
        detail::numeric_field("count_limit", options_.count_limit),
        detail::numeric_field("dispatch sequence number", static_cast<std::int64_t>(sequence))};
    // Extras, reduced by max: the largest rows and assignments any rank sends in all.
    const std::vector<std::uint64_t> most =
        detail::settle(comm_, rank_, call, fields, failure,
                       {failure.empty() ? static_cast<std::uint64_t>(xp.num_rows()) : 0,
                        failure.empty() ? static_cast<std::uint64_t>(xp.num_returns()) : 0});
    sequence_ = sequence;

    // No count of any stage, flat or two-level, exceeds R times the most any rank sends in all (a
    // rank receives from R sources at most; a relay forwards at most what its N rail peers sent, N <=
    // R), in rows or in assignments. Every rank knows that bound after the settlement, so they agree
    // without another collective whether the exact per-stage check (one MPI_Allreduce per stage,
    // exact_counts) is needed; at realistic sizes it is not.
    const std::int64_t R = size_;
    const bool exact_counts = R * static_cast<std::int64_t>(std::max(most[0], most[1])) > options_.count_limit;

    dispatched<T> out;
    out.exchange_id_ = id_;
    out.sequence_ = sequence;
    out.topology_ = topology;
    out.ranks_per_node_ = placement.ranks_per_node;
    out.cols_ = x.cols;
    const auto toff = plan.token_offsets();
    const auto tw = plan.token_weight();
    out.token_offsets_.assign(toff.begin(), toff.end());
    out.token_weight_.assign(tw.begin(), tw.end());
    const detail::mpi_datatype row_type(static_cast<int>(x.cols), detail::mpi_scalar<T>());
    if (topology == exchange_topology::flat) {
      dispatch_flat(be, placement, x, std::move(xp), exact_counts, row_type.get(), out);
    } else {
      dispatch_two_level(be, plan, placement, x, std::move(xp), exact_counts, row_type.get(), out);
    }
    return out;
  }

  template <class Backend, class T>
  void dispatch_flat(const Backend& be, const expert_placement& placement, matrix_view<const T> x, exchange_plan xp,
                     bool exact_counts, MPI_Datatype row_type, dispatched<T>& out) {
    const index d = x.cols;
    const std::vector<int> send_rows = detail::to_int(detail::counts_of(xp.row_offsets));
    std::vector<int> recv_rows, send_assigned, recv_assigned;
    std::vector<routed_assignment> meta;
    if (xp.mode == exchange_mode::dropless) {
      send_assigned = detail::to_int(detail::counts_of(xp.return_offsets));
      detail::exchange_counts(comm_, send_rows, send_assigned, recv_rows, recv_assigned);
      check_counts(exact_counts, "", "rank", send_rows, recv_rows, send_assigned, recv_assigned);
      const detail::mpi_datatype meta_type(static_cast<int>(sizeof(routed_assignment)), MPI_BYTE);
      meta.resize(detail::mpi_usz(detail::sum_of(recv_assigned)));
      detail::alltoallv(comm_, meta_type.get(), xp.assignments.data(), send_assigned, meta.data(), recv_assigned);
    } else {
      out.receive_ = make_padded_receive_plan(placement, rank_, xp.capacity);
      recv_rows = detail::to_int(detail::counts_of(out.receive_.row_offsets));
      send_assigned = send_rows;  // padded: one return per row
      recv_assigned = recv_rows;
      check_counts(exact_counts, "", "rank", send_rows, recv_rows, send_assigned, recv_assigned);
    }
    std::vector<T> send(detail::mpi_usz(xp.num_rows() * d));
    pack_rows(be, xp, x, matrix_view<T>{send.data(), xp.num_rows(), d});
    const index received_rows = detail::sum_of(recv_rows);
    std::vector<T> received(detail::mpi_usz(received_rows * d));
    detail::alltoallv(comm_, row_type, send.data(), send_rows, received.data(), recv_rows);
    if (xp.mode == exchange_mode::dropless) {
      const std::vector<id_type> rc(recv_rows.begin(), recv_rows.end()), ac(recv_assigned.begin(), recv_assigned.end());
      out.receive_ = make_receive_plan(placement, rank_, rc, ac, meta);
    }
    out.rows_.resize(detail::mpi_usz(out.receive_.num_slots() * d));
    unpack_rows(be, out.receive_, matrix_view<const T>{received.data(), received_rows, d}, out.expert_in());
    // Combine: each rank returns one row per assignment it received, in the order its source sent them.
    detail::return_stage back;
    back.gather = out.receive_.return_slot;
    back.send_counts = recv_assigned;
    back.recv_counts = send_assigned;
    out.returns_.push_back(std::move(back));
    out.send_ = std::move(xp);
  }

  // Throws on every rank when the exact check is on and any rank's counts exceed the limit.
  void check_counts(bool exact_counts, std::string_view stage, std::string_view peer, const std::vector<int>& sr,
                    const std::vector<int>& rr, const std::vector<int>& sa, const std::vector<int>& ra) {
    if (!exact_counts) return;
    const std::string m = detail::stage_overflow(stage, peer, options_.count_limit, detail::widen(sr),
                                                 detail::widen(rr), detail::widen(sa), detail::widen(ra));
    detail::agree_or_throw(comm_, rank_, "mpi_exchange::dispatch", m);
  }

  template <class Backend, class T>
  void dispatch_two_level(const Backend& be, const plan_view<>& plan, const expert_placement& placement,
                          matrix_view<const T> x, exchange_plan xp, bool exact_counts, MPI_Datatype row_type,
                          dispatched<T>& out) {
    using detail::mpi_usz;
    const index P = placement.ranks_per_node, R = size_, N = R / P, d = x.cols;
    const index node = rank_ / P, local = rank_ % P;
    const levels& lv = levels_for(P);
    const index E = plan.num_experts(), T_ = plan.num_tokens();
    const auto owner = [&](id_type e) { return static_cast<index>(placement.rank_of_expert[mpi_usz(e)]); };
    const auto toff = plan.token_offsets();
    const auto tex = plan.token_expert();
    const auto tw = plan.token_weight();
    const bool padded = xp.mode == exchange_mode::padded;
    const index C = xp.capacity;
    // The experts of each node, ascending, and each expert's place among its node's.
    std::vector<std::vector<id_type>> node_experts(mpi_usz(N));
    std::vector<index> place_in_node(mpi_usz(E));
    for (index e = 0; e < E; ++e) {
      auto& list = node_experts[mpi_usz(owner(static_cast<id_type>(e)) / P)];
      place_in_node[mpi_usz(e)] = static_cast<index>(list.size());
      list.push_back(static_cast<id_type>(e));
    }

    // Stage A, as the source: to each node once per token (padded: every slot of the node's experts),
    // with the token's assignments to that node's experts, node-major, then (token, expert).
    std::vector<std::int64_t> a_rows(mpi_usz(N), 0), a_assigned(mpi_usz(N), 0);
    std::vector<id_type> a_row_token;
    std::vector<routed_assignment> a_meta;
    exchange_plan& back = out.back_;
    back.mode = xp.mode;
    back.num_ranks = R;
    back.rank = rank_;
    back.num_tokens = T_;
    back.num_experts = E;
    back.capacity = xp.capacity;
    back.return_row.resize(mpi_usz(plan.num_assignments()));
    if (padded) {
      const auto eoff = plan.expert_offsets();
      const auto slot_token = plan.slot_token();
      for (index n = 0; n < N; ++n)
        a_rows[mpi_usz(n)] = a_assigned[mpi_usz(n)] = C * static_cast<index>(node_experts[mpi_usz(n)].size());
      back.return_offsets = detail::offsets_of(a_rows, "stage A rows");
      a_row_token.reserve(mpi_usz(back.num_returns()));
      for (index n = 0; n < N; ++n)
        for (id_type e : node_experts[mpi_usz(n)])
          for (index c = 0; c < C; ++c) a_row_token.push_back(slot_token[mpi_usz(eoff[mpi_usz(e)] + c)]);
      const auto tslot = plan.token_slot();
      for (std::size_t i = 0; i < back.return_row.size(); ++i) {
        const id_type e = tex[i];
        back.return_row[i] = static_cast<id_type>(back.return_offsets[mpi_usz(owner(e) / P)] +
                                                  place_in_node[mpi_usz(e)] * C + (tslot[i] - eoff[mpi_usz(e)]));
      }
    } else {
      std::vector<index> last(mpi_usz(N), -1);
      for (index t = 0; t < T_; ++t)
        for (id_type i = toff[mpi_usz(t)]; i < toff[mpi_usz(t + 1)]; ++i) {
          const auto n = mpi_usz(owner(tex[mpi_usz(i)]) / P);
          ++a_assigned[n];
          if (last[n] != t) {
            last[n] = t;
            ++a_rows[n];
          }
        }
      const std::vector<id_type> row_off = detail::offsets_of(a_rows, "stage A rows");
      back.return_offsets = detail::offsets_of(a_assigned, "stage A assignments");
      a_row_token.resize(mpi_usz(row_off.back()));
      a_meta.resize(mpi_usz(back.num_returns()));
      std::vector<id_type> next_row(row_off.begin(), row_off.end() - 1);
      std::vector<id_type> next_meta(back.return_offsets.begin(), back.return_offsets.end() - 1);
      std::fill(last.begin(), last.end(), -1);
      for (index t = 0; t < T_; ++t)
        for (id_type i = toff[mpi_usz(t)]; i < toff[mpi_usz(t + 1)]; ++i) {
          const id_type e = tex[mpi_usz(i)];
          const auto n = mpi_usz(owner(e) / P);
          if (last[n] != t) {
            last[n] = t;
            a_row_token[mpi_usz(next_row[n]++)] = static_cast<id_type>(t);
          }
          const id_type a = next_meta[n]++;
          a_meta[mpi_usz(a)] = {static_cast<id_type>(rank_), static_cast<id_type>(t), e, tw[mpi_usz(i)]};
          back.return_row[mpi_usz(i)] = a;
        }
    }
    const std::vector<int> a_send_rows = detail::to_int(a_rows), a_send_assigned = detail::to_int(a_assigned);
    std::vector<int> a_recv_rows, a_recv_assigned;
    if (padded) {
      // From each rail peer: C rows for each expert of this node.
      a_recv_rows.assign(mpi_usz(N), static_cast<int>(C * static_cast<index>(node_experts[mpi_usz(node)].size())));
      a_recv_assigned = a_recv_rows;
    } else {
      detail::exchange_counts(lv.rail, a_send_rows, a_send_assigned, a_recv_rows, a_recv_assigned);
    }
    check_counts(exact_counts, "stage A (inter-node) ", "node", a_send_rows, a_recv_rows, a_send_assigned,
                 a_recv_assigned);
    const detail::mpi_datatype meta_type(static_cast<int>(sizeof(routed_assignment)), MPI_BYTE);
    std::vector<routed_assignment> a_recv_meta(mpi_usz(detail::sum_of(a_recv_assigned)));
    if (!padded)
      detail::alltoallv(lv.rail, meta_type.get(), a_meta.data(), a_send_assigned, a_recv_meta.data(), a_recv_assigned);
    const index a_send_total = static_cast<index>(a_row_token.size());
    std::vector<T> a_send(mpi_usz(a_send_total * d));
    detail::gather_rows(be, std::span<const id_type>(a_row_token), x, matrix_view<T>{a_send.data(), a_send_total, d},
                        "x", "stage A send");
    const index a_recv_total = detail::sum_of(a_recv_rows);
    std::vector<T> a_recv(mpi_usz(a_recv_total * d));
    detail::alltoallv(lv.rail, row_type, a_send.data(), a_send_rows, a_recv.data(), a_recv_rows);

    // Stage B, as the relay: forward to each owner on this node, once per (source, token) (padded: each
    // slot row), with the assignments it owns, in the order received (ascending source, token, expert).
    std::string relay_failure;
    std::vector<std::int64_t> b_rows(mpi_usz(P), 0), b_assigned(mpi_usz(P), 0);
    std::vector<id_type> b_row_index;  // per stage-B send row: its row of a_recv
    std::vector<routed_assignment> b_meta;
    std::vector<id_type> b_from_a;  // per stage-B send assignment (padded: row): its a_recv one
    const std::vector<id_type> a_row_off = detail::offsets_from(a_recv_rows);
    if (padded) {
      // a_recv's block from rail peer np: C rows for each expert of this node, in node_experts order.
      for (index q = 0; q < P; ++q) {
        const std::size_t before = b_row_index.size();
        for (index np = 0; np < N; ++np)
          for (id_type e : node_experts[mpi_usz(node)]) {
            if (owner(e) != node * P + q) continue;
            for (index c = 0; c < C; ++c)
              b_row_index.push_back(static_cast<id_type>(a_row_off[mpi_usz(np)] + place_in_node[mpi_usz(e)] * C + c));
          }
        b_rows[mpi_usz(q)] = b_assigned[mpi_usz(q)] = static_cast<std::int64_t>(b_row_index.size() - before);
      }
      b_from_a = b_row_index;
    } else {
      // The a_recv row of each received assignment, checking that the metadata fits this relay (it
      // indexes the placement below).
      std::vector<id_type> a_row(a_recv_meta.size());
      const std::vector<id_type> a_meta_off = detail::offsets_from(a_recv_assigned);
      for (index np = 0; np < N && relay_failure.empty(); ++np) {
        id_type row = a_row_off[mpi_usz(np)] - 1;
        id_type prev_token = -1;
        for (id_type a = a_meta_off[mpi_usz(np)]; a < a_meta_off[mpi_usz(np + 1)]; ++a) {
          const routed_assignment& m = a_recv_meta[mpi_usz(a)];
          if (m.source != np * P + local || m.expert < 0 || m.expert >= E || owner(m.expert) / P != node ||
              m.token < prev_token) {
            relay_failure = "resonance: mpi_exchange::dispatch: stage A metadata from node " + std::to_string(np) +
                            " does not fit relay rank " + std::to_string(rank_) + " (assignment " + std::to_string(a) +
                            ")";
            break;
          }
          if (a == a_meta_off[mpi_usz(np)] || m.token != prev_token) ++row;
          prev_token = m.token;
          a_row[mpi_usz(a)] = row;
        }
        if (relay_failure.empty() && row + 1 != a_row_off[mpi_usz(np + 1)])
          relay_failure = "resonance: mpi_exchange::dispatch: stage A rows from node " + std::to_string(np) +
                          " do not match their metadata";
      }
      if (relay_failure.empty()) {
        std::vector<id_type> last_row(mpi_usz(P), -1);
        for (std::size_t a = 0; a < a_recv_meta.size(); ++a) {
          const auto q = mpi_usz(owner(a_recv_meta[a].expert) % P);
          ++b_assigned[q];
          if (last_row[q] != a_row[a]) {
            last_row[q] = a_row[a];
            ++b_rows[q];
          }
        }
        const std::vector<id_type> b_row_off = detail::offsets_of(b_rows, "stage B rows");
        const std::vector<id_type> b_meta_off = detail::offsets_of(b_assigned, "stage B assignments");
        b_row_index.resize(mpi_usz(b_row_off.back()));
        b_meta.resize(mpi_usz(b_meta_off.back()));
        b_from_a.resize(b_meta.size());
        std::vector<id_type> next_row(b_row_off.begin(), b_row_off.end() - 1);
        std::vector<id_type> next_meta(b_meta_off.begin(), b_meta_off.end() - 1);
        std::fill(last_row.begin(), last_row.end(), -1);
        for (std::size_t a = 0; a < a_recv_meta.size(); ++a) {
          const auto q = mpi_usz(owner(a_recv_meta[a].expert) % P);
          if (last_row[q] != a_row[a]) {
            last_row[q] = a_row[a];
            b_row_index[mpi_usz(next_row[q]++)] = a_row[a];
          }
          const id_type k = next_meta[q]++;
          b_meta[mpi_usz(k)] = a_recv_meta[a];
          b_from_a[mpi_usz(k)] = static_cast<id_type>(a);
        }
      }
    }
    const std::vector<int> b_send_rows = detail::to_int(b_rows), b_send_assigned = detail::to_int(b_assigned);
    std::vector<int> b_recv_rows, b_recv_assigned;
    if (padded) {
      // From each relay of this node: C rows per local expert for each of that relay's rail sources.
      const index L = static_cast<index>(local_experts(placement, rank_).size());
      b_recv_rows.assign(mpi_usz(P), static_cast<int>(N * L * C));
      b_recv_assigned = b_recv_rows;
    } else {
      detail::exchange_counts(lv.node, b_send_rows, b_send_assigned, b_recv_rows, b_recv_assigned);
    }
    // Always one agreement between the stages: a relay that cannot forward (or, with the exact check,
    // a stage-B count over the limit) must stop every rank before the next collective.
    {
      std::string m = relay_failure;
      if (m.empty() && exact_counts)
        m = detail::stage_overflow("stage B (intra-node) ", "local rank", options_.count_limit,
                                   detail::widen(b_send_rows), detail::widen(b_recv_rows),
                                   detail::widen(b_send_assigned), detail::widen(b_recv_assigned));
      detail::agree_or_throw(comm_, rank_, "mpi_exchange::dispatch", m);
    }
    std::vector<routed_assignment> b_recv_meta(mpi_usz(detail::sum_of(b_recv_assigned)));
    if (!padded)
      detail::alltoallv(lv.node, meta_type.get(), b_meta.data(), b_send_assigned, b_recv_meta.data(), b_recv_assigned);
    const index b_send_total = static_cast<index>(b_row_index.size());
    std::vector<T> b_send(mpi_usz(b_send_total * d));
    detail::gather_rows(be, std::span<const id_type>(b_row_index), matrix_view<const T>{a_recv.data(), a_recv_total, d},
                        matrix_view<T>{b_send.data(), b_send_total, d}, "stage A receive", "stage B send");
    const index b_recv_total = detail::sum_of(b_recv_rows);
    std::vector<T> b_recv(mpi_usz(b_recv_total * d));
    detail::alltoallv(lv.node, row_type, b_send.data(), b_send_rows, b_recv.data(), b_recv_rows);

    // As the owner: the flat exchange's receive side, rebuilt in source order from the forwarded blocks
    // (relay q's block holds the sources s with s % P == q, ascending).
    const std::vector<id_type> b_row_off = detail::offsets_from(b_recv_rows);
    std::vector<id_type> flat_row_b;  // per row of the flat receive buffer: its row of b_recv
    std::vector<id_type> b_return;    // per stage-B received assignment (padded: row): its expert slot
    if (padded) {
      out.receive_ = make_padded_receive_plan(placement, rank_, C);
      const index L = static_cast<index>(out.receive_.local_experts.size());
      flat_row_b.resize(mpi_usz(R * L * C));
      for (index s = 0; s < R; ++s)
        for (index j = 0; j < L; ++j)
          for (index c = 0; c < C; ++c)
            flat_row_b[mpi_usz((s * L + j) * C + c)] =
                static_cast<id_type>(b_row_off[mpi_usz(s % P)] + ((s / P) * L + j) * C + c);
      b_return.resize(flat_row_b.size());
      for (std::size_t f = 0; f < flat_row_b.size(); ++f)
        b_return[mpi_usz(flat_row_b[f])] = out.receive_.return_slot[f];
    } else {
      const std::vector<id_type> b_meta_off = detail::offsets_from(b_recv_assigned);
      std::vector<id_type> b_row(b_recv_meta.size());
      for (index q = 0; q < P; ++q) {
        id_type row = b_row_off[mpi_usz(q)] - 1;
        for (id_type b = b_meta_off[mpi_usz(q)]; b < b_meta_off[mpi_usz(q + 1)]; ++b) {
          const routed_assignment& m = b_recv_meta[mpi_usz(b)];
          if (b == b_meta_off[mpi_usz(q)] || m.source != b_recv_meta[mpi_usz(b - 1)].source ||
              m.token != b_recv_meta[mpi_usz(b - 1)].token)
            ++row;
          b_row[mpi_usz(b)] = row;
        }
        resonance::detail::require(row + 1 == b_row_off[mpi_usz(q + 1)], "stage B", "rows that match their metadata",
                                   "from local rank ", q);
      }
      // Merge the relays' blocks into ascending source order: the flat exchange's assignments.
      std::vector<routed_assignment> flat;
      flat.reserve(b_recv_meta.size());
      std::vector<id_type> flat_of_b(b_recv_meta.size());
      std::vector<id_type> row_counts(mpi_usz(R), 0), assignment_counts(mpi_usz(R), 0);
      std::vector<id_type> cursor(b_meta_off.begin(), b_meta_off.end() - 1);
      for (index s = 0; s < R; ++s) {
        const auto q = mpi_usz(s % P);
        id_type prev_row = -1;
        for (id_type& b = cursor[q]; b < b_meta_off[q + 1] && b_recv_meta[mpi_usz(b)].source == s; ++b) {
          flat_of_b[mpi_usz(b)] = static_cast<id_type>(flat.size());
          flat.push_back(b_recv_meta[mpi_usz(b)]);
          ++assignment_counts[mpi_usz(s)];
          if (b_row[mpi_usz(b)] != prev_row) {
            prev_row = b_row[mpi_usz(b)];
            ++row_counts[mpi_usz(s)];
            flat_row_b.push_back(prev_row);
          }
        }
      }
      for (index q = 0; q < P; ++q)
        resonance::detail::require(cursor[mpi_usz(q)] == b_meta_off[mpi_usz(q + 1)], "stage B",
                                   "assignments in ascending source order, each source from its relay",
                                   "from local rank ", q);
      out.receive_ = make_receive_plan(placement, rank_, row_counts, assignment_counts, flat);
      b_return.resize(b_recv_meta.size());
      for (std::size_t b = 0; b < b_return.size(); ++b) b_return[b] = out.receive_.return_slot[mpi_usz(flat_of_b[b])];
    }
    std::vector<id_type> slot_b(out.receive_.slot_row.size());
    for (std::size_t i = 0; i < slot_b.size(); ++i) slot_b[i] = flat_row_b[mpi_usz(out.receive_.slot_row[i])];
    out.rows_.resize(mpi_usz(out.receive_.num_slots() * d));
    detail::gather_rows(be, std::span<const id_type>(slot_b), matrix_view<const T>{b_recv.data(), b_recv_total, d},
                        out.expert_in(), "stage B receive", "expert_in");

    // Combine's way back: owner -> relay (node_comm) in the order the relay sent, relay -> source
    // (rail_comm) in the order the source sent.
    detail::return_stage to_relay;
    to_relay.level = detail::mpi_level::node;
    to_relay.gather = std::move(b_return);
    to_relay.send_counts = b_recv_assigned;
    to_relay.recv_counts = b_send_assigned;
    detail::return_stage to_source;
    to_source.level = detail::mpi_level::rail;
    to_source.gather.resize(mpi_usz(detail::sum_of(a_recv_assigned)));
    for (std::size_t k = 0; k < b_from_a.size(); ++k) to_source.gather[mpi_usz(b_from_a[k])] = static_cast<id_type>(k);
    to_source.send_counts = a_recv_assigned;
    to_source.recv_counts = a_send_assigned;
    out.returns_.push_back(std::move(to_relay));
    out.returns_.push_back(std::move(to_source));
    out.send_ = std::move(xp);
  }

  // --- the way back: combine, return_rows, send_rows ---------------------------------------------

  // The settlement of a call on the way back: the dispatch, the width and the row type, and which call
  // (so that ranks making different calls on one dispatch throw rather than move different rows).
  template <class T, class U>
  void settle_return(std::string_view call, const dispatched<T>& d, std::string_view width_name, index width,
                     const std::string& failure) {
    const std::vector<detail::agreement_field> fields = {
        detail::numeric_field("dispatch sequence number", static_cast<std::int64_t>(d.sequence_)),
        detail::numeric_field(width_name, width),
        {"row type", detail::row_type_code<U>(), detail::row_type_name(detail::row_type_code<U>())},
        {"exchange mode", static_cast<std::uint64_t>(d.send_.mode),
         d.send_.mode == exchange_mode::padded ? "padded" : "dropless"},
        {"topology", static_cast<std::uint64_t>(d.topology_),
         d.topology_ == exchange_topology::flat ? "flat" : "two_level"}};
    detail::settle(comm_, rank_, call, fields, failure, {});
  }

  // The local preconditions of the way back: d made here, m with `expected` rows and a width MPI can
  // count, `other` with other_rows rows of that width. "" when they hold, else the first failure.
  template <class T, class A, class B>
  std::string check_return(const dispatched<T>& d, matrix_view<A> m, std::string_view m_name, index expected,
                           std::string_view expected_words, matrix_view<B> other, std::string_view other_name,
                           index other_rows) const {
    using resonance::detail::require;
    try {
      require(d.exchange_id_ != 0 && d.exchange_id_ == id_, "dispatched",
              "the result of a dispatch on this mpi_exchange");
      resonance::detail::check_matrix(m, m_name);
      require(m.rows == expected, m_name, std::to_string(expected) + " rows (" + std::string(expected_words) + ")",
              m.rows);
      require(m.cols >= 1 && m.cols <= INT_MAX, m_name, "between 1 and INT_MAX columns", m.cols);
      resonance::detail::check_matrix(other, other_name, other_rows, m.cols);
    } catch (const error& e) {
      return e.what();
    }
    return {};
  }

  // The source's return buffer (one row per row of the plan's return_row targets: d.send_ flat, d.back_
  // two-level) from one row per slot, along the return stages; `send` and `recv` hold the buffers.
  template <class Backend, class T, class U>
  matrix_view<const U> run_returns(const Backend& be, const dispatched<T>& d, matrix_view<const U> per_slot,
                                   std::vector<U>& send, std::vector<U>& recv) {
    const index w = per_slot.cols;
    const detail::mpi_datatype row_type(static_cast<int>(w), detail::mpi_scalar<U>());
    matrix_view<const U> current = per_slot;
    for (const detail::return_stage& stage : d.returns_) {
      const index n_send = static_cast<index>(stage.gather.size()), n_recv = detail::sum_of(stage.recv_counts);
      send.resize(detail::mpi_usz(n_send * w));
      detail::gather_rows(be, std::span<const id_type>(stage.gather), current, matrix_view<U>{send.data(), n_send, w},
                          "expert_out", "returns");
      recv.resize(detail::mpi_usz(n_recv * w));
      detail::alltoallv(comm_of(stage.level, d.ranks_per_node_), row_type.get(), send.data(), stage.send_counts,
                        recv.data(), stage.recv_counts);
      current = matrix_view<const U>{recv.data(), n_recv, w};
    }
    return current;
  }

  // The return stages backwards: `returned` (the source's return buffer) to one row per slot. Each
  // stage's gather is one-to-one, so its inverse puts every row back; a row no stage reaches (a
  // padding slot) is zero.
  template <class Backend, class T, class U>
  void run_returns_backwards(const Backend& be, const dispatched<T>& d, std::vector<U> current,
                             matrix_view<U> per_slot) {
    const index w = per_slot.cols;
    const detail::mpi_datatype row_type(static_cast<int>(w), detail::mpi_scalar<U>());
    std::vector<U> recv, previous;
    for (std::size_t k = d.returns_.size(); k-- > 0;) {
      const detail::return_stage& stage = d.returns_[k];
      const index n_out = static_cast<index>(stage.gather.size());
      recv.resize(detail::mpi_usz(n_out * w));
      detail::alltoallv(comm_of(stage.level, d.ranks_per_node_), row_type.get(), current.data(), stage.recv_counts,
                        recv.data(), stage.send_counts);
      const matrix_view<const U> in{recv.data(), n_out, w};
      const index n_prev = k == 0 ? per_slot.rows : detail::sum_of(d.returns_[k - 1].recv_counts);
      const std::vector<id_type> inverse = detail::inverse_rows(stage.gather, n_prev);
      if (k == 0) {
        detail::gather_rows(be, std::span<const id_type>(inverse), in, per_slot, "returns", "per_slot");
      } else {
        previous.resize(detail::mpi_usz(n_prev * w));
        detail::gather_rows(be, std::span<const id_type>(inverse), in, matrix_view<U>{previous.data(), n_prev, w},
                            "returns", "returns");
        std::swap(current, previous);
      }
    }
  }

  // The source's side of the way back: return_row indexes its return buffer.
  template <class T>
  static const exchange_plan& source_side(const dispatched<T>& d) {
    return d.topology_ == exchange_topology::flat ? d.send_ : d.back_;
  }

  template <class Backend, class T>
  void combine_impl(const Backend& be, const dispatched<T>& d, matrix_view<const T> expert_out, matrix_view<T> y) {
    static_assert(resonance::detail::row_scalar_v<T>, "rows of float, double or bfloat16");
    static_assert(host_accessible_v<memory_space_t<Backend>>, "the MPI exchange moves host memory");
    constexpr std::string_view call = "mpi_exchange::combine";
    require_live(call);
    const std::string failure = check_return(d, expert_out, "expert_out", d.receive_.num_slots(),
                                             "one per row of expert_in", y, "y", d.send_.num_tokens);
    settle_return<T, T>(call, d, "expert_out width", expert_out.cols, failure);

    std::vector<T> send, recv;
    const matrix_view<const T> returned = run_returns(be, d, expert_out, send, recv);
    // The source's sum, over copies of the plan's token-major arrays (all combine_returns reads).
    plan_view<> pv;
    pv.num_tokens_ = d.send_.num_tokens;
    pv.num_experts_ = d.send_.num_experts;
    pv.capacity_ = d.send_.capacity;
    pv.num_assignments_ = static_cast<index>(d.token_weight_.size());
    pv.token_offsets_ = d.token_offsets_.data();
    pv.token_weight_ = d.token_weight_.data();
    combine_returns(be, pv, source_side(d), returned, y);
  }

  template <class Backend, class T, class U>
  void return_rows_impl(const Backend& be, const dispatched<T>& d, matrix_view<const U> per_slot,
                        matrix_view<U> per_assignment) {
    static_assert(resonance::detail::row_scalar_v<U>, "rows of float, double or bfloat16");
    static_assert(host_accessible_v<memory_space_t<Backend>>, "the MPI exchange moves host memory");
    constexpr std::string_view call = "mpi_exchange::return_rows";
    require_live(call);
    const exchange_plan& back = source_side(d);
    const std::string failure =
        check_return(d, per_slot, "per_slot", d.receive_.num_slots(), "one per row of expert_in", per_assignment,
                     "per_assignment", static_cast<index>(back.return_row.size()));
    settle_return<T, U>(call, d, "per_slot width", per_slot.cols, failure);

    std::vector<U> send, recv;
    const matrix_view<const U> returned = run_returns(be, d, per_slot, send, recv);
    detail::gather_rows(be, std::span<const id_type>(back.return_row), returned, per_assignment, "returns",
                        "per_assignment");
  }

  template <class Backend, class T, class U>
  void send_rows_impl(const Backend& be, const dispatched<T>& d, matrix_view<const U> per_assignment,
                      matrix_view<U> per_slot) {
    static_assert(resonance::detail::row_scalar_v<U>, "rows of float, double or bfloat16");
    static_assert(host_accessible_v<memory_space_t<Backend>>, "the MPI exchange moves host memory");
    constexpr std::string_view call = "mpi_exchange::send_rows";
    require_live(call);
    const exchange_plan& back = source_side(d);
    const std::string failure =
        check_return(d, per_assignment, "per_assignment", static_cast<index>(back.return_row.size()),
                     "one per kept assignment of the plan dispatched", per_slot, "per_slot", d.receive_.num_slots());
    settle_return<T, U>(call, d, "per_assignment width", per_assignment.cols, failure);

    // The source's return buffer, filled backwards: row return_row[i] = per_assignment row i (rows no
    // assignment returns through, padding, are zero).
    const index w = per_assignment.cols, n = back.num_returns();
    std::vector<U> returned(detail::mpi_usz(n * w));
    const std::vector<id_type> inverse = detail::inverse_rows(back.return_row, n);
    detail::gather_rows(be, std::span<const id_type>(inverse), per_assignment, matrix_view<U>{returned.data(), n, w},
                        "per_assignment", "returns");
    run_returns_backwards(be, d, std::move(returned), per_slot);
  }
};

}  // namespace resonance::dist
