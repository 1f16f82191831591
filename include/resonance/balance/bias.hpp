#pragma once

// Auxiliary-loss-free balancing (DeepSeek-V3, arXiv 2412.19437 §2.1.2): a per-expert bias added to the
// selection key only, updated after each (global) step by the sign rule
//
//   b_e <- b_e + rate * sign(mean_load - load_e),      sign(0) = 0,
//
// as Megatron-Core's get_updated_expert_bias. The caller owns the state (bias_state) and plugs it into
// token choice:
//
//   resonance::balance::bias_state bias(E);
//   router<affinity::precomputed, routing::token_choice, capacity::dropless> r{{}, {.top_k = 8}, {}};
//   r.direction.expert_bias = bias.view();          // a view: re-take it if the state is moved
//   routing_plan plan = r.route(logits);
//   bias.update(plan, {.rate = 1e-3});              // or accumulate(plan) per micro-batch, update() per step
//
// Meaning with each score function (token_choice adds the bias to the quantity it ranks, never to the
// weights):
//   * sigmoid / sqrt_softplus: the bias is added to the scores (DeepSeek-V3's form);
//   * softmax, top-k then softmax (the default): the bias is added to the logits (divided by the
//     temperature) before the top-k; the weights are the softmax of the unbiased selected logits. A
//     bias b_e on the logits multiplies expert e's unnormalised probability by exp(b_e) for ranking
//     only, so the rule steers selection exactly as with sigmoid;
//   * softmax, pre_softmax: the bias is added to the probabilities (in [0, 1]) before the top-k, so a
//     useful rate is smaller than for logits (the probabilities of E experts are of order 1/E).
// Megatron rejects an expert bias with softmax; we support it with the meaning above.
//
// Load. By default the load of expert e is its demand, plan.expert_demand()[e]: the (token, expert)
// choices before capacity, which is what the bias changes and what the rule balances (kept counts
// saturate at the capacity and would hide an overloaded expert). load_source::kept uses the kept counts
// instead (identical when dropless). The comparison with the mean is exact for integer counts: the sign
// of mean - load_e is taken as the sign of (sum of loads) - E * load_e, computed in double.
// accumulate and update also take a backend first (accumulate(be, plan)): the plan may then be in any
// memory space the backend can read; its E counts are copied to the host, which holds the state.
//
// Re-centring (bias_update::recentre) subtracts the mean bias after the update. A shared offset on every
// bias changes no selection (every key moves by the same amount), so re-centring does not change the
// routing; it keeps the biases bounded and centred at 0 over a long run, where the plain sign rule lets
// them drift together (pytorch/torchtitan#1506). Off by default, as in DeepSeek-V3 and Megatron.

#include <cmath>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../backend/backend.hpp"
#include "../backend/serial.hpp"
#include "../core/config.hpp"
#include "../core/error.hpp"
#include "../core/view.hpp"
#include "../plan/plan.hpp"

namespace resonance::balance {

// Which per-expert count the bias rule balances.
enum class load_source : unsigned char {
  demand,  // plan.expert_demand(): choices before capacity (default)
  kept,    // plan.expert_counts(): assignments kept in the plan
};

struct bias_update {
  double rate = 1e-3;     // gamma; finite, >= 0 (0 freezes the biases, as DeepSeek-V3's last 500B tokens)
  bool recentre = false;  // subtract the mean bias after each update
  load_source load = load_source::demand;

  void validate() const {
    detail::require(std::isfinite(rate) && rate >= 0.0, "rate", "a finite value >= 0", rate);
    detail::require(load == load_source::demand || load == load_source::kept, "load", "demand or kept",
                    static_cast<int>(load));
  }

  friend constexpr bool operator==(const bias_update&, const bias_update&) = default;
};

// The biases of E experts and the loads accumulated since the last update. Every member function that
// throws leaves the state as it was.
class bias_state {
 public:
  bias_state() = default;
  // E zero biases.
  explicit bias_state(index num_experts) {
    detail::require(num_experts >= 0, "num_experts", "num_experts >= 0", num_experts);
    bias_.assign(static_cast<std::size_t>(num_experts), 0.0f);
    pending_.assign(static_cast<std::size_t>(num_experts), 0.0);
  }
  // Biases given (e.g. restored from a checkpoint); they must be finite.
  explicit bias_state(std::vector<float> initial) {
    for (std::size_t e = 0; e < initial.size(); ++e)
      detail::require(std::isfinite(initial[e]), "initial", "finite biases", "initial[", e, "] = ", initial[e]);
    pending_.assign(initial.size(), 0.0);
    bias_ = std::move(initial);
  }

  index num_experts() const { return static_cast<index>(bias_.size()); }
  std::span<const float> bias() const { return bias_; }
  // For token_choice{.expert_bias = state.view()}: valid until the state is moved or destroyed (updates
  // write in place, so a view taken once follows every update). Empty (no bias) when E == 0.
  vector_view<const float> view() const { return {bias_.empty() ? nullptr : bias_.data(), num_experts()}; }

  // Loads accumulated since the last update, and how many accumulate calls contributed.
  std::span<const double> pending() const { return pending_; }
  index pending_batches() const { return batches_; }
  void clear_pending() {
    pending_.assign(pending_.size(), 0.0);
    batches_ = 0;
  }

  // Adds one micro-batch's loads (demand or kept counts, per opts.load) of a plan in any memory space
  // the backend can read (the E counts are copied to the host, which holds the state).
  template <execution_backend Backend, plan_source Plan>
  void accumulate(const Backend& be, const Plan& plan, const bias_update& opts = {}) {
    opts.validate();
    check_experts(plan.num_experts(), "plan");
    const std::vector<id_type> counts = plan_loads(be, plan, opts.load);
    for (std::size_t e = 0; e < pending_.size(); ++e) pending_[e] += static_cast<double>(counts[e]);
    ++batches_;
  }
  void accumulate(const plan_view<>& plan, const bias_update& opts = {}) { accumulate(backend::serial{}, plan, opts); }

  // Adds loads given directly, e.g. counts already all-reduced over the data-parallel ranks. They must be
  // finite and >= 0.
  void accumulate(std::span<const double> loads) {
    check_experts(static_cast<index>(loads.size()), "loads");
    for (std::size_t e = 0; e < loads.size(); ++e)
      detail::require(std::isfinite(loads[e]) && loads[e] >= 0.0, "loads", "finite values >= 0", "loads[", e,
                      "] = ", loads[e]);
    for (std::size_t e = 0; e < loads.size(); ++e) pending_[e] += loads[e];
    ++batches_;
  }

  // Applies the sign rule to the accumulated loads, then clears them. With nothing accumulated every
  // load equals the mean and no bias moves (a re-centring still applies).
  void update(const bias_update& opts = {}) {
    opts.validate();
    commit(next_biases(pending_, opts));
  }

  // One-shot: the loads of this plan (plus anything accumulated before), then update.
  template <execution_backend Backend, plan_source Plan>
  void update(const Backend& be, const Plan& plan, const bias_update& opts = {}) {
    opts.validate();
    check_experts(plan.num_experts(), "plan");
    const std::vector<id_type> counts = plan_loads(be, plan, opts.load);
    std::vector<double> loads = pending_;
    for (std::size_t e = 0; e < loads.size(); ++e) loads[e] += static_cast<double>(counts[e]);
    commit(next_biases(loads, opts));
  }
  void update(const plan_view<>& plan, const bias_update& opts = {}) { update(backend::serial{}, plan, opts); }

  friend bool operator==(const bias_state&, const bias_state&) = default;

 private:
  void check_experts(index n, std::string_view name) const {
    detail::require(n == num_experts(), name, std::to_string(num_experts()) + " experts (the bias state's size)", n);
  }

  // The plan's per-expert loads (demand or kept counts), copied to the host.
  template <execution_backend Backend, plan_source Plan>
  static std::vector<id_type> plan_loads(const Backend& be, const Plan& source, load_source load) {
    using Space = plan_space_t<Plan>;
    const plan_view<Space> plan = detail::as_plan_view(source);
    static_assert(accessible_from_v<Space, memory_space_t<Backend>>, "the plan must be in memory the backend can read");
    const index E = plan.num_experts();
    std::vector<id_type> counts(static_cast<std::size_t>(E));
    if (E > 0) {
      copy_to_host(be, counts.data(), load == load_source::kept ? plan.expert_counts_ : plan.expert_demand_, E);
      fence(be);
    }
    return counts;
  }

  // The updated biases in double; throws (changing nothing) when one would not be finite in fp32.
  std::vector<double> next_biases(const std::vector<double>& loads, const bias_update& opts) const {
    const std::size_t E = bias_.size();
    double total = 0.0;
    for (double l : loads) total += l;
    std::vector<double> next(E);
    for (std::size_t e = 0; e < E; ++e) {
      const double diff = total - static_cast<double>(E) * loads[e];  // E * (mean - load_e)
      const double s = diff > 0.0 ? 1.0 : (diff < 0.0 ? -1.0 : 0.0);
      next[e] = static_cast<double>(bias_[e]) + opts.rate * s;
    }
    if (opts.recentre && E > 0) {
      double mean = 0.0;
      for (double b : next) mean += b;
      mean /= static_cast<double>(E);
      for (double& b : next) b -= mean;
    }
    for (std::size_t e = 0; e < E; ++e)
      detail::require(std::fabs(next[e]) <= static_cast<double>(std::numeric_limits<float>::max()), "rate",
                      "biases that stay finite in fp32", "bias[", e, "] = ", next[e]);
    return next;
  }

  // Writes in place (views stay valid) and clears the accumulated loads; cannot throw.
  void commit(const std::vector<double>& next) {
    for (std::size_t e = 0; e < next.size(); ++e) bias_[e] = static_cast<float>(next[e]);
    clear_pending();
  }

  std::vector<float> bias_;
  std::vector<double> pending_;
  index batches_ = 0;
};

}  // namespace resonance::balance
