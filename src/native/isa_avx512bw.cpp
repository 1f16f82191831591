// resonance::native's AVX-512 table: this file alone is compiled with -mavx512f -mavx512cd -mavx512dq
// -mavx512bw (cmake/resonanceNative.cmake).

// GCC 12's avx512fintrin.h initialises _mm512_undefined_epi32's result from itself, which
// -Wmaybe-uninitialized reports wherever a shift inlines it: a false positive in the compiler's header.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "kernels.hpp"

namespace resonance::native_impl {
extern const detail::row_kernels avx512bw_kernels;
constexpr detail::row_kernels avx512bw_kernels = kernels_of<xsimd::avx512bw>::table("avx512bw");
}  // namespace resonance::native_impl
