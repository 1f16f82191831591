#pragma once

// Score functions applied to router logits, in fp32. `score` is the contract enum; the kernels below
// are per-row host/device functions.

#include <math.h>

#include "../core/config.hpp"

namespace resonance {

enum class score : unsigned char {
  softmax,        // exp(x) / sum exp(x), over the top-k (default) or over all experts (pre_softmax)
  sigmoid,        // 1 / (1 + exp(-x))
  sqrt_softplus,  // sqrt(log(1 + exp(x)))
  identity,       // the logit itself (cosine and GrAP affinities are already bounded)
};

namespace detail {

RESONANCE_INLINE_FUNCTION float sigmoid(float x) { return 1.0f / (1.0f + ::expf(-x)); }

// softplus with torch's threshold (beta 1, threshold 20): returns x above 20 to avoid overflow.
RESONANCE_INLINE_FUNCTION float softplus(float x) { return x > 20.0f ? x : ::log1pf(::expf(x)); }

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

// out[i] = softmax(scale * in)[i] over n entries; max-subtracted, summed in index order.
RESONANCE_INLINE_FUNCTION void softmax_row(const float* in, float* out, index n, float scale) {
  float m = in[0] * scale;
  for (index i = 1; i < n; ++i) m = in[i] * scale > m ? in[i] * scale : m;
  float sum = 0.0f;
  for (index i = 0; i < n; ++i) {
    out[i] = ::expf(in[i] * scale - m);
    sum += out[i];
  }
  const float inv = 1.0f / sum;
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
