#pragma once

// Expert choice (Zhou et al. 2022, arXiv 2202.09368, §3.2): the experts choose the tokens.
//   S = softmax(X·W_g) over the E experts (here: the full score distribution of the router logits,
//       softmax over all E, or sigmoid / sqrt_softplus / identity, after dividing by `temperature`);
//   G, I = TopK(Sᵀ, C): expert e keeps the C tokens with the highest S[:, e], weight G = S[t, e].
// A token may receive 0..E experts. C is the capacity the router's capacity policy gives,
// C = ceil(cf·T·k/E) with k = top_k (the nominal experts per token: the paper's k = n·c/e for k = 1);
// expert choice needs it finite, so it rejects capacity::dropless. Every expert keeps exactly min(C, T)
// tokens, so the load is perfectly balanced; with pad_to_capacity every expert has exactly C slots
// anyway, padding showing only when C > T. expert_demand is T for every expert (every token was a
// candidate of every expert), so drop_rate reads 1 − kept/(T·E).
//
// The non-causal form reads future tokens: whether token t is kept by expert e depends on the scores
// of every token of the batch, later ones included, which decoder-only models cannot do at inference
// (the paper notes it is not directly applicable to autoregressive decoding). `causal = true` gives a
// variant in which a token's fate depends only on tokens at or before its position:
//   candidates of token t: the experts with S[t, e] >= thresholds[e] (when thresholds are given), or
//                          else the token's top_k experts by S (ties to the lowest expert id);
//   each expert keeps its earliest C candidates (position priority: drop_policy::position).
// Without thresholds this is token choice with pre-softmax-style weights S[t, e] (softmax over all E
// then top-k, or a raw sigmoid with no renormalisation) and position drop. The trade-off: non-causal
// expert choice balances perfectly but is acausal; causal keeps position priority, so late tokens are
// dropped once an expert fills, and slots stay empty when the thresholds are high. Thresholds are
// calibrated from a previous batch with expert_choice_thresholds (each expert's C-th largest score),
// so that on the calibration batch itself (without ties) the causal variant keeps exactly the
// non-causal top-C. With thresholds, top_k only sets C. Causal expert choice accepts
// capacity::dropless (every candidate is kept).

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "../backend/backend.hpp"
#include "../backend/serial.hpp"
#include "../capacity/capacity.hpp"
#include "../core/error.hpp"
#include "../core/topk.hpp"
#include "../core/view.hpp"
#include "../plan/build.hpp"
#include "../score/score.hpp"
#include "routing.hpp"

namespace resonance::routing {

struct expert_choice {
  index top_k = 1;  // nominal experts per token: the k of C = ceil(cf·T·k/E); the causal top-k
  resonance::score score = resonance::score::softmax;  // S: the full distribution over all E
  float temperature = 1.0f;                            // logits are divided by it before scoring
  bool causal = false;                                 // position priority instead of a batch-wide top-C
  vector_view<const float> thresholds = {};            // E per-expert score thresholds (causal only)

  void validate(index num_experts) const {
    using detail::require;
    detail::check_top_k(top_k, num_experts);
    detail::check_score(score);
    detail::check_temperature(temperature);
    if (!thresholds.empty()) {
      // Non-causal expert choice has no use for thresholds: refuse them rather than ignore them.
      require(causal, "thresholds", "empty unless causal (thresholds select the causal candidates)", thresholds.size,
              " entries with causal = false");
      require(thresholds.size == num_experts, "thresholds", std::to_string(num_experts) + " entries (one per expert)",
              thresholds.size);
      require(thresholds.data != nullptr, "thresholds", "non-null data");
      for (index e = 0; e < num_experts; ++e)
        require(std::isfinite(thresholds[e]), "thresholds", "finite values", "thresholds[", e, "] = ", thresholds[e]);
    }
  }

  index candidates_per_token(index) const { return top_k; }
  // Non-causal expert choice selects C tokens per expert, so it needs the capacity first.
  bool selects_with_capacity() const { return !causal; }

  friend constexpr bool operator==(const expert_choice&, const expert_choice&) = default;
};

static_assert(routing_policy<expert_choice>);

}  // namespace resonance::routing

namespace resonance::detail {

// S for every token (T×E, row-major, fp32) in a buffer of the backend: score_row of each row with
// scale 1/temperature. A score that is not finite (identity of logits / a tiny temperature) is an
// error before any selection, as the router reports for token choice: a NaN would break the strict
// order of the per-expert top-C. The lowest offending entry is reported whatever the backend.
template <execution_backend Backend, class LogitsSpace>
typename Backend::template buffer<float> expert_choice_scores(const Backend& be, const routing::expert_choice& p,
                                                              matrix_view<const float, LogitsSpace> logits) {
  const index T = logits.rows, E = logits.cols;
  auto buf = allocate<float>(be, T * E);
  float* const s = buf.data();
  const resonance::score fn = p.score;
  const float inv_t = 1.0f / p.temperature;
  for_each(
      be, T, RESONANCE_LAMBDA(index t) { score_row(fn, logits.row(t), s + t * E, E, inv_t); });
  const index bad = reduce_min(
      be, T * E, RESONANCE_LAMBDA(index i) { return (s[i] - s[i]) == 0.0f ? no_index : i; });
  if (bad != no_index) {
    float v = 0.0f;
    copy_to_host(be, &v, s + bad, 1);
    fence(be);
    fail("routing weight", "a finite fp32 value (logits / temperature overflowed)", v, " for token ", bad / E);
  }
  return buf;
}

// Token-major CSR of the pairs with keep[t*E + e] != 0, ascending expert ids, weights from s: the
// count per token, the exclusive scan, the number of pairs read back (it sizes the arrays), the fill.
template <execution_backend Backend, class Space>
void expert_choice_fill(const Backend& be, const unsigned char* keep, const float* s, index T, index E,
                        basic_candidate_set<Space>& out) {
  resize_array(be, out.offsets, T + 1);
  id_type* const offsets = out.offsets.data();
  for_each(
      be, T, RESONANCE_LAMBDA(index t) {
        id_type n = 0;
        for (index e = 0; e < E; ++e) n += keep[t * E + e];
        offsets[t] = n;
      });
  exclusive_scan(be, offsets, offsets, T);
  id_type nnz = 0;
  copy_to_host(be, &nnz, offsets + T, 1);
  fence(be);
  resize_array(be, out.expert, nnz);
  resize_array(be, out.weight, nnz);
  id_type* const expert = out.expert.data();
  float* const weight = out.weight.data();
  for_each(
      be, T, RESONANCE_LAMBDA(index t) {
        id_type i = offsets[t];
        for (index e = 0; e < E; ++e) {
          if (!keep[t * E + e]) continue;
          expert[i] = static_cast<id_type>(e);
          weight[i] = s[t * E + e];
          ++i;
        }
      });
}

}  // namespace resonance::detail

namespace resonance::routing {

// The driver, on the execution primitives (backend/execution.hpp). Non-causal: one key per (expert,
// token), expert-major, and one segmented_select of each expert's C-th largest key; a pair is kept
// when its key is at least its expert's (all pairs when C >= T, none when C = 0). The candidate set
// holds only the kept pairs, so the plan builder keeps them all (each expert has at most C), and
// demand is overridden to T. Causal: candidates by threshold or top-k, per token, then position
// priority (candidate_set::forced_drop) and the builder applies the capacity.
template <execution_backend Backend, class LogitsSpace, class Space>
void select(const Backend& be, const expert_choice& p, matrix_view<const float, LogitsSpace> logits,
            const capacity_limits& lim, basic_candidate_set<Space>& out) {
  const index T = logits.rows, E = logits.cols;
  // A token may be kept by every expert: the T×E pairs must fit the plan's 32-bit offsets.
  detail::require(
      static_cast<double>(T) * static_cast<double>(E) < static_cast<double>(std::numeric_limits<id_type>::max()),
      "input", "num_tokens * num_experts < 2^31 for expert choice", T, " tokens x ", E, " experts");
  if (!p.causal)
    detail::require(lim.capacity >= 0, "capacity",
                    "a finite capacity (expert choice selects C tokens per expert; use capacity::factor)",
                    lim.capacity);
  const auto scores = detail::expert_choice_scores(be, p, logits);
  const float* const s = scores.data();
  out.num_tokens = T;
  out.num_experts = E;
  detail::resize_array(be, out.priority, 0);

  // Temporaries from one allocation: keep[t*E + e] (pair kept / candidate), and the selection's keys
  // (non-causal, 0 < C < T) or the per-token top-k lists (causal without thresholds).
  const index C = lim.capacity < T ? lim.capacity : T;
  const bool by_key = !p.causal && C > 0 && C < T;
  const bool by_topk = p.causal && p.thresholds.empty();
  const index k = p.top_k;
  detail::workspace_layout layout;
  const index o_keep = layout.reserve<unsigned char>(T * E);
  const index o_keys = layout.reserve<std::uint64_t>(by_key ? T * E : 0);
  const index o_seg = layout.reserve<id_type>(by_key ? E + 1 : 0);
  const index o_kth = layout.reserve<std::uint64_t>(by_key ? E : 0);
  const index o_select = layout.reserve<unsigned char>(by_key ? segmented_select_workspace(be, T * E, E) : 0);
  const index o_vals = layout.reserve<float>(by_topk ? T * k : 0);
  const index o_ids = layout.reserve<id_type>(by_topk ? T * k : 0);
  auto work = allocate<unsigned char>(be, layout.bytes());
  void* const base = work.data();
  unsigned char* const keep = detail::at_offset<unsigned char>(base, o_keep);

  if (!p.causal) {
    std::uint64_t* const keys = detail::at_offset<std::uint64_t>(base, o_keys);
    std::uint64_t* const kth = detail::at_offset<std::uint64_t>(base, o_kth);
    if (by_key) {
      id_type* const seg = detail::at_offset<id_type>(base, o_seg);
      for_each(
          be, E + 1, RESONANCE_LAMBDA(index e) { seg[e] = static_cast<id_type>(e * T); });
      detail::column_keys(be, s, T, E, E, T, keys);
      segmented_select(be, keys, seg, E, C, kth, detail::at_offset<void>(base, o_select));
    }
    const bool all = C >= T;
    for_each(
        be, T, RESONANCE_LAMBDA(index t) {
          for (index e = 0; e < E; ++e)
            keep[t * E + e] = all || (by_key && detail::column_key(s[t * E + e], t) >= kth[e]) ? 1 : 0;
        });
    detail::expert_choice_fill(be, keep, s, T, E, out);
    detail::resize_array(be, out.demand, E);
    id_type* const demand = out.demand.data();
    for_each(
        be, E, RESONANCE_LAMBDA(index e) { demand[e] = static_cast<id_type>(T); });
    out.forced_drop.reset();
    return;
  }

  // Causal: a token's candidates depend on its own scores only, and position priority makes its slot
  // depend only on earlier tokens.
  if (by_topk) {
    float* const vals = detail::at_offset<float>(base, o_vals);
    id_type* const ids = detail::at_offset<id_type>(base, o_ids);
    for_each(
        be, T, RESONANCE_LAMBDA(index t) {
          const float* row = s + t * E;
          unsigned char* k_row = keep + t * E;
          for (index e = 0; e < E; ++e) k_row[e] = 0;
          detail::topk_row(
              E, k, [row](index e) { return row[e]; }, vals + t * k, ids + t * k);
          for (index j = 0; j < k; ++j) k_row[ids[t * k + j]] = 1;
        });
  } else {
    const float* const thr = p.thresholds.data;
    for_each(
        be, T, RESONANCE_LAMBDA(index t) {
          for (index e = 0; e < E; ++e) keep[t * E + e] = s[t * E + e] >= thr[e] ? 1 : 0;
        });
  }
  detail::expert_choice_fill(be, keep, s, T, E, out);
  detail::resize_array(be, out.demand, 0);  // demand = the candidates per expert, counted by the plan builder
  out.forced_drop = drop_policy::position;
}

// Per-expert score thresholds for causal expert choice: for each expert, the C-th largest of its
// column of `scores` (T×E, a previous batch's S), so that on a batch distributed like that one about C
// tokens pass each threshold. When C >= T the column's smallest score is returned (every token of the
// batch passes). The selection is the non-causal one (segmented_select on the same keys), run on
// backend::serial: the thresholds are host data, computed once per calibration.
inline std::vector<float> expert_choice_thresholds(matrix_view<const float> scores, index capacity) {
  detail::check_matrix(scores, "scores");
  detail::require(scores.rows >= 1 && scores.cols >= 1, "scores", "at least one token and one expert", scores.rows, "x",
                  scores.cols);
  detail::require(capacity >= 1, "capacity", "capacity >= 1", capacity);
  const index T = scores.rows, E = scores.cols;
  detail::require(
      static_cast<double>(T + 1) * static_cast<double>(E) < static_cast<double>(std::numeric_limits<id_type>::max()),
      "scores", "(rows + 1) * cols < 2^31", T, "x", E);
  for (index t = 0; t < T; ++t)
    for (index e = 0; e < E; ++e)
      detail::require(std::isfinite(scores(t, e)), "scores", "finite values", scores(t, e), " at row ", t, ", column ",
                      e);
  const index C = capacity < T ? capacity : T;
  std::vector<index> token(static_cast<std::size_t>(E));
  detail::column_kth_token(backend::serial{}, scores.data, T, E, scores.stride, C, token.data());
  // The score itself, read back by its token (not decoded from the key, which reads -0 as +0).
  std::vector<float> out(static_cast<std::size_t>(E));
  for (index e = 0; e < E; ++e) out[static_cast<std::size_t>(e)] = scores(token[static_cast<std::size_t>(e)], e);
  return out;
}

// The same from router logits: S is computed as the direction computes it (p.score, p.temperature).
inline std::vector<float> expert_choice_thresholds(const expert_choice& p, matrix_view<const float> logits,
                                                   index capacity) {
  detail::check_matrix(logits, "logits");
  detail::require(logits.rows >= 1 && logits.cols >= 1, "logits", "at least one token and one expert", logits.rows, "x",
                  logits.cols);
  p.validate(logits.cols);
  for (index t = 0; t < logits.rows; ++t)
    for (index e = 0; e < logits.cols; ++e)
      detail::require(std::isfinite(logits(t, e)), "logits", "finite values", logits(t, e), " at row ", t, ", column ",
                      e);
  const auto s = detail::expert_choice_scores(backend::serial{}, p, logits);
  return expert_choice_thresholds(matrix_view<const float>{s.data(), logits.rows, logits.cols}, capacity);
}

}  // namespace resonance::routing
