#pragma once

// Selection of the k-th largest of n unique 64-bit keys by a most-significant-digit radix select,
// written once for host and device (the Kokkos backend's segmented_select runs it per team, a CUDA one
// per block): raw pointers only, no allocation, no <algorithm>, the keys are only read.

#include <cstdint>

#include "config.hpp"

namespace resonance::detail {

// The order-preserving bits of a float (larger value, larger bits), -0 read as +0 (an integer test: no
// floating-point operation a compiler could fold), so that ±0 tie and the tie goes to whatever the low
// bits of a key say (the inverted index or token of the selection and drop keys).
RESONANCE_INLINE_FUNCTION std::uint32_t ordered_bits(float v) {
  std::uint32_t u = __builtin_bit_cast(std::uint32_t, v);
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) != 0 ? ~u : (u | 0x80000000u);
}

// Digits of the radix select: 8 passes of 8 bits, most significant first.
inline constexpr int radix_select_bits = 8;
inline constexpr index radix_select_bins = index{1} << radix_select_bits;

// The k-th largest of keys[0, n) (1 <= k <= n, keys unique). Each pass histograms the digit of the
// keys that still share the chosen prefix and descends into the bin holding the k-th largest, so the
// result is the same whatever order the keys come in. `histogram` holds radix_select_bins counters
// (scratch; its contents on entry do not matter). Once the chosen bin holds a single key, one more pass
// finds it instead of resolving the remaining digits: typical keys (a score's bits) end after 2 or 3
// passes; at most 8 histogram passes and that one.
RESONANCE_INLINE_FUNCTION std::uint64_t radix_kth_largest(const std::uint64_t* keys, index n, index k,
                                                          id_type* histogram) {
  std::uint64_t prefix = 0;  // the chosen digits so far
  std::uint64_t mask = 0;    // the bits they occupy
  for (int shift = 64 - radix_select_bits; shift >= 0; shift -= radix_select_bits) {
    for (index b = 0; b < radix_select_bins; ++b) histogram[b] = 0;
    for (index i = 0; i < n; ++i)
      if ((keys[i] & mask) == prefix) ++histogram[(keys[i] >> shift) & (radix_select_bins - 1)];
    // The largest digits first: skip whole bins until the k-th largest falls in one.
    index digit = radix_select_bins - 1;
    while (k > histogram[digit]) {
      k -= histogram[digit];
      --digit;
    }
    prefix |= static_cast<std::uint64_t>(digit) << shift;
    mask |= static_cast<std::uint64_t>(radix_select_bins - 1) << shift;
    if (histogram[digit] == 1) {
      // The only key with this prefix is the answer (k is 1 here).
      for (index i = 0; i < n; ++i)
        if ((keys[i] & mask) == prefix) return keys[i];
    }
  }
  return prefix;  // all 64 bits chosen: the key itself
}

}  // namespace resonance::detail
