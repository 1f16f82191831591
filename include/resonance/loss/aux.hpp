#pragma once

// Load-balancing losses and the router z-loss, each with its analytic gradient w.r.t. the logits.
//
// Common conventions (also used by loss/locality.hpp):
//  * logits: T×E, float or double (T = tokens, E = experts); finite.
//  * dlogits: T×E, OVERWRITTEN with dL/dlogits. Its shape is checked before anything is written; a
//    default-constructed view ({nullptr, 0, 0}) means "value only, no gradient".
//  * valid: optional padding mask of T bytes (empty = every token counts). A token with valid[t] == 0
//    contributes nothing and gets a zero gradient row; N, the token count of every mean, is the number
//    of valid tokens. With N == 0 the loss is 0 and the gradient is zero.
//  * Every precondition failure throws resonance::error naming the argument, before any write.
//  * Values and gradients are computed in double. Reductions run over fixed blocks of 1024 tokens (or
//    over sequences), whose partials are reduced in block order: every backend gives the same bits.
//  * The aux-loss scores s (Megatron-Core compute_routing_scores_for_aux_loss) are the softmax over all
//    E experts, or, for sigmoid / sqrt_softplus (and identity), the elementwise scores divided by their
//    per-token sum + 1e-20. The top-k counts c_e are those of a plain top-k (no bias, no groups, ties to
//    the lowest index) over the fp32 scores, the same values the router selects on. Counts are not
//    differentiable: the gradient flows through P only, as in Megatron-Core.
//
// 1. switch_loss (Switch Transformer / GShard, Megatron-Core switch_load_balancing_loss_func):
//      f_e = c_e / (N·k),  P_e = (1/N) Σ_t s_te,  L = coeff · E · Σ_e f_e · P_e.
//    dL/ds_te = coeff · E · f_e / N.
// 2. seq_aux_loss (DeepSeek-V3 complementary sequence-wise loss, Megatron-Core seq_aux_loss): the T
//    tokens are S = T / seq_len sequences of seq_len CONSECUTIVE tokens (batch-major layout; Megatron's
//    [seq, batch] layout must be transposed first). Per sequence j, with its own valid count N_j, counts
//    c_je and P_je: L_j = coeff · E · Σ_e c_je/(N_j·k) · P_je, and L = mean of L_j over the S' sequences
//    that hold at least one valid token. (s' = s / Σ_j s_j as DeepSeek-V3; for softmax s' = s.)
// 3. global_aux_loss (Qwen global-batch balancing, Megatron-Core global_aux_loss): the caller owns a
//    global_aux_accumulator. Each call first ADDS this micro-batch's counts and valid-token count to it,
//    then uses the ACCUMULATED frequencies F_e = C_e / (N_acc · k) (all micro-batches since the last
//    reset(), this one included) with this micro-batch's P_e:  L = coeff · E · Σ_e F_e · P_e,
//    dL/ds_te = coeff · E · F_e / N. Call reset() at each global-batch (optimizer step) boundary. The
//    accumulator is left untouched when the call throws.
// 4. z_loss (ST-MoE router z-loss, Megatron-Core z_loss_func):
//      L = coeff · (1/N) Σ_t logsumexp(l_t)²,   dL/dl_te = coeff · (2/N) · lse_t · softmax(l_t)_e.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "../affinity/affinity.hpp"
#include "../backend/backend.hpp"
#include "../core/concepts.hpp"
#include "../core/error.hpp"
#include "../core/topk.hpp"
#include "../core/view.hpp"
#include "../score/score.hpp"

namespace resonance::loss {

// Switch/GShard loss options (also those of the global-batch loss).
struct switch_options {
  index top_k = 1;
  resonance::score score = resonance::score::softmax;
  double coeff = 1.0;
  friend constexpr bool operator==(const switch_options&, const switch_options&) = default;
};

// Sequence-level (DeepSeek-V3) loss options; seq_len must divide the number of tokens.
struct seq_aux_options {
  index top_k = 1;
  resonance::score score = resonance::score::softmax;
  double coeff = 1.0;
  index seq_len = 1;
  friend constexpr bool operator==(const seq_aux_options&, const seq_aux_options&) = default;
};

struct z_loss_options {
  double coeff = 1.0;
  friend constexpr bool operator==(const z_loss_options&, const z_loss_options&) = default;
};

// Counts of the global-batch loss, owned by the caller. counts is sized to E (and top_k recorded) on
// first use; later calls must use the same E and top_k. reset() starts a new global batch.
struct global_aux_accumulator {
  std::vector<std::int64_t> counts;  // Σ over micro-batches of the top-k counts per expert
  std::int64_t tokens = 0;           // Σ over micro-batches of the valid tokens
  index top_k = 0;                   // 0 until first use
  void reset() {
    counts.clear();
    tokens = 0;
    top_k = 0;
  }
};

}  // namespace resonance::loss

namespace resonance::detail {

inline constexpr index loss_block = 1024;

// Checks shared by every loss: logits, dlogits (unless the empty "no gradient" view) and the mask.
template <class T>
bool loss_check_common(matrix_view<const T> logits, matrix_view<T> dlogits, vector_view<const std::uint8_t> valid) {
  check_matrix(logits, "logits");
  require(logits.cols >= 1, "logits", "at least 1 column (expert)", logits.cols);
  const bool want_grad = !(dlogits.data == nullptr && dlogits.rows == 0 && dlogits.cols == 0);
  if (want_grad) check_matrix(dlogits, "dlogits", logits.rows, logits.cols);
  require(valid.empty() || valid.size == logits.rows, "valid",
          "an empty mask or one entry per token (" + std::to_string(logits.rows) + ")", valid.size);
  require(valid.empty() || valid.data != nullptr, "valid", "non-null data for a non-empty mask");
  return want_grad;
}

inline bool loss_token_valid(vector_view<const std::uint8_t> valid, index t) { return valid.empty() || valid[t] != 0; }

// Aux-loss scores of one row in double: softmax over all E, or elementwise normalised by sum + 1e-20.
template <class T>
void loss_scores_row(resonance::score fn, const T* l, double* s, index E) {
  if (fn == resonance::score::softmax) {
    double m = static_cast<double>(l[0]);
    for (index e = 1; e < E; ++e) m = std::max(m, static_cast<double>(l[e]));
    double sum = 0.0;
    for (index e = 0; e < E; ++e) sum += s[e] = std::exp(static_cast<double>(l[e]) - m);
    for (index e = 0; e < E; ++e) s[e] /= sum;
  } else {
    double sum = 0.0, d = 0.0;
    for (index e = 0; e < E; ++e) sum += s[e] = elementwise_score_and_derivative(fn, static_cast<double>(l[e]), d);
    for (index e = 0; e < E; ++e) s[e] /= sum + 1e-20;
  }
}

// dL/dl of one row from gs = dL/ds (s from loss_scores_row of the same row); writes out[0..E).
template <class T>
void loss_scores_backward_row(resonance::score fn, const T* l, const double* s, const double* gs, double* tmp, T* out,
                              index E) {
  if (fn == resonance::score::softmax) {
    double dot = 0.0;
    for (index e = 0; e < E; ++e) dot += gs[e] * s[e];
    for (index e = 0; e < E; ++e) tmp[e] = s[e] * (gs[e] - dot);
  } else {
    // s_e = u_e / Z, Z = Σu + 1e-20: ds_e/du_j = δ_ej / Z − u_e / Z² = (δ_ej − s_e) / Z.
    double sum = 0.0, d = 0.0, dot = 0.0;
    for (index e = 0; e < E; ++e) sum += elementwise_score_and_derivative(fn, static_cast<double>(l[e]), d);
    const double Z = sum + 1e-20;
    for (index e = 0; e < E; ++e) dot += gs[e] * s[e];
    for (index e = 0; e < E; ++e) {
      elementwise_score_and_derivative(fn, static_cast<double>(l[e]), d);
      tmp[e] = (gs[e] - dot) / Z * d;
    }
  }
  for (index e = 0; e < E; ++e) out[e] = static_cast<T>(tmp[e]);
}

// Per-segment sums over valid tokens: psum (nseg×E) of the aux scores, counts (nseg×E) of the fp32 top-k
// (when top_k > 0), nvalid (nseg). Segments are consecutive ranges of seg_len tokens, each summed in
// token order, so the result does not depend on how the backend splits the segments.
struct loss_segment_stats {
  std::vector<double> psum;
  std::vector<std::int64_t> counts;
  std::vector<std::int64_t> nvalid;
};

template <execution_backend B, class T>
loss_segment_stats loss_segments(const B& be, matrix_view<const T> logits, resonance::score fn, index top_k,
                                 vector_view<const std::uint8_t> valid, index seg_len) {
  const index Tn = logits.rows, E = logits.cols;
  const index nseg = Tn == 0 ? 0 : (Tn + seg_len - 1) / seg_len;
  loss_segment_stats st;
  st.psum.assign(static_cast<std::size_t>(nseg * E), 0.0);
  st.counts.assign(static_cast<std::size_t>(nseg * E), 0);
  st.nvalid.assign(static_cast<std::size_t>(nseg), 0);
  detail::host_blocks(be, nseg, 1, [&](index g_begin, index g_end) {
    std::vector<double> s(static_cast<std::size_t>(E));
    std::vector<float> lf(static_cast<std::size_t>(E)), sf(static_cast<std::size_t>(E)),
        vals(static_cast<std::size_t>(std::max<index>(top_k, 1)));
    std::vector<id_type> ids(static_cast<std::size_t>(std::max<index>(top_k, 1)));
    for (index g = g_begin; g < g_end; ++g) {
      double* ps = st.psum.data() + g * E;
      std::int64_t* cnt = st.counts.data() + g * E;
      for (index t = g * seg_len; t < (g + 1) * seg_len && t < Tn; ++t) {
        if (!loss_token_valid(valid, t)) continue;
        ++st.nvalid[static_cast<std::size_t>(g)];
        const T* l = logits.row(t);
        loss_scores_row(fn, l, s.data(), E);
        for (index e = 0; e < E; ++e) ps[e] += s[static_cast<std::size_t>(e)];
        if (top_k > 0) {
          // The counts use the fp32 scores the router selects on (Megatron: plain top-k of the scores).
          for (index e = 0; e < E; ++e) lf[static_cast<std::size_t>(e)] = static_cast<float>(l[e]);
          score_row(fn, lf.data(), sf.data(), E, 1.0f);
          if (fn != resonance::score::softmax) {
            float sum = 0.0f;
            for (index e = 0; e < E; ++e) sum += sf[static_cast<std::size_t>(e)];
            for (index e = 0; e < E; ++e) sf[static_cast<std::size_t>(e)] /= sum + 1e-20f;
          }
          topk_row(
              E, top_k, [&](index e) { return sf[static_cast<std::size_t>(e)]; }, vals.data(), ids.data());
          for (index j = 0; j < top_k; ++j) ++cnt[ids[static_cast<std::size_t>(j)]];
        }
      }
    }
  });
  return st;
}

// Gradient pass: dlogits row t = backward of dL/ds_t = gs[(t / seg_len)·E + e] (zero for masked rows).
template <execution_backend B, class T>
void loss_write_grad(const B& be, matrix_view<const T> logits, resonance::score fn, const std::vector<double>& gs,
                     index seg_len, vector_view<const std::uint8_t> valid, matrix_view<T> dlogits) {
  const index Tn = logits.rows, E = logits.cols;
  detail::host_blocks(be, Tn, loss_block, [&](index begin, index end) {
    std::vector<double> s(static_cast<std::size_t>(E)), tmp(static_cast<std::size_t>(E));
    for (index t = begin; t < end; ++t) {
      T* out = dlogits.row(t);
      if (!loss_token_valid(valid, t)) {
        for (index e = 0; e < E; ++e) out[e] = T(0);
        continue;
      }
      loss_scores_row(fn, logits.row(t), s.data(), E);
      loss_scores_backward_row(fn, logits.row(t), s.data(), gs.data() + (t / seg_len) * E, tmp.data(), out, E);
    }
  });
}

template <class T>
void loss_zero(matrix_view<T> d) {
  for (index r = 0; r < d.rows; ++r)
    for (index c = 0; c < d.cols; ++c) d(r, c) = T(0);
}

inline void loss_check_top_k(index top_k, index E) {
  require(top_k >= 1 && top_k <= E, "top_k", "1 <= top_k <= num_experts (" + std::to_string(E) + ")", top_k);
}

// Block partials reduced in block order: totals (E) of psum and counts, and the valid count.
inline void loss_reduce(const loss_segment_stats& st, index E, std::vector<double>& p, std::vector<std::int64_t>& c,
                        std::int64_t& n) {
  p.assign(static_cast<std::size_t>(E), 0.0);
  c.assign(static_cast<std::size_t>(E), 0);
  n = 0;
  for (std::size_t g = 0; g < st.nvalid.size(); ++g) {
    n += st.nvalid[g];
    for (index e = 0; e < E; ++e) {
      p[static_cast<std::size_t>(e)] += st.psum[g * static_cast<std::size_t>(E) + static_cast<std::size_t>(e)];
      c[static_cast<std::size_t>(e)] += st.counts[g * static_cast<std::size_t>(E) + static_cast<std::size_t>(e)];
    }
  }
}

template <execution_backend B, class T>
double loss_switch_impl(const B& be, matrix_view<const T> logits, const loss::switch_options& o, matrix_view<T> dlogits,
                        vector_view<const std::uint8_t> valid) {
  const bool want_grad = loss_check_common(logits, dlogits, valid);
  const index E = logits.cols;
  loss_check_top_k(o.top_k, E);
  check_finite(logits, "logits");
  const loss_segment_stats st = loss_segments(be, logits, o.score, o.top_k, valid, loss_block);
  std::vector<double> p;
  std::vector<std::int64_t> c;
  std::int64_t n = 0;
  loss_reduce(st, E, p, c, n);
  if (n == 0) {
    if (want_grad) loss_zero(dlogits);
    return 0.0;
  }
  const double N = static_cast<double>(n), k = static_cast<double>(o.top_k), Ed = static_cast<double>(E);
  double loss = 0.0;
  std::vector<double> gs(static_cast<std::size_t>(E));
  for (index e = 0; e < E; ++e) {
    const double f = static_cast<double>(c[static_cast<std::size_t>(e)]) / (N * k);
    loss += f * (p[static_cast<std::size_t>(e)] / N);
    gs[static_cast<std::size_t>(e)] = o.coeff * Ed * f / N;
  }
  if (want_grad) loss_write_grad(be, logits, o.score, gs, logits.rows, valid, dlogits);
  return o.coeff * Ed * loss;
}

template <execution_backend B, class T>
double loss_z_impl(const B& be, matrix_view<const T> logits, const loss::z_loss_options& o, matrix_view<T> dlogits,
                   vector_view<const std::uint8_t> valid) {
  const bool want_grad = loss_check_common(logits, dlogits, valid);
  check_finite(logits, "logits");
  const index Tn = logits.rows, E = logits.cols;
  std::vector<double> lse(static_cast<std::size_t>(Tn), 0.0);
  detail::host_blocks(be, Tn, loss_block, [&](index begin, index end) {
    for (index t = begin; t < end; ++t) {
      if (!loss_token_valid(valid, t)) continue;
      const T* l = logits.row(t);
      double m = static_cast<double>(l[0]);
      for (index e = 1; e < E; ++e) m = std::max(m, static_cast<double>(l[e]));
      double sum = 0.0;
      for (index e = 0; e < E; ++e) sum += std::exp(static_cast<double>(l[e]) - m);
      lse[static_cast<std::size_t>(t)] = m + std::log(sum);
    }
  });
  std::int64_t n = 0;
  double sq = 0.0;  // token order: deterministic
  for (index t = 0; t < Tn; ++t)
    if (loss_token_valid(valid, t)) {
      ++n;
      sq += lse[static_cast<std::size_t>(t)] * lse[static_cast<std::size_t>(t)];
    }
  if (n == 0) {
    if (want_grad) loss_zero(dlogits);
    return 0.0;
  }
  const double N = static_cast<double>(n);
  if (want_grad) {
    detail::host_blocks(be, Tn, loss_block, [&](index begin, index end) {
      for (index t = begin; t < end; ++t) {
        const T* l = logits.row(t);
        T* out = dlogits.row(t);
        const bool ok = loss_token_valid(valid, t);
        const double lt = lse[static_cast<std::size_t>(t)], scale = o.coeff * 2.0 / N * lt;
        for (index e = 0; e < E; ++e)
          out[e] = ok ? static_cast<T>(scale * std::exp(static_cast<double>(l[e]) - lt)) : T(0);
      }
    });
  }
  return o.coeff * sq / N;
}

}  // namespace resonance::detail

namespace resonance::loss {

// 1. Switch/GShard load-balancing loss with Megatron's top-k normalisation (see the header comment).
template <execution_backend B, input_scalar T>
T switch_loss(const B& be, matrix_view<const T> logits, const switch_options& opts, matrix_view<T> dlogits,
              vector_view<const std::uint8_t> valid = {}) {
  return static_cast<T>(detail::loss_switch_impl(be, logits, opts, dlogits, valid));
}

// 2. Sequence-level auxiliary loss (DeepSeek-V3), averaged over the sequences that hold a valid token.
template <execution_backend B, input_scalar T>
T seq_aux_loss(const B& be, matrix_view<const T> logits, const seq_aux_options& opts, matrix_view<T> dlogits,
               vector_view<const std::uint8_t> valid = {}) {
  const bool want_grad = detail::loss_check_common(logits, dlogits, valid);
  const index Tn = logits.rows, E = logits.cols;
  detail::loss_check_top_k(opts.top_k, E);
  detail::require(opts.seq_len >= 1 && Tn % opts.seq_len == 0, "seq_len",
                  "seq_len >= 1 dividing the number of tokens (" + std::to_string(Tn) + ")", opts.seq_len);
  detail::check_finite(logits, "logits");
  const detail::loss_segment_stats st = detail::loss_segments(be, logits, opts.score, opts.top_k, valid, opts.seq_len);
  const index S = static_cast<index>(st.nvalid.size());
  index used = 0;
  for (index j = 0; j < S; ++j) used += st.nvalid[static_cast<std::size_t>(j)] > 0 ? 1 : 0;
  if (used == 0) {
    if (want_grad) detail::loss_zero(dlogits);
    return T(0);
  }
  const double k = static_cast<double>(opts.top_k), Ed = static_cast<double>(E), Su = static_cast<double>(used);
  std::vector<double> gs(static_cast<std::size_t>(S * E), 0.0);
  double loss = 0.0;
  for (index j = 0; j < S; ++j) {
    const std::int64_t nj = st.nvalid[static_cast<std::size_t>(j)];
    if (nj == 0) continue;
    const double N = static_cast<double>(nj);
    double lj = 0.0;
    for (index e = 0; e < E; ++e) {
      const std::size_t i = static_cast<std::size_t>(j * E + e);
      const double f = static_cast<double>(st.counts[i]) / (N * k);
      lj += f * (st.psum[i] / N);
      gs[i] = opts.coeff * Ed * f / (N * Su);
    }
    loss += lj;
  }
  if (want_grad) detail::loss_write_grad(be, logits, opts.score, gs, opts.seq_len, valid, dlogits);
  return static_cast<T>(opts.coeff * Ed * loss / Su);
}

// 3. Global-batch auxiliary loss: adds this micro-batch's counts to acc, then uses the accumulated f.
template <execution_backend B, input_scalar T>
T global_aux_loss(const B& be, matrix_view<const T> logits, const switch_options& opts, global_aux_accumulator& acc,
                  matrix_view<T> dlogits, vector_view<const std::uint8_t> valid = {}) {
  const bool want_grad = detail::loss_check_common(logits, dlogits, valid);
  const index E = logits.cols;
  detail::loss_check_top_k(opts.top_k, E);
  detail::require(acc.counts.empty() || static_cast<index>(acc.counts.size()) == E, "accumulator",
                  "counts of num_experts (" + std::to_string(E) + ") entries (or empty)", acc.counts.size());
  detail::require(acc.top_k == 0 || acc.top_k == opts.top_k, "accumulator",
                  "the top_k of its earlier micro-batches (" + std::to_string(acc.top_k) + ")", opts.top_k);
  detail::require(acc.tokens >= 0, "accumulator", "a non-negative token count", acc.tokens);
  detail::check_finite(logits, "logits");
  const detail::loss_segment_stats st =
      detail::loss_segments(be, logits, opts.score, opts.top_k, valid, detail::loss_block);
  std::vector<double> p;
  std::vector<std::int64_t> c;
  std::int64_t n = 0;
  detail::loss_reduce(st, E, p, c, n);
  if (acc.counts.empty()) acc.counts.assign(static_cast<std::size_t>(E), 0);
  acc.top_k = opts.top_k;
  for (index e = 0; e < E; ++e) acc.counts[static_cast<std::size_t>(e)] += c[static_cast<std::size_t>(e)];
  acc.tokens += n;
  if (n == 0) {
    if (want_grad) detail::loss_zero(dlogits);
    return T(0);
  }
  const double N = static_cast<double>(n), Nacc = static_cast<double>(acc.tokens), k = static_cast<double>(opts.top_k),
               Ed = static_cast<double>(E);
  double loss = 0.0;
  std::vector<double> gs(static_cast<std::size_t>(E));
  for (index e = 0; e < E; ++e) {
    const double f = static_cast<double>(acc.counts[static_cast<std::size_t>(e)]) / (Nacc * k);
    loss += f * (p[static_cast<std::size_t>(e)] / N);
    gs[static_cast<std::size_t>(e)] = opts.coeff * Ed * f / N;
  }
  if (want_grad) detail::loss_write_grad(be, logits, opts.score, gs, logits.rows, valid, dlogits);
  return static_cast<T>(opts.coeff * Ed * loss);
}

// 4. Router z-loss with its gradient.
template <execution_backend B, input_scalar T>
T z_loss(const B& be, matrix_view<const T> logits, const z_loss_options& opts, matrix_view<T> dlogits,
         vector_view<const std::uint8_t> valid = {}) {
  return static_cast<T>(detail::loss_z_impl(be, logits, opts, dlogits, valid));
}

// Forward-only Switch loss (coefficient 1) on fp32 logits, as the CLI logs it.
template <execution_backend Backend>
double switch_aux_loss(const Backend& be, matrix_view<const float> logits, resonance::score fn, index top_k) {
  return detail::loss_switch_impl(be, logits, switch_options{top_k, fn, 1.0}, matrix_view<float>{}, {});
}

// Forward-only router z-loss (coefficient 1): mean over tokens of logsumexp(logits_t)².
template <execution_backend Backend>
double z_loss(const Backend& be, matrix_view<const float> logits) {
  return detail::loss_z_impl(be, logits, z_loss_options{}, matrix_view<float>{}, {});
}

}  // namespace resonance::loss
