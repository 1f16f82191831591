#pragma once

// The few xsimd calls whose spelling changed after 8.1 (Debian 12's version), behind one name each,
// so the simd backend builds against 8.1 and against newer releases.

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include <xsimd/xsimd.hpp>

namespace resonance::detail::xsimd_compat {

#if XSIMD_VERSION_MAJOR >= 11
template <class T, class A>
T reduce_max(const xsimd::batch<T, A>& b) {
  return xsimd::reduce_max(b);
}
template <class T, class A>
T reduce_add(const xsimd::batch<T, A>& b) {
  return xsimd::reduce_add(b);
}
#else
// 8.1 has no reduce_max; a store and a scalar pass (called once per row, not per element).
template <class T, class A>
T reduce_max(const xsimd::batch<T, A>& b) {
  alignas(A::alignment()) T lanes[xsimd::batch<T, A>::size];
  b.store_aligned(lanes);
  T m = lanes[0];
  for (std::size_t i = 1; i < xsimd::batch<T, A>::size; ++i) m = lanes[i] > m ? lanes[i] : m;
  return m;
}
template <class T, class A>
T reduce_add(const xsimd::batch<T, A>& b) {
  return xsimd::hadd(b);
}
#endif

// Bit l set when lane l of the mask is true (lane 0 in bit 0); newer xsimd calls it batch_bool::mask().
template <class A>
std::uint64_t to_mask(const xsimd::batch_bool<float, A>& b) {
#if XSIMD_VERSION_MAJOR >= 11
  return static_cast<std::uint64_t>(b.mask());
#else
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of_v<xsimd::avx512f, A>) return static_cast<std::uint64_t>(b.data);
#endif
#if XSIMD_WITH_AVX
  if constexpr (std::is_base_of_v<xsimd::avx, A>) return static_cast<std::uint64_t>(_mm256_movemask_ps(b));
#endif
#if XSIMD_WITH_SSE2
  if constexpr (std::is_base_of_v<xsimd::sse2, A>) return static_cast<std::uint64_t>(_mm_movemask_ps(b));
#endif
  alignas(A::alignment() > 0 ? A::alignment() : 16) bool lanes[xsimd::batch_bool<float, A>::size];
  b.store_aligned(lanes);
  std::uint64_t bits = 0;
  for (std::size_t i = 0; i < xsimd::batch_bool<float, A>::size; ++i) bits |= static_cast<std::uint64_t>(lanes[i]) << i;
  return bits;
#endif
}

// batch<double, A>::size floats from p (unaligned), widened exactly to doubles: one cvtps2pd on x86
// (xsimd has no float-to-double widening load in 8.1, and its converting load goes through memory).
template <class A>
xsimd::batch<double, A> load_widened(const float* p) {
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of_v<xsimd::avx512f, A>) return _mm512_cvtps_pd(_mm256_loadu_ps(p));
#endif
#if XSIMD_WITH_AVX
  if constexpr (std::is_base_of_v<xsimd::avx, A>) return _mm256_cvtps_pd(_mm_loadu_ps(p));
#endif
#if XSIMD_WITH_SSE2
  // A 64-bit load (_mm_loadl_epi64 reads through an unaligned, may-alias type).
  if constexpr (std::is_base_of_v<xsimd::sse2, A>)
    return _mm_cvtps_pd(_mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#endif
  constexpr std::size_t n = xsimd::batch<double, A>::size;
  double lanes[n];
  for (std::size_t i = 0; i < n; ++i) lanes[i] = static_cast<double>(p[i]);
  return xsimd::batch<double, A>::load_unaligned(lanes);
}

}  // namespace resonance::detail::xsimd_compat
