#pragma once

// Plan builder: candidates + capacity limits -> routing_plan, by a stable counting sort
// (histogram, exclusive scan, scatter) in O(nnz + E). Only an expert that has more candidates than
// slots runs a selection, over its own candidates only (std::nth_element with a strict total order),
// so no comparison sort of all assignments ever happens and the result does not depend on the backend.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "../backend/backend.hpp"
#include "../capacity/capacity.hpp"
#include "../core/error.hpp"
#include "../routing/routing.hpp"
#include "plan.hpp"

namespace resonance {
namespace detail {

// Counter-based hash (splitmix64 finaliser) of (seed, token, expert): a random priority that does not
// depend on evaluation order, so drop_policy::random is reproducible on every backend.
RESONANCE_INLINE_FUNCTION std::uint64_t random_priority(std::uint64_t seed, std::uint64_t token, std::uint64_t expert) {
  std::uint64_t z = seed + 0x9E3779B97F4A7C15ull * (token + 1) + 0xD1B54A32D192ED03ull * (expert + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Tokens per block of the plan builder's counting sort (fixed: the blocks, not the threads, define
// the order of work).
inline constexpr index plan_block = 2048;

inline index round_up(index n, index multiple) { return (n + multiple - 1) / multiple * multiple; }

template <execution_backend Backend>
routing_plan build_plan_unchecked(const Backend& be, const candidate_set& c, const capacity_limits& lim) {
  const index T = c.num_tokens;
  const index E = c.num_experts;
  const index nnz = c.size();
  const auto& rank = c.ranking();
  const auto sz = [](index n) { return static_cast<std::size_t>(n); };

  plan_data d;
  d.num_tokens = T;
  d.num_experts = E;
  d.capacity = lim.capacity;

  // 1. Per token block, a histogram of candidates per expert; then one exclusive scan in (expert,
  //    block) order gives every block its write cursor per expert and every expert its bucket start.
  //    Blocks are fixed (plan_block tokens), so the counting sort is the same on every backend.
  const index blocks = T > 0 ? (T + plan_block - 1) / plan_block : 0;
  std::vector<id_type> block_cursor(sz(blocks * E), 0);
  const auto block_tokens = [&](index b) {  // [first, last) tokens of plan block b
    return std::pair<index, index>{b * plan_block, std::min(T, (b + 1) * plan_block)};
  };
  be.parallel_for_blocks(blocks, 1, [&](index b_begin, index b_end) {
    for (index b = b_begin; b < b_end; ++b) {
      id_type* count = block_cursor.data() + b * E;
      const auto [t_begin, t_end] = block_tokens(b);
      for (id_type i = c.offsets[sz(t_begin)]; i < c.offsets[sz(t_end)]; ++i) ++count[sz(c.expert[sz(i)])];
    }
  });
  std::vector<id_type> bucket_size(sz(E), 0);
  std::vector<id_type> bucket_start(sz(E + 1), 0);
  {
    id_type running = 0;
    for (index e = 0; e < E; ++e) {
      bucket_start[sz(e)] = running;
      for (index b = 0; b < blocks; ++b) {
        const id_type n = block_cursor[sz(b * E + e)];
        block_cursor[sz(b * E + e)] = running;
        running += n;
      }
      bucket_size[sz(e)] = running - bucket_start[sz(e)];
    }
    bucket_start[sz(E)] = running;
  }
  d.expert_demand = c.demand.empty() ? bucket_size : c.demand;

  // 2. Stable scatter, block by block: candidates in ascending token order within each expert bucket.
  std::vector<id_type> bucket_cand(sz(nnz));
  std::vector<id_type> bucket_token(sz(nnz));
  be.parallel_for_blocks(blocks, 1, [&](index b_begin, index b_end) {
    for (index b = b_begin; b < b_end; ++b) {
      id_type* cursor = block_cursor.data() + b * E;
      const auto [t_begin, t_end] = block_tokens(b);
      for (index t = t_begin; t < t_end; ++t) {
        for (id_type i = c.offsets[sz(t)]; i < c.offsets[sz(t + 1)]; ++i) {
          const id_type pos = cursor[sz(c.expert[sz(i)])]++;
          bucket_cand[sz(pos)] = i;
          bucket_token[sz(pos)] = static_cast<id_type>(t);
        }
      }
    }
  });

  // 3. Per expert: which candidates are kept.
  std::vector<unsigned char> kept(sz(nnz), 1);
  d.expert_counts.assign(sz(E), 0);
  const index cap = lim.capacity;
  const drop_policy drop = c.forced_drop ? *c.forced_drop : lim.drop;
  be.parallel_for_blocks(E, 1, [&](index e_begin, index e_end) {
    std::vector<id_type> order;
    for (index e = e_begin; e < e_end; ++e) {
      const id_type b = bucket_start[sz(e)];
      const index n = bucket_size[sz(e)];
      if (cap < 0 || n <= cap) {
        d.expert_counts[sz(e)] = static_cast<id_type>(n);
        continue;
      }
      d.expert_counts[sz(e)] = static_cast<id_type>(cap);
      if (drop == drop_policy::position || cap == 0) {  // the earliest `cap` tokens stay
        for (index j = cap; j < n; ++j) kept[sz(bucket_cand[sz(b + j)])] = 0;
        continue;
      }
      for (index j = 0; j < n; ++j) kept[sz(bucket_cand[sz(b + j)])] = 0;
      order.resize(sz(n));
      std::iota(order.begin(), order.end(), b);  // positions in the bucket: ascending token order
      if (drop == drop_policy::score) {
        std::nth_element(order.begin(), order.begin() + cap - 1, order.end(), [&](id_type x, id_type y) {
          const float px = rank[sz(bucket_cand[sz(x)])];
          const float py = rank[sz(bucket_cand[sz(y)])];
          return px > py || (px == py && x < y);
        });
      } else {
        std::nth_element(order.begin(), order.begin() + cap - 1, order.end(), [&](id_type x, id_type y) {
          const auto px =
              random_priority(lim.seed, static_cast<std::uint64_t>(bucket_token[sz(x)]), static_cast<std::uint64_t>(e));
          const auto py =
              random_priority(lim.seed, static_cast<std::uint64_t>(bucket_token[sz(y)]), static_cast<std::uint64_t>(e));
          return px > py || (px == py && x < y);
        });
      }
      for (index j = 0; j < cap; ++j) kept[sz(bucket_cand[sz(order[sz(j)])])] = 1;
    }
  });

  // 4. Slots per expert: kept count, or the capacity when padding; then aligned. Exclusive scan.
  d.expert_offsets.assign(sz(E + 1), 0);
  for (index e = 0; e < E; ++e) {
    index slots = d.expert_counts[sz(e)];
    if (lim.pad_to_capacity && cap >= 0) slots = cap;
    slots = round_up(slots, lim.align);
    d.expert_offsets[sz(e + 1)] = static_cast<id_type>(d.expert_offsets[sz(e)] + slots);
  }
  const index S = d.expert_offsets[sz(E)];

  // 5. Slot arrays, expert by expert, in bucket (ascending token) order.
  d.slot_token.assign(sz(S), -1);
  d.slot_weight.assign(sz(S), 0.0f);
  std::vector<id_type> cand_slot(sz(nnz), -1);
  be.parallel_for_blocks(E, 1, [&](index e_begin, index e_end) {
    for (index e = e_begin; e < e_end; ++e) {
      id_type slot = d.expert_offsets[sz(e)];
      for (id_type j = bucket_start[sz(e)]; j < bucket_start[sz(e + 1)]; ++j) {
        const id_type i = bucket_cand[sz(j)];
        if (!kept[sz(i)]) continue;
        d.slot_token[sz(slot)] = bucket_token[sz(j)];
        d.slot_weight[sz(slot)] = c.weight[sz(i)];
        cand_slot[sz(i)] = slot++;
      }
    }
  });

  // 6. Token-major CSR over kept candidates, in candidate (ascending expert) order: per-token counts
  //    in parallel, one scan, then the fill in parallel.
  d.token_offsets.assign(sz(T + 1), 0);
  be.parallel_for_blocks(T, plan_block, [&](index t_begin, index t_end) {
    for (index t = t_begin; t < t_end; ++t) {
      id_type n = 0;
      for (id_type i = c.offsets[sz(t)]; i < c.offsets[sz(t + 1)]; ++i) n += kept[sz(i)];
      d.token_offsets[sz(t + 1)] = n;
    }
  });
  for (index t = 0; t < T; ++t) d.token_offsets[sz(t + 1)] += d.token_offsets[sz(t)];
  const index kept_total = d.token_offsets[sz(T)];
  d.token_expert.resize(sz(kept_total));
  d.token_weight.resize(sz(kept_total));
  d.token_slot.resize(sz(kept_total));
  be.parallel_for_blocks(T, plan_block, [&](index t_begin, index t_end) {
    for (index t = t_begin; t < t_end; ++t) {
      id_type out = d.token_offsets[sz(t)];
      for (id_type i = c.offsets[sz(t)]; i < c.offsets[sz(t + 1)]; ++i) {
        if (!kept[sz(i)]) continue;
        d.token_expert[sz(out)] = c.expert[sz(i)];
        d.token_weight[sz(out)] = c.weight[sz(i)];
        d.token_slot[sz(out)] = cand_slot[sz(i)];
        ++out;
      }
    }
  });
  return routing_plan(std::move(d));
}

inline void check_limits(const capacity_limits& lim) {
  require(lim.capacity >= -1, "capacity", "-1 (dropless) or a capacity >= 0", lim.capacity);
  require(lim.align >= 1, "align", "align >= 1", lim.align);
  require(lim.drop == drop_policy::score || lim.drop == drop_policy::position || lim.drop == drop_policy::random,
          "drop", "one of score, position, random", static_cast<int>(lim.drop));
}

// Total slot count a plan will need, checked to fit 32-bit ids before anything is allocated.
inline void check_slot_budget(index num_experts, index nnz, const capacity_limits& lim) {
  const double per_expert_pad = lim.pad_to_capacity && lim.capacity >= 0 ? static_cast<double>(lim.capacity) : 0.0;
  const double worst =
      static_cast<double>(nnz) + static_cast<double>(num_experts) * (per_expert_pad + static_cast<double>(lim.align));
  require(worst < static_cast<double>(std::numeric_limits<id_type>::max()), "capacity",
          "a plan whose slot count fits in 32-bit ids", worst, " slots");
}

}  // namespace detail

// Builds a plan from caller-supplied candidates (routing replay, precomputed indices, a custom
// direction). Validates the candidate set fully before building.
template <execution_backend Backend>
routing_plan build_plan(const Backend& be, const candidate_set& c, const capacity_limits& lim) {
  using detail::require;
  const auto sz = [](index n) { return static_cast<std::size_t>(n); };
  require(c.num_tokens >= 0, "candidates.num_tokens", "num_tokens >= 0", c.num_tokens);
  require(c.num_experts >= 1, "candidates.num_experts", "at least 1 expert", c.num_experts);
  require(c.offsets.size() == sz(c.num_tokens + 1), "candidates.offsets", "num_tokens + 1 entries", c.offsets.size());
  require(c.offsets.front() == 0, "candidates.offsets", "offsets[0] == 0", c.offsets.front());
  require(c.weight.size() == c.expert.size(), "candidates.weight", "one weight per candidate", c.weight.size());
  require(c.priority.empty() || c.priority.size() == c.expert.size(), "candidates.priority",
          "empty or one priority per candidate", c.priority.size());
  require(c.demand.empty() || c.demand.size() == sz(c.num_experts), "candidates.demand",
          "empty or one demand per expert", c.demand.size());
  require(static_cast<index>(c.offsets.back()) == c.size(), "candidates.offsets",
          "offsets[num_tokens] == number of candidates", c.offsets.back());
  for (index t = 0; t < c.num_tokens; ++t) {
    const id_type b = c.offsets[sz(t)], e = c.offsets[sz(t + 1)];
    require(b <= e && e <= c.offsets.back(), "candidates.offsets", "non-decreasing offsets", "offsets[", t, "] = ", b,
            ", offsets[", t + 1, "] = ", e, ", offsets[num_tokens] = ", c.offsets.back());
    for (id_type i = b; i < e; ++i) {
      const id_type x = c.expert[sz(i)];
      require(x >= 0 && x < c.num_experts, "candidates.expert", "ids in [0, num_experts)", x);
      require(i == b || c.expert[sz(i - 1)] < x, "candidates.expert", "strictly ascending expert ids per token",
              "token ", t);
      require(std::isfinite(c.weight[sz(i)]), "candidates.weight", "finite weights", c.weight[sz(i)]);
      require(c.priority.empty() || std::isfinite(c.priority[sz(i)]), "candidates.priority", "finite priorities",
              c.priority.empty() ? 0.0f : c.priority[sz(i)]);
    }
  }
  detail::check_limits(lim);
  detail::check_slot_budget(c.num_experts, c.size(), lim);
  return detail::build_plan_unchecked(be, c, lim);
}

}  // namespace resonance
