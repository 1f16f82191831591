#pragma once

// The exchange of expert parallelism, as plain data: which rows one rank sends to each rank, how a
// receiving rank orders what it gets expert-major, and how the expert outputs come back and are
// combined. Header-only and transport-free: dist/mpi.hpp moves these buffers with MPI; NCCL or any
// other runtime can move the same buffers (docs/expert-parallel.md).
//
// Dropless (exchange_mode::dropless), DeepEP's accounting:
//   dispatch  source -> rank r: each token with at least one kept expert on r, once (ascending token),
//             and its assignments on r as routed_assignment metadata (ascending token, then expert);
//   receive   rank r orders the (row, local expert) pairs expert-major: ascending expert id, then
//             source rank, then token, whatever the order the rows arrived in;
//   combine   r returns one row per assignment, in the order the source sent them; the source sums
//             them exactly as resonance::combine does (ascending expert id, fp32), so the output is
//             bitwise the single-process combine's whatever the rank count.
// Padded (exchange_mode::padded), Tutel's and DeepSpeed's drop-and-pad: a plan padded to its capacity
// C sends every slot of every expert of r (C rows per expert, padding rows zeroed), so the counts are
// fixed and no metadata is needed; the receiver's expert-major order is (local expert, source, slot).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "../backend/backend.hpp"
#include "../backend/serial.hpp"
#include "../core/error.hpp"
#include "../core/view.hpp"
#include "../plan/dispatch.hpp"
#include "../plan/plan.hpp"
#include "placement.hpp"

namespace resonance::dist {

enum class exchange_mode : unsigned char {
  dropless,  // one row per (token, destination rank), counts exchanged, metadata with the rows
  padded,    // C rows per expert, padding included: fixed counts, no metadata
};

// One kept (token, expert) pair, sent with its row: the metadata of a dropless dispatch. 16 bytes,
// trivially copyable, so a transport moves it as bytes.
struct routed_assignment {
  id_type source = 0;   // the rank that routed the token
  id_type token = 0;    // the token's row in its source rank's batch
  id_type expert = 0;   // global expert id, owned by the receiving rank
  float weight = 0.0f;  // combine weight

  friend bool operator==(const routed_assignment&, const routed_assignment&) = default;
};
static_assert(sizeof(routed_assignment) == 16 && std::is_trivially_copyable_v<routed_assignment>);

// The experts a rank owns, ascending: its local expert j is global expert local_experts(p, r)[j].
inline std::vector<id_type> local_experts(const expert_placement& p, index rank) {
  std::vector<id_type> out;
  for (std::size_t e = 0; e < p.rank_of_expert.size(); ++e)
    if (p.rank_of_expert[e] == rank) out.push_back(static_cast<id_type>(e));
  return out;
}

namespace detail {
inline void check_rank(const expert_placement& p, index rank) {
  resonance::detail::require(rank >= 0 && rank < p.num_ranks, "rank",
                             "a rank in [0, num_ranks = " + std::to_string(p.num_ranks) + ")", rank);
}

// Entries per rank to offsets (R+1).
inline std::vector<id_type> offsets_of(const std::vector<std::int64_t>& counts, std::string_view what) {
  std::vector<id_type> off(counts.size() + 1, 0);
  std::int64_t sum = 0;
  for (std::size_t r = 0; r < counts.size(); ++r) {
    sum += counts[r];
    resonance::detail::require(sum <= std::int64_t{std::numeric_limits<id_type>::max()}, what,
                               "at most 2^31 - 1 entries in all", sum);
    off[r + 1] = static_cast<id_type>(sum);
  }
  return off;
}

// The capacity of a plan padded to it: every expert's slot range is exactly C slots.
inline index padded_capacity(const plan_view<>& plan) {
  using resonance::detail::require;
  const index C = plan.capacity();
  require(C >= 0, "plan", "a plan with a capacity (padded mode needs capacity_factor and pad_to_capacity)");
  const auto off = plan.expert_offsets();
  for (index e = 0; e < plan.num_experts(); ++e)
    require(off[static_cast<std::size_t>(e + 1)] - off[static_cast<std::size_t>(e)] == C, "plan",
            "every expert padded to the capacity (pad_to_capacity, no extra alignment)", "expert ", e, " has ",
            off[static_cast<std::size_t>(e + 1)] - off[static_cast<std::size_t>(e)], " slots for capacity ", C);
  return C;
}
}  // namespace detail

// The send side of one rank's exchange, from its routing plan (the rank's own tokens, global experts).
struct exchange_plan {
  exchange_mode mode = exchange_mode::dropless;
  index num_ranks = 0;
  index rank = 0;
  index num_tokens = 0;
  index num_experts = 0;
  index capacity = -1;                         // padded mode: C; dropless: -1
  std::vector<id_type> row_offsets;            // R+1: rows to rank r are [row_offsets[r], row_offsets[r+1])
  std::vector<id_type> row_token;              // the token of each row sent (-1: a padding row, zeroed)
  std::vector<id_type> return_offsets;         // R+1: rows rank r returns in combine
  std::vector<routed_assignment> assignments;  // dropless: sent with the rows, [return_offsets[r], ...) to r
  std::vector<id_type> return_row;             // per kept assignment in the plan's token-major order: its row in the
                                               // combine's receive buffer

  index rows_to(index r) const { return row_offsets[r + 1] - row_offsets[r]; }
  index returns_from(index r) const { return return_offsets[r + 1] - return_offsets[r]; }
  index num_rows() const { return row_offsets.empty() ? 0 : row_offsets.back(); }
  index num_returns() const { return return_offsets.empty() ? 0 : return_offsets.back(); }
};

// The exchange of `plan` (routed on rank `rank`) over `placement`. Padded mode needs a plan padded to
// its capacity. Throws resonance::error on a placement that does not fit the plan.
inline exchange_plan make_exchange_plan(const plan_view<>& plan, const expert_placement& placement, index rank,
                                        exchange_mode mode = exchange_mode::dropless) {
  using resonance::detail::require;
  const index T = plan.num_tokens(), E = plan.num_experts(), R = placement.num_ranks;
  placement.validate(E);
  detail::check_rank(placement, rank);
  require(mode == exchange_mode::dropless || mode == exchange_mode::padded, "mode", "dropless or padded",
          static_cast<int>(mode));
  exchange_plan x;
  x.mode = mode;
  x.num_ranks = R;
  x.rank = rank;
  x.num_tokens = T;
  x.num_experts = E;
  const auto toff = plan.token_offsets();
  const auto tex = plan.token_expert();
  const auto owner = [&](id_type e) { return placement.rank_of_expert[static_cast<std::size_t>(e)]; };
  x.return_row.resize(static_cast<std::size_t>(plan.num_assignments()));

  if (mode == exchange_mode::padded) {
    const index C = detail::padded_capacity(plan);
    x.capacity = C;
    // Rows to r: the C slots of each expert r owns, ascending expert id; the return buffer mirrors it.
    std::vector<std::int64_t> per_rank(static_cast<std::size_t>(R), 0);
    for (index e = 0; e < E; ++e) per_rank[static_cast<std::size_t>(owner(static_cast<id_type>(e)))] += C;
    x.row_offsets = detail::offsets_of(per_rank, "padded rows");
    x.return_offsets = x.row_offsets;
    x.row_token.resize(static_cast<std::size_t>(x.num_rows()));
    std::vector<id_type> row_of_slot(static_cast<std::size_t>(plan.num_slots()));
    std::vector<id_type> next(x.row_offsets.begin(), x.row_offsets.end() - 1);
    const auto slot_token = plan.slot_token();
    const auto eoff = plan.expert_offsets();
    for (index e = 0; e < E; ++e) {
      id_type& at = next[static_cast<std::size_t>(owner(static_cast<id_type>(e)))];
      for (id_type s = eoff[static_cast<std::size_t>(e)]; s < eoff[static_cast<std::size_t>(e + 1)]; ++s, ++at) {
        x.row_token[static_cast<std::size_t>(at)] = slot_token[static_cast<std::size_t>(s)];
        row_of_slot[static_cast<std::size_t>(s)] = at;
      }
    }
    const auto tslot = plan.token_slot();
    for (std::size_t i = 0; i < x.return_row.size(); ++i)
      x.return_row[i] = row_of_slot[static_cast<std::size_t>(tslot[i])];
    return x;
  }

  // Dropless: count, then fill in (rank, token, expert) order. A token's assignments are ordered by
  // expert id, so its run on one rank is contiguous in that order after a stable pass per rank.
  std::vector<std::int64_t> rows(static_cast<std::size_t>(R), 0), assigned(static_cast<std::size_t>(R), 0);
  std::vector<index> last_token(static_cast<std::size_t>(R), -1);
  for (index t = 0; t < T; ++t)
    for (id_type i = toff[static_cast<std::size_t>(t)]; i < toff[static_cast<std::size_t>(t + 1)]; ++i) {
      const auto r = static_cast<std::size_t>(owner(tex[static_cast<std::size_t>(i)]));
      ++assigned[r];
      if (last_token[r] != t) {
        last_token[r] = t;
        ++rows[r];
      }
    }
  x.row_offsets = detail::offsets_of(rows, "rows sent");
  x.return_offsets = detail::offsets_of(assigned, "assignments sent");
  x.row_token.resize(static_cast<std::size_t>(x.num_rows()));
  x.assignments.resize(static_cast<std::size_t>(x.num_returns()));
  std::vector<id_type> next_row(x.row_offsets.begin(), x.row_offsets.end() - 1);
  std::vector<id_type> next_assignment(x.return_offsets.begin(), x.return_offsets.end() - 1);
  std::fill(last_token.begin(), last_token.end(), -1);
  const auto tw = plan.token_weight();
  for (index t = 0; t < T; ++t)
    for (id_type i = toff[static_cast<std::size_t>(t)]; i < toff[static_cast<std::size_t>(t + 1)]; ++i) {
      const id_type e = tex[static_cast<std::size_t>(i)];
      const auto r = static_cast<std::size_t>(owner(e));
      if (last_token[r] != t) {
        last_token[r] = t;
        x.row_token[static_cast<std::size_t>(next_row[r]++)] = static_cast<id_type>(t);
      }
      const id_type a = next_assignment[r]++;
      x.assignments[static_cast<std::size_t>(a)] = {static_cast<id_type>(rank), static_cast<id_type>(t), e,
                                                    tw[static_cast<std::size_t>(i)]};
      x.return_row[static_cast<std::size_t>(i)] = a;
    }
  return x;
}

// The receive side of one rank's exchange: the expert-major order of what it received, and which of
// its expert rows go back to each source in combine.
struct receive_plan {
  exchange_mode mode = exchange_mode::dropless;
  index num_ranks = 0;
  index rank = 0;
  index capacity = -1;                  // padded mode: C
  std::vector<id_type> local_experts;   // L global ids, ascending
  std::vector<id_type> row_offsets;     // R+1: rows received from each source (the receive buffer)
  std::vector<id_type> return_offsets;  // R+1: rows returned to each source in combine
  std::vector<id_type> expert_offsets;  // L+1: local expert j's slots of the expert-major buffer
  std::vector<id_type> slot_row;        // per slot: its row of the receive buffer
  std::vector<id_type> slot_source;     // per slot: the source rank
  std::vector<id_type> slot_token;      // dropless: the token on its source rank (padded: empty)
  std::vector<float> slot_weight;       // dropless: the combine weight (padded: empty)
  std::vector<id_type> return_slot;     // per returned row (source-major, the source's order): its slot

  index num_received_rows() const { return row_offsets.empty() ? 0 : row_offsets.back(); }
  index num_slots() const { return static_cast<index>(slot_row.size()); }
  index num_returns() const { return return_offsets.empty() ? 0 : return_offsets.back(); }
};

// From what rank `rank` received in a dropless exchange: row_counts[s] rows and assignment_counts[s]
// assignments from each source s, the assignments concatenated in source order. Everything received
// is checked (a source, expert, order or count that does not fit is a resonance::error naming it), so
// a transport that delivered the wrong bytes fails here rather than in the experts.
inline receive_plan make_receive_plan(const expert_placement& placement, index rank,
                                      std::span<const id_type> row_counts, std::span<const id_type> assignment_counts,
                                      std::span<const routed_assignment> assignments) {
  using resonance::detail::require;
  const index R = placement.num_ranks, E = static_cast<index>(placement.rank_of_expert.size());
  placement.validate(E);
  detail::check_rank(placement, rank);
  require(static_cast<index>(row_counts.size()) == R, "row_counts", "one count per rank", row_counts.size());
  require(static_cast<index>(assignment_counts.size()) == R, "assignment_counts", "one count per rank",
          assignment_counts.size());
  receive_plan p;
  p.mode = exchange_mode::dropless;
  p.num_ranks = R;
  p.rank = rank;
  p.local_experts = local_experts(placement, rank);
  std::vector<std::int64_t> rows(static_cast<std::size_t>(R)), assigned(static_cast<std::size_t>(R));
  for (index s = 0; s < R; ++s) {
    const id_type nr = row_counts[static_cast<std::size_t>(s)], na = assignment_counts[static_cast<std::size_t>(s)];
    require(nr >= 0, "row_counts", "counts >= 0", "source ", s, ": ", nr);
    require(na >= nr, "assignment_counts", "at least one assignment per row", "source ", s, ": ", nr, " rows, ", na,
            " assignments");
    rows[static_cast<std::size_t>(s)] = row_counts[static_cast<std::size_t>(s)];
    assigned[static_cast<std::size_t>(s)] = assignment_counts[static_cast<std::size_t>(s)];
  }
  p.row_offsets = detail::offsets_of(rows, "rows received");
  p.return_offsets = detail::offsets_of(assigned, "assignments received");
  require(static_cast<index>(assignments.size()) == p.num_returns(), "assignments",
          std::to_string(p.num_returns()) + " entries (the sum of assignment_counts)", assignments.size());
  const index L = static_cast<index>(p.local_experts.size());
  std::vector<id_type> local_of(static_cast<std::size_t>(E), -1);
  for (index j = 0; j < L; ++j)
    local_of[static_cast<std::size_t>(p.local_experts[static_cast<std::size_t>(j)])] = static_cast<id_type>(j);

  // Check each source's run and give each assignment its row; count per local expert.
  const auto n = static_cast<std::size_t>(p.num_returns());
  std::vector<id_type> row_of(n);
  std::vector<id_type> per_expert(static_cast<std::size_t>(L) + 1, 0);
  for (index s = 0; s < R; ++s) {
    id_type row = p.row_offsets[static_cast<std::size_t>(s)] - 1;
    const routed_assignment* prev = nullptr;
    for (id_type a = p.return_offsets[static_cast<std::size_t>(s)];
         a < p.return_offsets[static_cast<std::size_t>(s + 1)]; ++a) {
      const routed_assignment& x = assignments[static_cast<std::size_t>(a)];
      require(x.source == s, "assignments", "the source rank of the block they came in", "assignment ", a,
              " from source ", s, " says source ", x.source);
      if (x.expert < 0 || x.expert >= E || local_of[static_cast<std::size_t>(x.expert)] < 0)
        resonance::detail::fail("assignments", "experts owned by rank " + std::to_string(rank), "assignment ", a,
                                " has expert ", x.expert);
      require(x.token >= 0, "assignments", "token ids >= 0", "assignment ", a, " has token ", x.token);
      require(prev == nullptr || x.token > prev->token || (x.token == prev->token && x.expert > prev->expert),
              "assignments", "ascending (token, expert) within a source", "assignment ", a);
      if (prev == nullptr || x.token != prev->token) ++row;
      prev = &x;
      row_of[static_cast<std::size_t>(a)] = row;
      ++per_expert[static_cast<std::size_t>(local_of[static_cast<std::size_t>(x.expert)]) + 1];
    }
    require(row + 1 == p.row_offsets[static_cast<std::size_t>(s + 1)], "row_counts",
            "the number of distinct tokens among a source's assignments", "source ", s, ": ",
            row_counts[static_cast<std::size_t>(s)], " rows for ", row + 1 - p.row_offsets[static_cast<std::size_t>(s)],
            " distinct tokens");
  }
  // Expert-major: a stable counting sort of (source, token, expert) order by local expert leaves each
  // expert's slots in (source, token) order.
  for (index j = 0; j < L; ++j) per_expert[static_cast<std::size_t>(j + 1)] += per_expert[static_cast<std::size_t>(j)];
  p.expert_offsets = per_expert;
  p.slot_row.resize(n);
  p.slot_source.resize(n);
  p.slot_token.resize(n);
  p.slot_weight.resize(n);
  p.return_slot.resize(n);
  std::vector<id_type> next(per_expert.begin(), per_expert.end() - 1);
  for (std::size_t a = 0; a < n; ++a) {
    const routed_assignment& x = assignments[a];
    const id_type slot = next[static_cast<std::size_t>(local_of[static_cast<std::size_t>(x.expert)])]++;
    p.slot_row[static_cast<std::size_t>(slot)] = row_of[a];
    p.slot_source[static_cast<std::size_t>(slot)] = x.source;
    p.slot_token[static_cast<std::size_t>(slot)] = x.token;
    p.slot_weight[static_cast<std::size_t>(slot)] = x.weight;
    p.return_slot[a] = slot;
  }
  return p;
}

// The receive side of a padded exchange: every source sends C rows per local expert, so the layout
// follows from the placement and C alone. C must be the same on every rank (equal batch sizes, as
// fixed-size All-to-All assumes; dist/mpi.hpp checks it across ranks before moving anything). Slot (j, s, c) of local
// expert j holds row c of source s's block for j.
inline receive_plan make_padded_receive_plan(const expert_placement& placement, index rank, index capacity) {
  using resonance::detail::require;
  const index R = placement.num_ranks, E = static_cast<index>(placement.rank_of_expert.size());
  placement.validate(E);
  detail::check_rank(placement, rank);
  require(capacity >= 0, "capacity", "a capacity >= 0", capacity);
  receive_plan p;
  p.mode = exchange_mode::padded;
  p.num_ranks = R;
  p.rank = rank;
  p.capacity = capacity;
  p.local_experts = local_experts(placement, rank);
  const index L = static_cast<index>(p.local_experts.size());
  require(static_cast<std::int64_t>(L) * capacity * R <= std::int64_t{std::numeric_limits<id_type>::max()}, "capacity",
          "at most 2^31 - 1 received rows in all", L * capacity * R);
  p.row_offsets.resize(static_cast<std::size_t>(R + 1));
  for (index s = 0; s <= R; ++s) p.row_offsets[static_cast<std::size_t>(s)] = static_cast<id_type>(s * L * capacity);
  p.return_offsets = p.row_offsets;
  p.expert_offsets.resize(static_cast<std::size_t>(L + 1));
  for (index j = 0; j <= L; ++j) p.expert_offsets[static_cast<std::size_t>(j)] = static_cast<id_type>(j * R * capacity);
  const auto n = static_cast<std::size_t>(L * R * capacity);
  p.slot_row.resize(n);
  p.slot_source.resize(n);
  p.return_slot.resize(n);
  for (index s = 0; s < R; ++s)
    for (index j = 0; j < L; ++j)
      for (index c = 0; c < capacity; ++c) {
        const index row = (s * L + j) * capacity + c, slot = (j * R + s) * capacity + c;
        p.slot_row[static_cast<std::size_t>(slot)] = static_cast<id_type>(row);
        p.slot_source[static_cast<std::size_t>(slot)] = static_cast<id_type>(s);
        p.return_slot[static_cast<std::size_t>(row)] = static_cast<id_type>(slot);
      }
  return p;
}

namespace detail {
// out.row(i) = in.row(index[i]), or zeros where index[i] < 0: the one row movement of the exchange
// (pack, unpack, return; dist/mpi.hpp's two-level stages too), written once on the execution
// primitives.
template <execution_backend Backend, class T>
void gather_rows(const Backend& be, std::span<const id_type> index_of, matrix_view<const T> in, matrix_view<T> out,
                 std::string_view in_name, std::string_view out_name) {
  static_assert(resonance::detail::row_scalar_v<T>, "rows of float, double or bfloat16");
  static_assert(host_accessible_v<memory_space_t<Backend>>, "the exchange's buffers are host memory");
  resonance::detail::check_matrix(in, in_name);
  resonance::detail::check_matrix(out, out_name, static_cast<index>(index_of.size()), in.cols);
  for (std::size_t i = 0; i < index_of.size(); ++i)
    if (index_of[i] >= in.rows)
      resonance::detail::fail(in_name, "a row for every index (" + std::to_string(index_of[i] + 1) + " rows at least)",
                              in.rows, " rows");
  const id_type* const idx = index_of.data();
  const index d = in.cols;
  for_each(
      be, out.rows,
      [=](index i) {
        T* dst = out.row(i);
        if (idx[i] >= 0) {
          std::memcpy(dst, in.row(idx[i]), static_cast<std::size_t>(d) * sizeof(T));
        } else {
          for (index c = 0; c < d; ++c) dst[c] = T{};
        }
      },
      resonance::detail::dispatch_grain);
}
}  // namespace detail

// The send buffer of a dispatch: row i = x.row(row_token[i]) (padding rows zeroed).
template <execution_backend Backend, class T>
void pack_rows(const Backend& be, const exchange_plan& xp, matrix_view<const T> x, matrix_view<T> send) {
  resonance::detail::require(x.rows == xp.num_tokens, "x", std::to_string(xp.num_tokens) + " rows (one per token)",
                             x.rows);
  detail::gather_rows(be, std::span<const id_type>(xp.row_token), x, send, "x", "send");
}

// The expert-major buffer from the received rows: slot i = received.row(slot_row[i]).
template <execution_backend Backend, class T>
void unpack_rows(const Backend& be, const receive_plan& rp, matrix_view<const T> received, matrix_view<T> expert_in) {
  resonance::detail::require(received.rows == rp.num_received_rows(), "received",
                             std::to_string(rp.num_received_rows()) + " rows", received.rows);
  detail::gather_rows(be, std::span<const id_type>(rp.slot_row), received, expert_in, "received", "expert_in");
}

// The combine's send buffer on the expert side: returned row i = expert_out.row(return_slot[i]).
template <execution_backend Backend, class T>
void pack_returns(const Backend& be, const receive_plan& rp, matrix_view<const T> expert_out, matrix_view<T> returns) {
  resonance::detail::require(expert_out.rows == rp.num_slots(), "expert_out",
                             std::to_string(rp.num_slots()) + " rows (one per slot)", expert_out.rows);
  detail::gather_rows(be, std::span<const id_type>(rp.return_slot), expert_out, returns, "expert_out", "returns");
}

// y[t] = sum over t's kept assignments, ascending expert id, of weight * returned.row(return_row[i]):
// resonance::combine's arithmetic in its order, so y is bitwise what combine(plan, expert_out) gives
// when the returned rows are the expert outputs of the same slots. It reads only the plan's
// token_offsets and token_weight (and its sizes): dist/mpi.hpp keeps copies of just those.
template <execution_backend Backend, class T>
void combine_returns(const Backend& be, const plan_view<>& plan, const exchange_plan& xp, matrix_view<const T> returned,
                     matrix_view<T> y) {
  using resonance::detail::require;
  static_assert(resonance::detail::row_scalar_v<T>, "rows of float, double or bfloat16");
  static_assert(host_accessible_v<memory_space_t<Backend>>, "the exchange's buffers are host memory");
  require(xp.num_tokens == plan.num_tokens() && static_cast<index>(xp.return_row.size()) == plan.num_assignments(),
          "exchange", "the exchange plan made from this routing plan", xp.num_tokens, " tokens");
  resonance::detail::check_matrix(returned, "returned");
  require(returned.rows == xp.num_returns(), "returned", std::to_string(xp.num_returns()) + " rows (one per return)",
          returned.rows);
  resonance::detail::check_matrix(y, "y", plan.num_tokens(), returned.cols);
  const id_type* const off = plan.token_offsets_;
  const float* const w = plan.token_weight_;
  const id_type* const back = xp.return_row.data();
  const index d = y.cols;
  for_each(
      be, plan.num_tokens(),
      [=](index t) {
        const auto row_of = [&](id_type i) { return returned.row(back[i]); };
        resonance::detail::combine_columns<0>(y.row(t), row_of, w, off[t], off[t + 1], 0, d);
      },
      resonance::detail::dispatch_grain);
}

}  // namespace resonance::dist
