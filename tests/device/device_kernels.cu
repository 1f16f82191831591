// Instantiates the core's per-row kernels in device code. Compiled, never run: if a host-only call
// slips into a RESONANCE_HOST_DEVICE function, nvcc rejects this file.
// The umbrella first: every header it pulls in must at least compile (host side) under nvcc.
#include <resonance/resonance.hpp>

#include <resonance/core/select.hpp>
#include <resonance/core/topk.hpp>
#include <resonance/plan/build.hpp>
#include <resonance/routing/token_choice.hpp>
#include <resonance/score/score.hpp>

namespace rs = resonance;

__global__ void token_choice_kernel(rs::routing::token_choice p, const float* logits, rs::index T, rs::index E,
                                    const float* bias, rs::id_type* experts, float* weights, float* fscratch,
                                    rs::id_type* iscratch) {
  const rs::index t = blockIdx.x * static_cast<rs::index>(blockDim.x) + threadIdx.x;
  if (t >= T) return;
  const rs::index s = p.scratch_size(E);
  rs::routing::kernel::token_choice_row(p, logits + t * E, E, bias, experts + t * p.top_k, weights + t * p.top_k,
                                        fscratch + t * s, iscratch + t * s);
}

__global__ void score_kernel(const float* in, float* out, rs::index T, rs::index E, float* lse) {
  const rs::index t = blockIdx.x * static_cast<rs::index>(blockDim.x) + threadIdx.x;
  if (t >= T) return;
  rs::detail::score_row(rs::score::softmax, in + t * E, out + t * E, E, 1.0f);
  rs::detail::score_row(rs::score::sqrt_softplus, in + t * E, out + t * E, E, 1.0f);
  lse[t] = rs::detail::logsumexp_row(in + t * E, E);
}

__global__ void topk_kernel(const float* in, rs::index T, rs::index E, rs::index k, float* vals, rs::id_type* ids,
                            float* fs, rs::id_type* is) {
  const rs::index t = blockIdx.x * static_cast<rs::index>(blockDim.x) + threadIdx.x;
  if (t >= T) return;
  const float* row = in + t * E;
  auto key = [row](rs::index e) { return row[e]; };
  rs::detail::topk_row(E, k, key, vals + t * k, ids + t * k);
  rs::detail::group_limited_topk_row(E, k, 4, 2, rs::detail::group_score_kind::top2_sum, key, vals + t * k, ids + t * k,
                                     fs + t * E, is + t * E);
  rs::detail::sort_by_id(ids + t * k, vals + t * k, k);
}

__global__ void random_priority_kernel(unsigned long long seed, unsigned long long* out) {
  out[threadIdx.x] = rs::detail::random_priority(seed, threadIdx.x, blockIdx.x);
}

// The radix select of segmented_select (the Kokkos backend's; a CUDA backend's per block).
__global__ void radix_select_kernel(const std::uint64_t* keys, const rs::id_type* offsets, rs::index k,
                                    std::uint64_t* kth, rs::id_type* histograms) {
  const rs::index s = blockIdx.x;
  const rs::index n = offsets[s + 1] - offsets[s];
  if (n > k)
    kth[s] = rs::detail::radix_kth_largest(keys + offsets[s], n, k, histograms + s * rs::detail::radix_select_bins);
}

// The per-row pieces of dispatch_backward and combine_backward: the unit-weight sum of a token's slot
// rows (8-column items, as a device runs it), a slot row scaled by its weight, and the double dot
// product of dweight, for fp32 and bfloat16 rows.
template <class T>
__global__ void rows_backward_kernel(const T* dbuffer, const rs::id_type* token_offsets, const rs::id_type* token_slot,
                                     const float* weight, rs::index T_, rs::index d, T* dx, T* d_expert_out,
                                     float* dweight) {
  const rs::index t = blockIdx.x * static_cast<rs::index>(blockDim.x) + threadIdx.x;
  if (t >= T_) return;
  const auto row_of = [&](rs::id_type i) { return dbuffer + token_slot[i] * d; };
  rs::detail::combine_columns<8>(dx + t * d, row_of, rs::detail::unit_weights{}, token_offsets[t], token_offsets[t + 1],
                                 0, d < 8 ? d : 8);
  for (rs::id_type i = token_offsets[t]; i < token_offsets[t + 1]; ++i) {
    rs::detail::scale_row(d_expert_out + token_slot[i] * d, dx + t * d, weight[i], d);
    dweight[i] = static_cast<float>(rs::detail::dot_row(dx + t * d, dbuffer + token_slot[i] * d, d));
  }
}
template __global__ void rows_backward_kernel<float>(const float*, const rs::id_type*, const rs::id_type*, const float*,
                                                     rs::index, rs::index, float*, float*, float*);
template __global__ void rows_backward_kernel<rs::bfloat16>(const rs::bfloat16*, const rs::id_type*, const rs::id_type*,
                                                            const float*, rs::index, rs::index, rs::bfloat16*,
                                                            rs::bfloat16*, float*);
