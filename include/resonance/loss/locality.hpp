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
  detail::check_loss_backend<B>();
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
  const std::uint8_t* const mask = detail::loss_mask(valid);
  const detail::loss_chunking ch = detail::loss_chunks_whole(logits.rows);
  const detail::loss_sums<B> sums = detail::loss_forward(be, logits, resonance::score::softmax, 0, mask, ch);

  // D_c, the value and dL/ds per expert on one item, in expert order.
  auto out = allocate<double>(be, E + 1);  // dL/ds (E), then the value
  double* const gs = out.data();
  const double* const P = sums.P;
  const std::int64_t* const Nv = sums.N;
  const id_type* const node = opts.expert_node.data;  // host memory, as the logits
  const id_type local = opts.local_node;
  const bool smoothed = opts.form == locality_form::smoothed;
  const double coeff = opts.coeff, eps = opts.eps, Ed = static_cast<double>(E),
               dl_local = 1.0 / static_cast<double>(n_local);
  for_each(be, 1, [=](index) {
    const std::int64_t n = Nv[0];
    if (n == 0) {
      for (index e = 0; e <= E; ++e) gs[e] = 0.0;
      return;
    }
    const double N = static_cast<double>(n);
    double loss = 0.0;
    for (index e = 0; e < E; ++e) {
      const double dc = P[e] / N;
      const double dl = node[e] == local ? dl_local : 0.0;
      const double c = dc > DBL_MIN ? dc : DBL_MIN;  // D_c > 0 for finite logits unless exp underflows
      gs[e] = 0.0;
      if (smoothed) {
        const double target = (1.0 - eps) * dl + eps / Ed;
        const double lr = ::log(c / target);
        if (dc > 0.0) loss += dc * lr;
        gs[e] = coeff * (lr + 1.0) / N;
      } else if (dl > 0.0) {
        loss += dl * ::log(dl / c);
        gs[e] = -coeff * dl / c / N;
      }
    }
    gs[E] = coeff * loss;
  });
  if (want_grad) detail::loss_write_grad(be, logits, resonance::score::softmax, gs, ch.seg_len, mask, dlogits);
  double value = 0.0;
  copy_to_host(be, &value, gs + E, 1);
  fence(be);
  return static_cast<T>(value);
}

}  // namespace resonance::loss
