#pragma once

// ETR's adaptive capacity (arXiv 2406.00023 §3.5-3.6): every step, C is re-estimated from statistics of
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
//     Per expert, with D_e its demand and n_e its resonating candidates:
//       - n_e > 2·μ0 + 3 (μ0 = D_e·(1 − Φ(z)^E), the isotropic null): it resonates, and needs
//         min(D_e, margin·n_e) slots;
//       - otherwise it cannot tell good tokens from bad ones yet and keeps all of them (TCR): if D_e
//         exceeds the floor capacity the estimate is unbounded and C stays where it is (the ceiling
//         in the TCR regime); an expert whose demand fits under the floor keeps all of its candidates
//         at any C this scheduler can choose, so it needs D_e and never holds C up.
//     C = the largest need.
//   etr_bound — ETR Remark 7 taken literally: (1/n)·exp(d·δ̂²/(2 − δ̂²)) per sample, δ̂ = the
//     `quantile` of the TCR affinities (it grows with δ̂, so with the monotone rule it mostly pins C).
//   locmoe_bound — LocMoE Eq. 9 (erfc form) with the same δ̂, per sample.
//
// Stability. One batch is a noisy sample: an expert that resonates in one batch may fall under the
// null in the next, and a rule that read each batch alone flipped between a finite and an unbounded
// estimate, so that under the monotone rule the first finite batches decided C for good. The estimate
// therefore reads statistics smoothed over batches: an exponential moving average with a half-life of
// `half_life` steps (bias-corrected: the weighted mean of the batches seen so far, so the first batch
// is not over-weighted) of each expert's demand D_e and resonating count n_e, of the TCR pairs per
// batch, and of δ̂. The counts are rescaled to the current batch (D_e · pairs / smoothed pairs), so
// the resonating fraction n_e / D_e is what is smoothed and T may change between steps. A batch that
// alone would look unbounded moves the averages by its weight only, and an unbounded estimate never
// raises C: it holds it for that step.
//
// Warm-up. The first `warmup` batches that carry tokens route at the ceiling (TCR, as the paper's early
// training), while the statistics fill; from the next one on C follows the estimate. The estimate
// becomes a capacity factor cf = C/(T·k/E), clamped to [floor, ceiling] and then to
// [(1 − max_step)·cf_{t−1}, cf_{t−1}]: monotone non-increasing even when T changes, and progressive
// (ETR v1's word), at most max_step lower per step. An empty batch routes nothing (C = 0) and changes
// neither the statistics nor the factor.
//
// Defaults: half_life 10 steps — about 30 batches carry 7/8 of the weight, enough to average out
// per-batch noise while following a drift over tens of steps; warmup 20 (two half-lives): by then no
// single batch weighs more than about 9% (the newest) and the first one about 2%. half_life = 0 and
// warmup = 0 give the batch-by-batch rule (the resonance-null rule above on each batch alone).
//
// All estimates read cosine statistics, so the router's logits must be cosines
// (capacity_context::cosine_scale: affinity::cosine, affinity::grap_cosine, or
// affinity::precomputed{.cosines = true}); anything else is an error. The state (step, factor,
// capacity, estimate and the smoothed statistics) lives in the caller's state_type.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>
#include <string>
#include <utility>
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
  double half_life = 10.0;      // steps after which a batch's weight in the statistics halves; 0 = no smoothing
  index warmup = 20;            // the first `warmup` non-empty batches route at the ceiling (TCR)
  drop_policy drop = drop_policy::score;
  bool pad_to_capacity = false;
  index align = 1;
  std::uint64_t seed = 0;

  struct state_type {
    index step = 0;                                           // routing calls so far
    double factor = std::numeric_limits<double>::infinity();  // cf of the last step (inf before the first)
    index capacity = -1;                                      // C of the last step
    double estimate = 0.0;       // the last step's estimate of C from the smoothed statistics, before clamps
                                 // (inf: unbounded, or an empty batch); computed during the warm-up too
    index observed = 0;          // non-empty batches folded into the statistics
    double weight = 0.0;         // 1 − (1 − α)^observed, α = 1 − 2^(−1/half_life): the averages' normaliser
    double pairs = 0.0;          // smoothed TCR pairs per batch
    double delta = 0.0;          // smoothed δ̂ (the bound forms' statistic)
    std::vector<double> demand;  // per expert: smoothed TCR pairs proposing to it (D_e)
    std::vector<double> resonating;  // per expert: smoothed resonating ones among them (n_e)
    friend bool operator==(const state_type&, const state_type&) = default;
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
    detail::require(std::isfinite(half_life) && half_life >= 0.0, "adaptive.half_life",
                    "a finite number of steps >= 0 (0: no smoothing)", half_life);
    detail::require(warmup >= 0, "adaptive.warmup", "a number of steps >= 0", warmup);
    detail::require(align >= 1, "align", "align >= 1", align);
  }

  // The weight of the newest batch in the moving averages: α = 1 − 2^(−1/half_life), 1 without smoothing.
  double smoothing_rate() const { return half_life > 0.0 ? -std::expm1(-std::numbers::ln2 / half_life) : 1.0; }

  // The estimate of C for this batch alone (a fresh state's first step), before clamps and warm-up.
  double estimate_capacity(const capacity_context& ctx) const {
    validate();
    check_context(ctx);
    state_type fresh;
    const index pairs = observe(ctx, fresh);
    return pairs > 0 ? smoothed_estimate(ctx, fresh, pairs) : std::numeric_limits<double>::infinity();
  }

  capacity_limits limits(const capacity_context& ctx, state_type& state) const {
    validate();
    check_context(ctx);
    const index E = ctx.num_experts;
    detail::require(state.demand.empty() || static_cast<index>(state.demand.size()) == E, "adaptive state",
                    "a state_type carried between routes with the same number of experts (" + std::to_string(E) + ")",
                    state.demand.size(), " experts");
    // Everything on a copy: a throw leaves the caller's state as it was.
    state_type next = state;
    const index pairs = observe(ctx, next);
    const double per_expert =
        static_cast<double>(ctx.num_tokens) * static_cast<double>(ctx.top_k) / static_cast<double>(E);
    const double raw = pairs > 0 ? smoothed_estimate(ctx, next, pairs) : std::numeric_limits<double>::infinity();
    // No information (empty batch), warm-up, or an unbounded estimate: the target is the ceiling, which
    // the rate limit below turns into "hold".
    const bool follow = pairs > 0 && next.observed > warmup && std::isfinite(raw) && per_expert > 0.0;
    double cf = std::clamp(follow ? raw / per_expert : ceiling, floor, ceiling);
    if (std::isfinite(next.factor)) cf = std::clamp(cf, next.factor * (1.0 - max_step), next.factor);
    cf = std::max(cf, floor);
    const double c = std::ceil(per_expert * cf);
    detail::require(c <= static_cast<double>(std::numeric_limits<id_type>::max()), "adaptive.ceiling",
                    "a capacity that fits in 32 bits", c);
    next.step += 1;
    next.factor = cf;
    next.capacity = static_cast<index>(c);
    next.estimate = raw;
    state = std::move(next);
    return {.capacity = state.capacity, .drop = drop, .pad_to_capacity = pad_to_capacity, .align = align, .seed = seed};
  }

  friend constexpr bool operator==(const adaptive&, const adaptive&) = default;

 private:
  void check_context(const capacity_context& ctx) const {
    detail::check_capacity_shape(ctx);
    detail::require_cosine_logits(ctx, "adaptive",
                                  "its estimates are cosine statistics; with another gate use capacity::schedule "
                                  "or capacity::factor");
  }

  index bound_width(const capacity_context& ctx) const { return hidden_size > 0 ? hidden_size : ctx.hidden_size; }

  // The resonance threshold and the probability that an isotropic token's largest affinity reaches it.
  struct resonance_null {
    double threshold, p0;
  };
  resonance_null null_of(index d, index E) const {
    const double dd = static_cast<double>(d > 0 ? d : 1);
    const double thr = threshold > 0.0 ? threshold : 3.0 / std::sqrt(dd);
    const double z = thr * std::sqrt(dd);
    return {thr, 1.0 - std::pow(1.0 - 0.5 * std::erfc(z / std::numbers::sqrt2), static_cast<double>(E))};
  }

  // Folds this batch's TCR statistics into s (after checking them; s is untouched when they fail);
  // returns the number of TCR pairs (0: an empty batch, not folded).
  index observe(const capacity_context& ctx, state_type& s) const {
    const tcr_assignments tcr = tcr_pairs(ctx);
    const auto n = static_cast<index>(tcr.expert.size());
    if (n == 0) return 0;
    const index E = ctx.num_experts;
    const double delta_hat = capacity::quantile(tcr.affinity, quantile);
    if (estimate != capacity_estimate::resonance)
      detail::check_cosine_statistic(delta_hat, "adaptive (estimated delta)");
    double largest = 0.0;
    for (float a : tcr.affinity) largest = std::max(largest, static_cast<double>(std::abs(a)));
    detail::check_cosine_statistic(largest, "adaptive (largest TCR affinity)");
    const double thr = null_of(bound_width(ctx), E).threshold;
    std::vector<double> demand(static_cast<std::size_t>(E), 0.0), resonating(static_cast<std::size_t>(E), 0.0);
    for (std::size_t i = 0; i < tcr.expert.size(); ++i) {
      demand[static_cast<std::size_t>(tcr.expert[i])] += 1.0;
      if (tcr.affinity[i] >= thr) resonating[static_cast<std::size_t>(tcr.expert[i])] += 1.0;
    }
    // The bias-corrected moving average as a running mean with gain α / weight: the first batch
    // gets gain 1 (the average is that batch, exactly), a constant stream stays exactly constant.
    const double alpha = smoothing_rate();
    const double weight = s.weight * (1.0 - alpha) + alpha;
    const double gain = std::min(1.0, alpha / weight);
    if (s.demand.empty()) {
      s.demand.assign(static_cast<std::size_t>(E), 0.0);
      s.resonating.assign(static_cast<std::size_t>(E), 0.0);
    }
    for (std::size_t e = 0; e < demand.size(); ++e) {
      s.demand[e] += gain * (demand[e] - s.demand[e]);
      s.resonating[e] += gain * (resonating[e] - s.resonating[e]);
    }
    s.pairs += gain * (static_cast<double>(n) - s.pairs);
    s.delta += gain * (delta_hat - s.delta);
    s.weight = weight;
    s.observed += 1;
    return n;
  }

  // The estimate of C for a batch of `pairs` TCR pairs from the smoothed statistics in s.
  double smoothed_estimate(const capacity_context& ctx, const state_type& s, index pairs) const {
    const index T = ctx.num_tokens, E = ctx.num_experts, d = bound_width(ctx);
    if (estimate == capacity_estimate::resonance) {
      const resonance_null null = null_of(d, E);
      // Counts per batch of this size: exactly the smoothed counts while the batch size is constant.
      const double scale = static_cast<double>(pairs) / s.pairs;
      const double floor_capacity =
          floor * static_cast<double>(T) * static_cast<double>(ctx.top_k) / static_cast<double>(E);
      double c = 0.0;
      for (std::size_t e = 0; e < s.demand.size(); ++e) {
        const double demand = s.demand[e] * scale, resonating = s.resonating[e] * scale;
        if (resonating > 2.0 * demand * null.p0 + 3.0) {
          c = std::max(c, std::min(demand, margin * resonating));
        } else if (demand > floor_capacity) {
          // Cannot rank its candidates yet and may overflow the floor: keep them all (TCR).
          return std::numeric_limits<double>::infinity();
        } else {
          c = std::max(c, demand);
        }
      }
      return c;
    }
    const double per_sample =
        estimate == capacity_estimate::etr_bound ? etr_bound(s.delta, d, E) : locmoe_bound(s.delta, d, E);
    const double samples =
        tokens_per_sample > 0 ? std::ceil(static_cast<double>(T) / static_cast<double>(tokens_per_sample)) : 1.0;
    return samples * per_sample;
  }
};

static_assert(stateful_capacity_policy<adaptive>);

}  // namespace resonance::capacity
