// dispatch / combine and the three plan exports against brute force. The reference reads a plan only
// through its expert-major slot arrays (expert_offsets, slot_token, slot_weight), never through the
// token-major CSR that combine and the exports walk, so both paths must agree for the test to pass.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/resonance.hpp>

#include "backends.hpp"
#include "error_of.hpp"
#include "random_inputs.hpp"

namespace {

namespace rs = resonance;
namespace rt = resonance::routing;
using resonance_test::usz;

// One routed batch with a description for failure messages.
struct routed {
  std::string name;
  rs::index top_k = 1;
  bool dropless = true;
  rs::routing_plan plan;
};

template <class Capacity>
routed route_random(std::mt19937_64& rng, rs::index T, rs::index E, rs::index k, const Capacity& cap,
                    std::string name) {
  const std::vector<float> logits = resonance_test::normal_values(rng, T * E, 2.0);
  const rs::router<rs::affinity::precomputed, rt::token_choice, Capacity> r{{}, {.top_k = k}, cap};
  routed out;
  out.name = name + " T=" + std::to_string(T) + " k=" + std::to_string(k);
  out.top_k = k;
  out.dropless = std::is_same_v<Capacity, rs::capacity::dropless>;
  out.plan = r.route(rs::matrix_view<const float>{logits.data(), T, E});
  return out;
}

// Token-choice plans over every capacity variant: drop policies, padding, alignment, dropless.
std::vector<routed> random_plans(rs::index E = 8) {
  std::mt19937_64 rng(2024);
  namespace cap = rs::capacity;
  std::vector<routed> plans;
  for (rs::index T : {1, 37, 150}) {
    for (rs::index k : {1, 2, 4}) {
      plans.push_back(route_random(rng, T, E, k, cap::dropless{}, "dropless"));
      plans.push_back(route_random(rng, T, E, k, cap::dropless{.align = 4}, "dropless align 4"));
      plans.push_back(route_random(rng, T, E, k, cap::factor{.factor = 1.0}, "factor 1 score"));
      plans.push_back(route_random(
          rng, T, E, k, cap::factor{.factor = 0.5, .drop = rs::drop_policy::position, .pad_to_capacity = true},
          "factor 0.5 position pad"));
      plans.push_back(route_random(rng, T, E, k,
                                   cap::factor{.factor = 0.75, .drop = rs::drop_policy::random, .align = 8, .seed = 7},
                                   "factor 0.75 random align 8"));
      plans.push_back(route_random(rng, T, E, k,
                                   cap::factor{.factor = 1.25, .min_capacity = 3, .pad_to_capacity = true, .align = 4},
                                   "factor 1.25 min 3 pad align 4"));
    }
  }
  return plans;
}

// The plan read through its slot arrays only.
struct slot_walk {
  rs::index T = 0, E = 0;
  std::vector<rs::index> slot_of;    // T×E: the slot of kept pair (t, e), or -1
  std::vector<float> weight;         // T×E: its weight, 0 elsewhere
  std::vector<rs::index> kept;       // E: real tokens per expert
  std::vector<rs::index> per_token;  // T: kept assignments per token
  rs::index total = 0;
  bool consistent = true;  // no slot refers to a token twice, no out-of-range token
};

slot_walk walk_slots(const rs::routing_plan& p) {
  slot_walk w;
  w.T = p.num_tokens();
  w.E = p.num_experts();
  w.slot_of.assign(usz(w.T * w.E), -1);
  w.weight.assign(usz(w.T * w.E), 0.0f);
  w.kept.assign(usz(w.E), 0);
  w.per_token.assign(usz(w.T), 0);
  const auto off = p.expert_offsets();
  const auto st = p.slot_token();
  const auto sw = p.slot_weight();
  for (rs::index e = 0; e < w.E; ++e) {
    for (rs::index s = off[usz(e)]; s < off[usz(e + 1)]; ++s) {
      const rs::index t = st[usz(s)];
      if (t < 0) continue;
      if (t >= w.T || w.slot_of[usz(t * w.E + e)] != -1) {
        w.consistent = false;
        continue;
      }
      w.slot_of[usz(t * w.E + e)] = s;
      w.weight[usz(t * w.E + e)] = sw[usz(s)];
      ++w.kept[usz(e)];
      ++w.per_token[usz(t)];
      ++w.total;
    }
  }
  return w;
}

// ---------------------------------------------------------------------------------------------------
// dispatch / combine

template <class Scalar>
void check_dispatch_combine(const routed& r, rs::index d, rs::index x_gap, rs::index buf_gap, rs::index out_gap,
                            rs::index y_gap, std::mt19937_64& rng) {
  const rs::routing_plan& plan = r.plan;
  const slot_walk w = walk_slots(plan);
  REQUIRE(w.consistent);
  const rs::index T = plan.num_tokens(), S = plan.num_slots();
  const Scalar sentinel = Scalar(-12345);

  // dispatch: buffer row s is x row slot_token[s], zero for padding; the gap columns stay untouched.
  std::vector<Scalar> x = resonance_test::strided_normal<Scalar>(rng, T, d, d + x_gap, sentinel);
  const rs::matrix_view<const Scalar> xv{x.data(), T, d, d + x_gap};
  std::vector<Scalar> buf(usz(S * (d + buf_gap)), sentinel);
  const rs::matrix_view<Scalar> bv{buf.data(), S, d, d + buf_gap};
  rs::dispatch(rs::backend::serial{}, plan, xv, bv);
  const auto st = plan.slot_token();
  bool dispatch_ok = true;
  for (rs::index s = 0; s < S; ++s) {
    const rs::index t = st[usz(s)];
    for (rs::index c = 0; c < d; ++c) dispatch_ok = dispatch_ok && bv(s, c) == (t >= 0 ? xv(t, c) : Scalar(0));
    for (rs::index c = d; c < d + buf_gap; ++c)
      dispatch_ok = dispatch_ok && buf[usz(s * (d + buf_gap) + c)] == sentinel;
  }
  CHECK(dispatch_ok);

  // combine: y[t] = sum over t's kept pairs of weight * expert_out[slot], against double brute force.
  std::vector<Scalar> eo = resonance_test::strided_normal<Scalar>(rng, S, d, d + out_gap, sentinel);
  const rs::matrix_view<const Scalar> ev{eo.data(), S, d, d + out_gap};
  std::vector<Scalar> y(usz(T * (d + y_gap)), std::numeric_limits<Scalar>::quiet_NaN());
  for (rs::index t = 0; t < T; ++t)
    for (rs::index c = d; c < d + y_gap; ++c) y[usz(t * (d + y_gap) + c)] = sentinel;
  const rs::matrix_view<Scalar> yv{y.data(), T, d, d + y_gap};
  rs::combine(rs::backend::serial{}, plan, ev, yv);
  bool combine_ok = true;
  for (rs::index t = 0; t < T; ++t) {
    for (rs::index c = 0; c < d; ++c) {
      double want = 0.0, magnitude = 0.0;
      for (rs::index e = 0; e < w.E; ++e) {
        const rs::index s = w.slot_of[usz(t * w.E + e)];
        if (s < 0) continue;
        const double term = static_cast<double>(w.weight[usz(t * w.E + e)]) * static_cast<double>(ev(s, c));
        want += term;
        magnitude += std::fabs(term);
      }
      const double got = static_cast<double>(yv(t, c));
      if (!(std::fabs(got - want) <= 1e-5 * (1.0 + magnitude))) {
        combine_ok = false;
        FAIL_CHECK("combine token " << t << " col " << c << ": " << got << " vs " << want);
      }
      // A token that kept nothing gets exactly zero (y is overwritten, not accumulated into).
      if (w.per_token[usz(t)] == 0) combine_ok = combine_ok && yv(t, c) == Scalar(0);
    }
    for (rs::index c = d; c < d + y_gap; ++c) combine_ok = combine_ok && y[usz(t * (d + y_gap) + c)] == sentinel;
  }
  CHECK(combine_ok);

  // A second call gives bitwise the same result (fixed summation order).
  std::vector<Scalar> y2(y.size(), Scalar(7));
  for (rs::index t = 0; t < T; ++t)
    for (rs::index c = d; c < d + y_gap; ++c) y2[usz(t * (d + y_gap) + c)] = sentinel;
  rs::combine(rs::backend::serial{}, plan, ev, rs::matrix_view<Scalar>{y2.data(), T, d, d + y_gap});
  CHECK(std::memcmp(y.data(), y2.data(), y.size() * sizeof(Scalar)) == 0);
}

TEST_CASE("test_dispatch: dispatch and combine equal brute force over every capacity variant") {
  std::mt19937_64 rng(31);
  for (const routed& r : random_plans()) {
    CAPTURE(r.name);
    // Contiguous views, then strided ones (stride > cols) for every operand.
    check_dispatch_combine<float>(r, 5, 0, 0, 0, 0, rng);
    check_dispatch_combine<float>(r, 5, 3, 2, 4, 1, rng);
    check_dispatch_combine<double>(r, 3, 1, 0, 2, 5, rng);
  }
}

TEST_CASE("test_dispatch: dispatch then identity experts then combine scales each row by its kept weight") {
  // Closed form: with expert_out = dispatch(x), y[t] = (sum of t's kept weights) * x[t].
  std::mt19937_64 rng(32);
  for (const routed& r : random_plans()) {
    CAPTURE(r.name);
    const slot_walk w = walk_slots(r.plan);
    const rs::index T = r.plan.num_tokens(), S = r.plan.num_slots(), d = 4;
    std::vector<float> x = resonance_test::normal_values(rng, T * d), buf(usz(S * d)), y(usz(T * d));
    rs::matrix_view<float> xv{x.data(), T, d};  // the non-const overloads
    rs::dispatch(rs::backend::serial{}, r.plan, xv, rs::matrix_view<float>{buf.data(), S, d});
    rs::combine(rs::backend::serial{}, r.plan, rs::matrix_view<float>{buf.data(), S, d},
                rs::matrix_view<float>{y.data(), T, d});
    bool ok = true;
    for (rs::index t = 0; t < T; ++t) {
      double wsum = 0.0;
      for (rs::index e = 0; e < w.E; ++e) wsum += w.weight[usz(t * w.E + e)];
      for (rs::index c = 0; c < d; ++c)
        ok = ok &&
             std::fabs(y[usz(t * d + c)] - wsum * x[usz(t * d + c)]) <= 1e-5 * (1.0 + std::fabs(x[usz(t * d + c)]));
    }
    CHECK(ok);
  }
}

// ---------------------------------------------------------------------------------------------------
// to_dense

template <class P, class M>
void check_to_dense(const routed& r) {
  const slot_walk w = walk_slots(r.plan);
  REQUIRE(w.consistent);
  const rs::index T = w.T, E = w.E, ps = E + 2, ms = E + 1;
  std::vector<P> probs(usz(T * ps), P(7));
  std::vector<M> mask(usz(T * ms), M(7));
  rs::to_dense(r.plan, rs::matrix_view<P>{probs.data(), T, E, ps}, rs::matrix_view<M>{mask.data(), T, E, ms});
  bool ok = true;
  for (rs::index t = 0; t < T; ++t) {
    for (rs::index e = 0; e < E; ++e) {
      const bool kept = w.slot_of[usz(t * E + e)] >= 0;
      ok = ok && probs[usz(t * ps + e)] == (kept ? static_cast<P>(w.weight[usz(t * E + e)]) : P(0));
      ok = ok && mask[usz(t * ms + e)] == (kept ? M(1) : M(0));
    }
    for (rs::index c = E; c < ps; ++c) ok = ok && probs[usz(t * ps + c)] == P(7);
    for (rs::index c = E; c < ms; ++c) ok = ok && mask[usz(t * ms + c)] == M(7);
  }
  CHECK(ok);
}

TEST_CASE("test_dispatch: to_dense equals the dense map built from the slot arrays") {
  for (const routed& r : random_plans()) {
    CAPTURE(r.name);
    check_to_dense<float, std::uint8_t>(r);
    check_to_dense<double, int>(r);
  }
}

// ---------------------------------------------------------------------------------------------------
// to_block_aligned

TEST_CASE("test_dispatch: to_block_aligned equals vLLM moe_align_block_size brute force") {
  for (const routed& r : random_plans()) {
    const slot_walk w = walk_slots(r.plan);
    REQUIRE(w.consistent);
    const rs::index T = w.T, E = w.E;
    // Index of pair (t, e) in the token-major CSR: tokens in order, each token's experts ascending.
    std::vector<rs::index> csr(usz(T * E), -1);
    rs::index next = 0;
    for (rs::index t = 0; t < T; ++t) {
      rs::index j = 0;
      for (rs::index e = 0; e < E; ++e) {
        if (w.slot_of[usz(t * E + e)] < 0) continue;
        csr[usz(t * E + e)] = next++;
        // When every token keeps exactly k, this is vLLM's flattened topk index t*k + j.
        if (r.dropless) CHECK(csr[usz(t * E + e)] == t * r.top_k + j);
        ++j;
      }
    }
    for (rs::index block : {1, 3, 4, 16, 64}) {
      CAPTURE(r.name);
      CAPTURE(block);
      const rs::index pad = w.total;
      std::vector<rs::id_type> want_ids, want_experts;
      for (rs::index e = 0; e < E; ++e) {
        rs::index n = 0;
        for (rs::index t = 0; t < T; ++t) {
          if (csr[usz(t * E + e)] < 0) continue;
          want_ids.push_back(static_cast<rs::id_type>(csr[usz(t * E + e)]));
          ++n;
        }
        for (; n % block != 0; ++n) want_ids.push_back(static_cast<rs::id_type>(pad));
        for (rs::index b = 0; b < n / block; ++b) want_experts.push_back(static_cast<rs::id_type>(e));
      }
      const rs::block_aligned_layout got = rs::to_block_aligned(r.plan, block);
      CHECK(got.block == block);
      CHECK(got.num_tokens_post_pad == static_cast<rs::id_type>(want_ids.size()));
      CHECK(got.sorted_token_ids == want_ids);
      CHECK(got.expert_ids == want_experts);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// to_rank_layout

void check_rank_layout(const routed& r, const rs::dist::expert_placement& pl, int& shared_rank_tokens) {
  const slot_walk w = walk_slots(r.plan);
  REQUIRE(w.consistent);
  const rs::index T = w.T, E = w.E, R = pl.num_ranks, N = R / pl.ranks_per_node;
  std::vector<rs::id_type> per_rank(usz(R), 0), per_node(usz(N), 0), per_expert(usz(E), 0);
  std::vector<std::uint8_t> in_rank(usz(T * R), 0);
  for (rs::index t = 0; t < T; ++t) {
    std::vector<bool> rank_hit(usz(R), false), node_hit(usz(N), false);
    rs::index experts = 0;
    for (rs::index e = 0; e < E; ++e) {
      if (w.slot_of[usz(t * E + e)] < 0) continue;
      ++experts;
      ++per_expert[usz(e)];
      const rs::index rank = pl.rank_of_expert[usz(e)];
      rank_hit[usz(rank)] = true;
      node_hit[usz(rank / pl.ranks_per_node)] = true;
    }
    rs::index ranks = 0;
    for (rs::index q = 0; q < R; ++q) {
      if (!rank_hit[usz(q)]) continue;
      ++ranks;
      ++per_rank[usz(q)];
      in_rank[usz(t * R + q)] = 1;
    }
    for (rs::index n = 0; n < N; ++n) per_node[usz(n)] += node_hit[usz(n)] ? 1 : 0;
    if (experts > ranks) ++shared_rank_tokens;
  }
  const rs::rank_layout got = rs::to_rank_layout(r.plan, pl);
  CHECK(got.num_ranks == R);
  CHECK(got.num_tokens_per_rank == per_rank);
  CHECK(got.num_tokens_per_node == per_node);
  CHECK(got.num_tokens_per_expert == per_expert);
  CHECK(got.is_token_in_rank == in_rank);
}

TEST_CASE("test_dispatch: expert_placement::contiguous is e / (E / R)") {
  for (rs::index R : {1, 2, 4, 8}) {
    const auto pl = rs::dist::expert_placement::contiguous(8, R, R >= 2 ? 2 : 1);
    CHECK(pl.num_ranks == R);
    REQUIRE(pl.rank_of_expert.size() == 8u);
    for (rs::index e = 0; e < 8; ++e) CHECK(pl.rank_of_expert[usz(e)] == e / (8 / R));
    CHECK(pl.num_nodes() == (R >= 2 ? R / 2 : 1));
  }
}

TEST_CASE("test_dispatch: to_rank_layout equals DeepEP layout brute force") {
  using rs::dist::expert_placement;
  const std::vector<expert_placement> placements{
      expert_placement::contiguous(8, 4, 2), expert_placement::contiguous(8, 2), expert_placement::contiguous(8, 8, 4),
      // Custom, interleaved: ranks own non-contiguous experts.
      expert_placement{4, 2, {2, 0, 1, 3, 0, 2, 3, 1}}, expert_placement{3, 3, {2, 0, 1, 1, 0, 2, 2, 0}},
      expert_placement{3, 1, {0, 0, 0, 0, 0, 0, 0, 0}},  // rank 1 and 2 hold nothing
  };
  int shared_rank_tokens = 0;
  for (const routed& r : random_plans()) {
    for (std::size_t i = 0; i < placements.size(); ++i) {
      CAPTURE(r.name);
      CAPTURE(i);
      check_rank_layout(r, placements[i], shared_rank_tokens);
    }
  }
  // The batches did send tokens to two experts of one rank, which must count once.
  CHECK(shared_rank_tokens > 100);
}

// ---------------------------------------------------------------------------------------------------
// Every backend

// Everything dispatch, combine and the exports write for one plan, bit for bit, on backend `be` (the
// plan passed owning or as a view, alternately). Outputs start as `fill`, so an entry one backend
// leaves unwritten shows as a difference.
struct exported {
  std::vector<float> buffer, y;
  std::vector<double> y_double;
  std::vector<float> probs;
  std::vector<std::uint8_t> mask;
  std::vector<rs::block_aligned_layout> blocks;
  std::vector<rs::rank_layout> ranks;
};

const std::vector<rs::dist::expert_placement>& test_placements() {
  using rs::dist::expert_placement;
  static const std::vector<expert_placement> placements{
      expert_placement::contiguous(16, 4, 2), expert_placement::contiguous(16, 16, 4),
      expert_placement{3, 3, {2, 0, 1, 1, 0, 2, 2, 0, 1, 1, 1, 0, 2, 0, 0, 2}}};
  return placements;
}

template <class Backend>
exported export_all(const Backend& be, const rs::routing_plan& plan, bool as_view, float fill) {
  std::mt19937_64 rng(77);  // the same inputs on every backend
  const rs::index T = plan.num_tokens(), S = plan.num_slots(), E = plan.num_experts(), d = 19;
  const std::vector<float> x = resonance_test::normal_values(rng, T * d);
  const std::vector<float> eo = resonance_test::normal_values(rng, S * d);
  const std::vector<double> eo_double = resonance_test::normal_values<double>(rng, S * d);
  exported out;
  out.buffer.assign(usz(S * d), fill);
  out.y.assign(usz(T * d), fill);
  out.y_double.assign(usz(T * d), static_cast<double>(fill));
  out.probs.assign(usz(T * E), fill);
  out.mask.assign(usz(T * E), 7);
  const auto run = [&](const auto& p) {
    rs::dispatch(be, p, rs::matrix_view<const float>{x.data(), T, d}, rs::matrix_view<float>{out.buffer.data(), S, d});
    rs::combine(be, p, rs::matrix_view<const float>{eo.data(), S, d}, rs::matrix_view<float>{out.y.data(), T, d});
    rs::combine(be, p, rs::matrix_view<const double>{eo_double.data(), S, d},
                rs::matrix_view<double>{out.y_double.data(), T, d});
    rs::to_dense(be, p, rs::matrix_view<float>{out.probs.data(), T, E},
                 rs::matrix_view<std::uint8_t>{out.mask.data(), T, E});
    for (rs::index block : {1, 3, 16, 64}) out.blocks.push_back(rs::to_block_aligned(be, p, block));
    for (const auto& pl : test_placements()) out.ranks.push_back(rs::to_rank_layout(be, p, pl));
  };
  if (as_view) {
    run(plan.view());
  } else {
    run(plan);
  }
  return out;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// The first output in which two runs differ, or "".
std::string export_difference(const exported& a, const exported& b) {
  if (!same_bits(a.buffer, b.buffer)) return "dispatch";
  if (!same_bits(a.y, b.y)) return "combine float";
  if (!same_bits(a.y_double, b.y_double)) return "combine double";
  if (!same_bits(a.probs, b.probs)) return "to_dense probs";
  if (!same_bits(a.mask, b.mask)) return "to_dense mask";
  if (a.blocks.size() != b.blocks.size()) return "to_block_aligned count";
  for (std::size_t i = 0; i < a.blocks.size(); ++i) {
    const auto &x = a.blocks[i], &y = b.blocks[i];
    if (x.block != y.block || x.num_tokens_post_pad != y.num_tokens_post_pad ||
        !same_bits(x.sorted_token_ids, y.sorted_token_ids) || !same_bits(x.expert_ids, y.expert_ids))
      return "to_block_aligned block " + std::to_string(x.block);
  }
  if (a.ranks.size() != b.ranks.size()) return "to_rank_layout count";
  for (std::size_t i = 0; i < a.ranks.size(); ++i) {
    const auto &x = a.ranks[i], &y = b.ranks[i];
    if (x.num_ranks != y.num_ranks || !same_bits(x.num_tokens_per_rank, y.num_tokens_per_rank) ||
        !same_bits(x.num_tokens_per_node, y.num_tokens_per_node) ||
        !same_bits(x.num_tokens_per_expert, y.num_tokens_per_expert) ||
        !same_bits(x.is_token_in_rank, y.is_token_in_rank))
      return "to_rank_layout placement " + std::to_string(i);
  }
  return {};
}

TEST_CASE(
    "test_dispatch: dispatch, combine and the exports are serial's bitwise on every backend, scrambled included") {
  std::mt19937_64 rng(41);
  namespace cap = rs::capacity;
  std::vector<routed> plans;
  // Several blocks of 256 rows (dispatch, combine) and of tbb's default grain (the exports).
  for (rs::index T : {0, 1, 300, 2049, 5000}) {
    plans.push_back(route_random(rng, T, 16, 4, cap::dropless{.align = 8}, "dropless align 8"));
    plans.push_back(
        route_random(rng, T, 16, 2,
                     cap::factor{.factor = 0.5, .drop = rs::drop_policy::position, .pad_to_capacity = true, .align = 4},
                     "factor 0.5 position pad align 4"));
  }
  for (const routed& r : plans) {
    CAPTURE(r.name);
    // The reference: serial through the backend-less exports (dispatch and combine need a backend).
    exported want = export_all(rs::backend::serial{}, r.plan, false, 0.0f);
    const rs::index T = r.plan.num_tokens(), E = r.plan.num_experts();
    std::vector<float> probs(usz(T * E));
    std::vector<std::uint8_t> mask(usz(T * E));
    rs::to_dense(r.plan, rs::matrix_view<float>{probs.data(), T, E}, rs::matrix_view<std::uint8_t>{mask.data(), T, E});
    CHECK(same_bits(probs, want.probs));
    CHECK(same_bits(mask, want.mask));
    for (const auto& b : want.blocks) {
      const rs::block_aligned_layout l = rs::to_block_aligned(r.plan, b.block);
      CHECK((l.num_tokens_post_pad == b.num_tokens_post_pad && l.sorted_token_ids == b.sorted_token_ids &&
             l.expert_ids == b.expert_ids));
    }
    for (std::size_t i = 0; i < test_placements().size(); ++i) {
      const rs::rank_layout l = rs::to_rank_layout(r.plan, test_placements()[i]);
      CHECK((l.num_tokens_per_rank == want.ranks[i].num_tokens_per_rank &&
             l.num_tokens_per_node == want.ranks[i].num_tokens_per_node &&
             l.num_tokens_per_expert == want.ranks[i].num_tokens_per_expert &&
             l.is_token_in_rank == want.ranks[i].is_token_in_rank));
    }
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const auto check = [&](const auto& be, const std::string& name) {
      for (bool as_view : {false, true}) {
        const std::string diff = export_difference(export_all(be, r.plan, as_view, nan), want);
        CHECK_MESSAGE(diff.empty(), name << (as_view ? " (plan_view)" : " (routing_plan)") << ": " << diff);
      }
    };
    check(resonance_test::scrambled_backend{}, "scrambled");
    resonance_test::for_each_backend(check);
  }
}

TEST_CASE("test_dispatch: to_block_aligned rejects a block whose experts' padded runs only overflow together") {
  // Two experts with tokens and blocks of 2^30: each run fits in 32-bit ids, the layout (2^31) does not.
  std::mt19937_64 rng(42);
  const routed r = route_random(rng, 40, 4, 2, rs::capacity::dropless{}, "dropless");
  rs::index nonempty = 0;
  for (rs::id_type c : r.plan.expert_counts()) nonempty += c > 0 ? 1 : 0;
  REQUIRE(nonempty >= 2);
  const rs::index block = rs::index{1} << 30;
  const std::string want = resonance_test::error_of([&] { (void)rs::to_block_aligned(r.plan, block); });
  CHECK(want.starts_with("resonance: block: "));
  CHECK(resonance_test::error_of(
            [&] { (void)rs::to_block_aligned(resonance_test::scrambled_backend{}, r.plan, block); }) == want);
  resonance_test::for_each_backend([&](const auto& be, const std::string& name) {
    CHECK_MESSAGE(resonance_test::error_of([&] { (void)rs::to_block_aligned(be, r.plan.view(), block); }) == want,
                  name);
  });
}

}  // namespace
