#pragma once

// Expert placement across expert-parallel ranks: which rank holds each expert, and which node holds
// each rank. The input of to_rank_layout and, later, of the MPI dispatcher.

#include <string>
#include <vector>

#include "../core/config.hpp"
#include "../core/error.hpp"

namespace resonance::dist {

struct expert_placement {
  index num_ranks = 1;
  index ranks_per_node = 1;             // DeepEP groups 8 NVLink ranks per RDMA rank
  std::vector<id_type> rank_of_expert;  // E entries in [0, num_ranks)

  // Experts split into num_ranks contiguous blocks (E % num_ranks == 0), as Megatron and DeepEP do.
  static expert_placement contiguous(index num_experts, index num_ranks, index ranks_per_node = 1) {
    detail::require(num_ranks >= 1, "num_ranks", "num_ranks >= 1", num_ranks);
    detail::require(num_experts >= 1 && num_experts % num_ranks == 0, "num_experts",
                    "a positive multiple of num_ranks (" + std::to_string(num_ranks) + ")", num_experts);
    expert_placement p{num_ranks, ranks_per_node, std::vector<id_type>(static_cast<std::size_t>(num_experts))};
    const index per_rank = num_experts / num_ranks;
    for (index e = 0; e < num_experts; ++e)
      p.rank_of_expert[static_cast<std::size_t>(e)] = static_cast<id_type>(e / per_rank);
    p.validate(num_experts);
    return p;
  }

  index num_nodes() const { return (num_ranks + ranks_per_node - 1) / ranks_per_node; }

  // The node of each expert (rank_of_expert[e] / ranks_per_node), E entries in [0, num_nodes()): the
  // group map of node-limited routing, which a placement's nodes need because a round-robin placement
  // does not put a node's experts in one range of ids. Keep the vector alive while a policy views it:
  //   auto nodes = placement.node_of_expert();
  //   routing::token_choice{.top_k = 8, .num_groups = placement.num_nodes(), .group_topk = 4,
  //                         .expert_group = {nodes.data(), static_cast<index>(nodes.size())}};
  std::vector<id_type> node_of_expert() const {
    detail::require(ranks_per_node >= 1, "placement.ranks_per_node", "ranks_per_node >= 1", ranks_per_node);
    std::vector<id_type> node(rank_of_expert.size());
    for (std::size_t e = 0; e < rank_of_expert.size(); ++e)
      node[e] = static_cast<id_type>(rank_of_expert[e] / ranks_per_node);
    return node;
  }

  void validate(index num_experts) const {
    detail::require(num_ranks >= 1, "placement.num_ranks", "num_ranks >= 1", num_ranks);
    detail::require(ranks_per_node >= 1 && num_ranks % ranks_per_node == 0, "placement.ranks_per_node",
                    "a divisor of num_ranks (" + std::to_string(num_ranks) + ")", ranks_per_node);
    detail::require(static_cast<index>(rank_of_expert.size()) == num_experts, "placement.rank_of_expert",
                    std::to_string(num_experts) + " entries (one per expert)", rank_of_expert.size());
    for (std::size_t e = 0; e < rank_of_expert.size(); ++e)
      detail::require(rank_of_expert[e] >= 0 && rank_of_expert[e] < num_ranks, "placement.rank_of_expert",
                      "ranks in [0, num_ranks)", "rank_of_expert[", e, "] = ", rank_of_expert[e]);
  }

  friend bool operator==(const expert_placement&, const expert_placement&) = default;
};

}  // namespace resonance::dist
