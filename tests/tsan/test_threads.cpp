// Built only into resonance_tsan_tests (tests/tsan/): several caller threads using the library at once,
// which the other tests never do (each has one caller, whose routes run on the tbb arenas). Every
// thread starts its first route at the same moment, in a fresh process when CTest runs the case, so
// backend::native's table is resolved by several threads at once, and the per-thread caches of route()
// (router.hpp: host_route_cache, the fused block's logits) are used by several threads while oneTBB's
// workers steal blocks of the others' routes. Each plan must be the one a single serial route gives.

#include <latch>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/backend/tbb.hpp>
#include <resonance/resonance.hpp>

#include "backends.hpp"
#include "random_inputs.hpp"

namespace {

namespace rs = resonance;
namespace ra = resonance::affinity;
namespace rt = resonance::routing;
namespace cap = resonance::capacity;

constexpr int callers = 4;
constexpr int routes_per_caller = 2;

// Runs route(caller) on `callers` threads released together; each returns the differences it found
// ("" for none), checked here on the calling thread (doctest's assertions stay on one thread).
template <class Route>
void on_callers_at_once(const Route& route) {
  std::vector<std::string> found(callers);
  std::latch go(callers);
  std::vector<std::thread> threads;
  for (int c = 0; c < callers; ++c)
    threads.emplace_back([&, c] {
      go.arrive_and_wait();
      found[static_cast<std::size_t>(c)] = route(c);
    });
  for (std::thread& t : threads) t.join();
  for (int c = 0; c < callers; ++c)
    CHECK_MESSAGE(found[static_cast<std::size_t>(c)].empty(),
                  "caller " << c << ": " << found[static_cast<std::size_t>(c)]);
}

TEST_CASE("tsan: callers on four threads route precomputed logits at once, each as serial does") {
  const rs::index T = 3000, E = 64;
  std::mt19937_64 rng(41);
  const std::vector<float> logits = resonance_test::normal_values(rng, T * E, 2.0);
  const rs::matrix_view<const float> x{logits.data(), T, E};
  const rs::router<ra::precomputed, rt::token_choice, cap::factor> r{
      {}, {.top_k = 4, .score = rs::score::sigmoid}, {.factor = 1.0, .drop = rs::drop_policy::score}};
  const rs::routing_plan want = r.route(rs::backend::serial{}, x);
  REQUIRE(want.num_assignments() > 0);

  on_callers_at_once([&](int caller) {
    std::string diff;
    // route() (the per-thread cache), then route_into with this caller's workspace, twice each.
    rs::route_workspace<rs::backend::tbb<>> ws;
    rs::routing_plan plan;
    for (int i = 0; i < routes_per_caller && diff.empty(); ++i) {
      diff = resonance_test::plan_difference(want, r.route(rs::backend::tbb<>{}, x));
      if (!diff.empty()) return "route on tbb<>: " + diff;
      r.route_into(rs::backend::tbb<>{}, x, ws, plan);
      r.finish(rs::backend::tbb<>{}, ws, plan);
      diff = resonance_test::plan_difference(want, plan);
      if (!diff.empty()) return "route_into on tbb<>: " + diff;
    }
    // A caller with an arena of its own next to the others' shared one.
    tbb::task_arena arena(1 + caller % 2);
    arena.execute([&] { diff = resonance_test::plan_difference(want, r.route(rs::backend::tbb<>{}, x)); });
    return diff.empty() ? diff : "route in an arena of its own: " + diff;
  });
}

TEST_CASE("tsan: callers on four threads take the fused grap_cosine path at once, each as serial does") {
  const rs::index T = 2000, E = 16, d = 64;
  std::mt19937_64 rng(42);
  const std::vector<float> hidden = resonance_test::normal_values(rng, T * d);
  const rs::matrix_view<const float> x{hidden.data(), T, d};
  const rs::router<ra::grap_cosine, rt::token_choice, cap::factor> r{
      {.num_experts = E}, {.top_k = 2}, {.factor = 1.25}};
  static_assert(decltype(r)::fuses_on<rs::backend::tbb<>>);
  const rs::routing_plan want = r.route(rs::backend::serial{}, x);
  REQUIRE(want.num_assignments() > 0);

  on_callers_at_once([&](int) {
    for (int i = 0; i < routes_per_caller; ++i)
      if (std::string diff = resonance_test::plan_difference(want, r.route(rs::backend::tbb<>{}, x)); !diff.empty())
        return diff;
    return std::string{};
  });
}

}  // namespace
