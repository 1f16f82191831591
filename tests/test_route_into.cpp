// router::route_into on host backends: one workspace and one plan reused over every conformance case
// (every direction, affinity and stateless capacity, shapes growing and shrinking) give serial's route()
// plan each time, a failing route leaves the plan as it was, and a steady loop allocates nothing large.
// route() itself keeps its temporaries per thread: a loop of route() calls allocates only its plans.

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <optional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/resonance.hpp>

#include "backends.hpp"
#include "conformance.hpp"
#include "error_of.hpp"

// Large allocations made through operator new while `counting` is set (the test binary's replacement of
// the global operator new; it forwards to malloc, as the default one does).
namespace resonance_test::allocations {
std::atomic<bool> counting{false};
std::atomic<long> large{0};
constexpr std::size_t large_bytes = 64 << 10;
}  // namespace resonance_test::allocations

// GCC sees the free() below receive a pointer from this operator new once both are inlined, and warns
// of a mismatch that a replacement pair forwarding to malloc and free is not.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
// Every replaceable form but the aligned ones (left to the runtime, with their own deletes): a form
// left out would come from the runtime, and a sanitizer reports its pointer reaching this free().
namespace resonance_test::allocations {
inline void* allocate(std::size_t n) noexcept {
  if (counting.load(std::memory_order_relaxed) && n >= large_bytes) large.fetch_add(1, std::memory_order_relaxed);
  return std::malloc(n != 0 ? n : 1);
}
}  // namespace resonance_test::allocations
void* operator new(std::size_t n) {
  if (void* p = resonance_test::allocations::allocate(n)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) {
  if (void* p = resonance_test::allocations::allocate(n)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return resonance_test::allocations::allocate(n); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return resonance_test::allocations::allocate(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

namespace {

namespace rs = resonance;
namespace rt = resonance::routing;
using resonance_test::error_of;
using resonance_test::plan_difference;

// Large allocations made by f.
template <class F>
long large_allocations(F&& f) {
  namespace a = resonance_test::allocations;
  a::large = 0;
  a::counting = true;
  f();
  a::counting = false;
  return a::large.load();
}

// Every conformance case routed with route_into on `be`, through one workspace and one plan.
template <class Backend>
void reuse_over_cases(const Backend& be, const std::string& name) {
  using namespace resonance_test::conformance;
  CAPTURE(name);
  rs::route_workspace<Backend> ws;
  rs::routing_plan plan;
  int routed = 0, errors = 0;
  for (int id = 0; id < conformance_cases; ++id) {
    const test_case c = make_case(id);
    std::string want_error;
    const std::optional<rs::routing_plan> want = route_case(rs::backend::serial{}, c, want_error);
    const rs::routing_plan before = plan;
    const std::string got_error = error_of([&] {
      std::visit(
          [&](const auto& direction, const auto& capacity) {
            with_affinity(c, [&](const auto& affinity, auto x) {
              const rs::router<std::decay_t<decltype(affinity)>, std::decay_t<decltype(direction)>,
                               std::decay_t<decltype(capacity)>>
                  r{affinity, direction, capacity};
              r.route_into(be, x, ws, plan);
              CHECK(!ws.pending());  // a host route is complete when route_into returns
              r.finish(be, ws, plan);
            });
          },
          c.direction, c.capacity);
    });
    CHECK_MESSAGE(got_error == want_error, c.text << ": \"" << got_error << "\", serial: \"" << want_error << "\"");
    if (!want) {
      ++errors;
      // A failed route leaves the plan as it was.
      CHECK_MESSAGE(plan_difference(before, plan).empty(), c.text);
      continue;
    }
    ++routed;
    const std::string diff = plan_difference(*want, plan);
    CHECK_MESSAGE(diff.empty(), c.text << ": " << diff << " (serial's first)");
  }
  CHECK(routed >= 300);
  CHECK(errors >= 10);
}

using token_router = rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::factor>;

std::vector<float> normal_logits(rs::index n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  return resonance_test::normal_values(rng, n);
}

}  // namespace

TEST_CASE("route_into on host backends: one workspace and one plan over the conformance cases") {
  // serial, then the defaults a user routes into; route() on every backend takes the same path through
  // its thread's cached workspace, over the same cases, in the conformance suite.
  reuse_over_cases(rs::backend::serial{}, "serial");
#if RESONANCE_HAS_NATIVE
  reuse_over_cases(rs::backend::native{}, "native");
#endif
#if RESONANCE_HAS_TBB
  tbb::task_arena arena(2);
  arena.execute([] { reuse_over_cases(rs::backend::tbb<>{}, "tbb<> in 2 threads"); });
#endif
}

TEST_CASE("route_into on a host backend: a steady loop allocates nothing large, and route() only its plan") {
  const rs::index T = 4096, E = 64;
  const std::vector<float> logits = normal_logits(T * E, 5);
  const rs::matrix_view<const float> x{logits.data(), T, E};
  const token_router r{{}, {.top_k = 4}, {.factor = 1.25}};
  const auto check = [&](const auto& be, const std::string& name) {
    CAPTURE(name);
    using Backend = std::decay_t<decltype(be)>;
    rs::route_workspace<Backend> ws;
    rs::routing_plan plan;
    r.route_into(be, x, ws, plan);  // sizes the workspace and the plan
    const rs::routing_plan want = r.route(rs::backend::serial{}, x);
    CHECK(large_allocations([&] {
            for (int i = 0; i < 3; ++i) r.route_into(be, x, ws, plan);
          }) == 0);
    CHECK(plan_difference(want, plan).empty());
    // A smaller route into the same memory, then the large one again: no stale entry survives.
    const rs::matrix_view<const float> head{logits.data(), 100, E};
    r.route_into(be, head, ws, plan);
    CHECK(plan_difference(r.route(rs::backend::serial{}, head), plan).empty());
    r.route_into(be, x, ws, plan);
    CHECK(plan_difference(want, plan).empty());
    // route() on this thread reuses its temporaries: each call allocates its plan's one block.
    (void)r.route(be, x);
    CHECK(large_allocations([&] {
            const rs::routing_plan p = r.route(be, x);
            CHECK(plan_difference(want, p).empty());
          }) == 1);
  };
  check(rs::backend::serial{}, "serial");
#if RESONANCE_HAS_TBB
  check(rs::backend::tbb<>{}, "tbb<>");
#endif
}

TEST_CASE("route(): a route started on a thread whose cached temporaries are in use allocates its own") {
  // A capacity policy that routes a second, different input from inside the first route's limits()
  // call, on the same thread, while the first route's candidates live in the thread's cache.
  struct reentrant_factor {
    const std::vector<float>* other = nullptr;
    mutable std::optional<rs::routing_plan> inner;
    void validate() const {}
    rs::capacity_limits limits(rs::index T, rs::index E, rs::index k) const {
      const rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::dropless> r{{}, {.top_k = 1}, {}};
      inner = r.route(rs::backend::serial{}, rs::matrix_view<const float>{other->data(), 7, 3});
      return rs::capacity::factor{.factor = 1.0}.limits(T, E, k);
    }
    bool operator==(const reentrant_factor&) const { return true; }
  };
  const std::vector<float> a = normal_logits(50 * 6, 8), b = normal_logits(7 * 3, 9);
  const rs::router<rs::affinity::precomputed, rt::token_choice, reentrant_factor> r{{}, {.top_k = 2}, {&b, {}}};
  const rs::routing_plan got = r.route(rs::backend::serial{}, rs::matrix_view<const float>{a.data(), 50, 6});
  const token_router plain{{}, {.top_k = 2}, {.factor = 1.0}};
  CHECK(
      plan_difference(plain.route(rs::backend::serial{}, rs::matrix_view<const float>{a.data(), 50, 6}), got).empty());
  REQUIRE(r.capacity.inner);
  const rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::dropless> small{{}, {.top_k = 1}, {}};
  CHECK(plan_difference(small.route(rs::backend::serial{}, rs::matrix_view<const float>{b.data(), 7, 3}),
                        *r.capacity.inner)
            .empty());
}
