// The hand-written forward/backward of examples/etr_train (model.hpp, and train.hpp's router backward)
// against central finite differences of the task loss, with the selection held fixed: every perturbed
// loss re-routes (so the combine weights come from the perturbed logits exactly as in a training step)
// and an entry is skipped when the perturbation changes the plan's assignments or a ReLU's sign.

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

// What must not change between the base point and a perturbed one for the loss to be smooth there.
struct snapshot {
  std::vector<rs::id_type> offsets, expert, slot;
  std::vector<bool> relu;
  bool operator==(const snapshot&) const = default;
};

template <class Router>
double forward_loss(etr::parameters& p, const Router& r, const etr::batch& b, snapshot& snap) {
  etr::activations act;
  etr::input_forward(p, b, act);
  etr::detail::capacity_state<Router> state{};
  const rs::routing_plan plan = etr::detail::route(r, act.h, state);
  etr::experts_forward(p, plan, act);
  etr::head_forward_backward(p, b, act, nullptr);
  const auto off = plan.token_offsets();
  const auto ex = plan.token_expert();
  const auto sl = plan.token_slot();
  snap.offsets.assign(off.begin(), off.end());
  snap.expert.assign(ex.begin(), ex.end());
  snap.slot.assign(sl.begin(), sl.end());
  snap.relu.clear();
  for (long i = 0; i < act.z1.size(); ++i) snap.relu.push_back(act.z1.data()[i] > 0.0f);
  return act.loss;
}

// Tokens kept (assignments) by the router at the current parameters.
template <class Router>
long kept_assignments(etr::parameters& p, const Router& r, const etr::batch& b) {
  snapshot snap;
  forward_loss(p, r, b, snap);
  return static_cast<long>(snap.offsets.back());
}

// One training step's gradient (train.hpp's composition, task loss only) into p.grad.
template <class Router>
void analytic_gradient(etr::parameters& p, const Router& r, const etr::batch& b) {
  std::fill(p.grad.begin(), p.grad.end(), 0.0f);
  etr::activations act;
  rmat dy, dh;
  std::vector<float> dweight;
  etr::input_forward(p, b, act);
  etr::detail::capacity_state<Router> state{};
  const rs::routing_plan plan = etr::detail::route(r, act.h, state);
  etr::experts_forward(p, plan, act);
  etr::head_forward_backward(p, b, act, &dy);
  etr::experts_backward(p, plan, act, dy, dweight, dh);
  etr::detail::router_backward(p, r, etr::arm_options{}, act, plan, dweight, b.samples, dh);
  etr::input_backward(p, b, act, dh);
}

struct named_tensor {
  std::string name;
  etr::tensor t;
};

std::vector<named_tensor> tensors_of(const etr::parameters& p, bool gate) {
  std::vector<named_tensor> out{{"proj", p.proj}};
  if (gate) out.push_back({"gate", p.gate});
  for (std::size_t e = 0; e < p.w1.size(); ++e) {
    const std::string k = std::to_string(e);
    out.push_back({"w1[" + k + "]", p.w1[e]});
    out.push_back({"b1[" + k + "]", p.b1[e]});
    out.push_back({"w2[" + k + "]", p.w2[e]});
    out.push_back({"b2[" + k + "]", p.b2[e]});
  }
  out.push_back({"head_w", p.head_w});
  out.push_back({"head_b", p.head_b});
  return out;
}

// Every entry of every tensor (the model is tiny, so sampling would only weaken the check).
template <class Router>
void check_gradients(etr::parameters& p, const Router& r, const etr::batch& b, bool gate) {
  const double step = 3e-3, rel = 2e-2, abs_tol = 3e-5;
  analytic_gradient(p, r, b);
  const std::vector<float> grad = p.grad;
  snapshot base, moved;
  forward_loss(p, r, b, base);
  std::size_t total = 0, checked_total = 0, nonzero = 0;
  for (const named_tensor& nt : tensors_of(p, gate)) {
    std::size_t checked = 0;
    for (std::size_t i = nt.t.offset; i < nt.t.offset + nt.t.size(); ++i) {
      const float keep = p.value[i];
      p.value[i] = keep + static_cast<float>(step);
      const double up = forward_loss(p, r, b, moved);
      const bool up_ok = moved == base;
      p.value[i] = keep - static_cast<float>(step);
      const double down = forward_loss(p, r, b, moved);
      const bool down_ok = moved == base;
      p.value[i] = keep;
      if (!up_ok || !down_ok) continue;  // the selection or a ReLU flipped: not differentiable across
      ++checked;
      const double fd = (up - down) / (2.0 * step);
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

TEST_CASE("test_etr_model: linear gate, top-1 pre-softmax with a capacity factor matches finite differences") {
  std::mt19937_64 rng(11);
  const etr::model_shape s = tiny_shape();
  etr::parameters p = etr::init_parameters(s, 3);
  randomize(p, rng);
  const etr::batch b = tiny_batch(rng, 3, 4, s.in, s.classes);
  // Factor 1 with 12 tokens on 4 experts: capacity 3, so some tokens are dropped (by position).
  const rs::router<rs::affinity::linear, rs::routing::token_choice, rs::capacity::factor> r{
      {.weight = p.view(p.gate)},
      {.top_k = 1, .pre_softmax = true},
      {.factor = 1.0, .drop = rs::drop_policy::position, .pad_to_capacity = true}};
  CHECK(kept_assignments(p, r, b) < b.tokens());  // the dropped tokens' path is exercised too
  check_gradients(p, r, b, true);
}

TEST_CASE("test_etr_model: grap_cosine, top-2 pre-softmax dropless matches finite differences") {
  std::mt19937_64 rng(12);
  const etr::model_shape s = tiny_shape();
  etr::parameters p = etr::init_parameters(s, 4);
  randomize(p, rng);
  const etr::batch b = tiny_batch(rng, 3, 4, s.in, s.classes);
  const rs::router<rs::affinity::grap_cosine, rs::routing::token_choice, rs::capacity::dropless> r{
      {.num_experts = s.experts}, {.top_k = 2, .pre_softmax = true}, {}};
  CHECK(kept_assignments(p, r, b) == 2 * b.tokens());
  check_gradients(p, r, b, false);
}
