#pragma once

// dispatch: gather token rows into the expert-major buffer (one row per slot, padding rows zeroed).
// combine:  y[t] = sum over t's kept assignments, in ascending expert id, of weight * expert_out[slot].
// The summation order is fixed by the plan, so combine is deterministic on every backend.

#include <cstring>
#include <string>
#include <type_traits>

#include "../backend/backend.hpp"
#include "../core/error.hpp"
#include "../core/view.hpp"
#include "plan.hpp"

namespace resonance {

template <execution_backend Backend, class T>
void dispatch(const Backend& be, const plan_view<>& plan, matrix_view<const T> x, matrix_view<T> buffer) {
  static_assert(!std::is_const_v<T>, "dispatch writes its buffer");
  detail::check_matrix(x, "x");
  detail::require(x.rows == plan.num_tokens(), "x", std::to_string(plan.num_tokens()) + " rows (one per token)",
                  x.rows);
  detail::check_matrix(buffer, "buffer", plan.num_slots(), x.cols);
  const auto slot_token = plan.slot_token();
  const index d = x.cols;
  detail::host_blocks(be, plan.num_slots(), 256, [&](index begin, index end) {
    for (index s = begin; s < end; ++s) {
      const id_type t = slot_token[static_cast<std::size_t>(s)];
      T* dst = buffer.row(s);
      if (t >= 0) {
        std::memcpy(dst, x.row(t), static_cast<std::size_t>(d) * sizeof(T));
      } else {
        for (index c = 0; c < d; ++c) dst[c] = T(0);
      }
    }
  });
}

template <execution_backend Backend, class T>
void dispatch(const Backend& be, const plan_view<>& plan, matrix_view<T> x, matrix_view<T> buffer) {
  dispatch(be, plan, matrix_view<const T>(x), buffer);
}

template <execution_backend Backend, class T>
void combine(const Backend& be, const plan_view<>& plan, matrix_view<const T> expert_out, matrix_view<T> y) {
  static_assert(!std::is_const_v<T>, "combine writes y");
  detail::check_matrix(expert_out, "expert_out");
  detail::require(expert_out.rows == plan.num_slots(), "expert_out",
                  std::to_string(plan.num_slots()) + " rows (one per slot)", expert_out.rows);
  detail::check_matrix(y, "y", plan.num_tokens(), expert_out.cols);
  const auto off = plan.token_offsets();
  const auto w = plan.token_weight();
  const auto slot = plan.token_slot();
  const index d = y.cols;
  detail::host_blocks(be, plan.num_tokens(), 256, [&](index begin, index end) {
    for (index t = begin; t < end; ++t) {
      // The expert rows are scattered gathers the hardware prefetcher cannot predict: request the
      // rows two tokens ahead while this one is summed.
      if (t + 2 < end) {
        for (id_type i = off[static_cast<std::size_t>(t + 2)]; i < off[static_cast<std::size_t>(t + 3)]; ++i) {
          const char* src = reinterpret_cast<const char*>(expert_out.row(slot[static_cast<std::size_t>(i)]));
#if defined(__GNUC__)
          for (index b = 0; b < d * static_cast<index>(sizeof(T)); b += 64) __builtin_prefetch(src + b);
#else
          (void)src;
#endif
        }
      }
      T* __restrict out = y.row(t);
      const id_type first = off[static_cast<std::size_t>(t)], last = off[static_cast<std::size_t>(t + 1)];
      if (first == last) {
        for (index c = 0; c < d; ++c) out[c] = T(0);
        continue;
      }
      // The first term is written as 0 + w·x (not w·x: that would keep a -0), which saves a zeroing pass.
      const T w0 = static_cast<T>(w[static_cast<std::size_t>(first)]);
      const T* __restrict src0 = expert_out.row(slot[static_cast<std::size_t>(first)]);
      for (index c = 0; c < d; ++c) out[c] = T(0) + w0 * src0[c];
      for (id_type i = first + 1; i < last; ++i) {
        const T wt = static_cast<T>(w[static_cast<std::size_t>(i)]);
        const T* __restrict src = expert_out.row(slot[static_cast<std::size_t>(i)]);
        for (index c = 0; c < d; ++c) out[c] += wt * src[c];
      }
    }
  });
}

template <execution_backend Backend, class T>
void combine(const Backend& be, const plan_view<>& plan, matrix_view<T> expert_out, matrix_view<T> y) {
  combine(be, plan, matrix_view<const T>(expert_out), y);
}

}  // namespace resonance
