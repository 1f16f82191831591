#pragma once

// Linear gate: logits = X · Wᵀ + b through Eigen's GEMM. Requires Eigen (CMake component `eigen`);
// deliberately not included by resonance.hpp.

#include <Eigen/Core>

#include "affinity.hpp"

namespace resonance::affinity {

template <class Scalar>
struct basic_linear {
  static_assert(input_scalar<Scalar>, "linear gate weights must be float or double");

  matrix_view<const Scalar> weight = {};  // E×d, row e is expert e's gate vector
  vector_view<const Scalar> bias = {};    // E entries, or empty

  // Rows per GEMM block. Fixed, not a backend property: Eigen's blocking (and so the summation order of
  // each logit) depends on the block shape, and plans must be identical on every backend.
  static constexpr index block_rows = 256;

  index num_experts(index) const { return weight.rows; }

  void validate(index cols) const {
    detail::check_matrix(weight, "linear.weight");
    detail::require(weight.rows >= 1, "linear.weight", "at least 1 row (expert)", weight.rows);
    detail::require(weight.cols == cols, "linear.weight",
                    "as many columns as the input has (" + std::to_string(cols) + ")", weight.cols);
    if (!bias.empty()) {
      detail::require(bias.size == weight.rows, "linear.bias",
                      std::to_string(weight.rows) + " entries (one per expert)", bias.size);
      detail::require(bias.data != nullptr, "linear.bias", "non-null data");
    }
  }

  template <execution_backend Backend, input_scalar T>
  matrix_view<const float> compute(const Backend& be, matrix_view<const T> x, std::vector<float>& storage) const {
    static_assert(std::is_same_v<std::remove_cv_t<T>, Scalar>,
                  "affinity::linear: the input and the gate weights must have the same scalar type");
    using mat = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    using cmap = Eigen::Map<const mat, 0, Eigen::OuterStride<>>;
    const index T_ = x.rows, E = weight.rows, d = x.cols;
    storage.resize(static_cast<std::size_t>(T_ * E));
    const cmap w(weight.data, E, d, Eigen::OuterStride<>(weight.stride));
    const index nblocks = (T_ + block_rows - 1) / block_rows;
    be.parallel_for_blocks(nblocks, 1, [&](index b_begin, index b_end) {
      mat tmp;
      for (index b = b_begin; b < b_end; ++b) {
        const index r0 = b * block_rows;
        const index rows = T_ - r0 < block_rows ? T_ - r0 : block_rows;
        const cmap xb(x.row(r0), rows, d, Eigen::OuterStride<>(x.stride));
        tmp.noalias() = xb * w.transpose();
        if (!bias.empty()) {
          for (index r = 0; r < rows; ++r)
            for (index e = 0; e < E; ++e) tmp(r, e) += bias[e];
        }
        float* out = storage.data() + r0 * E;
        for (index r = 0; r < rows; ++r)
          for (index e = 0; e < E; ++e) out[r * E + e] = static_cast<float>(tmp(r, e));
      }
    });
    return {storage.data(), T_, E, E};
  }

  friend constexpr bool operator==(const basic_linear&, const basic_linear&) = default;
};

using linear = basic_linear<float>;
using linear_double = basic_linear<double>;

static_assert(affinity_policy<linear>);

}  // namespace resonance::affinity
