#pragma once

// A capacity-factor schedule: cf decays from `start` to `end` over `steps` routing calls, linearly or
// along a half cosine, then stays at `end`; C = max(⌈(T·k/E)·cf⌉, min_capacity) as capacity::factor.
// The shared research/etr-spec.md §4.2 "etr_schedule" ablation: emulates ETR's TCR -> ECR transition
// (large C early, about 0.66 late for "40% fewer tokens than cf 1.1") without reading the affinities.

#include <cmath>
#include <cstdint>
#include <numbers>

#include "../core/error.hpp"
#include "capacity.hpp"
#include "factor.hpp"

namespace resonance::capacity {

enum class decay : unsigned char { linear, cosine };

struct schedule {
  double start = 2.0;
  double end = 1.0;
  index steps = 1000;
  decay shape = decay::linear;
  drop_policy drop = drop_policy::score;
  index min_capacity = 0;
  bool pad_to_capacity = false;
  index align = 1;
  std::uint64_t seed = 0;

  struct state_type {
    index step = 0;
    friend constexpr bool operator==(const state_type&, const state_type&) = default;
  };

  // The schedule depends on the step alone: the router may route without materialising the logits.
  static constexpr bool reads_logits = false;

  void validate() const {
    detail::require(std::isfinite(start) && start > 0.0, "schedule.start", "a finite value > 0", start);
    detail::require(std::isfinite(end) && end > 0.0, "schedule.end", "a finite value > 0", end);
    detail::require(steps >= 1, "schedule.steps", "steps >= 1", steps);
    detail::require(shape == decay::linear || shape == decay::cosine, "schedule.shape", "linear or cosine",
                    static_cast<int>(shape));
    as_factor(start).validate();
  }

  // The capacity factor at a given step.
  double factor_at(index step) const {
    // Both ends exactly: end + (start - end) can round to start ± 1 ulp, and ceil then gives C one
    // above capacity::factor{start} where (T·k/E)·start is an integer.
    if (step <= 0) return start;
    if (step >= steps) return end;
    const double x = static_cast<double>(step) / static_cast<double>(steps);
    const double w = shape == decay::linear ? 1.0 - x : 0.5 * (1.0 + std::cos(std::numbers::pi * x));
    return end + (start - end) * w;
  }

  // The capacity::factor policy in force at a given capacity factor.
  capacity::factor as_factor(double cf) const {
    return {.factor = cf,
            .drop = drop,
            .min_capacity = min_capacity,
            .pad_to_capacity = pad_to_capacity,
            .align = align,
            .seed = seed};
  }

  capacity_limits limits(const capacity_context& ctx, state_type& state) const {
    validate();
    const capacity_limits lim = as_factor(factor_at(state.step)).limits(ctx.num_tokens, ctx.num_experts, ctx.top_k);
    state.step += 1;
    return lim;
  }

  friend constexpr bool operator==(const schedule&, const schedule&) = default;
};

static_assert(stateful_capacity_policy<schedule>);

}  // namespace resonance::capacity
