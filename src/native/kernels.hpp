#pragma once

// The row_kernels table of one xsimd architecture, for the per-ISA translation units of
// resonance::native. Each entry is flattened: everything it calls is inlined into it, so the object
// file of an ISA built with wider flags (-mavx2, -mavx512bw) defines no out-of-line copy of a shared
// inline function (scalar_rows, exp_portable, the standard library) that the linker could pick for
// baseline code; tests/native/no_shared_symbols.cmake checks the objects for that.

#include <resonance/backend/native.hpp>
#include <resonance/backend/simd.hpp>

namespace resonance::native_impl {

template <class Arch>
struct kernels_of {
  using rows = detail::simd_rows<Arch>;
  [[gnu::flatten]] static bool all_finite(const float* x, index n) { return rows::all_finite(x, n); }
  [[gnu::flatten]] static void score(resonance::score fn, const float* in, float* out, index n, float scale) {
    rows::score(fn, in, out, n, scale);
  }
  [[gnu::flatten]] static void exp_n(const float* in, float* out, index n) { rows::exp_n(in, out, n); }
  [[gnu::flatten]] static bool topk(const float* x, index n, index k, float scale, const float* bias, float* vals,
                                    id_type* ids) {
    return rows::topk(x, n, k, scale, bias, vals, ids);
  }
  [[gnu::flatten]] static void group_sums(const float* row, index E, index g, double* s) {
    rows::group_sums(row, E, g, s);
  }
  [[gnu::flatten]] static double group_sums_squares(const float* row, index E, index g, double* s) {
    return rows::group_sums_squares(row, E, g, s);
  }
  static constexpr detail::row_kernels table(const char* isa) {
    return {isa, &all_finite, &score, &exp_n, &topk, &group_sums, &group_sums_squares};
  }
};

}  // namespace resonance::native_impl
