#pragma once

// Plan builder: candidates + capacity limits -> plan, by a stable counting sort in O(nnz + E) and,
// only for an expert that has more candidates than slots, a selection of its top C by a unique 64-bit
// key. Both have unique results, so the plan is the same on every backend; the builder is written
// once on the execution primitives (backend/execution.hpp).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "../backend/backend.hpp"
#include "../capacity/capacity.hpp"
#include "../core/error.hpp"
#include "../core/select.hpp"
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

RESONANCE_INLINE_FUNCTION index round_up(index n, index multiple) { return (n + multiple - 1) / multiple * multiple; }

// The capacity cut's selection key of one candidate: higher is kept first, and within one expert no two
// candidates share a key, so "the top C keys" is one set on every backend. score: the priority's
// order-preserving bits (ordered_bits: -0 read as +0, so that a tie still goes to the lower token), then
// the inverted token id; random: the 64-bit hash alone, which is already unique within an expert (for a
// fixed seed and expert the hash's input is an odd multiple of the token plus a constant, a bijection
// of the token, and the splitmix64 finaliser is a bijection).
RESONANCE_INLINE_FUNCTION std::uint64_t drop_key(drop_policy drop, std::uint64_t seed, float priority, id_type token,
                                                 index expert) {
  if (drop == drop_policy::random)
    return random_priority(seed, static_cast<std::uint64_t>(token), static_cast<std::uint64_t>(expert));
  return static_cast<std::uint64_t>(ordered_bits(priority)) << 32 | static_cast<std::uint32_t>(~token);
}

// The selection key of token t in a column of scores (an expert's, for expert choice): the score key
// of drop_key, the score's order-preserving bits then the inverted token id. Keys are unique
// within a column and order it by (score descending, token ascending), -0 equal to +0: ties go to the
// lower token id, and the top C keys are one set on every backend.
RESONANCE_INLINE_FUNCTION std::uint64_t column_key(float score, index t) {
  return drop_key(drop_policy::score, 0, score, static_cast<id_type>(t), 0);
}

// The token of a key (its low 32 bits hold ~token).
RESONANCE_INLINE_FUNCTION index column_key_token(std::uint64_t key) {
  return static_cast<index>(static_cast<id_type>(~static_cast<std::uint32_t>(key)));
}

// Tokens per tile of the transpose of S into expert-major keys.
inline constexpr index column_key_tile = 32;

// The keys of the T×E scores s (rows `stride` apart), expert-major: expert e's T keys start at
// keys[e * segment]. The transpose runs in tiles of column_key_tile tokens, so that a tile's
// rows stay in cache while each expert's keys are written contiguously (one token per call would store
// its E keys T entries apart: into one cache set when T is a power of two). 32 tiles (1024 tokens) per task.
template <execution_backend Backend>
void column_keys(const Backend& be, const float* s, index T, index E, index stride, index segment,
                 std::uint64_t* keys) {
  constexpr index tile = column_key_tile;
  for_each(
      be, (T + tile - 1) / tile,
      RESONANCE_LAMBDA(index b) {
        const index first = b * tile, last = first + tile < T ? first + tile : T;
        for (index e = 0; e < E; ++e)
          for (index t = first; t < last; ++t) keys[e * segment + t] = column_key(s[t * stride + e], t);
      },
      index{1024} / tile);
}

// For each of the E columns of the T×E matrix s (rows `stride` apart), the token holding its C-th
// largest key (1 <= C <= T), written to kth_token on the host. One segment of T + 1 keys per column,
// expert-major: the T keys, then a sentinel 0 below all of them (a key's low half ~t is never 0), so
// that every segment holds more than C keys and C = T (the column's smallest) needs no special case.
template <execution_backend Backend>
void column_kth_token(const Backend& be, const float* s, index T, index E, index stride, index C, index* kth_token) {
  const index n = T + 1;
  workspace_layout layout;
  const index o_keys = layout.reserve<std::uint64_t>(E * n);
  const index o_seg = layout.reserve<id_type>(E + 1);
  const index o_kth = layout.reserve<std::uint64_t>(E);
  const index o_select = layout.reserve<unsigned char>(segmented_select_workspace(be, E * n, E));
  auto work = allocate<unsigned char>(be, layout.bytes());
  void* const base = work.data();
  std::uint64_t* const keys = at_offset<std::uint64_t>(base, o_keys);
  id_type* const seg = at_offset<id_type>(base, o_seg);
  std::uint64_t* const kth = at_offset<std::uint64_t>(base, o_kth);
  for_each(
      be, E + 1, RESONANCE_LAMBDA(index e) { seg[e] = static_cast<id_type>(e * n); });
  column_keys(be, s, T, E, stride, n, keys);
  for_each(
      be, E, RESONANCE_LAMBDA(index e) { keys[e * n + T] = 0; });
  segmented_select(be, keys, seg, E, C, kth, at_offset<void>(base, o_select));
  std::vector<std::uint64_t> host(static_cast<std::size_t>(E));
  copy_to_host(be, host.data(), kth, E);
  fence(be);
  for (index e = 0; e < E; ++e) kth_token[e] = column_key_token(host[static_cast<std::size_t>(e)]);
}

// The builder's temporaries for nnz candidates and E experts, in one allocation: the candidates' tokens,
// the bucket starts and permutation, each candidate's slot, the sizes and status read back at the end,
// and (by_key) the selection keys of the capacity cut.
struct build_workspace {
  index token, start, perm, slot, sizes, keys, kth, bucket, select, bytes;

  template <execution_backend Backend>
  build_workspace(const Backend& be, index nnz, index E, bool by_key) {
    workspace_layout l;
    token = l.reserve<id_type>(nnz);
    start = l.reserve<id_type>(E + 1);
    perm = l.reserve<id_type>(nnz);
    slot = l.reserve<id_type>(nnz);
    sizes = l.reserve<index>(3);
    keys = l.reserve<std::uint64_t>(by_key ? nnz : 0);
    kth = l.reserve<std::uint64_t>(by_key ? E : 0);
    bucket = l.reserve<unsigned char>(stable_bucket_workspace(be, nnz, E));
    select = l.reserve<unsigned char>(by_key ? segmented_select_workspace(be, nnz, E) : 0);
    bytes = l.bytes();
  }
};

// The plan builder, on the execution primitives only:
//   1 stable_bucket by expert: each expert's candidates in ascending token order (the counting sort);
//   2 per expert: kept count, slot count (capacity, padding, alignment); exclusive_scan -> offsets;
//   3 drop keys of the overfull experts, segmented_select -> each one's C-th largest key;
//   4 per expert, the stable compaction of its kept candidates into its slots, then padding;
//   5 token CSR: kept per token, exclusive_scan, fill.
// enqueue_build runs them into d, readied by size_plan() (laid out by
// d.layout()), and ends with one copy of the plan's two sizes and the route's status (`status`, in the
// backend's memory, when a device route passes one; else no_index) into `readback`: three indices in
// memory the host reads after fence(be). It waits for nothing, so a device route can be enqueued
// whole (and captured in a CUDA graph). `work`, when given, holds build_workspace(be, nnz, E,
// lim.capacity > 0).bytes bytes (a route carves it from its own allocation); else the builder allocates
// it and waits for the build before it frees it.

// Readies d for a plan of candidates c under lim: its shape, the room of the worst case (slots by the
// capacity, padding and alignment; one assignment per candidate), no sizes yet, and storage for that
// room, allocated only when what d holds is smaller (a route into an existing plan reuses it).
template <execution_backend Backend, class Space>
void size_plan(const Backend& be, plan_data<memory_space_t<Backend>>& d, const candidate_view<Space>& c,
               const capacity_limits& lim) {
  const bool pad = lim.pad_to_capacity && lim.capacity >= 0;
  const index E = c.num_experts;
  d.num_tokens = c.num_tokens;
  d.num_experts = E;
  d.capacity = lim.capacity;
  d.slot_room = (pad ? E * lim.capacity : c.size) + E * (lim.align - 1);
  d.assignment_room = c.size;
  d.num_slots = d.num_assignments = 0;
  if (static_cast<index>(d.storage.size()) < d.layout().bytes)
    d.storage = allocate<unsigned char>(be, d.layout().bytes);
}

template <execution_backend Backend, class Space>
void enqueue_build(const Backend& be, const candidate_view<Space>& c, const capacity_limits& lim,
                   plan_data<memory_space_t<Backend>>& d, const index* status, index* readback, void* work) {
  using space = memory_space_t<Backend>;
  static_assert(accessible_from_v<Space, space>, "the candidates must be in memory the backend can read");
  const index T = c.num_tokens, E = c.num_experts, nnz = c.size;
  const index cap = lim.capacity;
  const bool pad = lim.pad_to_capacity && cap >= 0;
  const index align = lim.align;
  const drop_policy drop = c.has_forced_drop ? c.forced_drop : lim.drop;
  const bool by_key = cap > 0 && drop != drop_policy::position;
  const std::uint64_t seed = lim.seed;
  const plan_layout pl = d.layout();

  // A caller's workspace is laid out for keys whenever the capacity is positive, so that it can be sized
  // before the direction has said which drop policy it forces.
  const build_workspace ws(be, nnz, E, work != nullptr ? cap > 0 : by_key);
  buffer_t<space, unsigned char> own;
  if (work == nullptr) {
    own = allocate<unsigned char>(be, ws.bytes);
    work = own.data();
  }
  void* const base = work;
  id_type* const cand_token = at_offset<id_type>(base, ws.token);
  id_type* const start = at_offset<id_type>(base, ws.start);
  id_type* const perm = at_offset<id_type>(base, ws.perm);
  id_type* const cand_slot = at_offset<id_type>(base, ws.slot);
  index* const sizes = at_offset<index>(base, ws.sizes);
  std::uint64_t* const keys = at_offset<std::uint64_t>(base, ws.keys);
  std::uint64_t* const kth = at_offset<std::uint64_t>(base, ws.kth);

  const id_type* const offsets = c.offsets;
  const id_type* const expert = c.expert;
  const float* const weight = c.weight;
  const float* const priority = c.priority != nullptr ? c.priority : c.weight;
  void* const plan_base = d.storage.data();
  id_type* const expert_offsets = at_offset<id_type>(plan_base, pl.expert_offsets);
  id_type* const counts = at_offset<id_type>(plan_base, pl.expert_counts);
  id_type* const demand = at_offset<id_type>(plan_base, pl.expert_demand);
  id_type* const slot_token = at_offset<id_type>(plan_base, pl.slot_token);
  float* const slot_weight = at_offset<float>(plan_base, pl.slot_weight);
  id_type* const token_offsets = at_offset<id_type>(plan_base, pl.token_offsets);
  id_type* const token_expert = at_offset<id_type>(plan_base, pl.token_expert);
  float* const token_weight = at_offset<float>(plan_base, pl.token_weight);
  id_type* const token_slot = at_offset<id_type>(plan_base, pl.token_slot);

  // Experts per task of the per-expert passes: about 4096 candidates each, so that a small route runs
  // them inline instead of paying a task per expert (a tuning hint: the outputs do not depend on it).
  const index expert_grain = std::max<index>(1, 4096 * E / (nnz + 1));

  // 1. The counting sort by expert.
  for_each(
      be, T, RESONANCE_LAMBDA(index t) {
        for (id_type i = offsets[t]; i < offsets[t + 1]; ++i) cand_token[i] = static_cast<id_type>(t);
      });
  stable_bucket(be, expert, nnz, E, start, perm, at_offset<void>(base, ws.bucket));

  // 2. Kept and slot counts per expert, then the slot offsets.
  if (c.demand != nullptr) copy(be, demand, c.demand, E);
  const bool counted_demand = c.demand == nullptr;
  for_each(
      be, E, RESONANCE_LAMBDA(index e) {
        const index n = start[e + 1] - start[e];
        const index kept = cap < 0 || n <= cap ? n : cap;
        counts[e] = static_cast<id_type>(kept);
        if (counted_demand) demand[e] = static_cast<id_type>(n);
        expert_offsets[e] = static_cast<id_type>(round_up(pad ? cap : kept, align));
      });
  exclusive_scan(be, expert_offsets, expert_offsets, E);

  // 3. The selection keys of every overfull expert's candidates, and each one's C-th largest key.
  if (by_key) {
    for_each(
        be, E,
        RESONANCE_LAMBDA(index e) {
          if (start[e + 1] - start[e] <= cap) return;
          for (id_type j = start[e]; j < start[e + 1]; ++j) {
            const id_type i = perm[j];
            keys[j] = drop_key(drop, seed, priority[i], cand_token[i], e);
          }
        },
        expert_grain);
    segmented_select(be, keys, start, E, cap, kth, at_offset<void>(base, ws.select));
  }

  // 4. Each expert's kept candidates in bucket (ascending token) order, then its padding slots. A
  //    candidate of an overfull expert is kept when its key is among the top C (keys are recomputed:
  //    segmented_select may have permuted them).
  for_each(
      be, E,
      RESONANCE_LAMBDA(index e) {
        const index b = start[e], n = start[e + 1] - b;
        const bool full = cap >= 0 && n > cap;
        id_type slot = expert_offsets[e];
        for (index j = 0; j < n; ++j) {
          const id_type i = perm[b + j];
          bool keep = true;
          if (full) keep = by_key ? drop_key(drop, seed, priority[i], cand_token[i], e) >= kth[e] : j < cap;
          if (!keep) {
            cand_slot[i] = -1;
            continue;
          }
          slot_token[slot] = cand_token[i];
          slot_weight[slot] = weight[i];
          cand_slot[i] = slot++;
        }
        for (; slot < expert_offsets[e + 1]; ++slot) {
          slot_token[slot] = -1;
          slot_weight[slot] = 0.0f;
        }
      },
      expert_grain);

  // 5. The token-major CSR over kept candidates, in candidate (ascending expert) order.
  for_each(
      be, T, RESONANCE_LAMBDA(index t) {
        id_type n = 0;
        for (id_type i = offsets[t]; i < offsets[t + 1]; ++i) n += cand_slot[i] >= 0 ? 1 : 0;
        token_offsets[t] = n;
      });
  exclusive_scan(be, token_offsets, token_offsets, T);
  for_each(
      be, T, RESONANCE_LAMBDA(index t) {
        id_type out = token_offsets[t];
        for (id_type i = offsets[t]; i < offsets[t + 1]; ++i) {
          if (cand_slot[i] < 0) continue;
          token_expert[out] = expert[i];
          token_weight[out] = weight[i];
          token_slot[out] = cand_slot[i];
          ++out;
        }
      });

  // The plan's two sizes and the status: the one device-to-host copy of a route.
  for_each(
      be, 1, RESONANCE_LAMBDA(index) {
        sizes[0] = expert_offsets[E];
        sizes[1] = token_offsets[T];
        sizes[2] = status != nullptr ? *status : no_index;
      });
  copy_to_host(be, readback, sizes, 3);
  if (own.data() != nullptr) fence(be);
}

// The plan of candidates c built into d (its storage reused when large enough), then one wait for the
// sizes. `work`: as enqueue_build's.
template <execution_backend Backend, class Space>
void build_plan_into(const Backend& be, const candidate_view<Space>& c, const capacity_limits& lim,
                     plan_data<memory_space_t<Backend>>& d, void* work) {
  size_plan(be, d, c, lim);
  index host_sizes[3] = {0, 0, no_index};
  enqueue_build(be, c, lim, d, nullptr, host_sizes, work);
  fence(be);
  d.num_slots = host_sizes[0];
  d.num_assignments = host_sizes[1];
}

// The plan of candidates c: its storage allocated by size_plan(), the build enqueued,
// then one wait for the sizes (and the status, into *host_status, when `status` is given).
template <execution_backend Backend, class Space>
basic_routing_plan<memory_space_t<Backend>> build_plan_unchecked(const Backend& be, const candidate_view<Space>& c,
                                                                 const capacity_limits& lim,
                                                                 const index* status = nullptr,
                                                                 index* host_status = nullptr, void* work = nullptr) {
  using space = memory_space_t<Backend>;
  plan_data<space> d;
  size_plan(be, d, c, lim);
  index host_sizes[3] = {0, 0, no_index};
  enqueue_build(be, c, lim, d, status, host_sizes, work);
  fence(be);
  d.num_slots = host_sizes[0];
  d.num_assignments = host_sizes[1];
  if (host_status != nullptr) *host_status = host_sizes[2];
  return basic_routing_plan<space>(std::move(d));
}

template <execution_backend Backend, class Space>
basic_routing_plan<memory_space_t<Backend>> build_plan_unchecked(const Backend& be, const basic_candidate_set<Space>& c,
                                                                 const capacity_limits& lim) {
  return build_plan_unchecked(be, view_of(c), lim);
}

inline bool known_drop_policy(drop_policy d) {
  return d == drop_policy::score || d == drop_policy::position || d == drop_policy::random;
}

inline void check_limits(const capacity_limits& lim) {
  require(lim.capacity >= -1, "capacity", "-1 (dropless) or a capacity >= 0", lim.capacity);
  require(lim.align >= 1, "align", "align >= 1", lim.align);
  require(known_drop_policy(lim.drop), "drop", "one of score, position, random", static_cast<int>(lim.drop));
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
basic_routing_plan<memory_space_t<Backend>> build_plan(const Backend& be, const candidate_set& c,
                                                       const capacity_limits& lim) {
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
  require(!c.forced_drop || detail::known_drop_policy(*c.forced_drop), "candidates.forced_drop",
          "empty or one of score, position, random", static_cast<int>(c.forced_drop.value_or(drop_policy::score)));
  detail::check_slot_budget(c.num_experts, c.size(), lim);
  return detail::build_plan_unchecked(be, c, lim);
}

}  // namespace resonance
