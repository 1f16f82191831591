#pragma once

// LocMoE / ETR locality loss (LocMoE arXiv 2401.13920 Eq. 7; research/etr-spec.md §2.3, §4.3), with its
// analytic gradient w.r.t. the logits. Conventions (logits, dlogits, valid mask, errors, determinism)
// are those of loss/aux.hpp.
//
//   p_t    = softmax(l_t) over all E experts (the routing distribution of token t);
//   D_c[e] = (1/N) Σ_{valid t} p_te          (soft assignment distribution of this rank's tokens);
//   D_l[e] = 1/n_local if expert_node[e] == local_node, else 0   (the fully localised distribution).
//
// The literal KL(D_c || D_l) is +∞ as soon as any mass sits off the local node, so one of two finite
// forms is used:
//   smoothed (default): L = coeff · KL(D_c || D̃_l) = coeff · Σ_e D_c[e] · log(D_c[e] / D̃_l[e]),
//                       D̃_l = (1 − eps) · D_l + eps / E,  0 < eps < 1 (default 0.01);
//                       dL/dD_c[e] = coeff · (log(D_c[e] / D̃_l[e]) + 1).
//   reversed:           L = coeff · KL(D_l || D_c) = coeff · Σ_{e local} D_l[e] · log(D_l[e] / D_c[e])
//                       (what torch.nn.functional.kl_div(log D_c, D_l) computes);
//                       dL/dD_c[e] = −coeff · D_l[e] / D_c[e] for local e, 0 elsewhere.
// Then dL/dl_te = (1/N) · p_te · (g_e − Σ_j g_j · p_tj) with g = dL/dD_c.
//
// Why smoothed is the default: it keeps the paper's direction KL(D_c || ·) (the current distribution
// is the first argument, as in LocMoE Eq. 7), it is bounded (≤ log(E/eps)) with bounded gradients, and
// its minimum is exactly D_c = D̃_l, which still leaves eps/E mass on every remote expert, so it does
// not fight the load-balancing loss to the point of starving remote experts. The reversed form is
// unbounded as D_c[e] → 0 for a local expert and ignores how mass is spread off the local node.

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "aux.hpp"

namespace resonance::loss {

enum class locality_form : unsigned char {
  smoothed,  // KL(D_c || (1 − eps)·D_l + eps/E)   (default)
  reversed,  // KL(D_l || D_c)
};

struct locality_options {
  vector_view<const id_type> expert_node;  // E entries: the node of each expert, in [0, num_nodes)
  index num_nodes = 1;
  id_type local_node = 0;  // the node of this rank; must hold at least one expert
  locality_form form = locality_form::smoothed;
  double eps = 0.01;  // smoothing of the smoothed form, 0 < eps < 1
  double coeff = 1.0;
  friend constexpr bool operator==(const locality_options&, const locality_options&) = default;
};

// Locality loss value; dL/dlogits written into dlogits (see the header comment).
template <execution_backend B, input_scalar T>
T locality_loss(const B& be, matrix_view<const T> logits, const locality_options& opts, matrix_view<T> dlogits,
                vector_view<const std::uint8_t> valid = {}) {
  const bool want_grad = detail::loss_check_common(logits, dlogits, valid);
  const index E = logits.cols;
  detail::require(opts.num_nodes >= 1, "num_nodes", "num_nodes >= 1", opts.num_nodes);
  detail::require(opts.expert_node.size == E, "expert_node", "one node id per expert (" + std::to_string(E) + ")",
                  opts.expert_node.size);
  detail::require(opts.expert_node.data != nullptr, "expert_node", "non-null data");
  index n_local = 0;
  for (index e = 0; e < E; ++e) {
    const id_type nd = opts.expert_node[e];
    detail::require(nd >= 0 && nd < opts.num_nodes, "expert_node",
                    "node ids in [0, num_nodes = " + std::to_string(opts.num_nodes) + ")", nd, " at expert ", e);
    n_local += nd == opts.local_node ? 1 : 0;
  }
  detail::require(opts.local_node >= 0 && opts.local_node < opts.num_nodes, "local_node",
                  "a node id in [0, num_nodes = " + std::to_string(opts.num_nodes) + ")", opts.local_node);
  detail::require(n_local >= 1, "local_node", "a node that holds at least one expert", opts.local_node);
  detail::require(opts.form == locality_form::reversed || (opts.eps > 0.0 && opts.eps < 1.0), "eps", "0 < eps < 1",
                  opts.eps);
  detail::check_finite(logits, "logits");

  const detail::loss_segment_stats st =
      detail::loss_segments(be, logits, resonance::score::softmax, 0, valid, detail::loss_block);
  std::vector<double> dc;
  std::vector<std::int64_t> unused;
  std::int64_t n = 0;
  detail::loss_reduce(st, E, dc, unused, n);
  if (n == 0) {
    if (want_grad) detail::loss_zero(dlogits);
    return T(0);
  }
  const double N = static_cast<double>(n), Ed = static_cast<double>(E), dl_local = 1.0 / static_cast<double>(n_local);
  for (double& v : dc) v /= N;
  double loss = 0.0;
  std::vector<double> gs(static_cast<std::size_t>(E), 0.0);
  for (index e = 0; e < E; ++e) {
    const std::size_t i = static_cast<std::size_t>(e);
    const double dl = opts.expert_node[e] == opts.local_node ? dl_local : 0.0;
    const double c = std::max(dc[i], DBL_MIN);  // D_c > 0 for finite logits unless exp underflows
    if (opts.form == locality_form::smoothed) {
      const double target = (1.0 - opts.eps) * dl + opts.eps / Ed;
      const double lr = std::log(c / target);
      if (dc[i] > 0.0) loss += dc[i] * lr;
      gs[i] = opts.coeff * (lr + 1.0) / N;
    } else if (dl > 0.0) {
      loss += dl * std::log(dl / c);
      gs[i] = -opts.coeff * dl / c / N;
    }
  }
  if (want_grad) detail::loss_write_grad(be, logits, resonance::score::softmax, gs, logits.rows, valid, dlogits);
  return static_cast<T>(opts.coeff * loss);
}

}  // namespace resonance::loss
