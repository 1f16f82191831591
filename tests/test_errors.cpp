// Every error path of the public API: the call throws resonance::error (a std::invalid_argument) whose
// message names the offending argument, and writes nothing to its outputs (buffers pre-filled with a
// sentinel are unchanged; a plan being assigned keeps its old value).

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/affinity/linear.hpp>
#include <resonance/resonance.hpp>

#include "error_of.hpp"
#include "random_inputs.hpp"

namespace {

namespace rs = resonance;
namespace rt = resonance::routing;
using resonance_test::error_of;
using resonance_test::usz;

static_assert(std::is_base_of_v<std::invalid_argument, rs::error>);

bool names_all(const std::string& msg, std::initializer_list<std::string_view> needles) {
  if (msg.rfind("resonance: ", 0) != 0) return false;
  for (std::string_view n : needles)
    if (msg.find(n) == std::string::npos) return false;
  return true;
}

// CHECK_RS_ERROR(statement, "needle", ...): the statement throws resonance::error naming every needle.
#define CHECK_RS_ERROR(stmt, ...)                                \
  do {                                                           \
    const std::string rs_msg_ = error_of([&] { (void)(stmt); }); \
    INFO(rs_msg_);                                               \
    CHECK(names_all(rs_msg_, {__VA_ARGS__}));                    \
  } while (0)

constexpr float nan_f = std::numeric_limits<float>::quiet_NaN();
constexpr float inf_f = std::numeric_limits<float>::infinity();

template <class Capacity = rs::capacity::dropless>
using tc_router = rs::router<rs::affinity::precomputed, rt::token_choice, Capacity>;

// A small valid batch: T = 6 tokens, E = 8 experts.
struct batch {
  static constexpr rs::index T = 6, E = 8;
  std::vector<float> logits;
  batch() {
    std::mt19937_64 rng(61);
    logits = resonance_test::normal_values(rng, T * E);
  }
  rs::matrix_view<const float> view() const { return {logits.data(), T, E}; }
};

// Routes `view` with the direction and capacity into a plan that already holds a valid result: when
// the call throws, the plan must be unchanged.
template <class Capacity = rs::capacity::dropless, class T = float>
void route_into(const rt::token_choice& dir, const Capacity& cap, rs::matrix_view<const T> view) {
  const batch b;
  rs::routing_plan plan = tc_router<>{{}, {.top_k = 2}, {}}.route(b.view());
  const rs::routing_plan before = plan;
  const tc_router<Capacity> r{{}, dir, cap};
  struct restore_check {
    const rs::routing_plan& now;
    const rs::routing_plan& then;
    ~restore_check() { CHECK(now == then); }
  } guard{plan, before};
  plan = r.route(view);
}

void route_tc(const rt::token_choice& dir, const batch& b = batch{}) {
  route_into(dir, rs::capacity::dropless{}, b.view());
}

TEST_CASE("test_errors: resonance::error is a std::invalid_argument") {
  const std::string msg = error_of([] { rs::to_block_aligned(rs::plan_view{}, 0); });
  CHECK(names_all(msg, {"block"}));
  bool caught = false;
  try {
    rs::to_block_aligned(rs::plan_view{}, 0);
  } catch (const std::invalid_argument& e) {
    caught = std::string(e.what()) == msg;
  }
  CHECK(caught);
}

TEST_CASE("test_errors: token_choice top_k and groups") {
  CHECK_RS_ERROR(route_tc({.top_k = 0}), "top_k");
  CHECK_RS_ERROR(route_tc({.top_k = -1}), "top_k");
  CHECK_RS_ERROR(route_tc({.top_k = 9}), "top_k", "8");
  // E = 8 is not divisible by 3 groups.
  CHECK_RS_ERROR(route_tc({.top_k = 2, .num_groups = 3, .group_topk = 1}), "num_groups");
  CHECK_RS_ERROR(route_tc({.top_k = 2, .num_groups = -2}), "num_groups");
  CHECK_RS_ERROR(route_tc({.top_k = 2, .num_groups = 4, .group_topk = 0}), "group_topk");
  CHECK_RS_ERROR(route_tc({.top_k = 2, .num_groups = 4, .group_topk = 5}), "group_topk");
  // group_topk without groups would be silently ignored; a single group may keep its one group.
  CHECK_RS_ERROR(route_tc({.top_k = 1, .num_groups = 0, .group_topk = 2}), "group_topk");
  CHECK_RS_ERROR(route_tc({.top_k = 1, .num_groups = 0, .group_topk = -1}), "group_topk");
  CHECK_RS_ERROR(route_tc({.top_k = 1, .num_groups = 1, .group_topk = 2}), "group_topk");
  CHECK(tc_router<>{{}, {.top_k = 2, .num_groups = 1, .group_topk = 1}, {}}.route(batch{}.view()) ==
        tc_router<>{{}, {.top_k = 2}, {}}.route(batch{}.view()));
  // 4 groups of 2 experts, 1 group kept: at most 2 experts reachable.
  CHECK_RS_ERROR(route_tc({.top_k = 3, .num_groups = 4, .group_topk = 1}), "top_k");
  // top_m_sum scores a group by its top top_k / group_topk experts: group_topk > top_k leaves m = 0.
  CHECK_RS_ERROR(route_tc({.top_k = 2, .num_groups = 4, .group_topk = 3}), "group_topk");
  CHECK_RS_ERROR(
      route_tc({.top_k = 2, .num_groups = 4, .group_topk = 2, .group_scoring = static_cast<rt::group_score>(7)}),
      "group_scoring");
}

TEST_CASE("test_errors: token_choice score options") {
  CHECK_RS_ERROR(route_tc({.score = rs::score::sigmoid, .pre_softmax = true}), "pre_softmax");
  CHECK_RS_ERROR(route_tc({.score = static_cast<rs::score>(9)}), "score");
  // 1e-45 and 2e-39 are positive and finite, but their reciprocals overflow fp32.
  for (float t : {0.0f, -1.0f, nan_f, inf_f, -inf_f, 1e-45f, 2e-39f}) {
    CAPTURE(t);
    CHECK_RS_ERROR(route_tc({.temperature = t}), "temperature", "reciprocal");
  }
  const std::vector<float> small(batch::T * batch::E, 1e-3f);  // 1e-3 / 3e-39 stays finite
  CHECK(tc_router<>{{}, {.top_k = 2, .temperature = 3e-39f}, {}}
            .route(rs::matrix_view<const float>{small.data(), batch::T, batch::E})
            .num_assignments() == 12);
  for (float s : {0.0f, -2.0f, nan_f, inf_f}) {
    CAPTURE(s);
    CHECK_RS_ERROR(route_tc({.scaling_factor = s}), "scaling_factor");
  }
  for (float eps : {-1e-6f, nan_f, inf_f}) {
    CAPTURE(eps);
    CHECK_RS_ERROR(route_tc({.renorm_epsilon = eps}), "renorm_epsilon");
  }
}

TEST_CASE("test_errors: expert_bias") {
  const std::vector<float> short_bias(7, 0.0f), long_bias(9, 0.0f);
  CHECK_RS_ERROR(route_tc({.expert_bias = {short_bias.data(), 7}}), "expert_bias", "8");
  CHECK_RS_ERROR(route_tc({.expert_bias = {long_bias.data(), 9}}), "expert_bias");
  CHECK_RS_ERROR(route_tc({.expert_bias = {nullptr, 8}}), "expert_bias");
  CHECK_RS_ERROR(route_tc({.expert_bias = {short_bias.data(), -3}}), "expert_bias");
  for (float bad : {nan_f, inf_f, -inf_f}) {
    std::vector<float> bias(8, 0.5f);
    bias[5] = bad;
    CHECK_RS_ERROR(route_tc({.expert_bias = {bias.data(), 8}}), "expert_bias", "expert_bias[5]");
  }
}

TEST_CASE("test_errors: non-finite logits name the row and column") {
  for (float bad : {nan_f, inf_f, -inf_f}) {
    batch b;
    b.logits[2 * batch::E + 3] = bad;
    CAPTURE(bad);
    CHECK_RS_ERROR(route_tc({.top_k = 2}, b), "logits", "row 2", "column 3");
    std::vector<float> storage;
    CHECK_RS_ERROR(tc_router<>{}.logits(rs::backend::serial{}, b.view(), storage), "logits", "row 2", "column 3");
  }
  // A double that overflows fp32 becomes Inf on conversion: also an error, not a silent Inf.
  std::vector<double> d(batch::T * batch::E, 0.25);
  d[4 * batch::E + 1] = 1e300;
  CHECK_RS_ERROR(route_into({}, rs::capacity::dropless{}, rs::matrix_view<const double>{d.data(), batch::T, batch::E}),
                 "logits", "row 4", "column 1");
  d[4 * batch::E + 1] = std::numeric_limits<double>::quiet_NaN();
  CHECK_RS_ERROR(route_into({}, rs::capacity::dropless{}, rs::matrix_view<const double>{d.data(), batch::T, batch::E}),
                 "logits", "row 4", "column 1");
}

TEST_CASE("test_errors: expert_choice temperature") {
  const batch b;
  for (float t : {0.0f, -1.0f, nan_f, inf_f, 1e-45f, 2e-39f}) {
    CAPTURE(t);
    const rs::router<rs::affinity::precomputed, rt::expert_choice, rs::capacity::factor> r{
        {}, {.top_k = 2, .temperature = t}, {}};
    CHECK_RS_ERROR(r.route(b.view()), "temperature", "reciprocal");
  }
}

TEST_CASE("test_errors: finite options whose fp32 arithmetic overflows") {
  // Each input below passes the per-argument checks, but the routing weights overflow fp32. The call
  // must refuse rather than put NaN or Inf weights into the plan.
  batch b;
  for (float& x : b.logits) x *= 1e10f;
  CHECK_RS_ERROR(route_tc({.top_k = 2, .temperature = 1e-30f}, b), "routing weight", "temperature");
  batch c;
  for (float& x : c.logits) x = std::fabs(x) + 10.0f;
  CHECK_RS_ERROR(route_tc({.top_k = 2, .score = rs::score::identity, .scaling_factor = 1e38f}, c), "routing weight",
                 "scaling_factor");
  // The same options without overflow route normally.
  CHECK(tc_router<>{{}, {.top_k = 2, .temperature = 1e-30f}, {}}.route(batch{}.view()).num_assignments() == 12);
}

TEST_CASE("test_errors: capacity policies") {
  const batch b;
  const rs::matrix_view<const float> v = b.view();
  const rt::token_choice dir{.top_k = 2};
  using rs::capacity::factor;
  for (double f :
       {-1.0, 0.0, -0.0, std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    CAPTURE(f);
    CHECK_RS_ERROR(route_into(dir, factor{.factor = f}, v), "capacity factor");
  }
  // A finite factor whose capacity does not fit 32-bit ids.
  CHECK_RS_ERROR(route_into(dir, factor{.factor = 1e30}, v), "capacity factor");
  CHECK_RS_ERROR(route_into(dir, factor{.min_capacity = -1}, v), "min_capacity");
  CHECK_RS_ERROR(route_into(dir, factor{.align = 0}, v), "align");
  CHECK_RS_ERROR(route_into(dir, factor{.align = -4}, v), "align");
  CHECK_RS_ERROR(route_into(dir, factor{.drop = static_cast<rs::drop_policy>(5)}, v), "drop");
  CHECK_RS_ERROR(route_into(dir, rs::capacity::dropless{.align = 0}, v), "align");
  // Padding every expert to a huge capacity would need more than 2^31 slots.
  CHECK_RS_ERROR(route_into(dir, factor{.min_capacity = rs::index{1} << 30, .pad_to_capacity = true}, v), "capacity");
}

TEST_CASE("test_errors: input views") {
  const batch b;
  const float* p = b.logits.data();
  CHECK_RS_ERROR(route_into({}, rs::capacity::dropless{}, rs::matrix_view<const float>{p, 3, 8, 7}), "input", "stride");
  CHECK_RS_ERROR(route_into({}, rs::capacity::dropless{}, rs::matrix_view<const float>{nullptr, 3, 8}), "input");
  CHECK_RS_ERROR(route_into({}, rs::capacity::dropless{}, rs::matrix_view<const float>{p, -1, 8}), "input");
  CHECK_RS_ERROR(route_into({}, rs::capacity::dropless{}, rs::matrix_view<const float>{p, 2, -8, 8}), "input");
  CHECK_RS_ERROR(route_into({}, rs::capacity::dropless{}, rs::matrix_view<const float>{p, 6, 0}), "logits");
  // T·k must fit 32-bit ids; checked before any row is read (the view points at 48 floats only).
  CHECK_RS_ERROR(
      route_into({.top_k = 2}, rs::capacity::dropless{}, rs::matrix_view<const float>{p, rs::index{1} << 30, 8}),
      "input");
  std::vector<float> storage;
  CHECK_RS_ERROR(tc_router<>{}.logits(rs::backend::serial{}, rs::matrix_view<const float>{nullptr, 2, 8}, storage),
                 "input");
}

// A valid plan for the output checks: 6 tokens, 8 experts, k = 2, dropless: 12 slots.
rs::routing_plan small_plan() { return tc_router<>{{}, {.top_k = 2}, {}}.route(batch{}.view()); }

template <class T>
bool all_equal(const std::vector<T>& v, T value) {
  for (const T& x : v)
    if (!(x == value)) return false;
  return true;
}

TEST_CASE("test_errors: to_dense shapes, nothing written") {
  const rs::routing_plan plan = small_plan();
  const rs::index T = 6, E = 8;
  std::vector<float> probs(usz(T * (E + 1)), 7.0f);
  std::vector<std::uint8_t> mask(usz(T * (E + 1)), 7);
  const rs::matrix_view<float> good_p{probs.data(), T, E};
  const rs::matrix_view<std::uint8_t> good_m{mask.data(), T, E};
  CHECK_RS_ERROR(rs::to_dense(plan, rs::matrix_view<float>{probs.data(), T, E - 1}, good_m), "probs");
  CHECK_RS_ERROR(rs::to_dense(plan, rs::matrix_view<float>{probs.data(), T - 1, E}, good_m), "probs");
  CHECK_RS_ERROR(rs::to_dense(plan, rs::matrix_view<float>{probs.data(), T, E, E - 1}, good_m), "probs");
  CHECK_RS_ERROR(rs::to_dense(plan, rs::matrix_view<float>{nullptr, T, E}, good_m), "probs");
  CHECK_RS_ERROR(rs::to_dense(plan, good_p, rs::matrix_view<std::uint8_t>{mask.data(), T, E + 1}), "mask");
  CHECK_RS_ERROR(rs::to_dense(plan, good_p, rs::matrix_view<std::uint8_t>{mask.data(), T + 1, E}), "mask");
  CHECK_RS_ERROR(rs::to_dense(plan, good_p, rs::matrix_view<std::uint8_t>{nullptr, T, E}), "mask");
  // The valid probs were not written before the mask was found wrong.
  CHECK(all_equal(probs, 7.0f));
  CHECK(all_equal(mask, std::uint8_t{7}));
}

TEST_CASE("test_errors: dispatch and combine shapes, nothing written") {
  const rs::routing_plan plan = small_plan();
  const rs::index T = 6, S = plan.num_slots(), d = 3;
  REQUIRE(S == 12);
  const rs::backend::serial be;
  std::vector<float> x(usz(T * d), 1.0f), buf(usz((S + 1) * (d + 1)), -5.0f);
  const rs::matrix_view<const float> xv{x.data(), T, d};
  CHECK_RS_ERROR(rs::dispatch(be, plan, xv, rs::matrix_view<float>{buf.data(), S - 1, d}), "buffer", "12");
  CHECK_RS_ERROR(rs::dispatch(be, plan, xv, rs::matrix_view<float>{buf.data(), S + 1, d}), "buffer");
  CHECK_RS_ERROR(rs::dispatch(be, plan, xv, rs::matrix_view<float>{buf.data(), S, d + 1}), "buffer");
  CHECK_RS_ERROR(rs::dispatch(be, plan, xv, rs::matrix_view<float>{buf.data(), S, d, d - 1}), "buffer");
  CHECK_RS_ERROR(rs::dispatch(be, plan, xv, rs::matrix_view<float>{nullptr, S, d}), "buffer");
  const rs::matrix_view<float> good_buf{buf.data(), S, d};
  CHECK_RS_ERROR(rs::dispatch(be, plan, rs::matrix_view<const float>{x.data(), T - 1, d}, good_buf), "x", "6");
  CHECK_RS_ERROR(rs::dispatch(be, plan, rs::matrix_view<const float>{x.data(), T, d, 1}, good_buf), "x");
  CHECK_RS_ERROR(rs::dispatch(be, plan, rs::matrix_view<const float>{nullptr, T, d}, good_buf), "x");
  CHECK(all_equal(buf, -5.0f));

  std::vector<float> eo(usz(S * d), 2.0f), y(usz((T + 1) * (d + 1)), -5.0f);
  const rs::matrix_view<const float> ev{eo.data(), S, d};
  CHECK_RS_ERROR(
      rs::combine(be, plan, rs::matrix_view<const float>{eo.data(), S - 1, d}, rs::matrix_view<float>{y.data(), T, d}),
      "expert_out", "12");
  CHECK_RS_ERROR(
      rs::combine(be, plan, rs::matrix_view<const float>{nullptr, S, d}, rs::matrix_view<float>{y.data(), T, d}),
      "expert_out");
  CHECK_RS_ERROR(rs::combine(be, plan, ev, rs::matrix_view<float>{y.data(), T + 1, d}), "y");
  CHECK_RS_ERROR(rs::combine(be, plan, ev, rs::matrix_view<float>{y.data(), T, d + 1}), "y");
  CHECK_RS_ERROR(rs::combine(be, plan, ev, rs::matrix_view<float>{y.data(), T, d, d - 1}), "y");
  CHECK_RS_ERROR(rs::combine(be, plan, ev, rs::matrix_view<float>{nullptr, T, d}), "y");
  CHECK(all_equal(y, -5.0f));
}

TEST_CASE("test_errors: to_block_aligned block") {
  const rs::routing_plan plan = small_plan();
  CHECK_RS_ERROR(rs::to_block_aligned(plan, 0), "block");
  CHECK_RS_ERROR(rs::to_block_aligned(plan, -16), "block");
  // Blocks so large that the padded layout cannot be indexed by 32-bit ids.
  CHECK_RS_ERROR(rs::to_block_aligned(plan, rs::index{1} << 31), "block");
  CHECK_RS_ERROR(rs::to_block_aligned(plan, rs::index{1} << 40), "block");
}

TEST_CASE("test_errors: to_rank_layout and expert placement") {
  const rs::routing_plan plan = small_plan();  // E = 8
  using rs::dist::expert_placement;
  CHECK_RS_ERROR(rs::to_rank_layout(plan, expert_placement{2, 1, {0, 1, 0, 1, 0, 1, 0}}), "placement.rank_of_expert",
                 "8");
  CHECK_RS_ERROR(rs::to_rank_layout(plan, expert_placement{2, 1, std::vector<rs::id_type>(9, 0)}),
                 "placement.rank_of_expert");
  CHECK_RS_ERROR(rs::to_rank_layout(plan, expert_placement{2, 1, {0, 1, 0, 1, 0, 2, 0, 1}}), "placement.rank_of_expert",
                 "rank_of_expert[5]");
  CHECK_RS_ERROR(rs::to_rank_layout(plan, expert_placement{2, 1, {0, 1, 0, -1, 0, 1, 0, 1}}),
                 "placement.rank_of_expert", "rank_of_expert[3]");
  CHECK_RS_ERROR(rs::to_rank_layout(plan, expert_placement{4, 3, {0, 1, 2, 3, 0, 1, 2, 3}}),
                 "placement.ranks_per_node");
  CHECK_RS_ERROR(rs::to_rank_layout(plan, expert_placement{4, 0, {0, 1, 2, 3, 0, 1, 2, 3}}),
                 "placement.ranks_per_node");
  CHECK_RS_ERROR(rs::to_rank_layout(plan, expert_placement{0, 1, std::vector<rs::id_type>(8, 0)}),
                 "placement.num_ranks");
  CHECK_RS_ERROR(expert_placement::contiguous(6, 4), "num_experts", "4");
  CHECK_RS_ERROR(expert_placement::contiguous(0, 1), "num_experts");
  CHECK_RS_ERROR(expert_placement::contiguous(8, 0), "num_ranks");
  CHECK_RS_ERROR(expert_placement::contiguous(8, 4, 3), "placement.ranks_per_node");
}

TEST_CASE("test_errors: affinity::linear") {
  const rs::index T = 5, d = 4, E = 8;
  std::vector<float> x(usz(T * d), 0.5f), w(usz(E * (d + 1)), 0.25f), bias(usz(E + 1), 0.0f);
  const rs::matrix_view<const float> xv{x.data(), T, d};
  using linear_router = rs::router<rs::affinity::linear, rt::token_choice, rs::capacity::dropless>;
  const auto route = [&](const rs::affinity::linear& gate) { return linear_router{gate, {.top_k = 2}, {}}.route(xv); };
  CHECK_RS_ERROR(route({.weight = {w.data(), E, d + 1}}), "linear.weight", "4");
  CHECK_RS_ERROR(route({.weight = {w.data(), E, d - 1}}), "linear.weight");
  CHECK_RS_ERROR(route({.weight = {w.data(), E, d, d - 1}}), "linear.weight");
  CHECK_RS_ERROR(route({.weight = {nullptr, E, d}}), "linear.weight");
  CHECK_RS_ERROR(route({.weight = {w.data(), 0, d}}), "linear.weight");
  CHECK_RS_ERROR(route({.weight = {w.data(), E, d}, .bias = {bias.data(), E - 1}}), "linear.bias", "8");
  CHECK_RS_ERROR(route({.weight = {w.data(), E, d}, .bias = {bias.data(), E + 1}}), "linear.bias");
  CHECK_RS_ERROR(route({.weight = {w.data(), E, d}, .bias = {nullptr, E}}), "linear.bias");
  // top_k is checked against the gate's expert count (its weight rows), not the input width.
  CHECK_RS_ERROR((linear_router{{.weight = {w.data(), 2, d}}, {.top_k = 3}, {}}.route(xv)), "top_k");
  // A NaN weight makes NaN logits: refused by the logits check.
  w[3] = nan_f;
  CHECK_RS_ERROR(route({.weight = {w.data(), E, d}}), "logits");
}

TEST_CASE("test_errors: losses") {
  const batch b;
  const rs::backend::serial be;
  for (rs::index k : {rs::index{0}, rs::index{-1}, rs::index{9}}) {
    CAPTURE(k);
    CHECK_RS_ERROR(rs::loss::switch_aux_loss(be, b.view(), rs::score::softmax, k), "top_k");
  }
  CHECK_RS_ERROR(rs::loss::switch_aux_loss(be, rs::matrix_view<const float>{nullptr, 3, 8}, rs::score::softmax, 1),
                 "logits");
  CHECK_RS_ERROR(
      rs::loss::switch_aux_loss(be, rs::matrix_view<const float>{b.logits.data(), 3, 0}, rs::score::softmax, 1),
      "logits");
  CHECK_RS_ERROR(
      rs::loss::switch_aux_loss(be, rs::matrix_view<const float>{b.logits.data(), 3, 8, 4}, rs::score::softmax, 1),
      "logits");
  CHECK_RS_ERROR(rs::loss::z_loss(be, rs::matrix_view<const float>{b.logits.data(), 3, 0}), "logits");
  CHECK_RS_ERROR(rs::loss::z_loss(be, rs::matrix_view<const float>{b.logits.data(), -3, 8}), "logits");
  for (float bad : {nan_f, inf_f, -inf_f}) {
    batch c;
    c.logits[1 * batch::E + 6] = bad;
    CAPTURE(bad);
    for (rs::score fn : {rs::score::softmax, rs::score::sigmoid, rs::score::sqrt_softplus})
      CHECK_RS_ERROR(rs::loss::switch_aux_loss(be, c.view(), fn, 2), "logits", "row 1", "column 6");
    CHECK_RS_ERROR(rs::loss::z_loss(be, c.view()), "logits", "row 1", "column 6");
  }
}

TEST_CASE("test_errors: build_plan candidate sets and limits") {
  const rs::backend::serial be;
  const auto valid = [] {
    rs::candidate_set c;
    c.num_tokens = 2;
    c.num_experts = 4;
    c.offsets = {0, 2, 3};
    c.expert = {1, 3, 0};
    c.weight = {0.5f, 0.5f, 1.0f};
    return c;
  };
  REQUIRE(rs::build_plan(be, valid(), {}).num_assignments() == 3);
  rs::candidate_set c = valid();
  c.num_experts = 0;
  CHECK_RS_ERROR(rs::build_plan(be, c, {}), "candidates.num_experts");
  c = valid();
  c.offsets = {0, 2};
  CHECK_RS_ERROR(rs::build_plan(be, c, {}), "candidates.offsets");
  c = valid();
  c.expert = {1, 4, 0};
  CHECK_RS_ERROR(rs::build_plan(be, c, {}), "candidates.expert");
  c = valid();
  c.expert = {3, 1, 0};
  CHECK_RS_ERROR(rs::build_plan(be, c, {}), "candidates.expert");
  c = valid();
  c.weight = {0.5f, nan_f, 1.0f};
  CHECK_RS_ERROR(rs::build_plan(be, c, {}), "candidates.weight");
  c = valid();
  c.weight = {0.5f};
  CHECK_RS_ERROR(rs::build_plan(be, c, {}), "candidates.weight");
  c = valid();
  c.priority = {1.0f, inf_f, 0.0f};
  CHECK_RS_ERROR(rs::build_plan(be, c, {}), "candidates.priority");
  CHECK_RS_ERROR(rs::build_plan(be, valid(), {.capacity = -2}), "capacity");
  CHECK_RS_ERROR(rs::build_plan(be, valid(), {.align = 0}), "align");
  CHECK_RS_ERROR(rs::build_plan(be, valid(), {.drop = static_cast<rs::drop_policy>(3)}), "drop");
  c = valid();
  c.forced_drop = static_cast<rs::drop_policy>(4);  // a direction's own drop order, out of range
  CHECK_RS_ERROR(rs::build_plan(be, c, {}), "candidates.forced_drop");
  c.forced_drop = rs::drop_policy::position;
  CHECK_NOTHROW((void)rs::build_plan(be, c, {}));
}

}  // namespace
