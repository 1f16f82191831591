#pragma once

// One arm = one router type. run_arm trains the model of model.hpp from the same seed on the same
// batches for every arm, with the arm's router, losses and capacity, and evaluates it on the held-out
// set. Everything runs on backend::serial with single-thread Eigen, so a seed gives the same numbers.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <resonance/affinity/linear.hpp>
#include <resonance/resonance.hpp>

#include "data.hpp"
#include "metrics.hpp"
#include "model.hpp"

namespace etr {

// What an arm's router may be built from (one router per MoE layer).
struct arm_context {
  rs::matrix_view<const float> gate;  // E x d learned gate weights of this layer (linear gates)
  rs::vector_view<const float> bias;  // E aux-loss-free biases of this layer, updated in place after each step
  long experts = 0;
  long tokens_per_sample = 1;  // s
  float tau = 1.0f;            // softmax temperature for GrAP-cosine affinities
  double locmoe_delta = 0.0;   // δ for LocMoE's capacity bound, measured on the first batch (see run_arm)
};

// The losses and balancing an arm adds to the task loss.
struct arm_options {
  double aux = 0.0;        // Switch load-balancing loss coefficient α
  double locality = 0.0;   // locality loss coefficient μ (virtual nodes: contiguous halves of the batch)
  long nodes = 2;          // virtual nodes for the locality loss; experts split contiguously
  double bias_rate = 0.0;  // DeepSeek-V3 bias update rate (0: no bias balancing)
};

// One task and seed as the trainer sees it.
struct task_setup {
  std::string name;
  model_shape shape;
  long tokens_per_sample = 1;
  std::function<batch(std::mt19937_64&)> train_batch;
  std::vector<batch> eval;
  bool definition2 = false;  // the synthetic task: success rate defined
  bool perplexity = false;
  long steps = 0, log_every = 1;
  double lr = 3e-3;
  float tau = 0.1f;
  std::uint64_t seed = 1;
  bool progress = true;  // a progress bar on stderr (off when runs share the terminal)
};

struct arm_result {
  run_summary summary;
  std::vector<step_record> log;
};

namespace detail {

template <class Router>
inline constexpr bool learned_gate_v = std::is_same_v<typename Router::affinity_type, rs::affinity::linear>;

template <class Router>
using capacity_state = rs::capacity_state_t<typename Router::capacity_type>;

template <class Router>
rs::routing_plan route(const Router& r, const rmat& h, capacity_state<Router>& state) {
  const rs::backend::serial be;
  if constexpr (rs::stateful_capacity_policy<typename Router::capacity_type>)
    return r.route(be, view(h), state);
  else
    return r.route(be, view(h));
}

// The router an arm is evaluated with at C = ∞ (etr-spec §4.6): token choice over the same affinity,
// temperature and bias, every proposal kept. Bidirectional routing keeps its proposal step; expert
// choice becomes the top-k of each token's softmax (the same weight, causal).
template <class Router>
auto unbounded(const Router& r) {
  using direction = typename Router::direction_type;
  rs::routing::token_choice tc;
  if constexpr (std::is_same_v<direction, rs::routing::token_choice>) {
    tc = r.direction;
  } else if constexpr (std::is_same_v<direction, rs::routing::bidirectional>) {
    tc = r.direction.proposal();
  } else {
    static_assert(std::is_same_v<direction, rs::routing::expert_choice>, "a direction without a C = ∞ form");
    tc = {.top_k = r.direction.top_k, .pre_softmax = true, .temperature = r.direction.temperature};
  }
  return rs::router<typename Router::affinity_type, rs::routing::token_choice, rs::capacity::dropless>{
      r.affinity, tc, {}};
}

// Median of the tokens' top-1 GrAP-cosine affinity: LocMoE's δ (the cosine above which a token counts
// as class-discriminative), measured on the first batch instead of taken from the paper's 0.03.
inline double median_top1_cosine(const rmat& h, long experts) {
  const rs::affinity::grap_cosine g{.num_experts = experts};
  rmat l(h.rows(), experts);
  g.forward(rs::backend::serial{}, view(h), view(l));
  std::vector<float> top(static_cast<std::size_t>(h.rows()));
  for (long t = 0; t < h.rows(); ++t) top[sz(t)] = l.row(t).maxCoeff();
  std::nth_element(top.begin(), top.begin() + static_cast<long>(top.size() / 2), top.end());
  return std::abs(static_cast<double>(top[top.size() / 2]));
}

// Layer l's router in the backward pass: through the combine weights (selection held fixed), plus the
// balancing losses, then through the gate into dh (and the gate weights). The losses see the scores the
// router ranks, logits / τ, as Switch's and LocMoE's losses see their routers' probabilities.
template <class Router>
double router_backward(parameters& p, std::size_t l, const Router& r, const arm_options& o, const activations& act,
                       const rs::routing_plan& plan, const std::vector<float>& dweight, long samples, rmat& dh) {
  const rs::backend::serial be;
  const rmat& h = act.layer[l].h;
  const long T = h.rows(), E = p.shape.experts;
  rmat logits(T, E), dl(T, E), tmp(T, E);
  r.affinity.forward(be, view(h), view(logits));
  const rs::matrix_view<const float> cl = view(std::as_const(logits));
  rs::routing::weight_backward(be, r.direction, cl, plan.view(),
                               rs::vector_view<const float>{dweight.data(), static_cast<rs::index>(dweight.size())},
                               view(dl));
  double extra = 0.0;
  if (o.aux > 0.0 || o.locality > 0.0) {
    const float tau = r.direction.temperature;
    const rmat scaled = logits / tau;
    const rs::matrix_view<const float> cs = view(scaled);
    rmat dscaled = rmat::Zero(T, E);
    if (o.aux > 0.0) {
      extra += static_cast<double>(rs::loss::switch_loss(be, cs, {.top_k = 1, .coeff = o.aux}, view(tmp)));
      dscaled += tmp;
    }
    if (o.locality > 0.0) {
      // Virtual nodes: a token's node is its sample's part of the batch; experts split contiguously.
      std::vector<rs::id_type> expert_node(sz(E));
      for (long e = 0; e < E; ++e) expert_node[sz(e)] = static_cast<rs::id_type>(e * o.nodes / E);
      std::vector<std::uint8_t> mine(sz(T));
      const long s = T / samples;
      for (long node = 0; node < o.nodes; ++node) {
        for (long t = 0; t < T; ++t) mine[sz(t)] = static_cast<std::uint8_t>((t / s) * o.nodes / samples == node);
        const rs::loss::locality_options lo{.expert_node = {expert_node.data(), E},
                                            .num_nodes = o.nodes,
                                            .local_node = static_cast<rs::id_type>(node),
                                            .coeff = o.locality / static_cast<double>(o.nodes)};
        extra += static_cast<double>(
            rs::loss::locality_loss(be, cs, lo, view(tmp), rs::vector_view<const std::uint8_t>{mine.data(), T}));
        dscaled += tmp;
      }
    }
    dl += dscaled / tau;
  }
  rmat dh_router(T, p.shape.width);
  const rs::matrix_view<const float> cdl = view(std::as_const(dl));
  if constexpr (learned_gate_v<Router>) {
    const rs::matrix_view<float> dgate{p.grad.data() + p.layers[l].gate.offset, E, p.shape.width};
    r.affinity.backward(be, view(h), cdl, view(dh_router), dgate, rs::vector_view<float>{});
  } else {
    r.affinity.backward(be, view(h), cdl, view(dh_router));
  }
  dh += dh_router;
  return extra;
}

inline void progress(const std::string& label, long step, long steps, double loss) {
  const int width = 30;
  const int filled =
      static_cast<int>(static_cast<double>(width) * static_cast<double>(step) / static_cast<double>(steps));
  std::fprintf(stderr, "\r%-22s [%.*s%*s] %3ld%%  loss %.4f", label.c_str(), filled, "##############################",
               width - filled, "", step * 100 / steps, loss);
  if (step == steps) std::fprintf(stderr, "\n");
  std::fflush(stderr);
}

// The forward pass of every layer with the given routers (and capacity states); the plans are kept.
template <class Router, class State>
void forward_layers(const parameters& p, const std::vector<Router>& routers, std::vector<State>& states,
                    activations& act, std::vector<rs::routing_plan>& plans, double* route_ms = nullptr) {
  using clock = std::chrono::steady_clock;
  plans.resize(routers.size());
  for (std::size_t l = 0; l < routers.size(); ++l) {
    const auto t0 = clock::now();
    plans[l] = route(routers[l], act.layer[l].h, states[l]);
    if (route_ms != nullptr) *route_ms += std::chrono::duration<double, std::milli>(clock::now() - t0).count();
    experts_forward(p, l, plans[l], act);
  }
}

// One training step's gradient into p.grad (zeroed first): every layer forward (the plans are left in
// `plans`), the head, then back through each layer's experts and router; returns the balancing losses'
// value (the task loss is act.loss).
template <class Router, class State>
double step_gradient(parameters& p, const std::vector<Router>& routers, std::vector<State>& states,
                     const arm_options& opt, const batch& b, activations& act, std::vector<rs::routing_plan>& plans,
                     double* route_ms = nullptr) {
  std::fill(p.grad.begin(), p.grad.end(), 0.0f);
  input_forward(p, b, act);
  forward_layers(p, routers, states, act, plans, route_ms);
  rmat dy, dh;
  std::vector<float> dweight;
  head_forward_backward(p, b, act, &dy);
  double extra = 0.0;
  for (std::size_t l = routers.size(); l-- > 0;) {
    experts_backward(p, l, plans[l], act, dy, dweight, dh);
    extra += router_backward(p, l, routers[l], opt, act, plans[l], dweight, b.samples, dh);
    std::swap(dy, dh);  // dL/d(layer l's input) is the gradient of layer l-1's output
  }
  input_backward(p, b, act, dy);
  return extra;
}

// Held-out loss, accuracy and load of the final model under the given routers.
// p is not modified (head_forward_backward writes gradients only when asked for dy).
template <class Router, class State>
eval_record evaluate(parameters& p, const std::vector<Router>& routers, const std::vector<State>& states,
                     const task_setup& tk, long nodes) {
  const long E = tk.shape.experts;
  double loss = 0.0, correct = 0.0, samples = 0.0, ch = 0.0;
  load_sum load;
  std::vector<success_counts> sc(routers.size(), success_counts(tk.shape.classes, E));
  activations act;
  std::vector<rs::routing_plan> plans;
  std::vector<double> layer_capacity(routers.size(), 0.0);
  for (const batch& b : tk.eval) {
    std::vector<State> eval_states = states;  // evaluation does not advance a scheduler
    input_forward(p, b, act);
    forward_layers(p, routers, eval_states, act, plans);
    head_forward_backward(p, b, act, nullptr);
    loss += act.loss * static_cast<double>(b.samples);
    correct += act.accuracy * static_cast<double>(b.samples);
    samples += static_cast<double>(b.samples);
    for (std::size_t l = 0; l < plans.size(); ++l) {
      const load_record lr = measure_load(plans[l], b.samples, nodes);
      load.add(lr);
      layer_capacity[l] += lr.capacity / static_cast<double>(tk.eval.size());
      ch += rs::balance::calinski_harabasz(view(std::as_const(act.layer[l].h)), plans[l]);
      if (tk.definition2) sc[l].add(plans[l], b);
    }
  }
  eval_record r;
  const double n = static_cast<double>(std::max<std::size_t>(1, tk.eval.size() * routers.size()));
  r.loss = loss / std::max(1.0, samples);
  r.accuracy = correct / std::max(1.0, samples);
  r.perplexity = tk.perplexity ? std::exp(r.loss) : 0.0;
  r.load = load.mean();
  for (double& k : r.load.kept) k /= static_cast<double>(routers.size());  // per layer
  r.ch = ch / n;
  r.layer_capacity = layer_capacity;
  if (tk.definition2) {
    r.success = r.success_matched = 0.0;
    for (const success_counts& c : sc) {
      r.success += (learned_gate_v<Router> ? c.matched() : c.identity()) / static_cast<double>(sc.size());
      r.success_matched += c.matched() / static_cast<double>(sc.size());
    }
  }
  return r;
}

}  // namespace detail

template <class Factory>
arm_result run_arm(const std::string& name, const arm_options& opt, Factory&& make_router, const task_setup& tk) {
  using Router = std::invoke_result_t<Factory&, const arm_context&>;
  using State = detail::capacity_state<Router>;
  using clock = std::chrono::steady_clock;
  const auto started = clock::now();
  const long E = tk.shape.experts;
  const std::size_t L = sz(tk.shape.layers);

  parameters p = init_parameters(tk.shape, tk.seed);
  std::mt19937_64 data_rng(tk.seed * 7919 + 17);  // the same batches in every arm
  std::vector<rs::balance::bias_state> bias(L, rs::balance::bias_state(E));
  double delta = 0.0;
  {
    std::mt19937_64 peek = data_rng;
    activations first;
    input_forward(p, tk.train_batch(peek), first);
    delta = detail::median_top1_cosine(first.layer[0].h, E);  // every layer's δ, from the first input
  }
  std::vector<Router> routers;
  for (std::size_t l = 0; l < L; ++l)
    routers.push_back(
        make_router(arm_context{p.view(p.layers[l].gate), bias[l].view(), E, tk.tokens_per_sample, tk.tau, delta}));
  std::vector<State> states(L);

  arm_result res;
  res.summary.task = tk.name;
  res.summary.arm = name;
  res.summary.seed = tk.seed;
  res.summary.layers = tk.shape.layers;
  res.summary.steps = tk.steps;
  double loss_sum = 0.0, acc_sum = 0.0, ms_sum = 0.0, ms_total = 0.0;
  double slots_total = 0.0, kept_total = 0.0, tokens_total = 0.0;
  long in_interval = 0;
  load_sum interval_load;
  activations act;
  std::vector<rs::routing_plan> plans;
  const std::string label = tk.name + "/" + name;
  const double layers_d = static_cast<double>(L);
  for (long step = 1; step <= tk.steps; ++step) {
    const batch b = tk.train_batch(data_rng);
    double ms = 0.0;
    detail::step_gradient(p, routers, states, opt, b, act, plans, &ms);
    adam_step(p, tk.lr);
    if (opt.bias_rate > 0.0)
      for (std::size_t l = 0; l < L; ++l) bias[l].update(plans[l], {.rate = opt.bias_rate});

    std::vector<load_record> loads;
    for (const rs::routing_plan& plan : plans) {
      loads.push_back(measure_load(plan, b.samples, opt.nodes));
      interval_load.add(loads.back());
      slots_total += loads.back().slots_per_expert / layers_d;
      kept_total += loads.back().kept_per_expert / layers_d;
    }
    loss_sum += act.loss;
    acc_sum += act.accuracy;
    ms_sum += ms;
    ms_total += ms;
    tokens_total += static_cast<double>(b.tokens());
    ++in_interval;
    if (step % tk.log_every == 0 || step == tk.steps) {
      step_record r;
      r.step = step;
      r.loss = loss_sum / static_cast<double>(in_interval);
      r.accuracy = acc_sum / static_cast<double>(in_interval);
      r.load = interval_load.mean();
      r.route_ms = ms_sum / static_cast<double>(in_interval);
      r.success = tk.definition2 ? 0.0 : -1.0;
      for (std::size_t l = 0; l < L; ++l) {
        r.ch += rs::balance::calinski_harabasz(view(std::as_const(act.layer[l].h)), plans[l]) / layers_d;
        if (tk.definition2) {
          success_counts sc(tk.shape.classes, E);
          sc.add(plans[l], b);
          r.success += (detail::learned_gate_v<Router> ? sc.matched() : sc.identity()) / layers_d;
        }
        if constexpr (std::is_same_v<typename Router::capacity_type, rs::capacity::adaptive>)
          r.capacity_estimate.push_back(states[l].estimate);
        r.layer_capacity.push_back(loads[l].capacity);
      }
      res.log.push_back(r);
      loss_sum = acc_sum = ms_sum = 0.0;
      in_interval = 0;
      interval_load = {};
    }
    if (tk.progress && (step % std::max(1L, tk.steps / 100) == 0 || step == tk.steps))
      detail::progress(label, step, tk.steps, res.log.empty() ? act.loss : res.log.back().loss);
  }
  const double steps_d = static_cast<double>(std::max(1L, tk.steps));
  res.summary.route_ms = ms_total / steps_d;
  res.summary.train_slots_per_expert = slots_total / steps_d;
  res.summary.train_kept_per_expert = kept_total / steps_d;
  res.summary.tokens_per_step = tokens_total / steps_d;

  // Held-out evaluation with the final model: routed as in training (a copy of each layer's capacity
  // state), and at C = ∞.
  res.summary.trained = detail::evaluate(p, routers, states, tk, opt.nodes);
  using Unbounded = decltype(detail::unbounded(routers[0]));
  std::vector<Unbounded> free_routers;
  for (const Router& r : routers) free_routers.push_back(detail::unbounded(r));
  std::vector<detail::capacity_state<Unbounded>> free_states(L);
  res.summary.unbounded = detail::evaluate(p, free_routers, free_states, tk, opt.nodes);
  res.summary.seconds = std::chrono::duration<double>(clock::now() - started).count();
  return res;
}

}  // namespace etr
