// Every public function of the capacity policies checks its own arguments: called directly (not
// through a router, which validates first), a bad value is a resonance::error naming it, never a
// division by zero or a non-finite double converted to an integer (UB that UBSan reports), and a
// stateful policy's state is left as it was.

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/resonance.hpp>

#include "error_of.hpp"

namespace {

namespace rs = resonance;
namespace cap = resonance::capacity;
using resonance_test::error_of;

constexpr double not_a_number = std::numeric_limits<double>::quiet_NaN();
constexpr double infinite = std::numeric_limits<double>::infinity();

bool names(const std::string& message, const std::string& argument) {
  return message.rfind("resonance: " + argument + ": expected", 0) == 0;
}

}  // namespace

TEST_CASE("capacity arguments: factor and dropless check their shape and their own fields") {
  const cap::factor f{.factor = 1.25};
  CHECK(f.capacity(100, 8, 2) == 32);  // ceil(100·2/8·1.25): the valid call still works
  CHECK(names(error_of([&] { (void)f.capacity(100, 0, 2); }), "num_experts"));
  CHECK(names(error_of([&] { (void)f.capacity(-1, 8, 2); }), "num_tokens"));
  CHECK(names(error_of([&] { (void)f.capacity(100, 8, 0); }), "top_k"));
  CHECK(names(error_of([&] { (void)f.limits(100, 0, 2); }), "num_experts"));
  for (const double bad : {not_a_number, infinite, -1.0, 0.0}) {
    CAPTURE(bad);
    const cap::factor g{.factor = bad};
    CHECK(names(error_of([&] { (void)g.capacity(100, 8, 2); }), "capacity factor"));
  }
  CHECK(names(error_of([&] { (void)cap::factor{.min_capacity = -1}.capacity(10, 2, 1); }), "min_capacity"));
  const cap::dropless dl{};
  CHECK(dl.limits(10, 4, 2).capacity == -1);
  CHECK(names(error_of([&] { (void)dl.limits(10, 0, 2); }), "num_experts"));
  CHECK(names(error_of([&] { (void)cap::dropless{.align = 0}.limits(10, 4, 2); }), "align"));
}

TEST_CASE("capacity arguments: stateful policies check before touching their state") {
  const rs::capacity_context ctx{.num_tokens = 16, .num_experts = 0, .top_k = 1, .hidden_size = 8};
  {
    cap::lower_bound::state_type st{};
    const cap::lower_bound::state_type before = st;
    CHECK(names(error_of([&] { (void)cap::lower_bound{.delta = 0.5}.limits(ctx, st); }), "num_experts"));
    const rs::capacity_context ok{.num_tokens = 16, .num_experts = 4, .top_k = 1, .hidden_size = 8};
    for (const double bad : {not_a_number, infinite, -0.5, 1.5}) {
      CAPTURE(bad);
      CHECK(names(error_of([&] { (void)cap::lower_bound{.delta = bad}.limits(ok, st); }), "lower_bound.delta"));
    }
    CHECK(st == before);
    // A valid δ gives the closed form: C = ceil(1 / (E · erfc(sqrt(d δ² / (2 − δ²))))), at least 1.
    const rs::capacity_limits lim = cap::lower_bound{.delta = 0.5}.limits(ok, st);
    const double want = std::ceil(1.0 / (4.0 * std::erfc(std::sqrt(8.0 * 0.25 / 1.75))));
    CHECK(lim.capacity == static_cast<rs::index>(want));
  }
  {
    cap::adaptive::state_type st{};
    const cap::adaptive::state_type before = st;
    CHECK(names(error_of([&] { (void)cap::adaptive{}.limits(ctx, st); }), "num_experts"));
    CHECK(names(error_of([&] { (void)cap::adaptive{}.estimate_capacity(ctx); }), "num_experts"));
    const rs::capacity_context ok{.num_tokens = 16, .num_experts = 4, .top_k = 1, .hidden_size = 8};
    CHECK(names(error_of([&] { (void)cap::adaptive{.floor = not_a_number}.limits(ok, st); }), "adaptive.floor"));
    CHECK(names(error_of([&] { (void)cap::adaptive{.ceiling = infinite}.limits(ok, st); }), "adaptive.ceiling"));
    CHECK(names(error_of([&] { (void)cap::adaptive{.max_step = not_a_number}.limits(ok, st); }), "adaptive.max_step"));
    CHECK(names(error_of([&] { (void)cap::adaptive{.quantile = not_a_number}.estimate_capacity(ok); }),
                "adaptive.quantile"));
    CHECK(st == before);
  }
  {
    cap::schedule::state_type st{};
    const cap::schedule::state_type before = st;
    const rs::capacity_context ok{.num_tokens = 16, .num_experts = 4, .top_k = 1, .hidden_size = 8};
    CHECK(names(error_of([&] { (void)cap::schedule{.start = not_a_number}.limits(ok, st); }), "schedule.start"));
    CHECK(names(error_of([&] { (void)cap::schedule{}.limits(ctx, st); }), "num_experts"));
    CHECK(st == before);
  }
}

TEST_CASE("capacity arguments: the statistics and the closed-form bounds") {
  const std::vector<float> v{0.1f, 0.4f, 0.2f, 0.3f};
  CHECK(cap::quantile(v, 0.5) == doctest::Approx(0.3));  // nearest rank floor(0.5·4) = 2 of sorted
  for (const double bad : {not_a_number, -infinite, infinite, -0.1, 1.5}) {
    CAPTURE(bad);
    CHECK(names(error_of([&] { (void)cap::quantile(v, bad); }), "quantile"));
  }
  // LocMoE Eq. 9: 1 / (n · erfc(sqrt(d δ² / (2 − δ²)))); ETR Remark 7: exp(d δ² / (2 − δ²)) / n.
  CHECK(cap::locmoe_bound(0.5, 8, 4) == doctest::Approx(1.0 / (4.0 * std::erfc(std::sqrt(8.0 * 0.25 / 1.75)))));
  CHECK(cap::etr_bound(0.5, 8, 4) == doctest::Approx(std::exp(8.0 * 0.25 / 1.75) / 4.0));
  for (const auto bound : {&cap::locmoe_bound, &cap::etr_bound}) {
    for (const double bad : {not_a_number, infinite, 1.5, -2.0}) {
      CAPTURE(bad);
      CHECK(names(error_of([&] { (void)bound(bad, 8, 4); }), "delta"));
    }
    CHECK(names(error_of([&] { (void)bound(0.5, 0, 4); }), "hidden_size"));
    CHECK(names(error_of([&] { (void)bound(0.5, 8, 0); }), "num_experts"));
  }
}
