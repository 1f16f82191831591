#pragma once

// backend::native: one thread, with the row primitives (rows.hpp) of the fastest instruction set of the
// CPU it runs on, picked once at run time; no compiler flag needed. The kernels live in the compiled
// component resonance::native (src/native/): one translation unit per instruction set (sse2, avx2,
// avx512bw on x86-64), each compiled with its own flags from the same simd_rows algorithm, so every
// table returns bitwise what detail::scalar_rows returns and plans never depend on the CPU. A build
// without xsimd, or a CPU without any of the compiled instruction sets, gets the scalar reference.
//
// The environment variable RESONANCE_ISA (sse2, avx2, avx512bw or scalar) caps the choice at start-up,
// and set_native_isa() changes it later: both exist to compare and test the tables on one machine.

#include <atomic>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "../core/config.hpp"
#include "../score/score.hpp"
#include "serial.hpp"

namespace resonance {
namespace detail {

// The float row primitives of one instruction set (those of rows.hpp's scalar_rows).
struct row_kernels {
  const char* isa;
  bool (*all_finite)(const float* x, index n);
  void (*score)(resonance::score fn, const float* in, float* out, index n, float scale);
  void (*exp_n)(const float* in, float* out, index n);
  bool (*topk)(const float* x, index n, index k, float scale, const float* bias, float* vals, id_type* ids);
  void (*group_sums)(const float* row, index E, index g, double* s);
  double (*group_sums_squares)(const float* row, index E, index g, double* s);
};

// The table in use; resolved on first use (RESONANCE_ISA, else the best the CPU supports).
const row_kernels& resolve_native_kernels();
extern std::atomic<const row_kernels*> native_table;  // null until resolved

inline const row_kernels& native_kernels() {
  const row_kernels* k = native_table.load(std::memory_order_acquire);
  return k != nullptr ? *k : resolve_native_kernels();
}

// backend::native's row group: the float primitives through the table, the others (double rows of
// GrAP's group sums) on the scalar reference, as simd_rows does. Short rows (a top-k of a few experts,
// the score of the k selected) take the scalar reference inline: vector set-up and the indirect call
// cost more than such a row (the results are the same bits either way).
struct native_rows {
  static constexpr index short_row = 16;      // below: scalar score, exp and finiteness scan
  static constexpr index short_top_row = 32;  // below: scalar top-k (simd_rows' own cut-off for AVX2)

  static bool all_finite(const float* x, index n) {
    return n < short_row ? scalar_rows::all_finite(x, n) : native_kernels().all_finite(x, n);
  }
  static void score(resonance::score fn, const float* in, float* out, index n, float scale) {
    if (n < short_row) {
      scalar_rows::score(fn, in, out, n, scale);
    } else {
      native_kernels().score(fn, in, out, n, scale);
    }
  }
  static void exp_n(const float* in, float* out, index n) {
    if (n < short_row) {
      scalar_rows::exp_n(in, out, n);
    } else {
      native_kernels().exp_n(in, out, n);
    }
  }
  static bool topk(const float* x, index n, index k, float scale, const float* bias, float* vals, id_type* ids) {
    return n < short_top_row ? scalar_rows::topk(x, n, k, scale, bias, vals, ids)
                             : native_kernels().topk(x, n, k, scale, bias, vals, ids);
  }
  template <class T>
  static void group_sums(const T* row, index E, index g, double* s) {
    if constexpr (std::is_same_v<T, float>) {
      native_kernels().group_sums(row, E, g, s);
    } else {
      scalar_rows::group_sums(row, E, g, s);
    }
  }
  template <class T>
  static double group_sums_squares(const T* row, index E, index g, double* s) {
    if constexpr (std::is_same_v<T, float>) {
      return native_kernels().group_sums_squares(row, E, g, s);
    } else {
      return scalar_rows::group_sums_squares(row, E, g, s);
    }
  }
};
}  // namespace detail

// The instruction set backend::native uses now ("avx2", "avx512bw", "sse2", ... or "scalar").
std::string native_isa();
// The instruction sets this build compiled and this CPU runs, in the order of preference (measured:
// AVX2 before AVX-512, whose tables are slower on the Xeons we measured, docs/performance.md);
// "scalar" is always last. The first is the default.
std::vector<std::string> native_isas();
// Makes backend::native use `isa` (one of native_isas()) from now on; throws resonance::error naming
// the choices otherwise. Not meant to be called while another thread routes (that route may use either).
void set_native_isa(std::string_view isa);

namespace backend {

// One thread; row primitives for the CPU's best instruction set (see the top of this file). Its
// execution primitives are serial's.
struct native {
  static constexpr const char* name = "native";
  using memory_space = host_space;
  template <class T>
  using buffer = buffer_t<host_space, T>;
  using group = host_group<detail::native_rows>;

  friend constexpr bool operator==(const native&, const native&) = default;
};

template <>
inline constexpr bool sequential_host_v<native> = true;

static_assert(execution_backend<native>);

}  // namespace backend
}  // namespace resonance
