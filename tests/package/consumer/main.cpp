// Built against an installed (or build-tree, or add_subdirectory) resonance: routes a small batch with
// the core, with the Eigen component and on backend::native (the compiled component's row kernels),
// and checks the result against a hand-computed answer.
#include <cstdio>
#include <vector>

#include <resonance/affinity/linear.hpp>
#include <resonance/backend/native.hpp>
#include <resonance/resonance.hpp>

#ifndef RESONANCE_HAS_EIGEN
#error "resonance::eigen must define RESONANCE_HAS_EIGEN"
#endif

namespace rs = resonance;

int main() {
  // 3 tokens, 2 experts: token t prefers expert t % 2.
  std::vector<float> logits = {2.0f, 0.0f, 0.0f, 2.0f, 3.0f, 1.0f};
  rs::router<rs::affinity::precomputed, rs::routing::token_choice, rs::capacity::dropless> r{{}, {.top_k = 1}, {}};
  const rs::routing_plan plan = r.route(rs::matrix_view<const float>{logits.data(), 3, 2});
  const bool core_ok = plan.expert_counts()[0] == 2 && plan.expert_counts()[1] == 1 && plan.slot_token()[0] == 0 &&
                       plan.slot_token()[1] == 2 && plan.slot_token()[2] == 1;

  // The same preference through a linear gate: identity weights on 2-d inputs.
  std::vector<float> w = {1.0f, 0.0f, 0.0f, 1.0f};
  rs::router<rs::affinity::linear, rs::routing::token_choice, rs::capacity::dropless> lr{
      {.weight = {w.data(), 2, 2}}, {.top_k = 1}, {}};
  const rs::routing_plan p2 = lr.route(rs::matrix_view<const float>{logits.data(), 3, 2});
  const bool eigen_ok = p2 == plan;

  // The same route on backend::native, whose kernels come from the installed static library.
  const bool native_ok = r.route(rs::backend::native{}, rs::matrix_view<const float>{logits.data(), 3, 2}) == plan;

  std::printf("resonance %d.%d.%d consumer: core %s, eigen %s, native (%s) %s\n", RESONANCE_VERSION_MAJOR,
              RESONANCE_VERSION_MINOR, RESONANCE_VERSION_PATCH, core_ok ? "ok" : "FAILED", eigen_ok ? "ok" : "FAILED",
              rs::native_isa().c_str(), native_ok ? "ok" : "FAILED");
  return core_ok && eigen_ok && native_ok ? 0 : 1;
}
