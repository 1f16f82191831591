// The AVX2 side of test_backends' runtime-dispatch and row tests: compiled with -mavx2
// (tests/CMakeLists.txt), called only when the CPU has AVX2. The declarations are in test_backends.cpp.
//
// Risk, and why this file stays this small: the library is header-only, so this translation unit also
// emits every inline function it uses (std::vector members, detail::exp_portable, the plan builder,
// ...) compiled for AVX2, and the linker keeps one copy of each across the executable. This object is
// linked after the baseline ones, and GNU ld, gold and lld keep the first copy they meet, so the
// functions the baseline tests share stay baseline code; only what just this file uses (the
// simd<avx2> instantiations) is AVX2. Add no namespace-scope object with dynamic initialisation (it
// would run before any CPU check), and do not rely on this under LTO.

#include <resonance/backend/simd.hpp>
#include <resonance/resonance.hpp>

namespace resonance_test {

namespace rs = resonance;
using avx2_rows = rs::detail::simd_rows<xsimd::avx2>;

rs::routing_plan route_avx2(rs::backend::simd<xsimd::avx2> be, const rs::routing::token_choice& p,
                            const rs::capacity::factor& capacity, rs::matrix_view<const float> logits) {
  using router = rs::router<rs::affinity::precomputed, rs::routing::token_choice, rs::capacity::factor>;
  return router{{}, p, capacity}.route(be, logits);
}

bool all_finite_avx2(const float* x, rs::index n) { return avx2_rows::all_finite(x, n); }

bool topk_avx2(const float* x, rs::index n, rs::index k, float scale, const float* bias, float* vals,
               rs::id_type* ids) {
  return avx2_rows::topk(x, n, k, scale, bias, vals, ids);
}

void score_avx2(rs::score fn, const float* in, float* out, rs::index n, float scale) {
  avx2_rows::score(fn, in, out, n, scale);
}

double group_sums_avx2(const float* row, rs::index E, rs::index g, double* s, bool squares) {
  if (squares) return avx2_rows::group_sums_squares(row, E, g, s);
  avx2_rows::group_sums(row, E, g, s);
  return 0.0;
}

void grap_forward_avx2(rs::index E, rs::matrix_view<const float> x, rs::matrix_view<float> logits) {
  rs::affinity::grap{.num_experts = E}.forward(rs::backend::simd<xsimd::avx2>{}, x, logits);
}

void grap_cosine_forward_avx2(rs::index E, rs::matrix_view<const float> x, rs::matrix_view<float> logits) {
  rs::affinity::grap_cosine{.num_experts = E}.forward(rs::backend::simd<xsimd::avx2>{}, x, logits);
}

void grap_cosine_backward_avx2(rs::index E, rs::matrix_view<const float> x, rs::matrix_view<const float> dlogits,
                               rs::matrix_view<float> dx) {
  rs::affinity::grap_cosine{.num_experts = E}.backward(rs::backend::simd<xsimd::avx2>{}, x, dlogits, dx);
}

void exp_avx2(const float* x, float* out, rs::index n) {
  for (rs::index i = 0; i + avx2_rows::width <= n; i += avx2_rows::width)
    avx2_rows::exp(avx2_rows::batch::load_unaligned(x + i)).store_unaligned(out + i);
}

}  // namespace resonance_test
