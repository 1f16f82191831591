#pragma once

// dispatch: gather token rows into the expert-major buffer (one row per slot, padding rows zeroed).
// combine:  y[t] = sum over t's kept assignments, in ascending expert id, of weight * expert_out[slot].
// The summation order is fixed by the plan, so combine is deterministic on every backend.
// dispatch_backward and combine_backward are their gradients (the rows' and the combine weights'), in
// fixed orders too: dispatch_backward is combine with unit weights, so it sums in combine's order.
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

// Requests a row of d values into the cache (host, GCC/Clang): the rows the loops below gather are
// scattered, which the hardware prefetcher cannot predict. Nothing on a device.
template <class T>
RESONANCE_HOST_DEVICE RESONANCE_FORCEINLINE void prefetch_row([[maybe_unused]] const T* row, [[maybe_unused]] index d) {
#if defined(__GNUC__) && !RESONANCE_DEVICE_COMPILE
  const char* p = reinterpret_cast<const char*>(row);
  for (index b = 0; b < d * static_cast<index>(sizeof(T)); b += 64) __builtin_prefetch(p + b);
#endif
}

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
// w is the plan's token weights (const float*) or unit_weights (dispatch_backward).
template <index Columns, class T, class Src, class Weights>
RESONANCE_HOST_DEVICE RESONANCE_FORCEINLINE void combine_columns(T* __restrict out, const Src& src, const Weights& w,
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
// Weight 1 for every term: combine_columns then sums the rows, and x * 1 is x in every row type, so
// the sum is combine's arithmetic without the products.
struct unit_weights {
  RESONANCE_HOST_DEVICE constexpr float operator[](id_type) const { return 1.0f; }
};

// y[t] = combine_columns over t's kept assignments of w[i] * src.row(token_slot[i]), for every token:
// combine (the plan's weights) and dispatch_backward (unit weights).
template <class Backend, class Space, class T, class InSpace, class OutSpace, class Weights>
void combine_rows(const Backend& be, const plan_view<Space>& plan, matrix_view<const T, InSpace> src,
                  matrix_view<T, OutSpace> y, Weights w) {
  const id_type* const off = plan.token_offsets_;
  const id_type* const slot = plan.token_slot_;
  const index num_tokens = plan.num_tokens();
  const index d = y.cols;
  constexpr index columns = columns_per_item<Backend>();
  const index runs = column_runs(d, columns);
  for_each(
      be, num_tokens * runs,
      RESONANCE_LAMBDA(index item) {
        const index t = columns > 0 ? item / runs : item;
        const index c0 = columns > 0 ? item % runs * columns : 0;
        const index c1 = columns > 0 && c0 + columns < d ? c0 + columns : d;
        // Request the rows two tokens ahead while this one is summed (whole rows only: a device
        // splits them).
        if (columns == 0 && t + 2 < num_tokens)
          for (id_type i = off[t + 2]; i < off[t + 3]; ++i) prefetch_row(src.row(slot[i]), d);
        const auto row_of = [&](id_type i) { return src.row(slot[i]); };
        combine_columns<columns>(y.row(t), row_of, w, off[t], off[t + 1], c0, c1);
      },
      columns > 0 ? index{0} : dispatch_grain);
}

// A row value widened to double: exact for float, double and bfloat16.
template <class T>
RESONANCE_HOST_DEVICE RESONANCE_FORCEINLINE double widen(T v) {
  if constexpr (std::is_same_v<T, bfloat16>) {
    return static_cast<double>(v.to_float());
  } else {
    return static_cast<double>(v);
  }
}

// <a, b> over d columns in double, in an order fixed by d alone: column c goes to partial sum c mod 8,
// each partial sum adds its columns in ascending order, and the eight are added pairwise. Eight
// independent sums are a fixed-length inner loop the vectoriser takes (one running sum would be a
// chain of dependent adds). For float and bfloat16 rows every product is exact in double, so the
// result does not depend on whether a compiler fuses the multiply and the add.
template <class T>
RESONANCE_HOST_DEVICE RESONANCE_FORCEINLINE double dot_row(const T* __restrict a, const T* __restrict b, index d) {
  double part[8] = {};
  index c = 0;
  for (; c + 8 <= d; c += 8) {
    // Unrolled, the partial sums stay in registers (GCC 12 keeps them on the stack otherwise).
    RESONANCE_UNROLL
    for (index j = 0; j < 8; ++j) part[j] += widen(a[c + j]) * widen(b[c + j]);
  }
  for (index j = 0; j < 8 && c + j < d; ++j) part[j] += widen(a[c + j]) * widen(b[c + j]);
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// out[c] = w·src[c] for c in [0, d), one rounding per column (a bfloat16 product in fp32, rounded
// once). Eight columns per step, for scaled_add_row's reason.
template <class T>
RESONANCE_HOST_DEVICE RESONANCE_FORCEINLINE void scale_row(T* __restrict out, const T* __restrict src, float w,
                                                           index d) {
  if constexpr (std::is_same_v<T, bfloat16>) {
    for (index c = 0; c < d; ++c) out[c] = bfloat16::from_float(w * src[c].to_float());
  } else {
    const T wt = static_cast<T>(w);
    index c = 0;
    for (; c + 8 <= d; c += 8) {
      for (index j = 0; j < 8; ++j) out[c + j] = wt * src[c + j];
    }
    for (; c < d; ++c) out[c] = wt * src[c];
  }
}

template <class W>
inline constexpr bool gradient_scalar_v = std::is_same_v<W, float> || std::is_same_v<W, double>;
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
  detail::combine_rows(be, plan, expert_out, y, plan.token_weight_);
}

template <execution_backend Backend, plan_source Plan, class T, class InSpace, class OutSpace>
void combine(const Backend& be, const Plan& plan, matrix_view<T, InSpace> expert_out, matrix_view<T, OutSpace> y) {
  combine(be, plan, matrix_view<const T, InSpace>(expert_out), y);
}

// The gradient of dispatch: dx[t] (overwritten) = the sum of dbuffer's rows at t's kept slots, in
// ascending expert id, the first term written as 0 + x; zero for a token that kept nothing. Padding
// slots reach no token, so their rows are not read. It is combine with every weight 1, in combine's
// order and column runs, so it is deterministic on every backend. dbuffer is S×d (S =
// plan.num_slots()), dx T×d, both of one row type (float, double or bfloat16: a bfloat16 row is summed
// in fp32 and rounded once); dbuffer may be a const or a mutable view. Throws resonance::error naming
// the argument, with dx untouched, on a shape mismatch.
template <execution_backend Backend, plan_source Plan, class G, class T, class GSpace, class DxSpace>
void dispatch_backward(const Backend& be, const Plan& source, matrix_view<G, GSpace> dbuffer,
                       matrix_view<T, DxSpace> dx) {
  using Space = plan_space_t<Plan>;
  const plan_view<Space> plan = detail::as_plan_view(source);
  static_assert(!std::is_const_v<T>, "dispatch_backward writes dx");
  static_assert(std::is_same_v<std::remove_const_t<G>, T>, "dbuffer and dx hold the same row type");
  static_assert(detail::row_scalar_v<T>, "rows of float, double or bfloat16");
  detail::check_dispatch_spaces<Backend, Space, GSpace, DxSpace>();
  detail::check_matrix(dbuffer, "dbuffer");
  detail::require(dbuffer.rows == plan.num_slots(), "dbuffer",
                  std::to_string(plan.num_slots()) + " rows (one per slot)", dbuffer.rows);
  detail::check_matrix(dx, "dx", plan.num_tokens(), dbuffer.cols);
  detail::combine_rows(be, plan, matrix_view<const T, GSpace>(dbuffer), dx, detail::unit_weights{});
}

// The gradient of combine, given dy = ∂L/∂y (T×d) and the expert outputs combine read (S×d):
//   d_expert_out[s] = w_i · dy[t] for the kept assignment i (token t, weight w_i) at slot s, and zero
//                     rows at padding slots (S×d, overwritten; one rounding per entry);
//   dweight[i]      = <dy[t], expert_out[token_slot[i]]> for every kept assignment i in
//                     plan.token_weight() order: what resonance::backward and weight_backward take.
// dweight is a num_assignments()×1 matrix_view (a column in any memory space the backend reads) or,
// for a backend of host memory, a vector_view of num_assignments() entries; of float or double
// whatever the rows are. Each entry is summed in double, in an order fixed by d alone (detail::dot_row:
// eight partial sums over the columns, added pairwise), and rounded once: for float and bfloat16 rows
// every product is exact in double, so an fp32 entry is the exact dot product to within half an ulp
// plus the double sum's error (d·2^-53 of the terms' magnitudes, where an fp32 sum's is d·2^-24), and
// does not depend on FMA contraction; double rows are summed in double.
// Either output may be skipped: an empty view (rows or cols 0, e.g. matrix_view<float>{}) is not
// written. Both outputs are written by for_each items that own their entries (a run of one slot row's
// columns; one assignment; on the host, when both are wanted, one assignment writes both, reading dy[t]
// and the expert row once), so every backend gives the same bits. Rows are float, double or bfloat16,
// one type for expert_out, dy and d_expert_out (the inputs may be const or mutable views). Throws
// resonance::error naming the argument, with both outputs untouched, on a shape mismatch.
template <execution_backend Backend, plan_source Plan, class In, class Dy, class T, class W, class InSpace,
          class DySpace, class OutSpace, class WSpace>
void combine_backward(const Backend& be, const Plan& source, matrix_view<In, InSpace> expert_out,
                      matrix_view<Dy, DySpace> dy, matrix_view<T, OutSpace> d_expert_out,
                      matrix_view<W, WSpace> dweight) {
  using Space = plan_space_t<Plan>;
  const plan_view<Space> plan = detail::as_plan_view(source);
  static_assert(!std::is_const_v<T>, "combine_backward writes d_expert_out");
  static_assert(std::is_same_v<std::remove_const_t<In>, T> && std::is_same_v<std::remove_const_t<Dy>, T>,
                "expert_out, dy and d_expert_out hold the same row type");
  static_assert(detail::row_scalar_v<T>, "rows of float, double or bfloat16");
  static_assert(!std::is_const_v<W>, "combine_backward writes dweight");
  static_assert(detail::gradient_scalar_v<W>, "dweight of float or double");
  detail::check_dispatch_spaces<Backend, Space, InSpace, DySpace, OutSpace, WSpace>();
  const index S = plan.num_slots(), nnz = plan.num_assignments();
  detail::check_matrix(expert_out, "expert_out");
  detail::require(expert_out.rows == S, "expert_out", std::to_string(S) + " rows (one per slot)", expert_out.rows);
  const index d = expert_out.cols;
  detail::check_matrix(dy, "dy", plan.num_tokens(), d);
  detail::check_matrix(d_expert_out, "d_expert_out");
  detail::require(d_expert_out.empty() || (d_expert_out.rows == S && d_expert_out.cols == d), "d_expert_out",
                  "shape " + std::to_string(S) + "x" + std::to_string(d) + " (one row per slot), or empty (not wanted)",
                  d_expert_out.rows, "x", d_expert_out.cols);
  detail::check_matrix(dweight, "dweight");
  detail::require(dweight.empty() || (dweight.rows == nnz && dweight.cols == 1), "dweight",
                  std::to_string(nnz) + " entries (one per kept assignment: a vector_view or a " + std::to_string(nnz) +
                      "x1 matrix_view), or empty (not wanted)",
                  dweight.rows, "x", dweight.cols);

  const matrix_view<const T, InSpace> out{expert_out.data, expert_out.rows, expert_out.cols, expert_out.stride};
  const matrix_view<const T, DySpace> g{dy.data, dy.rows, dy.cols, dy.stride};
  const id_type* const slot_token = plan.slot_token_;
  const id_type* const token_slot = plan.token_slot_;
  constexpr index columns = detail::columns_per_item<Backend>();
  const index grain = columns > 0 ? index{0} : detail::dispatch_grain;
  if constexpr (columns == 0) {
    if (!d_expert_out.empty() && !dweight.empty()) {
      // Host: both outputs in one pass per assignment, so dy[t] and the expert row are read once for
      // both (the entries are the two-pass form's, bit for bit); then the padding rows are zeroed.
      const float* const weight = plan.token_weight_;
      for_each(
          be, nnz,
          RESONANCE_LAMBDA(index i) {
            if (i + 2 < nnz) detail::prefetch_row(out.row(token_slot[i + 2]), d);
            const id_type s = token_slot[i];
            const T* const gt = g.row(slot_token[s]);
            *dweight.row(i) = static_cast<W>(detail::dot_row(gt, out.row(s), d));
            detail::scale_row(d_expert_out.row(s), gt, weight[i], d);
          },
          grain);
      for_each(
          be, S,
          RESONANCE_LAMBDA(index s) {
            if (slot_token[s] >= 0) return;
            T* const dst = d_expert_out.row(s);
            for (index c = 0; c < d; ++c) dst[c] = T{};
          },
          grain);
      return;
    }
  }
  if (!d_expert_out.empty()) {
    // One item per run of a slot row's columns, as dispatch: slot_weight is the weight of the slot's
    // kept assignment (the plan stores it in both orders), 0 at padding.
    const float* const slot_weight = plan.slot_weight_;
    const index runs = detail::column_runs(d, columns);
    for_each(
        be, S * runs,
        RESONANCE_LAMBDA(index item) {
          const index s = columns > 0 ? item / runs : item;
          const index c0 = columns > 0 ? item % runs * columns : 0;
          const index c1 = columns > 0 && c0 + columns < d ? c0 + columns : d;
          const id_type t = slot_token[s];
          T* const dst = d_expert_out.row(s);
          if (t >= 0) {
            detail::scale_row(dst + c0, g.row(t) + c0, slot_weight[s], c1 - c0);
          } else {
            for (index c = c0; c < c1; ++c) dst[c] = T{};
          }
        },
        grain);
  }
  if (!dweight.empty()) {
    // One item per assignment: a dot product is not split by columns (that would change its order).
    for_each(
        be, nnz,
        RESONANCE_LAMBDA(index i) {
          // The expert rows are scattered gathers (combine's reason): request the row two
          // assignments ahead while this one is summed.
          if (columns == 0 && i + 2 < nnz) detail::prefetch_row(out.row(token_slot[i + 2]), d);
          const id_type s = token_slot[i];
          *dweight.row(i) = static_cast<W>(detail::dot_row(g.row(slot_token[s]), out.row(s), d));
        },
        grain);
  }
}

// dweight as a host vector (vector_view is a host view): the same as its nnz×1 matrix_view.
template <execution_backend Backend, plan_source Plan, class In, class Dy, class T, class W, class InSpace,
          class DySpace, class OutSpace>
void combine_backward(const Backend& be, const Plan& plan, matrix_view<In, InSpace> expert_out,
                      matrix_view<Dy, DySpace> dy, matrix_view<T, OutSpace> d_expert_out, vector_view<W> dweight) {
  combine_backward(be, plan, expert_out, dy, d_expert_out, matrix_view<W>{dweight.data, dweight.size, 1});
}

}  // namespace resonance
