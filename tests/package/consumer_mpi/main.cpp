// Built against an installed (or build-tree) resonance with the mpi component: one rank (a singleton
// MPI_Init) dispatches a small batch to itself and combines identity experts, which must give
// resonance::combine's y of the same plan.
#include <cstdio>
#include <cstring>
#include <vector>

#include <mpi.h>

#include <resonance/dist/mpi.hpp>
#include <resonance/resonance.hpp>

#ifndef RESONANCE_HAS_MPI
#error "resonance::mpi must define RESONANCE_HAS_MPI"
#endif

namespace rs = resonance;

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  bool ok = false;
  {
    // 3 tokens, 2 experts, top-2: every token goes to both experts.
    std::vector<float> logits = {2.0f, 0.0f, 0.0f, 2.0f, 3.0f, 1.0f};
    rs::router<rs::affinity::precomputed, rs::routing::token_choice, rs::capacity::dropless> r{{}, {.top_k = 2}, {}};
    const rs::routing_plan plan = r.route(rs::matrix_view<const float>{logits.data(), 3, 2});
    std::vector<float> x = {1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f}, y(6), y_ref(6), buffer(12);
    rs::dispatch(rs::backend::serial{}, plan, rs::matrix_view<const float>{x.data(), 3, 2},
                 rs::matrix_view<float>{buffer.data(), 6, 2});
    rs::combine(rs::backend::serial{}, plan, rs::matrix_view<const float>{buffer.data(), 6, 2},
                rs::matrix_view<float>{y_ref.data(), 3, 2});

    rs::dist::mpi_exchange ex(MPI_COMM_SELF);
    const auto placement = rs::dist::expert_placement::contiguous(2, 1);
    const auto d = ex.dispatch(plan, placement, rs::matrix_view<const float>{x.data(), 3, 2});
    ex.combine(d, d.expert_in(), rs::matrix_view<float>{y.data(), 3, 2});
    ok = d.receive().num_slots() == 6 && std::memcmp(y.data(), y_ref.data(), y.size() * sizeof(float)) == 0;
  }
  MPI_Finalize();
  std::printf("resonance %d.%d.%d mpi consumer: %s\n", RESONANCE_VERSION_MAJOR, RESONANCE_VERSION_MINOR,
              RESONANCE_VERSION_PATCH, ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
