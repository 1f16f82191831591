#pragma once

// bfloat16: the 16-bit storage format of activations in MoE layers (the upper half of an fp32: 1 sign,
// 8 exponent, 7 mantissa bits). The same bits as torch.bfloat16, __nv_bfloat16 and Kokkos's
// bhalf_t, so arrays of them pass between runtimes as they are. Arithmetic is always in fp32: the
// library converts each value to float (exact), computes, and rounds once to nearest even when it
// stores one. A plain struct, usable in device code, with no dependency on CUDA's headers.

#include <cstdint>
#include <type_traits>

#include "config.hpp"

namespace resonance {

struct bfloat16 {
  std::uint16_t bits = 0;

  // The nearest bfloat16 to v (ties to even); NaN stays a (quiet) NaN, ±Inf and ±0 are kept.
  RESONANCE_HOST_DEVICE static constexpr bfloat16 from_float(float v) {
    const std::uint32_t u = __builtin_bit_cast(std::uint32_t, v);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return {static_cast<std::uint16_t>((u >> 16) | 0x0040u)};  // NaN
    const std::uint32_t rounded = u + 0x7FFFu + ((u >> 16) & 1u);
    return {static_cast<std::uint16_t>(rounded >> 16)};
  }
  // Exact.
  RESONANCE_HOST_DEVICE constexpr float to_float() const {
    return __builtin_bit_cast(float, static_cast<std::uint32_t>(bits) << 16);
  }
  // Implicit, as __nv_bfloat16's: a bfloat16 row reads as fp32 wherever the library sums one.
  RESONANCE_HOST_DEVICE constexpr operator float() const { return to_float(); }

  // Bitwise: +0 and -0 differ, a NaN equals the same NaN (what a test of bits wants).
  friend constexpr bool operator==(const bfloat16&, const bfloat16&) = default;
};

static_assert(sizeof(bfloat16) == 2 && alignof(bfloat16) == 2);

namespace detail {
// A value of a row element type as fp32 (exact for float and bfloat16, rounded for double), and back.
template <class T>
RESONANCE_HOST_DEVICE constexpr float to_fp32(T v) {
  if constexpr (std::is_same_v<T, bfloat16>) {
    return v.to_float();
  } else {
    return static_cast<float>(v);
  }
}
template <class T>
RESONANCE_HOST_DEVICE constexpr T from_fp32(float v) {
  if constexpr (std::is_same_v<T, bfloat16>) {
    return bfloat16::from_float(v);
  } else {
    return static_cast<T>(v);
  }
}
}  // namespace detail

}  // namespace resonance
