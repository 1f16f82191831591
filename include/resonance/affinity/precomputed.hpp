#pragma once

#include "affinity.hpp"

namespace resonance::affinity {

// The caller's gate logits (T×E) are routed as given; a double input is converted to fp32 first.
struct precomputed {
  index experts_for(index cols) const { return cols; }
  void validate(index cols) const { detail::require(cols >= 1, "logits", "at least 1 column (expert)", cols); }

  template <execution_backend Backend, input_scalar T>
  matrix_view<const float> compute(const Backend& be, matrix_view<const T> x, std::vector<float>& storage) const {
    return detail::as_float(be, x, storage);
  }

  friend constexpr bool operator==(const precomputed&, const precomputed&) = default;
};

static_assert(affinity_policy<precomputed>);

}  // namespace resonance::affinity
