#pragma once

// dispatch: gather token rows into the expert-major buffer (one row per slot, padding rows zeroed).
// combine:  y[t] = sum over t's kept assignments, in ascending expert id, of weight * expert_out[slot].
// The summation order is fixed by the plan, so combine is deterministic on every backend.
//
// Both are written once on the execution primitives: a for_each over slots (dispatch) or tokens
// (combine), whose functor owns its output row. The plan may be in any memory space the backend can
// read; the matrices are host views for now (matrix_view has no memory space yet), so the backend must
// be able to read host memory.

#include <cstring>
#include <string>
#include <type_traits>

#include "../backend/backend.hpp"
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

template <class Backend, class Space>
constexpr void check_dispatch_spaces() {
  static_assert(accessible_from_v<Space, memory_space_t<Backend>>, "the plan must be in memory the backend can read");
  static_assert(accessible_from_v<host_space, memory_space_t<Backend>>,
                "dispatch and combine read and write host matrices (matrix_view is a host view): they need a "
                "backend that can read host memory");
}
}  // namespace detail

template <execution_backend Backend, plan_source Plan, class T>
void dispatch(const Backend& be, const Plan& source, matrix_view<const T> x, matrix_view<T> buffer) {
  using Space = plan_space_t<Plan>;
  const plan_view<Space> plan = detail::as_plan_view(source);
  static_assert(!std::is_const_v<T>, "dispatch writes its buffer");
  detail::check_dispatch_spaces<Backend, Space>();
  detail::check_matrix(x, "x");
  detail::require(x.rows == plan.num_tokens(), "x", std::to_string(plan.num_tokens()) + " rows (one per token)",
                  x.rows);
  detail::check_matrix(buffer, "buffer", plan.num_slots(), x.cols);
  const id_type* const slot_token = plan.slot_token_;
  const index d = x.cols;
  for_each(
      be, plan.num_slots(),
      RESONANCE_LAMBDA(index s) {
        const id_type t = slot_token[s];
        T* __restrict dst = buffer.row(s);
        if (t >= 0) {
#if RESONANCE_DEVICE_COMPILE
          const T* __restrict src = x.row(t);
          for (index c = 0; c < d; ++c) dst[c] = src[c];
#else
          // memcpy, not the loop: the loop measured 1.5x to 9x slower on the host (bench_route, GCC 12).
          std::memcpy(dst, x.row(t), static_cast<std::size_t>(d) * sizeof(T));
#endif
        } else {
          for (index c = 0; c < d; ++c) dst[c] = T(0);
        }
      },
      detail::dispatch_grain);
}

template <execution_backend Backend, plan_source Plan, class T>
void dispatch(const Backend& be, const Plan& plan, matrix_view<T> x, matrix_view<T> buffer) {
  dispatch(be, plan, matrix_view<const T>(x), buffer);
}

template <execution_backend Backend, plan_source Plan, class T>
void combine(const Backend& be, const Plan& source, matrix_view<const T> expert_out, matrix_view<T> y) {
  using Space = plan_space_t<Plan>;
  const plan_view<Space> plan = detail::as_plan_view(source);
  static_assert(!std::is_const_v<T>, "combine writes y");
  detail::check_dispatch_spaces<Backend, Space>();
  detail::check_matrix(expert_out, "expert_out");
  detail::require(expert_out.rows == plan.num_slots(), "expert_out",
                  std::to_string(plan.num_slots()) + " rows (one per slot)", expert_out.rows);
  detail::check_matrix(y, "y", plan.num_tokens(), expert_out.cols);
  const id_type* const off = plan.token_offsets_;
  const float* const w = plan.token_weight_;
  const id_type* const slot = plan.token_slot_;
  const index num_tokens = plan.num_tokens();
  const index d = y.cols;
  for_each(
      be, num_tokens,
      RESONANCE_LAMBDA(index t) {
#if defined(__GNUC__) && !RESONANCE_DEVICE_COMPILE
        // The expert rows are scattered gathers the hardware prefetcher cannot predict: request the
        // rows two tokens ahead while this one is summed.
        if (t + 2 < num_tokens) {
          for (id_type i = off[t + 2]; i < off[t + 3]; ++i) {
            const char* src = reinterpret_cast<const char*>(expert_out.row(slot[i]));
            for (index b = 0; b < d * static_cast<index>(sizeof(T)); b += 64) __builtin_prefetch(src + b);
          }
        }
#endif
        T* __restrict out = y.row(t);
        const id_type first = off[t], last = off[t + 1];
        if (first == last) {
          for (index c = 0; c < d; ++c) out[c] = T(0);
          return;
        }
        // In ascending expert id; the first term is written as 0 + w·x (not w·x: that would keep a
        // -0), which saves a zeroing pass.
        detail::scaled_add_row<true>(out, expert_out.row(slot[first]), static_cast<T>(w[first]), d);
        for (id_type i = first + 1; i < last; ++i)
          detail::scaled_add_row<false>(out, expert_out.row(slot[i]), static_cast<T>(w[i]), d);
      },
      detail::dispatch_grain);
}

template <execution_backend Backend, plan_source Plan, class T>
void combine(const Backend& be, const Plan& plan, matrix_view<T> expert_out, matrix_view<T> y) {
  combine(be, plan, matrix_view<const T>(expert_out), y);
}

}  // namespace resonance
