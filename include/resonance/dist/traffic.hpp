#pragma once

// What a routing costs in All-to-All traffic, computed from plans alone (no MPI): the bytes each rank
// would send to each other rank under the four accountings of expert parallelism, split by where
// they travel (to itself, inside a node, across nodes), and the load each rank receives.
//
//   token rows    one row per (token, destination rank): dist/exchange.hpp's dropless dispatch (DeepEP)
//   expert rows   one row per (token, expert): Megatron's flat alltoall dispatch, and the combine
//                 of the exchange (one returned row per assignment)
//   node rows     one row per (token, destination node): the inter-node stage of a two-level
//                 dispatch (DeepEP normal, Tutel 2DH); inside the node it forwards per rank
//   padded rows   C rows per expert, padding included: drop-and-pad (Tutel, DeepSpeed); only for a
//                 plan with a capacity
//
// add_traffic(report, plan, placement, rank) adds one rank's plan to a report (an offline run adds its
// shards); traffic() is one rank's alone, and reports of different ranks add up (operator+=), so an
// MPI run allreduces its matrices.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "../core/error.hpp"
#include "../plan/plan.hpp"
#include "placement.hpp"

namespace resonance::dist {

// Bytes (or rows) by where they travel.
struct traffic_split {
  std::int64_t self = 0;        // source rank = destination rank: no network
  std::int64_t intra_node = 0;  // another rank of the same node
  std::int64_t inter_node = 0;  // another node

  std::int64_t total() const { return self + intra_node + inter_node; }
  std::int64_t network() const { return intra_node + inter_node; }
  friend bool operator==(const traffic_split&, const traffic_split&) = default;
};

struct traffic_report {
  index num_ranks = 0;
  index ranks_per_node = 1;
  index row_bytes = 0;  // bytes of one token row (d × element size)
  // Rows, R×R row-major [source][destination]; node_rows is R×N [source][destination node].
  std::vector<std::int64_t> token_rows;
  std::vector<std::int64_t> expert_rows;
  std::vector<std::int64_t> node_rows;
  std::vector<std::int64_t> padded_rows;   // all zero for plans without a capacity
  std::vector<std::int64_t> padding_rows;  // of padded_rows, the padding slots
  std::int64_t tokens = 0;                 // tokens routed, all sources
  std::int64_t dropped = 0;                // (token, expert) choices dropped by the capacity
  bool padded = false;                     // every plan counted had a capacity

  index num_nodes() const { return ranks_per_node > 0 ? num_ranks / ranks_per_node : 0; }
  index node_of(index rank) const { return rank / ranks_per_node; }

  // Rows of an R×R matrix by where they travel.
  traffic_split split(const std::vector<std::int64_t>& m) const {
    traffic_split s;
    for (index a = 0; a < num_ranks; ++a)
      for (index b = 0; b < num_ranks; ++b) {
        const std::int64_t v = m[static_cast<std::size_t>(a * num_ranks + b)];
        (a == b ? s.self : node_of(a) == node_of(b) ? s.intra_node : s.inter_node) += v;
      }
    return s;
  }
  // node_rows crossing nodes (the two-level inter-node stage); its own node's rows are forwarded
  // inside the node, which the intra-node split of token_rows already counts.
  std::int64_t inter_node_node_rows() const {
    std::int64_t n = 0;
    const index N = num_nodes();
    for (index a = 0; a < num_ranks; ++a)
      for (index b = 0; b < N; ++b)
        if (b != node_of(a)) n += node_rows[static_cast<std::size_t>(a * N + b)];
    return n;
  }
  // Rows each rank receives of matrix m (its column sums): token rows per rank, or expert load.
  std::vector<std::int64_t> received(const std::vector<std::int64_t>& m) const {
    std::vector<std::int64_t> out(static_cast<std::size_t>(num_ranks), 0);
    for (index a = 0; a < num_ranks; ++a)
      for (index b = 0; b < num_ranks; ++b)
        out[static_cast<std::size_t>(b)] += m[static_cast<std::size_t>(a * num_ranks + b)];
    return out;
  }

  traffic_report& operator+=(const traffic_report& o) {
    resonance::detail::require(
        o.num_ranks == num_ranks && o.ranks_per_node == ranks_per_node && o.row_bytes == row_bytes, "traffic_report",
        "reports of the same placement and row size", o.num_ranks, " ranks");
    const auto add = [](std::vector<std::int64_t>& a, const std::vector<std::int64_t>& b) {
      for (std::size_t i = 0; i < a.size(); ++i) a[i] += b[i];
    };
    add(token_rows, o.token_rows);
    add(expert_rows, o.expert_rows);
    add(node_rows, o.node_rows);
    add(padded_rows, o.padded_rows);
    add(padding_rows, o.padding_rows);
    tokens += o.tokens;
    dropped += o.dropped;
    padded = padded && o.padded;
    return *this;
  }
};

// An empty report (every count zero) for a placement, to add rank reports to.
inline traffic_report empty_traffic(const expert_placement& placement, index row_bytes) {
  resonance::detail::require(row_bytes >= 0, "row_bytes", "a row size >= 0", row_bytes);
  traffic_report r;
  r.num_ranks = placement.num_ranks;
  r.ranks_per_node = placement.ranks_per_node;
  r.row_bytes = row_bytes;
  const auto R = static_cast<std::size_t>(placement.num_ranks);
  const auto N = static_cast<std::size_t>(placement.num_nodes());
  r.token_rows.assign(R * R, 0);
  r.expert_rows.assign(R * R, 0);
  r.node_rows.assign(R * N, 0);
  r.padded_rows.assign(R * R, 0);
  r.padding_rows.assign(R * R, 0);
  r.padded = true;
  return r;
}

// Adds the traffic of one rank's plan to `report` (made by empty_traffic for the same placement):
// rank `rank` routed `plan` (its own tokens, global experts). Only that rank's rows of the matrices
// change, so summing R ranks costs the plans, not R reports of R×R entries.
inline void add_traffic(traffic_report& report, const plan_view<>& plan, const expert_placement& placement,
                        index rank) {
  const index E = plan.num_experts(), R = placement.num_ranks, N = placement.num_nodes();
  placement.validate(E);
  resonance::detail::require(rank >= 0 && rank < R, "rank", "a rank in [0, num_ranks = " + std::to_string(R) + ")",
                             rank);
  resonance::detail::require(report.num_ranks == R && report.ranks_per_node == placement.ranks_per_node &&
                                 report.token_rows.size() == static_cast<std::size_t>(R * R),
                             "traffic_report", "a report of the same placement (empty_traffic)", report.num_ranks,
                             " ranks");
  traffic_report& r = report;
  const auto toff = plan.token_offsets();
  const auto tex = plan.token_expert();
  const std::size_t base = static_cast<std::size_t>(rank * R), node_base = static_cast<std::size_t>(rank * N);
  // Distinct ranks and nodes per token, with a stamp per rank/node instead of clearing flags.
  std::vector<index> rank_seen(static_cast<std::size_t>(R), -1), node_seen(static_cast<std::size_t>(N), -1);
  for (index t = 0; t < plan.num_tokens(); ++t)
    for (id_type i = toff[static_cast<std::size_t>(t)]; i < toff[static_cast<std::size_t>(t + 1)]; ++i) {
      const index dst = placement.rank_of_expert[static_cast<std::size_t>(tex[static_cast<std::size_t>(i)])];
      const index node = dst / placement.ranks_per_node;
      ++r.expert_rows[base + static_cast<std::size_t>(dst)];
      if (rank_seen[static_cast<std::size_t>(dst)] != t) {
        rank_seen[static_cast<std::size_t>(dst)] = t;
        ++r.token_rows[base + static_cast<std::size_t>(dst)];
      }
      if (node_seen[static_cast<std::size_t>(node)] != t) {
        node_seen[static_cast<std::size_t>(node)] = t;
        ++r.node_rows[node_base + static_cast<std::size_t>(node)];
      }
    }
  r.tokens += plan.num_tokens();
  std::int64_t demand = 0;
  for (const id_type v : plan.expert_demand()) demand += v;
  r.dropped += demand - plan.num_assignments();
  r.padded = r.padded && plan.capacity() >= 0;
  if (plan.capacity() >= 0) {
    const auto counts = plan.expert_counts();
    for (index e = 0; e < E; ++e) {
      const auto dst = static_cast<std::size_t>(placement.rank_of_expert[static_cast<std::size_t>(e)]);
      r.padded_rows[base + dst] += plan.capacity();
      r.padding_rows[base + dst] += plan.capacity() - counts[static_cast<std::size_t>(e)];
    }
  }
}

// The traffic of one rank's plan alone.
inline traffic_report traffic(const plan_view<>& plan, const expert_placement& placement, index rank, index row_bytes) {
  traffic_report r = empty_traffic(placement, row_bytes);
  add_traffic(r, plan, placement, rank);
  return r;
}

// max / mean of a load vector (1 when all are zero), and its coefficient of variation.
inline double max_over_mean(const std::vector<std::int64_t>& load) {
  double sum = 0.0, mx = 0.0;
  for (const std::int64_t v : load) {
    sum += static_cast<double>(v);
    mx = std::max(mx, static_cast<double>(v));
  }
  return sum > 0.0 ? mx * static_cast<double>(load.size()) / sum : 1.0;
}
inline double coefficient_of_variation(const std::vector<std::int64_t>& load) {
  if (load.empty()) return 0.0;
  double mean = 0.0;
  for (const std::int64_t v : load) mean += static_cast<double>(v);
  mean /= static_cast<double>(load.size());
  if (mean == 0.0) return 0.0;
  double var = 0.0;
  for (const std::int64_t v : load) var += (static_cast<double>(v) - mean) * (static_cast<double>(v) - mean);
  return std::sqrt(var / static_cast<double>(load.size())) / mean;
}

}  // namespace resonance::dist
