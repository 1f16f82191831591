// One training step of a router inside a user's own C++ loop: forward (route, dispatch, experts,
// combine), losses (task, load balancing, z-loss), backward (through the combine weights and the gate
// into dX, dW, db), and the aux-loss-free bias update. docs/training.md walks through it.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include <resonance/affinity/linear.hpp>
#include <resonance/resonance.hpp>

namespace rs = resonance;
using mat = rs::matrix_view<float>;
using cmat = rs::matrix_view<const float>;

int main() {
  const rs::index T = 512, d = 64, E = 8, k = 2;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  std::vector<float> x(T * d), target(T * d), gate(E * d);
  for (float& v : x) v = normal(rng);
  for (float& v : target) v = 0.1f * normal(rng);
  for (float& v : gate) v = 0.1f * normal(rng);
  // Toy experts: expert e scales its rows by (1 + e/E). A real model runs its FFNs here.
  auto expert_scale = [&](rs::index e) { return 1.0f + static_cast<float>(e) / static_cast<float>(E); };

  rs::balance::bias_state bias(E);  // aux-loss-free balancing: the caller owns the biases
  const rs::balance::bias_update bias_rule{.rate = 1e-3};
  const rs::backend::serial be;

  for (int step = 0; step < 3; ++step) {
    // ---- forward ------------------------------------------------------------------------------
    const rs::router<rs::affinity::linear, rs::routing::token_choice, rs::capacity::factor> router{
        {.weight = {gate.data(), E, d}}, {.top_k = k, .expert_bias = bias.view()}, {.factor = 1.25}};
    const rs::routing_plan plan = router.route(be, cmat{x.data(), T, d});
    const rs::index S = plan.num_slots();
    std::vector<float> buffer(S * d), expert_out(S * d), y(T * d);
    rs::dispatch(be, plan, cmat{x.data(), T, d}, mat{buffer.data(), S, d});
    for (rs::index e = 0; e < E; ++e)
      for (rs::id_type s = plan.expert_offsets()[e]; s < plan.expert_offsets()[e + 1]; ++s)
        for (rs::index c = 0; c < d; ++c) expert_out[s * d + c] = expert_scale(e) * buffer[s * d + c];
    rs::combine(be, plan, cmat{expert_out.data(), S, d}, mat{y.data(), T, d});

    // ---- losses -------------------------------------------------------------------------------
    double task = 0.0;
    std::vector<float> dy(T * d);
    for (rs::index i = 0; i < T * d; ++i) {
      dy[i] = (y[i] - target[i]) / static_cast<float>(T);  // d(0.5·mean‖y − target‖²)/dy
      task += 0.5 * double(y[i] - target[i]) * double(y[i] - target[i]) / double(T);
    }
    std::vector<float> logits(T * E), dl_aux(T * E), dl_z(T * E);
    router.affinity.forward(be, cmat{x.data(), T, d}, mat{logits.data(), T, E});
    const float aux =
        rs::loss::switch_loss(be, cmat{logits.data(), T, E}, {.top_k = k, .coeff = 1e-2}, mat{dl_aux.data(), T, E});
    const float z = rs::loss::z_loss(be, cmat{logits.data(), T, E}, {.coeff = 1e-3}, mat{dl_z.data(), T, E});

    // ---- backward -----------------------------------------------------------------------------
    // Gradient of the task loss w.r.t. each kept assignment's combine weight: <dy_t, expert_out[slot]>
    // (combine's backward; its d_expert_out is not wanted here: the toy experts have no parameters).
    std::vector<float> dweight(plan.num_assignments());
    rs::combine_backward(be, plan, cmat{expert_out.data(), S, d}, cmat{dy.data(), T, d}, mat{},
                         rs::vector_view<float>{dweight.data(), plan.num_assignments()});
    // Through the weights (selection is fixed) to the logits, then add the losses' logit gradients and
    // chain once through the gate: dX (for the layers below), dW and db (for the optimizer).
    std::vector<float> dlogits(T * E), dx(T * d), dgate(E * d);
    rs::routing::weight_backward(be, router.direction, cmat{logits.data(), T, E}, plan,
                                 rs::vector_view<const float>{dweight.data(), plan.num_assignments()},
                                 mat{dlogits.data(), T, E});
    for (rs::index i = 0; i < T * E; ++i) dlogits[i] += dl_aux[i] + dl_z[i];
    router.affinity.backward(be, cmat{x.data(), T, d}, cmat{dlogits.data(), T, E}, mat{dx.data(), T, d},
                             mat{dgate.data(), E, d}, rs::vector_view<float>{});

    // ---- update -------------------------------------------------------------------------------
    for (rs::index i = 0; i < E * d; ++i) gate[i] -= 0.5f * dgate[i];  // plain SGD on the gate
    bias.update(plan, bias_rule);                                      // DeepSeek-V3's sign rule

    const rs::balance::routing_stats st = rs::balance::compute_stats(plan);
    std::printf("step %d: task %.5f  aux %.5f  z %.5f  drop %.1f%%  load CV %.3f  |dW| %.4f\n", step, task,
                static_cast<double>(aux), static_cast<double>(z), 100.0 * st.drop_rate, st.load_cv, [&] {
                  double n = 0.0;
                  for (float v : dgate) n += double(v) * double(v);
                  return std::sqrt(n);
                }());
  }
}
