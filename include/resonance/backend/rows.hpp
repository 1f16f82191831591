#pragma once

// The per-row primitives a backend may replace with a vectorised version: the finiteness scan, the
// full-row score, and the top-k of a row. `scalar_rows` is the reference; a replacement must return
// bitwise the same values and ids (the SIMD one evaluates the same operations lane by lane), so a
// plan never depends on the backend. Algorithms ask for `row_ops_t<Backend>`.

#include <concepts>

#include "../core/config.hpp"
#include "../core/topk.hpp"
#include "../score/score.hpp"

namespace resonance::detail {

struct scalar_rows {
  // True when every x[i] is finite.
  RESONANCE_INLINE_FUNCTION static bool all_finite(const float* x, index n) {
    bool ok = true;
    for (index i = 0; i < n; ++i) ok &= (x[i] - x[i]) == 0.0f;  // NaN for NaN and ±Inf
    return ok;
  }

  // out = score(scale * in) over n entries (softmax over the row, or the elementwise function).
  RESONANCE_INLINE_FUNCTION static void score(resonance::score fn, const float* in, float* out, index n, float scale) {
    score_row(fn, in, out, n, scale);
  }

  // Top-k of key(i) = x[i] * scale + bias[i] (bias may be null; scale 1 and no bias rank x itself):
  // vals descending, ids ascending among equal keys. Returns all_finite(x, n); when it is false the
  // selection is unspecified.
  RESONANCE_INLINE_FUNCTION static bool topk(const float* x, index n, index k, float scale, const float* bias,
                                             float* vals, id_type* ids) {
    if (bias == nullptr) {
      topk_row(
          n, k, [&](index i) { return x[i] * scale; }, vals, ids);
    } else {
      topk_row(
          n, k, [&](index i) { return x[i] * scale + bias[i]; }, vals, ids);
    }
    return all_finite(x, n);
  }
};

// A backend may name its primitives `row_ops`; the others use the scalar reference.
template <class B>
struct row_ops_of {
  using type = scalar_rows;
};
template <class B>
requires requires { typename B::row_ops; }
struct row_ops_of<B> {
  using type = typename B::row_ops;
};
template <class B>
using row_ops_t = typename row_ops_of<B>::type;

}  // namespace resonance::detail
