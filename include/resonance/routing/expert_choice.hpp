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

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "../backend/backend.hpp"
#include "../backend/serial.hpp"
#include "../capacity/capacity.hpp"
#include "../core/error.hpp"
#include "../core/topk.hpp"
#include "../core/view.hpp"
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

// S for every token (T×E, row-major, fp32): score_row of each row with scale 1/temperature. A score
// that is not finite (identity of logits / a tiny temperature) is an error before any selection, as
// the router reports for token choice: a NaN would break the strict order of the per-expert top-C.
template <execution_backend Backend>
std::vector<float> expert_choice_scores(const Backend& be, const routing::expert_choice& p,
                                        matrix_view<const float> logits) {
  const index T = logits.rows, E = logits.cols;
  std::vector<float> s(static_cast<std::size_t>(T * E));
  const float inv_t = 1.0f / p.temperature;
  detail::host_blocks(be, T, 1024, [&](index begin, index end) {
    for (index t = begin; t < end; ++t) score_row(p.score, logits.row(t), s.data() + t * E, E, inv_t);
  });
  for (index i = 0; i < T * E; ++i)
    if (!std::isfinite(s[static_cast<std::size_t>(i)]))
      fail("routing weight", "a finite fp32 value (logits / temperature overflowed)", s[static_cast<std::size_t>(i)],
           " for token ", i / E);
  return s;
}

// One entry of an expert's column: its score and token. `before` is the strict total order of the
// selection, (score descending, token ascending), so ties go to the lower token id and the kept set
// does not depend on how std::nth_element partitions.
struct expert_choice_entry {
  float score;
  id_type token;
};

inline bool expert_choice_before(const expert_choice_entry& a, const expert_choice_entry& b) {
  return a.score > b.score || (a.score == b.score && a.token < b.token);
}

// Fills col with column e of the row-major T×E scores s.
inline void expert_choice_column(const float* s, index T, index E, index e, std::vector<expert_choice_entry>& col) {
  col.resize(static_cast<std::size_t>(T));
  for (index t = 0; t < T; ++t) col[static_cast<std::size_t>(t)] = {s[t * E + e], static_cast<id_type>(t)};
}

// Token-major CSR of the pairs with keep[t*E + e] != 0, ascending expert ids, weights from s.
template <execution_backend Backend>
void expert_choice_fill(const Backend& be, const std::vector<unsigned char>& keep, const std::vector<float>& s, index T,
                        index E, candidate_set& out) {
  const auto sz = [](index n) { return static_cast<std::size_t>(n); };
  out.offsets.assign(sz(T + 1), 0);
  detail::host_blocks(be, T, 1024, [&](index begin, index end) {
    for (index t = begin; t < end; ++t) {
      id_type n = 0;
      for (index e = 0; e < E; ++e) n += keep[sz(t * E + e)];
      out.offsets[sz(t + 1)] = n;
    }
  });
  for (index t = 0; t < T; ++t) out.offsets[sz(t + 1)] += out.offsets[sz(t)];
  out.expert.resize(sz(out.offsets[sz(T)]));
  out.weight.resize(sz(out.offsets[sz(T)]));
  detail::host_blocks(be, T, 1024, [&](index begin, index end) {
    for (index t = begin; t < end; ++t) {
      id_type i = out.offsets[sz(t)];
      for (index e = 0; e < E; ++e) {
        if (!keep[sz(t * E + e)]) continue;
        out.expert[sz(i)] = static_cast<id_type>(e);
        out.weight[sz(i)] = s[sz(t * E + e)];
        ++i;
      }
    }
  });
}

}  // namespace resonance::detail

namespace resonance::routing {

// Host driver. Non-causal: per expert, a selection over its column (std::nth_element, O(T)), experts
// in parallel; the candidate set holds only the kept pairs, so the plan builder keeps them all (each
// expert has at most C), and demand is overridden to T. Causal: candidates by threshold or top-k,
// then position priority (candidate_set::forced_drop) and the builder applies the capacity.
template <execution_backend Backend>
void select(const Backend& be, const expert_choice& p, matrix_view<const float> logits, const capacity_limits& lim,
            candidate_set& out) {
  const auto sz = [](index n) { return static_cast<std::size_t>(n); };
  const index T = logits.rows, E = logits.cols;
  // A token may be kept by every expert: the T×E pairs must fit the plan's 32-bit offsets.
  detail::require(
      static_cast<double>(T) * static_cast<double>(E) < static_cast<double>(std::numeric_limits<id_type>::max()),
      "input", "num_tokens * num_experts < 2^31 for expert choice", T, " tokens x ", E, " experts");
  if (!p.causal)
    detail::require(lim.capacity >= 0, "capacity",
                    "a finite capacity (expert choice selects C tokens per expert; use capacity::factor)",
                    lim.capacity);
  const std::vector<float> s = detail::expert_choice_scores(be, p, logits);
  out.num_tokens = T;
  out.num_experts = E;
  out.priority.clear();
  std::vector<unsigned char> keep(sz(T * E), 0);  // keep[t*E + e]: distinct bytes, written by one expert each

  if (!p.causal) {
    const index C = lim.capacity < T ? lim.capacity : T;
    detail::host_blocks(be, E, 1, [&](index e_begin, index e_end) {
      std::vector<detail::expert_choice_entry> col;
      for (index e = e_begin; e < e_end; ++e) {
        if (C == 0) continue;
        if (C == T) {
          for (index t = 0; t < T; ++t) keep[sz(t * E + e)] = 1;
          continue;
        }
        detail::expert_choice_column(s.data(), T, E, e, col);
        std::nth_element(col.begin(), col.begin() + (C - 1), col.end(), detail::expert_choice_before);
        for (index j = 0; j < C; ++j) keep[sz(col[sz(j)].token * E + e)] = 1;
      }
    });
    detail::expert_choice_fill(be, keep, s, T, E, out);
    out.demand.assign(sz(E), static_cast<id_type>(T));
    return;
  }

  // Causal: a token's candidates depend on its own scores only, and position priority makes its slot
  // depend only on earlier tokens.
  detail::host_blocks(be, T, 1024, [&](index begin, index end) {
    std::vector<float> vals(sz(p.top_k));
    std::vector<id_type> ids(sz(p.top_k));
    for (index t = begin; t < end; ++t) {
      const float* row = s.data() + t * E;
      unsigned char* k_row = keep.data() + t * E;
      if (!p.thresholds.empty()) {
        for (index e = 0; e < E; ++e) k_row[e] = row[e] >= p.thresholds[e] ? 1 : 0;
      } else {
        detail::topk_row(
            E, p.top_k, [&](index e) { return row[e]; }, vals.data(), ids.data());
        for (index j = 0; j < p.top_k; ++j) k_row[ids[sz(j)]] = 1;
      }
    }
  });
  detail::expert_choice_fill(be, keep, s, T, E, out);
  out.demand.clear();  // demand = the candidates per expert, counted by the plan builder
  out.forced_drop = drop_policy::position;
}

// Per-expert score thresholds for causal expert choice: for each expert, the C-th largest of its
// column of `scores` (T×E, a previous batch's S), so that on a batch distributed like that one about C
// tokens pass each threshold. When C >= T the column's smallest score is returned (every token of the
// batch passes).
inline std::vector<float> expert_choice_thresholds(matrix_view<const float> scores, index capacity) {
  detail::check_matrix(scores, "scores");
  detail::require(scores.rows >= 1 && scores.cols >= 1, "scores", "at least one token and one expert", scores.rows, "x",
                  scores.cols);
  detail::require(capacity >= 1, "capacity", "capacity >= 1", capacity);
  const index T = scores.rows, E = scores.cols;
  for (index t = 0; t < T; ++t)
    for (index e = 0; e < E; ++e)
      detail::require(std::isfinite(scores(t, e)), "scores", "finite values", scores(t, e), " at row ", t, ", column ",
                      e);
  std::vector<float> out(static_cast<std::size_t>(E));
  std::vector<float> col(static_cast<std::size_t>(T));
  const index C = capacity < T ? capacity : T;
  for (index e = 0; e < E; ++e) {
    for (index t = 0; t < T; ++t) col[static_cast<std::size_t>(t)] = scores(t, e);
    std::nth_element(col.begin(), col.begin() + (C - 1), col.end(), [](float a, float b) { return a > b; });
    out[static_cast<std::size_t>(e)] = col[static_cast<std::size_t>(C - 1)];
  }
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
  const std::vector<float> s = detail::expert_choice_scores(backend::serial{}, p, logits);
  return expert_choice_thresholds(matrix_view<const float>{s.data(), logits.rows, logits.cols}, capacity);
}

}  // namespace resonance::routing
