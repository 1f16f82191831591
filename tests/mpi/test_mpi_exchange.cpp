// resonance::dist::mpi_exchange, run by mpiexec at 1, 2 and 4 ranks (CTest mpi.ranksN; the mismatch
// suite runs as mpi.mismatch.ranksN). Every rank routes its own random batch, seeded by its rank, and
// the references are independent of the exchange:
//   * y against resonance::combine of the same rank's plan, with the expert outputs computed in one
//     process (resonance::dispatch, then the same rowwise expert function), compared bit for bit;
//   * every received row against the source's token row, regenerated from (source, token, column);
//   * the receive order against the peers' plans, which every rank routes again itself;
//   * the count matrix against an MPI_Allgather of each rank's own brute-force counts;
//   * return_rows / send_rows: values tagged by (expert, source, token) on one side against the peers'
//     plans and this rank's own on the other, bit for bit.

#include <algorithm>
#include <bit>
#include <climits>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <doctest/doctest.h>
#include <mpi.h>

#include <resonance/dist/mpi.hpp>
#include <resonance/resonance.hpp>

#include "error_of.hpp"
#include "random_inputs.hpp"

#ifndef RESONANCE_HAS_MPI
#error "resonance::mpi must define RESONANCE_HAS_MPI"
#endif

namespace {

namespace rs = resonance;
namespace dist = resonance::dist;
using dist::exchange_mode;
using dist::exchange_topology;
using resonance_test::error_of;
using resonance_test::usz;

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int world_size() {
  int n = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// One routing setting: experts, top-k, placement, exchange mode, row width.
struct setting {
  rs::index E = 16;
  rs::index k = 2;
  bool round_robin = false;
  rs::index ranks_per_node = 1;
  exchange_mode mode = exchange_mode::dropless;
  rs::index d = 24;
  std::uint64_t seed = 1;

  std::string name() const {
    return "E=" + std::to_string(E) + " k=" + std::to_string(k) + (round_robin ? " round-robin" : " contiguous") +
           " ranks_per_node=" + std::to_string(ranks_per_node) +
           (mode == exchange_mode::padded ? " padded" : " dropless") + " d=" + std::to_string(d);
  }
};

dist::expert_placement placement_of(const setting& s, rs::index R) {
  if (!s.round_robin) return dist::expert_placement::contiguous(s.E, R, s.ranks_per_node);
  dist::expert_placement p{R, s.ranks_per_node, std::vector<rs::id_type>(usz(s.E))};
  for (rs::index e = 0; e < s.E; ++e) p.rank_of_expert[usz(e)] = static_cast<rs::id_type>(e % R);
  return p;
}

// Tokens per rank: unequal when dropless; equal when padded (the capacity must agree).
rs::index tokens_of(const setting& s, int rank) { return s.mode == exchange_mode::padded ? 48 : 29 + 13 * rank; }

// The batch of `rank`: its own logits, routed by a resonance router (padded: capacity factor 1 with
// pad_to_capacity, so tokens are dropped and experts padded).
rs::routing_plan route_rank(const setting& s, int rank, rs::index T) {
  std::mt19937_64 rng(s.seed * 7919 + static_cast<std::uint64_t>(rank));
  const std::vector<float> logits = resonance_test::normal_values(rng, T * s.E, 2.0);
  const rs::matrix_view<const float> l{logits.data(), T, s.E};
  if (s.mode == exchange_mode::padded) {
    const rs::router<rs::affinity::precomputed, rs::routing::token_choice, rs::capacity::factor> r{
        {}, {.top_k = s.k}, {.factor = 1.0, .pad_to_capacity = true}};
    return r.route(l);
  }
  const rs::router<rs::affinity::precomputed, rs::routing::token_choice, rs::capacity::dropless> r{
      {}, {.top_k = s.k}, {}};
  return r.route(l);
}

std::uint64_t mix(std::uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// DeepEP-style fill: the value encodes (source rank, token, column). fp32: exactly, as the integer
// (source * 4096 + token) * 64 + column. bfloat16: a hash of the three in the sign, the mantissa and
// 16 exponents (finite, moderate values), so a misplaced row or column differs in its bits.
template <class T>
T fill(int source, rs::index token, rs::index col) {
  if constexpr (std::is_same_v<T, float>) {
    return static_cast<float>((source * 4096 + token) * 64 + col);
  } else {
    const std::uint64_t h = mix((static_cast<std::uint64_t>(source) << 40) ^ (static_cast<std::uint64_t>(token) << 20) ^
                                static_cast<std::uint64_t>(col));
    return rs::bfloat16{static_cast<std::uint16_t>((h & 0x8000u) | ((120u + ((h >> 8) & 15u)) << 7) | (h & 0x7Fu))};
  }
}
template <class T>
std::vector<T> rows_of(int source, rs::index T_, rs::index d) {
  std::vector<T> x(usz(T_ * d));
  for (rs::index t = 0; t < T_; ++t)
    for (rs::index c = 0; c < d; ++c) x[usz(t * d + c)] = fill<T>(source, t, c);
  return x;
}

// Global expert e's output for one input row: a rowwise function of (e, row).
template <class T>
void expert(rs::id_type e, const T* in, T* out, rs::index d) {
  for (rs::index c = 0; c < d; ++c) {
    const float v = rs::detail::to_fp32(in[usz((c + e) % d)]);
    out[usz(c)] = rs::detail::from_fp32<T>(v * (1.0f + 0.125f * static_cast<float>(e)) +
                                           (0.25f * static_cast<float>(e) - 0.0625f * static_cast<float>(c)));
  }
}

// y of the same plan in one process: resonance::dispatch, the experts, resonance::combine.
template <class T>
std::vector<T> reference_y(const rs::routing_plan& plan, const std::vector<T>& x, rs::index d) {
  const rs::index S = plan.num_slots(), T_ = plan.num_tokens();
  std::vector<T> in(usz(S * d)), out(usz(S * d)), y(usz(T_ * d));
  rs::dispatch(rs::backend::serial{}, plan, rs::matrix_view<const T>{x.data(), T_, d},
               rs::matrix_view<T>{in.data(), S, d});
  const auto eoff = plan.expert_offsets();
  for (rs::index e = 0; e < plan.num_experts(); ++e)
    for (rs::id_type s = eoff[usz(e)]; s < eoff[usz(e + 1)]; ++s)
      expert<T>(static_cast<rs::id_type>(e), in.data() + usz(s * d), out.data() + usz(s * d), d);
  rs::combine(rs::backend::serial{}, plan, rs::matrix_view<const T>{out.data(), S, d},
              rs::matrix_view<T>{y.data(), T_, d});
  return y;
}

template <class T>
struct run_result {
  dist::dispatched<T> d;
  std::vector<T> y;
};

// Dispatch, the experts on this rank's expert-major rows, combine.
template <class T>
run_result<T> run(dist::mpi_exchange& ex, const rs::routing_plan& plan, const dist::expert_placement& placement,
                  const std::vector<T>& x, rs::index d, exchange_mode mode, exchange_topology topology) {
  const rs::index T_ = plan.num_tokens();
  run_result<T> r;
  r.d = ex.dispatch(plan, placement, rs::matrix_view<const T>{x.data(), T_, d}, mode, topology);
  const rs::matrix_view<const T> in = std::as_const(r.d).expert_in();
  std::vector<T> out(usz(in.rows * d));
  const auto eo = r.d.expert_offsets();
  const auto le = r.d.local_experts();
  for (std::size_t j = 0; j < le.size(); ++j)
    for (rs::id_type i = eo[j]; i < eo[j + 1]; ++i) expert<T>(le[j], in.row(i), out.data() + usz(i * d), d);
  r.y.resize(usz(T_ * d));
  ex.combine(r.d, rs::matrix_view<const T>{out.data(), in.rows, d}, rs::matrix_view<T>{r.y.data(), T_, d});
  return r;
}

template <class T>
bool bytes_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

std::uint64_t fnv(const void* p, std::size_t n) {
  std::uint64_t h = 14695981039346656037ull;
  for (std::size_t i = 0; i < n; ++i) h = (h ^ static_cast<const unsigned char*>(p)[i]) * 1099511628211ull;
  return h;
}

bool same_receive_plan(const dist::receive_plan& a, const dist::receive_plan& b) {
  return a.mode == b.mode && a.num_ranks == b.num_ranks && a.rank == b.rank && a.capacity == b.capacity &&
         a.local_experts == b.local_experts && a.row_offsets == b.row_offsets && a.return_offsets == b.return_offsets &&
         a.expert_offsets == b.expert_offsets && a.slot_row == b.slot_row && a.slot_source == b.slot_source &&
         a.slot_token == b.slot_token && a.slot_weight == b.slot_weight && a.return_slot == b.return_slot;
}

// What rank `me` must hold, expert-major, from the peers' plans: per slot (source, token, weight).
struct slot_ref {
  int source = 0;
  rs::id_type token = -1;
  float weight = 0.0f;
};
std::vector<slot_ref> expected_slots(const std::vector<rs::routing_plan>& peers, const dist::expert_placement& p,
                                     int me, exchange_mode mode, std::vector<rs::id_type>& expert_offsets) {
  std::vector<slot_ref> out;
  expert_offsets.assign(1, 0);
  for (std::size_t e = 0; e < p.rank_of_expert.size(); ++e) {
    if (p.rank_of_expert[e] != me) continue;
    for (std::size_t s = 0; s < peers.size(); ++s) {
      const rs::routing_plan& plan = peers[s];
      if (mode == exchange_mode::padded) {
        const auto eoff = plan.expert_offsets();
        for (rs::id_type slot = eoff[e]; slot < eoff[e + 1]; ++slot)
          out.push_back({static_cast<int>(s), plan.slot_token()[usz(slot)], plan.slot_weight()[usz(slot)]});
      } else {
        const auto toff = plan.token_offsets();
        for (rs::index t = 0; t < plan.num_tokens(); ++t)
          for (rs::id_type i = toff[usz(t)]; i < toff[usz(t + 1)]; ++i)
            if (plan.token_expert()[usz(i)] == static_cast<rs::id_type>(e))
              out.push_back({static_cast<int>(s), static_cast<rs::id_type>(t), plan.token_weight()[usz(i)]});
      }
    }
    expert_offsets.push_back(static_cast<rs::id_type>(out.size()));
  }
  return out;
}

// Received rows and order against the peers' plans; returns the number of mismatches (0 = pass).
template <class T>
int check_received(const dist::dispatched<T>& d, const std::vector<rs::routing_plan>& peers,
                   const dist::expert_placement& p, int me, exchange_mode mode, rs::index cols) {
  std::vector<rs::id_type> eoff;
  const std::vector<slot_ref> want = expected_slots(peers, p, me, mode, eoff);
  const dist::receive_plan& rp = d.receive();
  if (static_cast<rs::index>(want.size()) != rp.num_slots() || rp.expert_offsets != eoff) return 1000000;
  int bad = 0;
  const rs::matrix_view<const T> in = d.expert_in();
  for (std::size_t i = 0; i < want.size(); ++i) {
    const slot_ref& w = want[i];
    bad += rp.slot_source[i] != w.source;
    if (mode == exchange_mode::dropless) bad += rp.slot_token[i] != w.token || rp.slot_weight[i] != w.weight;
    for (rs::index c = 0; c < cols; ++c) {
      const T expect = w.token >= 0 ? fill<T>(w.source, w.token, c) : T{};
      bad += std::memcmp(&in(static_cast<rs::index>(i), c), &expect, sizeof(T)) != 0;
    }
  }
  return bad;
}

// This rank's rows and assignments to each rank, counted from its plan by brute force.
std::vector<int> counts_to(const rs::routing_plan& plan, const dist::expert_placement& p, exchange_mode mode) {
  const auto R = usz(p.num_ranks);
  std::vector<int> c(2 * R, 0);
  if (mode == exchange_mode::padded) {
    for (rs::id_type r : p.rank_of_expert) {
      c[2 * usz(r)] += static_cast<int>(plan.capacity());
      c[2 * usz(r) + 1] += static_cast<int>(plan.capacity());
    }
    return c;
  }
  const auto toff = plan.token_offsets();
  for (rs::index t = 0; t < plan.num_tokens(); ++t) {
    std::vector<bool> seen(R, false);
    for (rs::id_type i = toff[usz(t)]; i < toff[usz(t + 1)]; ++i) {
      const auto r = usz(p.rank_of_expert[usz(plan.token_expert()[usz(i)])]);
      ++c[2 * r + 1];
      if (!seen[r]) {
        seen[r] = true;
        ++c[2 * r];
      }
    }
  }
  return c;
}

// The count matrix: what each source sent this rank (receive plan) against every rank's own counts,
// all-gathered; and what this rank sent (exchange plan) against its own. Returns mismatches.
int check_count_matrix(const dist::receive_plan& rp, const dist::exchange_plan& xp, const rs::routing_plan& plan,
                       const dist::expert_placement& p, int me, exchange_mode mode) {
  const std::vector<int> mine = counts_to(plan, p, mode);
  const auto R = usz(p.num_ranks);
  std::vector<int> all(2 * R * R);
  MPI_Allgather(mine.data(), static_cast<int>(2 * R), MPI_INT, all.data(), static_cast<int>(2 * R), MPI_INT,
                MPI_COMM_WORLD);
  int bad = 0;
  const auto m = usz(me);
  for (std::size_t s = 0; s < R; ++s) {
    bad += rp.row_offsets[s + 1] - rp.row_offsets[s] != all[s * 2 * R + 2 * m];
    bad += rp.return_offsets[s + 1] - rp.return_offsets[s] != all[s * 2 * R + 2 * m + 1];
    bad += xp.row_offsets[s + 1] - xp.row_offsets[s] != mine[2 * s];
    bad += xp.return_offsets[s + 1] - xp.return_offsets[s] != mine[2 * s + 1];
  }
  return bad;
}

std::vector<rs::index> ranks_per_node_options(rs::index R) {
  std::vector<rs::index> out;
  for (rs::index P : {1, 2, 4})
    if (R % P == 0) out.push_back(P);
  return out;
}

// A per-assignment or per-slot value for return_rows / send_rows: the bits of a hash of (salt, a, b,
// c, column), finite (sign, mantissa and 16 exponents), so that a row moved to the wrong assignment
// or slot, or a column to the wrong place, differs in its bits. Zero never comes out of it.
template <class U>
U tag(std::uint64_t salt, rs::index a, rs::index b, rs::index c, rs::index col) {
  std::uint64_t h = mix(salt);
  for (rs::index v : {a, b, c, col}) h = mix(h ^ static_cast<std::uint64_t>(v));
  if constexpr (std::is_same_v<U, float>) {
    return std::bit_cast<float>(static_cast<std::uint32_t>((h & 0x807FFFFFu) | ((120u + ((h >> 40) & 15u)) << 23)));
  } else if constexpr (std::is_same_v<U, double>) {
    return std::bit_cast<double>((h & 0x800FFFFFFFFFFFFFull) | ((1020ull + ((h >> 20) & 15u)) << 52));
  } else {
    return rs::bfloat16{static_cast<std::uint16_t>((h & 0x8000u) | ((120u + ((h >> 8) & 15u)) << 7) | (h & 0x7Fu))};
  }
}
// return_rows carries f(global expert, source rank, token) from each slot; send_rows g(source rank,
// token, expert) from each assignment.
template <class U>
U f_slot(rs::index expert, rs::index source, rs::index token, rs::index col) {
  return tag<U>(1, expert, source, token, col);
}
template <class U>
U g_assignment(rs::index source, rs::index token, rs::index expert, rs::index col) {
  return tag<U>(2, source, token, expert, col);
}
template <class U>
bool same_value(const U& a, const U& b) {
  return std::memcmp(&a, &b, sizeof(U)) == 0;
}

// return_rows and send_rows of width w on a dispatch of this rank's plan, against the slots the peers'
// plans say this rank holds (expected_slots) and this rank's own plan: returns mismatches (0 = pass).
template <class U, class T>
int check_row_moves(dist::mpi_exchange& ex, const dist::dispatched<T>& d, const rs::routing_plan& plan,
                    const std::vector<rs::routing_plan>& peers, const dist::expert_placement& p, int me,
                    exchange_mode mode, rs::index w) {
  std::vector<rs::id_type> eoff;
  const std::vector<slot_ref> want = expected_slots(peers, p, me, mode, eoff);
  const rs::index S = d.expert_in().rows, A = plan.num_assignments();
  if (static_cast<rs::index>(want.size()) != S) return 1000000;
  std::vector<rs::id_type> slot_expert(want.size());  // the global expert of each slot, from the placement
  {
    std::size_t j = 0;
    for (std::size_t e = 0; e < p.rank_of_expert.size(); ++e)
      if (p.rank_of_expert[e] == me) {
        for (rs::id_type q = eoff[j]; q < eoff[j + 1]; ++q) slot_expert[usz(q)] = static_cast<rs::id_type>(e);
        ++j;
      }
  }
  const auto toff = plan.token_offsets();
  const auto tex = plan.token_expert();
  std::vector<rs::index> token_of(usz(A));
  for (rs::index t = 0; t < plan.num_tokens(); ++t)
    for (rs::id_type i = toff[usz(t)]; i < toff[usz(t + 1)]; ++i) token_of[usz(i)] = t;
  int bad = 0;

  // return_rows: slot q holds f(its expert, its source, its token); assignment i must get exactly that.
  std::vector<U> per_slot(usz(S * w)), per_assignment(usz(A * w));
  for (std::size_t q = 0; q < want.size(); ++q)
    for (rs::index c = 0; c < w; ++c)
      per_slot[q * usz(w) + usz(c)] = f_slot<U>(slot_expert[q], want[q].source, want[q].token, c);
  ex.return_rows(d, rs::matrix_view<const U>{per_slot.data(), S, w}, rs::matrix_view<U>{per_assignment.data(), A, w});
  for (rs::index i = 0; i < A; ++i)
    for (rs::index c = 0; c < w; ++c)
      bad += !same_value(per_assignment[usz(i * w + c)], f_slot<U>(tex[usz(i)], me, token_of[usz(i)], c));

  // send_rows: assignment i holds g(me, its token, its expert); slot q must get g of its own (source,
  // token, expert), padding slots zero.
  for (rs::index i = 0; i < A; ++i)
    for (rs::index c = 0; c < w; ++c)
      per_assignment[usz(i * w + c)] = g_assignment<U>(me, token_of[usz(i)], tex[usz(i)], c);
  std::fill(per_slot.begin(), per_slot.end(), tag<U>(3, 0, 0, 0, 0));  // stale values must not survive
  ex.send_rows(d, rs::matrix_view<const U>{per_assignment.data(), A, w}, rs::matrix_view<U>{per_slot.data(), S, w});
  for (std::size_t q = 0; q < want.size(); ++q)
    for (rs::index c = 0; c < w; ++c) {
      const U expect = want[q].token >= 0 ? g_assignment<U>(want[q].source, want[q].token, slot_expert[q], c) : U{};
      bad += !same_value(per_slot[q * usz(w) + usz(c)], expect);
    }
  return bad;
}

}  // namespace

TEST_SUITE("mpi") {
  TEST_CASE_TEMPLATE("dispatch and combine: y is resonance::combine's bit for bit, rows and counts are the sources'", T,
                     float, rs::bfloat16) {
    const int R = world_size(), me = world_rank();
    CAPTURE(me);
    dist::mpi_exchange ex(MPI_COMM_WORLD);
    std::uint64_t seed = 10;
    for (const auto& [E, k, d] : {std::tuple<rs::index, rs::index, rs::index>{16, 2, 24}, {12, 3, 20}})
      for (bool round_robin : {false, true})
        for (exchange_mode mode : {exchange_mode::dropless, exchange_mode::padded})
          for (rs::index P : ranks_per_node_options(R)) {
            const setting s{E, k, round_robin, P, mode, d, ++seed};
            INFO(s.name());
            const dist::expert_placement placement = placement_of(s, R);
            const rs::index T_ = tokens_of(s, me);
            const rs::routing_plan plan = route_rank(s, me, T_);
            const std::vector<T> x = rows_of<T>(me, T_, d);
            const std::vector<T> y_ref = reference_y(plan, x, d);
            std::vector<rs::routing_plan> peers;
            for (int r = 0; r < R; ++r) peers.push_back(route_rank(s, r, tokens_of(s, r)));

            const run_result<T> flat = run(ex, plan, placement, x, d, mode, exchange_topology::flat);
            const run_result<T> two = run(ex, plan, placement, x, d, mode, exchange_topology::two_level);
            CHECK(bytes_equal(flat.y, y_ref));
            CHECK(bytes_equal(two.y, y_ref));
            CHECK(check_received(flat.d, peers, placement, me, mode, d) == 0);
            CHECK(check_count_matrix(flat.d.receive(), flat.d.send(), plan, placement, me, mode) == 0);
            // Two-level: the flat receive side exactly (plan and expert-major rows).
            CHECK(same_receive_plan(two.d.receive(), flat.d.receive()));
            CHECK(check_received(two.d, peers, placement, me, mode, d) == 0);
            CHECK(two.d.topology() == exchange_topology::two_level);
            const auto a = flat.d.expert_in(), b = two.d.expert_in();
            CHECK(a.rows == b.rows);
            CHECK((a.rows == 0 || std::memcmp(a.data, b.data, usz(a.rows * d) * sizeof(T)) == 0));
          }
  }

  TEST_CASE_TEMPLATE("return_rows and send_rows: each kept assignment's row to and from exactly its slot, un-summed", U,
                     float, rs::bfloat16, double) {
    const int R = world_size(), me = world_rank();
    CAPTURE(me);
    dist::mpi_exchange ex(MPI_COMM_WORLD);
    // The rows moved are independent of the rows dispatched: dispatch the other type.
    using X = std::conditional_t<std::is_same_v<U, rs::bfloat16>, float, rs::bfloat16>;
    std::uint64_t seed = 40;
    for (const auto& [E, k] : {std::pair<rs::index, rs::index>{16, 2}, {12, 3}})
      for (bool round_robin : {false, true})
        for (exchange_mode mode : {exchange_mode::dropless, exchange_mode::padded})
          for (rs::index P : ranks_per_node_options(R)) {
            const setting s{E, k, round_robin, P, mode, 8, ++seed};
            INFO(s.name());
            const dist::expert_placement placement = placement_of(s, R);
            const rs::index T_ = tokens_of(s, me);
            const rs::routing_plan plan = route_rank(s, me, T_);
            const std::vector<X> x = rows_of<X>(me, T_, s.d);
            std::vector<rs::routing_plan> peers;
            for (int r = 0; r < R; ++r) peers.push_back(route_rank(s, r, tokens_of(s, r)));
            for (exchange_topology topology : {exchange_topology::flat, exchange_topology::two_level}) {
              CAPTURE(static_cast<int>(topology));
              const dist::dispatched<X> d =
                  ex.dispatch(plan, placement, rs::matrix_view<const X>{x.data(), T_, s.d}, mode, topology);
              for (rs::index w : {1, 20}) {
                CAPTURE(w);
                CHECK(check_row_moves<U>(ex, d, plan, peers, placement, me, mode, w) == 0);
              }
            }
          }
  }

  TEST_CASE("return_rows of the expert outputs hands each source exactly the rows resonance::combine sums") {
    // combine is return_rows plus the source's weighted sum: with width d and the expert outputs,
    // return_rows hands the source exactly the rows resonance::combine sums (the one-process slots).
    const int R = world_size(), me = world_rank();
    CAPTURE(me);
    dist::mpi_exchange ex(MPI_COMM_WORLD);
    for (exchange_mode mode : {exchange_mode::dropless, exchange_mode::padded})
      for (exchange_topology topology : {exchange_topology::flat, exchange_topology::two_level}) {
        const setting s{16, 2, true, R % 2 == 0 ? 2 : 1, mode, 12, 61};
        const dist::expert_placement placement = placement_of(s, R);
        const rs::routing_plan plan = route_rank(s, me, tokens_of(s, me));
        const rs::index T_ = plan.num_tokens(), d = s.d, S1 = plan.num_slots();
        const std::vector<float> x = rows_of<float>(me, T_, d);
        const run_result<float> r = run(ex, plan, placement, x, d, mode, topology);
        CHECK(bytes_equal(r.y, reference_y(plan, x, d)));
        // The expert outputs again, on this rank's slots, and returned un-summed.
        const auto in = r.d.expert_in();
        std::vector<float> out(usz(in.rows * d)), back(usz(plan.num_assignments() * d));
        const auto eo = r.d.expert_offsets();
        const auto le = r.d.local_experts();
        for (std::size_t j = 0; j < le.size(); ++j)
          for (rs::id_type i = eo[j]; i < eo[j + 1]; ++i) expert<float>(le[j], in.row(i), out.data() + usz(i * d), d);
        ex.return_rows(r.d, rs::matrix_view<const float>{out.data(), in.rows, d},
                       rs::matrix_view<float>{back.data(), plan.num_assignments(), d});
        // One process: slot token_slot[i] of the plan's own dispatch, through the same expert.
        std::vector<float> one(usz(S1 * d)), one_out(usz(S1 * d));
        rs::dispatch(rs::backend::serial{}, plan, rs::matrix_view<const float>{x.data(), T_, d},
                     rs::matrix_view<float>{one.data(), S1, d});
        int bad = 0;
        for (rs::index i = 0; i < plan.num_assignments(); ++i) {
          const rs::id_type slot = plan.token_slot()[usz(i)];
          expert<float>(plan.token_expert()[usz(i)], one.data() + usz(slot * d), one_out.data() + usz(slot * d), d);
          bad += std::memcmp(back.data() + usz(i * d), one_out.data() + usz(slot * d), usz(d) * sizeof(float)) != 0;
        }
        CHECK(bad == 0);
      }
  }

  TEST_CASE("a rank with no tokens, and experts nobody routes to") {
    const int R = world_size(), me = world_rank();
    CAPTURE(me);
    dist::mpi_exchange ex(MPI_COMM_WORLD, {.topology = exchange_topology::two_level});
    const setting s{16, 2, false, R % 2 == 0 ? 2 : 1, exchange_mode::dropless, 16, 99};
    const dist::expert_placement placement = placement_of(s, R);
    const rs::index T_ = me == R - 1 ? 0 : 5;  // the last rank sends nothing; few tokens leave experts idle
    const rs::routing_plan plan = route_rank(s, me, T_);
    const std::vector<float> x = rows_of<float>(me, T_, s.d);
    const run_result<float> two = run(ex, plan, placement, x, s.d, s.mode, exchange_topology::two_level);
    const run_result<float> flat = run(ex, plan, placement, x, s.d, s.mode, exchange_topology::flat);
    CHECK(bytes_equal(two.y, reference_y(plan, x, s.d)));
    CHECK(bytes_equal(flat.y, two.y));
    CHECK(same_receive_plan(two.d.receive(), flat.d.receive()));
    std::vector<rs::routing_plan> peers;
    for (int r = 0; r < R; ++r) peers.push_back(route_rank(s, r, r == R - 1 ? 0 : 5));
    for (rs::index w : {1, 3}) {
      CHECK(check_row_moves<float>(ex, two.d, plan, peers, placement, me, s.mode, w) == 0);
      CHECK(check_row_moves<rs::bfloat16>(ex, flat.d, plan, peers, placement, me, s.mode, w) == 0);
    }
  }

  TEST_CASE("20 reruns of dispatch and combine give identical bytes") {
    const int R = world_size(), me = world_rank();
    CAPTURE(me);
    dist::mpi_exchange ex(MPI_COMM_WORLD);
    for (exchange_mode mode : {exchange_mode::dropless, exchange_mode::padded}) {
      const setting s{12, 3, true, R % 2 == 0 ? 2 : 1, mode, 40, 7};
      const dist::expert_placement placement = placement_of(s, R);
      const rs::routing_plan plan = route_rank(s, me, tokens_of(s, me));
      const std::vector<rs::bfloat16> x = rows_of<rs::bfloat16>(me, plan.num_tokens(), s.d);
      std::uint64_t first = 0;
      int differing = 0;
      for (int rep = 0; rep < 20; ++rep) {
        const exchange_topology topology = rep % 2 == 0 ? exchange_topology::flat : exchange_topology::two_level;
        const run_result<rs::bfloat16> r = run(ex, plan, placement, x, s.d, mode, topology);
        const auto in = r.d.expert_in();
        const std::uint64_t h = fnv(r.y.data(), r.y.size() * sizeof(rs::bfloat16)) ^
                                (fnv(in.data, usz(in.rows * in.cols) * sizeof(rs::bfloat16)) * 31);
        if (rep == 0) first = h;
        differing += h != first;
      }
      CHECK(differing == 0);
    }
  }

  TEST_CASE("local precondition failures throw on every rank, and the exchange stays usable") {
    const int R = world_size(), me = world_rank();
    CAPTURE(me);
    dist::mpi_exchange ex(MPI_COMM_WORLD);
    const setting s{16, 2, false, 1, exchange_mode::dropless, 8, 3};
    const dist::expert_placement placement = placement_of(s, R);
    const rs::routing_plan plan = route_rank(s, me, tokens_of(s, me));
    const rs::index T_ = plan.num_tokens(), d = s.d;
    const std::vector<float> x = rows_of<float>(me, T_, d);
    const std::vector<float> y_ref = reference_y(plan, x, d);
    const auto healthy = [&] {
      for (exchange_topology topology : {exchange_topology::flat, exchange_topology::two_level})
        CHECK(bytes_equal(run(ex, plan, placement, x, d, s.mode, topology).y, y_ref));
    };

    SUBCASE("x with the wrong number of rows on rank 0") {
      const std::string m = error_of([&] {
        (void)ex.dispatch(plan, placement, rs::matrix_view<const float>{x.data(), me == 0 ? T_ - 1 : T_, d});
      });
      CHECK(contains(m, me == 0 ? "x: expected " + std::to_string(T_) + " rows" : "rank 0 failed a precondition"));
      CHECK(contains(m, "every rank"));
    }
    SUBCASE("expert_out with the wrong number of rows on the last rank") {
      for (exchange_topology topology : {exchange_topology::flat, exchange_topology::two_level}) {
        dist::dispatched<float> h =
            ex.dispatch(plan, placement, rs::matrix_view<const float>{x.data(), T_, d}, s.mode, topology);
        std::vector<float> out(usz((h.expert_in().rows + 1) * d)), y(usz(T_ * d));
        const rs::index rows = me == R - 1 ? h.expert_in().rows + 1 : h.expert_in().rows;
        const std::string m = error_of([&] {
          ex.combine(h, rs::matrix_view<const float>{out.data(), rows, d}, rs::matrix_view<float>{y.data(), T_, d});
        });
        CHECK(contains(m, me == R - 1 ? "expert_out: expected" : "rank " + std::to_string(R - 1) + " failed"));
      }
    }
    SUBCASE("return_rows and send_rows with the wrong number of rows on one rank") {
      for (exchange_topology topology : {exchange_topology::flat, exchange_topology::two_level}) {
        const dist::dispatched<float> h =
            ex.dispatch(plan, placement, rs::matrix_view<const float>{x.data(), T_, d}, s.mode, topology);
        const rs::index S = h.expert_in().rows, A = plan.num_assignments();
        std::vector<float> slots(usz((S + 1) * 2)), assignments(usz((A + 1) * 2));
        const std::string m1 = error_of([&] {
          ex.return_rows(h, rs::matrix_view<const float>{slots.data(), me == R - 1 ? S + 1 : S, 2},
                         rs::matrix_view<float>{assignments.data(), A, 2});
        });
        CHECK(contains(m1, me == R - 1 ? "per_slot: expected " + std::to_string(S) + " rows"
                                       : "rank " + std::to_string(R - 1) + " failed a precondition"));
        CHECK(contains(m1, "mpi_exchange::return_rows"));
        CHECK(contains(m1, "every rank"));
        const std::string m2 = error_of([&] {
          ex.send_rows(h, rs::matrix_view<const float>{assignments.data(), me == 0 ? A + 1 : A, 2},
                       rs::matrix_view<float>{slots.data(), S, 2});
        });
        CHECK(contains(
            m2, me == 0 ? "per_assignment: expected " + std::to_string(A) + " rows" : "rank 0 failed a precondition"));
        CHECK(contains(m2, "mpi_exchange::send_rows"));
        // The output of another width than the input, on rank 0.
        const std::string m3 = error_of([&] {
          ex.return_rows(h, rs::matrix_view<const float>{slots.data(), S, 2},
                         rs::matrix_view<float>{assignments.data(), A, me == 0 ? 1 : 2});
        });
        CHECK(contains(m3, me == 0 ? "per_assignment: expected shape " + std::to_string(A) + "x2"
                                   : "rank 0 failed a precondition"));
        // No columns.
        const std::string m4 = error_of([&] {
          ex.send_rows(h, rs::matrix_view<const float>{assignments.data(), A, 0},
                       rs::matrix_view<float>{slots.data(), S, 0});
        });
        CHECK(contains(m4, "per_assignment: expected between 1 and INT_MAX columns"));
      }
    }
    SUBCASE("return_rows and send_rows with a result that no dispatch of this exchange made") {
      const dist::dispatched<float> none;
      std::vector<float> a(usz(plan.num_assignments()));
      const std::string m1 = error_of([&] {
        ex.return_rows(none, rs::matrix_view<const float>{nullptr, 0, 1},
                       rs::matrix_view<float>{a.data(), plan.num_assignments(), 1});
      });
      const std::string m2 = error_of([&] {
        ex.send_rows(none, rs::matrix_view<const float>{a.data(), plan.num_assignments(), 1},
                     rs::matrix_view<float>{nullptr, 0, 1});
      });
      CHECK(contains(m1, "dispatched: expected the result of a dispatch on this mpi_exchange"));
      CHECK(contains(m2, "dispatched: expected the result of a dispatch on this mpi_exchange"));
    }
    SUBCASE("padded mode with a plan that is not padded") {
      const std::string m = error_of([&] {
        (void)ex.dispatch(plan, placement, rs::matrix_view<const float>{x.data(), T_, d}, exchange_mode::padded);
      });
      CHECK(contains(m, "pad_to_capacity"));
    }
    SUBCASE("a placement for another number of ranks") {
      dist::expert_placement wrong{R + 1, 1, std::vector<rs::id_type>(16)};
      for (std::size_t e = 0; e < 16; ++e) wrong.rank_of_expert[e] = static_cast<rs::id_type>(e % usz(R + 1));
      const std::string m = error_of([&] {
        (void)ex.dispatch(plan, wrong, rs::matrix_view<const float>{x.data(), T_, d});
      });
      CHECK(contains(m, "placement.num_ranks: expected the communicator size (" + std::to_string(R) + ")"));
    }
    SUBCASE("combine with a result that no dispatch of this exchange made") {
      dist::dispatched<float> none;
      std::vector<float> y(usz(T_ * d));
      const std::string m = error_of([&] {
        ex.combine(none, rs::matrix_view<const float>{nullptr, 0, d}, rs::matrix_view<float>{y.data(), T_, d});
      });
      CHECK(contains(m, "dispatched: expected the result of a dispatch on this mpi_exchange"));
    }
    SUBCASE("a moved-from exchange") {
      dist::mpi_exchange other = std::move(ex);
      CHECK(ex.comm() == MPI_COMM_NULL);
      const std::string m = error_of([&] {
        (void)ex.dispatch(plan, placement, rs::matrix_view<const float>{x.data(), T_, d});
      });
      CHECK(contains(m, "moved from"));
      ex = std::move(other);  // move assignment back
      CHECK(ex.comm() != MPI_COMM_NULL);
    }
    healthy();
  }

  TEST_CASE("MPI count overflow is found before MPI is called") {
    SUBCASE("the checker on counts") {
      const std::int64_t big = INT_MAX;
      CHECK(dist::mpi_count_overflow(std::vector<std::int64_t>{big}, "rows sent to").empty());
      CHECK(dist::mpi_count_overflow(std::vector<std::int64_t>{big - 1, 1, 0}, "rows sent to").empty());
      CHECK(dist::mpi_count_overflow(std::vector<std::int64_t>{}, "rows sent to").empty());
      const std::string one = dist::mpi_count_overflow(std::vector<std::int64_t>{0, big + 1}, "rows sent to");
      CHECK(contains(one, "rows sent to rank 1: 2147483648, more than an MPI count may be (2147483647"));
      const std::string total = dist::mpi_count_overflow(std::vector<std::int64_t>{big, 1}, "rows received from");
      CHECK(contains(total, "rows received from ranks 0..1: 2147483648 in all"));
      const std::string negative = dist::mpi_count_overflow(std::vector<std::int64_t>{3, -1}, "rows sent to", "node");
      CHECK(contains(negative, "rows sent to node 1: a negative count (-1)"));
      CHECK(dist::mpi_count_overflow(std::vector<std::int64_t>{5, 5}, "x", "rank", 10).empty());
      CHECK(contains(dist::mpi_count_overflow(std::vector<std::int64_t>{5, 6}, "x", "rank", 10), "11 in all"));
    }
    SUBCASE("an exchange whose counts exceed the limit throws on every rank; one within it moves the same bytes") {
      const int R = world_size(), me = world_rank();
      CAPTURE(me);
      for (exchange_mode mode : {exchange_mode::dropless, exchange_mode::padded}) {
        const setting s{16, 2, false, R % 2 == 0 ? 2 : 1, mode, 8, 5};
        const dist::expert_placement placement = placement_of(s, R);
        const rs::routing_plan plan = route_rank(s, me, tokens_of(s, me));
        const std::vector<float> x = rows_of<float>(me, plan.num_tokens(), s.d);
        for (exchange_topology topology : {exchange_topology::flat, exchange_topology::two_level}) {
          dist::mpi_exchange tiny(MPI_COMM_WORLD, {.topology = topology, .count_limit = 1});
          const std::string m = error_of([&] { (void)run(tiny, plan, placement, x, s.d, mode, topology); });
          CHECK((contains(m, "more than an MPI") || contains(m, "failed (its error names the cause)")));
          CHECK(contains(m, "every rank"));
          // A limit under the bound (so every stage is checked exactly) but over every real count.
          if (R >= 2) {
            std::int64_t most = std::max<std::int64_t>(plan.num_assignments(), 1);
            if (mode == exchange_mode::padded) most = plan.num_slots();
            MPI_Allreduce(MPI_IN_PLACE, &most, 1, MPI_INT64_T, MPI_MAX, MPI_COMM_WORLD);
            dist::mpi_exchange exact(MPI_COMM_WORLD, {.topology = topology, .count_limit = R * most - 1});
            dist::mpi_exchange plain(MPI_COMM_WORLD, {.topology = topology});
            CHECK(bytes_equal(run(exact, plan, placement, x, s.d, mode, topology).y,
                              run(plain, plan, placement, x, s.d, mode, topology).y));
          }
        }
      }
    }
  }

  TEST_CASE("an exchange over a sub-communicator") {
    const int me = world_rank();
    CAPTURE(me);
    MPI_Comm half = MPI_COMM_NULL;
    MPI_Comm_split(MPI_COMM_WORLD, me % 2, me, &half);
    {
      dist::mpi_exchange ex(half, {.topology = exchange_topology::two_level});
      const rs::index R = ex.size();
      const setting s{12, 2, true, 1, exchange_mode::dropless, 16, 21};
      const dist::expert_placement placement = placement_of(s, R);
      const rs::routing_plan plan = route_rank(s, me, tokens_of(s, me));
      const std::vector<float> x = rows_of<float>(me, plan.num_tokens(), s.d);
      CHECK(bytes_equal(run(ex, plan, placement, x, s.d, s.mode, exchange_topology::two_level).y,
                        reference_y(plan, x, s.d)));
    }
    MPI_Comm_free(&half);
  }
}

TEST_SUITE("mismatch") {
  TEST_CASE("a configuration that differs on one rank throws on every rank, naming what differs") {
    const int R = world_size(), me = world_rank();
    CAPTURE(me);
    if (R < 2) {
      MESSAGE("one rank: nothing can differ");
      return;
    }
    dist::mpi_exchange ex(MPI_COMM_WORLD);
    const bool odd_one = me == 1;
    setting s{16, 2, false, 1, exchange_mode::dropless, 16, 31};
    exchange_topology topology = exchange_topology::flat;
    std::string field;
    SUBCASE("num_experts") {
      field = "num_experts";
      if (odd_one) s.E = 12;
    }
    SUBCASE("placement") {
      field = "placement";
      if (odd_one) s.round_robin = true;
    }
    SUBCASE("ranks_per_node") {
      field = "placement";
      if (odd_one) s.ranks_per_node = 2;
    }
    SUBCASE("row width") {
      field = "row width d (x.cols)";
      if (odd_one) s.d = 8;
    }
    SUBCASE("topology") {
      field = "topology";
      if (odd_one) topology = exchange_topology::two_level;
    }
    SUBCASE("exchange mode") {
      field = "exchange mode";
      if (odd_one) s.mode = exchange_mode::padded;
    }
    SUBCASE("capacity in padded mode") {
      field = "capacity (padded mode)";
      s.mode = exchange_mode::padded;
    }
    CAPTURE(field);
    const dist::expert_placement placement = placement_of(s, R);
    // Padded, the odd rank routes more tokens: a larger capacity. (Its own placement is valid for it.)
    const rs::index T_ = s.mode == exchange_mode::padded && field == "capacity (padded mode)" && odd_one ? 96 : 48;
    const rs::routing_plan plan = route_rank(s, me, T_);
    const std::vector<float> x = rows_of<float>(me, T_, s.d);
    const std::string m = error_of([&] { (void)run(ex, plan, placement, x, s.d, s.mode, topology); });
    CHECK(contains(m, "configuration differs across ranks"));
    CHECK(contains(m, field + " (this rank: "));
    CHECK(contains(m, "no data was moved"));

    // The exchange is still usable by every rank.
    const setting ok{16, 2, false, 1, exchange_mode::dropless, 16, 32};
    const rs::routing_plan p2 = route_rank(ok, me, 20);
    const std::vector<float> x2 = rows_of<float>(me, 20, ok.d);
    CHECK(bytes_equal(run(ex, p2, placement_of(ok, R), x2, ok.d, ok.mode, exchange_topology::two_level).y,
                      reference_y(p2, x2, ok.d)));
  }

  TEST_CASE("combine with a width that differs on one rank throws on every rank") {
    const int R = world_size(), me = world_rank();
    CAPTURE(me);
    if (R < 2) {
      MESSAGE("one rank: nothing can differ");
      return;
    }
    dist::mpi_exchange ex(MPI_COMM_WORLD);
    const setting s{16, 2, false, 1, exchange_mode::dropless, 16, 33};
    const rs::routing_plan plan = route_rank(s, me, 30);
    const std::vector<float> x = rows_of<float>(me, 30, s.d);
    dist::dispatched<float> h = ex.dispatch(plan, placement_of(s, R), rs::matrix_view<const float>{x.data(), 30, s.d});
    const rs::index w = me == 1 ? 8 : 16;
    std::vector<float> out(usz(h.expert_in().rows * w)), y(usz(30 * w));
    const std::string m = error_of([&] {
      ex.combine(h, rs::matrix_view<const float>{out.data(), h.expert_in().rows, w},
                 rs::matrix_view<float>{y.data(), 30, w});
    });
    CHECK(contains(m, "configuration differs across ranks: expert_out width (this rank: " + std::to_string(w)));
  }

  TEST_CASE(
      "return_rows and send_rows with a width, a row type or a call that differs on one rank throw on every "
      "rank") {
    const int R = world_size(), me = world_rank();
    CAPTURE(me);
    if (R < 2) {
      MESSAGE("one rank: nothing can differ");
      return;
    }
    dist::mpi_exchange ex(MPI_COMM_WORLD);
    const setting s{16, 2, false, R % 2 == 0 ? 2 : 1, exchange_mode::dropless, 16, 35};
    const dist::expert_placement placement = placement_of(s, R);
    const rs::routing_plan plan = route_rank(s, me, 30);
    const std::vector<float> x = rows_of<float>(me, 30, s.d);
    std::vector<rs::routing_plan> peers;
    for (int r = 0; r < R; ++r) peers.push_back(route_rank(s, r, 30));
    const bool odd_one = me == 1;
    for (exchange_topology topology : {exchange_topology::flat, exchange_topology::two_level}) {
      const dist::dispatched<float> h =
          ex.dispatch(plan, placement, rs::matrix_view<const float>{x.data(), 30, s.d}, s.mode, topology);
      const rs::index S = h.expert_in().rows, A = plan.num_assignments();
      const rs::index w = odd_one ? 1 : 20;
      std::vector<float> slots(usz(S * 20)), assignments(usz(A * 20)), y(usz(30 * 20));
      std::vector<rs::bfloat16> slots16(usz(S * 20)), assignments16(usz(A * 20));
      const std::string m1 = error_of([&] {
        ex.return_rows(h, rs::matrix_view<const float>{slots.data(), S, w},
                       rs::matrix_view<float>{assignments.data(), A, w});
      });
      CHECK(contains(m1, "configuration differs across ranks: per_slot width (this rank: " + std::to_string(w)));
      CHECK(contains(m1, "no data was moved"));
      const std::string m2 = error_of([&] {
        ex.send_rows(h, rs::matrix_view<const float>{assignments.data(), A, w},
                     rs::matrix_view<float>{slots.data(), S, w});
      });
      CHECK(contains(m2, "configuration differs across ranks: per_assignment width (this rank: " + std::to_string(w)));
      // bfloat16 rows on the odd rank, float elsewhere.
      const std::string m3 = error_of([&] {
        if (odd_one)
          ex.return_rows(h, rs::matrix_view<const rs::bfloat16>{slots16.data(), S, 4},
                         rs::matrix_view<rs::bfloat16>{assignments16.data(), A, 4});
        else
          ex.return_rows(h, rs::matrix_view<const float>{slots.data(), S, 4},
                         rs::matrix_view<float>{assignments.data(), A, 4});
      });
      CHECK(contains(m3, "configuration differs across ranks: row type (this rank: "));
      // combine on the odd rank, return_rows elsewhere (same width and type).
      const std::string m4 = error_of([&] {
        if (odd_one)
          ex.combine(h, rs::matrix_view<const float>{slots.data(), S, s.d}, rs::matrix_view<float>{y.data(), 30, s.d});
        else
          ex.return_rows(h, rs::matrix_view<const float>{slots.data(), S, s.d},
                         rs::matrix_view<float>{assignments.data(), A, s.d});
      });
      CHECK(contains(m4, "configuration differs across ranks: the call (this rank: mpi_exchange::"));
      // A dispatch on the odd rank against combine elsewhere: the settlements have one length, so
      // they meet in one MPI_Allreduce and every rank throws; the failed dispatch counts on no rank.
      const std::string m5 = error_of([&] {
        if (odd_one)
          (void)ex.dispatch(plan, placement, rs::matrix_view<const float>{x.data(), 30, s.d}, s.mode, topology);
        else
          ex.combine(h, rs::matrix_view<const float>{slots.data(), S, s.d}, rs::matrix_view<float>{y.data(), 30, s.d});
      });
      CHECK(contains(m5, "configuration differs across ranks: the call (this rank: mpi_exchange::"));
      // A later dispatch still agrees on its sequence number.
      const auto again =
          ex.dispatch(plan, placement, rs::matrix_view<const float>{x.data(), 30, s.d}, s.mode, topology);
      CHECK(again.expert_in().rows == h.expert_in().rows);
      // The exchange is still usable by every rank.
      CHECK(check_row_moves<float>(ex, h, plan, peers, placement, me, s.mode, 3) == 0);
    }
  }
}
