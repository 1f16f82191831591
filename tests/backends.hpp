#pragma once

// Shared by the tests that compare backends: every backend of the build, and a bitwise plan diff.

#include <cstring>
#include <string>

#include <resonance/resonance.hpp>

#if RESONANCE_HAS_SIMD
#include <resonance/backend/simd.hpp>
#endif
#if RESONANCE_HAS_TBB
#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/task_arena.h>

#include <resonance/backend/tbb.hpp>
#endif

namespace resonance_test {

// The first field in which two plans differ (every span compared bit for bit), or "".
inline std::string plan_difference(const resonance::routing_plan& a, const resonance::routing_plan& b) {
  const auto same = [](auto x, auto y) {
    return x.size() == y.size() && (x.empty() || std::memcmp(x.data(), y.data(), x.size_bytes()) == 0);
  };
  if (a.num_tokens() != b.num_tokens()) return "num_tokens";
  if (a.num_experts() != b.num_experts()) return "num_experts";
  if (a.capacity() != b.capacity()) return "capacity";
  if (a.num_slots() != b.num_slots()) return "num_slots";
  if (!same(a.expert_offsets(), b.expert_offsets())) return "expert_offsets";
  if (!same(a.expert_counts(), b.expert_counts())) return "expert_counts";
  if (!same(a.expert_demand(), b.expert_demand())) return "expert_demand";
  if (!same(a.slot_token(), b.slot_token())) return "slot_token";
  if (!same(a.slot_weight(), b.slot_weight())) return "slot_weight";
  if (!same(a.token_offsets(), b.token_offsets())) return "token_offsets";
  if (!same(a.token_expert(), b.token_expert())) return "token_expert";
  if (!same(a.token_weight(), b.token_weight())) return "token_weight";
  if (!same(a.token_slot(), b.token_slot())) return "token_slot";
  return {};
}

// Calls f(backend, name) on every backend but serial: simd<>, then tbb<> and tbb<simd<>> inside task
// arenas of 1, 2 and 3 threads. The global limit is raised to 3 so that the 3-thread arena really
// runs 3 threads on a 2-core machine.
template <class F>
void for_each_parallel_backend([[maybe_unused]] F&& f) {
#if RESONANCE_HAS_SIMD
  f(resonance::backend::simd<>{}, std::string("simd<>"));
#endif
#if RESONANCE_HAS_TBB
  const tbb::global_control allow(tbb::global_control::max_allowed_parallelism, 3);
  for (int threads : {1, 2, 3}) {
    tbb::task_arena arena(threads);
    arena.execute([&] {
      f(resonance::backend::tbb<>{}, "tbb<> in an arena of " + std::to_string(threads));
#if RESONANCE_HAS_SIMD
      f(resonance::backend::tbb<resonance::backend::simd<>>{}, "tbb<simd<>> in an arena of " + std::to_string(threads));
#endif
    });
  }
#endif
}

// The same, serial first.
template <class F>
void for_each_backend(F&& f) {
  f(resonance::backend::serial{}, std::string("serial"));
  for_each_parallel_backend(f);
}

}  // namespace resonance_test
