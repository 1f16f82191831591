#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "../core/error.hpp"
#include "capacity.hpp"

namespace resonance::capacity {

// Capacity factor, as Megatron-Core's get_capacity(num_tokens * topk, ...):
//   C = max(ceil((T * k / E) * factor), min_capacity)
// computed in double, so C matches Megatron's Python arithmetic exactly (factor is a double for that
// reason: 1.1f would differ from Python's 1.1 at some T*k/E).
struct factor {
  double factor = 1.0;  // must be finite and > 0; use dropless for no limit
  drop_policy drop = drop_policy::score;
  index min_capacity = 0;        // lower clamp on C (DeepSpeed's min_capacity; Megatron's optional one)
  bool pad_to_capacity = false;  // every expert gets exactly C slots
  index align = 1;               // slot counts rounded up to a multiple (after padding)
  std::uint64_t seed = 0;        // for drop_policy::random

  void validate() const {
    detail::require(std::isfinite(factor) && factor > 0.0, "capacity factor",
                    "a finite value > 0 (use capacity::dropless for no limit)", factor);
    detail::require(min_capacity >= 0, "min_capacity", "min_capacity >= 0", min_capacity);
    detail::require(align >= 1, "align", "align >= 1", align);
    detail::require(drop == drop_policy::score || drop == drop_policy::position || drop == drop_policy::random, "drop",
                    "one of score, position, random", static_cast<int>(drop));
  }

  index capacity(index tokens, index experts, index k) const {
    validate();
    detail::check_capacity_shape(tokens, experts, k);
    const double c =
        std::ceil((static_cast<double>(tokens) * static_cast<double>(k) / static_cast<double>(experts)) * factor);
    detail::require(c <= static_cast<double>(std::numeric_limits<id_type>::max()), "capacity factor",
                    "a capacity that fits in 32 bits", c);
    const index cap = static_cast<index>(c);
    return cap < min_capacity ? min_capacity : cap;
  }

  capacity_limits limits(index tokens, index experts, index k) const {
    return {.capacity = capacity(tokens, experts, k),
            .drop = drop,
            .pad_to_capacity = pad_to_capacity,
            .align = align,
            .seed = seed};
  }

  // The data member `factor` hides the injected class name, hence the qualified name.
  friend constexpr bool operator==(const capacity::factor&, const capacity::factor&) = default;
};

static_assert(capacity_policy<factor>);

}  // namespace resonance::capacity
