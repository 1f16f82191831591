#pragma once

// LocMoE's capacity (arXiv 2401.13920, Theorem 1, Eq. 9): the lower bound
//   ec_min = 1 / (n · erfc(sqrt(δ²d / (2 − δ²))))       tokens per expert per sample,
// computed ONCE, from the first batch routed with this state, then fixed for every later batch (as
// ETR describes LocMoE). δ is the cosine above which a token counts as class-discriminative: given
// (`delta`, LocMoE measured about 0.03), or estimated from the first batch as a quantile of the
// affinities of its token-choice assignments. The batch capacity is C = ⌈samples · ec_min⌉ with
// samples = ⌈T / tokens_per_sample⌉, clamped to [1, T]: never below one slot, never above dropless
// (no expert can be proposed by more than T tokens).
//
// The estimate is a cosine statistic, so it needs a router whose logits are cosines
// (capacity_context::cosine_scale: affinity::cosine, whose logits it scales back by τ,
// affinity::grap_cosine, or affinity::precomputed{.cosines = true}). With any other affinity —
// LocMoE's own affinity::grap gives channel means, affinity::linear unbounded scores — estimating δ
// is an error naming lower_bound.delta; a given δ works with every affinity.

#include <cmath>
#include <cstdint>

#include "../core/error.hpp"
#include "capacity.hpp"
#include "statistics.hpp"

namespace resonance::capacity {

struct lower_bound {
  double delta = 0.0;           // δ; 0 = estimate it from the first batch (needs cosine logits)
  double quantile = 0.5;        // which quantile of the TCR affinities estimates δ
  index tokens_per_sample = 0;  // s; 0 = the whole batch is one sample
  index hidden_size = 0;        // d of the bound; 0 = the router input's width (set it for precomputed logits)
  drop_policy drop = drop_policy::score;
  bool pad_to_capacity = false;
  index align = 1;
  std::uint64_t seed = 0;

  struct state_type {
    index capacity = -1;  // -1 until the first batch fixes it
    double delta = 0.0;   // the δ that was used
    friend constexpr bool operator==(const state_type&, const state_type&) = default;
  };

  void validate() const {
    detail::require(std::isfinite(delta) && delta >= 0.0 && delta < 1.0, "lower_bound.delta",
                    "0 (estimate) or a cosine threshold in (0, 1)", delta);
    detail::require(quantile >= 0.0 && quantile <= 1.0, "lower_bound.quantile", "a value in [0, 1]", quantile);
    detail::require(hidden_size >= 0, "lower_bound.hidden_size", "0 (the input width) or d >= 1", hidden_size);
    detail::require(tokens_per_sample >= 0, "lower_bound.tokens_per_sample", "a value >= 0", tokens_per_sample);
    detail::require(align >= 1, "align", "align >= 1", align);
  }

  capacity_limits limits(const capacity_context& ctx, state_type& state) const {
    validate();
    detail::check_capacity_shape(ctx);
    // Refused before the empty-batch shortcut: the configuration cannot work, whatever the batch.
    if (delta == 0.0 && state.capacity < 0)
      detail::require_cosine_logits(ctx, "lower_bound.delta",
                                    "otherwise set lower_bound.delta (LocMoE's cosine threshold, about 0.03)");
    // An empty batch says nothing about δ: it routes nothing and leaves the bound to the next batch.
    if (ctx.num_tokens == 0 && state.capacity < 0)
      return {.capacity = 0, .drop = drop, .pad_to_capacity = pad_to_capacity, .align = align, .seed = seed};
    if (state.capacity < 0) {
      double d = delta;
      if (d == 0.0) {
        d = capacity::quantile(tcr_pairs(ctx).affinity, quantile);
        detail::check_cosine_statistic(d, "lower_bound (estimated delta)");
        d = std::abs(d);
      }
      const double ec = locmoe_bound(d, hidden_size > 0 ? hidden_size : ctx.hidden_size, ctx.num_experts);
      const index T = ctx.num_tokens;
      const double samples =
          tokens_per_sample > 0 ? std::ceil(static_cast<double>(T) / static_cast<double>(tokens_per_sample)) : 1.0;
      const double c = std::ceil(samples * ec);
      state.capacity = std::max<index>(1, c >= static_cast<double>(T) ? T : static_cast<index>(c));
      state.delta = d;
    }
    return {.capacity = state.capacity, .drop = drop, .pad_to_capacity = pad_to_capacity, .align = align, .seed = seed};
  }

  friend constexpr bool operator==(const lower_bound&, const lower_bound&) = default;
};

static_assert(stateful_capacity_policy<lower_bound>);

}  // namespace resonance::capacity
