#pragma once

// Sinkhorn routing (S-BASE, Clark et al. 2022, arXiv 2202.01169), as Megatron-Core's
// sinkhorn_load_balancing computes it in training (moe_utils.sinkhorn, router.py):
//   cost = exp(L);  d0 = 1_T, d1 = 1_E, eps = 1e-8
//   repeat:  d0_t = (1/T) / (Σ_e d1_e·cost_te + eps)
//            d1_e = (1/E) / (Σ_t d0_t·cost_te + eps)
//            error = mean_e |d1_e − d1_old_e|
//   while error > tolerance;  P = diag(d0)·cost·diag(d1), doubly stochastic up to the tolerance (rows
//   sum to 1/T, columns to 1/E).
//   selection: the top_k experts of each row of P (ties to the lowest expert id);
//   weights:   from the plain scores, gathered at the selected experts, never renormalised:
//              sigmoid(logit) when top_k == 1, softmax over all E when top_k > 1.
// Differences from Megatron, all deliberate: the loop is bounded by max_iterations (Megatron's runs
// until convergence, which may never come); the iteration runs in double (Megatron: fp32); cost is
// exp(l_te − max_e l_te), which cannot overflow. That row scaling is absorbed by d0: scaling row t of
// the cost by c_t scales d0_t by 1/c_t and leaves d1, the error sequence, P and the selection unchanged
// (up to eps, negligible next to a row sum >= d1 of the row's best expert).
// Megatron's evaluation mode does a plain top-k of the scores instead: that is token_choice with
// score = sigmoid (k = 1) or score = softmax and pre_softmax = true (k > 1). Megatron asserts that no
// auxiliary loss is used with Sinkhorn; the balance comes from the selection itself.
// Every reduction runs in a fixed order (row sums in expert order, column sums over fixed chunks of
// tokens, then over the chunks in order), so P and the plan are the same on every backend.

#include <cmath>
#include <limits>
#include <string>

#include "../backend/backend.hpp"
#include "../capacity/capacity.hpp"
#include "../core/error.hpp"
#include "../core/topk.hpp"
#include "../core/view.hpp"
#include "../score/score.hpp"
#include "routing.hpp"

namespace resonance::routing {

struct sinkhorn {
  index top_k = 1;
  index max_iterations = 100;  // an upper bound on the Sinkhorn iterations (Megatron has none)
  // Stop once mean_e |d1_e − d1_old_e| <= tolerance (Megatron's 1e-4). eps breaks the scale symmetry
  // of (d0, d1), so d1 drifts by about eps·d1 per iteration: a tolerance near eps (below ~1e-6) may
  // never be met, and then max_iterations ends the loop.
  double tolerance = 1e-4;

  void validate(index num_experts) const {
    using detail::require;
    detail::check_top_k(top_k, num_experts);
    require(max_iterations >= 1, "max_iterations", "max_iterations >= 1", max_iterations);
    require(std::isfinite(tolerance) && tolerance > 0.0, "tolerance", "a finite value > 0", tolerance);
  }

  index candidates_per_token(index) const { return top_k; }

  friend constexpr bool operator==(const sinkhorn&, const sinkhorn&) = default;
};

static_assert(routing_policy<sinkhorn>);

namespace kernel {

// One token's selection from its row of P and its logits: top_k (expert, weight) pairs ordered by
// expert id. `scores` holds E floats (used when k > 1), `vals` k doubles. Host/device.
RESONANCE_INLINE_FUNCTION void sinkhorn_row(const double* p_row, const float* logits, index num_experts, index k,
                                            id_type* out_expert, float* out_weight, float* scores, double* vals) {
  detail::topk_row(
      num_experts, k, [p_row](index e) { return p_row[e]; }, vals, out_expert);
  if (k == 1) {
    out_weight[0] = detail::sigmoid(logits[out_expert[0]]);
    return;
  }
  detail::softmax_row(logits, scores, num_experts, 1.0f);
  for (index j = 0; j < k; ++j) out_weight[j] = scores[out_expert[j]];
  detail::sort_by_id(out_expert, out_weight, k);
}

}  // namespace kernel
}  // namespace resonance::routing

namespace resonance::detail {

inline constexpr double sinkhorn_eps = 1e-8;  // Megatron's
inline constexpr index sinkhorn_chunk = 256;  // tokens per partial column sum (fixed: the sum order)

// Megatron's iteration on finite logits (preconditions checked by the caller). `p` (T×E) holds the
// cost during the iteration and P at the end; both views are in memory the backend can read (p may be
// the backend's own buffer). Returns the iterations run (0 for an empty matrix).
//
// Written once on the execution primitives: every step is a for_each whose functor owns its outputs
// (a token's row, a chunk's partial sums, an expert's scale), and every sum runs in a fixed order that
// no backend choice touches: a row in expert order, a column per fixed chunk of sinkhorn_chunk tokens
// in token order, then over the chunks in order. So P is the same, bit for bit, on every backend.
template <execution_backend Backend, class LogitsSpace, class PSpace>
index sinkhorn_run(const Backend& be, matrix_view<const float, LogitsSpace> logits, matrix_view<double, PSpace> p,
                   index max_iterations, double tolerance) {
  static_assert(
      accessible_from_v<LogitsSpace, memory_space_t<Backend>> && accessible_from_v<PSpace, memory_space_t<Backend>>,
      "the logits and P must be in memory the backend can read");
  const index T = logits.rows, E = logits.cols;
  if (T == 0 || E == 0) return 0;
  const index chunks = (T + sinkhorn_chunk - 1) / sinkhorn_chunk;
  const double inv_t = 1.0 / static_cast<double>(T);
  const double inv_e = 1.0 / static_cast<double>(E);

  // The scaling vectors, the chunks' partial column sums and the convergence error: one allocation,
  // made before the loop.
  auto work = allocate<double>(be, T + 2 * E + chunks * E + 1);
  double* const d0 = work.data();
  double* const d1 = d0 + T;
  double* const d1_old = d1 + E;
  double* const partial = d1_old + E;
  double* const error_out = partial + chunks * E;

  // cost_te = exp(l_te − max_e l_te), in (0, 1] with a 1 in every row; d0 = 1_T, d1 = 1_E (d1_old is
  // written by each iteration before it is read).
  // exp_portable, not std::exp: the host's libm and a device's exp differ in the last bit.
  for_each(
      be, T,
      RESONANCE_LAMBDA(index t) {
        const float* l = logits.row(t);
        double m = static_cast<double>(l[0]);
        for (index e = 1; e < E; ++e) m = static_cast<double>(l[e]) > m ? static_cast<double>(l[e]) : m;
        double* c = p.row(t);
        for (index e = 0; e < E; ++e) c[e] = exp_portable(static_cast<double>(l[e]) - m);
        d0[t] = 1.0;
      },
      index{256});
  for_each(
      be, E, RESONANCE_LAMBDA(index e) { d1[e] = 1.0; });

  double error = std::numeric_limits<double>::infinity();
  index it = 0;
  while (it < max_iterations && error > tolerance) {
    // d0_t = (1/T) / (Σ_e d1_e·cost_te + eps), the sum in expert order.
    for_each(
        be, T,
        RESONANCE_LAMBDA(index t) {
          const double* c = p.row(t);
          double s = 0.0;
          for (index e = 0; e < E; ++e) s += d1[e] * c[e];
          d0[t] = inv_t / (s + sinkhorn_eps);
        },
        index{256});
    // Σ_t d0_t·cost_te per fixed chunk of tokens (in token order): the chunks, not the backend's
    // blocks, fix the summation order.
    for_each(
        be, chunks,
        RESONANCE_LAMBDA(index ch) {
          double* acc = partial + ch * E;
          for (index e = 0; e < E; ++e) acc[e] = 0.0;
          const index t_end = (ch + 1) * sinkhorn_chunk < T ? (ch + 1) * sinkhorn_chunk : T;
          for (index t = ch * sinkhorn_chunk; t < t_end; ++t) {
            const double* c = p.row(t);
            const double w = d0[t];
            for (index e = 0; e < E; ++e) acc[e] += w * c[e];
          }
        },
        index{1});
    // d1_e = (1/E) / (Σ_chunks partial + eps), the chunks in order; d1_old keeps the previous d1.
    for_each(
        be, E,
        RESONANCE_LAMBDA(index e) {
          double s = 0.0;
          for (index ch = 0; ch < chunks; ++ch) s += partial[ch * E + e];
          d1_old[e] = d1[e];
          d1[e] = inv_e / (s + sinkhorn_eps);
        },
        index{64});
    // error = mean_e |d1_e − d1_old_e|, summed in expert order by one item, then read on the host: one
    // small device-to-host copy per iteration, which decides whether the loop goes on (on a device,
    // one wait per iteration).
    for_each(
        be, 1, RESONANCE_LAMBDA(index) {
          double diff = 0.0;
          for (index e = 0; e < E; ++e) diff += d1[e] > d1_old[e] ? d1[e] - d1_old[e] : d1_old[e] - d1[e];
          error_out[0] = diff / static_cast<double>(E);
        });
    copy_to_host(be, &error, error_out, 1);
    fence(be);
    ++it;
  }

  // P = d1 * cost * d0, in Megatron's order.
  for_each(
      be, T,
      RESONANCE_LAMBDA(index t) {
        double* c = p.row(t);
        for (index e = 0; e < E; ++e) c[e] = d1[e] * c[e] * d0[t];
      },
      index{256});
  return it;
}

}  // namespace resonance::detail

namespace resonance::routing {

// The Sinkhorn-normalised matrix P of fp32 logits (T×E), written to `out` (T×E, double; nothing is
// written when an argument is rejected). Returns the iterations used: at most max_iterations, fewer
// when mean|Δd1| <= tolerance first; 0 for an empty matrix. After convergence rows sum to 1/T within
// about E·tolerance / min_e d1_e relative, and columns to 1/E up to eps.
template <execution_backend Backend>
index sinkhorn_normalize(const Backend& be, matrix_view<const float> logits, matrix_view<double> out,
                         index max_iterations, double tolerance) {
  using detail::require;
  detail::check_matrix(logits, "logits");
  detail::check_matrix(out, "out", logits.rows, logits.cols);
  require(max_iterations >= 1, "max_iterations", "max_iterations >= 1", max_iterations);
  require(std::isfinite(tolerance) && tolerance > 0.0, "tolerance", "a finite value > 0", tolerance);
  for (index t = 0; t < logits.rows; ++t)
    for (index e = 0; e < logits.cols; ++e)
      require(std::isfinite(logits(t, e)), "logits", "finite values", logits(t, e), " at row ", t, ", column ", e);
  return detail::sinkhorn_run(be, logits, out, max_iterations, tolerance);
}

// The driver: P in a T×E double buffer of the backend, then every token's top-k of its row and
// plain-score weights, one token per group (its scratch: k doubles, then E floats when k > 1). The
// limits are left as the capacity policy set them (drop by score ranks by these weights, as Megatron's
// apply_router_token_dropping ranks its probs).
template <execution_backend Backend, class LogitsSpace, class Space>
void select(const Backend& be, const sinkhorn& p, matrix_view<const float, LogitsSpace> logits, const capacity_limits&,
            basic_candidate_set<Space>& out) {
  using space = memory_space_t<Backend>;
  static_assert(accessible_from_v<LogitsSpace, space> && accessible_from_v<Space, space>,
                "the logits and the candidates must be in memory the backend can read");
  const index T = logits.rows, E = logits.cols, k = p.top_k;
  auto pm = allocate<double>(be, T * E);
  const double* const prob = pm.data();
  detail::sinkhorn_run(be, logits, matrix_view<double, space>{pm.data(), T, E}, p.max_iterations, p.tolerance);
  detail::fixed_candidates(be, out, T, E, k);
  id_type* const expert = out.expert.data();
  float* const weight = out.weight.data();
  id_type* const offsets = out.offsets.data();
  const index scratch_bytes =
      k * static_cast<index>(sizeof(double)) + (k > 1 ? E : 0) * static_cast<index>(sizeof(float));
  // No row fails (the router checked the logits before selecting): the functor returns nothing, so a
  // device does not wait for a status.
  using group = typename Backend::group;
  for_each_group(
      be, T, scratch_bytes, RESONANCE_LAMBDA(const group& g, index t) {
        double* vals = static_cast<double*>(g.scratch());
        float* scores = reinterpret_cast<float*>(vals + k);
        kernel::sinkhorn_row(prob + t * E, logits.row(t), E, k, expert + t * k, weight + t * k, scores, vals);
        offsets[t + 1] = static_cast<id_type>((t + 1) * k);
        if (t == 0) offsets[0] = 0;
      });
}

}  // namespace resonance::routing
