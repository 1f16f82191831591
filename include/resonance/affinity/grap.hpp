#pragma once

// LocMoE's Grouped Average Pooling gate: the hidden state is cut into E contiguous channel groups of
// g = d/E channels, and expert e's logit is the mean of group e. No parameters, O(d) per token.

#include <string>
#include <vector>

#include "../backend/rows.hpp"
#include "affinity.hpp"

namespace resonance::detail {

// The GrAP layout shared by grap and grap_cosine: E >= 1 contiguous groups that tile a non-empty row.
inline void check_channel_groups(index num_experts, index cols, std::string_view policy_argument) {
  require(num_experts >= 1, policy_argument, "at least 1 expert", num_experts);
  require(cols >= num_experts && cols % num_experts == 0, "input",
          "a hidden size divisible by num_experts (E = " + std::to_string(num_experts) +
              "), so that every expert owns d/E >= 1 contiguous channels",
          cols, " columns");
}

}  // namespace resonance::detail

namespace resonance::affinity {

struct grap {
  index num_experts = 0;  // E; the input's column count must be a positive multiple of it

  constexpr index experts_for(index) const { return num_experts; }

  // Tokens per parallel block. Each token's logits depend on that token alone, so the split cannot
  // change a result; the constant only keeps the work per block reasonable.
  static constexpr index block_tokens = 64;

  void validate(index cols) const { detail::check_channel_groups(num_experts, cols, "grap.num_experts"); }

  template <execution_backend Backend, input_scalar T>
  matrix_view<const float> compute(const Backend& be, matrix_view<const T> x, std::vector<float>& storage) const {
    return detail::compute_via_forward(*this, be, x, storage);
  }

  // logits(t, e) = mean of x(t, e·g .. e·g + g - 1)  (LocMoE Eq. 4: ω_e = (E/d)·1{channel in group e}).
  // Sums are accumulated in double for float and double inputs alike, in detail::lane_group_sums'
  // fixed order (the backend's row primitives may vectorise it), then rounded once to T.
  template <execution_backend Backend, input_scalar T>
  void forward(const Backend& be, matrix_view<const T> x, matrix_view<T> logits) const {
    detail::check_matrix(x, "input");
    validate(x.cols);
    const index E = num_experts, g = x.cols / E;
    detail::check_matrix(logits, "logits", x.rows, E);
    const double inv_g = 1.0 / static_cast<double>(g);
    for_each_group(
        be, x.rows, E * static_cast<index>(sizeof(double)),
        [=](const auto& grp, index t) {
          using rows = typename std::remove_cvref_t<decltype(grp)>::rows;
          double* s = static_cast<double*>(grp.scratch());
          rows::group_sums(x.row(t), E, g, s);
          T* out = logits.row(t);
          for (index e = 0; e < E; ++e) out[e] = static_cast<T>(s[e] * inv_g);
          return false;
        },
        block_tokens);
  }

  // The gradient of Σ dlogits ∘ logits with respect to x: dx(t, j) = dlogits(t, e(j)) / g, e(j) = j / g.
  template <execution_backend Backend, input_scalar T>
  void backward(const Backend& be, matrix_view<const T> x, matrix_view<const T> dlogits, matrix_view<T> dx) const {
    detail::check_matrix(x, "input");
    validate(x.cols);
    const index E = num_experts, g = x.cols / E;
    detail::check_matrix(dlogits, "dlogits", x.rows, E);
    detail::check_matrix(dx, "dx", x.rows, x.cols);
    const double inv_g = 1.0 / static_cast<double>(g);
    for_each(
        be, x.rows,
        [=](index t) {
          const T* dl = dlogits.row(t);
          T* out = dx.row(t);
          for (index e = 0; e < E; ++e) {
            const T v = static_cast<T>(static_cast<double>(dl[e]) * inv_g);
            for (index j = e * g; j < (e + 1) * g; ++j) out[j] = v;
          }
        },
        block_tokens);
  }

  friend constexpr bool operator==(const grap&, const grap&) = default;
};

static_assert(affinity_policy<grap>);

}  // namespace resonance::affinity
