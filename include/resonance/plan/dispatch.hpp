#pragma once

// dispatch: gather token rows into the expert-major buffer (one row per slot, padding rows zeroed).
// combine:  y[t] = sum over t's kept assignments, in ascending expert id, of weight * expert_out[slot].
// The summation order is fixed by the plan, so combine is deterministic on every backend.
//
// Rows are float, double or bfloat16 (core/bfloat16.hpp): combine sums bfloat16 rows in fp32 and
// rounds each output once. Both are written once on the execution primitives, as a for_each whose
// item owns a run of columns of one output row: a whole row on a backend whose memory the host reads
// (a CPU thread streams a row), columns_per_item columns on a device (neighbouring threads take
// neighbouring columns, so their loads coalesce). Each column is computed on its own, so the split
// never changes a bit. The plan and the matrices may be in any memory space the backend can read.

#include <cstring>
#include <string>
#include <type_traits>

#include "../backend/backend.hpp"
#include "../core/bfloat16.hpp"
#include "../core/error.hpp"
#include "../core/view.hpp"
#include "plan.hpp"

namespace resonance {

namespace detail {
// Rows per block of the dispatch and combine loops (tbb's task size): a row is d values.
inline constexpr index dispatch_grain = 256;

// out[c] = 0 + w·src[c] (First) or out[c] += w·src[c], for c in [0, d). Each column is computed on its
// own, so the bits do not depend on how the loop is vectorised. Eight columns per step: a fixed-length
// inner loop, which GCC's -O2 vectoriser takes (its very cheap cost model leaves a loop of unknown
// length scalar); measured 1.2x to 4x faster than the plain loop on bm_combine.
template <bool First, class T>
RESONANCE_HOST_DEVICE RESONANCE_FORCEINLINE void scaled_add_row(T* __restrict out, const T* __restrict src, T w,
                                                                index d) {
  index c = 0;
  for (; c + 8 <= d; c += 8) {
    for (index j = 0; j < 8; ++j) {
      if constexpr (First) {
        out[c + j] = T(0) + w * src[c + j];
      } else {
        out[c + j] += w * src[c + j];
      }
    }
  }
  for (; c < d; ++c) {
    if constexpr (First) {
      out[c] = T(0) + w * src[c];
    } else {
      out[c] += w * src[c];
    }
  }
}

// Columns per item of dispatch and combine: the backend's columns_per_item when it declares one, a
// whole row (0) on a backend whose memory the host reads, else 8 (16 bytes of bfloat16).
template <class Backend>
constexpr index columns_per_item() {
  if constexpr (requires { Backend::columns_per_item; }) {
    return Backend::columns_per_item;
  } else if constexpr (host_accessible_v<memory_space_t<Backend>>) {
    return 0;
  } else {
    return 8;
  }
}

// Items of a d-column row split into runs of `columns` (0: one run).
RESONANCE_HOST_DEVICE constexpr index column_runs(index d, index columns) {
  return columns <= 0 ? 1 : (d + columns - 1) / columns;
}

template <class Backend, class Space, class... Spaces>
constexpr void check_dispatch_spaces() {
  static_assert(accessible_from_v<Space, memory_space_t<Backend>>, "the plan must be in memory the backend can read");
  static_assert((accessible_from_v<Spaces, memory_space_t<Backend>> && ...),
                "dispatch and combine read and write matrices in memory the backend can read and write");
}

// Row element types of dispatch and combine.
template <class T>
inline constexpr bool row_scalar_v =
    std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, bfloat16>;

// Columns [c0, c1) of token t's combined row: the terms i in [first, last) of w[i] * src(i), in that
// order; the first written as 0 + w·x (not w·x: that would keep a -0), which saves a zeroing pass. A
// bfloat16 row is summed in fp32 and rounded once, Run columns at a time: the accumulators stay in
// registers (a device item's Columns, unrolled with a guard for the last run; 64 on the host).
template <index Columns, class T, class Src>
RESONANCE_HOST_DEVICE RESONANCE_FORCEINLINE void combine_columns(T* __restrict out, const Src& src, const float* w,
                                                                 id_type first, id_type last, index c0, index c1) {
  if (first == last) {
    for (index c = c0; c < c1; ++c) out[c] = T{};
    return;
  }
  if constexpr (std::is_same_v<T, bfloat16>) {
    constexpr index run = Columns > 0 ? Columns : 64;
    for (index b = c0; b < c1; b += run) {
      const index n = c1 - b < run ? c1 - b : run;
      float acc[run] = {};
      const bfloat16* x = src(first) + b;
      const float w0 = w[first];
      RESONANCE_UNROLL
      for (index j = 0; j < (Columns > 0 ? run : n); ++j)
        if (Columns == 0 || j < n) acc[j] = 0.0f + w0 * x[j].to_float();
      for (id_type i = first + 1; i < last; ++i) {
        const bfloat16* xi = src(i) + b;
        const float wi = w[i];
        RESONANCE_UNROLL
        for (index j = 0; j < (Columns > 0 ? run : n); ++j)
          if (Columns == 0 || j < n) acc[j] += wi * xi[j].to_float();
      }
      RESONANCE_UNROLL
      for (index j = 0; j < (Columns > 0 ? run : n); ++j)
        if (Columns == 0 || j < n) out[b + j] = bfloat16::from_float(acc[j]);
    }
  } else {
    scaled_add_row<true>(out + c0, src(first) + c0, static_cast<T>(w[first]), c1 - c0);
    for (id_type i = first + 1; i < last; ++i)
      scaled_add_row<false>(out + c0, src(i) + c0, static_cast<T>(w[i]), c1 - c0);
  }
}
}  // namespace detail

template <execution_backend Backend, plan_source Plan, class T, class XSpace, class BufferSpace>
void dispatch(const Backend& be, const Plan& source, matrix_view<const T, XSpace> x,
              matrix_view<T, BufferSpace> buffer) {
  using Space = plan_space_t<Plan>;
  const plan_view<Space> plan = detail::as_plan_view(source);
  static_assert(!std::is_const_v<T>, "dispatch writes its buffer");
  static_assert(detail::row_scalar_v<T>, "rows of float, double or bfloat16");
  detail::check_dispatch_spaces<Backend, Space, XSpace, BufferSpace>();
  detail::check_matrix(x, "x");
  detail::require(x.rows == plan.num_tokens(), "x", std::to_string(plan.num_tokens()) + " rows (one per token)",
                  x.rows);
  detail::check_matrix(buffer, "buffer", plan.num_slots(), x.cols);
  const id_type* const slot_token = plan.slot_token_;
  const index d = x.cols;
  constexpr index columns = detail::columns_per_item<Backend>();
  const index runs = detail::column_runs(d, columns);
  for_each(
      be, plan.num_slots() * runs,
      RESONANCE_LAMBDA(index item) {
        const index s = columns > 0 ? item / runs : item;
        const index c0 = columns > 0 ? item % runs * columns : 0;
        const index c1 = columns > 0 && c0 + columns < d ? c0 + columns : d;
        const id_type t = slot_token[s];
        T* __restrict dst = buffer.row(s);
        if (t >= 0) {
#if RESONANCE_DEVICE_COMPILE
          const T* __restrict src = x.row(t);
          for (index c = c0; c < c1; ++c) dst[c] = src[c];
#else
          // memcpy, not the loop: the loop measured 1.5x to 9x slower on the host (bench_route, GCC 12).
          std::memcpy(dst + c0, x.row(t) + c0, static_cast<std::size_t>(c1 - c0) * sizeof(T));
#endif
        } else {
          for (index c = c0; c < c1; ++c) dst[c] = T{};
        }
      },
      columns > 0 ? index{0} : detail::dispatch_grain);
}

template <execution_backend Backend, plan_source Plan, class T, class XSpace, class BufferSpace>
void dispatch(const Backend& be, const Plan& plan, matrix_view<T, XSpace> x, matrix_view<T, BufferSpace> buffer) {
  dispatch(be, plan, matrix_view<const T, XSpace>(x), buffer);
}

template <execution_backend Backend, plan_source Plan, class T, class InSpace, class OutSpace>
void combine(const Backend& be, const Plan& source, matrix_view<const T, InSpace> expert_out,
             matrix_view<T, OutSpace> y) {
  using Space = plan_space_t<Plan>;
  const plan_view<Space> plan = detail::as_plan_view(source);
  static_assert(!std::is_const_v<T>, "combine writes y");
  static_assert(detail::row_scalar_v<T>, "rows of float, double or bfloat16");
  detail::check_dispatch_spaces<Backend, Space, InSpace, OutSpace>();
  detail::check_matrix(expert_out, "expert_out");
  detail::require(expert_out.rows == plan.num_slots(), "expert_out",
                  std::to_string(plan.num_slots()) + " rows (one per slot)", expert_out.rows);
  detail::check_matrix(y, "y", plan.num_tokens(), expert_out.cols);
  const id_type* const off = plan.token_offsets_;
  const float* const w = plan.token_weight_;
  const id_type* const slot = plan.token_slot_;
  const index num_tokens = plan.num_tokens();
  const index d = y.cols;
  constexpr index columns = detail::columns_per_item<Backend>();
  const index runs = detail::column_runs(d, columns);
  for_each(
      be, num_tokens * runs,
      RESONANCE_LAMBDA(index item) {
        const index t = columns > 0 ? item / runs : item;
        const index c0 = columns > 0 ? item % runs * columns : 0;
        const index c1 = columns > 0 && c0 + columns < d ? c0 + columns : d;
#if defined(__GNUC__) && !RESONANCE_DEVICE_COMPILE
        // The expert rows are scattered gathers the hardware prefetcher cannot predict: request the
        // rows two tokens ahead while this one is summed (whole rows only: a device splits them).
        if (columns == 0 && t + 2 < num_tokens) {
          for (id_type i = off[t + 2]; i < off[t + 3]; ++i) {
            const char* src = reinterpret_cast<const char*>(expert_out.row(slot[i]));
            for (index b = 0; b < d * static_cast<index>(sizeof(T)); b += 64) __builtin_prefetch(src + b);
          }
        }
#endif
        const auto row_of = [&](id_type i) { return expert_out.row(slot[i]); };
        detail::combine_columns<columns>(y.row(t), row_of, w, off[t], off[t + 1], c0, c1);
      },
      columns > 0 ? index{0} : detail::dispatch_grain);
}

template <execution_backend Backend, plan_source Plan, class T, class InSpace, class OutSpace>
void combine(const Backend& be, const Plan& plan, matrix_view<T, InSpace> expert_out, matrix_view<T, OutSpace> y) {
  combine(be, plan, matrix_view<const T, InSpace>(expert_out), y);
}

}  // namespace resonance
