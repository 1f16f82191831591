#pragma once

// Memory spaces. Data in the library's types is tagged with the space it lives in (matrix_view,
// basic_candidate_set, basic_routing_plan), so that passing device data to host code, or host data to
// a device backend that cannot read it, fails to compile. What a space provides (its owning buffer,
// whether the host may read it) is in space_traits (backend/execution.hpp).

namespace resonance {

// Host memory: what the CPU backends use, and what every view and plan defaults to.
struct host_space {
  static constexpr const char* name = "host";
};

}  // namespace resonance
