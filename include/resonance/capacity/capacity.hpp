#pragma once

// The capacity axis: how many slots each expert has, and which candidates an overfull expert keeps.

#include <cmath>
#include <concepts>
#include <cstdint>
#include <string>
#include <string_view>

#include "../core/concepts.hpp"
#include "../core/config.hpp"
#include "../core/error.hpp"
#include "../core/view.hpp"

namespace resonance {

// Which candidates an expert keeps when more tokens chose it than it has slots.
enum class drop_policy : unsigned char {
  score,     // the highest priority (the combine weight for token choice); ties to the lower token id
  position,  // the earliest tokens (position priority: a token's fate depends only on earlier tokens)
  random,    // a seeded, reproducible random priority (DeepSpeed's random token selection)
};

// What a capacity policy decides for one routing call.
struct capacity_limits {
  index capacity = -1;  // slots per expert before alignment; -1 means unlimited (dropless)
  drop_policy drop = drop_policy::score;
  bool pad_to_capacity = false;  // give every expert exactly `capacity` slots (padding: token -1, weight 0)
  index align = 1;               // round every expert's slot count up to a multiple of this
  std::uint64_t seed = 0;        // for drop_policy::random

  friend constexpr bool operator==(const capacity_limits&, const capacity_limits&) = default;
};

template <class Space>
struct candidate_view;

// What a capacity scheduler may look at: the batch's shape, its fp32 router logits (the affinities,
// for GrAP-cosine routing), when the direction proposes before the capacity is known (token choice,
// bidirectional, Sinkhorn) its proposals — bias and group limits change who proposes where — and
// whether the logits are cosines.
struct capacity_context {
  index num_tokens = 0;
  index num_experts = 0;
  index top_k = 1;        // candidates per token of the direction (nominal for expert choice)
  index hidden_size = 0;  // columns of the router input (d for hidden states, E for precomputed logits)
  matrix_view<const float> logits = {};
  const candidate_view<host_space>* candidates = nullptr;  // the direction's proposals, or null (expert choice)
  // cosine = logit · cosine_scale; 0 when the logits are not cosines. The router sets it from its
  // affinity (resonance::cosine_scale_of); a context built by hand states it, or is taken as not cosine.
  double cosine_scale = 0.0;
};

namespace detail {
// The shape a capacity policy's public functions accept: each checks it itself, so a direct call
// with a bad shape throws instead of dividing by zero or converting a non-finite value (UB).
inline void check_capacity_shape(index tokens, index experts, index k) {
  require(tokens >= 0, "num_tokens", "num_tokens >= 0", tokens);
  require(experts >= 1, "num_experts", "num_experts >= 1", experts);
  require(k >= 1, "top_k", "top_k >= 1", k);
}
inline void check_capacity_shape(const capacity_context& ctx) {
  check_capacity_shape(ctx.num_tokens, ctx.num_experts, ctx.top_k);
  require(ctx.hidden_size >= 0, "hidden_size", "hidden_size >= 0", ctx.hidden_size);
  require(std::isfinite(ctx.cosine_scale) && ctx.cosine_scale >= 0.0, "cosine_scale",
          "a finite value >= 0 (0: the logits are not cosines)", ctx.cosine_scale);
}
// A scheduler that reads the logits as cosines refuses logits that are not: it would size C from
// numbers its formulas do not apply to. `argument` names what needs them, `fix` how to avoid it.
inline void require_cosine_logits(const capacity_context& ctx, std::string_view argument, std::string_view fix) {
  if (ctx.cosine_scale > 0.0) return;
  fail(argument,
       std::string("the router's logits to be cosines (affinity::cosine, affinity::grap_cosine, or "
                   "affinity::precomputed{.cosines = true}); ") +
           std::string(fix),
       "an affinity whose logits are not cosines");
}
}  // namespace detail

// A stateless capacity policy maps (tokens, experts, candidates per token) to limits.
template <class C>
concept stateless_capacity_policy = policy_struct<C> && requires(const C& c, index tokens, index experts, index k) {
  { c.limits(tokens, experts, k) } -> std::same_as<capacity_limits>;
  c.validate();
};

// A stateful scheduler keeps its state in an object the caller owns (C::state_type): limits() reads
// and advances it, so a routing call stays a pure function of its inputs and that state.
template <class C>
concept stateful_capacity_policy = policy_struct<C> && std::regular<typename C::state_type> &&
    requires(const C& c, const capacity_context& ctx, typename C::state_type& state) {
  { c.limits(ctx, state) } -> std::same_as<capacity_limits>;
  c.validate();
};

template <class C>
concept capacity_policy = stateless_capacity_policy<C> || stateful_capacity_policy<C>;

namespace detail {
struct no_capacity_state {
  friend constexpr bool operator==(const no_capacity_state&, const no_capacity_state&) = default;
};
template <class C>
struct capacity_state {
  using type = no_capacity_state;
};
template <class C>
requires requires { typename C::state_type; }
struct capacity_state<C> {
  using type = typename C::state_type;
};
}  // namespace detail

// The state a scheduler keeps between steps (an empty tag for stateless policies).
template <class C>
using capacity_state_t = typename detail::capacity_state<C>::type;

// Whether a capacity policy reads capacity_context::logits. Stateless policies see only the shape; a
// scheduler is assumed to read them unless it declares `static constexpr bool reads_logits = false`.
// The router skips materialising the T×E logits when nothing reads them (see router.hpp).
template <class C>
inline constexpr bool reads_logits_v = [] {
  if constexpr (stateless_capacity_policy<C>) {
    return false;
  } else if constexpr (requires { requires !C::reads_logits; }) {
    return false;
  } else {
    return true;
  }
}();

}  // namespace resonance
