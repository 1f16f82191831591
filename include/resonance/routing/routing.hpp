#pragma once

// The routing-direction axis: turns a T×E score matrix into candidate (token, expert, weight) triples.

#include <cmath>
#include <concepts>
#include <optional>
#include <string>
#include <vector>

#include "../backend/backend.hpp"
#include "../capacity/capacity.hpp"
#include "../core/concepts.hpp"
#include "../core/error.hpp"
#include "../core/view.hpp"
#include "../score/score.hpp"

namespace resonance {

// Candidate assignments before capacity, token-major CSR: token t's candidates are
// [offsets[t], offsets[t+1]), with strictly ascending expert ids. `priority` ranks candidates for
// drop_policy::score (higher is kept first); when empty, the weight is the priority. `demand`, when
// not empty, overrides the per-expert demand the plan reports (expert choice selects inside the
// direction: its candidates are already the kept pairs, while every token was a candidate).
struct candidate_set {
  index num_tokens = 0;
  index num_experts = 0;
  std::vector<id_type> offsets{0};
  std::vector<id_type> expert;
  std::vector<float> weight;
  std::vector<float> priority;
  std::vector<id_type> demand;
  // The drop policy the direction's definition implies (bidirectional ranks by priority, causal
  // variants keep position priority); it overrides the capacity policy's. Empty: the capacity's.
  std::optional<drop_policy> forced_drop;

  index size() const { return static_cast<index>(expert.size()); }
  const std::vector<float>& ranking() const { return priority.empty() ? weight : priority; }
};

// A routing direction validates itself against E, says how many candidates a token proposes (the k
// of the capacity formula), and selects candidates from fp32 logits on a backend through an
// overload `select(backend, direction, logits, limits, candidates)` found by ADL. A direction whose
// selection needs the capacity (non-causal expert choice) says so with selects_with_capacity(); the
// others propose first, and the capacity policy may then read their proposals.
template <class D>
concept routing_policy = policy_struct<D> && requires(const D& d, index experts) {
  d.validate(experts);
  { d.candidates_per_token(experts) } -> std::convertible_to<index>;
};

namespace detail {
// The checks every direction shares: at least one expert, and 1 <= top_k <= E.
inline void check_top_k(index top_k, index num_experts) {
  require(num_experts >= 1, "num_experts", "at least 1 expert", num_experts);
  require(top_k >= 1 && top_k <= num_experts, "top_k",
          "1 <= top_k <= num_experts (" + std::to_string(num_experts) + ")", top_k);
}

// Logits are multiplied by 1 / temperature: a subnormal temperature would make that +Inf (and a zero
// logit NaN), so the reciprocal must be finite too.
inline void check_temperature(float temperature) {
  require(std::isfinite(temperature) && temperature > 0.0f && std::isfinite(1.0f / temperature), "temperature",
          "a finite value > 0 whose reciprocal is finite (at least about 2.94e-39)", temperature);
}

inline void check_score(resonance::score fn) {
  require(fn == resonance::score::softmax || fn == resonance::score::sigmoid || fn == resonance::score::sqrt_softplus ||
              fn == resonance::score::identity,
          "score", "softmax, sigmoid, sqrt_softplus or identity", static_cast<int>(fn));
}

// Whether a direction needs the capacity to select (then the router computes it first).
template <class D>
bool selects_with_capacity(const D& d) {
  if constexpr (requires { d.selects_with_capacity(); }) {
    return d.selects_with_capacity();
  } else {
    return false;
  }
}

// Whether a direction's select() rejects non-finite logits and weights itself (in its own pass over
// each row), so the router need not scan them separately.
template <class D>
inline constexpr bool checks_finite_v = requires {
  requires D::checks_finite;
};
}  // namespace detail

}  // namespace resonance
