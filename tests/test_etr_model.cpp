// The hand-written forward/backward of examples/etr_train (model.hpp, and train.hpp's training step with
// two MoE layers and the balancing losses) against central finite differences of the step's loss, with
// the selection held fixed: every perturbed loss re-routes (so the combine weights come from the
// perturbed logits exactly as in a training step) and an entry is skipped when the perturbation changes
// a layer's assignments or a ReLU's sign.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/affinity/linear.hpp>
#include <resonance/resonance.hpp>

#include "../examples/etr_train/train.hpp"

namespace {

namespace rs = resonance;
using etr::rmat;

etr::model_shape tiny_shape() {
  etr::model_shape s;
  s.in = 8;
  s.width = 8;
  s.hidden = 6;
  s.experts = 4;
  s.classes = 4;
  s.layers = 2;
  return s;
}

etr::batch tiny_batch(std::mt19937_64& rng, long samples, long seq, long width, long classes) {
  etr::batch b;
  b.samples = samples;
  b.tokens_per_sample = seq;
  std::normal_distribution<float> nd(0.0f, 1.0f);
  b.x.resize(etr::sz(samples * seq * width));
  for (float& v : b.x) v = nd(rng);
  std::uniform_int_distribution<std::int32_t> pick(0, static_cast<std::int32_t>(classes - 1));
  for (long i = 0; i < samples; ++i) b.label.push_back(pick(rng));
  return b;
}

// O(1) parameters everywhere (the trainer's init has a near-zero gate, which would hide gate errors).
void randomize(etr::parameters& p, std::mt19937_64& rng) {
  std::normal_distribution<float> nd(0.0f, 0.5f);
  for (float& v : p.value) v = nd(rng);
}

// What must not change between the base point and a perturbed one for the loss to be smooth there:
// every layer's assignments and ReLU signs.
struct snapshot {
  std::vector<rs::id_type> offsets, expert, slot;
  std::vector<bool> relu;
  bool operator==(const snapshot&) const = default;
};

// One training step (train.hpp's step_gradient: every layer, the head, the routers' backward with the
// arm's balancing losses) at the current parameters: the gradient in p.grad, the loss returned.
template <class Router>
double step(etr::parameters& p, const std::vector<Router>& routers, const etr::arm_options& opt, const etr::batch& b,
            snapshot& snap) {
  std::vector<etr::detail::capacity_state<Router>> states(routers.size());
  etr::activations act;
  std::vector<rs::routing_plan> plans;
  const double extra = etr::detail::step_gradient(p, routers, states, opt, b, act, plans);
  snap = {};
  for (std::size_t l = 0; l < plans.size(); ++l) {
    const auto off = plans[l].token_offsets();
    const auto ex = plans[l].token_expert();
    const auto sl = plans[l].token_slot();
    snap.offsets.insert(snap.offsets.end(), off.begin(), off.end());
    snap.expert.insert(snap.expert.end(), ex.begin(), ex.end());
    snap.slot.insert(snap.slot.end(), sl.begin(), sl.end());
    const rmat& z1 = act.layer[l].z1;
    for (long i = 0; i < z1.size(); ++i) snap.relu.push_back(z1.data()[i] > 0.0f);
  }
  return act.loss + extra;
}

// Tokens kept (assignments, summed over the layers) by the routers at the current parameters.
template <class Router>
long kept_assignments(etr::parameters& p, const std::vector<Router>& routers, const etr::batch& b) {
  snapshot snap;
  step(p, routers, etr::arm_options{}, b, snap);
  const std::size_t per_layer = etr::sz(b.tokens() + 1);  // each layer's token offsets: T + 1 entries
  long kept = 0;
  for (std::size_t l = 0; l < routers.size(); ++l) kept += static_cast<long>(snap.offsets[(l + 1) * per_layer - 1]);
  return kept;
}

struct named_tensor {
  std::string name;
  etr::tensor t;
};

std::vector<named_tensor> tensors_of(const etr::parameters& p, bool gate) {
  std::vector<named_tensor> out{{"proj", p.proj}};
  for (std::size_t l = 0; l < p.layers.size(); ++l) {
    const etr::layer_parameters& lp = p.layers[l];
    const std::string layer = "layer " + std::to_string(l) + " ";
    if (gate) out.push_back({layer + "gate", lp.gate});
    for (std::size_t e = 0; e < lp.w1.size(); ++e) {
      const std::string k = std::to_string(e);
      out.push_back({layer + "w1[" + k + "]", lp.w1[e]});
      out.push_back({layer + "b1[" + k + "]", lp.b1[e]});
      out.push_back({layer + "w2[" + k + "]", lp.w2[e]});
      out.push_back({layer + "b2[" + k + "]", lp.b2[e]});
    }
  }
  out.push_back({"head_w", p.head_w});
  out.push_back({"head_b", p.head_b});
  return out;
}

// Every entry of every tensor (the model is tiny, so sampling would only weaken the check).
template <class Router>
void check_gradients(etr::parameters& p, const std::vector<Router>& routers, const etr::arm_options& opt,
                     const etr::batch& b, bool gate) {
  const double step_size = 3e-3, rel = 2e-2, abs_tol = 3e-5;
  snapshot base, moved;
  step(p, routers, opt, b, base);
  const std::vector<float> grad = p.grad;
  std::size_t total = 0, checked_total = 0, nonzero = 0;
  for (const named_tensor& nt : tensors_of(p, gate)) {
    std::size_t checked = 0;
    for (std::size_t i = nt.t.offset; i < nt.t.offset + nt.t.size(); ++i) {
      const float keep = p.value[i];
      p.value[i] = keep + static_cast<float>(step_size);
      const double up = step(p, routers, opt, b, moved);
      const bool up_ok = moved == base;
      p.value[i] = keep - static_cast<float>(step_size);
      const double down = step(p, routers, opt, b, moved);
      const bool down_ok = moved == base;
      p.value[i] = keep;
      if (!up_ok || !down_ok) continue;  // the selection or a ReLU flipped: not differentiable across
      ++checked;
      const double fd = (up - down) / (2.0 * step_size);
      const double an = static_cast<double>(grad[i]);
      if (std::abs(an) > 10.0 * abs_tol) ++nonzero;
      INFO(nt.name, " entry ", i - nt.t.offset, ": analytic ", an, " finite difference ", fd);
      CHECK(std::abs(an - fd) <= rel * std::max(std::abs(an), std::abs(fd)) + abs_tol);
    }
    INFO(nt.name, ": ", checked, " of ", nt.t.size(), " entries checked");
    CHECK(checked * 4 >= nt.t.size() * 3);  // not vacuous: most entries stay on one side of every kink
    total += nt.t.size();
    checked_total += checked;
  }
  INFO(checked_total, " of ", total, " entries checked, ", nonzero, " clearly nonzero");
  CHECK(checked_total * 10 >= total * 9);
  CHECK(nonzero * 2 >= checked_total);  // the gradient is not trivially zero almost everywhere
}

}  // namespace

TEST_CASE("test_etr_model: two layers of linear gates, top-1 pre-softmax with a capacity factor, aux loss") {
  std::mt19937_64 rng(11);
  const etr::model_shape s = tiny_shape();
  etr::parameters p = etr::init_parameters(s, 3);
  randomize(p, rng);
  const etr::batch b = tiny_batch(rng, 3, 4, s.in, s.classes);
  // Factor 1 with 12 tokens on 4 experts: capacity 3, so some tokens are dropped (by position).
  using router = rs::router<rs::affinity::linear, rs::routing::token_choice, rs::capacity::factor>;
  std::vector<router> routers;
  for (const etr::layer_parameters& l : p.layers)
    routers.push_back(router{{.weight = p.view(l.gate)},
                             {.top_k = 1, .pre_softmax = true},
                             {.factor = 1.0, .drop = rs::drop_policy::position, .pad_to_capacity = true}});
  CHECK(kept_assignments(p, routers, b) < 2 * b.tokens());  // the dropped tokens' path is exercised too
  check_gradients(p, routers, etr::arm_options{.aux = 0.1}, b, true);
}

TEST_CASE("test_etr_model: two layers of grap_cosine at τ 0.5, top-2 dropless, aux and locality losses") {
  std::mt19937_64 rng(12);
  const etr::model_shape s = tiny_shape();
  etr::parameters p = etr::init_parameters(s, 4);
  randomize(p, rng);
  const etr::batch b = tiny_batch(rng, 4, 4, s.in, s.classes);
  // The losses see logits / τ (train.hpp): a missing 1/τ in their gradient fails here.
  using router = rs::router<rs::affinity::grap_cosine, rs::routing::token_choice, rs::capacity::dropless>;
  const std::vector<router> routers(
      2, router{{.num_experts = s.experts}, {.top_k = 2, .pre_softmax = true, .temperature = 0.5f}, {}});
  CHECK(kept_assignments(p, routers, b) == 2 * 2 * b.tokens());
  check_gradients(p, routers, etr::arm_options{.aux = 0.1, .locality = 0.1}, b, false);
}
