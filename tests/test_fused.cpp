// The router's fused path (router.hpp: logits computed and selected one token block at a time, never
// as a T×E matrix) against the explicit two-step route: affinity.forward into a T×E buffer, then
// router<precomputed, same direction, same capacity> on the serial backend. Plans must agree bit for
// bit on every backend and thread count, across block boundaries, and errors must be the same message
// naming the same lowest offending token.

#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/affinity/linear.hpp>
#include <resonance/resonance.hpp>

#include "backends.hpp"
#include "error_of.hpp"
#include "random_inputs.hpp"

namespace {

namespace rs = resonance;
namespace ra = resonance::affinity;
namespace rt = resonance::routing;
namespace cap = resonance::capacity;
using resonance_test::error_of;
using resonance_test::usz;

constexpr rs::index E = 16;
constexpr rs::index d = 64;
constexpr rs::index B = rs::router<ra::grap, rt::token_choice, cap::dropless>::fused_block_tokens;

// Which configurations take the fused path: hidden-state affinities with token choice and a capacity
// that does not read the logits; never precomputed logits, adaptive or lower_bound (which read them),
// nor a direction without a row-block selection.
template <class A, class D, class C>
constexpr bool fuses = rs::router<A, D, C>::template fuses_on<rs::backend::serial>;
static_assert(fuses<ra::grap, rt::token_choice, cap::dropless>);
static_assert(fuses<ra::grap_cosine, rt::token_choice, cap::factor>);
static_assert(fuses<ra::cosine, rt::token_choice, cap::schedule>);
static_assert(fuses<ra::linear, rt::token_choice, cap::factor>);
static_assert(!fuses<ra::precomputed, rt::token_choice, cap::factor>);
static_assert(!fuses<ra::grap_cosine, rt::token_choice, cap::adaptive>);
static_assert(!fuses<ra::grap_cosine, rt::token_choice, cap::lower_bound>);
static_assert(!fuses<ra::grap_cosine, rt::bidirectional, cap::factor>);
static_assert(!fuses<ra::grap_cosine, rt::expert_choice, cap::factor>);
#if RESONANCE_HAS_TBB
static_assert(rs::router<ra::linear, rt::token_choice, cap::dropless>::fuses_on<rs::backend::tbb<>>);
#endif

using resonance_test::for_each_backend;
using resonance_test::plan_difference;

// The gate weights of cosine and linear (E×d, normal) and linear's bias, alive for the whole run.
struct gates {
  std::vector<float> weight, bias;
  explicit gates(std::mt19937_64& rng)
      : weight(resonance_test::normal_values(rng, E * d)), bias(resonance_test::normal_values(rng, E, 0.5)) {}
  rs::matrix_view<const float> w() const { return {weight.data(), E, d}; }
  rs::vector_view<const float> b() const { return {bias.data(), E}; }
};

struct named_direction {
  std::string name;
  rt::token_choice policy;
};

std::vector<named_direction> directions(const std::vector<float>& bias) {
  const rs::vector_view<const float> b{bias.data(), E};
  return {
      {"softmax k=1", {.top_k = 1}},
      {"softmax k=2", {.top_k = 2}},
      {"softmax k=8", {.top_k = 8}},
      {"pre_softmax k=2", {.top_k = 2, .pre_softmax = true}},
      {"sigmoid k=2 with bias", {.top_k = 2, .score = rs::score::sigmoid, .expert_bias = b}},
      {"grouped k=4 of 4 groups, 2 kept", {.top_k = 4, .num_groups = 4, .group_topk = 2}},
  };
}

// Hidden states: normal rows of `cols` columns stored with `stride` columns.
std::vector<float> hidden(std::mt19937_64& rng, rs::index T, rs::index stride) {
  return resonance_test::strided_normal<float>(rng, T, d, stride);
}

// The explicit two-step route's logits: affinity.forward into a T×E buffer on serial.
template <class Affinity>
std::vector<float> explicit_logits(const Affinity& a, rs::matrix_view<const float> x) {
  std::vector<float> l(usz(x.rows * E));
  a.forward(rs::backend::serial{}, x, rs::matrix_view<float>{l.data(), x.rows, E});
  return l;
}

// Routes x with router<Affinity, token_choice, Capacity> on every backend (a stateful capacity starts
// from a fresh state every time) and compares each plan with the two-step route's on serial.
template <class Affinity, class Capacity>
void check_against_two_step(const std::string& what, const Affinity& a, const rt::token_choice& dir,
                            const Capacity& capacity, rs::matrix_view<const float> x) {
  const std::vector<float> l = explicit_logits(a, x);
  const rs::matrix_view<const float> lv{l.data(), x.rows, E};
  // Declared cosines: adaptive and lower_bound run here only for cosine-valued affinities at temperature
  // 1 (check_affinity), and the flag changes nothing for the other capacities.
  const rs::router<ra::precomputed, rt::token_choice, Capacity> reference{{.cosines = true}, dir, capacity};
  const rs::router<Affinity, rt::token_choice, Capacity> r{a, dir, capacity};
  const auto route = [](const auto& router, const auto& be, rs::matrix_view<const float> in) {
    if constexpr (rs::stateful_capacity_policy<Capacity>) {
      rs::capacity_state_t<Capacity> state{};
      return router.route(be, in, state);
    } else {
      return router.route(be, in);
    }
  };
  const rs::routing_plan want = route(reference, rs::backend::serial{}, lv);
  for_each_backend([&](const auto& be, const std::string& name) {
    const std::string diff = plan_difference(want, route(r, be, x));
    CHECK_MESSAGE(diff.empty(), what << " on " << name << ": " << diff << " differs from the two-step route's");
  });
  if (x.rows > 0) CHECK_MESSAGE(want.num_assignments() > 0, what << ": the reference plan keeps nothing");
}

// Every direction × capacity for one affinity, at token counts around and across the block size.
// adaptive and lower_bound (which take the unfused path) only for cosine-valued affinities at
// temperature 1, whose logits the precomputed reference can declare as cosines.
template <class Affinity>
void check_affinity(const std::string& name, const Affinity& a, bool cosine_valued, std::mt19937_64& rng) {
  const std::vector<float> bias = resonance_test::normal_values(rng, E, 0.3);
  for (rs::index T : {rs::index{0}, rs::index{1}, B - 1, B, B + 1, 3 * B + 17}) {
    const rs::index stride = T % 2 == 0 ? d : d + 3;  // strided rows on odd T
    const std::vector<float> xs = hidden(rng, T, stride);
    const rs::matrix_view<const float> x{xs.data(), T, d, stride};
    for (const named_direction& dir : directions(bias)) {
      const std::string what = name + ", " + dir.name + ", T=" + std::to_string(T);
      check_against_two_step(what + ", dropless", a, dir.policy, cap::dropless{}, x);
      check_against_two_step(what + ", factor 1.25", a, dir.policy, cap::factor{.factor = 1.25}, x);
      check_against_two_step(what + ", factor 0.5 position drop", a, dir.policy,
                             cap::factor{.factor = 0.5, .drop = rs::drop_policy::position}, x);
      check_against_two_step(what + ", schedule", a, dir.policy, cap::schedule{.start = 0.75, .end = 0.5}, x);
      if (!cosine_valued) continue;
      // The unfused path (these read the logits); hidden_size set so the precomputed reference uses d.
      check_against_two_step(what + ", adaptive", a, dir.policy, cap::adaptive{.hidden_size = d}, x);
      check_against_two_step(what + ", lower_bound", a, dir.policy, cap::lower_bound{.hidden_size = d}, x);
    }
  }
}

TEST_CASE("test_fused: fused routing equals the two-step route for grap") {
  std::mt19937_64 rng(101);
  check_affinity("grap", ra::grap{.num_experts = E}, false, rng);
}

TEST_CASE("test_fused: fused routing equals the two-step route for grap_cosine") {
  std::mt19937_64 rng(102);
  check_affinity("grap_cosine", ra::grap_cosine{.num_experts = E}, true, rng);
}

TEST_CASE("test_fused: fused routing equals the two-step route for cosine") {
  std::mt19937_64 rng(103);
  const gates g(rng);
  check_affinity("cosine", ra::cosine{.weight = g.w()}, true, rng);
  check_affinity("cosine at temperature 0.5", ra::cosine{.weight = g.w(), .temperature = 0.5f}, false, rng);
}

TEST_CASE("test_fused: fused routing equals the two-step route for linear") {
  std::mt19937_64 rng(104);
  const gates g(rng);
  check_affinity("linear", ra::linear{.weight = g.w(), .bias = g.b()}, false, rng);
  check_affinity("linear without bias", ra::linear{.weight = g.w()}, false, rng);
}

TEST_CASE("test_fused: double hidden states take the fused path and equal the two-step route") {
  std::mt19937_64 rng(105);
  const rs::index T = 2 * B + 5;
  const std::vector<double> xs = resonance_test::normal_values<double>(rng, T * d);
  const rs::matrix_view<const double> x{xs.data(), T, d};
  const ra::grap_cosine a{.num_experts = E};
  std::vector<double> l(usz(T * E));
  a.forward(rs::backend::serial{}, x, rs::matrix_view<double>{l.data(), T, E});
  const rt::token_choice dir{.top_k = 2};
  const rs::routing_plan want = rs::router<ra::precomputed, rt::token_choice, cap::factor>{
      {}, dir, {.factor = 1.0}}.route(rs::backend::serial{}, rs::matrix_view<const double>{l.data(), T, E});
  const rs::router<ra::grap_cosine, rt::token_choice, cap::factor> r{a, dir, {.factor = 1.0}};
  for_each_backend([&](const auto& be, const std::string& name) {
    const std::string diff = plan_difference(want, r.route(be, x));
    CHECK_MESSAGE(diff.empty(), "grap_cosine, double input, on " << name << ": " << diff);
  });
}

// ---------------------------------------------------------------------------------------------------
// Errors

// The fused route's error on every backend equals the two-step route's (on serial), and names token
// `want_token`: the message is "<what> ... row <t>, column ..." for logits, "... for token <t>" for weights.
template <class Affinity>
void check_same_error(const std::string& what, const Affinity& a, const rt::token_choice& dir,
                      rs::matrix_view<const float> x, const std::string& want_fragment) {
  const std::vector<float> l = explicit_logits(a, x);
  const rs::router<ra::precomputed, rt::token_choice, cap::factor> reference{{}, dir, {.factor = 1.25}};
  const std::string want = error_of([&] { (void)reference.route(rs::matrix_view<const float>{l.data(), x.rows, E}); });
  REQUIRE_MESSAGE(want.find(want_fragment) != std::string::npos, what << ": the two-step route says '" << want << "'");
  const rs::router<Affinity, rt::token_choice, cap::factor> r{a, dir, {.factor = 1.25}};
  for_each_backend([&](const auto& be, const std::string& name) {
    CHECK_MESSAGE(error_of([&] { (void)r.route(be, x); }) == want, what << " on " << name);
  });
}

TEST_CASE("test_fused: a NaN in the input gives the two-step route's logits error for the lowest bad token") {
  std::mt19937_64 rng(106);
  const gates g(rng);
  const rs::index T = 4 * B + 9;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  // Bad tokens in two different blocks (and a second one later in the lower block), the lower first
  // or last in its block.
  for (const auto& [lo, hi] : {std::pair<rs::index, rs::index>{B + 7, 3 * B + 2}, {2 * B - 1, 4 * B + 3}, {0, B}}) {
    std::vector<float> xs = hidden(rng, T, d);
    xs[usz(hi * d + 5)] = nan;
    xs[usz(lo * d + 40)] = nan;
    if (lo + 3 < T) xs[usz((lo + 3) * d)] = inf;
    const rs::matrix_view<const float> x{xs.data(), T, d};
    const std::string fragment = "row " + std::to_string(lo) + ",";
    const std::string at = " (bad tokens " + std::to_string(lo) + " and " + std::to_string(hi) + ")";
    for (const named_direction& dir : directions(g.bias)) {
      check_same_error("grap, " + dir.name + at, ra::grap{.num_experts = E}, dir.policy, x, fragment);
      check_same_error("grap_cosine, " + dir.name + at, ra::grap_cosine{.num_experts = E}, dir.policy, x, fragment);
      check_same_error("cosine, " + dir.name + at, ra::cosine{.weight = g.w()}, dir.policy, x, fragment);
      check_same_error("linear, " + dir.name + at, ra::linear{.weight = g.w(), .bias = g.b()}, dir.policy, x, fragment);
    }
  }
}

TEST_CASE("test_fused: finite logits whose weights overflow give the two-step route's routing weight error") {
  std::mt19937_64 rng(107);
  const gates g(rng);
  const rs::index T = 3 * B + 1;
  // Tokens scaled to ~1e30 give finite GrAP and linear logits that overflow once divided by 1e-10, or
  // once an identity weight is multiplied by 1e10.
  for (const auto& [lo, hi] : {std::pair<rs::index, rs::index>{B + 2, 2 * B + 9}, {3 * B, 3 * B}}) {
    std::vector<float> xs = hidden(rng, T, d);
    for (rs::index t : {lo, hi})
      for (rs::index c = 0; c < d; ++c) xs[usz(t * d + c)] = 1e30f * (1.0f + static_cast<float>(c % 3));
    const rs::matrix_view<const float> x{xs.data(), T, d};
    const std::string fragment = "for token " + std::to_string(lo);
    for (const rt::token_choice& dir :
         {rt::token_choice{.top_k = 2, .temperature = 1e-10f}, rt::token_choice{.top_k = 1, .temperature = 1e-10f},
          rt::token_choice{.top_k = 1, .score = rs::score::identity, .scaling_factor = 1e10f}}) {
      const std::string what = "token " + std::to_string(lo) + ", k=" + std::to_string(dir.top_k);
      check_same_error("grap, " + what, ra::grap{.num_experts = E}, dir, x, fragment);
      check_same_error("linear, " + what, ra::linear{.weight = g.w()}, dir, x, fragment);
    }
  }
}

}  // namespace
