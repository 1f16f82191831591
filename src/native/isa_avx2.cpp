// resonance::native's AVX2 table: this file alone is compiled with -mavx2 (src/CMakeLists.txt).
#include "kernels.hpp"

namespace resonance::native_impl {
extern const detail::row_kernels avx2_kernels;
constexpr detail::row_kernels avx2_kernels = kernels_of<xsimd::avx2>::table("avx2");
}  // namespace resonance::native_impl
