// Routing on the GPU: DeepSeek-style top-8 of 256 experts for 16384 tokens with a capacity factor,
// logits in device memory, the plan made on the GPU by the same stages as on the CPU, then mirrored to
// the host and compared with backend::serial's plan (they are the same plan).
#include <cstdio>
#include <random>
#include <vector>

#include <cuda_runtime.h>

#include <resonance/backend/cuda.cuh>
#include <resonance/resonance.hpp>

namespace rs = resonance;

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: nothing to route on\n");
    return 0;
  }
  const rs::index T = 16384, E = 256;
  std::vector<float> logits(static_cast<std::size_t>(T * E));
  std::mt19937 rng(42);
  std::normal_distribution<float> normal;
  for (float& l : logits) l = normal(rng);

  cudaStream_t stream = nullptr;
  cudaStreamCreate(&stream);
  {
    const rs::backend::cuda gpu{stream};
    auto x = allocate<float>(gpu, T * E);
    copy(gpu, x.data(), logits.data(), T * E);

    const rs::router<rs::affinity::precomputed, rs::routing::token_choice, rs::capacity::factor> r{
        {}, {.top_k = 8, .score = rs::score::sigmoid}, {.factor = 1.0f, .drop = rs::drop_policy::score}};
    const rs::basic_routing_plan<rs::cuda_space> on_gpu =
        r.route(gpu, rs::matrix_view<const float, rs::cuda_space>{x.data(), T, E});
    const rs::routing_plan plan = rs::to_host(gpu, on_gpu);
    const rs::routing_plan reference =
        r.route(rs::backend::serial{}, rs::matrix_view<const float>{logits.data(), T, E});

    bool same = plan.num_slots() == reference.num_slots() && plan.num_assignments() == reference.num_assignments();
    for (rs::index s = 0; same && s < plan.num_slots(); ++s) same = plan.slot_token()[s] == reference.slot_token()[s];
    std::printf("capacity %td per expert, %td of %td assignments kept; the plan %s serial's\n", plan.capacity(),
                plan.num_assignments(), plan.num_demanded(), same ? "equals" : "DIFFERS FROM");
    if (!same) return 1;
  }
  cudaStreamDestroy(stream);
}
