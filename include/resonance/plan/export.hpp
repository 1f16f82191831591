#pragma once

// Exports of a plan to the layouts other runtimes consume:
//   to_dense          Megatron-Core: probs [T×E] (weight of each kept pair, 0 elsewhere) and routing_map [T×E]
//   to_block_aligned  vLLM moe_align_block_size: sorted_token_ids, expert_ids per block, num_tokens_post_pad
//   to_rank_layout    DeepEP get_dispatch_layout: tokens per rank / node / expert, is_token_in_rank [T×R]
//
// Each takes a backend as an optional first argument (without one: backend::serial) and is written once
// on the execution primitives; the plan and the outputs may be in any memory space the backend can
// read. On a backend whose memory the host reads the layouts hold std::vector (the contract types); on
// a device they hold the backend's buffers (basic_block_aligned_layout<Space>, basic_rank_layout<Space>),
// so an export on a device never passes through the host. to_block_aligned waits once, for its size.

#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../backend/backend.hpp"
#include "../backend/serial.hpp"
#include "../core/error.hpp"
#include "../core/view.hpp"
#include "../dist/placement.hpp"
#include "plan.hpp"

namespace resonance {

namespace detail {
template <class Backend, class Space, class... Outputs>
constexpr void check_export_spaces() {
  static_assert(accessible_from_v<Space, memory_space_t<Backend>>, "the plan must be in memory the backend can read");
  static_assert((accessible_from_v<Outputs, memory_space_t<Backend>> && ...),
                "the outputs must be in memory the backend can write");
}

// The space of an export's arrays: the host's when the backend reads host memory, else the backend's.
template <class Backend>
using export_space_t =
    std::conditional_t<host_accessible_v<memory_space_t<Backend>>, host_space, memory_space_t<Backend>>;

// An export's array: std::vector on the host, the space's buffer elsewhere.
template <class Space, class T>
using export_array = std::conditional_t<std::is_same_v<Space, host_space>, std::vector<T>, buffer_t<Space, T>>;

// n entries (a host vector's are zeroed; a device buffer's are written by the export).
template <class T, class Backend>
export_array<export_space_t<Backend>, T> make_export_array(const Backend& be, index n) {
  if constexpr (std::is_same_v<export_space_t<Backend>, host_space>) {
    return std::vector<T>(static_cast<std::size_t>(n));
  } else {
    return allocate<T>(be, n);
  }
}
}  // namespace detail

// Writes the dense Megatron form, one token's rows per item. Both outputs are checked before anything
// is written.
template <execution_backend Backend, plan_source Plan, class P, class M, class PSpace, class MSpace>
void to_dense(const Backend& be, const Plan& source, matrix_view<P, PSpace> probs, matrix_view<M, MSpace> mask) {
  using Space = plan_space_t<Plan>;
  const plan_view<Space> plan = detail::as_plan_view(source);
  static_assert(!std::is_const_v<P> && !std::is_const_v<M>, "to_dense writes its outputs");
  detail::check_export_spaces<Backend, Space, PSpace, MSpace>();
  const index T = plan.num_tokens(), E = plan.num_experts();
  detail::check_matrix(probs, "probs", T, E);
  detail::check_matrix(mask, "mask", T, E);
  const id_type* const off = plan.token_offsets_;
  const id_type* const ex = plan.token_expert_;
  const float* const w = plan.token_weight_;
  for_each(
      be, T, RESONANCE_LAMBDA(index t) {
        P* p = probs.row(t);
        M* m = mask.row(t);
        for (index e = 0; e < E; ++e) {
          p[e] = P(0);
          m[e] = M(0);
        }
        for (id_type i = off[t]; i < off[t + 1]; ++i) {
          p[ex[i]] = static_cast<P>(w[i]);
          m[ex[i]] = M(1);
        }
      });
}

template <class P, class M>
void to_dense(const plan_view<>& plan, matrix_view<P> probs, matrix_view<M> mask) {
  to_dense(backend::serial{}, plan, probs, mask);
}

template <class Space = host_space>
struct basic_block_aligned_layout {
  // Kept assignments grouped by expert, each expert's run padded to a multiple of `block`. An entry is
  // the assignment's index in the plan's token-major CSR (token_expert()); when every token keeps
  // exactly k experts that is t*k + j, vLLM's flattened topk_ids index. Padding holds num_assignments.
  detail::export_array<Space, id_type> sorted_token_ids;
  detail::export_array<Space, id_type> expert_ids;  // one per block of `block` entries
  id_type num_tokens_post_pad = 0;
  index block = 1;
};

using block_aligned_layout = basic_block_aligned_layout<host_space>;

// Blocks per expert, scanned into each expert's first block; the host reads the block count, sizes the
// outputs, then each expert writes its blocks.
template <execution_backend Backend, plan_source Plan>
basic_block_aligned_layout<detail::export_space_t<Backend>> to_block_aligned(const Backend& be, const Plan& source,
                                                                             index block) {
  using Space = plan_space_t<Plan>;
  const plan_view<Space> plan = detail::as_plan_view(source);
  detail::check_export_spaces<Backend, Space>();
  detail::require(block >= 1, "block", "block >= 1", block);
  const index E = plan.num_experts(), S = plan.num_slots(), A = plan.num_assignments();
  const id_type* const counts = plan.expert_counts_;
  const id_type* const offsets = plan.expert_offsets_;
  const id_type* const tok_slot = plan.token_slot_;

  auto work = allocate<id_type>(be, E + 1 + S);
  id_type* const first_block = work.data();          // E + 1: each expert's first block, then the total
  id_type* const csr_of_slot = first_block + E + 1;  // S: the CSR position of each kept slot
  // Rounded up without forming count + block - 1, which overflows for a huge block. A count of blocks
  // is at most the expert's count, so the scan fits in 32-bit ids.
  for_each(
      be, E, RESONANCE_LAMBDA(index e) {
        const index n = counts[e];
        first_block[e] = static_cast<id_type>(n == 0 ? 0 : (n - 1) / block + 1);
      });
  exclusive_scan(be, first_block, first_block, E);
  id_type blocks = 0;
  copy_to_host(be, &blocks, first_block + E, 1);
  fence(be);
  // The padded layout has blocks · block entries; blocks · block <= max exactly when blocks <= max / block
  // (rounded down), without forming the product.
  detail::require(static_cast<index>(blocks) <= std::numeric_limits<id_type>::max() / block, "block",
                  "a block size whose padded layout fits in 32-bit ids", block);

  basic_block_aligned_layout<detail::export_space_t<Backend>> out;
  out.block = block;
  out.num_tokens_post_pad = static_cast<id_type>(static_cast<index>(blocks) * block);
  out.sorted_token_ids = detail::make_export_array<id_type>(be, out.num_tokens_post_pad);
  out.expert_ids = detail::make_export_array<id_type>(be, blocks);
  // Kept tokens fill the first expert_counts[e] slots of expert e; map each kept slot to its CSR position.
  for_each(
      be, A, RESONANCE_LAMBDA(index i) { csr_of_slot[tok_slot[i]] = static_cast<id_type>(i); });
  const auto pad = static_cast<id_type>(A);
  id_type* const sorted = out.sorted_token_ids.data();
  id_type* const expert_ids = out.expert_ids.data();
  for_each(
      be, E,
      RESONANCE_LAMBDA(index e) {
        const index b = first_block[e], nb = first_block[e + 1] - first_block[e];
        for (index j = 0; j < nb; ++j) expert_ids[b + j] = static_cast<id_type>(e);
        id_type* dst = sorted + b * block;
        const id_type* src = csr_of_slot + offsets[e];
        const index n = counts[e];
        for (index j = 0; j < n; ++j) dst[j] = src[j];
        for (index j = n; j < nb * block; ++j) dst[j] = pad;
      },
      index{1});
  return out;
}

inline block_aligned_layout to_block_aligned(const plan_view<>& plan, index block) {
  return to_block_aligned(backend::serial{}, plan, block);
}

template <class Space = host_space>
struct basic_rank_layout {
  detail::export_array<Space, id_type> num_tokens_per_rank;    // R: tokens sent to each rank (once per rank)
  detail::export_array<Space, id_type> num_tokens_per_node;    // R / ranks_per_node (num_tokens_per_rdma_rank)
  detail::export_array<Space, id_type> num_tokens_per_expert;  // E: kept tokens per expert
  detail::export_array<Space, std::uint8_t> is_token_in_rank;  // T×R, row-major, 1: the token goes there
  index num_ranks = 0;
};

using rank_layout = basic_rank_layout<host_space>;

// Each token's row of is_token_in_rank, then each rank (node) counts the tokens flagged in its column
// (any of its ranks' columns): no atomics, the same counts on every backend.
template <execution_backend Backend, plan_source Plan>
basic_rank_layout<detail::export_space_t<Backend>> to_rank_layout(const Backend& be, const Plan& source,
                                                                  const dist::expert_placement& placement) {
  using Space = plan_space_t<Plan>;
  const plan_view<Space> plan = detail::as_plan_view(source);
  detail::check_export_spaces<Backend, Space>();
  const index T = plan.num_tokens(), E = plan.num_experts();
  placement.validate(E);
  const index R = placement.num_ranks, N = placement.num_nodes(), ranks_per_node = placement.ranks_per_node;
  basic_rank_layout<detail::export_space_t<Backend>> out;
  out.num_ranks = R;
  out.num_tokens_per_rank = detail::make_export_array<id_type>(be, R);
  out.num_tokens_per_node = detail::make_export_array<id_type>(be, N);
  out.num_tokens_per_expert = detail::make_export_array<id_type>(be, E);
  out.is_token_in_rank = detail::make_export_array<std::uint8_t>(be, T * R);
  copy(be, out.num_tokens_per_expert.data(), plan.expert_counts_, E);

  const id_type* const off = plan.token_offsets_;
  const id_type* const ex = plan.token_expert_;
  // The placement is host data: a backend that cannot read the host gets a copy.
  buffer_t<memory_space_t<Backend>, id_type> placement_copy;
  const id_type* rank_of_expert = placement.rank_of_expert.data();
  if constexpr (!accessible_from_v<host_space, memory_space_t<Backend>>) {
    placement_copy = allocate<id_type>(be, E);
    copy(be, placement_copy.data(), rank_of_expert, E);
    rank_of_expert = placement_copy.data();
  }
  std::uint8_t* const in_rank = out.is_token_in_rank.data();
  id_type* const per_rank = out.num_tokens_per_rank.data();
  id_type* const per_node = out.num_tokens_per_node.data();
  for_each(
      be, T, RESONANCE_LAMBDA(index t) {
        std::uint8_t* row = in_rank + t * R;
        for (index r = 0; r < R; ++r) row[r] = 0;
        for (id_type i = off[t]; i < off[t + 1]; ++i) row[rank_of_expert[ex[i]]] = 1;
      });
  for_each(
      be, R,
      RESONANCE_LAMBDA(index r) {
        id_type n = 0;
        for (index t = 0; t < T; ++t) n += in_rank[t * R + r];
        per_rank[r] = n;
      },
      index{1});
  for_each(
      be, N,
      RESONANCE_LAMBDA(index node) {
        id_type n = 0;
        for (index t = 0; t < T; ++t) {
          const std::uint8_t* ranks = in_rank + t * R + node * ranks_per_node;
          std::uint8_t hit = 0;
          for (index r = 0; r < ranks_per_node; ++r) hit |= ranks[r];
          n += hit;
        }
        per_node[node] = n;
      },
      index{1});
  fence(be);  // the copies, before placement_copy is freed
  return out;
}

inline rank_layout to_rank_layout(const plan_view<>& plan, const dist::expert_placement& placement) {
  return to_rank_layout(backend::serial{}, plan, placement);
}

}  // namespace resonance
