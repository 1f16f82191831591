// Token choice against a brute-force restatement of Megatron-Core's topk_routing_with_score_function
// (tests/reference.hpp): the chosen expert set must be identical, weights within 1e-5 relative.

#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/resonance.hpp>

#include "reference.hpp"

namespace {

namespace rs = resonance;
namespace rt = resonance::routing;
using resonance_test::sz;

using dropless_router = rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::dropless>;

rs::routing_plan route(const rt::token_choice& p, const std::vector<float>& x, rs::index T, rs::index E) {
  const dropless_router r{{}, p, {}};
  return r.route(rs::backend::serial{}, rs::matrix_view<const float>{x.data(), T, E});
}

// First disagreement between the plan's token-major CSR and the reference, or "".
std::string reference_mismatch(const rs::routing_plan& plan, const rt::token_choice& p, const std::vector<float>& x,
                               rs::index T, rs::index E) {
  const auto off = plan.token_offsets();
  const auto ex = plan.token_expert();
  const auto w = plan.token_weight();
  for (rs::index t = 0; t < T; ++t) {
    const resonance_test::ref_choice ref = resonance_test::ref_token_choice(p, x.data() + t * E, E);
    const rs::index b = off[sz(t)], n = off[sz(t + 1)] - b;
    std::string where = "token " + std::to_string(t) + ": ";
    if (n != static_cast<rs::index>(ref.expert.size())) return where + "assignment count " + std::to_string(n);
    for (rs::index j = 0; j < n; ++j) {
      // Both lists ascend by expert id, so element-wise equality is set equality plus the CSR order.
      if (ex[sz(b + j)] != ref.expert[sz(j)])
        return where + "expert " + std::to_string(ex[sz(b + j)]) + " vs reference " + std::to_string(ref.expert[sz(j)]);
      if (!resonance_test::close_rel(w[sz(b + j)], ref.weight[sz(j)]))
        return where + "weight " + std::to_string(w[sz(b + j)]) + " vs reference " + std::to_string(ref.weight[sz(j)]);
    }
  }
  return {};
}

// Routes tie-free random logits with `p`, compares with the reference, checks the plan invariants,
// and checks that the same logits given as double produce the same plan.
void check_against_reference(const rt::token_choice& p, rs::index T, rs::index E, std::uint64_t seed,
                             double spread = 3.0) {
  CAPTURE(T);
  CAPTURE(E);
  CAPTURE(p.top_k);
  CAPTURE(static_cast<int>(p.score));
  CAPTURE(p.pre_softmax);
  CAPTURE(p.num_groups);
  CAPTURE(p.group_topk);
  CAPTURE(static_cast<int>(p.group_scoring));
  CAPTURE(p.expert_bias.size);
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const std::vector<float> x = resonance_test::tie_free_logits(rng, T, E, p, spread);
  const rs::routing_plan plan = route(p, x, T, E);
  const std::string bad = resonance_test::plan_violation(plan, {.per_token = p.top_k});
  CHECK_MESSAGE(bad.empty(), bad);
  const std::string diff = reference_mismatch(plan, p, x, T, E);
  CHECK_MESSAGE(diff.empty(), diff);

  const std::vector<double> xd(x.begin(), x.end());
  const dropless_router r{{}, p, {}};
  CHECK(r.route(rs::backend::serial{}, rs::matrix_view<const double>{xd.data(), T, E}) == plan);
}

// A selection-only bias on a grid of its own, one entry per expert.
std::vector<float> random_bias(std::mt19937_64& rng, rs::index E, double scale) {
  std::uniform_int_distribution<int> d(-64, 64);
  std::vector<float> b(sz(E));
  for (float& v : b) v = static_cast<float>(scale * d(rng) / 64.0);
  return b;
}

}  // namespace

TEST_CASE("test_token_choice: softmax after top-k matches the reference") {
  const rs::index shapes[][3] = {{16, 1, 1},   {33, 2, 1},  {40, 2, 2},   {40, 7, 3}, {40, 8, 2},
                                 {24, 16, 16}, {32, 64, 6}, {64, 256, 8}, {20, 7, 7}};
  std::uint64_t seed = 1;
  for (const auto& s : shapes) {
    check_against_reference({.top_k = s[2]}, s[0], s[1], seed++);
    check_against_reference({.top_k = s[2]}, s[0], s[1], seed++, 12.0);  // wide logits: softmax underflow side
  }
}

TEST_CASE("test_token_choice: pre_softmax selects on probabilities and keeps them unnormalised") {
  const rs::index shapes[][3] = {{16, 1, 1}, {40, 7, 3}, {40, 8, 2}, {24, 16, 16}, {64, 256, 8}};
  std::uint64_t seed = 100;
  for (const auto& s : shapes) check_against_reference({.top_k = s[2], .pre_softmax = true}, s[0], s[1], seed++);
  // Explicit renormalisation applies to pre-softmax probabilities as well.
  check_against_reference({.top_k = 3, .pre_softmax = true, .renorm = rt::renormalize::always}, 30, 12, seed++);
}

TEST_CASE("test_token_choice: sigmoid and sqrt_softplus renormalise over k only when k > 1") {
  const rs::index shapes[][3] = {{16, 1, 1}, {30, 5, 1}, {40, 7, 3}, {40, 8, 2}, {24, 16, 16}, {64, 256, 8}};
  std::uint64_t seed = 200;
  for (rs::score fn : {rs::score::sigmoid, rs::score::sqrt_softplus}) {
    for (const auto& s : shapes) {
      for (rt::renormalize rn : {rt::renormalize::automatic, rt::renormalize::always, rt::renormalize::never})
        check_against_reference({.top_k = s[2], .score = fn, .renorm = rn}, s[0], s[1], seed++);
    }
  }
  // identity: raw logits as weights, never renormalised automatically.
  check_against_reference({.top_k = 3, .score = rs::score::identity}, 30, 9, seed++);
}

TEST_CASE("test_token_choice: sqrt_softplus switches to x above 20 like torch's softplus") {
  // Above 20 the score is sqrt(x) (exp(100) would overflow fp32), below sqrt(log1p(exp(x))); k = 1, so
  // the weights are not renormalised.
  const std::vector<float> x = {100.0f, 3.0f, 21.5f, 2.0f, -1.0f, 0.5f};
  const rs::routing_plan plan = route({.top_k = 1, .score = rs::score::sqrt_softplus}, x, 3, 2);
  REQUIRE(plan.num_assignments() == 3);
  CHECK(plan.token_expert()[0] == 0);
  CHECK(resonance_test::close_rel(plan.token_weight()[0], std::sqrt(100.0)));
  CHECK(plan.token_expert()[1] == 0);
  CHECK(resonance_test::close_rel(plan.token_weight()[1], std::sqrt(21.5)));
  CHECK(plan.token_expert()[2] == 1);
  CHECK(resonance_test::close_rel(plan.token_weight()[2], std::sqrt(std::log1p(std::exp(0.5)))));
}

TEST_CASE("test_token_choice: expert_bias changes the selection only, never the weights") {
  std::mt19937_64 rng(300);
  std::uint64_t seed = 310;
  const rs::index shapes[][3] = {{40, 8, 2}, {40, 7, 3}, {32, 64, 6}, {48, 256, 8}};
  for (const auto& s : shapes) {
    for (rs::score fn : {rs::score::softmax, rs::score::sigmoid, rs::score::sqrt_softplus}) {
      for (bool pre : {false, true}) {
        if (pre && fn != rs::score::softmax) continue;
        // A bias comparable to the key spread, so that it really reorders experts.
        const double scale = fn == rs::score::softmax && !pre ? 2.0 : (pre ? 2.0 / static_cast<double>(s[1]) : 0.3);
        const std::vector<float> bias = random_bias(rng, s[1], scale);
        rt::token_choice p{.top_k = s[2], .score = fn, .pre_softmax = pre};
        p.expert_bias = {bias.data(), s[1]};
        check_against_reference(p, s[0], s[1], seed++);
      }
    }
  }
}

TEST_CASE("test_token_choice: group-limited top-k matches the reference") {
  struct group_case {
    rs::index T, E, G, M, k;
  };
  const group_case cases[] = {{32, 64, 8, 4, 8}, {32, 256, 8, 4, 8}, {40, 12, 3, 2, 3}, {40, 8, 8, 3, 3},
                              {40, 16, 4, 1, 4}, {40, 16, 4, 4, 16}, {40, 20, 5, 2, 4}};
  std::mt19937_64 rng(400);
  std::uint64_t seed = 410;
  for (const group_case& c : cases) {
    for (rt::group_score gs : {rt::group_score::top_m_sum, rt::group_score::top2_sum, rt::group_score::max}) {
      for (rs::score fn : {rs::score::softmax, rs::score::sigmoid}) {
        rt::token_choice p{.top_k = c.k, .score = fn, .num_groups = c.G, .group_topk = c.M, .group_scoring = gs};
        check_against_reference(p, c.T, c.E, seed++);
        // DeepSeek-V3 style: sigmoid scores, selection bias, groups scored on the biased keys.
        const std::vector<float> bias = random_bias(rng, c.E, fn == rs::score::softmax ? 1.0 : 0.2);
        p.expert_bias = {bias.data(), c.E};
        check_against_reference(p, c.T, c.E, seed++);
      }
      rt::token_choice pre{
          .top_k = c.k, .pre_softmax = true, .num_groups = c.G, .group_topk = c.M, .group_scoring = gs};
      check_against_reference(pre, c.T, c.E, seed++);
    }
  }
}

TEST_CASE("test_token_choice: temperature and scaling_factor") {
  std::uint64_t seed = 500;
  for (float temperature : {0.5f, 0.7f, 2.0f}) {
    for (float scaling : {1.0f, 2.5f}) {
      check_against_reference({.top_k = 2, .temperature = temperature, .scaling_factor = scaling}, 30, 8, seed++);
      check_against_reference({.top_k = 2, .pre_softmax = true, .temperature = temperature, .scaling_factor = scaling},
                              30, 8, seed++);
      check_against_reference(
          {.top_k = 3, .score = rs::score::sigmoid, .temperature = temperature, .scaling_factor = scaling}, 30, 9,
          seed++);
      check_against_reference(
          {.top_k = 1, .score = rs::score::sqrt_softplus, .temperature = temperature, .scaling_factor = scaling}, 30, 9,
          seed++);
      check_against_reference({.top_k = 8,
                               .score = rs::score::sigmoid,
                               .temperature = temperature,
                               .scaling_factor = scaling,
                               .num_groups = 8,
                               .group_topk = 4,
                               .group_scoring = rt::group_score::top2_sum},
                              16, 64, seed++);
    }
  }
}

TEST_CASE("test_token_choice: random option combinations match the reference") {
  std::mt19937_64 rng(600);
  const rs::index widths[] = {1, 2, 3, 5, 7, 8, 12, 16, 24, 64};
  auto pick = [&](rs::index lo, rs::index hi) { return std::uniform_int_distribution<rs::index>(lo, hi)(rng); };
  for (int n = 0; n < 150; ++n) {
    const rs::index E = widths[sz(pick(0, 9))];
    const rs::index T = pick(1, 24);
    rt::token_choice p{.top_k = pick(1, E)};
    const rs::score fns[] = {rs::score::softmax, rs::score::softmax, rs::score::sigmoid, rs::score::sqrt_softplus};
    p.score = fns[sz(pick(0, 3))];
    p.pre_softmax = p.score == rs::score::softmax && pick(0, 1) == 1;
    p.renorm = static_cast<rt::renormalize>(pick(0, 2));
    const float temperatures[] = {1.0f, 1.0f, 0.6f, 1.7f};
    p.temperature = temperatures[sz(pick(0, 3))];
    p.scaling_factor = pick(0, 1) == 1 ? 1.0f : 2.5f;
    // A divisor G > 1 of E and a group count M that admit k.
    std::vector<rs::index> divisors;
    for (rs::index g = 2; g <= E; ++g)
      if (E % g == 0) divisors.push_back(g);
    if (!divisors.empty() && pick(0, 1) == 1) {
      const rs::index G = divisors[sz(pick(0, static_cast<rs::index>(divisors.size()) - 1))];
      const rs::index M = pick(1, G);
      const rs::index k = pick(1, M * (E / G));
      p.num_groups = G;
      p.group_topk = M;
      p.top_k = k;
      p.group_scoring = static_cast<rt::group_score>(pick(0, 2));
      if (p.group_scoring == rt::group_score::top_m_sum && k < M) p.group_scoring = rt::group_score::max;
    }
    std::vector<float> bias;
    if (pick(0, 2) == 0) {
      const bool post = p.score == rs::score::softmax && !p.pre_softmax;
      bias = random_bias(rng, E, post ? 1.0 : (p.pre_softmax ? 1.0 / static_cast<double>(E) : 0.2));
      p.expert_bias = {bias.data(), E};
    }
    check_against_reference(p, T, E, 1000 + static_cast<std::uint64_t>(n));
  }
}

TEST_CASE("test_token_choice: equal keys go to the lowest expert index") {
  // Row 0: all equal; row 1: a three-way tie for the top; row 2: a tie straddling the k-th place.
  const std::vector<float> x = {0.5f, 0.5f, 0.5f, 0.5f, 0.5f,  //
                                1.0f, 2.0f, 2.0f, 0.0f, 2.0f,  //
                                3.0f, 1.0f, 0.0f, 1.0f, 1.0f};
  for (rs::score fn : {rs::score::softmax, rs::score::sigmoid, rs::score::sqrt_softplus}) {
    for (bool pre : {false, true}) {
      if (pre && fn != rs::score::softmax) continue;
      CAPTURE(static_cast<int>(fn));
      CAPTURE(pre);
      const rs::routing_plan k2 = route({.top_k = 2, .score = fn, .pre_softmax = pre}, x, 3, 5);
      CHECK(std::vector<rs::id_type>(k2.token_expert().begin(), k2.token_expert().end()) ==
            std::vector<rs::id_type>{0, 1, 1, 2, 0, 1});
      const rs::routing_plan k3 = route({.top_k = 3, .score = fn, .pre_softmax = pre}, x, 3, 5);
      CHECK(std::vector<rs::id_type>(k3.token_expert().begin(), k3.token_expert().end()) ==
            std::vector<rs::id_type>{0, 1, 2, 1, 2, 4, 0, 1, 3});
    }
  }
  // Softmax after top-k over equal logits: uniform weights.
  const rs::routing_plan plan = route({.top_k = 4}, x, 3, 5);
  for (rs::index i = 0; i < 4; ++i) CHECK(resonance_test::close_rel(plan.token_weight()[sz(i)], 0.25));
}

TEST_CASE("test_token_choice: a bias-made tie goes to the lowest index, weights stay unbiased") {
  // Softmax after top-k ranks logits + bias: keys 0 + 1 and 1 + 0 tie, expert 0 wins.
  const std::vector<float> x = {0.0f, 1.0f};
  const std::vector<float> bias = {1.0f, 0.0f};
  rt::token_choice p{.top_k = 1};
  p.expert_bias = {bias.data(), 2};
  const rs::routing_plan tie = route(p, x, 1, 2);
  REQUIRE(tie.num_assignments() == 1);
  CHECK(tie.token_expert()[0] == 0);
  CHECK(resonance_test::close_rel(tie.token_weight()[0], 1.0));

  // Sigmoid, k = 1: the bias selects expert 0, whose weight is sigmoid(0), not sigmoid(0) + bias.
  const std::vector<float> bias_s = {0.5f, 0.0f};
  rt::token_choice q{.top_k = 1, .score = rs::score::sigmoid};
  q.expert_bias = {bias_s.data(), 2};
  const rs::routing_plan sig = route(q, x, 1, 2);
  REQUIRE(sig.num_assignments() == 1);
  CHECK(sig.token_expert()[0] == 0);
  CHECK(resonance_test::close_rel(sig.token_weight()[0], 0.5));

  // Softmax after top-k, k = 2, a bias that reorders: weights are the softmax of the raw logits.
  const std::vector<float> x3 = {0.0f, 1.0f, 2.0f};
  const std::vector<float> bias3 = {3.0f, 0.0f, 0.0f};  // keys 3, 1, 2 -> experts {0, 2}
  rt::token_choice r{.top_k = 2};
  r.expert_bias = {bias3.data(), 3};
  const rs::routing_plan two = route(r, x3, 1, 3);
  REQUIRE(two.num_assignments() == 2);
  CHECK(two.token_expert()[0] == 0);
  CHECK(two.token_expert()[1] == 2);
  CHECK(resonance_test::close_rel(two.token_weight()[0], 1.0 / (1.0 + std::exp(2.0))));
  CHECK(resonance_test::close_rel(two.token_weight()[1], 1.0 / (1.0 + std::exp(-2.0))));
}

TEST_CASE("test_token_choice: equal group scores keep the lowest group") {
  // E = 8 in 4 groups of 2; group maxima 1, 1, 1, 0.5: groups 0 and 1 are kept, so the top-2 is
  // {0, 3}; keeping group 2 instead of group 1 would give {0, 4}.
  const std::vector<float> x = {1.0f, 0.0f, 0.0f, 1.0f, 1.0f, 0.0f, 0.5f, 0.5f};
  for (rt::group_score gs : {rt::group_score::top_m_sum, rt::group_score::max}) {
    CAPTURE(static_cast<int>(gs));
    const rs::routing_plan plan = route({.top_k = 2, .num_groups = 4, .group_topk = 2, .group_scoring = gs}, x, 1, 8);
    CHECK(std::vector<rs::id_type>(plan.token_expert().begin(), plan.token_expert().end()) ==
          std::vector<rs::id_type>{0, 3});
  }
  // top2_sum: group sums 1, 1, 1, 1: groups 0 and 1 again.
  const rs::routing_plan plan =
      route({.top_k = 2, .num_groups = 4, .group_topk = 2, .group_scoring = rt::group_score::top2_sum}, x, 1, 8);
  CHECK(std::vector<rs::id_type>(plan.token_expert().begin(), plan.token_expert().end()) ==
        std::vector<rs::id_type>{0, 3});
  // Expert ties across kept groups go to the lowest expert id even when the higher group scored
  // better: groups 1 (max 3) and 0 (max 2) are kept, experts 0 and 2 tie at 2 for the second place.
  const std::vector<float> z = {2.0f, 0.0f, 2.0f, 3.0f, -1.0f, -1.0f};
  for (rt::group_score gs : {rt::group_score::top_m_sum, rt::group_score::max}) {
    CAPTURE(static_cast<int>(gs));
    const rs::routing_plan across = route({.top_k = 2, .num_groups = 3, .group_topk = 2, .group_scoring = gs}, z, 1, 6);
    CHECK(std::vector<rs::id_type>(across.token_expert().begin(), across.token_expert().end()) ==
          std::vector<rs::id_type>{0, 3});
  }
  // top_m_sum with m = 2 ranks by the sum, not the max: groups {3, 3} beat {4, 0}.
  const std::vector<float> y = {4.0f, 0.0f, 3.0f, 3.0f, 1.0f, 1.0f, 0.0f, 0.0f};
  const rs::routing_plan by_sum = route({.top_k = 2, .num_groups = 4, .group_topk = 1}, y, 1, 8);
  CHECK(std::vector<rs::id_type>(by_sum.token_expert().begin(), by_sum.token_expert().end()) ==
        std::vector<rs::id_type>{2, 3});
  const rs::routing_plan by_max =
      route({.top_k = 2, .num_groups = 4, .group_topk = 1, .group_scoring = rt::group_score::max}, y, 1, 8);
  CHECK(std::vector<rs::id_type>(by_max.token_expert().begin(), by_max.token_expert().end()) ==
        std::vector<rs::id_type>{0, 1});
}

TEST_CASE("test_token_choice: double input gives the plan of its float conversion") {
  std::mt19937_64 rng(700);
  std::normal_distribution<double> normal(0.0, 2.0);
  const rs::index T = 50, E = 16;
  std::vector<double> xd(sz(T * E));
  for (double& v : xd) v = normal(rng);  // not representable in float: the conversion rounds
  const std::vector<float> xf(xd.begin(), xd.end());
  for (const rt::token_choice& p :
       {rt::token_choice{.top_k = 2}, rt::token_choice{.top_k = 3, .score = rs::score::sigmoid},
        rt::token_choice{.top_k = 4, .pre_softmax = true, .num_groups = 4, .group_topk = 2}}) {
    const dropless_router r{{}, p, {}};
    CHECK(r.route(rs::matrix_view<const double>{xd.data(), T, E}) ==
          r.route(rs::matrix_view<const float>{xf.data(), T, E}));
  }
}

TEST_CASE("test_token_choice: a strided view routes like the compact matrix") {
  const rs::index T = 20, E = 6, stride = 9;
  std::mt19937_64 rng(800);
  const rt::token_choice p{.top_k = 2};
  const std::vector<float> x = resonance_test::tie_free_logits(rng, T, E, p);
  std::vector<float> padded(sz(T * stride), 1e30f);  // the gap columns would win every top-k if read
  for (rs::index t = 0; t < T; ++t)
    for (rs::index e = 0; e < E; ++e) padded[sz(t * stride + e)] = x[sz(t * E + e)];
  const dropless_router r{{}, p, {}};
  CHECK(r.route(rs::matrix_view<const float>{padded.data(), T, E, stride}) == route(p, x, T, E));
}

TEST_CASE("test_token_choice: repeated routing is bitwise deterministic") {
  std::mt19937_64 rng(900);
  const rt::token_choice p{.top_k = 8, .score = rs::score::sigmoid, .num_groups = 8, .group_topk = 4};
  const std::vector<float> x = resonance_test::tie_free_logits(rng, 64, 64, p);
  CHECK(route(p, x, 64, 64) == route(p, x, 64, 64));
}
