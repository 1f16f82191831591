#pragma once

// Cosine gate with learned expert embeddings (Tutel's CosineTopKGate without its input projection):
// logits(t, e) = cos(x_t, w_e) / temperature. Also the norm helpers shared with grap_cosine.

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "../core/bfloat16.hpp"
#include "affinity.hpp"

namespace resonance {
namespace detail {

// Cosine affinities accumulate in double for float and double inputs alike: a float row's sum of
// squares can neither overflow nor underflow in double, and the sums cost no more than the loads.
// A double row whose plain sum of squares leaves double's normal range (entries beyond about 1e154,
// or all below about 1e-154) is measured again scaled by a power of two (exact), so that a cosine
// stays scale invariant over the whole finite range. A row's norm is then 2^exponent · scaled.
struct scaled_norm {
  int exponent = 0;     // 0 unless the row needed rescaling
  double scaled = 0.0;  // norm of the row times 2^-exponent; NaN when the row holds a NaN or an Inf

  RESONANCE_HOST_DEVICE double value() const { return exponent == 0 ? scaled : std::scalbn(scaled, exponent); }
  // x_j / norm, without forming a norm that could overflow or underflow.
  RESONANCE_HOST_DEVICE double unit(double x) const { return (exponent == 0 ? x : std::scalbn(x, -exponent)) / scaled; }
};

RESONANCE_INLINE_FUNCTION bool sum_of_squares_in_range(double s) {
  return s >= std::numeric_limits<double>::min() && s <= std::numeric_limits<double>::max();
}

// The exponent that brings the row's largest magnitude into [1, 2); sets `finite` to false (and returns
// 0) when an entry is a NaN or an Inf, and returns 0 for a zero row (then `zero` is set).
template <class T>
RESONANCE_INLINE_FUNCTION int rescale_exponent(const T* x, index n, bool& finite, bool& zero) {
  double m = 0.0;
  for (index j = 0; j < n; ++j) {
    const double a = std::fabs(static_cast<double>(x[j]));
    if (!std::isfinite(a)) {
      finite = false;
      return 0;
    }
    if (a > m) m = a;
  }
  finite = true;
  zero = m == 0.0;
  return zero ? 0 : std::ilogb(m);
}

// The Euclidean norm of one row (see scaled_norm): one pass in the common case.
template <class T>
RESONANCE_INLINE_FUNCTION scaled_norm row_norm(const T* x, index n) {
  double s = 0.0;
  for (index j = 0; j < n; ++j) s += static_cast<double>(x[j]) * static_cast<double>(x[j]);
  if (sum_of_squares_in_range(s)) return {0, std::sqrt(s)};
  bool finite = true, zero = false;
  const int k = rescale_exponent(x, n, finite, zero);
  if (!finite) return {0, std::numeric_limits<double>::quiet_NaN()};
  if (zero) return {0, 0.0};
  s = 0.0;
  for (index j = 0; j < n; ++j) {
    const double v = std::scalbn(static_cast<double>(x[j]), -k);
    s += v * v;
  }
  return {k, std::sqrt(s)};
}

// A row counts as zero when its norm is at most epsilon (a NaN norm does not: it propagates).
RESONANCE_INLINE_FUNCTION bool negligible(const scaled_norm& n, double epsilon) {
  return n.scaled == 0.0 || n.value() <= epsilon;
}

// A cosine rounded outside [-1, 1] is clamped back, so that |δ| <= 1 holds exactly.
RESONANCE_INLINE_FUNCTION double clamp_cosine(double c) { return c > 1.0 ? 1.0 : (c < -1.0 ? -1.0 : c); }

}  // namespace detail

namespace affinity {

// Space: where the embeddings live (host memory by default; device memory for a route on a device).
template <class Scalar, class Space = host_space>
struct basic_cosine {
  static_assert(input_scalar<Scalar>, "cosine gate embeddings must be float or double");

  matrix_view<const Scalar, Space> weight = {};  // E×d, row e is expert e's embedding w_e
  float temperature = 1.0f;                      // τ > 0: logits are cos / τ
  // Norm floor: a token or embedding whose norm is at most epsilon counts as zero, and every pair it is
  // in gets cosine 0 and gradient 0 (as does an exactly zero row with the default 0). Raising it keeps
  // the 1/‖x‖ of the gradient bounded for near-zero rows.
  Scalar epsilon = 0;

  static constexpr index block_tokens = 64;   // tokens per parallel block (results do not depend on it)
  static constexpr index block_experts = 16;  // experts per parallel block of the dweight reduction
  // bfloat16 hidden states are read as fp32 (exact), with fp32 embeddings.
  static constexpr bool accepts_bfloat16 = std::is_same_v<Scalar, float>;

  index experts_for(index) const { return weight.rows; }

  // A logit is cos / τ, so τ · logit is the cosine (see cosine_scale_of).
  double cosine_scale() const { return static_cast<double>(temperature); }

  void validate(index cols) const {
    detail::check_matrix(weight, "cosine.weight");
    detail::require(weight.rows >= 1, "cosine.weight", "at least 1 row (expert)", weight.rows);
    detail::require(weight.cols == cols, "cosine.weight",
                    "as many columns as the input has (" + std::to_string(cols) + ")", weight.cols);
    detail::require(std::isfinite(temperature) && temperature > 0.0f, "cosine.temperature", "a finite value > 0",
                    temperature);
    detail::require(std::isfinite(epsilon) && epsilon >= Scalar(0), "cosine.epsilon", "a finite value >= 0", epsilon);
  }

  template <execution_backend Backend, hidden_scalar T>
  matrix_view<const float> compute(const Backend& be, matrix_view<const T> x, std::vector<float>& storage) const {
    return detail::compute_via_forward(*this, be, x, storage);
  }

  // Bytes of backend memory forward() needs on a backend whose memory the host cannot read (the unit
  // embeddings and their zero flags, computed there); a route reserves them in its workspace.
  index device_workspace_bytes(index cols) const {
    return (weight.rows * cols * static_cast<index>(sizeof(double)) + weight.rows + 15) / 16 * 16;
  }

  // logits(t, e) = cos(x_t, w_e) / τ = (x_t/‖x_t‖)·(w_e/‖w_e‖) / τ  (Tutel cosine gate), in double,
  // rounded once to O (Scalar). 0 where the token or the embedding is zero (norm <= epsilon). On the
  // host, each token's x_t/‖x_t‖ is formed once in the group's scratch; on a device (where d doubles
  // per thread would not fit its shared memory) each entry is recomputed per expert: the same
  // operations, so the same bits. The unit embeddings are computed on the backend, into `work`
  // (device_workspace_bytes) when it is given, else into an allocation of the call.
  template <execution_backend Backend, hidden_scalar T, class O, class XSpace, class LSpace>
  void forward(const Backend& be, matrix_view<const T, XSpace> x, matrix_view<O, LSpace> logits,
               void* work = nullptr) const {
    using space = memory_space_t<Backend>;
    static_assert(std::is_same_v<std::remove_cv_t<T>, Scalar> ||
                      (std::is_same_v<std::remove_cv_t<T>, bfloat16> && std::is_same_v<Scalar, float>),
                  "affinity::cosine: the input and the expert embeddings must have the same scalar type (or bf16 "
                  "input with fp32 embeddings)");
    static_assert(std::is_same_v<O, Scalar>, "affinity::cosine writes logits of its embeddings' type");
    static_assert(
        accessible_from_v<XSpace, space> && accessible_from_v<LSpace, space> && accessible_from_v<Space, space>,
        "the input, the embeddings and the logits must be in memory the backend can read");
    detail::check_matrix(x, "input");
    validate(x.cols);
    const index E = weight.rows, d = x.cols;
    detail::check_matrix(logits, "logits", x.rows, E);
    const double tau = static_cast<double>(temperature), eps = static_cast<double>(epsilon);
    constexpr bool on_host = host_accessible_v<space>;
    unit_embeddings host_units;
    buffer_t<space, unsigned char> own;
    bool owns = false;
    const double* unit = nullptr;
    const unsigned char* zero_expert = nullptr;
    if constexpr (on_host) {
      host_units = normalized_embeddings();
      unit = host_units.unit.data();
      zero_expert = host_units.zero.data();
    } else {
      if (work == nullptr) {
        own = allocate<unsigned char>(be, device_workspace_bytes(d));
        work = own.data();
        owns = true;
      }
      double* const units = static_cast<double*>(work);
      unsigned char* const zero = reinterpret_cast<unsigned char*>(units + E * d);
      const matrix_view<const Scalar, Space> w = weight;
      for_each(
          be, E, RESONANCE_LAMBDA(index e) {
            const detail::scaled_norm n = detail::row_norm(w.row(e), d);
            const bool z = detail::negligible(n, eps);
            zero[e] = z ? 1 : 0;
            for (index j = 0; j < d; ++j) units[e * d + j] = z ? 0.0 : n.unit(static_cast<double>(w(e, j)));
          });
      unit = units;
      zero_expert = zero;
    }
    using group = typename Backend::group;
    for_each_group(
        be, x.rows, on_host ? d * static_cast<index>(sizeof(double)) : index{0},
        RESONANCE_LAMBDA(const group& grp, index t) {
          O* out = logits.row(t);
          const T* row = x.row(t);
          double* u = static_cast<double*>(grp.scratch());
          const detail::scaled_norm n = on_host ? unit_row(row, d, u) : detail::row_norm(row, d);
          for (index e = 0; e < E; ++e) {
            const bool zero = detail::negligible(n, eps) || zero_expert[e] != 0;
            if (zero) {
              out[e] = O(0);
              continue;
            }
            const double* v = unit + e * d;
            double c = 0.0;
            if constexpr (on_host) {
              for (index j = 0; j < d; ++j) c += u[j] * v[j];
            } else {
              for (index j = 0; j < d; ++j) c += n.unit(static_cast<double>(row[j])) * v[j];
            }
            out[e] = static_cast<O>(detail::clamp_cosine(c) / tau);
          }
        },
        block_tokens);
    if (owns) fence(be);  // the call's allocation outlives its kernels
  }

  // The gradient of Σ dlogits ∘ logits. With u = x/‖x‖, v = w/‖w‖ and c = u·v:
  //   ∂c/∂x = (v − c·u)/‖x‖,   ∂c/∂w = (u − c·v)/‖w‖,   both divided by τ;
  // zero pairs (see epsilon) contribute nothing. dx is written per token; dweight (E×d) is overwritten:
  // each expert's row sums its tokens in ascending token order, in one body call, so the result does
  // not depend on how a backend splits the work.
  template <execution_backend Backend, input_scalar T>
  void backward(const Backend& be, matrix_view<const T> x, matrix_view<const T> dlogits, matrix_view<T> dx,
                matrix_view<T> dweight) const {
    static_assert(std::is_same_v<std::remove_cv_t<T>, Scalar>,
                  "affinity::cosine: the input and the expert embeddings must have the same scalar type");
    detail::check_matrix(x, "input");
    validate(x.cols);
    const index T_ = x.rows, E = weight.rows, d = x.cols;
    detail::check_matrix(dlogits, "dlogits", T_, E);
    detail::check_matrix(dx, "dx", T_, d);
    detail::check_matrix(dweight, "dweight", E, d);

    const unit_embeddings v = normalized_embeddings();
    const double tau = static_cast<double>(temperature), eps = static_cast<double>(epsilon);
    const auto at = [E](index t, index e) { return static_cast<std::size_t>(t * E + e); };
    // Per pair: a = (dlogit/τ)/‖x_t‖ and b = (dlogit/τ)·c, so that dw_e = (Σ_t a·x_t − (Σ_t b)·v_e)/‖w_e‖.
    std::vector<double> a(static_cast<std::size_t>(T_ * E)), b(a.size());

    detail::host_blocks(be, T_, block_tokens, [&](index begin, index end) {
      std::vector<double> u(static_cast<std::size_t>(d)), acc(u.size());
      for (index t = begin; t < end; ++t) {
        const T* dl = dlogits.row(t);
        T* out = dx.row(t);
        const detail::scaled_norm n = unit_row(x.row(t), d, u.data());
        const double nv = n.value();
        std::fill(acc.begin(), acc.end(), 0.0);  // Σ_e coef_e·v_e
        double p = 0.0;                          // Σ_e coef_e·c_e
        for (index e = 0; e < E; ++e) {
          a[at(t, e)] = b[at(t, e)] = 0.0;
          if (detail::negligible(n, eps) || v.zero[static_cast<std::size_t>(e)]) continue;
          const double* ve = v.row(e);
          const double c = pair_cosine(u.data(), ve, d);
          const double coef = static_cast<double>(dl[e]) / tau;
          for (index j = 0; j < d; ++j) acc[static_cast<std::size_t>(j)] += coef * ve[j];
          p += coef * c;
          a[at(t, e)] = coef / nv;
          b[at(t, e)] = coef * c;
        }
        if (detail::negligible(n, eps)) {
          for (index j = 0; j < d; ++j) out[j] = T(0);
          continue;
        }
        // dx = (Σ_e coef_e·v_e − p·u) / ‖x‖
        for (index j = 0; j < d; ++j) {
          const double g = acc[static_cast<std::size_t>(j)] - p * u[static_cast<std::size_t>(j)];
          out[j] = static_cast<T>(n.exponent == 0 ? g / n.scaled : std::scalbn(g / n.scaled, -n.exponent));
        }
      }
    });

    detail::host_blocks(be, E, block_experts, [&](index begin, index end) {
      std::vector<double> acc(static_cast<std::size_t>((end - begin) * d), 0.0),
          bsum(static_cast<std::size_t>(end - begin), 0.0);
      for (index t = 0; t < T_; ++t) {
        const T* row = x.row(t);
        for (index e = begin; e < end; ++e) {
          const double ate = a[at(t, e)];
          bsum[static_cast<std::size_t>(e - begin)] += b[at(t, e)];
          if (ate == 0.0) continue;
          double* ae = acc.data() + (e - begin) * d;
          for (index j = 0; j < d; ++j) ae[j] += ate * static_cast<double>(row[j]);
        }
      }
      for (index e = begin; e < end; ++e) {
        T* out = dweight.row(e);
        if (v.zero[static_cast<std::size_t>(e)]) {
          for (index j = 0; j < d; ++j) out[j] = T(0);
          continue;
        }
        const double* ae = acc.data() + (e - begin) * d;
        const double* ve = v.row(e);
        const double bs = bsum[static_cast<std::size_t>(e - begin)];
        const detail::scaled_norm& wn = v.norm[static_cast<std::size_t>(e)];
        for (index j = 0; j < d; ++j) {
          const double g = ae[j] - bs * ve[j];
          out[j] = static_cast<T>(wn.exponent == 0 ? g / wn.scaled : std::scalbn(g / wn.scaled, -wn.exponent));
        }
      }
    });
  }

  friend constexpr bool operator==(const basic_cosine&, const basic_cosine&) = default;

 private:
  // The embeddings divided by their norms, in double (E×d), computed once per call.
  struct unit_embeddings {
    std::vector<double> unit;
    std::vector<detail::scaled_norm> norm;
    std::vector<unsigned char> zero;  // norm <= epsilon: every pair with this expert is 0
    index cols = 0;
    const double* row(index e) const { return unit.data() + e * cols; }
  };

  unit_embeddings normalized_embeddings() const {
    static_assert(host_accessible_v<Space>, "the embeddings are read on the host here");
    const index E = weight.rows, d = weight.cols;
    unit_embeddings v{std::vector<double>(static_cast<std::size_t>(E * d)),
                      std::vector<detail::scaled_norm>(static_cast<std::size_t>(E)),
                      std::vector<unsigned char>(static_cast<std::size_t>(E)), d};
    for (index e = 0; e < E; ++e) {
      const detail::scaled_norm n = detail::row_norm(weight.row(e), d);
      v.norm[static_cast<std::size_t>(e)] = n;
      v.zero[static_cast<std::size_t>(e)] = detail::negligible(n, static_cast<double>(epsilon));
      double* out = v.unit.data() + e * d;
      for (index j = 0; j < d; ++j)
        out[j] = v.zero[static_cast<std::size_t>(e)] ? 0.0 : n.unit(static_cast<double>(weight(e, j)));
    }
    return v;
  }

  // Writes x/‖x‖ into u (zeros for a zero row) and returns the norm.
  template <class T>
  RESONANCE_INLINE_FUNCTION static detail::scaled_norm unit_row(const T* x, index d, double* u) {
    const detail::scaled_norm n = detail::row_norm(x, d);
    for (index j = 0; j < d; ++j) u[j] = n.scaled == 0.0 ? 0.0 : n.unit(static_cast<double>(x[j]));
    return n;
  }

  static double pair_cosine(const double* u, const double* v, index d) {
    double c = 0.0;
    for (index j = 0; j < d; ++j) c += u[j] * v[j];
    return detail::clamp_cosine(c);
  }
};

using cosine = basic_cosine<float>;
using cosine_double = basic_cosine<double>;

static_assert(affinity_policy<cosine>);
static_assert(affinity_policy<cosine_double>);

}  // namespace affinity
}  // namespace resonance
