#pragma once

// The capacity axis: how many slots each expert has, and which candidates an overfull expert keeps.

#include <concepts>
#include <cstdint>

#include "../core/concepts.hpp"
#include "../core/config.hpp"

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

// A capacity policy maps (tokens, experts, candidates per token) to limits, and validates itself.
template <class C>
concept capacity_policy = policy_struct<C> && requires(const C& c, index tokens, index experts, index k) {
  { c.limits(tokens, experts, k) } -> std::same_as<capacity_limits>;
  c.validate();
};

}  // namespace resonance
