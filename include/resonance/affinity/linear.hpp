#pragma once

// Linear gate: logits = X · Wᵀ + b through Eigen's GEMM, with its backward pass. Requires Eigen (CMake
// component `eigen`); deliberately not included by resonance.hpp.

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

  index experts_for(index) const { return weight.rows; }

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
    const index T_ = x.rows, E = weight.rows;
    storage.resize(static_cast<std::size_t>(T_ * E));
    logits_in_blocks(be, x, matrix_view<float>{storage.data(), T_, E, E});
    return {storage.data(), T_, E, E};
  }

  // logits = X·Wᵀ + b in Scalar precision (the same fixed blocks as compute(), so compute() is this
  // rounded to fp32).
  template <execution_backend Backend, input_scalar T>
  void forward(const Backend& be, matrix_view<const T> x, matrix_view<T> logits) const {
    static_assert(std::is_same_v<std::remove_cv_t<T>, Scalar>,
                  "affinity::linear: the input and the gate weights must have the same scalar type");
    detail::check_matrix(x, "input");
    validate(x.cols);
    detail::check_matrix(logits, "logits", x.rows, weight.rows);
    logits_in_blocks(be, x, logits);
  }

  // The gradient of Σ dlogits ∘ logits: dx = dlogits·W, dweight = dlogitsᵀ·X (overwritten), dbias =
  // the column sums of dlogits (overwritten). dbias must have E entries when the gate has a bias; without
  // one it may be empty (or have E entries, which receive what a bias would get). dx runs in fixed
  // blocks of block_rows tokens and dweight in fixed blocks of block_rows experts, each one GEMM of a
  // shape that does not depend on the backend, so results are identical on every backend.
  template <execution_backend Backend, input_scalar T>
  void backward(const Backend& be, matrix_view<const T> x, matrix_view<const T> dlogits, matrix_view<T> dx,
                matrix_view<T> dweight, vector_view<T> dbias) const {
    static_assert(std::is_same_v<std::remove_cv_t<T>, Scalar>,
                  "affinity::linear: the input and the gate weights must have the same scalar type");
    detail::check_matrix(x, "input");
    validate(x.cols);
    const index T_ = x.rows, E = weight.rows, d = x.cols;
    detail::check_matrix(dlogits, "dlogits", T_, E);
    detail::check_matrix(dx, "dx", T_, d);
    detail::check_matrix(dweight, "dweight", E, d);
    if (!bias.empty())
      detail::require(dbias.size == E, "dbias", std::to_string(E) + " entries (one per expert: the gate has a bias)",
                      dbias.size);
    else
      detail::require(dbias.size == 0 || dbias.size == E, "dbias",
                      "0 or " + std::to_string(E) + " entries (one per expert)", dbias.size);
    detail::require(dbias.data != nullptr || dbias.size == 0, "dbias", "non-null data");

    using mat = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    using cmap = Eigen::Map<const mat, 0, Eigen::OuterStride<>>;
    using map = Eigen::Map<mat, 0, Eigen::OuterStride<>>;
    const cmap w(weight.data, E, d, Eigen::OuterStride<>(weight.stride));
    const cmap dl(dlogits.data, T_, E, Eigen::OuterStride<>(dlogits.stride));
    const cmap xm(x.data, T_, d, Eigen::OuterStride<>(x.stride));

    const index token_blocks = (T_ + block_rows - 1) / block_rows;
    detail::host_blocks(be, token_blocks, 1, [&](index b_begin, index b_end) {
      for (index b = b_begin; b < b_end; ++b) {
        const index r0 = b * block_rows;
        const index rows = T_ - r0 < block_rows ? T_ - r0 : block_rows;
        map dxb(dx.row(r0), rows, d, Eigen::OuterStride<>(dx.stride));
        dxb.noalias() = dl.middleRows(r0, rows) * w;
      }
    });
    const index expert_blocks = (E + block_rows - 1) / block_rows;
    detail::host_blocks(be, expert_blocks, 1, [&](index b_begin, index b_end) {
      for (index b = b_begin; b < b_end; ++b) {
        const index e0 = b * block_rows;
        const index n = E - e0 < block_rows ? E - e0 : block_rows;
        map dwb(dweight.row(e0), n, d, Eigen::OuterStride<>(dweight.stride));
        if (T_ == 0)
          dwb.setZero();  // a product over an empty inner dimension: spelled out rather than left to Eigen
        else
          dwb.noalias() = dl.middleCols(e0, n).transpose() * xm;
        if (!dbias.empty()) {
          for (index e = e0; e < e0 + n; ++e) {
            double s = 0.0;  // in token order, in double
            for (index t = 0; t < T_; ++t) s += static_cast<double>(dlogits(t, e));
            dbias[e] = static_cast<T>(s);
          }
        }
      }
    });
  }

  friend constexpr bool operator==(const basic_linear&, const basic_linear&) = default;

 private:
  // X·Wᵀ + b one fixed block of block_rows tokens at a time, each block's GEMM result rounded once to Out.
  template <execution_backend Backend, class Out>
  void logits_in_blocks(const Backend& be, matrix_view<const Scalar> x, matrix_view<Out> out) const {
    using mat = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    using cmap = Eigen::Map<const mat, 0, Eigen::OuterStride<>>;
    const index T_ = x.rows, E = weight.rows, d = x.cols;
    const cmap w(weight.data, E, d, Eigen::OuterStride<>(weight.stride));
    const index nblocks = (T_ + block_rows - 1) / block_rows;
    detail::host_blocks(be, nblocks, 1, [&](index b_begin, index b_end) {
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
        for (index r = 0; r < rows; ++r)
          for (index e = 0; e < E; ++e) out(r0 + r, e) = static_cast<Out>(tmp(r, e));
      }
    });
  }
};

using linear = basic_linear<float>;
using linear_double = basic_linear<double>;

static_assert(affinity_policy<linear>);

}  // namespace resonance::affinity
