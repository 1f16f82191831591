#pragma once

// Token choice: every token picks its top-k experts. With default options this reproduces
// Megatron-Core's topk_routing_with_score_function:
//   softmax (default):   top-k on the logits, then softmax over the k selected logits;
//   softmax, pre:        softmax over all E, then top-k of the probabilities (no renormalisation);
//   sigmoid/sqrt_softplus: score all E, top-k, renormalise over the k when k > 1 (s / (sum + eps));
//   expert_bias:         added to the selection key only, never to the weights;
//   groups:              group-limited top-k, the group score pluggable; the groups contiguous blocks of
//                        experts, or any expert -> group map (node-limited routing on a placement's
//                        nodes, as DeepSeek-V3: expert_group = placement.node_of_expert());
//   scaling_factor:      multiplies the final weights.
// Megatron rejects an expert bias with softmax; we accept it with the same selection-only meaning: the
// bias is added to the quantity that is ranked (the logits, or the probabilities when pre_softmax).

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "../backend/detail/warp_topk.hpp"
#include "../backend/rows.hpp"
#include "../backend/serial.hpp"
#include "../capacity/capacity.hpp"
#include "../core/error.hpp"
#include "../core/topk.hpp"
#include "../core/view.hpp"
#include "../score/score.hpp"
#include "routing.hpp"

namespace resonance::routing {

using group_score = detail::group_score_kind;

// When the k selected weights are divided by their sum.
enum class renormalize : unsigned char {
  automatic,  // as Megatron: sigmoid and sqrt_softplus with k > 1; never for pre-softmax or identity
  always,     // every score function (softmax after top-k is normalised by construction)
  never,      // never (sigmoid weights stay raw)
};

struct token_choice {
  index top_k = 1;
  resonance::score score = resonance::score::softmax;
  bool pre_softmax = false;  // softmax over all experts before top-k
  float temperature = 1.0f;  // logits are divided by it before scoring
  renormalize renorm = renormalize::automatic;
  float renorm_epsilon = 1e-20f;              // Megatron's; a larger one resists aux-loss "hacking"
  float scaling_factor = 1.0f;                // moe_router_topk_scaling_factor / routed_scaling_factor
  vector_view<const float> expert_bias = {};  // E entries, selection only; empty for none
  index num_groups = 0;                       // 0 or 1: no group limit
  index group_topk = 0;                       // groups kept per token when num_groups > 1
  group_score group_scoring = group_score::top_m_sum;
  // E entries in [0, num_groups): the group (e.g. the node) of each expert, for groups that are not
  // contiguous blocks of E / num_groups experts (a round-robin placement's nodes); then num_experts
  // need not be a multiple of num_groups. Empty: contiguous groups. Host data, validated on the host;
  // a device route reads a copy (router.hpp). Last, so that positional initialisers stay valid.
  vector_view<const id_type> expert_group = {};

  RESONANCE_HOST_DEVICE constexpr bool grouped() const { return num_groups > 1; }

  void validate(index num_experts) const {
    using detail::require;
    detail::check_top_k(top_k, num_experts);
    detail::check_score(score);
    require(!pre_softmax || score == resonance::score::softmax, "pre_softmax", "score == softmax");
    detail::check_temperature(temperature);
    require(std::isfinite(scaling_factor) && scaling_factor > 0.0f, "scaling_factor", "a finite value > 0",
            scaling_factor);
    require(std::isfinite(renorm_epsilon) && renorm_epsilon >= 0.0f, "renorm_epsilon", "a finite value >= 0",
            renorm_epsilon);
    if (!expert_bias.empty()) {
      require(expert_bias.size == num_experts, "expert_bias", std::to_string(num_experts) + " entries (one per expert)",
              expert_bias.size);
      require(expert_bias.data != nullptr, "expert_bias", "non-null data");
      for (index e = 0; e < num_experts; ++e)
        require(std::isfinite(expert_bias[e]), "expert_bias", "finite values", "expert_bias[", e,
                "] = ", expert_bias[e]);
    }
    require(num_groups >= 0, "num_groups", "num_groups >= 0", num_groups);
    const std::vector<index> group_sizes = validate_expert_group(num_experts);
    if (grouped()) {
      if (expert_group.empty())
        require(num_experts % num_groups == 0, "num_groups",
                "a divisor of num_experts (" + std::to_string(num_experts) + ")", num_groups);
      require(group_topk >= 1 && group_topk <= num_groups, "group_topk",
              "1 <= group_topk <= num_groups (" + std::to_string(num_groups) + ")", group_topk);
      if (expert_group.empty()) {
        require(
            top_k <= group_topk * (num_experts / num_groups), "top_k",
            "at most group_topk * experts per group (" + std::to_string(group_topk * (num_experts / num_groups)) + ")",
            top_k);
      } else {
        // Every token can always get k experts: even the group_topk smallest groups hold k.
        index smallest = 0;
        for (index g = 0; g < group_topk; ++g) smallest += group_sizes[static_cast<std::size_t>(g)];
        require(
            top_k <= smallest, "top_k",
            "at most the experts of the group_topk smallest groups of expert_group (" + std::to_string(smallest) + ")",
            top_k);
      }
      require(group_scoring != group_score::top_m_sum || top_k / group_topk >= 1, "group_topk",
              "group_topk <= top_k, so that each group is scored by its top top_k/group_topk experts", group_topk);
      require(group_scoring == group_score::top_m_sum || group_scoring == group_score::top2_sum ||
                  group_scoring == group_score::max,
              "group_scoring", "top_m_sum, top2_sum or max", static_cast<int>(group_scoring));
    } else {
      require(group_topk == 0 || (num_groups == 1 && group_topk == 1), "group_topk",
              "0 (or 1 with a single group) when num_groups <= 1", group_topk);
    }
  }

  // The checks of expert_group (when given): E entries, each in [0, num_groups), every group non-empty.
  // Returns the group sizes, ascending (empty without a map).
  std::vector<index> validate_expert_group(index num_experts) const {
    using detail::require;
    if (expert_group.empty()) return {};
    require(expert_group.size == num_experts, "expert_group", std::to_string(num_experts) + " entries (one per expert)",
            expert_group.size);
    require(expert_group.data != nullptr, "expert_group", "non-null data");
    require(num_groups >= 1, "expert_group", "num_groups >= 1 (the number of groups its entries name)",
            "num_groups = ", num_groups);
    // A group per expert at most, so that the sizes below stay small whatever num_groups is.
    require(num_groups <= num_experts, "expert_group", "every group in [0, num_groups) non-empty",
            "num_groups = ", num_groups, " > num_experts = ", num_experts);
    std::vector<index> sizes(static_cast<std::size_t>(num_groups), 0);
    for (index e = 0; e < num_experts; ++e) {
      const id_type g = expert_group[e];
      require(g >= 0 && g < num_groups, "expert_group", "groups in [0, num_groups)", "expert_group[", e, "] = ", g,
              " with num_groups = ", num_groups);
      ++sizes[static_cast<std::size_t>(g)];
    }
    for (index g = 0; g < num_groups; ++g)
      require(sizes[static_cast<std::size_t>(g)] > 0, "expert_group", "every group in [0, num_groups) non-empty",
              "no expert in group ", g);
    std::sort(sizes.begin(), sizes.end());
    return sizes;
  }

  index candidates_per_token(index) const { return top_k; }

  // select() checks the logits and the weights for NaN and Inf in its own pass over each row.
  static constexpr bool checks_finite = true;

  // Scratch one row needs, in floats and in ids.
  RESONANCE_HOST_DEVICE constexpr index scratch_size(index num_experts) const {
    index g = 0;
    if (grouped())
      g = expert_group.empty() ? detail::group_topk_scratch(num_groups, top_k, group_topk)
                               : detail::mapped_group_topk_scratch(num_groups, top_k, group_topk, group_scoring);
    return num_experts + top_k + g;
  }
  // Bytes of scratch of one token's selection: scratch_size floats, then as many ids.
  RESONANCE_HOST_DEVICE constexpr index scratch_bytes(index num_experts) const {
    return scratch_size(num_experts) * static_cast<index>(sizeof(float) + sizeof(id_type));
  }

  friend constexpr bool operator==(const token_choice&, const token_choice&) = default;
};

static_assert(routing_policy<token_choice>);

namespace kernel {

// The weights of a selected row (the last phase of token_choice_row): out_expert holds the k selected
// experts (any order), `scores` the E scores when the score is computed before the selection (then
// read), else at least k floats of scratch. k, inv_t and post_softmax are the caller's (p.top_k,
// 1 / p.temperature, softmax after the top-k), so that a row computes them once. Writes the k weights,
// from the unbiased quantity, and sorts the pairs by expert id.
template <class Rows = detail::scalar_rows>
RESONANCE_HOST_DEVICE RESONANCE_FORCEINLINE void token_choice_weights(const token_choice& p, index k, float inv_t,
                                                                      bool post_softmax, const float* logits,
                                                                      float* scores, id_type* out_expert,
                                                                      float* out_weight) {
  // Weights from the unbiased quantity.
  if (post_softmax) {
    float* shifted = scores;  // free in this branch; E >= k entries
    float m = logits[out_expert[0]] * inv_t;
    for (index j = 0; j < k; ++j) {
      shifted[j] = logits[out_expert[j]] * inv_t;
      m = shifted[j] > m ? shifted[j] : m;
    }
    for (index j = 0; j < k; ++j) shifted[j] -= m;
    Rows::exp_n(shifted, out_weight, k);
    float sum = 0.0f;
    for (index j = 0; j < k; ++j) sum += out_weight[j];
    for (index j = 0; j < k; ++j) out_weight[j] /= sum;
  } else {
    for (index j = 0; j < k; ++j) out_weight[j] = scores[out_expert[j]];
    const bool elementwise = p.score == resonance::score::sigmoid || p.score == resonance::score::sqrt_softplus;
    const bool renorm = p.renorm == renormalize::always || (p.renorm == renormalize::automatic && elementwise && k > 1);
    if (renorm) {
      float sum = 0.0f;
      for (index j = 0; j < k; ++j) sum += out_weight[j];
      const float denom = sum + p.renorm_epsilon;
      for (index j = 0; j < k; ++j) out_weight[j] /= denom;
    }
  }
  if (p.scaling_factor != 1.0f)
    for (index j = 0; j < k; ++j) out_weight[j] *= p.scaling_factor;
  detail::sort_by_id(out_expert, out_weight, k);
}

// One token's selection: writes top_k (expert, weight) pairs ordered by expert id. `fscratch` and
// `iscratch` hold p.scratch_size(E) entries. Returns false when the row's logits are not all finite
// (the outputs are then unspecified). Host/device; no allocation. `Rows` supplies the row primitives
// (scalar, or a backend's vectorised ones with bitwise the same results).
template <class Rows = detail::scalar_rows>
RESONANCE_INLINE_FUNCTION bool token_choice_row(const token_choice& p, const float* logits, index num_experts,
                                                const float* bias, id_type* out_expert, float* out_weight,
                                                float* fscratch, id_type* iscratch) {
  const index k = p.top_k;
  const float inv_t = 1.0f / p.temperature;
  float* vals = fscratch;                  // k selected keys
  float* scores = fscratch + k;            // E scores (when the score is computed before selection)
  float* gf = fscratch + k + num_experts;  // group scratch
  id_type* gi = iscratch + k;
  const bool post_softmax = p.score == resonance::score::softmax && !p.pre_softmax;

  // The selection key: logits (post softmax) or scores, plus the selection-only bias.
  bool finite = true;
  const float* base = logits;
  float scale = inv_t;
  if (!post_softmax) {
    finite = Rows::all_finite(logits, num_experts);
    Rows::score(p.score, logits, scores, num_experts, inv_t);
    base = scores;
    scale = 1.0f;
  }
  if (p.grouped()) {
    if (post_softmax) finite = Rows::all_finite(logits, num_experts);
    auto key = [&](index e) { return base[e] * scale + (bias != nullptr ? bias[e] : 0.0f); };
    if (p.expert_group.empty()) {
      detail::group_limited_topk_row(num_experts, k, p.num_groups, p.group_topk, p.group_scoring, key, vals, out_expert,
                                     gf, gi);
    } else {
      // The map is read through the policy: a device route's policy points at its device copy.
      detail::group_limited_topk_row_mapped(num_experts, k, p.num_groups, p.group_topk, p.group_scoring,
                                            p.expert_group.data, key, vals, out_expert, gf, gi);
    }
  } else {
    // topk reports whether its keys were finite: logits / temperature may overflow to ±Inf even when
    // every logit is finite, and a selection over non-finite keys is unspecified (backends differ).
    const bool f = Rows::topk(base, num_experts, k, scale, bias, vals, out_expert);
    finite = post_softmax ? f : finite && f;
  }
  if (!finite) return false;
  token_choice_weights<Rows>(p, k, inv_t, post_softmax, logits, scores, out_expert, out_weight);
  return true;
}

// A failed token still leaves valid candidates (experts 0..k-1) with NaN weights, so that a route that
// reports the failure later (a device route's status) can run its remaining stages safely, and the
// router's finiteness check finds the token. Out of line: the selection's hot path stays as small as
// it was (a k = 1 scalar row is short enough for this to show).
#if defined(__GNUC__) && !RESONANCE_DEVICE_COMPILE
__attribute__((noinline, cold))
#endif
RESONANCE_HOST_DEVICE inline void
fail_row(index k, id_type* expert, float* w) {
  for (index j = 0; j < k; ++j) {
    expert[j] = static_cast<id_type>(j);
    w[j] = __builtin_bit_cast(float, 0x7FC00000u);  // a quiet NaN
  }
}

// The end of one token of the selection driver: the weights' finiteness checked, the token's CSR end
// written, and a failed token's candidates replaced (fail_row). `ok`: the selection succeeded (its
// weights are written). Returns true when the token fails (non-finite logits or weights).
RESONANCE_HOST_DEVICE RESONANCE_FORCEINLINE bool token_choice_finish(const token_choice& p, bool ok, index t,
                                                                     id_type* expert, float* weight, id_type* offsets) {
  const index k = p.top_k;
  float* w = weight + t * k;
  for (index j = 0; j < k; ++j) ok &= (w[j] - w[j]) == 0.0f;
  offsets[t + 1] = static_cast<id_type>((t + 1) * k);
  if (ok) [[likely]]
    return false;
  fail_row(k, expert + t * k, w);
  return true;
}

// One token of the selection driver: token_choice_row with the group's row primitives, the weights'
// finiteness checked in the same pass, and the token's CSR end written. `scratch` holds
// p.scratch_bytes(E) bytes. Returns true when the token fails (non-finite logits or weights).
template <class Rows>
RESONANCE_INLINE_FUNCTION bool token_choice_select(const token_choice& p, const float* logits_row, index num_experts,
                                                   const float* bias, index t, id_type* expert, float* weight,
                                                   id_type* offsets, void* scratch) {
  const index k = p.top_k;
  float* fs = static_cast<float*>(scratch);
  id_type* is = reinterpret_cast<id_type*>(fs + p.scratch_size(num_experts));
  const bool ok = token_choice_row<Rows>(p, logits_row, num_experts, bias, expert + t * k, weight + t * k, fs, is);
  return token_choice_finish(p, ok, t, expert, weight, offsets);
}

// The tokens a backend with lane groups (detail::warp_row_backend: backend::cuda's warps) selects on a
// group of lanes: no group limit (contiguous or mapped), k in registers (detail::warp_topk_max_k), at most
// warp_select_max_experts experts. Every other policy keeps the per-row path.
inline constexpr index warp_select_max_experts = 512;

RESONANCE_HOST_DEVICE constexpr bool warp_selectable(const token_choice& p, index num_experts) {
  return !p.grouped() && p.top_k <= detail::warp_topk_max_k && num_experts <= warp_select_max_experts;
}

// Bytes of scratch of one token on a lane group: the k selected keys and the E scores.
RESONANCE_HOST_DEVICE constexpr index warp_scratch_bytes(const token_choice& p, index num_experts) {
  return (p.top_k + num_experts) * static_cast<index>(sizeof(float));
}

// One token of the selection driver on a group of lanes (detail/warp_topk.hpp), run by every lane of
// the group: token_choice_select's phases with the same results, bit for bit. An elementwise score is
// computed by the lanes (an entry's bits do not depend on who computes it); a softmax over the row, whose
// sum runs in one order, on one lane; the top-k by detail::warp_topk (scalar_rows::topk's result); the
// weights, their check and a failed token's candidates (token_choice_weights, token_choice_finish:
// they update arrays in place) on one lane. Returns, on every lane, true when the token fails.
// Requires warp_selectable(p, E); `scratch` holds warp_scratch_bytes(p, E) bytes.
template <class Warp>
RESONANCE_INLINE_FUNCTION bool token_choice_select_warp(const Warp& w, const token_choice& p, const float* logits_row,
                                                        index num_experts, const float* bias, index t, id_type* expert,
                                                        float* weight, id_type* offsets, void* scratch) {
  constexpr index lanes = Warp::width;
  const index k = p.top_k;
  const float inv_t = 1.0f / p.temperature;
  float* vals = static_cast<float*>(scratch);  // k selected keys
  float* scores = vals + k;                    // E scores (when the score is computed before selection)
  id_type* ids = expert + t * k;
  const bool post_softmax = p.score == resonance::score::softmax && !p.pre_softmax;

  // The selection key, as token_choice_row: logits (post softmax) or scores.
  bool finite = true;
  const float* base = logits_row;
  float scale = inv_t;
  if (!post_softmax) {
    const bool elementwise = p.score != resonance::score::softmax;
    bool ok = true;
    for (index e = w.lane(); e < num_experts; e += lanes) {
      ok &= (logits_row[e] - logits_row[e]) == 0.0f;  // scalar_rows::all_finite
      if (elementwise) scores[e] = detail::elementwise_score(p.score, logits_row[e] * inv_t);  // score_row's entry
    }
    if (!elementwise) w.single([&] { detail::scalar_rows::score(p.score, logits_row, scores, num_experts, inv_t); });
    finite = w.all(ok);
    w.sync();  // every lane's scores, for every lane
    base = scores;
    scale = 1.0f;
  }
  const bool f = detail::warp_topk(w, base, num_experts, k, scale, bias, vals, ids);
  finite = post_softmax ? f : finite && f;
  return w.single([&] {
    if (finite) token_choice_weights(p, k, inv_t, post_softmax, logits_row, scores, ids, weight + t * k);
    return token_choice_finish(p, finite, t, expert, weight, offsets);
  });
}

}  // namespace kernel

// The host driver in three steps, which the router's fused path (router.hpp) also drives one block of
// tokens at a time: begin_selection sizes the candidate set for T tokens; select_rows selects a block
// of rows (token `first` onward) on the calling thread with the backend's row primitives, checking in
// the same pass that the logits and the weights are finite (token_choice::checks_finite), and returns
// the lowest offending token of the block, or first + rows; fail_selection throws the error of an
// offending token, given its logits row and the weights select_rows wrote.
template <class Backend, class Space>
void begin_selection(const Backend& be, const token_choice& p, index num_tokens, index num_experts,
                     basic_candidate_set<Space>& out) {
  detail::fixed_candidates(be, out, num_tokens, num_experts, p.top_k);
}

inline void begin_selection(const token_choice& p, index num_tokens, index num_experts, candidate_set& out) {
  begin_selection(backend::serial{}, p, num_tokens, num_experts, out);
  out.offsets[0] = 0;
}

template <execution_backend Backend>
index select_rows(const Backend&, const token_choice& p, matrix_view<const float> logits, index first,
                  candidate_set& out) {
  using rows = detail::row_ops_t<Backend>;
  const index E = logits.cols;
  const float* bias = p.expert_bias.empty() ? nullptr : p.expert_bias.data;
  backend::host_scratch scratch(p.scratch_bytes(E));
  for (index r = 0; r < logits.rows; ++r)
    if (kernel::token_choice_select<rows>(p, logits.row(r), E, bias, first + r, out.expert.data(), out.weight.data(),
                                          out.offsets.data(), scratch.get()))
      return first + r;  // the rest of this block cannot hold a lower token
  return first + logits.rows;
}

template <class Candidates>
[[noreturn]] void fail_selection(const token_choice& p, const float* logits_row, index num_experts, index t,
                                 const Candidates&) {
  const index k = p.top_k;
  detail::check_finite(matrix_view<const float>{logits_row, 1, num_experts, num_experts}, "logits", t);
  // The row again with the scalar reference rows, whose selection is defined on infinite keys too: the
  // weight reported is then the same whichever backend found the token.
  std::vector<float> fs(static_cast<std::size_t>(p.scratch_size(num_experts)));
  std::vector<id_type> is(fs.size()), ids(static_cast<std::size_t>(k));
  std::vector<float> weights(static_cast<std::size_t>(k));
  const float* bias = p.expert_bias.empty() ? nullptr : p.expert_bias.data;
  (void)kernel::token_choice_row(p, logits_row, num_experts, bias, ids.data(), weights.data(), fs.data(), is.data());
  float w = 0.0f;
  for (index j = k - 1; j >= 0; --j)
    if (const float v = weights[static_cast<std::size_t>(j)]; !std::isfinite(v)) w = v;
  detail::fail("routing weight", "a finite fp32 value (logits / temperature or weight * scaling_factor overflowed)", w,
               " for token ", t);
}

}  // namespace resonance::routing

namespace resonance::detail {
// Every token's selection as one group, into the candidate arrays (T·k entries, offsets T+1) on the
// backend's data (routing::kernel::token_choice_select). Returns the lowest failing token, or T; with
// Sync = false the groups report nothing (a failed token's NaN weights are found later) and the call
// does not wait.
template <bool Sync, execution_backend Backend, class LogitsSpace>
index token_choice_rows(const Backend& be, const routing::token_choice& p, matrix_view<const float, LogitsSpace> logits,
                        id_type* offsets, id_type* expert, float* weight) {
  static_assert(accessible_from_v<LogitsSpace, memory_space_t<Backend>>,
                "the logits must be in memory the backend can read");
  const index T = logits.rows, E = logits.cols;
  const float* bias = p.expert_bias.empty() ? nullptr : p.expert_bias.data;
  for_each(
      be, 1, RESONANCE_LAMBDA(index) { offsets[0] = 0; });
  if constexpr (detail::warp_row_backend<Backend>) {
    // A backend with lane groups selects the rows that fit its registers on a group of lanes each.
    if (routing::kernel::warp_selectable(p, E)) {
      using warp = typename Backend::warp_group;
      const index bytes = routing::kernel::warp_scratch_bytes(p, E);
      const auto warp_row = RESONANCE_LAMBDA(const warp& w, index t) {
        return routing::kernel::token_choice_select_warp(w, p, logits.row(t), E, bias, t, expert, weight, offsets,
                                                         w.scratch());
      };
      if constexpr (Sync) {
        return for_each_warp_row(be, T, bytes, warp_row);
      } else {
        for_each_warp_row(
            be, T, bytes, RESONANCE_LAMBDA(const warp& w, index t) { (void)warp_row(w, t); });
        return T;
      }
    }
  }
  using group = typename Backend::group;
  const auto row = RESONANCE_LAMBDA(const group& g, index t) {
    using rows = typename group::rows;
    return routing::kernel::token_choice_select<rows>(p, logits.row(t), E, bias, t, expert, weight, offsets,
                                                      g.scratch());
  };
  if constexpr (Sync) {
    return for_each_group(be, T, p.scratch_bytes(E), row);
  } else {
    for_each_group(
        be, T, p.scratch_bytes(E), RESONANCE_LAMBDA(const group& g, index t) { (void)row(g, t); });
    return T;
  }
}
}  // namespace resonance::detail

namespace resonance::routing {

// The driver: token_choice_select over every token as one group each; the lowest offending token is
// reported whatever the backend.
template <execution_backend Backend, class LogitsSpace, class Space>
void select(const Backend& be, const token_choice& p, matrix_view<const float, LogitsSpace> logits,
            const capacity_limits&, basic_candidate_set<Space>& out) {
  static_assert(accessible_from_v<Space, memory_space_t<Backend>>,
                "the candidates must be in memory the backend can write");
  begin_selection(be, p, logits.rows, logits.cols, out);
  const index bad =
      detail::token_choice_rows<true>(be, p, logits, out.offsets.data(), out.expert.data(), out.weight.data());
  if (bad < logits.rows) fail_selection(p, detail::host_row(be, logits, bad).data(), logits.cols, bad, out);
}

// The same selection into arrays the caller sized (T·k candidates), without waiting for a status: a
// failed token is left with NaN weights, which the caller's finiteness check reports (a device route
// checks them into its status; router.hpp).
template <execution_backend Backend, class LogitsSpace, class Space>
void select_unchecked(const Backend& be, const token_choice& p, matrix_view<const float, LogitsSpace> logits,
                      const capacity_limits&, candidate_span<Space>& out) {
  static_assert(accessible_from_v<Space, memory_space_t<Backend>>,
                "the candidates must be in memory the backend can write");
  out.num_tokens = logits.rows;
  out.num_experts = logits.cols;
  out.size = logits.rows * p.top_k;
  out.ranks_by_priority = false;
  out.forced_drop.reset();
  (void)detail::token_choice_rows<false>(be, p, logits, out.offsets, out.expert, out.weight);
}

}  // namespace resonance::routing
