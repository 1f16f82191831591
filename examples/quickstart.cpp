// The README's quick start: top-2 token choice with a capacity factor on the caller's gate logits.
#include <cstdio>
#include <random>
#include <vector>

#include <resonance/resonance.hpp>

namespace rs = resonance;

int main() {
  const rs::index T = 8, E = 4;  // tokens, experts
  std::vector<float> logits(T * E);
  std::mt19937 rng(42);
  std::normal_distribution<float> normal;
  for (float& l : logits) l = normal(rng);

  rs::router<rs::affinity::precomputed, rs::routing::token_choice, rs::capacity::factor> r{
      {}, {.top_k = 2, .score = rs::score::softmax}, {.factor = 1.25f, .drop = rs::drop_policy::score}};
  rs::routing_plan plan = r.route(rs::matrix_view<const float>{logits.data(), T, E});

  std::printf("capacity %td, kept %td of %td assignments\n", plan.capacity(), plan.num_assignments(),
              plan.num_demanded());
  for (rs::index e = 0; e < E; ++e) {
    std::printf("expert %td:", e);
    for (rs::id_type s = plan.expert_offsets()[e]; s < plan.expert_offsets()[e + 1]; ++s)
      std::printf(" token %d (w %.3f)", plan.slot_token()[s], plan.slot_weight()[s]);
    std::printf("\n");
  }
}
