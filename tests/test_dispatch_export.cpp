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

}  // namespace
