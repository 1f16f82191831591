#pragma once

// Statistics of the affinities of the token-choice (TCR) assignments, and the capacity bounds of
// LocMoE and ETR that read them. Shared by capacity::lower_bound and capacity::adaptive.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../backend/serial.hpp"
#include "../core/error.hpp"
#include "../core/topk.hpp"
#include "../plan/build.hpp"
#include "../routing/routing.hpp"
#include "capacity.hpp"

namespace resonance::detail {
inline void check_cosine_statistic(double delta, const char* argument) {
  // fp32 cosines can exceed 1 by rounding; anything beyond that is not a cosine.
  require(std::isfinite(delta) && std::abs(delta) <= 1.0 + 1e-6, argument,
          "a cosine affinity |δ| <= 1 (these estimates assume cosine or GrAP-cosine affinities)", delta);
}
// The arguments of the closed-form bounds: a cosine δ, d >= 1, n >= 1.
inline void check_bound_arguments(double delta, index hidden_size, index num_experts) {
  check_cosine_statistic(delta, "delta");
  require(hidden_size >= 1, "hidden_size", "d >= 1", hidden_size);
  require(num_experts >= 1, "num_experts", "num_experts >= 1", num_experts);
}
}  // namespace resonance::detail

namespace resonance::capacity {

// The affinities of the TCR-assigned pairs, token-major: the direction's proposals when the router
// passes them (their affinity is the logit of the pair), else each token's top-k logits. With a
// cosine_scale in the context the affinities are the cosines (logit · scale; the ranking is the
// logits' since the scale is positive), else the logits as they are.
struct tcr_assignments {
  std::vector<float> affinity;
  std::vector<id_type> expert;
};

inline tcr_assignments tcr_pairs(const capacity_context& ctx) {
  const index T = ctx.logits.rows, E = ctx.logits.cols, k = std::min(ctx.top_k, E);
  tcr_assignments out;
  if (ctx.candidates != nullptr) {
    const candidate_view<host_space>& c = *ctx.candidates;
    out.expert.assign(c.expert, c.expert + c.size);
    out.affinity.resize(static_cast<std::size_t>(c.size));
    for (index t = 0; t < c.num_tokens; ++t)
      for (id_type i = c.offsets[t]; i < c.offsets[t + 1]; ++i)
        out.affinity[static_cast<std::size_t>(i)] = ctx.logits(t, c.expert[i]);
  } else {
    out.affinity.resize(static_cast<std::size_t>(T * k));
    out.expert.resize(static_cast<std::size_t>(T * k));
    for (index t = 0; t < T; ++t) {
      const float* row = ctx.logits.row(t);
      detail::topk_row(
          E, k, [row](index e) { return row[e]; }, out.affinity.data() + t * k, out.expert.data() + t * k);
    }
  }
  // Scale 1 (GrAP-cosine, declared cosines) leaves the values exactly as they are.
  if (ctx.cosine_scale > 0.0 && ctx.cosine_scale != 1.0)
    for (float& a : out.affinity) a = static_cast<float>(static_cast<double>(a) * ctx.cosine_scale);
  return out;
}

// The q-quantile (0 <= q <= 1, nearest rank: the element of rank floor(q·n), at most n − 1, of the
// sorted values); 0 for an empty set, found by one segmented_select (detail::column_kth_token). These
// statistics are host data (E- or T·k-sized, read by the capacity policies before the plan is built),
// so they run on backend::serial.
inline double quantile(const std::vector<float>& values, double q) {
  detail::require(q >= 0.0 && q <= 1.0, "quantile", "a value in [0, 1]", q);  // NaN fails too
  if (values.empty()) return 0.0;
  const auto n = static_cast<index>(values.size());
  detail::require(n < std::numeric_limits<id_type>::max(), "values", "fewer than 2^31 - 1 values", n);
  const auto rank =
      static_cast<index>(std::min<double>(static_cast<double>(n - 1), std::floor(q * static_cast<double>(n))));
  // The rank-th smallest is the (n − rank)-th largest under (value desc, index asc); ties only change
  // which of the equal values is returned.
  index at = 0;
  detail::column_kth_token(backend::serial{}, values.data(), n, 1, 1, n - rank, &at);
  return values[static_cast<std::size_t>(at)];
}

// LocMoE Theorem 1, Eq. 9 (large-d form): ec_min = 1 / (n · erfc(sqrt(δ²d / (2 − δ²)))), tokens per
// expert per sample that make at least one class-discriminative token (cosine >= δ) reach an expert.
inline double locmoe_bound(double delta, index hidden_size, index num_experts) {
  detail::check_bound_arguments(delta, hidden_size, num_experts);
  const double d2 = delta * delta;
  const double tail = std::erfc(std::sqrt(d2 * static_cast<double>(hidden_size) / (2.0 - d2)));
  return tail > 0.0 ? 1.0 / (static_cast<double>(num_experts) * tail) : std::numeric_limits<double>::infinity();
}

// ETR Remark 7 (the exp form of the same bound): C_min = (1/n) · exp(d·δ² / (2 − δ²)).
inline double etr_bound(double delta, index hidden_size, index num_experts) {
  detail::check_bound_arguments(delta, hidden_size, num_experts);
  const double d2 = delta * delta;
  return std::exp(static_cast<double>(hidden_size) * d2 / (2.0 - d2)) / static_cast<double>(num_experts);
}

}  // namespace resonance::capacity
