#pragma once

// The top-k of one row computed by a group of W cooperating lanes (a CUDA warp), written once for every
// backend that runs rows on lanes. It returns what scalar_rows::topk returns, bit for bit: the k
// largest keys key(i) = x[i] * scale + bias[i] (bias may be null) in descending order, ties to the
// lowest index (-0 equal to +0), and whether every x[i] is finite.
//
// Each candidate becomes one 64-bit word, the order-preserving bits of its key (-0 read as +0) above
// the inverted index, so that a larger word is a larger key, then a lower index: the words are unique
// and one integer comparison decides. Lane l scans i = l, l + W, l + 2W, ... keeping its own K
// largest words in registers, sorted descending (K >= k, a power of two up to 16, fixed at compile
// time: runtime indices would send the list to memory). Then log2(W) butterfly rounds: a lane
// exchanges its whole list with lane l ^ m (m = W/2, ..., 1) and keeps the K largest words of the two
// lists (max(a[j], b[K-1-j]) is bitonic, and a bitonic merge sorts it), so that after the last round
// every lane holds the row's K largest words. The output's values are computed again from x and bias
// at the selected ids (the words hold a canonical zero, not the key's own bits).
//
// Lanes (the group's operations, run by every lane of the group together):
//   static constexpr int width              W, a power of two (32 for a CUDA warp)
//   int lane() const                        this lane, in [0, W)
//   std::uint64_t shfl_xor(v, mask) const   lane l receives v from lane l ^ mask
//   bool all(bool v) const                  true on every lane when v is true on every lane
//   void sync() const                       memory written by a lane before it is visible to every lane
//                                           after it
//   single(f) const                         lane 0 runs f(), then sync(); an f returning bool has its
//                                           result returned on every lane (a stage's tail that updates
//                                           arrays in place runs on one lane: several lanes doing it
//                                           would race)
//   void* scratch() const                   the row's scratch, shared by the lanes
//
// backend::cuda's warp group is these operations on __shfl_xor_sync, __all_sync and __syncwarp; the
// tests run the same code on 32 host threads.

#include <concepts>
#include <cstdint>

#include "../../core/config.hpp"
#include "../../core/select.hpp"

namespace resonance::detail {

// The largest k the lanes keep in registers.
inline constexpr index warp_topk_max_k = 16;

// A candidate's word: the key's bits, then the inverted index (a lower index is a larger word).
RESONANCE_INLINE_FUNCTION std::uint64_t warp_topk_word(float key, index i) {
  return static_cast<std::uint64_t>(ordered_bits(key)) << 32 | (0xFFFFFFFFu - static_cast<std::uint32_t>(i));
}

RESONANCE_INLINE_FUNCTION index warp_topk_index(std::uint64_t word) {
  return static_cast<index>(0xFFFFFFFFu - static_cast<std::uint32_t>(word));
}

// key(i) exactly as scalar_rows::topk writes it: x[i] * scale, plus bias[i] when there is a bias.
struct warp_topk_key {
  const float* x;
  float scale;
  const float* bias;
  RESONANCE_HOST_DEVICE RESONANCE_FORCEINLINE float operator()(index i) const {
    return bias == nullptr ? x[i] * scale : x[i] * scale + bias[i];
  }
};

// A lane's K largest words, descending. Word 0 is smaller than every candidate's (its index part would
// be 2^32 - 1), so an empty entry holds 0.
template <int K>
struct warp_topk_list {
  std::uint64_t w[K];
};

// Inserts a word larger than the last entry: every entry at or below its place moves down one.
template <int K>
RESONANCE_HOST_DEVICE RESONANCE_FORCEINLINE void warp_topk_insert(warp_topk_list<K>& l, std::uint64_t word) {
  RESONANCE_UNROLL
  for (int j = K - 1; j > 0; --j) {
    const std::uint64_t above = l.w[j - 1];
    l.w[j] = word > above ? above : (word > l.w[j] ? word : l.w[j]);
  }
  l.w[0] = word > l.w[0] ? word : l.w[0];
}

// Sorts a bitonic list descending: compare-exchange at distance S, then S/2, ..., 1.
template <int K, int S>
RESONANCE_HOST_DEVICE RESONANCE_FORCEINLINE void warp_topk_bitonic(warp_topk_list<K>& l) {
  if constexpr (S > 0) {
    RESONANCE_UNROLL
    for (int j = 0; j < K; ++j) {
      if ((j & S) == 0) {
        const std::uint64_t a = l.w[j], b = l.w[j + S];
        l.w[j] = a > b ? a : b;
        l.w[j + S] = a > b ? b : a;
      }
    }
    warp_topk_bitonic<K, S / 2>(l);
  }
}

// One butterfly round: the K largest words of this lane's list and lane (lane ^ mask)'s.
template <int K, class Lanes>
RESONANCE_HOST_DEVICE RESONANCE_FORCEINLINE void warp_topk_merge(const Lanes& lanes, warp_topk_list<K>& l, int mask) {
  warp_topk_list<K> other;
  RESONANCE_UNROLL
  for (int j = 0; j < K; ++j) other.w[j] = lanes.shfl_xor(l.w[j], mask);
  // l descending and other reversed ascending: their entrywise maximum holds the K largest words of
  // both lists and is bitonic (it falls, then rises).
  RESONANCE_UNROLL
  for (int j = 0; j < K; ++j) l.w[j] = l.w[j] > other.w[K - 1 - j] ? l.w[j] : other.w[K - 1 - j];
  warp_topk_bitonic<K, K / 2>(l);
}

// warp_topk with the list length fixed: K >= k.
template <int K, class Lanes>
RESONANCE_INLINE_FUNCTION bool warp_topk_fixed(const Lanes& lanes, const float* x, index n, index k, float scale,
                                               const float* bias, float* vals, id_type* ids) {
  constexpr int W = Lanes::width;
  static_assert(W > 0 && (W & (W - 1)) == 0, "the lanes of a group are a power of two");
  static_assert(K > 0 && (K & (K - 1)) == 0 && K <= warp_topk_max_k, "the list is a power of two up to 16");
  const warp_topk_key key{x, scale, bias};
  const int lane = lanes.lane();
  warp_topk_list<K> l;
  RESONANCE_UNROLL
  for (int j = 0; j < K; ++j) l.w[j] = 0;
  bool finite = true;
  for (index i = lane; i < n; i += W) {
    finite &= (x[i] - x[i]) == 0.0f;  // NaN for NaN and ±Inf, as scalar_rows::all_finite
    const std::uint64_t word = warp_topk_word(key(i), i);
    if (word > l.w[K - 1]) warp_topk_insert(l, word);
  }
  for (int mask = W / 2; mask > 0; mask /= 2) warp_topk_merge(lanes, l, mask);
  // Every lane holds the list: entry j is written by lane j mod W, with the key's own bits.
  RESONANCE_UNROLL
  for (int j = 0; j < K; ++j) {
    if (j < k && j % W == lane) {
      const index id = warp_topk_index(l.w[j]);
      ids[j] = static_cast<id_type>(id);
      vals[j] = key(id);
    }
  }
  const bool all_finite = lanes.all(finite);
  lanes.sync();  // the outputs, for every lane
  return all_finite;
}

// The top-k of key(i) = x[i] * scale + bias[i] over i in [0, n) (1 <= k <= min(n, 16); bias may be
// null), run by every lane of the group: vals descending, ids ascending among equal keys, both written
// to memory and visible to every lane on return, as scalar_rows::topk writes them. Returns, on every
// lane, whether every x[i] is finite; when one is not, the selection is unspecified.
template <class Lanes>
RESONANCE_INLINE_FUNCTION bool warp_topk(const Lanes& lanes, const float* x, index n, index k, float scale,
                                         const float* bias, float* vals, id_type* ids) {
  if (k <= 1) return warp_topk_fixed<1>(lanes, x, n, k, scale, bias, vals, ids);
  if (k <= 2) return warp_topk_fixed<2>(lanes, x, n, k, scale, bias, vals, ids);
  if (k <= 4) return warp_topk_fixed<4>(lanes, x, n, k, scale, bias, vals, ids);
  if (k <= 8) return warp_topk_fixed<8>(lanes, x, n, k, scale, bias, vals, ids);
  return warp_topk_fixed<16>(lanes, x, n, k, scale, bias, vals, ids);
}

// A row functor's shape for the concept below (a named type: nvcc rejects lambdas in a
// requires-expression).
template <class Warp>
struct warp_row_archetype {
  RESONANCE_HOST_DEVICE bool operator()(const Warp&, index) const { return false; }
};

// A backend that runs a row on a group of lanes: Backend::warp_group (the Lanes above) and, found by
// argument-dependent lookup,
//   for_each_warp_row(be, n, scratch_bytes, f)   f(w, i) run by every lane of one group per row i, with
//                                                 scratch_bytes of scratch in w.scratch(); as
//                                                 for_each_group, an f returning bool (the same on every
//                                                 lane) gives the lowest failing row, or n; an f
//                                                 returning void gives no result and no wait.
// A stage asks for it with `if constexpr` and keeps its per-row path for the other backends.
template <class Backend>
concept warp_row_backend = requires {
  typename Backend::warp_group;
}
&&requires(const Backend& be, const warp_row_archetype<typename Backend::warp_group>& f) {
  { for_each_warp_row(be, index{}, index{}, f) } -> std::same_as<index>;
};

}  // namespace resonance::detail
