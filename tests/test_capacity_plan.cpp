// Capacity and the plan builder against a brute-force capacity cut: for each expert, take its candidate
// list (ascending token id) and keep the top-C by weight (std::stable_sort: ties to the lower token)
// or the C earliest tokens; plus the structural invariants of every plan (tests/reference.hpp).

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/resonance.hpp>

#include "error_of.hpp"
#include "reference.hpp"

namespace {

namespace rs = resonance;
namespace rt = resonance::routing;
using resonance_test::error_of;
using resonance_test::sz;

using factor_router = rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::factor>;
using dropless_router = rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::dropless>;

rs::matrix_view<const float> view(const std::vector<float>& x, rs::index T, rs::index E) {
  return {T > 0 ? x.data() : nullptr, T, E};
}

// One expert's candidates as (token, weight, rank), ascending token.
struct ref_candidate {
  rs::id_type token;
  float weight;
  float rank;
};

std::vector<std::vector<ref_candidate>> per_expert(const rs::candidate_set& c) {
  std::vector<std::vector<ref_candidate>> out(sz(c.num_experts));
  for (rs::index t = 0; t < c.num_tokens; ++t) {
    for (rs::id_type i = c.offsets[sz(t)]; i < c.offsets[sz(t + 1)]; ++i) {
      const float rank = c.priority.empty() ? c.weight[sz(i)] : c.priority[sz(i)];
      out[sz(c.expert[sz(i)])].push_back({static_cast<rs::id_type>(t), c.weight[sz(i)], rank});
    }
  }
  return out;
}

// The brute-force cut: kept candidates of every expert, in ascending token order.
std::vector<std::vector<ref_candidate>> reference_keep(const rs::candidate_set& c, rs::index capacity,
                                                       rs::drop_policy drop) {
  std::vector<std::vector<ref_candidate>> kept = per_expert(c);
  for (auto& list : kept) {
    if (capacity < 0 || static_cast<rs::index>(list.size()) <= capacity) continue;
    if (drop == rs::drop_policy::score)  // stable: equal ranks keep ascending token order
      std::stable_sort(list.begin(), list.end(),
                       [](const ref_candidate& a, const ref_candidate& b) { return a.rank > b.rank; });
    list.resize(sz(capacity));
    std::sort(list.begin(), list.end(),
              [](const ref_candidate& a, const ref_candidate& b) { return a.token < b.token; });
  }
  return kept;
}

// First disagreement between a plan and the reference cut, or "".
std::string keep_mismatch(const rs::routing_plan& plan, const std::vector<std::vector<ref_candidate>>& kept) {
  const auto off = plan.expert_offsets();
  const auto st = plan.slot_token();
  const auto sw = plan.slot_weight();
  for (std::size_t e = 0; e < kept.size(); ++e) {
    const std::string where = "expert " + std::to_string(e) + ": ";
    if (plan.expert_counts()[e] != static_cast<rs::id_type>(kept[e].size()))
      return where + "keeps " + std::to_string(plan.expert_counts()[e]) + ", reference " +
             std::to_string(kept[e].size());
    for (std::size_t j = 0; j < kept[e].size(); ++j) {
      const auto slot = sz(off[e]) + j;
      if (st[slot] != kept[e][j].token)
        return where + "slot " + std::to_string(j) + " token " + std::to_string(st[slot]) + ", reference " +
               std::to_string(kept[e][j].token);
      if (sw[slot] != kept[e][j].weight) return where + "slot " + std::to_string(j) + " weight differs";
    }
  }
  return {};
}

// The candidates a dropless plan represents (its token-major CSR), to feed the reference cut.
rs::candidate_set candidates_of(const rs::routing_plan& plan) {
  rs::candidate_set c;
  c.num_tokens = plan.num_tokens();
  c.num_experts = plan.num_experts();
  c.offsets.assign(plan.token_offsets().begin(), plan.token_offsets().end());
  c.expert.assign(plan.token_expert().begin(), plan.token_expert().end());
  c.weight.assign(plan.token_weight().begin(), plan.token_weight().end());
  return c;
}

// Kept (token) sets per expert of a plan.
std::vector<std::vector<rs::id_type>> kept_tokens(const rs::routing_plan& plan) {
  std::vector<std::vector<rs::id_type>> out(sz(plan.num_experts()));
  for (rs::index e = 0; e < plan.num_experts(); ++e) {
    const auto b = sz(plan.expert_offsets()[sz(e)]);
    out[sz(e)].assign(plan.slot_token().begin() + static_cast<std::ptrdiff_t>(b),
                      plan.slot_token().begin() + static_cast<std::ptrdiff_t>(b + sz(plan.expert_counts()[sz(e)])));
  }
  return out;
}

// A hand-made candidate set: token t's (expert, weight) pairs.
rs::candidate_set make_candidates(rs::index E, const std::vector<std::vector<std::pair<rs::id_type, float>>>& rows) {
  rs::candidate_set c;
  c.num_tokens = static_cast<rs::index>(rows.size());
  c.num_experts = E;
  for (const auto& row : rows) {
    for (const auto& [e, w] : row) {
      c.expert.push_back(e);
      c.weight.push_back(w);
    }
    c.offsets.push_back(static_cast<rs::id_type>(c.expert.size()));
  }
  return c;
}

}  // namespace

TEST_CASE("test_capacity_plan: capacity factor follows Megatron's get_capacity in double") {
  // Expected values computed with Python: max(math.ceil((T * k / E) * factor), min_capacity).
  struct hand_case {
    rs::index T, k, E;
    double factor;
    rs::index min_capacity, capacity;
  };
  const hand_case cases[] = {
      {10, 1, 1, 1.1, 0, 11},  // 10 * 1.1 == 11.0 in double (11.000000000000002 would need fp32 1.1f: 12)
      {50, 1, 1, 1.1, 0, 56},  // 50 * 1.1 == 55.00000000000001 in double: ceil gives 56
      {25, 2, 5, 1.1, 0, 11},  // (T*k/E)*f == 11.0, while T*k*f/E would give 12
      {75, 2, 3, 1.1, 0, 56},  // (T*k/E)*f == 55.00000000000001, while T*k*f/E gives 55
      {5, 1, 3, 1.2, 0, 2},   {100, 2, 6, 1.25, 0, 42}, {7, 1, 2, 1.0, 0, 4},  {3, 1, 8, 1.0, 0, 1},
      {3, 1, 8, 1.0, 4, 4},   {10, 2, 4, 0.5, 0, 3},    {10, 2, 4, 0.5, 2, 3}, {1000, 8, 64, 1.0, 0, 125},
      {0, 2, 4, 1.0, 0, 0},   {0, 2, 4, 1.0, 3, 3},
  };
  for (const hand_case& h : cases) {
    CAPTURE(h.T);
    CAPTURE(h.k);
    CAPTURE(h.E);
    CAPTURE(h.factor);
    const rs::capacity::factor f{.factor = h.factor, .min_capacity = h.min_capacity};
    CHECK(f.capacity(h.T, h.E, h.k) == h.capacity);
    CHECK(f.limits(h.T, h.E, h.k).capacity == h.capacity);
    // The router reports the same C in its plan.
    const std::vector<float> x(sz(h.T * h.E), 0.0f);
    const factor_router r{{}, {.top_k = h.k}, f};
    CHECK(r.route(rs::backend::serial{}, view(x, h.T, h.E)).capacity() == h.capacity);
  }
}

TEST_CASE("test_capacity_plan: random shapes match the brute-force cut and every plan invariant") {
  std::mt19937_64 rng(42);
  auto pick = [&](rs::index lo, rs::index hi) { return std::uniform_int_distribution<rs::index>(lo, hi)(rng); };
  const rs::index widths[] = {1, 2, 3, 5, 8, 16, 64};
  const double factors[] = {0.25, 0.5, 1.0, 1.1, 1.5, 2.0};
  const rs::index aligns[] = {1, 1, 2, 3, 8};
  const rs::index mins[] = {0, 0, 2, 5};
  const rs::drop_policy drops[] = {rs::drop_policy::score, rs::drop_policy::position, rs::drop_policy::random};
  const rs::score fns[] = {rs::score::softmax, rs::score::sigmoid, rs::score::sqrt_softplus};
  for (int n = 0; n < 200; ++n) {
    const rs::index T = n < 5 ? 0 : pick(1, 96);
    const rs::index E = widths[sz(pick(0, 6))];
    const rt::token_choice p{.top_k = pick(1, std::min<rs::index>(E, 4)),
                             .score = fns[sz(pick(0, 2))],
                             .scaling_factor = pick(0, 3) == 0 ? 2.0f : 1.0f};
    const rs::capacity::factor f{.factor = factors[sz(pick(0, 5))],
                                 .drop = drops[sz(pick(0, 2))],
                                 .min_capacity = mins[sz(pick(0, 3))],
                                 .pad_to_capacity = pick(0, 1) == 1,
                                 .align = aligns[sz(pick(0, 4))],
                                 .seed = static_cast<std::uint64_t>(pick(0, 1000))};
    CAPTURE(n);
    CAPTURE(T);
    CAPTURE(E);
    CAPTURE(p.top_k);
    CAPTURE(f.factor);
    CAPTURE(static_cast<int>(f.drop));
    CAPTURE(f.pad_to_capacity);
    CAPTURE(f.align);

    std::vector<float> x = resonance_test::tie_free_logits(rng, T, E, p);
    if (T > 0 && pick(0, 2) == 0) {
      // Rows repeated from a few prototypes: equal weights across tokens, so score ties are decided
      // by token id.
      for (rs::index t = 0; t < T; ++t) {
        const rs::index proto = pick(0, std::min<rs::index>(T, 3) - 1);
        if (proto != t) std::copy_n(x.begin() + proto * E, E, x.begin() + t * E);
      }
    }
    const rs::index C = std::max(
        static_cast<rs::index>(std::ceil((static_cast<double>(T * p.top_k) / static_cast<double>(E)) * f.factor)),
        f.min_capacity);

    const rs::routing_plan all = dropless_router{{}, p, {}}.route(rs::backend::serial{}, view(x, T, E));
    const factor_router r{{}, p, f};
    const rs::routing_plan plan = r.route(rs::backend::serial{}, view(x, T, E));

    std::string bad = resonance_test::plan_violation(all, {.per_token = p.top_k});
    CHECK_MESSAGE(bad.empty(), bad);
    bad = resonance_test::plan_violation(plan, {.capacity = C, .pad_to_capacity = f.pad_to_capacity, .align = f.align});
    CHECK_MESSAGE(bad.empty(), bad);

    // Demand: how many tokens chose each expert in the reference top-k.
    std::vector<rs::id_type> demand(sz(E), 0);
    for (rs::index t = 0; t < T; ++t)
      for (rs::index e : resonance_test::ref_token_choice(p, x.data() + t * E, E).expert) ++demand[sz(e)];
    CHECK(std::vector<rs::id_type>(plan.expert_demand().begin(), plan.expert_demand().end()) == demand);
    CHECK(std::vector<rs::id_type>(all.expert_counts().begin(), all.expert_counts().end()) == demand);

    const rs::candidate_set cands = candidates_of(all);
    if (f.drop != rs::drop_policy::random) {
      const std::string diff = keep_mismatch(plan, reference_keep(cands, C, f.drop));
      CHECK_MESSAGE(diff.empty(), diff);
    } else {
      // Random: min(demand, C) of the expert's own candidates (counts are checked by plan_violation);
      // with no overflow it is exactly the dropless set.
      const auto all_kept = kept_tokens(all);
      const auto got = kept_tokens(plan);
      for (rs::index e = 0; e < E; ++e) {
        const auto& mine = all_kept[sz(e)];
        for (rs::id_type t : got[sz(e)]) CHECK(std::binary_search(mine.begin(), mine.end(), t));
        if (static_cast<rs::index>(mine.size()) <= C) CHECK(got[sz(e)] == mine);
      }
    }
    // Determinism: the same input, the same plan, bit for bit.
    CHECK(r.route(rs::backend::serial{}, view(x, T, E)) == plan);
  }
}

TEST_CASE("test_capacity_plan: score drop keeps the top-C weights, ties to the lower token") {
  // Expert 0: weights t0 .5, t1 .9, t2 .5, t3 .7, t4 .5; C = 3 keeps t1, t3 and t0 (t0 beats t2, t4).
  // Expert 1: t0, t2, t4 fit in C = 3. Expert 2: t1 .1, t3 .2, t5 .3, t6 .3: the top 3 are t5, t6, t3.
  const rs::candidate_set c = make_candidates(3, {{{0, .5f}, {1, .5f}},
                                                  {{0, .9f}, {2, .1f}},
                                                  {{0, .5f}, {1, .5f}},
                                                  {{0, .7f}, {2, .2f}},
                                                  {{0, .5f}, {1, .5f}},
                                                  {{2, .3f}},
                                                  {{2, .3f}}});
  const rs::routing_plan plan = rs::build_plan(rs::backend::serial{}, c, {.capacity = 3});
  CHECK(std::vector<rs::id_type>(plan.slot_token().begin(), plan.slot_token().end()) ==
        std::vector<rs::id_type>{0, 1, 3, 0, 2, 4, 3, 5, 6});
  CHECK(std::vector<rs::id_type>(plan.expert_demand().begin(), plan.expert_demand().end()) ==
        std::vector<rs::id_type>{5, 3, 4});
  CHECK(plan.num_dropped() == 3);
  // Token 2 and token 4 lost expert 0 but keep expert 1; token 1 lost expert 2.
  CHECK(std::vector<rs::id_type>(plan.token_offsets().begin(), plan.token_offsets().end()) ==
        std::vector<rs::id_type>{0, 2, 3, 4, 6, 7, 8, 9});
  CHECK(std::vector<rs::id_type>(plan.token_expert().begin(), plan.token_expert().end()) ==
        std::vector<rs::id_type>{0, 1, 0, 1, 0, 2, 1, 2, 2});
  CHECK(keep_mismatch(plan, reference_keep(c, 3, rs::drop_policy::score)).empty());

  // A priority, when given, ranks instead of the weight: reversed priorities keep the lowest weights.
  rs::candidate_set q = c;
  for (float w : c.weight) q.priority.push_back(-w);
  const rs::routing_plan by_priority = rs::build_plan(rs::backend::serial{}, q, {.capacity = 3});
  CHECK(std::vector<rs::id_type>(by_priority.slot_token().begin(), by_priority.slot_token().end()) ==
        std::vector<rs::id_type>{0, 2, 4, 0, 2, 4, 1, 3, 5});
  CHECK(keep_mismatch(by_priority, reference_keep(q, 3, rs::drop_policy::score)).empty());
  const std::string bad = resonance_test::plan_violation(by_priority, {.capacity = 3});
  CHECK_MESSAGE(bad.empty(), bad);
}

TEST_CASE("test_capacity_plan: build_plan matches the brute force on random candidate sets") {
  std::mt19937_64 rng(7);
  auto pick = [&](rs::index lo, rs::index hi) { return std::uniform_int_distribution<rs::index>(lo, hi)(rng); };
  for (int n = 0; n < 150; ++n) {
    const rs::index T = pick(0, 60), E = pick(1, 9);
    rs::candidate_set c;
    c.num_tokens = T;
    c.num_experts = E;
    const bool with_priority = pick(0, 2) == 0;
    for (rs::index t = 0; t < T; ++t) {
      for (rs::index e = 0; e < E; ++e) {
        if (pick(0, 2) != 0) continue;  // a ragged, possibly empty candidate list
        c.expert.push_back(static_cast<rs::id_type>(e));
        c.weight.push_back(static_cast<float>(pick(0, 4)) * 0.25f);  // few values: many ties
        if (with_priority) c.priority.push_back(static_cast<float>(pick(-3, 3)));
      }
      c.offsets.push_back(static_cast<rs::id_type>(c.expert.size()));
    }
    const rs::capacity_limits lim{.capacity = pick(-1, 8),
                                  .drop = pick(0, 1) == 0 ? rs::drop_policy::score : rs::drop_policy::position,
                                  .pad_to_capacity = pick(0, 1) == 1,
                                  .align = pick(1, 4)};
    CAPTURE(n);
    CAPTURE(lim.capacity);
    CAPTURE(static_cast<int>(lim.drop));
    const rs::routing_plan plan = rs::build_plan(rs::backend::serial{}, c, lim);
    const std::string bad = resonance_test::plan_violation(
        plan, {.capacity = lim.capacity, .pad_to_capacity = lim.pad_to_capacity, .align = lim.align});
    CHECK_MESSAGE(bad.empty(), bad);
    const std::string diff = keep_mismatch(plan, reference_keep(c, lim.capacity, lim.drop));
    CHECK_MESSAGE(diff.empty(), diff);
    std::vector<rs::id_type> demand(sz(E), 0);
    for (rs::id_type e : c.expert) ++demand[sz(e)];
    CHECK(std::vector<rs::id_type>(plan.expert_demand().begin(), plan.expert_demand().end()) == demand);
    CHECK(plan.num_dropped() == static_cast<rs::index>(c.expert.size()) - plan.num_assignments());
  }
}

TEST_CASE("test_capacity_plan: position drop keeps the earliest tokens, whatever comes later") {
  const rs::candidate_set c =
      make_candidates(2, {{{0, .1f}}, {{0, .9f}, {1, .2f}}, {{0, .8f}}, {{0, .7f}}, {{1, .3f}}});
  const rs::routing_plan plan =
      rs::build_plan(rs::backend::serial{}, c, {.capacity = 2, .drop = rs::drop_policy::position});
  CHECK(kept_tokens(plan) == std::vector<std::vector<rs::id_type>>{{0, 1}, {1, 4}});
  // Appending tokens (to any expert) never changes the fate of earlier ones.
  rs::candidate_set more = c;
  more.num_tokens += 2;
  for (rs::id_type e : {0, 1}) {
    more.expert.push_back(e);
    more.weight.push_back(5.0f);
    more.offsets.push_back(static_cast<rs::id_type>(more.expert.size()));
  }
  const rs::routing_plan longer =
      rs::build_plan(rs::backend::serial{}, more, {.capacity = 2, .drop = rs::drop_policy::position});
  CHECK(kept_tokens(longer) == kept_tokens(plan));
}

TEST_CASE("test_capacity_plan: random drop is seeded, local to (seed, token, expert) and unbiased") {
  // Expert 0 overfull (20 candidates for 5 slots); expert 1 gets tokens 20.. only in the longer batch.
  std::vector<std::vector<std::pair<rs::id_type, float>>> rows;
  for (int t = 0; t < 20; ++t) rows.push_back({{0, 0.05f * static_cast<float>(t)}});
  const rs::candidate_set base = make_candidates(2, rows);
  for (int t = 0; t < 15; ++t) rows.push_back({{1, 1.0f}});
  const rs::candidate_set longer = make_candidates(2, rows);
  rs::candidate_set reweighted = base;  // same (token, expert) pairs, other weights
  std::reverse(reweighted.weight.begin(), reweighted.weight.end());

  std::set<std::vector<rs::id_type>> distinct;
  std::vector<int> times_kept(20, 0);
  const int seeds = 400;
  for (int s = 0; s < seeds; ++s) {
    const rs::capacity_limits lim{
        .capacity = 5, .drop = rs::drop_policy::random, .seed = static_cast<std::uint64_t>(s) * 7919u};
    const rs::routing_plan plan = rs::build_plan(rs::backend::serial{}, base, lim);
    const auto kept = kept_tokens(plan)[0];
    REQUIRE(kept.size() == 5);
    CHECK(rs::build_plan(rs::backend::serial{}, base, lim) == plan);
    CHECK(kept_tokens(rs::build_plan(rs::backend::serial{}, longer, lim))[0] == kept);
    CHECK(kept_tokens(rs::build_plan(rs::backend::serial{}, reweighted, lim))[0] == kept);
    distinct.insert(kept);
    for (rs::id_type t : kept) ++times_kept[sz(t)];
    if (s % 40 == 0) {
      // A fixed priority per (seed, token, expert): a dropped token choosing another expert instead
      // leaves expert 0's kept set unchanged (a priority by position in the list would shift).
      for (rs::id_type u = 0; u < 20; ++u) {
        if (std::binary_search(kept.begin(), kept.end(), u)) continue;
        rs::candidate_set moved = base;
        moved.expert[sz(u)] = 1;
        CHECK(kept_tokens(rs::build_plan(rs::backend::serial{}, moved, lim))[0] == kept);
      }
    }
  }
  // Different seeds differ (C(20, 5) = 15504 possible sets).
  CHECK(distinct.size() > 300);
  // Each token is kept with probability 5/20; 400 draws give sd ~0.022, so +-0.1 is > 4 sd.
  for (int t = 0; t < 20; ++t) {
    CAPTURE(t);
    const double rate = times_kept[sz(t)] / static_cast<double>(seeds);
    CHECK(rate > 0.15);
    CHECK(rate < 0.35);
  }

  // The expert is part of the key: the same 20 tokens on two experts are cut differently.
  std::vector<std::vector<std::pair<rs::id_type, float>>> both;
  for (int t = 0; t < 20; ++t) both.push_back({{0, 1.0f}, {1, 1.0f}});
  int same = 0;
  for (std::uint64_t seed = 0; seed < 20; ++seed) {
    const auto kept = kept_tokens(rs::build_plan(rs::backend::serial{}, make_candidates(2, both),
                                                 {.capacity = 5, .drop = rs::drop_policy::random, .seed = seed}));
    same += kept[0] == kept[1] ? 1 : 0;
  }
  CHECK(same <= 1);
}

TEST_CASE("test_capacity_plan: random drop through the router keeps untouched experts' tokens") {
  // A capacity fixed by min_capacity, so appending tokens does not change C; the appended tokens all
  // choose expert 3, which the first batch never chooses.
  const rs::index T = 40, extra = 24, E = 4;
  std::mt19937_64 rng(11);
  const rt::token_choice p{.top_k = 1};
  std::vector<float> x = resonance_test::tie_free_logits(rng, T + extra, E, p);
  for (rs::index t = 0; t < T + extra; ++t) x[sz(t * E + 3)] = t < T ? -50.0f : 50.0f;
  for (std::uint64_t seed : {1u, 2u, 3u}) {
    const factor_router r{{}, p, {.factor = 1e-3, .drop = rs::drop_policy::random, .min_capacity = 4, .seed = seed}};
    const rs::routing_plan a = r.route(rs::backend::serial{}, view(x, T, E));
    const rs::routing_plan b = r.route(rs::backend::serial{}, view(x, T + extra, E));
    REQUIRE(a.capacity() == 4);
    REQUIRE(b.capacity() == 4);
    CHECK(a.expert_demand()[3] == 0);
    CHECK(b.expert_demand()[3] == extra);
    const auto ka = kept_tokens(a), kb = kept_tokens(b);
    for (rs::index e = 0; e < 3; ++e) CHECK(ka[sz(e)] == kb[sz(e)]);
    CHECK(a.num_dropped() > 0);
  }
}

TEST_CASE("test_capacity_plan: pad_to_capacity gives every expert exactly C slots") {
  const rs::candidate_set c =
      make_candidates(4, {{{0, .5f}, {2, .5f}}, {{0, .6f}}, {{0, .7f}, {1, .1f}}, {{0, .8f}}, {{2, .2f}}});
  const rs::routing_plan plan = rs::build_plan(
      rs::backend::serial{}, c, {.capacity = 3, .drop = rs::drop_policy::score, .pad_to_capacity = true});
  CHECK(std::vector<rs::id_type>(plan.expert_offsets().begin(), plan.expert_offsets().end()) ==
        std::vector<rs::id_type>{0, 3, 6, 9, 12});
  // Expert 0 keeps tokens 1, 2, 3 (top weights); the others are padded after their kept tokens.
  CHECK(std::vector<rs::id_type>(plan.slot_token().begin(), plan.slot_token().end()) ==
        std::vector<rs::id_type>{1, 2, 3, 2, -1, -1, 0, 4, -1, -1, -1, -1});
  CHECK(std::vector<float>(plan.slot_weight().begin(), plan.slot_weight().end()) ==
        std::vector<float>{.6f, .7f, .8f, .1f, 0, 0, .5f, .2f, 0, 0, 0, 0});
  const std::string bad = resonance_test::plan_violation(plan, {.capacity = 3, .pad_to_capacity = true});
  CHECK_MESSAGE(bad.empty(), bad);

  // With alignment on top: C rounded up to a multiple of 4.
  const rs::routing_plan aligned =
      rs::build_plan(rs::backend::serial{}, c, {.capacity = 3, .pad_to_capacity = true, .align = 4});
  CHECK(std::vector<rs::id_type>(aligned.expert_offsets().begin(), aligned.expert_offsets().end()) ==
        std::vector<rs::id_type>{0, 4, 8, 12, 16});
  // Padding is meaningless without a capacity: a dropless limit ignores it.
  const rs::routing_plan unlimited = rs::build_plan(rs::backend::serial{}, c, {.pad_to_capacity = true});
  CHECK(std::vector<rs::id_type>(unlimited.expert_offsets().begin(), unlimited.expert_offsets().end()) ==
        std::vector<rs::id_type>{0, 4, 5, 7, 7});
}

TEST_CASE("test_capacity_plan: align rounds slot counts up, with dropless too") {
  std::mt19937_64 rng(13);
  const rs::index T = 37, E = 8;
  const rt::token_choice p{.top_k = 2};
  const std::vector<float> x = resonance_test::tie_free_logits(rng, T, E, p);
  for (rs::index align : {1, 4, 16}) {
    CAPTURE(align);
    const dropless_router r{{}, p, {.align = align}};
    const rs::routing_plan plan = r.route(rs::backend::serial{}, view(x, T, E));
    const std::string bad = resonance_test::plan_violation(plan, {.align = align, .per_token = 2});
    CHECK_MESSAGE(bad.empty(), bad);
    for (rs::index e = 0; e < E; ++e) {
      const rs::index slots = plan.expert_offsets()[sz(e + 1)] - plan.expert_offsets()[sz(e)];
      CHECK(slots % align == 0);
      CHECK(slots - plan.expert_counts()[sz(e)] < align);
    }
  }
  // Alignment never changes which tokens are kept.
  const factor_router f1{{}, p, {.factor = 0.5, .align = 1}};
  const factor_router f8{{}, p, {.factor = 0.5, .align = 8}};
  CHECK(kept_tokens(f1.route(rs::backend::serial{}, view(x, T, E))) ==
        kept_tokens(f8.route(rs::backend::serial{}, view(x, T, E))));
}

TEST_CASE("test_capacity_plan: capacity 0 drops everything, empty input gives an empty valid plan") {
  const rs::candidate_set c = make_candidates(3, {{{0, 1.0f}}, {{1, 1.0f}, {2, 0.5f}}});
  for (rs::drop_policy drop : {rs::drop_policy::score, rs::drop_policy::position, rs::drop_policy::random}) {
    const rs::routing_plan plan = rs::build_plan(rs::backend::serial{}, c, {.capacity = 0, .drop = drop});
    CHECK(plan.num_assignments() == 0);
    CHECK(plan.num_slots() == 0);
    CHECK(plan.num_dropped() == 3);
    const std::string bad = resonance_test::plan_violation(plan, {.capacity = 0});
    CHECK_MESSAGE(bad.empty(), bad);
  }

  const std::vector<float> none;
  const rs::index E = 5;
  const rs::routing_plan d = dropless_router{{}, {.top_k = 2}, {}}.route(rs::backend::serial{}, view(none, 0, E));
  CHECK(d.num_tokens() == 0);
  CHECK(d.num_experts() == E);
  CHECK(d.num_slots() == 0);
  CHECK(d.num_assignments() == 0);
  std::string bad = resonance_test::plan_violation(d, {});
  CHECK_MESSAGE(bad.empty(), bad);
  const factor_router f{{}, {.top_k = 2}, {.factor = 1.25, .drop = rs::drop_policy::random}};
  bad = resonance_test::plan_violation(f.route(rs::backend::serial{}, view(none, 0, E)), {.capacity = 0});
  CHECK_MESSAGE(bad.empty(), bad);
  // Padding of an empty batch: min_capacity slots of padding per expert.
  const factor_router padded{{}, {.top_k = 2}, {.factor = 1.0, .min_capacity = 2, .pad_to_capacity = true}};
  const rs::routing_plan pp = padded.route(rs::backend::serial{}, view(none, 0, E));
  bad = resonance_test::plan_violation(pp, {.capacity = 2, .pad_to_capacity = true});
  CHECK_MESSAGE(bad.empty(), bad);
  CHECK(pp.num_slots() == 2 * E);
  // build_plan on an empty candidate set.
  rs::candidate_set empty;
  empty.num_experts = 3;
  bad = resonance_test::plan_violation(rs::build_plan(rs::backend::serial{}, empty, {.capacity = 4}), {.capacity = 4});
  CHECK_MESSAGE(bad.empty(), bad);
}

TEST_CASE("test_capacity_plan: build_plan rejects bad candidates and limits, naming the argument") {
  const rs::candidate_set good = make_candidates(4, {{{0, .5f}, {2, .5f}}, {{1, .25f}}, {{3, 1.0f}}});
  const rs::capacity_limits ok{.capacity = 2};
  REQUIRE(error_of([&] { (void)rs::build_plan(rs::backend::serial{}, good, ok); }) == "no throw");

  auto error_with = [&](const rs::candidate_set& c, const rs::capacity_limits& lim) {
    return error_of([&] { (void)rs::build_plan(rs::backend::serial{}, c, lim); });
  };
  auto names = [](const std::string& what, const char* argument) {
    return what.rfind("resonance:", 0) == 0 && what.find(argument) != std::string::npos;
  };

  rs::candidate_set c = good;
  c.offsets.pop_back();  // T + 1 entries expected
  CHECK(names(error_with(c, ok), "candidates.offsets"));
  c = good;
  c.offsets.clear();
  CHECK(names(error_with(c, ok), "candidates.offsets"));
  c = good;
  c.offsets[0] = 1;
  CHECK(names(error_with(c, ok), "candidates.offsets"));
  c = good;
  c.offsets.back() = 3;  // does not cover every candidate
  CHECK(names(error_with(c, ok), "candidates.offsets"));
  c = good;
  c.offsets = {0, 2, 1, 4};  // decreasing in the middle
  CHECK(names(error_with(c, ok), "candidates.offsets"));
  c = make_candidates(2, {{{0, .5f}}, {{1, .5f}}});
  c.offsets = {0, 5, 2};  // an inner offset past the end of the candidates
  CHECK(names(error_with(c, ok), "candidates.offsets"));

  c = good;
  std::swap(c.expert[0], c.expert[1]);  // 2, 0: not ascending within token 0
  CHECK(names(error_with(c, ok), "candidates.expert"));
  c = good;
  c.expert[1] = 0;  // a duplicate within token 0
  CHECK(names(error_with(c, ok), "candidates.expert"));
  c = good;
  c.expert[3] = 4;  // out of range
  CHECK(names(error_with(c, ok), "candidates.expert"));
  c = good;
  c.expert[2] = -1;
  CHECK(names(error_with(c, ok), "candidates.expert"));

  for (float bad_weight : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                           -std::numeric_limits<float>::infinity()}) {
    c = good;
    c.weight[2] = bad_weight;
    CHECK(names(error_with(c, ok), "candidates.weight"));
  }
  c = good;
  c.weight.pop_back();
  CHECK(names(error_with(c, ok), "candidates.weight"));

  c = good;
  c.priority = {1.0f, 2.0f};  // neither empty nor one per candidate
  CHECK(names(error_with(c, ok), "candidates.priority"));
  c = good;
  c.priority = {1.0f, 2.0f, std::numeric_limits<float>::quiet_NaN(), 0.0f};
  CHECK(names(error_with(c, ok), "candidates.priority"));

  c = good;
  c.num_experts = 0;
  CHECK(names(error_with(c, ok), "candidates.num_experts"));
  c = good;
  c.num_tokens = -1;
  CHECK(names(error_with(c, ok), "candidates.num_tokens"));

  CHECK(names(error_with(good, {.capacity = 2, .align = 0}), "align"));
  CHECK(names(error_with(good, {.capacity = 2, .align = -3}), "align"));
  CHECK(names(error_with(good, {.capacity = -2}), "capacity"));
  CHECK(names(error_with(good, {.capacity = 2, .drop = static_cast<rs::drop_policy>(7)}), "drop"));
}

TEST_CASE("test_capacity_plan: capacity policies reject bad parameters") {
  const std::vector<float> x(8, 0.0f);
  auto route_error = [&](const rs::capacity::factor& f) {
    return error_of([&] { (void)factor_router{{}, {.top_k = 1}, f}.route(rs::backend::serial{}, view(x, 2, 4)); });
  };
  CHECK(route_error({.factor = 0.0}).find("capacity factor") != std::string::npos);
  CHECK(route_error({.factor = -1.0}).find("capacity factor") != std::string::npos);
  CHECK(route_error({.factor = std::numeric_limits<double>::quiet_NaN()}).find("capacity factor") != std::string::npos);
  CHECK(route_error({.factor = 1.0, .min_capacity = -1}).find("min_capacity") != std::string::npos);
  CHECK(route_error({.factor = 1.0, .align = 0}).find("align") != std::string::npos);
  const std::string dropless_error = error_of([&] {
    (void)dropless_router{{}, {.top_k = 1}, {.align = 0}}.route(rs::backend::serial{}, view(x, 2, 4));
  });
  CHECK(dropless_error.find("align") != std::string::npos);
}
