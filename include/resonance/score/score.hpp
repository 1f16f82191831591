#pragma once

// Score functions applied to router logits, in fp32. `score` is the contract enum; the kernels below
// are per-row host/device functions.

#include <bit>
#include <cstdint>
#include <limits>
#include <math.h>
#include <type_traits>

#include "../core/config.hpp"

namespace resonance {

enum class score : unsigned char {
  softmax,        // exp(x) / sum exp(x), over the top-k (default) or over all experts (pre_softmax)
  sigmoid,        // 1 / (1 + exp(-x))
  sqrt_softplus,  // sqrt(log(1 + exp(x)))
  identity,       // the logit itself (cosine and GrAP affinities are already bounded)
};

namespace detail {

// exp(x) in fp32 for the scores that decide a selection, written as a fixed sequence of IEEE
// operations (Cody–Waite reduction by ln 2, Cephes' degree-6 polynomial for e^r on |r| <= ln2/2, and
// 2^n built from the exponent bits in two halves so n = 128 is reachable). The SIMD backends evaluate
// the same sequence lane by lane, so scores, and hence plans, are bitwise identical on every CPU
// backend; libm's expf differs between implementations. Relative error below 2^-23 (checked against
// double in the tests); 0 below -87.34 (results there would be denormal); +Inf above 88.73.
// Bitwise identity needs FMA contraction off (the default without -mfma, or -ffp-contract=off).
struct exp_constants {
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693359375f;  // few mantissa bits: n * ln2_hi is exact
  static constexpr float ln2_lo = -2.12194440e-4f;
  static constexpr float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  static constexpr float lo = -87.3365479f;          // below: 0
  static constexpr float hi = 88.7228394f;           // above: +Inf
  static constexpr float p0 = 1.9875691500e-4f, p1 = 1.3981999507e-3f, p2 = 8.3334519073e-3f, p3 = 4.1665795894e-2f,
                         p4 = 1.6666665459e-1f, p5 = 5.0000001201e-1f;
};

// A product and a sum rounded on their own: never fused into an FMA, whatever the compiler's
// contraction setting on a device (CUDA's __fmul_rn/__fadd_rn are never contracted; host code relies on
// the -ffp-contract=off that resonance::resonance carries).
// (float and double.)
template <class T>
RESONANCE_INLINE_FUNCTION T mul_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == sizeof(float)) {
    return __fmul_rn(a, b);
  } else {
    return __dmul_rn(a, b);
  }
#else
  return a * b;
#endif
}
template <class T>
RESONANCE_INLINE_FUNCTION T add_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == sizeof(float)) {
    return __fadd_rn(a, b);
  } else {
    return __dadd_rn(a, b);
  }
#else
  return a + b;
#endif
}

// p · 2^n for an integral n in [-2·max_exponent, 2·max_exponent], as p · 2^h · 2^(n-h) with h = n/2
// rounded toward zero: each factor is a normal number, so the largest and the subnormal results are
// reached. Bits: the exponent field of a power of two.
template <class T>
RESONANCE_HOST_DEVICE RESONANCE_FORCEINLINE T times_pow2(T p, T n) {
  using bits = std::conditional_t<sizeof(T) == sizeof(float), std::int32_t, std::int64_t>;
  constexpr int mantissa = std::numeric_limits<T>::digits - 1;
  constexpr bits bias = std::numeric_limits<T>::max_exponent - 1;
  const auto ni = static_cast<bits>(n);
  const bits h = ni / 2;
  const T s1 = std::bit_cast<T>(static_cast<bits>((h + bias) << mantissa));
  const T s2 = std::bit_cast<T>(static_cast<bits>((ni - h + bias) << mantissa));
  return (p * s1) * s2;
}

// Forced inline: it is the body of every softmax loop, and GCC otherwise outlines it when the caller grows.
RESONANCE_HOST_DEVICE RESONANCE_FORCEINLINE float exp_portable(float x) {
  using c = exp_constants;
  if (!(x == x)) return x;  // NaN
  if (x < c::lo) return 0.0f;
  if (x > c::hi) return std::numeric_limits<float>::infinity();
  const float n = add_rn(mul_rn(x, c::log2e), c::round_magic) - c::round_magic;
  float r = x - mul_rn(n, c::ln2_hi);
  r = r - mul_rn(n, c::ln2_lo);
  float p = c::p0;
  p = add_rn(mul_rn(p, r), c::p1);
  p = add_rn(mul_rn(p, r), c::p2);
  p = add_rn(mul_rn(p, r), c::p3);
  p = add_rn(mul_rn(p, r), c::p4);
  p = add_rn(mul_rn(p, r), c::p5);
  p = add_rn(mul_rn(p, mul_rn(r, r)), r);
  p = p + 1.0f;
  return times_pow2(p, n);
}

// The same in double (Sinkhorn's cost), as a fixed sequence of IEEE operations: Cody–Waite reduction
// by ln 2 (ln2_hi has 32 significant bits, so n * ln2_hi is exact for |n| < 2^21), the Taylor series of
// e^r to r^13 on |r| <= ln2/2 (truncation below 2^-57 relative), and 2^n in two halves, so that
// subnormal results are reached too. Within a few ulp of exp; the host and a device give the same bits
// (libm's exp and CUDA's differ in the last bit). 0 below -745.14, +Inf above 709.79.
struct exp_double_constants {
  static constexpr double log2e = 1.4426950408889634074;
  static constexpr double ln2_hi = 6.93147180369123816490e-01;  // 0x3FE62E42FEE00000
  static constexpr double ln2_lo = 1.90821492927058770002e-10;  // ln 2 - ln2_hi
  static constexpr double round_magic = 6755399441055744.0;     // 1.5 * 2^52: adding it rounds to an integer
  static constexpr double lo = -745.1332191019412;
  static constexpr double hi = 709.782712893384;
};

RESONANCE_HOST_DEVICE inline double exp_portable(double x) {
  using c = exp_double_constants;
  if (!(x == x)) return x;  // NaN
  if (x < c::lo) return 0.0;
  if (x > c::hi) return std::numeric_limits<double>::infinity();
  const double n = add_rn(mul_rn(x, c::log2e), c::round_magic) - c::round_magic;
  double r = x - mul_rn(n, c::ln2_hi);
  r = r - mul_rn(n, c::ln2_lo);
  // 1/13! ... 1/2!, Horner from the highest power.
  constexpr double inv_fact[12] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                                   1.0 / 362880.0,     1.0 / 40320.0,     1.0 / 5040.0,     1.0 / 720.0,
                                   1.0 / 120.0,        1.0 / 24.0,        1.0 / 6.0,        1.0 / 2.0};
  double p = inv_fact[0];
  for (int i = 1; i < 12; ++i) p = add_rn(mul_rn(p, r), inv_fact[i]);
  p = add_rn(mul_rn(p, mul_rn(r, r)), r);
  p = p + 1.0;
  return times_pow2(p, n);
}

// log(1 + y) for y >= 0 (softplus's log1p(exp(x))), every step rounded on its own, so that the host and
// a device compute the same bits (the platforms' log1pf differ in the last bit, and a score that differs
// can change a plan). Below sqrt(2) - 1: 2 atanh(s) with s = y / (2 + y). Above: u = 1 + y rounded,
// log(u) = e ln2 + 2 atanh(s) with u = m 2^e, m in [sqrt(1/2), sqrt(2)), s = (m - 1) / (m + 1), times
// y / (u - 1), which undoes u's rounding. |s| <= 0.172: the odd series to s^9. Within 3 ulp of log1p
// (tests/test_backends.cpp measures it; 2.7 at worst).
struct log1p_constants {
  static constexpr float sqrt2 = 1.41421354f;
  static constexpr float ln2_hi = 0.693359375f;  // as exp_constants: e * ln2_hi is exact
  static constexpr float ln2_lo = -2.12194440e-4f;
  static constexpr float c3 = 1.0f / 3.0f, c5 = 1.0f / 5.0f, c7 = 1.0f / 7.0f, c9 = 1.0f / 9.0f;
};

RESONANCE_HOST_DEVICE RESONANCE_FORCEINLINE float log1p_portable(float y) {
  using c = log1p_constants;
  if (!(y == y) || y == std::numeric_limits<float>::infinity()) return y;
  float s, scale = 1.0f;
  std::int32_t e = 0;
  if (y < c::sqrt2 - 1.0f) {
    s = y / add_rn(2.0f, y);  // log1p(y) = 2 atanh(y / (2 + y)), y itself: no rounded 1 + y
  } else {
    const float u = add_rn(1.0f, y);
    scale = y / (u - 1.0f);  // u - 1 is exact (u >= 1); the factor undoes u's rounding
    const auto bits = std::bit_cast<std::uint32_t>(u);
    e = static_cast<std::int32_t>(bits >> 23) - 127;
    float m = std::bit_cast<float>(static_cast<std::uint32_t>((bits & 0x007FFFFFu) | 0x3F800000u));  // [1, 2)
    if (m > c::sqrt2) {
      m = mul_rn(m, 0.5f);  // exact
      ++e;
    }
    s = (m - 1.0f) / add_rn(m, 1.0f);  // m - 1 is exact (Sterbenz)
  }
  const float s2 = mul_rn(s, s);
  float p = c::c9;
  p = add_rn(mul_rn(p, s2), c::c7);
  p = add_rn(mul_rn(p, s2), c::c5);
  p = add_rn(mul_rn(p, s2), c::c3);
  const float log_m = add_rn(mul_rn(mul_rn(2.0f, s), mul_rn(p, s2)), mul_rn(2.0f, s));  // 2s + 2s s^2 p
  const auto ef = static_cast<float>(e);
  const float log_u = add_rn(mul_rn(ef, c::ln2_hi), add_rn(log_m, mul_rn(ef, c::ln2_lo)));
  return mul_rn(log_u, scale);
}

RESONANCE_INLINE_FUNCTION float sigmoid(float x) { return 1.0f / (1.0f + exp_portable(-x)); }

// softplus with torch's threshold (beta 1, threshold 20): returns x above 20 to avoid overflow.
RESONANCE_INLINE_FUNCTION float softplus(float x) { return x > 20.0f ? x : log1p_portable(exp_portable(x)); }

RESONANCE_INLINE_FUNCTION float sqrt_softplus(float x) { return ::sqrtf(softplus(x)); }

// Elementwise score of one logit (softmax is a row operation and is handled by softmax_row).
RESONANCE_INLINE_FUNCTION float elementwise_score(score fn, float x) {
  switch (fn) {
    case score::sigmoid:
      return sigmoid(x);
    case score::sqrt_softplus:
      return sqrt_softplus(x);
    default:
      return x;
  }
}

// An elementwise score and its derivative, in double (the training paths differentiate in double).
RESONANCE_INLINE_FUNCTION double elementwise_score_and_derivative(score fn, double x, double& derivative) {
  switch (fn) {
    case score::sigmoid: {
      const double s = 1.0 / (1.0 + ::exp(-x));
      derivative = s * (1.0 - s);
      return s;
    }
    case score::sqrt_softplus: {
      const double sp = x > 20.0 ? x : ::log1p(::exp(x));  // torch's softplus threshold, as the forward
      const double r = ::sqrt(sp);
      derivative = (x > 20.0 ? 1.0 : 1.0 / (1.0 + ::exp(-x))) / (2.0 * r);
      return r;
    }
    default:
      derivative = 1.0;
      return x;
  }
}

// The summation order of a row sum, fixed for every backend: 16 partial sums (entry i goes to partial
// i mod 16, in index order), then the partials added in index order. A 4-, 8- or 16-lane SIMD loop
// reproduces it exactly.
inline constexpr index row_sum_lanes = 16;

RESONANCE_INLINE_FUNCTION float combine_lane_sums(const float* partial) {
  float sum = partial[0];
  for (index j = 1; j < row_sum_lanes; ++j) sum += partial[j];
  return sum;
}

// out[i] = softmax(scale * in)[i] over n entries: max-subtracted, exp_portable, summed in the fixed
// lane order, multiplied by the reciprocal of the sum.
RESONANCE_INLINE_FUNCTION void softmax_row(const float* in, float* out, index n, float scale) {
  float m = in[0] * scale;
  for (index i = 1; i < n; ++i) m = in[i] * scale > m ? in[i] * scale : m;
  float partial[row_sum_lanes] = {};
  for (index i = 0; i < n; ++i) {
    out[i] = exp_portable(in[i] * scale - m);
    partial[i % row_sum_lanes] += out[i];
  }
  const float inv = 1.0f / combine_lane_sums(partial);
  for (index i = 0; i < n; ++i) out[i] *= inv;
}

// The full score distribution of one row: softmax over all n, or the elementwise function.
RESONANCE_INLINE_FUNCTION void score_row(score fn, const float* in, float* out, index n, float scale) {
  if (fn == score::softmax) {
    softmax_row(in, out, n, scale);
  } else {
    for (index i = 0; i < n; ++i) out[i] = elementwise_score(fn, in[i] * scale);
  }
}

// log(sum(exp(in))) of one row, max-subtracted.
RESONANCE_INLINE_FUNCTION float logsumexp_row(const float* in, index n) {
  float m = in[0];
  for (index i = 1; i < n; ++i) m = in[i] > m ? in[i] : m;
  float sum = 0.0f;
  for (index i = 0; i < n; ++i) sum += ::expf(in[i] - m);
  return m + ::logf(sum);
}

}  // namespace detail
}  // namespace resonance
