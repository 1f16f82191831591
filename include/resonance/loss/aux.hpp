#pragma once

// Switch / GShard load-balancing loss as Megatron-Core computes it for logging and training
// (compute_routing_scores_for_aux_loss + switch_load_balancing_loss_func, coefficient 1):
//   s   = softmax over all E, or sigmoid / sqrt_softplus divided by their per-token sum (+1e-20);
//   f_e = count_e / (T·k), counts of a plain top-k over s (no bias, no groups);
//   P_e = (1/T) Σ_t s_te;      loss = E · Σ_e f_e · P_e.
// Forward only here; gradients and the other losses arrive with the training support.

#include <vector>

#include "../affinity/affinity.hpp"
#include "../backend/backend.hpp"
#include "../core/error.hpp"
#include "../core/topk.hpp"
#include "../core/view.hpp"
#include "../score/score.hpp"

namespace resonance::loss {

template <execution_backend Backend>
double switch_aux_loss(const Backend& be, matrix_view<const float> logits, resonance::score fn, index top_k) {
  detail::check_matrix(logits, "logits");
  const index T = logits.rows, E = logits.cols;
  detail::require(E >= 1, "logits", "at least 1 column (expert)", E);
  detail::require(top_k >= 1 && top_k <= E, "top_k", "1 <= top_k <= num_experts (" + std::to_string(E) + ")", top_k);
  detail::check_finite(logits, "logits");
  if (T == 0) return 0.0;
  const index block = 1024;
  const index nblocks = (T + block - 1) / block;
  // Per-block partial sums, reduced in block order: deterministic for any backend.
  std::vector<double> prob_sum(static_cast<std::size_t>(nblocks * E), 0.0);
  std::vector<id_type> counts(static_cast<std::size_t>(nblocks * E), 0);
  be.parallel_for_blocks(nblocks, 1, [&](index b_begin, index b_end) {
    std::vector<float> s(static_cast<std::size_t>(E)), vals(static_cast<std::size_t>(top_k));
    std::vector<id_type> ids(static_cast<std::size_t>(top_k));
    for (index b = b_begin; b < b_end; ++b) {
      double* ps = prob_sum.data() + b * E;
      id_type* cnt = counts.data() + b * E;
      for (index t = b * block; t < (b + 1) * block && t < T; ++t) {
        detail::score_row(fn, logits.row(t), s.data(), E, 1.0f);
        if (fn != resonance::score::softmax) {
          float sum = 0.0f;
          for (index e = 0; e < E; ++e) sum += s[static_cast<std::size_t>(e)];
          for (index e = 0; e < E; ++e) s[static_cast<std::size_t>(e)] /= sum + 1e-20f;
        }
        detail::topk_row(
            E, top_k, [&](index e) { return s[static_cast<std::size_t>(e)]; }, vals.data(), ids.data());
        for (index j = 0; j < top_k; ++j) ++cnt[ids[static_cast<std::size_t>(j)]];
        for (index e = 0; e < E; ++e) ps[e] += s[static_cast<std::size_t>(e)];
      }
    }
  });
  double loss = 0.0;
  for (index e = 0; e < E; ++e) {
    double p = 0.0, c = 0.0;
    for (index b = 0; b < nblocks; ++b) {
      p += prob_sum[static_cast<std::size_t>(b * E + e)];
      c += counts[static_cast<std::size_t>(b * E + e)];
    }
    loss += (c / (static_cast<double>(T) * static_cast<double>(top_k))) * (p / static_cast<double>(T));
  }
  return static_cast<double>(E) * loss;
}

// Router z-loss (ST-MoE): mean over tokens of logsumexp(logits_t)^2.
template <execution_backend Backend>
double z_loss(const Backend& be, matrix_view<const float> logits) {
  detail::check_matrix(logits, "logits");
  detail::require(logits.cols >= 1, "logits", "at least 1 column (expert)", logits.cols);
  detail::check_finite(logits, "logits");
  const index T = logits.rows;
  if (T == 0) return 0.0;
  std::vector<double> sq(static_cast<std::size_t>(T));
  be.parallel_for_blocks(T, 4096, [&](index begin, index end) {
    for (index t = begin; t < end; ++t) {
      const double l = detail::logsumexp_row(logits.row(t), logits.cols);
      sq[static_cast<std::size_t>(t)] = l * l;
    }
  });
  double sum = 0.0;
  for (double v : sq) sum += v;
  return sum / static_cast<double>(T);
}

}  // namespace resonance::loss
