#pragma once

#include "backend.hpp"

namespace resonance::backend {

// The reference backend: one thread, ascending order. Every other backend must produce the same plan.
struct serial {
  static constexpr const char* name = "serial";

  index concurrency() const { return 1; }

  // Calls body(begin, end) on consecutive blocks of at most `grain` indices covering [0, n).
  template <class Body>
  void parallel_for_blocks(index n, index grain, Body&& body) const {
    if (grain <= 0) grain = n > 0 ? n : 1;
    for (index begin = 0; begin < n; begin += grain) body(begin, begin + grain < n ? begin + grain : n);
  }

  friend constexpr bool operator==(const serial&, const serial&) = default;
};

static_assert(execution_backend<serial>);

}  // namespace resonance::backend
