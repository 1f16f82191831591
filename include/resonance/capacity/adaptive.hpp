#pragma once

// ETR's adaptive capacity (arXiv 2406.00023 §3.5-3.6): every step, C is recomputed from statistics of
// the affinities of the token-choice (TCR) assignments, kept monotone non-increasing, and clamped to
// [floor·T·k/E, ceiling·T·k/E]. With routing::bidirectional this is the TCR -> ECR transition: while C
// is at least every expert's demand nothing is dropped (token choice); once C falls below it, each
// expert keeps only its highest-affinity candidates (expert choice among the tokens that chose it).
//
// The paper gives the direction (capacity "progressively decrease[s] as the token feature
// distribution evolves") but no usable formula (shared research/etr-spec.md, open question A7), so the
// estimate is a parameter:
//   resonance (default) — ETR Theorem 5 / Corollary 6: expert choice succeeds once C >= 2·C*, C* the
//     number of class-discriminative candidates; while features are isotropic, TCR needs C = Θ(demand).
//     A candidate "resonates" when its affinity is at least `threshold` (default z/√d, z = 3: three
//     standard deviations of a GrAP-cosine affinity under isotropic features, whose δ ~ N(0, 1/d)).
//     If any expert with candidates has no more resonating candidates than the isotropic null explains
//     (n_e <= 2·μ0 + 3, μ0 = demand_e·(1 − Φ(z)^E)), the estimate is unbounded: C stays at the
//     ceiling (the TCR regime). Otherwise C = max_e min(demand_e, margin·n_e).
//   etr_bound — ETR Remark 7 taken literally: (1/n)·exp(d·δ̂²/(2 − δ̂²)) per sample, δ̂ = the
//     `quantile` of the TCR affinities (it grows with δ̂, so with the monotone rule it mostly pins C).
//   locmoe_bound — LocMoE Eq. 9 (erfc form) with the same δ̂, per sample.
// The estimate is turned into a capacity factor cf = C/(T·k/E), clamped to [floor, ceiling], and
// then to [(1 − max_step)·cf_{t−1}, cf_{t−1}]: monotone non-increasing even when T changes between
// steps, and "progressively" (ETR v1) so that one noisy estimate — the first steps with a weak,
// barely significant resonance see few resonating tokens — cannot drop C to the floor for good. The state
// (step, last factor, last capacity, last statistic) lives in the caller's state_type.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../core/error.hpp"
#include "capacity.hpp"
#include "statistics.hpp"

namespace resonance::capacity {

enum class capacity_estimate : unsigned char { resonance, etr_bound, locmoe_bound };

struct adaptive {
  capacity_estimate estimate = capacity_estimate::resonance;
  double threshold = 0.0;       // resonance: affinity that counts as resonating; 0 = 3/√d
  double margin = 2.0;          // resonance: C >= margin · resonating candidates (ETR Corollary 6: 2·C*)
  double quantile = 0.5;        // bound forms: the quantile of TCR affinities used as δ̂
  index tokens_per_sample = 0;  // bound forms: s; 0 = the batch is one sample
  index hidden_size = 0;        // d of the bound; 0 = the router input's width (set it for precomputed logits)
  double floor = 0.5;           // C >= floor · T·k/E
  double ceiling = 2.0;         // C <= ceiling · T·k/E
  double max_step = 0.1;        // cf may fall by at most this fraction per step (1 = no limit)
  drop_policy drop = drop_policy::score;
  bool pad_to_capacity = false;
  index align = 1;
  std::uint64_t seed = 0;

  struct state_type {
    index step = 0;                                           // routing calls so far
    double factor = std::numeric_limits<double>::infinity();  // cf of the last step (inf before the first)
    index capacity = -1;                                      // C of the last step
    double estimate = 0.0;                                    // the last raw estimate of C, before clamps
    friend constexpr bool operator==(const state_type&, const state_type&) = default;
  };

  void validate() const {
    detail::require(estimate == capacity_estimate::resonance || estimate == capacity_estimate::etr_bound ||
                        estimate == capacity_estimate::locmoe_bound,
                    "adaptive.estimate", "resonance, etr_bound or locmoe_bound", static_cast<int>(estimate));
    detail::require(std::isfinite(threshold) && threshold >= 0.0 && threshold < 1.0, "adaptive.threshold",
                    "0 (3/sqrt(d)) or a cosine in (0, 1)", threshold);
    detail::require(std::isfinite(margin) && margin > 0.0, "adaptive.margin", "a finite value > 0", margin);
    detail::require(quantile >= 0.0 && quantile <= 1.0, "adaptive.quantile", "a value in [0, 1]", quantile);
    detail::require(hidden_size >= 0, "adaptive.hidden_size", "0 (the input width) or d >= 1", hidden_size);
    detail::require(tokens_per_sample >= 0, "adaptive.tokens_per_sample", "a value >= 0", tokens_per_sample);
    detail::require(std::isfinite(floor) && floor > 0.0, "adaptive.floor", "a finite value > 0", floor);
    detail::require(std::isfinite(ceiling) && ceiling >= floor, "adaptive.ceiling", "a finite value >= floor", ceiling);
    detail::require(std::isfinite(max_step) && max_step > 0.0 && max_step <= 1.0, "adaptive.max_step",
                    "a fraction in (0, 1]", max_step);
    detail::require(align >= 1, "align", "align >= 1", align);
  }

  // The raw capacity estimate for one batch (before clamps and monotonicity).
  double estimate_capacity(const capacity_context& ctx) const {
    validate();
    detail::check_capacity_shape(ctx);
    const index T = ctx.num_tokens, E = ctx.num_experts, d = hidden_size > 0 ? hidden_size : ctx.hidden_size;
    const tcr_assignments tcr = tcr_pairs(ctx);
    if (estimate == capacity_estimate::resonance) {
      const double z = 3.0;
      const double delta = threshold > 0.0 ? threshold : z / std::sqrt(static_cast<double>(d > 0 ? d : 1));
      const double zt = delta * std::sqrt(static_cast<double>(d > 0 ? d : 1));
      const double p0 = 1.0 - std::pow(1.0 - 0.5 * std::erfc(zt / std::sqrt(2.0)), static_cast<double>(E));
      double largest = 0.0;
      for (float a : tcr.affinity) largest = std::max(largest, static_cast<double>(std::abs(a)));
      detail::check_cosine_statistic(largest, "adaptive (largest TCR affinity)");
      std::vector<double> demand(static_cast<std::size_t>(E), 0.0), resonating(static_cast<std::size_t>(E), 0.0);
      for (std::size_t i = 0; i < tcr.expert.size(); ++i) {
        demand[static_cast<std::size_t>(tcr.expert[i])] += 1.0;
        if (tcr.affinity[i] >= delta) resonating[static_cast<std::size_t>(tcr.expert[i])] += 1.0;
      }
      double c = 0.0;
      for (std::size_t e = 0; e < demand.size(); ++e) {
        const double null_count = demand[e] * p0;
        // An expert whose candidates do not resonate beyond chance cannot yet tell good tokens from
        // bad ones: it keeps all of them (TCR), so the estimate is unbounded and C sits at the ceiling.
        if (resonating[e] <= 2.0 * null_count + 3.0) {
          if (demand[e] > 0.0) return std::numeric_limits<double>::infinity();
          continue;
        }
        c = std::max(c, std::min(demand[e], margin * resonating[e]));
      }
      return c;
    }
    const double delta_hat = capacity::quantile(tcr.affinity, quantile);
    detail::check_cosine_statistic(delta_hat, "adaptive (estimated delta)");
    const double per_sample =
        estimate == capacity_estimate::etr_bound ? etr_bound(delta_hat, d, E) : locmoe_bound(delta_hat, d, E);
    const double samples =
        tokens_per_sample > 0 ? std::ceil(static_cast<double>(T) / static_cast<double>(tokens_per_sample)) : 1.0;
    return samples * per_sample;
  }

  capacity_limits limits(const capacity_context& ctx, state_type& state) const {
    validate();
    detail::check_capacity_shape(ctx);
    const double per_expert =
        static_cast<double>(ctx.num_tokens) * static_cast<double>(ctx.top_k) / static_cast<double>(ctx.num_experts);
    const double raw = estimate_capacity(ctx);
    double cf = per_expert > 0.0 ? raw / per_expert : ceiling;
    cf = std::clamp(std::isfinite(cf) ? cf : ceiling, floor, ceiling);
    if (std::isfinite(state.factor)) cf = std::clamp(cf, state.factor * (1.0 - max_step), state.factor);
    cf = std::max(cf, floor);
    const double c = std::ceil(per_expert * cf);
    detail::require(c <= static_cast<double>(std::numeric_limits<id_type>::max()), "adaptive.ceiling",
                    "a capacity that fits in 32 bits", c);
    state.step += 1;
    state.factor = cf;
    state.capacity = static_cast<index>(c);
    state.estimate = raw;
    return {.capacity = state.capacity, .drop = drop, .pad_to_capacity = pad_to_capacity, .align = align, .seed = seed};
  }

  friend constexpr bool operator==(const adaptive&, const adaptive&) = default;
};

static_assert(stateful_capacity_policy<adaptive>);

}  // namespace resonance::capacity
