#pragma once

// ETR's affinity (arXiv 2406.00023, Eq. 2–4): δ_te = cos(x_t, w_e) with the fixed GrAP embedding
// w_e = (E/d)·1{j ∈ group e}. Since ‖w_e‖ = 1/√g (g = d/E), δ_te = s_te / (√g·‖x_t‖) with s_te the sum
// of group e of x_t: one pass over x_t, O(d) per token, and W is never formed. For one token the
// experts rank as by LocMoE's GrAP means; across tokens each is normalised by its own norm.

#include <cmath>
#include <limits>
#include <vector>

#include "../backend/rows.hpp"
#include "affinity.hpp"
#include "cosine.hpp"
#include "grap.hpp"

namespace resonance::affinity {

struct grap_cosine {
  index num_experts = 0;  // E; the input's column count must be a positive multiple of it

  constexpr index experts_for(index) const { return num_experts; }
  // Norm floor: a token whose norm is at most epsilon counts as zero and gets δ = 0 for every expert
  // and gradient 0 (with the default 0, only an exactly zero token).
  double epsilon = 0.0;

  static constexpr index block_tokens = 64;  // tokens per parallel block (results do not depend on it)

  // The logits are the cosines δ_te themselves (see cosine_scale_of).
  constexpr double cosine_scale() const { return 1.0; }

  void validate(index cols) const {
    detail::check_channel_groups(num_experts, cols, "grap_cosine.num_experts");
    detail::require(std::isfinite(epsilon) && epsilon >= 0.0, "grap_cosine.epsilon", "a finite value >= 0", epsilon);
  }

  // bfloat16 hidden states are read as fp32 (exact), like float ones.
  static constexpr bool accepts_bfloat16 = true;

  template <execution_backend Backend, hidden_scalar T>
  matrix_view<const float> compute(const Backend& be, matrix_view<const T> x, std::vector<float>& storage) const {
    return detail::compute_via_forward(*this, be, x, storage);
  }

  // δ_te = s_te / (√g·‖x_t‖)  (ETR Eq. 4 in closed form), accumulated in double for every input type
  // (in detail::lane_group_sums' fixed order, so every backend gives the same bits), clamped to
  // [-1, 1] and rounded once to O (the input's type, or float for a bfloat16 input). A row with a NaN
  // or an Inf gives NaN. x and logits may be in any memory space the backend reads (one pass over each
  // row on a device too).
  template <execution_backend Backend, hidden_scalar T, class O, class XSpace, class LSpace>
  void forward(const Backend& be, matrix_view<const T, XSpace> x, matrix_view<O, LSpace> logits) const {
    static_assert(std::is_same_v<O, std::conditional_t<std::is_same_v<std::remove_cv_t<T>, double>, double, float>>,
                  "grap_cosine writes double logits for double input, float logits otherwise");
    static_assert(
        accessible_from_v<XSpace, memory_space_t<Backend>> && accessible_from_v<LSpace, memory_space_t<Backend>>,
        "the input and the logits must be in memory the backend can read");
    detail::check_matrix(x, "input");
    validate(x.cols);
    const index E = num_experts, g = x.cols / E;
    detail::check_matrix(logits, "logits", x.rows, E);
    const double sqrt_g = std::sqrt(static_cast<double>(g));
    const double eps = epsilon;
    using group = typename Backend::group;
    for_each_group(
        be, x.rows, E * static_cast<index>(sizeof(double)),
        RESONANCE_LAMBDA(const group& grp, index t) {
          double* s = static_cast<double*>(grp.scratch());
          const detail::scaled_norm n = group_sums<typename group::rows>(x.row(t), E, g, s);
          O* out = logits.row(t);
          if (detail::negligible(n, eps)) {
            for (index e = 0; e < E; ++e) out[e] = O(0);
            return;
          }
          // s holds the sums of the rescaled row when n.exponent != 0, so s / n.scaled is the cosine.
          for (index e = 0; e < E; ++e) out[e] = static_cast<O>(detail::clamp_cosine(s[e] / (sqrt_g * n.scaled)));
        },
        block_tokens);
  }

  // The gradient of Σ dδ ∘ δ with respect to x (cosine's ∂c/∂x = (v − c·u)/‖x‖ with v_e = √g·w_e):
  //   dx_tj = dδ_{t,e(j)} / (√g·‖x_t‖) − x_tj · (Σ_e dδ_te·s_te) / (√g·‖x_t‖³)
  //         = (dδ_{t,e(j)}/√g − u_tj·Σ_e dδ_te·δ_te) / ‖x_t‖,   u_t = x_t/‖x_t‖;
  // 0 for a zero token (see epsilon).
  template <execution_backend Backend, input_scalar T>
  void backward(const Backend& be, matrix_view<const T> x, matrix_view<const T> dlogits, matrix_view<T> dx) const {
    detail::check_matrix(x, "input");
    validate(x.cols);
    const index E = num_experts, g = x.cols / E;
    detail::check_matrix(dlogits, "dlogits", x.rows, E);
    detail::check_matrix(dx, "dx", x.rows, x.cols);
    const double sqrt_g = std::sqrt(static_cast<double>(g));
    const double eps = epsilon;
    const index d = x.cols;
    for_each_group(
        be, x.rows, E * static_cast<index>(sizeof(double)),
        [=](const auto& grp, index t) {
          using rows = typename std::remove_cvref_t<decltype(grp)>::rows;
          double* s = static_cast<double*>(grp.scratch());
          const T* row = x.row(t);
          const T* dl = dlogits.row(t);
          T* out = dx.row(t);
          const detail::scaled_norm n = group_sums<rows>(row, E, g, s);
          if (detail::negligible(n, eps)) {
            for (index j = 0; j < d; ++j) out[j] = T(0);
            return false;
          }
          double p = 0.0;  // Σ_e dδ_te·δ_te, with the unclamped δ (identical away from |δ| = 1)
          for (index e = 0; e < E; ++e) p += static_cast<double>(dl[e]) * s[e];
          p /= sqrt_g * n.scaled;
          for (index e = 0; e < E; ++e) {
            const double ve = static_cast<double>(dl[e]) / sqrt_g;
            for (index j = e * g; j < (e + 1) * g; ++j) {
              const double gj = ve - p * n.unit(static_cast<double>(row[j]));
              out[j] = static_cast<T>(n.exponent == 0 ? gj / n.scaled : std::scalbn(gj / n.scaled, -n.exponent));
            }
          }
          return false;
        },
        block_tokens);
  }

  friend constexpr bool operator==(const grap_cosine&, const grap_cosine&) = default;

 private:
  // One pass over the row (Rows' group_sums_squares): the E group sums into s and the norm. When the
  // plain sum of squares leaves double's normal range (double inputs, zero rows, NaN or Inf), the row
  // is summed again scaled by 2^-exponent, in the same order, and s then holds the scaled sums (see
  // detail::scaled_norm).
  template <class Rows, class T>
  RESONANCE_INLINE_FUNCTION static detail::scaled_norm group_sums(const T* row, index E, index g, double* s) {
    const double ss = Rows::group_sums_squares(row, E, g, s);
    if (detail::sum_of_squares_in_range(ss)) return {0, std::sqrt(ss)};
    bool finite = true, zero = false;
    const int k = detail::rescale_exponent(row, E * g, finite, zero);
    if (!finite) {
      for (index e = 0; e < E; ++e) s[e] = std::numeric_limits<double>::quiet_NaN();
      return {0, std::numeric_limits<double>::quiet_NaN()};
    }
    if (zero) return {0, 0.0};
    const double scaled_ss =
        detail::lane_group_sums<true>(row, E, g, s, [k](T v) { return std::scalbn(static_cast<double>(v), -k); });
    return {k, std::sqrt(scaled_ss)};
  }
};

static_assert(affinity_policy<grap_cosine>);

}  // namespace resonance::affinity
