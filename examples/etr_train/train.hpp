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

// What an arm's router may be built from.
struct arm_context {
  rs::matrix_view<const float> gate;  // E x d learned gate weights (linear gates), in the parameter store
  rs::vector_view<const float> bias;  // E aux-loss-free biases, updated in place after each step
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

// One task as the trainer sees it.
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

// The router's part of the backward pass: through the combine weights (selection held fixed), plus the
// balancing losses on the logits, then through the gate into dh (and the gate weights).
template <class Router>
double router_backward(parameters& p, const Router& r, const arm_options& o, const activations& act,
                       const rs::routing_plan& plan, const std::vector<float>& dweight, long samples, rmat& dh) {
  const rs::backend::serial be;
  const long T = act.h.rows(), E = p.shape.experts;
  rmat logits(T, E), dl(T, E), tmp(T, E);
  r.affinity.forward(be, view(act.h), view(logits));
  const rs::matrix_view<const float> cl = view(std::as_const(logits));
  rs::routing::weight_backward(be, r.direction, cl, plan.view(),
                               rs::vector_view<const float>{dweight.data(), static_cast<rs::index>(dweight.size())},
                               view(dl));
  double extra = 0.0;
  if (o.aux > 0.0) {
    extra += static_cast<double>(rs::loss::switch_loss(be, cl, {.top_k = 1, .coeff = o.aux}, view(tmp)));
    dl += tmp;
  }
  if (o.locality > 0.0) {
    // Virtual nodes: a token's node is its sample's half of the batch; experts split contiguously.
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
          rs::loss::locality_loss(be, cl, lo, view(tmp), rs::vector_view<const std::uint8_t>{mine.data(), T}));
      dl += tmp;
    }
  }
  rmat dh_router(T, p.shape.width);
  const rs::matrix_view<const float> cdl = view(std::as_const(dl));
  if constexpr (learned_gate_v<Router>) {
    const rs::matrix_view<float> dgate{p.grad.data() + p.gate.offset, E, p.shape.width};
    r.affinity.backward(be, view(act.h), cdl, view(dh_router), dgate, rs::vector_view<float>{});
  } else {
    r.affinity.backward(be, view(act.h), cdl, view(dh_router));
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

}  // namespace detail

template <class Factory>
arm_result run_arm(const std::string& name, const arm_options& opt, Factory&& make_router, const task_setup& tk) {
  using Router = std::invoke_result_t<Factory&, const arm_context&>;
  using clock = std::chrono::steady_clock;
  const auto started = clock::now();
  const long E = tk.shape.experts;

  parameters p = init_parameters(tk.shape, tk.seed);
  std::mt19937_64 data_rng(tk.seed * 7919 + 17);  // the same batches in every arm
  rs::balance::bias_state bias(E);
  arm_context ctx{p.view(p.gate), bias.view(), E, tk.tokens_per_sample, tk.tau, 0.0};
  {
    std::mt19937_64 peek = data_rng;
    activations first;
    input_forward(p, tk.train_batch(peek), first);
    ctx.locmoe_delta = detail::median_top1_cosine(first.h, E);
  }
  const Router router = make_router(ctx);
  detail::capacity_state<Router> state{};

  arm_result res;
  res.summary.task = tk.name;
  res.summary.arm = name;
  res.summary.steps = tk.steps;
  double loss_sum = 0.0, acc_sum = 0.0, ms_sum = 0.0, ms_total = 0.0;
  double slots_total = 0.0, kept_total = 0.0, tokens_total = 0.0;
  long in_interval = 0;
  load_sum interval_load;
  activations act;
  rmat dy, dh;
  std::vector<float> dweight;
  const std::string label = tk.name + "/" + name;
  for (long step = 1; step <= tk.steps; ++step) {
    const batch b = tk.train_batch(data_rng);
    std::fill(p.grad.begin(), p.grad.end(), 0.0f);
    input_forward(p, b, act);
    const auto t0 = clock::now();
    const rs::routing_plan plan = detail::route(router, act.h, state);
    const double ms = std::chrono::duration<double, std::milli>(clock::now() - t0).count();
    experts_forward(p, plan, act);
    head_forward_backward(p, b, act, &dy);
    experts_backward(p, plan, act, dy, dweight, dh);
    detail::router_backward(p, router, opt, act, plan, dweight, b.samples, dh);
    input_backward(p, b, act, dh);
    adam_step(p, tk.lr);
    if (opt.bias_rate > 0.0) bias.update(plan, {.rate = opt.bias_rate});

    const load_record load = measure_load(plan);
    interval_load.add(load);
    loss_sum += act.loss;
    acc_sum += act.accuracy;
    ms_sum += ms;
    ms_total += ms;
    slots_total += load.slots_per_expert;
    kept_total += load.kept_per_expert;
    tokens_total += static_cast<double>(b.tokens());
    ++in_interval;
    if (step % tk.log_every == 0 || step == tk.steps) {
      step_record r;
      r.step = step;
      r.loss = loss_sum / static_cast<double>(in_interval);
      r.accuracy = acc_sum / static_cast<double>(in_interval);
      r.load = interval_load.mean();
      r.route_ms = ms_sum / static_cast<double>(in_interval);
      r.ch = rs::balance::calinski_harabasz(view(std::as_const(act.h)), plan);
      if (tk.definition2) {
        success_counts sc(tk.shape.classes, E);
        sc.add(plan, b);
        r.success = detail::learned_gate_v<Router> ? sc.matched() : sc.identity();
      }
      if constexpr (std::is_same_v<typename Router::capacity_type, rs::capacity::adaptive>)
        r.capacity_estimate = state.estimate;
      res.log.push_back(r);
      loss_sum = acc_sum = ms_sum = 0.0;
      in_interval = 0;
      interval_load = {};
    }
    if (step % std::max(1L, tk.steps / 100) == 0 || step == tk.steps)
      detail::progress(label, step, tk.steps, res.log.empty() ? act.loss : res.log.back().loss);
  }
  const double steps_d = static_cast<double>(std::max(1L, tk.steps));
  res.summary.route_ms = ms_total / steps_d;
  res.summary.train_slots_per_expert = slots_total / steps_d;
  res.summary.train_kept_per_expert = kept_total / steps_d;
  res.summary.tokens_per_step = tokens_total / steps_d;

  // Held-out evaluation with the final model, routed as in training (a copy of the capacity state, so
  // that evaluation does not advance a scheduler).
  double loss = 0.0, correct = 0.0, samples = 0.0, ch = 0.0;
  load_sum eval_load;
  success_counts sc(tk.shape.classes, E);
  for (const batch& b : tk.eval) {
    detail::capacity_state<Router> eval_state = state;
    input_forward(p, b, act);
    const rs::routing_plan plan = detail::route(router, act.h, eval_state);
    experts_forward(p, plan, act);
    head_forward_backward(p, b, act, nullptr);
    loss += act.loss * static_cast<double>(b.samples);
    correct += act.accuracy * static_cast<double>(b.samples);
    samples += static_cast<double>(b.samples);
    eval_load.add(measure_load(plan));
    ch += rs::balance::calinski_harabasz(view(std::as_const(act.h)), plan);
    if (tk.definition2) sc.add(plan, b);
  }
  const double nb = static_cast<double>(std::max<std::size_t>(1, tk.eval.size()));
  res.summary.loss = loss / std::max(1.0, samples);
  res.summary.accuracy = correct / std::max(1.0, samples);
  res.summary.perplexity = tk.perplexity ? std::exp(res.summary.loss) : 0.0;
  res.summary.load = eval_load.mean();
  res.summary.ch = ch / nb;
  if (tk.definition2) {
    res.summary.success = detail::learned_gate_v<Router> ? sc.matched() : sc.identity();
    res.summary.success_matched = sc.matched();
  }
  res.summary.seconds = std::chrono::duration<double>(clock::now() - started).count();
  return res;
}

}  // namespace etr
