#pragma once

// The per-row primitives a backend may replace with a vectorised version: the finiteness scan, the
// full-row score, the top-k of a row, and GrAP's group sums. `scalar_rows` is the reference; a
// replacement must return bitwise the same values and ids (the SIMD one evaluates the same operations
// lane by lane), so a plan never depends on the backend. Algorithms ask for `row_ops_t<Backend>`.

#include <concepts>
#include <utility>

#include "../core/config.hpp"
#include "../core/topk.hpp"
#include "../score/score.hpp"

namespace resonance::detail {

// The summation order of GrAP's group sums (affinity::grap, affinity::grap_cosine), fixed for every
// backend: inside each group of g entries, the entry at offset i is added (in double) to partial
// i mod 16 of that group, in index order, and the group's sum is its 16 partials combined by the
// halving tree below. The squares v·v (a multiply, then an add, written apart so that -ffp-contract=on
// does not fuse them; for float input v·v is exact in double, so even a fused multiply-add gives the
// same bits) go to 16 partials of their own, by the same offset, kept across the groups of the row
// and combined once per row by the same tree. A 2-, 4- or 8-lane double SIMD loop reproduces it when
// g is a multiple of 16: the tree's first levels are whole-vector adds.
inline constexpr index group_sum_lanes = 16;

// The 16-lane loops are unrolled in full so that the partials stay in registers (GCC keeps an array
// indexed in a loop in memory and pays a store-to-load round trip per addition: 4x slower).
// (nvcc's host pass: none, see RESONANCE_UNROLL.)
#if defined(__CUDA_ARCH__) || defined(__clang__)
#define RESONANCE_IMPL_UNROLL_LANES RESONANCE_IMPL_PRAGMA(unroll 16)
#elif defined(__CUDACC__)
#define RESONANCE_IMPL_UNROLL_LANES
#elif defined(__GNUC__)
#define RESONANCE_IMPL_UNROLL_LANES RESONANCE_IMPL_PRAGMA(GCC unroll 16)
#else
#define RESONANCE_IMPL_UNROLL_LANES
#endif

struct group_lanes {
  double v[group_sum_lanes];
};

// The halving tree: v[j] += v[j + w] for w = 8, 4, 2, then v[0] + v[1].
RESONANCE_INLINE_FUNCTION double combine_group_lanes(group_lanes p) {
  RESONANCE_IMPL_UNROLL_LANES
  for (index j = 0; j < 8; ++j) p.v[j] = p.v[j] + p.v[j + 8];
  RESONANCE_IMPL_UNROLL_LANES
  for (index j = 0; j < 4; ++j) p.v[j] = p.v[j] + p.v[j + 4];
  p.v[0] = p.v[0] + p.v[2];
  p.v[1] = p.v[1] + p.v[3];
  return p.v[0] + p.v[1];
}

// lane_group_sums' loop; Tail handles a g that is not a multiple of 16 (a separate instance, so that
// the common case carries no tail code).
template <bool Squares, bool Tail, class T, class Value>
RESONANCE_INLINE_FUNCTION double lane_group_sums_impl(const T* row, index E, index g, double* s, const Value& value) {
  constexpr index L = group_sum_lanes;
  group_lanes sq;
  RESONANCE_IMPL_UNROLL_LANES
  for (index l = 0; l < L; ++l) sq.v[l] = 0.0;
  const auto add = [&](group_lanes& p, index l, T x) {
    const double v = value(x);
    p.v[l] += v;
    if constexpr (Squares) {
      const double q = v * v;
      sq.v[l] += q;
    }
  };
  for (index e = 0; e < E; ++e) {
    const T* x = row + e * g;
    group_lanes p;
    RESONANCE_IMPL_UNROLL_LANES
    for (index l = 0; l < L; ++l) p.v[l] = 0.0;
    index i = 0;
    for (; i + L <= g; i += L) {
      RESONANCE_IMPL_UNROLL_LANES
      for (index l = 0; l < L; ++l) add(p, l, x[i + l]);
    }
    if constexpr (Tail) {
      // Constant lane indices here too (a variable index would send p to memory).
      RESONANCE_IMPL_UNROLL_LANES
      for (index l = 0; l < L; ++l)
        if (i + l < g) add(p, l, x[i + l]);
    }
    s[e] = combine_group_lanes(p);
  }
  return Squares ? combine_group_lanes(sq) : 0.0;
}

// One level of the halving tree when only nodes below Live are set: node j + W is added into node j
// for j < W, skipping nodes at or past Live.
template <index Live, index W>
RESONANCE_INLINE_FUNCTION void short_tree_level(group_lanes& p) {
  RESONANCE_IMPL_UNROLL_LANES
  for (index j = 0; j + W < Live; ++j) p.v[j] = p.v[j] + p.v[j + W];
}

// The same order for groups of G < 16 entries: partials G..15 hold +0.0, and adding +0.0 changes no
// partial or tree node (none is -0.0: each partial starts as +0.0 + x), so the tree skips them. G is
// a constant so that the partials stay in registers.
template <bool Squares, index G, class T, class Value>
RESONANCE_INLINE_FUNCTION double short_group_sums(const T* row, index E, double* s, const Value& value) {
  constexpr index L = group_sum_lanes;
  group_lanes sq;
  RESONANCE_IMPL_UNROLL_LANES
  for (index l = 0; l < L; ++l) sq.v[l] = 0.0;
  for (index e = 0; e < E; ++e) {
    const T* x = row + e * G;
    group_lanes p;
    RESONANCE_IMPL_UNROLL_LANES
    for (index l = 0; l < G; ++l) {
      const double v = value(x[l]);
      p.v[l] = 0.0 + v;
      if constexpr (Squares) {
        const double q = v * v;
        sq.v[l] += q;
      }
    }
    short_tree_level<G, 8>(p);
    short_tree_level<(G < 8 ? G : 8), 4>(p);
    short_tree_level<(G < 4 ? G : 4), 2>(p);
    short_tree_level<(G < 2 ? G : 2), 1>(p);
    s[e] = p.v[0];
  }
  return Squares ? combine_group_lanes(sq) : 0.0;
}

// short_group_sums<g> for the runtime g in 1 .. 15 (G + 1 over the sequence).
template <bool Squares, class T, class Value, index... G>
RESONANCE_INLINE_FUNCTION double short_group_sums_for(const T* row, index E, index g, double* s, const Value& value,
                                                      std::integer_sequence<index, G...>) {
  double ss = 0.0;
  (void)((g == G + 1 && (ss = short_group_sums<Squares, G + 1>(row, E, s, value), true)) || ...);
  return ss;
}

// s[e] = sum of group e of row (E groups of g entries), each entry passed through value(x) first;
// returns the row's sum of squares of those values when Squares, else 0.
template <bool Squares, class T, class Value>
RESONANCE_INLINE_FUNCTION double lane_group_sums(const T* row, index E, index g, double* s, const Value& value) {
  if (g % group_sum_lanes == 0) return lane_group_sums_impl<Squares, false>(row, E, g, s, value);
  if (g < group_sum_lanes)
    return short_group_sums_for<Squares>(row, E, g, s, value, std::make_integer_sequence<index, group_sum_lanes - 1>{});
  return lane_group_sums_impl<Squares, true>(row, E, g, s, value);
}

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

  // out[i] = exp_portable(in[i]) for n entries (in and out may alias).
  RESONANCE_INLINE_FUNCTION static void exp_n(const float* in, float* out, index n) {
    for (index i = 0; i < n; ++i) out[i] = exp_portable(in[i]);
  }

  // Top-k of key(i) = x[i] * scale + bias[i] (bias may be null; scale 1 and no bias rank x itself):
  // vals descending, ids ascending among equal keys. Returns all_finite(x, n); when it is false the
  // selection is unspecified. Forced inline: once backend::native also calls it (short rows), GCC 12
  // stopped inlining it into token choice's row, and serial routed 20 % slower at E 8, k 1.
  RESONANCE_HOST_DEVICE RESONANCE_FORCEINLINE static bool topk(const float* x, index n, index k, float scale,
                                                               const float* bias, float* vals, id_type* ids) {
    if (bias == nullptr) {
      topk_row(
          n, k, [&](index i) { return x[i] * scale; }, vals, ids);
    } else {
      topk_row(
          n, k, [&](index i) { return x[i] * scale + bias[i]; }, vals, ids);
    }
    return all_finite(x, n);
  }

  // GrAP's group sums in the fixed order above: s[e] = sum of group e (E groups of g entries, in double).
  template <class T>
  RESONANCE_INLINE_FUNCTION static void group_sums(const T* row, index E, index g, double* s) {
    lane_group_sums<false>(row, E, g, s, [](T v) { return static_cast<double>(v); });
  }
  // The same sums, and the row's sum of squares as the return value.
  template <class T>
  RESONANCE_INLINE_FUNCTION static double group_sums_squares(const T* row, index E, index g, double* s) {
    return lane_group_sums<true>(row, E, g, s, [](T v) { return static_cast<double>(v); });
  }
};

}  // namespace resonance::detail
