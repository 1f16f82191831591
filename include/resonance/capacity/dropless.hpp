#pragma once

#include "../core/error.hpp"
#include "capacity.hpp"

namespace resonance::capacity {

// Every candidate is kept. `align` rounds each expert's slot count up (grouped-GEMM tiles; vLLM's
// moe_align_block_size and Megatron's pad_routing_map do the same).
struct dropless {
  index align = 1;

  void validate() const { detail::require(align >= 1, "align", "align >= 1", align); }

  capacity_limits limits(index tokens, index experts, index k) const {
    validate();
    detail::check_capacity_shape(tokens, experts, k);
    return {.capacity = -1, .align = align};
  }

  friend constexpr bool operator==(const dropless&, const dropless&) = default;
};

static_assert(capacity_policy<dropless>);

}  // namespace resonance::capacity
