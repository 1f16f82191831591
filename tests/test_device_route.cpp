// Routing on a backend whose memory the host cannot read (tests/device_backend.hpp): the conformance
// cases with precomputed fp32 logits routed there give serial's plan, bit for bit, and serial's error;
// a token-choice or bidirectional route makes two allocations (its workspace, the plan) and one
// device-to-host copy (the sizes and the status); a plan mirrors to the host in one copy; and host and
// device data do not mix (checked at compile time).

#include <string>
#include <type_traits>
#include <variant>

#include <doctest/doctest.h>

#include <resonance/resonance.hpp>

#include "conformance.hpp"
#include "device_backend.hpp"

namespace {

namespace rs = resonance;
namespace rt = resonance::routing;
using resonance::index;
using resonance_test::device_backend;
using resonance_test::error_of;
using resonance_test::sim_device_space;

// ---- Host and device data do not mix (each line would otherwise compile).
using device_view = rs::matrix_view<const float, sim_device_space>;
using host_view = rs::matrix_view<const float>;
static_assert(!std::is_convertible_v<device_view, host_view>);
static_assert(!std::is_convertible_v<host_view, device_view>);
static_assert(std::is_convertible_v<rs::matrix_view<float, sim_device_space>, device_view>);
template <class P>
concept has_spans = requires(const P& p) {
  p.slot_token();
  p.token_expert();
};
template <class P>
concept counts_drops = requires(const P& p) {
  p.num_dropped();
};
template <class R, class B, class X>
concept routes = requires(const R& r, const B& be, X x) {
  r.route(be, x);
};
static_assert(!has_spans<rs::plan_view<sim_device_space>>);
static_assert(!has_spans<rs::basic_routing_plan<sim_device_space>>);
static_assert(!counts_drops<rs::basic_routing_plan<sim_device_space>>);
static_assert(has_spans<rs::routing_plan> && has_spans<rs::plan_view<>>);
using tc_router = rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::dropless>;
static_assert(routes<tc_router, device_backend, device_view>);
static_assert(!routes<tc_router, device_backend, host_view>);
static_assert(!routes<tc_router, rs::backend::serial, device_view>);
static_assert(std::is_same_v<decltype(std::declval<const tc_router&>().route(device_backend{}, device_view{})),
                             rs::basic_routing_plan<sim_device_space>>);

// The case's input copied into device memory.
resonance_test::sim_buffer<float> to_device(const resonance_test::conformance::test_case& c) {
  resonance_test::sim_buffer<float> d(static_cast<index>(c.x.size()));
  copy(device_backend{}, d.data(), c.x.data(), static_cast<index>(c.x.size()));
  return d;
}

struct route_cost {
  int allocations = 0;
  int copies_to_host = 0;
};

// Routes case c on backend be with its affinity (precomputed logits or grap_cosine's hidden states, in
// device memory as X), calling check(router, plan) with the plan; returns whether the direction
// proposes a fixed number of candidates per token.
template <class X, class Check>
bool route_on(const resonance_test::conformance::test_case& c, const device_backend& be,
              rs::matrix_view<const X, sim_device_space> dx, Check&& check) {
  bool fixed_candidates = false;
  const auto with = [&](auto affinity) {
    std::visit(
        [&](const auto& direction, const auto& capacity) {
          using D = std::decay_t<decltype(direction)>;
          fixed_candidates = !std::is_same_v<D, rt::expert_choice> && !std::is_same_v<D, rt::sinkhorn>;
          const rs::router<decltype(affinity), D, std::decay_t<decltype(capacity)>> r{affinity, direction, capacity};
          check(r.route(be, dx));
        },
        c.direction, c.capacity);
  };
  if (c.affinity == resonance_test::conformance::affinity_kind::grap_cosine) {
    with(rs::affinity::grap_cosine{.num_experts = c.E});
  } else if (c.affinity == resonance_test::conformance::affinity_kind::cosine) {
    // The embeddings in device memory too.
    resonance_test::sim_buffer<float> gate(static_cast<index>(c.gate.size()));
    copy(device_backend{}, gate.data(), c.gate.data(), static_cast<index>(c.gate.size()));
    with(rs::affinity::basic_cosine<float, sim_device_space>{.weight = {gate.data(), c.E, c.d},
                                                             .temperature = c.cosine_temperature});
  } else if constexpr (std::is_same_v<X, float>) {
    with(rs::affinity::precomputed{});
  }
  return fixed_candidates;
}

bool device_case(const resonance_test::conformance::test_case& c) {
  using resonance_test::conformance::affinity_kind;
  return c.affinity == affinity_kind::precomputed || c.affinity == affinity_kind::grap_cosine ||
         c.affinity == affinity_kind::cosine;
}

TEST_CASE(
    "device route: the precomputed and grap_cosine conformance cases, Sinkhorn too, give serial's plans and errors") {
  using namespace resonance_test::conformance;
  int routed = 0, errors = 0, counted = 0, hidden = 0, gates = 0;
  int directions[4] = {0, 0, 0, 0};
  for (int id = 0; id < conformance_cases; ++id) {
    const test_case c = make_case(id);
    if (!device_case(c)) continue;
    std::string want_error;
    const std::optional<rs::routing_plan> want = route_case(rs::backend::serial{}, c, want_error);

    const auto x = to_device(c);
    const device_view dx{x.data(), c.T, c.d, c.stride};
    resonance_test::device_counters n;
    const device_backend be{&n};
    std::optional<rs::routing_plan> got;
    route_cost cost;
    bool fixed_candidates = false;
    const std::string got_error = error_of([&] {
      fixed_candidates = route_on(c, be, dx, [&](const rs::basic_routing_plan<sim_device_space>& plan) {
        cost = {n.allocations, n.copies_to_host};
        n = {};
        got = rs::to_host(be, plan);
        CHECK_MESSAGE(n.copies_to_host == 1, c.text << ": to_host made " << n.copies_to_host << " copies");
      });
    });
    ++directions[c.direction.index() < 4 ? c.direction.index() : 0];
    CHECK_MESSAGE(got_error == want_error, c.text << ": \"" << got_error << "\", serial: \"" << want_error << "\"");
    if (!want || !got) {
      errors += want ? 0 : 1;
      continue;
    }
    ++routed;
    hidden += c.affinity == affinity_kind::grap_cosine ? 1 : 0;
    gates += c.affinity == affinity_kind::cosine ? 1 : 0;
    const std::string diff = resonance_test::plan_difference(*want, *got);
    CHECK_MESSAGE(diff.empty(), c.text << ": " << diff << " (serial's first)");
    if (fixed_candidates) {
      ++counted;
      CHECK_MESSAGE(cost.allocations == 2, c.text << ": " << cost.allocations << " allocations");
      CHECK_MESSAGE(cost.copies_to_host == 1, c.text << ": " << cost.copies_to_host << " copies to the host");
    }
  }
  // The draws reach every kind of case.
  CHECK(routed >= 60);
  CHECK(hidden >= 15);
  CHECK(gates >= 10);
  CHECK(errors >= 5);
  CHECK(counted >= 40);
  for (int d : directions) CHECK(d >= 10);
}

TEST_CASE(
    "device route: bfloat16 hidden states route as their fp32 values (grap_cosine, cosine), on the host and the "
    "device") {
  using namespace resonance_test::conformance;
  int routed = 0, errors = 0;
  for (int id = 0; id < conformance_cases; ++id) {
    test_case c = make_case(id);
    if (c.affinity != affinity_kind::grap_cosine && c.affinity != affinity_kind::cosine) continue;
    // The case's input rounded to bfloat16, and those values as fp32 (exact).
    std::vector<rs::bfloat16> xb(c.x.size());
    for (std::size_t i = 0; i < c.x.size(); ++i) {
      xb[i] = rs::bfloat16::from_float(c.x[i]);
      c.x[i] = xb[i].to_float();
    }
    std::string want_error;
    const std::optional<rs::routing_plan> want = route_case(rs::backend::serial{}, c, want_error);

    std::optional<rs::routing_plan> host, device;
    const std::string host_error = error_of([&] {
      std::visit(
          [&](const auto& direction, const auto& capacity) {
            using D = std::decay_t<decltype(direction)>;
            using C = std::decay_t<decltype(capacity)>;
            const rs::matrix_view<const rs::bfloat16> xv{xb.data(), c.T, c.d, c.stride};
            if (c.affinity == affinity_kind::grap_cosine) {
              host = rs::router<rs::affinity::grap_cosine, D, C>{{.num_experts = c.E}, direction, capacity}.route(
                  rs::backend::serial{}, xv);
            } else {
              const rs::affinity::cosine gate{.weight = {c.gate.data(), c.E, c.d}, .temperature = c.cosine_temperature};
              host = rs::router<rs::affinity::cosine, D, C>{gate, direction, capacity}.route(rs::backend::serial{}, xv);
            }
          },
          c.direction, c.capacity);
    });
    resonance_test::sim_buffer<rs::bfloat16> dxb(static_cast<index>(xb.size()));
    copy(device_backend{}, dxb.data(), xb.data(), static_cast<index>(xb.size()));
    const std::string device_error = error_of([&] {
      route_on(
          c, device_backend{}, rs::matrix_view<const rs::bfloat16, sim_device_space>{dxb.data(), c.T, c.d, c.stride},
          [&](const rs::basic_routing_plan<sim_device_space>& plan) { device = rs::to_host(device_backend{}, plan); });
    });
    CHECK_MESSAGE(host_error == want_error, c.text << ": \"" << host_error << "\", fp32: \"" << want_error << "\"");
    CHECK_MESSAGE(device_error == want_error, c.text << ": \"" << device_error << "\", fp32: \"" << want_error << "\"");
    if (!want) {
      ++errors;
      continue;
    }
    REQUIRE(host);
    REQUIRE(device);
    ++routed;
    CHECK_MESSAGE(resonance_test::plan_difference(*want, *host).empty(), c.text);
    CHECK_MESSAGE(resonance_test::plan_difference(*want, *device).empty(), c.text);
  }
  CHECK(routed >= 15);
  CHECK(errors >= 1);
}

TEST_CASE("device route_into: one workspace and one plan reused over the conformance cases, no wait until finish") {
  using namespace resonance_test::conformance;
  resonance_test::device_counters n;
  const device_backend be{&n};
  rs::route_workspace<device_backend> ws;
  rs::basic_routing_plan<sim_device_space> plan;
  int routed = 0, errors = 0, reused = 0;
  for (int id = 0; id < conformance_cases; ++id) {
    const test_case c = make_case(id);
    if (c.affinity != affinity_kind::precomputed || std::holds_alternative<rt::sinkhorn>(c.direction) ||
        std::holds_alternative<rt::expert_choice>(c.direction))
      continue;
    std::string want_error;
    const std::optional<rs::routing_plan> want = route_case(rs::backend::serial{}, c, want_error);
    const auto x = to_device(c);
    const device_view dx{x.data(), c.T, c.d, c.stride};
    std::optional<rs::routing_plan> got;
    const std::string got_error = error_of([&] {
      std::visit(
          [&](const auto& direction, const auto& capacity) {
            using D = std::decay_t<decltype(direction)>;
            if constexpr (!std::is_same_v<D, rt::sinkhorn> && !std::is_same_v<D, rt::expert_choice>) {
              const rs::router<rs::affinity::precomputed, D, std::decay_t<decltype(capacity)>> r{
                  {}, direction, capacity};
              for (int round = 0; round < 2; ++round) {
                n = {};
                r.route_into(be, dx, ws, plan);
                // Enqueued whole: its one copy back is on its way and nothing has waited.
                CHECK_MESSAGE(n.fences == 0, c.text << ": route_into waited " << n.fences << " times");
                CHECK_MESSAGE(n.copies_to_host == 1, c.text << ": " << n.copies_to_host << " copies");
                CHECK(ws.pending());
                // The second round finds the workspace and the plan big enough.
                if (round == 1) {
                  CHECK_MESSAGE(n.allocations == 0, c.text << ": " << n.allocations << " allocations on reuse");
                  ++reused;
                }
                const int allocations = n.allocations;
                r.finish(be, ws, plan);
                CHECK(!ws.pending());
                CHECK(n.fences == 1);
                CHECK(n.allocations == allocations);
              }
              got = rs::to_host(be, plan);
            }
          },
          c.direction, c.capacity);
    });
    CHECK_MESSAGE(got_error == want_error, c.text << ": \"" << got_error << "\", serial: \"" << want_error << "\"");
    CHECK(!ws.pending());
    if (!want || !got) {
      errors += want ? 0 : 1;
      // A failed route leaves the plan empty.
      if (!want) CHECK(plan.num_tokens() == 0);
      continue;
    }
    ++routed;
    const std::string diff = resonance_test::plan_difference(*want, *got);
    CHECK_MESSAGE(diff.empty(), c.text << ": " << diff << " (serial's first)");
  }
  CHECK(routed >= 40);
  CHECK(errors >= 3);
  CHECK(reused >= 40);
}

TEST_CASE("device route_into: a second route before finish is an error, and finish needs a route") {
  std::vector<float> logits(12, 0.25f);
  resonance_test::sim_buffer<float> x(12);
  copy(device_backend{}, x.data(), logits.data(), 12);
  const rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::dropless> r{{}, {.top_k = 2}, {}};
  rs::route_workspace<device_backend> ws;
  rs::basic_routing_plan<sim_device_space> plan;
  CHECK(error_of([&] { r.finish(device_backend{}, ws, plan); }) ==
        "resonance: workspace: expected a workspace a route was enqueued on");
  r.route_into(device_backend{}, device_view{x.data(), 3, 4}, ws, plan);
  CHECK(error_of([&] {
          r.route_into(device_backend{}, device_view{x.data(), 3, 4}, ws, plan);
        }) == "resonance: workspace: expected a workspace whose previous route was finished (router::finish)");
  r.finish(device_backend{}, ws, plan);
  CHECK(plan.num_assignments() == 6);
  // Bad input is thrown by route_into itself, before anything is enqueued.
  CHECK(error_of([&] {
          r.route_into(device_backend{}, device_view{x.data(), 3, 1}, ws, plan);
        }).find("top_k") != std::string::npos);
  CHECK(!ws.pending());
  // On a host backend route_into is route().
  rs::route_workspace<rs::backend::serial> hws;
  rs::routing_plan hplan;
  r.route_into(rs::backend::serial{}, host_view{logits.data(), 3, 4}, hws, hplan);
  r.finish(rs::backend::serial{}, hws, hplan);
  CHECK(hplan == r.route(rs::backend::serial{}, host_view{logits.data(), 3, 4}));
}

TEST_CASE("device route: a failing token costs the route nothing until its one copy, then serial's error") {
  // T = 5, E = 4: token 3 has a NaN logit; token 1 overflows once divided by the temperature.
  std::vector<float> logits(20, 0.5f);
  logits[3 * 4 + 2] = __builtin_nanf("");
  logits[1 * 4 + 0] = 3.0e38f;
  const rt::token_choice tc{.top_k = 2, .score = rs::score::identity, .temperature = 0.5f};
  const rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::dropless> r{{}, tc, {}};
  const std::string want = error_of([&] { (void)r.route(rs::backend::serial{}, host_view{logits.data(), 5, 4}); });
  REQUIRE(want.find("token 1") != std::string::npos);

  resonance_test::sim_buffer<float> x(20);
  copy(device_backend{}, x.data(), logits.data(), 20);
  resonance_test::device_counters n;
  const std::string got = error_of([&] { (void)r.route(device_backend{&n}, device_view{x.data(), 5, 4}); });
  CHECK(got == want);
  CHECK(n.allocations == 2);
  CHECK(n.copies_to_host >= 2);  // the status with the sizes, then the offending row for the message

  // The same logits on bidirectional (which does not check finiteness while selecting): the NaN logit
  // of token 3 is found first, as serial's check of the logits finds it.
  const rt::bidirectional bi{.top_k = 2, .score = rs::score::identity, .temperature = 0.5f};
  const rs::router<rs::affinity::precomputed, rt::bidirectional, rs::capacity::factor> rb{{}, bi, {.factor = 1.0}};
  const std::string want_bi = error_of([&] { (void)rb.route(rs::backend::serial{}, host_view{logits.data(), 5, 4}); });
  REQUIRE(want_bi.find("row 3") != std::string::npos);
  CHECK(error_of([&] { (void)rb.route(device_backend{}, device_view{x.data(), 5, 4}); }) == want_bi);
}

TEST_CASE("device route: node-limited token choice reads its expert -> node map from device memory, as serial") {
  // 13 experts round-robin over 4 nodes (4, 3, 3, 3 experts): no node is a range of ids.
  const index T = 50, E = 13;
  std::vector<rs::id_type> nodes(static_cast<std::size_t>(E));
  for (index e = 0; e < E; ++e) nodes[static_cast<std::size_t>(e)] = static_cast<rs::id_type>(e % 4);
  std::vector<float> bias(static_cast<std::size_t>(E));
  std::vector<float> logits(static_cast<std::size_t>(T * E));
  for (std::size_t i = 0; i < bias.size(); ++i) bias[i] = 0.25f * static_cast<float>(static_cast<int>(i * 7 % 5) - 2);
  for (std::size_t i = 0; i < logits.size(); ++i)
    logits[i] = 0.5f * static_cast<float>(static_cast<int>((i * 2654435761u) % 9) - 4);  // ties
  const rt::token_choice tc{.top_k = 4,
                            .score = rs::score::sigmoid,
                            .expert_bias = {bias.data(), E},
                            .num_groups = 4,
                            .group_topk = 2,
                            .group_scoring = rt::group_score::top2_sum,
                            .expert_group = {nodes.data(), E}};
  const rt::bidirectional bi{.top_k = 3, .num_groups = 4, .group_topk = 2, .expert_group = {nodes.data(), E}};
  resonance_test::sim_buffer<float> x(T * E);
  copy(device_backend{}, x.data(), logits.data(), T * E);
  const device_view dx{x.data(), T, E};
  const host_view hx{logits.data(), T, E};

  const auto check = [&](const auto& r) {
    const rs::routing_plan want = r.route(rs::backend::serial{}, hx);
    resonance_test::device_counters n;
    const device_backend be{&n};
    const rs::routing_plan got = rs::to_host(be, r.route(be, dx));
    CHECK_MESSAGE(resonance_test::plan_difference(want, got).empty(), resonance_test::plan_difference(want, got));
    CHECK(n.allocations == 2);
    CHECK(n.copies_to_host == 2);  // the route's status and sizes, then to_host's

    // route_into: the map travels through the workspace's staging; a reused workspace allocates nothing.
    rs::route_workspace<device_backend> ws;
    rs::basic_routing_plan<sim_device_space> plan;
    for (int round = 0; round < 2; ++round) {
      n = {};
      r.route_into(be, dx, ws, plan);
      if (round == 1) CHECK_MESSAGE(n.allocations == 0, n.allocations << " allocations on reuse");
      CHECK(n.fences == 0);
      r.finish(be, ws, plan);
      CHECK(resonance_test::plan_difference(want, rs::to_host(be, plan)).empty());
    }
    // Another map in the same host array: the next route_into copies it again, still without allocating.
    for (index e = 0; e < E; ++e) nodes[static_cast<std::size_t>(e)] = static_cast<rs::id_type>(e * 4 / E);
    const rs::routing_plan want_blocks = r.route(rs::backend::serial{}, hx);
    CHECK(want_blocks != want);
    n = {};
    r.route_into(be, dx, ws, plan);
    CHECK(n.allocations == 0);
    r.finish(be, ws, plan);
    CHECK(resonance_test::plan_difference(want_blocks, rs::to_host(be, plan)).empty());
    for (index e = 0; e < E; ++e) nodes[static_cast<std::size_t>(e)] = static_cast<rs::id_type>(e % 4);
  };
  check(rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::dropless>{{}, tc, {}});
  check(rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::factor>{{}, tc, {.factor = 0.8}});
  check(rs::router<rs::affinity::precomputed, rt::bidirectional, rs::capacity::factor>{{}, bi, {.factor = 1.0}});

  // The id array is swapped for the device copy as the float array is.
  const std::vector<rs::id_type> copy_of(static_cast<std::size_t>(E), 0);
  CHECK(rs::detail::policy_ids(tc).data == nodes.data());
  const rt::token_choice tc_dev = rs::detail::with_policy_ids(tc, copy_of.data());
  CHECK(tc_dev.expert_group.data == copy_of.data());
  CHECK(tc_dev.expert_group.size == E);
  CHECK(tc_dev.expert_bias.data == bias.data());  // the rest of the policy is unchanged
  CHECK(rs::detail::with_policy_ids(bi, copy_of.data()).expert_group.data == copy_of.data());
  CHECK(rs::detail::policy_ids(rt::token_choice{}).size == 0);
  CHECK(rs::detail::with_policy_ids(rt::token_choice{}, copy_of.data()).expert_group.data == nullptr);
  CHECK(rs::detail::policy_ids(rt::expert_choice{}).size == 0);
  CHECK(rs::detail::policy_ids(rt::sinkhorn{}).size == 0);
}

}  // namespace

TEST_CASE("device route: the policy array a direction's kernels read is swapped for the device copy") {
  const std::vector<float> bias{0.5f, -1.0f, 2.0f};
  const std::vector<float> copy(3, 0.0f);
  const rt::token_choice tc{.top_k = 1, .expert_bias = {bias.data(), 3}};
  CHECK(rs::detail::policy_array(tc).data == bias.data());
  const rt::token_choice tc_dev = rs::detail::with_policy_array(tc, copy.data());
  CHECK(tc_dev.expert_bias.data == copy.data());
  CHECK(tc_dev.expert_bias.size == 3);
  CHECK(tc_dev.top_k == tc.top_k);  // the rest of the policy is unchanged

  const rt::bidirectional bi{.top_k = 1, .expert_bias = {bias.data(), 3}};
  CHECK(rs::detail::with_policy_array(bi, copy.data()).expert_bias.data == copy.data());
  const rt::expert_choice ec{.thresholds = {bias.data(), 3}};
  CHECK(rs::detail::policy_array(ec).data == bias.data());
  CHECK(rs::detail::with_policy_array(ec, copy.data()).thresholds.data == copy.data());

  // No array: nothing to copy, and an empty view stays empty (null).
  CHECK(rs::detail::policy_array(rt::token_choice{}).size == 0);
  CHECK(rs::detail::with_policy_array(rt::token_choice{}, copy.data()).expert_bias.data == nullptr);
  CHECK(rs::detail::policy_array(rt::sinkhorn{}).size == 0);
}
