// fuzz_route: the router on fuzzed logits and options, on every host backend of the build.
//
// An input decodes into a shape (T in [0, 64], E in [1, 300], k), a direction with its options
// (token choice with score, temperature, renormalisation, scaling, expert bias, groups and a group map;
// expert choice, causal, with thresholds; bidirectional with its ranking; Sinkhorn), a capacity policy
// (dropless, factor, and the stateful schedule, lower_bound and adaptive, routed for two steps) and the
// T×E logits (grid values with exact ties, NaN, ±Inf, huge, denormal, raw bits). Out-of-range options
// are drawn on purpose. A finding is:
//   - a crash, a sanitizer report, an allocation past -malloc_limit_mb, an exception other than
//     resonance::error;
//   - a route that succeeds on a non-finite logit;
//   - a backend whose error message or plan (every array, bit for bit) or scheduler state differs
//     from serial's;
//   - a plan that breaks the plan contract (tests/conformance.hpp contract_violation: ids in range,
//     kept count = min(demand, C), slots per expert, offsets, padding, the token CSR);
//   - for identity scores at temperature 1 (the weights are the logits), a plan other than the
//     brute-force one of tests/conformance.hpp (reference_candidates, reference_plan).

#define DOCTEST_CONFIG_DISABLE  // the tests' helpers only: no doctest runner in a fuzzer

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <variant>
#include <vector>

#include <resonance/resonance.hpp>

#include "conformance.hpp"
#include "fuzz_input.hpp"

namespace {

namespace rs = resonance;
namespace rt = resonance::routing;
namespace ra = resonance::affinity;
namespace cap = resonance::capacity;
namespace conf = resonance_test::conformance;
using resonance_fuzz::byte_source;
using resonance_fuzz::finding;
using resonance_fuzz::require;
using rs::id_type;
using rs::index;

constexpr float nan_f = std::numeric_limits<float>::quiet_NaN();
constexpr float inf_f = std::numeric_limits<float>::infinity();
constexpr double nan_d = std::numeric_limits<double>::quiet_NaN();
constexpr double inf_d = std::numeric_limits<double>::infinity();
constexpr index huge = std::numeric_limits<index>::max();

using capacity_variant = std::variant<cap::dropless, cap::factor, cap::schedule, cap::lower_bound, cap::adaptive>;

struct scenario {
  index T = 0, E = 1, k = 1, stride = 1;
  index first_rows = 0;  // rows of the first step of a stateful scheduler (the second routes all T)
  std::vector<float> x;  // the logits, row stride `stride`; the gaps hold NaN and are never read
  std::vector<float> bias, thresholds;
  std::vector<id_type> groups;
  conf::direction_variant direction;
  capacity_variant capacity;
};

std::string describe(const scenario& s) {
  constexpr const char* directions[] = {"token_choice", "expert_choice", "bidirectional", "sinkhorn"};
  constexpr const char* capacities[] = {"dropless", "factor", "schedule", "lower_bound", "adaptive"};
  return "T=" + std::to_string(s.T) + " E=" + std::to_string(s.E) + " k=" + std::to_string(s.k) + " stride " +
         std::to_string(s.stride) + " " + directions[s.direction.index()] + " " + capacities[s.capacity.index()];
}

// Sizes (align, min_capacity, tokens per sample, hidden size): small ones, and ones the router must
// reject or survive. None between 2^16 and 2^31, where a legitimate plan would take gigabytes.
index size_option(byte_source& in, index T) {
  return in.pick<index>({1, 1, 1, 2, 3, 4, 8, 0, T, T + 5, -1, index{1} << 31, index{1} << 40, huge, -huge});
}
rs::drop_policy drop_option(byte_source& in) { return static_cast<rs::drop_policy>(in.below(4)); }  // 3: invalid
double factor_option(byte_source& in) {
  return in.pick<double>({1.0, 1.0, 0.1, 0.25, 0.5, 0.75, 1.25, 2.0, 8.0, 0.0, -1.0, nan_d, inf_d, 1e300, 1e-300});
}

// Token choice's options (bidirectional proposes with the same ones).
rt::token_choice decode_proposal(byte_source& in, scenario& s) {
  rt::token_choice p{.top_k = s.k};
  p.score = static_cast<rs::score>(in.below(5));  // 4 is not a score
  p.pre_softmax = in.one_in(4);
  p.temperature = in.pick<float>({1.0f, 1.0f, 1.0f, 0.5f, 2.0f, 1e-3f, 1e-30f, 1e-38f, 0.0f, -1.0f, nan_f, inf_f});
  p.renorm = static_cast<rt::renormalize>(in.below(3));
  p.renorm_epsilon = in.pick<float>({1e-20f, 1e-20f, 0.0f, 1.0f, -1.0f, nan_f});
  p.scaling_factor = in.pick<float>({1.0f, 1.0f, 1.0f, 2.5f, 0.5f, 1e30f, 0.0f, -1.0f, nan_f});
  if (in.one_in(3)) {
    const index n = in.one_in(8) ? s.E - 1 : s.E;  // one entry short: rejected
    for (index e = 0; e < n; ++e) s.bias.push_back(in.value());
    p.expert_bias = {s.bias.data(), n};
  }
  if (in.one_in(3)) {
    // Usually a divisor of E (contiguous groups need one), sometimes any count in [-1, E].
    std::vector<index> divisors;
    for (index g = 1; g <= s.E; ++g)
      if (s.E % g == 0) divisors.push_back(g);
    p.num_groups = in.one_in(4) ? in.below(s.E + 2) - 1
                                : divisors[static_cast<std::size_t>(in.below(static_cast<index>(divisors.size())))];
    p.group_topk =
        in.one_in(8) ? in.pick<index>({0, p.num_groups + 1}) : 1 + in.below(std::max<index>(p.num_groups, 1));
    p.group_scoring = static_cast<rt::group_score>(in.below(4));  // 3 is not a group score
    if (in.one_in(3)) {
      // A group per expert: usually in range, sometimes one past it.
      const index groups = p.num_groups > 0 ? p.num_groups : 1;
      for (index e = 0; e < s.E; ++e) s.groups.push_back(static_cast<id_type>(in.below(groups + (in.one_in(16)))));
      p.expert_group = {s.groups.data(), s.E};
    }
  }
  return p;
}

conf::direction_variant decode_direction(byte_source& in, scenario& s, index kind) {
  switch (kind) {
    case 0:
      return decode_proposal(in, s);
    case 1: {
      rt::expert_choice p{.top_k = s.k};
      p.score = static_cast<rs::score>(in.below(5));
      p.temperature = in.pick<float>({1.0f, 1.0f, 0.7f, 1.3f, 1e-3f, 0.0f, nan_f});
      p.causal = in.one_in(2);
      if (in.one_in(p.causal ? 2 : 8)) {  // thresholds without causal: rejected
        for (index e = 0; e < s.E; ++e) s.thresholds.push_back(in.value());
        p.thresholds = {s.thresholds.data(), s.E};
      }
      return p;
    }
    case 2: {
      const rt::token_choice q = decode_proposal(in, s);
      return rt::bidirectional{.top_k = q.top_k,
                               .score = q.score,
                               .pre_softmax = q.pre_softmax,
                               .temperature = q.temperature,
                               .renorm = q.renorm,
                               .renorm_epsilon = q.renorm_epsilon,
                               .scaling_factor = q.scaling_factor,
                               .expert_bias = q.expert_bias,
                               .num_groups = q.num_groups,
                               .group_topk = q.group_topk,
                               .group_scoring = q.group_scoring,
                               .expert_group = q.expert_group,
                               .rank = static_cast<rt::rank_by>(in.below(4)),  // 3 is not a ranking
                               .causal = in.one_in(3)};
    }
    default:
      // Few iterations: the fuzzer's time is better spent on more inputs than on converging.
      return rt::sinkhorn{.top_k = s.k,
                          .max_iterations = in.pick<index>({1, 2, 5, 20, 0, -1}),
                          .tolerance = in.pick<double>({1e-4, 1e-2, 1e-9, 0.0, -1.0, nan_d, inf_d})};
  }
}

capacity_variant decode_capacity(byte_source& in, const scenario& s, index kind) {
  switch (kind) {
    case 0:
      return cap::dropless{.align = in.one_in(2) ? size_option(in, s.T) : 1};
    case 1:
      return cap::factor{.factor = factor_option(in),
                         .drop = drop_option(in),
                         .min_capacity = in.one_in(2) ? size_option(in, s.T) : 0,
                         .pad_to_capacity = in.one_in(3),
                         .align = in.one_in(2) ? size_option(in, s.T) : 1,
                         .seed = in.u64()};
    case 2:
      return cap::schedule{.start = factor_option(in),
                           .end = factor_option(in),
                           .steps = in.pick<index>({1, 2, 10, 0, -1}),
                           .shape = static_cast<cap::decay>(in.below(3)),  // 2 is not a shape
                           .drop = drop_option(in),
                           .min_capacity = in.one_in(2) ? size_option(in, s.T) : 0,
                           .pad_to_capacity = in.one_in(3),
                           .align = in.one_in(2) ? size_option(in, s.T) : 1,
                           .seed = in.u64()};
    case 3:
      return cap::lower_bound{.delta = in.pick<double>({0.0, 0.0, 0.03, 0.5, 0.99, 1.0, -0.1, nan_d}),
                              .quantile = in.pick<double>({0.5, 0.0, 1.0, 1.5, -0.1, nan_d}),
                              .tokens_per_sample = in.one_in(2) ? size_option(in, s.T) : 0,
                              .hidden_size = in.pick<index>({0, 0, 16, 4096, -1, huge}),
                              .drop = drop_option(in),
                              .pad_to_capacity = in.one_in(3),
                              .align = in.one_in(2) ? size_option(in, s.T) : 1,
                              .seed = in.u64()};
    default:
      return cap::adaptive{.estimate = static_cast<cap::capacity_estimate>(in.below(4)),  // 3: invalid
                           .threshold = in.pick<double>({0.0, 0.0, 0.1, 0.5, 0.99, -0.1, 1.0, nan_d}),
                           .margin = in.pick<double>({2.0, 0.5, 0.0, nan_d}),
                           .quantile = in.pick<double>({0.5, 0.0, 1.0, 1.5, nan_d}),
                           .tokens_per_sample = in.one_in(2) ? size_option(in, s.T) : 0,
                           .hidden_size = in.pick<index>({0, 0, 16, 4096, -1, huge}),
                           .floor = in.pick<double>({0.5, 0.1, 1.0, 0.0, -1.0, inf_d}),
                           .ceiling = in.pick<double>({2.0, 1.0, 0.25, 8.0, inf_d, nan_d}),
                           .max_step = in.pick<double>({0.1, 1.0, 0.5, 0.0, 1.5, nan_d}),
                           .warmup = 0,  // two steps: a warm-up would leave both at the ceiling
                           .drop = drop_option(in),
                           .pad_to_capacity = in.one_in(3),
                           .align = in.one_in(2) ? size_option(in, s.T) : 1,
                           .seed = in.u64()};
  }
}

scenario decode(byte_source& in) {
  scenario s;
  // The policies first, so that even the shortest inputs reach every direction and capacity.
  const index direction = in.below(4), capacity = in.below(5);
  s.T = in.below(65);
  s.E = 1 + in.below(300);
  // k: usually small and valid; sometimes anywhere in [1, E], 0, or past E (rejected).
  switch (in.below(8)) {
    case 7:
      s.k = in.pick<index>({0, s.E + 1, -1});
      break;
    case 6:
      s.k = 1 + in.below(s.E);
      break;
    default:
      s.k = 1 + in.below(std::min<index>(s.E, 8));
  }
  s.stride = s.E + in.pick<index>({0, 0, 0, 1, 3});
  s.first_rows = in.below(s.T + 1);
  s.direction = decode_direction(in, s, direction);
  s.capacity = decode_capacity(in, s, capacity);
  // lower_bound and adaptive read the logits as cosines (|δ| <= 1, else an error): for them the grid
  // is scaled by 1/4 unless the input says otherwise. A power of two keeps the ties exact.
  const bool cosines = capacity == 3 || capacity == 4;
  const float scale = cosines ? in.pick({0.25f, 1.0f}) : in.pick({1.0f, 0.25f});
  // Exactly the rows' extent, so that a read past the last row's E logits is an ASan report.
  s.x.assign(s.T == 0 ? 1 : static_cast<std::size_t>((s.T - 1) * s.stride + s.E), nan_f);
  for (index t = 0; t < s.T; ++t)
    for (index e = 0; e < s.E; ++e) s.x[static_cast<std::size_t>(t * s.stride + e)] = in.value() * scale;
  return s;
}

rs::matrix_view<const float> rows_of(const scenario& s, index rows) { return {s.x.data(), rows, s.E, s.stride}; }

// A scheduler's state after a step, compared by value (adaptive's holds vectors: its bytes are not its value).
using state_variant = std::variant<cap::schedule::state_type, cap::lower_bound::state_type, cap::adaptive::state_type>;

// What one backend made of the scenario: the error ("no throw" when it routed), the plan of each step,
// and the scheduler's state after each step.
struct outcome {
  std::string error;
  std::vector<rs::routing_plan> plans;
  std::vector<state_variant> states;
};

template <class Backend>
outcome route_on(const Backend& be, const scenario& s) {
  outcome out;
  out.error = resonance_test::error_of([&] {
    std::visit(
        [&](const auto& direction, const auto& capacity) {
          using C = std::decay_t<decltype(capacity)>;
          // Declared cosines, so that lower_bound and adaptive estimate (logits beyond |1| are still refused).
          const rs::router<ra::precomputed, std::decay_t<decltype(direction)>, C> r{
              {.cosines = true}, direction, capacity};
          if constexpr (rs::stateful_capacity_policy<C>) {
            rs::capacity_state_t<C> state{};
            for (const index rows : {s.first_rows, s.T}) {
              const rs::capacity_state_t<C> before = state;
              try {
                out.plans.push_back(rs::to_host(be, r.route(be, rows_of(s, rows), state)));
              } catch (const rs::error&) {
                require(state == before, describe(s) + ": a route that threw changed the scheduler's state");
                throw;
              }
              out.states.emplace_back(state);
            }
          } else {
            out.plans.push_back(rs::to_host(be, r.route(be, rows_of(s, s.T))));
          }
        },
        s.direction, s.capacity);
  });
  return out;
}

index top_k_of(const conf::direction_variant& d) {
  return std::visit([](const auto& p) { return p.top_k; }, d);
}

// Identity scores at temperature 1 with no groups and no scaling: the weights are the logits, and
// tests/conformance.hpp's brute force rebuilds the plan from them (stateless capacities only).
bool brute_force_applies(const scenario& s) {
  if (!std::holds_alternative<cap::dropless>(s.capacity) && !std::holds_alternative<cap::factor>(s.capacity))
    return false;
  const auto plain_proposal = [](const auto& p) {
    return p.score == rs::score::identity && !p.pre_softmax && p.temperature == 1.0f && p.scaling_factor == 1.0f &&
           p.renorm != rt::renormalize::always && p.num_groups == 0 && p.group_topk == 0 && p.expert_group.empty();
  };
  if (const auto* p = std::get_if<rt::token_choice>(&s.direction)) return plain_proposal(*p);
  if (const auto* p = std::get_if<rt::bidirectional>(&s.direction)) return plain_proposal(*p);
  if (const auto* p = std::get_if<rt::expert_choice>(&s.direction))
    return p->score == rs::score::identity && p->temperature == 1.0f;
  return false;
}

// The conformance suite's view of a stateless scenario (for its expected limits and brute force).
conf::test_case as_test_case(const scenario& s) {
  conf::test_case c;
  c.T = s.T;
  c.E = s.E;
  c.k = top_k_of(s.direction);
  c.d = s.E;
  c.stride = s.stride;
  c.x = s.x;
  c.bias = s.bias;
  c.thresholds = s.thresholds;
  c.direction = s.direction;
  if (const auto* q = std::get_if<cap::dropless>(&s.capacity))
    c.capacity = *q;
  else
    c.capacity = std::get<cap::factor>(s.capacity);
  return c;
}

// The rows a step routed: all of them, but for the first of a scheduler's two steps.
index rows_of_step(const scenario& s, const outcome& o, std::size_t step) {
  return o.plans.size() == 2 && step == 0 ? s.first_rows : s.T;
}

// The limits a successful step must have used: the formula for the stateless policies, the state's
// record for the schedulers.
rs::capacity_limits limits_of_step(const scenario& s, const outcome& o, std::size_t step) {
  const index rows = rows_of_step(s, o, step);
  const index k = top_k_of(s.direction);
  return std::visit(
      [&](const auto& q) -> rs::capacity_limits {
        using C = std::decay_t<decltype(q)>;
        if constexpr (std::is_same_v<C, cap::dropless> || std::is_same_v<C, cap::factor>) {
          return conf::expected_limits(as_test_case(s));
        } else {
          const auto& state = std::get<rs::capacity_state_t<C>>(o.states[step]);
          index C_ = 0;
          if constexpr (std::is_same_v<C, cap::schedule>) {
            C_ = q.as_factor(q.factor_at(state.step - 1)).capacity(rows, s.E, k);
          } else if constexpr (std::is_same_v<C, cap::lower_bound>) {
            C_ = state.capacity >= 0 ? state.capacity : 0;  // an empty first batch fixes nothing: C = 0
          } else {
            C_ = state.capacity;
          }
          return {
              .capacity = C_, .drop = q.drop, .pad_to_capacity = q.pad_to_capacity, .align = q.align, .seed = q.seed};
        }
      },
      s.capacity);
}

// With RESONANCE_FUZZ_STATS set, what the inputs exercised is printed at exit: a fuzzer whose inputs
// all fail validation would otherwise pass while checking little.
struct tally {
  long inputs = 0, routed = 0, brute_force = 0;
  long directions[4] = {}, capacities[5] = {};
  ~tally() {
    if (std::getenv("RESONANCE_FUZZ_STATS") == nullptr) return;
    std::fprintf(stderr,
                 "fuzz_route: %ld inputs, %ld routed (%ld checked by brute force); routed by direction "
                 "%ld/%ld/%ld/%ld, by capacity %ld/%ld/%ld/%ld/%ld\n",
                 inputs, routed, brute_force, directions[0], directions[1], directions[2], directions[3], capacities[0],
                 capacities[1], capacities[2], capacities[3], capacities[4]);
  }
};
tally counts;

void check(const scenario& s) {
  ++counts.inputs;
  const std::string what = describe(s);
  outcome want;
  bool have_serial = false;
  resonance_fuzz::for_each_host_backend([&](const auto& be, const char* name) {
    outcome got = route_on(be, s);
    require(got.error.rfind("<not a resonance::error>", 0) != 0, what + ": " + name + " threw " + got.error);
    if (!have_serial) {
      want = std::move(got);
      have_serial = true;
      return;
    }
    require(got.error == want.error,
            what + ": " + name + " threw \"" + got.error + "\", serial \"" + want.error + "\"");
    require(got.plans.size() == want.plans.size(), what + ": " + name + " routed a different number of steps");
    for (std::size_t i = 0; i < got.plans.size(); ++i) {
      const std::string diff = resonance_test::plan_difference(want.plans[i], got.plans[i]);
      require(diff.empty(), what + ": " + name + ", step " + std::to_string(i) + ": " + diff + " (serial's first)");
    }
    require(got.states == want.states, what + ": " + name + ": the scheduler's state differs from serial's");
  });

  // A non-finite logit among the routed rows must fail the route.
  bool finite = true;
  for (index t = 0; t < s.T; ++t)
    for (index e = 0; e < s.E; ++e) finite &= std::isfinite(s.x[static_cast<std::size_t>(t * s.stride + e)]);
  if (!finite) require(want.error != "no throw", what + ": routed despite a non-finite logit");
  if (want.error != "no throw") return;
  ++counts.routed;
  ++counts.directions[s.direction.index()];
  ++counts.capacities[s.capacity.index()];

  const bool per_expert = std::holds_alternative<rt::expert_choice>(s.direction);
  const index k = top_k_of(s.direction);
  for (std::size_t i = 0; i < want.plans.size(); ++i) {
    const rs::routing_plan& plan = want.plans[i];
    const std::string broken = conf::contract_violation(plan, rows_of_step(s, want, i), s.E, limits_of_step(s, want, i),
                                                        per_expert ? s.E : k, per_expert ? 0 : k);
    require(broken.empty(), what + ", step " + std::to_string(i) + ": plan contract: " + broken);
  }
  if (brute_force_applies(s)) {
    ++counts.brute_force;
    const conf::test_case c = as_test_case(s);
    const std::string diff = resonance_test::plan_difference(
        conf::reference_plan(conf::reference_candidates(c), conf::expected_limits(c)), want.plans.front());
    require(diff.empty(), what + ": brute force: " + diff + " (brute force first)");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  byte_source in(data, size);
  check(decode(in));
  return 0;
}
