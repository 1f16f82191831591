#pragma once

// Per-row selection kernels, written once for host and device: raw pointers and extents only, no
// allocation, no std:: calls that are not constexpr. Ties always go to the lowest index.

#include <bit>
#include <cstdint>

#include "config.hpp"

namespace resonance::detail {

// Inserts (value, id) into the descending list (vals, ids) of length n <= k. Scanning candidates in
// ascending id order and moving only strictly smaller entries keeps ties in ascending id order.
// V is float for scores, double where a selection runs in double (Sinkhorn).
template <class V>
RESONANCE_INLINE_FUNCTION void topk_insert(V value, id_type id, V* vals, id_type* ids, index& n, index k) {
  if (n == k) {
    if (!(value > vals[k - 1])) return;
    --n;
  }
  index pos = n;
  while (pos > 0 && value > vals[pos - 1]) {
    vals[pos] = vals[pos - 1];
    ids[pos] = ids[pos - 1];
    --pos;
  }
  vals[pos] = value;
  ids[pos] = id;
  ++n;
}

// Top-k of key(i) over i in [begin, end), appended to a list that already holds n entries. Requires
// the ids of the list to be lower than begin (ascending scan), so ties stay lowest-index first.
template <class Key, class V>
RESONANCE_INLINE_FUNCTION void topk_scan(index begin, index end, const Key& key, V* vals, id_type* ids, index& n,
                                         index k) {
  for (index i = begin; i < end; ++i) {
    const V v = static_cast<V>(key(i));
    // Once the list is full most keys lose to its last entry: that test stays in the loop, and only
    // an entry that enters the list pays for topk_insert (which a compiler may keep out of line).
    if (n == k && !(v > vals[k - 1])) continue;
    topk_insert(v, static_cast<id_type>(i), vals, ids, n, k);
  }
}

// Top-k of a whole row (k <= n): vals descending, ids ascending among equal values.
template <class Key, class V>
RESONANCE_INLINE_FUNCTION void topk_row(index n, index k, const Key& key, V* vals, id_type* ids) {
  index filled = 0;
  topk_scan(0, n, key, vals, ids, filled, k);
}

// Sorts (ids, vals) pairs of length n by ascending id; the ids are distinct (a top-k's output). Up to
// 16 pairs, each pair's position is its rank (the number of smaller ids), found without branches, which
// beats an insertion sort's unpredictable moves on random ids.
RESONANCE_INLINE_FUNCTION void sort_by_id(id_type* ids, float* vals, index n) {
  if (n <= 16) {
    // (id, value bits) packed in one word: distinct non-negative ids order the words as they order
    // the ids, and the packing loop is not a plain copy that a compiler would turn into memcpy calls.
    std::uint64_t packed[16];
    for (index i = 0; i < n; ++i)
      packed[i] =
          static_cast<std::uint64_t>(static_cast<std::uint32_t>(ids[i])) << 32 | std::bit_cast<std::uint32_t>(vals[i]);
    for (index i = 0; i < n; ++i) {
      index rank = 0;
      for (index j = 0; j < n; ++j) rank += static_cast<index>(packed[j] < packed[i]);
      ids[rank] = static_cast<id_type>(packed[i] >> 32);
      vals[rank] = std::bit_cast<float>(static_cast<std::uint32_t>(packed[i]));
    }
    return;
  }
  for (index i = 1; i < n; ++i) {
    const id_type id = ids[i];
    const float v = vals[i];
    index j = i;
    while (j > 0 && ids[j - 1] > id) {
      ids[j] = ids[j - 1];
      vals[j] = vals[j - 1];
      --j;
    }
    ids[j] = id;
    vals[j] = v;
  }
}

// How a group of experts is scored in group-limited (device- or node-limited) top-k.
enum class group_score_kind : unsigned char {
  top_m_sum,  // sum of the top m = top_k / group_topk keys of the group (Megatron-Core)
  top2_sum,   // sum of the top 2 keys of the group (DeepSeek-V3, vLLM, TensorRT-LLM)
  max,        // the group's largest key (vLLM without a correction bias)
};

// Scratch a group-limited selection needs: floats and ids, each of this length.
RESONANCE_INLINE_FUNCTION index group_topk_scratch(index num_groups, index top_k, index group_topk) {
  const index m = top_k / (group_topk > 0 ? group_topk : 1);
  return 2 * num_groups + (m > 2 ? m : 2);
}

// Keys a group's score sums: top_k / group_topk (top_m_sum), 2 (top2_sum) or 1 (max).
RESONANCE_INLINE_FUNCTION index group_score_width(group_score_kind kind, index top_k, index group_topk) {
  if (kind == group_score_kind::top_m_sum) return top_k / (group_topk > 0 ? group_topk : 1);
  return kind == group_score_kind::top2_sum ? 2 : 1;
}

// Scratch a group-limited selection over an expert -> group map needs (group_limited_topk_row_mapped):
// floats and ids, each of this length. One list of width keys per group, then the kept groups and a
// flag per group.
RESONANCE_INLINE_FUNCTION index mapped_group_topk_scratch(index num_groups, index top_k, index group_topk,
                                                          group_score_kind kind) {
  return num_groups * group_score_width(kind, top_k, group_topk) + 2 * num_groups;
}

// Group-limited top-k: split the n ids into num_groups contiguous groups, score each group, keep the
// best group_topk groups (ties to the lowest group), then take the top-k of key over their members.
// Preconditions (checked by the host policy): n % num_groups == 0, 1 <= group_topk <= num_groups,
// k <= group_topk * n / num_groups, and m >= 1 for top_m_sum.
template <class Key>
RESONANCE_INLINE_FUNCTION void group_limited_topk_row(index n, index k, index num_groups, index group_topk,
                                                      group_score_kind kind, const Key& key, float* vals, id_type* ids,
                                                      float* fscratch, id_type* iscratch) {
  const index group_size = n / num_groups;
  const index m = kind == group_score_kind::top_m_sum ? k / group_topk : (kind == group_score_kind::top2_sum ? 2 : 1);
  float* group_vals = fscratch;
  id_type* group_ids = iscratch;
  float* tmp_vals = fscratch + 2 * num_groups;
  id_type* tmp_ids = iscratch + 2 * num_groups;
  index ngroups_kept = 0;
  for (index g = 0; g < num_groups; ++g) {
    const index first = g * group_size;
    const index take = m < group_size ? m : group_size;
    index filled = 0;
    topk_scan(first, first + group_size, key, tmp_vals, tmp_ids, filled, take);
    float s = 0.0f;
    for (index j = 0; j < filled; ++j) s += tmp_vals[j];
    topk_insert(s, static_cast<id_type>(g), group_vals, group_ids, ngroups_kept, group_topk);
  }
  // Scan the kept groups in ascending group order so that expert ties still go to the lowest id.
  for (index i = 1; i < ngroups_kept; ++i) {
    const id_type gid = group_ids[i];
    index j = i;
    while (j > 0 && group_ids[j - 1] > gid) {
      group_ids[j] = group_ids[j - 1];
      --j;
    }
    group_ids[j] = gid;
  }
  index filled = 0;
  for (index i = 0; i < ngroups_kept; ++i) {
    const index first = static_cast<index>(group_ids[i]) * group_size;
    topk_scan(first, first + group_size, key, vals, ids, filled, k);
  }
}

// Group-limited top-k with the groups given by a map (group_of[i] in [0, num_groups) for each of the n
// ids: a node of a round-robin placement is not a range of ids). The same selection as
// group_limited_topk_row when the map is contiguous, bit for bit: each group's top keys are found in
// ascending id order and summed in descending order, the groups are ranked with ties to the lowest
// group, and the experts of the kept groups are scanned in ascending id order (ties to the lowest id).
// A group with fewer members than the score's width is scored by the members it has. Two passes over
// the row instead of one pass per group, so that no group's members need to be listed.
// Preconditions (checked by the host policy): every group non-empty, 1 <= group_topk <= num_groups,
// k <= the members of the group_topk smallest groups, and m >= 1 for top_m_sum.
template <class Key>
RESONANCE_INLINE_FUNCTION void group_limited_topk_row_mapped(index n, index k, index num_groups, index group_topk,
                                                             group_score_kind kind, const id_type* group_of,
                                                             const Key& key, float* vals, id_type* ids, float* fscratch,
                                                             id_type* iscratch) {
  const index m = group_score_width(kind, k, group_topk);
  float* list_vals = fscratch;  // num_groups lists of m keys, descending
  id_type* list_ids = iscratch;
  float* group_vals = fscratch + num_groups * m;  // the kept groups' scores
  id_type* filled = iscratch + num_groups * m;    // each list's length; later, whether a group is kept
  id_type* group_ids = filled + num_groups;       // the kept groups
  for (index g = 0; g < num_groups; ++g) filled[g] = 0;
  for (index i = 0; i < n; ++i) {
    const index g = group_of[i];
    float* gv = list_vals + g * m;
    index len = filled[g];
    const float v = key(i);
    if (len == m && !(v > gv[m - 1])) continue;
    topk_insert(v, static_cast<id_type>(i), gv, list_ids + g * m, len, m);
    filled[g] = static_cast<id_type>(len);
  }
  index ngroups_kept = 0;
  for (index g = 0; g < num_groups; ++g) {
    float s = 0.0f;
    for (index j = 0; j < filled[g]; ++j) s += list_vals[g * m + j];
    topk_insert(s, static_cast<id_type>(g), group_vals, group_ids, ngroups_kept, group_topk);
  }
  for (index g = 0; g < num_groups; ++g) filled[g] = 0;
  for (index i = 0; i < ngroups_kept; ++i) filled[group_ids[i]] = 1;
  index nsel = 0;
  for (index i = 0; i < n; ++i) {
    if (filled[group_of[i]] == 0) continue;
    const float v = key(i);
    if (nsel == k && !(v > vals[k - 1])) continue;
    topk_insert(v, static_cast<id_type>(i), vals, ids, nsel, k);
  }
}

}  // namespace resonance::detail
