#pragma once

// ETR bidirectional routing (arXiv 2406.00023, Eq. 5-6): every token proposes its top-ℓ experts
// (token choice, TCR), then every expert keeps the top-C of the tokens that proposed it (expert choice
// restricted to its candidates, ECR), ranked by affinity; the other candidates are dropped and empty
// slots are padded. A pair is kept only when the token chose the expert and the expert chose it back.
//   C >= the largest demand   -> no drop: exactly token choice with the same options (the TCR regime);
//   C smaller                 -> candidate-restricted expert choice (the ECR regime).
// The capacity scheduler (capacity::adaptive) moves C between the two: the TCR -> ECR transition.
//
// The proposal step and the weights are token choice's (every option of token_choice is here, under
// the same name); only the ranking inside an expert differs. `causal` replaces the ranking by position
// priority (earliest candidates first), so a token's fate depends only on tokens at or before it.

#include "../capacity/capacity.hpp"
#include "../core/error.hpp"
#include "../score/score.hpp"
#include "routing.hpp"
#include "token_choice.hpp"

namespace resonance::routing {

// How an expert ranks the tokens that proposed it.
enum class rank_by : unsigned char {
  affinity,  // the raw affinity (router logit, e.g. ETR's GrAP-cosine δ): ETR Eq. 6, the default
  score,     // the token's full score s_te (softmax over all E, sigmoid, ...), as expert choice ranks
  weight,    // the combine weight (token choice with drop_policy::score)
};

struct bidirectional {
  index top_k = 1;  // ℓ, experts each token proposes (the paper's experiments use 1)
  resonance::score score = resonance::score::softmax;
  bool pre_softmax = false;
  float temperature = 1.0f;
  renormalize renorm = renormalize::automatic;
  float renorm_epsilon = 1e-20f;
  float scaling_factor = 1.0f;
  vector_view<const float> expert_bias = {};
  index num_groups = 0;
  index group_topk = 0;
  group_score group_scoring = group_score::top_m_sum;
  vector_view<const id_type> expert_group = {};  // token choice's: the group (node) of each expert
  rank_by rank = rank_by::affinity;
  bool causal = false;

  // The token-choice policy of the proposal step.
  token_choice proposal() const {
    return {top_k,          score,       pre_softmax, temperature, renorm,        renorm_epsilon,
            scaling_factor, expert_bias, num_groups,  group_topk,  group_scoring, expert_group};
  }

  void validate(index num_experts) const {
    proposal().validate(num_experts);
    detail::require(rank == rank_by::affinity || rank == rank_by::score || rank == rank_by::weight, "rank",
                    "affinity, score or weight", static_cast<int>(rank));
  }

  index candidates_per_token(index) const { return top_k; }

  friend constexpr bool operator==(const bidirectional&, const bidirectional&) = default;
};

static_assert(routing_policy<bidirectional>);

}  // namespace resonance::routing

namespace resonance::detail {
// The expert's ranking of the candidates the proposal step wrote: each candidate's affinity, or its full
// score (which needs the row's scores), into priority.
template <execution_backend Backend, class LogitsSpace>
void bidirectional_priority(const Backend& be, const routing::bidirectional& p,
                            matrix_view<const float, LogitsSpace> logits, const id_type* offsets, const id_type* expert,
                            float* priority) {
  const index E = logits.cols;
  const bool by_score = p.rank == routing::rank_by::score;
  const resonance::score fn = p.score;
  const float inv_t = 1.0f / p.temperature;
  using group = typename Backend::group;
  for_each_group(
      be, logits.rows, by_score ? E * static_cast<index>(sizeof(float)) : 0, RESONANCE_LAMBDA(const group& g, index t) {
        const float* row = logits.row(t);
        float* s = static_cast<float*>(g.scratch());
        if (by_score) score_row(fn, row, s, E, inv_t);
        for (id_type i = offsets[t]; i < offsets[t + 1]; ++i) priority[i] = by_score ? s[expert[i]] : row[expert[i]];
      });
}

// The expert's side of the handshake: position priority when causal, else the ranking by `rank` (the
// weight is already the default priority).
inline drop_policy bidirectional_drop(const routing::bidirectional& p) {
  return p.causal ? drop_policy::position : drop_policy::score;
}
inline bool bidirectional_ranks(const routing::bidirectional& p) {
  return !p.causal && p.rank != routing::rank_by::weight;
}
}  // namespace resonance::detail

namespace resonance::routing {

template <execution_backend Backend, class LogitsSpace, class Space>
void select(const Backend& be, const bidirectional& p, matrix_view<const float, LogitsSpace> logits,
            const capacity_limits& lim, basic_candidate_set<Space>& out) {
  select(be, p.proposal(), logits, lim, out);
  out.forced_drop = detail::bidirectional_drop(p);
  if (!detail::bidirectional_ranks(p)) return;
  detail::resize_array(be, out.priority, out.size());
  detail::bidirectional_priority(be, p, logits, out.offsets.data(), out.expert.data(), out.priority.data());
}

// The error of a token whose proposal failed: token choice's, as select() throws it.
template <class Candidates>
[[noreturn]] void fail_selection(const bidirectional& p, const float* logits_row, index num_experts, index t,
                                 const Candidates& c) {
  fail_selection(p.proposal(), logits_row, num_experts, t, c);
}

// The selection into arrays the caller sized, without waiting for a status (token choice's
// select_unchecked, then the ranking).
template <execution_backend Backend, class LogitsSpace, class Space>
void select_unchecked(const Backend& be, const bidirectional& p, matrix_view<const float, LogitsSpace> logits,
                      const capacity_limits& lim, candidate_span<Space>& out) {
  select_unchecked(be, p.proposal(), logits, lim, out);
  out.forced_drop = detail::bidirectional_drop(p);
  out.ranks_by_priority = detail::bidirectional_ranks(p);
  if (out.ranks_by_priority) detail::bidirectional_priority(be, p, logits, out.offsets, out.expert, out.priority);
}

}  // namespace resonance::routing
