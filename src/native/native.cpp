// resonance::native's dispatcher and its baseline tables: compiled without instruction-set flags. The
// wider tables come from isa_*.cpp when CMake compiled them (RESONANCE_NATIVE_AVX2, _AVX512BW).

#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include <resonance/backend/native.hpp>
#include <resonance/core/error.hpp>

#if RESONANCE_NATIVE_XSIMD
#include "kernels.hpp"
#endif

namespace resonance {
namespace native_impl {

#if RESONANCE_NATIVE_AVX2
extern const detail::row_kernels avx2_kernels;
#endif
#if RESONANCE_NATIVE_AVX512BW
extern const detail::row_kernels avx512bw_kernels;
#endif

struct scalar_kernels {
  using rows = detail::scalar_rows;
  static bool all_finite(const float* x, index n) { return rows::all_finite(x, n); }
  static void score(resonance::score fn, const float* in, float* out, index n, float scale) {
    rows::score(fn, in, out, n, scale);
  }
  static void exp_n(const float* in, float* out, index n) { rows::exp_n(in, out, n); }
  static bool topk(const float* x, index n, index k, float scale, const float* bias, float* vals, id_type* ids) {
    return rows::topk(x, n, k, scale, bias, vals, ids);
  }
  static void group_sums(const float* row, index E, index g, double* s) { rows::group_sums(row, E, g, s); }
  static double group_sums_squares(const float* row, index E, index g, double* s) {
    return rows::group_sums_squares(row, E, g, s);
  }
};
constexpr detail::row_kernels scalar_table = {"scalar",
                                              &scalar_kernels::all_finite,
                                              &scalar_kernels::score,
                                              &scalar_kernels::exp_n,
                                              &scalar_kernels::topk,
                                              &scalar_kernels::group_sums,
                                              &scalar_kernels::group_sums_squares};

#if RESONANCE_NATIVE_XSIMD
// The architecture a translation unit without flags has (sse2 on x86-64, neon64 on AArch64).
constexpr detail::row_kernels baseline_table = kernels_of<xsimd::default_arch>::table(xsimd::default_arch::name());
#endif

// The tables this build has and this CPU runs, in the order of preference; the scalar reference last.
// AVX2 comes before AVX-512: simd_rows at 16 lanes routes 10-25 % slower than at 8 on the Xeons measured
// (docs/performance.md), so AVX-512 is there to be chosen (RESONANCE_ISA, set_native_isa), not by default.
std::vector<const detail::row_kernels*> usable_tables() {
  std::vector<const detail::row_kernels*> t;
#if RESONANCE_NATIVE_AVX2
  if (__builtin_cpu_supports("avx2")) t.push_back(&avx2_kernels);
#endif
#if RESONANCE_NATIVE_AVX512BW
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw"))
    t.push_back(&avx512bw_kernels);
#endif
#if RESONANCE_NATIVE_XSIMD
  t.push_back(&baseline_table);
#endif
  t.push_back(&scalar_table);
  return t;
}

const detail::row_kernels* find_table(std::string_view isa) {
  for (const detail::row_kernels* k : usable_tables())
    if (isa == k->isa) return k;
  return nullptr;
}

std::string isa_list() {
  std::string s;
  for (const detail::row_kernels* k : usable_tables()) s += (s.empty() ? "" : ", ") + std::string(k->isa);
  return s;
}

}  // namespace native_impl

namespace detail {

std::atomic<const row_kernels*> native_table{nullptr};

const row_kernels& resolve_native_kernels() {
  const row_kernels* k = native_impl::usable_tables().front();
  if (const char* env = std::getenv("RESONANCE_ISA"); env != nullptr && *env != '\0') {
    if (const row_kernels* named = native_impl::find_table(env)) {
      k = named;
    } else {
      // A typo must not pass unnoticed, and a route is no place to throw from: say so once, use the best.
      std::fprintf(stderr, "resonance: RESONANCE_ISA=%s is not one of %s; using %s\n", env,
                   native_impl::isa_list().c_str(), k->isa);
    }
  }
  const row_kernels* expected = nullptr;
  native_table.compare_exchange_strong(expected, k, std::memory_order_acq_rel);
  return *native_table.load(std::memory_order_acquire);
}

}  // namespace detail

std::string native_isa() { return detail::native_kernels().isa; }

std::vector<std::string> native_isas() {
  std::vector<std::string> names;
  for (const detail::row_kernels* k : native_impl::usable_tables()) names.emplace_back(k->isa);
  return names;
}

void set_native_isa(std::string_view isa) {
  const detail::row_kernels* k = native_impl::find_table(isa);
  detail::require(k != nullptr, "isa", "one of " + native_impl::isa_list(), std::string(isa));
  detail::native_table.store(k, std::memory_order_release);
}

}  // namespace resonance
