#pragma once

// Exports of a plan to the layouts other runtimes consume:
//   to_dense          Megatron-Core: probs [T×E] (weight of each kept pair, 0 elsewhere) and routing_map [T×E]
//   to_block_aligned  vLLM moe_align_block_size: sorted_token_ids, expert_ids per block, num_tokens_post_pad
//   to_rank_layout    DeepEP get_dispatch_layout: tokens per rank / node / expert, is_token_in_rank [T×R]

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../core/error.hpp"
#include "../core/view.hpp"
#include "../dist/placement.hpp"
#include "plan.hpp"

namespace resonance {

// Writes the dense Megatron form. Both outputs are checked before anything is written.
template <class P, class M>
void to_dense(const plan_view<>& plan, matrix_view<P> probs, matrix_view<M> mask) {
  static_assert(!std::is_const_v<P> && !std::is_const_v<M>, "to_dense writes its outputs");
  const index T = plan.num_tokens(), E = plan.num_experts();
  detail::check_matrix(probs, "probs", T, E);
  detail::check_matrix(mask, "mask", T, E);
  const auto off = plan.token_offsets();
  const auto ex = plan.token_expert();
  const auto w = plan.token_weight();
  for (index t = 0; t < T; ++t) {
    for (index e = 0; e < E; ++e) {
      probs(t, e) = P(0);
      mask(t, e) = M(0);
    }
    for (id_type i = off[static_cast<std::size_t>(t)]; i < off[static_cast<std::size_t>(t + 1)]; ++i) {
      probs(t, ex[static_cast<std::size_t>(i)]) = static_cast<P>(w[static_cast<std::size_t>(i)]);
      mask(t, ex[static_cast<std::size_t>(i)]) = M(1);
    }
  }
}

struct block_aligned_layout {
  // Kept assignments grouped by expert, each expert's run padded to a multiple of `block`. An entry is
  // the assignment's index in the plan's token-major CSR (token_expert()); when every token keeps
  // exactly k experts that is t*k + j, vLLM's flattened topk_ids index. Padding holds num_assignments.
  std::vector<id_type> sorted_token_ids;
  std::vector<id_type> expert_ids;  // one per block of `block` entries
  id_type num_tokens_post_pad = 0;
  index block = 1;
};

inline block_aligned_layout to_block_aligned(const plan_view<>& plan, index block) {
  detail::require(block >= 1, "block", "block >= 1", block);
  const index E = plan.num_experts();
  const auto counts = plan.expert_counts();
  const auto offsets = plan.expert_offsets();
  const auto tok_slot = plan.token_slot();
  block_aligned_layout out;
  out.block = block;
  std::vector<id_type> start(static_cast<std::size_t>(E + 1), 0);
  for (index e = 0; e < E; ++e) {
    // Rounded up without forming count + block - 1, which overflows for a huge block.
    const index n = counts[static_cast<std::size_t>(e)];
    const index padded = n == 0 ? 0 : ((n - 1) / block + 1) * block;
    detail::require(padded <= std::numeric_limits<id_type>::max() - start[static_cast<std::size_t>(e)], "block",
                    "a block size whose padded layout fits in 32-bit ids", block);
    start[static_cast<std::size_t>(e + 1)] = static_cast<id_type>(start[static_cast<std::size_t>(e)] + padded);
  }
  out.num_tokens_post_pad = start[static_cast<std::size_t>(E)];
  const auto pad = static_cast<id_type>(plan.num_assignments());
  out.sorted_token_ids.assign(static_cast<std::size_t>(out.num_tokens_post_pad), pad);
  out.expert_ids.resize(static_cast<std::size_t>(out.num_tokens_post_pad / block));
  for (index e = 0; e < E; ++e) {
    for (id_type b = start[static_cast<std::size_t>(e)]; b < start[static_cast<std::size_t>(e + 1)];
         b += static_cast<id_type>(block))
      out.expert_ids[static_cast<std::size_t>(b / block)] = static_cast<id_type>(e);
  }
  // Kept tokens fill the first expert_counts[e] slots of expert e; map each slot to its CSR position.
  std::vector<id_type> csr_of_slot(static_cast<std::size_t>(plan.num_slots()), pad);
  for (index i = 0; i < plan.num_assignments(); ++i)
    csr_of_slot[static_cast<std::size_t>(tok_slot[static_cast<std::size_t>(i)])] = static_cast<id_type>(i);
  for (index e = 0; e < E; ++e)
    for (index j = 0; j < counts[static_cast<std::size_t>(e)]; ++j)
      out.sorted_token_ids[static_cast<std::size_t>(start[static_cast<std::size_t>(e)] + j)] =
          csr_of_slot[static_cast<std::size_t>(offsets[static_cast<std::size_t>(e)] + j)];
  return out;
}

struct rank_layout {
  std::vector<id_type> num_tokens_per_rank;    // R: tokens sent to each rank (once per rank, not per expert)
  std::vector<id_type> num_tokens_per_node;    // R / ranks_per_node (DeepEP's num_tokens_per_rdma_rank)
  std::vector<id_type> num_tokens_per_expert;  // E: kept tokens per expert
  std::vector<std::uint8_t> is_token_in_rank;  // T×R, row-major, 1 when the token goes to that rank
  index num_ranks = 0;
};

inline rank_layout to_rank_layout(const plan_view<>& plan, const dist::expert_placement& placement) {
  const index T = plan.num_tokens(), E = plan.num_experts();
  placement.validate(E);
  const index R = placement.num_ranks;
  rank_layout out;
  out.num_ranks = R;
  out.num_tokens_per_rank.assign(static_cast<std::size_t>(R), 0);
  out.num_tokens_per_node.assign(static_cast<std::size_t>(placement.num_nodes()), 0);
  out.num_tokens_per_expert.assign(plan.expert_counts().begin(), plan.expert_counts().end());
  out.is_token_in_rank.assign(static_cast<std::size_t>(T * R), 0);
  const auto off = plan.token_offsets();
  const auto ex = plan.token_expert();
  std::vector<unsigned char> node_seen(static_cast<std::size_t>(placement.num_nodes()));
  for (index t = 0; t < T; ++t) {
    std::fill(node_seen.begin(), node_seen.end(), 0);
    std::uint8_t* row = out.is_token_in_rank.data() + t * R;
    for (id_type i = off[static_cast<std::size_t>(t)]; i < off[static_cast<std::size_t>(t + 1)]; ++i) {
      const id_type r = placement.rank_of_expert[static_cast<std::size_t>(ex[static_cast<std::size_t>(i)])];
      if (!row[r]) {
        row[r] = 1;
        ++out.num_tokens_per_rank[static_cast<std::size_t>(r)];
      }
      const index node = r / placement.ranks_per_node;
      if (!node_seen[static_cast<std::size_t>(node)]) {
        node_seen[static_cast<std::size_t>(node)] = 1;
        ++out.num_tokens_per_node[static_cast<std::size_t>(node)];
      }
    }
  }
  return out;
}

}  // namespace resonance
