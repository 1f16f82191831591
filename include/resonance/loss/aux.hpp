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
//  * Values and gradients are computed in double. Every sum over tokens runs over fixed chunks of 1024
//    tokens (cut inside each sequence for seq_aux_loss), each summed in token order, whose partials are
//    added in chunk order; sums over experts run in expert order. So every backend gives the same bits.
//  * Written once on the execution primitives (backend/execution.hpp): per-chunk and per-token groups,
//    per-expert items, temporaries in the backend's buffers, the value copied to the host at the end.
//    The logits, mask and dlogits are host views, so the backend must be able to read host memory.
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

// Tokens per chunk of every token sum (fixed: it is the summation order).
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

// The losses read host matrices and masks (matrix_view and vector_view are host views) in their
// functors, so the backend must be able to read host memory.
template <class Backend>
constexpr void check_loss_backend() {
  static_assert(accessible_from_v<host_space, memory_space_t<Backend>>,
                "the losses read host logits, masks and gradients (matrix_view is a host view): they need a "
                "backend that can read host memory");
}

// The mask as a raw pointer for the functors: null when every token counts.
inline const std::uint8_t* loss_mask(vector_view<const std::uint8_t> valid) {
  return valid.empty() ? nullptr : valid.data;
}

RESONANCE_INLINE_FUNCTION bool loss_token_valid(const std::uint8_t* valid, index t) {
  return valid == nullptr || valid[t] != 0;
}

// Whether every logit of a row is finite (x − x is 0 exactly for finite x, NaN otherwise).
template <class T>
RESONANCE_INLINE_FUNCTION bool loss_row_finite(const T* l, index E) {
  bool ok = true;
  for (index e = 0; e < E; ++e) ok &= (l[e] - l[e]) == T(0);
  return ok;
}

// Aux-loss scores of one row in double: softmax over all E, or elementwise normalised by sum + 1e-20.
template <class T>
RESONANCE_INLINE_FUNCTION void loss_scores_row(resonance::score fn, const T* l, double* s, index E) {
  if (fn == resonance::score::softmax) {
    double m = static_cast<double>(l[0]);
    for (index e = 1; e < E; ++e) m = m < static_cast<double>(l[e]) ? static_cast<double>(l[e]) : m;
    double sum = 0.0;
    for (index e = 0; e < E; ++e) sum += s[e] = ::exp(static_cast<double>(l[e]) - m);
    for (index e = 0; e < E; ++e) s[e] /= sum;
  } else {
    double sum = 0.0, d = 0.0;
    for (index e = 0; e < E; ++e) sum += s[e] = elementwise_score_and_derivative(fn, static_cast<double>(l[e]), d);
    for (index e = 0; e < E; ++e) s[e] /= sum + 1e-20;
  }
}

// dL/dl of one row from gs = dL/ds (s from loss_scores_row of the same row); writes out[0..E).
template <class T>
RESONANCE_INLINE_FUNCTION void loss_scores_backward_row(resonance::score fn, const T* l, const double* s,
                                                        const double* gs, double* tmp, T* out, index E) {
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

// The chunks of a token sum: segments of seg_len consecutive tokens (the sequences of seq_aux_loss, or
// the whole batch), each cut into pieces of at most loss_block tokens. Chunk c is piece c % per_seg of
// segment c / per_seg; no chunk straddles two segments.
struct loss_chunking {
  index tokens = 0;
  index seg_len = 1;
  index per_seg = 1;
  index nseg = 0;

  RESONANCE_HOST_DEVICE index count() const { return nseg * per_seg; }
  RESONANCE_HOST_DEVICE index begin(index c) const { return c / per_seg * seg_len + c % per_seg * loss_block; }
  RESONANCE_HOST_DEVICE index end(index c) const {
    const index seg_end = (c / per_seg + 1) * seg_len;
    const index e = begin(c) + loss_block < seg_end ? begin(c) + loss_block : seg_end;
    return e < tokens ? e : tokens;
  }
};

// Sequences of seq_len tokens (seq_len >= 1 divides the token count).
inline loss_chunking loss_chunks(index tokens, index seq_len) {
  return {tokens, seq_len, (seq_len + loss_block - 1) / loss_block, tokens / seq_len};
}

// The whole batch as one segment (one empty chunk when there are no tokens).
inline loss_chunking loss_chunks_whole(index tokens) {
  const index len = tokens > 0 ? tokens : 1;
  return {tokens, len, (len + loss_block - 1) / loss_block, 1};
}

// Per-segment sums over the valid tokens, in buffers of the backend: P (nseg×E) of the aux scores, C
// (nseg×E) of the fp32 top-k counts (when top_k > 0), N (nseg) of the valid tokens.
template <class Backend>
struct loss_sums {
  buffer_t<memory_space_t<Backend>, double> chunk_psum, seg_psum;
  buffer_t<memory_space_t<Backend>, std::int64_t> chunk_counts, seg_counts;
  const double* P = nullptr;
  const std::int64_t* C = nullptr;
  const std::int64_t* N = nullptr;
};

// The forward pass of the aux losses: one group per chunk sums its valid tokens in token order (scores
// and counts of one row at a time in the group's scratch: E doubles, then 2E + k floats and k ids for
// the counts), then a for_each over (segment, expert) adds each segment's chunks in chunk order (not
// needed when a segment is one chunk). The counts are a per-chunk histogram owned by the chunk's group:
// integers, no atomics. The finiteness check of the logits rides on the same pass: a non-finite logit
// fails its chunk, and the lowest failing chunk is checked again on the host for the message
// (check_finite's, naming the first offending entry).
template <execution_backend Backend, class T>
loss_sums<Backend> loss_forward(const Backend& be, matrix_view<const T> logits, resonance::score fn, index top_k,
                                const std::uint8_t* valid, const loss_chunking ch) {
  const index E = logits.cols, nch = ch.count(), nseg = ch.nseg, k = top_k;
  loss_sums<Backend> r;
  r.chunk_psum = allocate<double>(be, nch * E);
  r.chunk_counts = allocate<std::int64_t>(be, nch * ((k > 0 ? E : 0) + 1));  // counts, then valid tokens
  double* const psum = r.chunk_psum.data();
  std::int64_t* const counts = r.chunk_counts.data();
  std::int64_t* const nvalid = counts + (k > 0 ? nch * E : 0);
  const index scratch_bytes =
      E * static_cast<index>(sizeof(double)) +
      (k > 0 ? (2 * E + k) * static_cast<index>(sizeof(float)) + k * static_cast<index>(sizeof(id_type)) : 0);
  const index bad = for_each_group(
      be, nch, scratch_bytes,
      [=](const auto& g, index c) {
        double* s = static_cast<double*>(g.scratch());
        float* lf = reinterpret_cast<float*>(s + E);
        float* sf = lf + E;
        float* vals = sf + E;
        id_type* ids = reinterpret_cast<id_type*>(vals + k);
        double* ps = psum + c * E;
        std::int64_t* cnt = counts + c * E;
        for (index e = 0; e < E; ++e) ps[e] = 0.0;
        if (k > 0)
          for (index e = 0; e < E; ++e) cnt[e] = 0;
        std::int64_t n = 0;
        for (index t = ch.begin(c); t < ch.end(c); ++t) {
          const T* l = logits.row(t);
          if (!loss_row_finite(l, E)) return true;
          if (!loss_token_valid(valid, t)) continue;
          ++n;
          loss_scores_row(fn, l, s, E);
          for (index e = 0; e < E; ++e) ps[e] += s[e];
          if (k > 0) {
            // The counts use the fp32 scores the router selects on (Megatron: plain top-k of the scores).
            for (index e = 0; e < E; ++e) lf[e] = static_cast<float>(l[e]);
            score_row(fn, lf, sf, E, 1.0f);
            if (fn != resonance::score::softmax) {
              float sum = 0.0f;
              for (index e = 0; e < E; ++e) sum += sf[e];
              for (index e = 0; e < E; ++e) sf[e] /= sum + 1e-20f;
            }
            topk_row(
                E, k, [sf](index e) { return sf[e]; }, vals, ids);
            for (index j = 0; j < k; ++j) ++cnt[ids[j]];
          }
        }
        nvalid[c] = n;
        return false;
      },
      index{1});
  if (bad < nch) {
    const index b = ch.begin(bad);
    check_finite(matrix_view<const T>{logits.row(b), ch.end(bad) - b, E, logits.stride}, "logits", b);
  }
  if (ch.per_seg == 1) {
    r.P = psum;
    r.C = counts;
    r.N = nvalid;
    return r;
  }
  r.seg_psum = allocate<double>(be, nseg * E);
  r.seg_counts = allocate<std::int64_t>(be, nseg * ((k > 0 ? E : 0) + 1));
  double* const P = r.seg_psum.data();
  std::int64_t* const C = r.seg_counts.data();
  std::int64_t* const N = C + (k > 0 ? nseg * E : 0);
  const index per_seg = ch.per_seg;
  for_each(be, nseg * E, [=](index i) {
    const index j = i / E, e = i % E;
    double p = 0.0;
    std::int64_t c = 0, n = 0;
    for (index q = j * per_seg; q < (j + 1) * per_seg; ++q) {
      p += psum[q * E + e];
      if (k > 0) c += counts[q * E + e];
      n += nvalid[q];
    }
    P[i] = p;
    if (k > 0) C[i] = c;
    if (e == 0) N[j] = n;
  });
  r.P = P;
  r.C = C;
  r.N = N;
  return r;
}

// Gradient pass, one group per token (scratch: 2E doubles): dlogits row t = backward of
// dL/ds_t = gs[(t / seg_len)·E + e] (gs in the backend's memory), zero for masked rows.
template <execution_backend Backend, class T>
void loss_write_grad(const Backend& be, matrix_view<const T> logits, resonance::score fn, const double* gs,
                     index seg_len, const std::uint8_t* valid, matrix_view<T> dlogits) {
  const index E = logits.cols;
  for_each_group(be, logits.rows, 2 * E * static_cast<index>(sizeof(double)), [=](const auto& g, index t) {
    T* out = dlogits.row(t);
    if (!loss_token_valid(valid, t)) {
      for (index e = 0; e < E; ++e) out[e] = T(0);
      return false;
    }
    double* s = static_cast<double*>(g.scratch());
    double* tmp = s + E;
    loss_scores_row(fn, logits.row(t), s, E);
    loss_scores_backward_row(fn, logits.row(t), s, gs + t / seg_len * E, tmp, out, E);
    return false;
  });
}

inline void loss_check_top_k(index top_k, index E) {
  require(top_k >= 1 && top_k <= E, "top_k", "1 <= top_k <= num_experts (" + std::to_string(E) + ")", top_k);
}

// The Switch loss, or with acc the global-batch loss (whose accumulator takes this micro-batch's counts).
// Frequencies, the value and dL/ds per expert on one item, in expert order: f_e = (C_prev,e + c_e) /
// ((N_prev + N)·k) with C_prev, N_prev the accumulator's (0 for the Switch loss, and then f is
// c_e / (N·k)). Everything stays in the backend's memory until the value (and for acc, the counts) is
// copied to the host at the end.
template <execution_backend B, class T>
double loss_switch_impl(const B& be, matrix_view<const T> logits, const loss::switch_options& o, matrix_view<T> dlogits,
                        vector_view<const std::uint8_t> valid, loss::global_aux_accumulator* acc = nullptr) {
  check_loss_backend<B>();
  const bool want_grad = loss_check_common(logits, dlogits, valid);
  const index E = logits.cols;
  loss_check_top_k(o.top_k, E);
  if (acc != nullptr) {
    require(acc->counts.empty() || static_cast<index>(acc->counts.size()) == E, "accumulator",
            "counts of num_experts (" + std::to_string(E) + ") entries (or empty)", acc->counts.size());
    require(acc->top_k == 0 || acc->top_k == o.top_k, "accumulator",
            "the top_k of its earlier micro-batches (" + std::to_string(acc->top_k) + ")", o.top_k);
    require(acc->tokens >= 0, "accumulator", "a non-negative token count", acc->tokens);
  }
  const std::uint8_t* const mask = loss_mask(valid);
  const loss_chunking ch = loss_chunks_whole(logits.rows);
  const loss_sums<B> sums = loss_forward(be, logits, o.score, o.top_k, mask, ch);
  auto out = allocate<double>(be, E + 1);  // dL/ds (E), then the value
  double* const gs = out.data();
  const double* const P = sums.P;
  const std::int64_t* const C = sums.C;
  const std::int64_t* const Nv = sums.N;
  // The accumulator is host memory, read as it was before this call.
  const std::int64_t* const prev = acc != nullptr && !acc->counts.empty() ? acc->counts.data() : nullptr;
  const std::int64_t prev_tokens = acc != nullptr ? acc->tokens : 0;
  const double coeff = o.coeff, k = static_cast<double>(o.top_k), Ed = static_cast<double>(E);
  for_each(be, 1, [=](index) {
    const std::int64_t n = Nv[0];
    if (n == 0) {
      for (index e = 0; e <= E; ++e) gs[e] = 0.0;
      return;
    }
    const double N = static_cast<double>(n), Nacc = static_cast<double>(prev_tokens + n);
    double loss = 0.0;
    for (index e = 0; e < E; ++e) {
      const double f = static_cast<double>((prev != nullptr ? prev[e] : 0) + C[e]) / (Nacc * k);
      loss += f * (P[e] / N);
      gs[e] = coeff * Ed * f / N;
    }
    gs[E] = coeff * Ed * loss;
  });
  if (want_grad) loss_write_grad(be, logits, o.score, gs, ch.seg_len, mask, dlogits);
  double value = 0.0;
  copy_to_host(be, &value, gs + E, 1);
  if (acc != nullptr) {
    std::vector<std::int64_t> c(static_cast<std::size_t>(E));
    std::int64_t n = 0;
    copy_to_host(be, c.data(), C, E);
    copy_to_host(be, &n, Nv, 1);
    fence(be);
    if (acc->counts.empty()) acc->counts.assign(static_cast<std::size_t>(E), 0);
    acc->top_k = o.top_k;
    for (index e = 0; e < E; ++e) acc->counts[static_cast<std::size_t>(e)] += c[static_cast<std::size_t>(e)];
    acc->tokens += n;
  }
  fence(be);
  return value;
}

// The z-loss: logsumexp per token (one group per token, which also checks the row's finiteness), the
// squares summed per fixed chunk of loss_block tokens in token order, then over the chunks in order.
template <execution_backend B, class T>
double loss_z_impl(const B& be, matrix_view<const T> logits, const loss::z_loss_options& o, matrix_view<T> dlogits,
                   vector_view<const std::uint8_t> valid) {
  check_loss_backend<B>();
  const bool want_grad = loss_check_common(logits, dlogits, valid);
  const index Tn = logits.rows, E = logits.cols;
  const index nch = (Tn + loss_block - 1) / loss_block;
  const std::uint8_t* const mask = loss_mask(valid);
  auto work = allocate<double>(be, Tn + nch + 2);  // lse (T), chunk sums, then the value and N
  auto counts = allocate<std::int64_t>(be, nch);
  double* const lse = work.data();
  double* const part = lse + Tn;
  double* const res = part + nch;
  std::int64_t* const nv = counts.data();
  const index bad = for_each_group(be, Tn, 0, [=](const auto&, index t) {
    const T* l = logits.row(t);
    if (!loss_row_finite(l, E)) return true;
    if (!loss_token_valid(mask, t)) {
      lse[t] = 0.0;
      return false;
    }
    double m = static_cast<double>(l[0]);
    for (index e = 1; e < E; ++e) m = m < static_cast<double>(l[e]) ? static_cast<double>(l[e]) : m;
    double sum = 0.0;
    for (index e = 0; e < E; ++e) sum += ::exp(static_cast<double>(l[e]) - m);
    lse[t] = m + ::log(sum);
    return false;
  });
  if (bad < Tn) check_finite(matrix_view<const T>{logits.row(bad), 1, E, logits.stride}, "logits", bad);
  for_each(
      be, nch,
      [=](index c) {
        const index end = (c + 1) * loss_block < Tn ? (c + 1) * loss_block : Tn;
        double sq = 0.0;
        std::int64_t n = 0;
        for (index t = c * loss_block; t < end; ++t)
          if (loss_token_valid(mask, t)) {
            ++n;
            sq += lse[t] * lse[t];
          }
        part[c] = sq;
        nv[c] = n;
      },
      index{1});
  const double coeff = o.coeff;
  for_each(be, 1, [=](index) {
    double sq = 0.0;
    std::int64_t n = 0;
    for (index c = 0; c < nch; ++c) {
      sq += part[c];
      n += nv[c];
    }
    const double N = static_cast<double>(n);
    res[0] = n == 0 ? 0.0 : coeff * sq / N;
    res[1] = N;
  });
  if (want_grad) {
    for_each(
        be, Tn,
        [=](index t) {
          const T* l = logits.row(t);
          T* out = dlogits.row(t);
          if (!loss_token_valid(mask, t)) {
            for (index e = 0; e < E; ++e) out[e] = T(0);
            return;
          }
          const double lt = lse[t], scale = coeff * 2.0 / res[1] * lt;
          for (index e = 0; e < E; ++e) out[e] = static_cast<T>(scale * ::exp(static_cast<double>(l[e]) - lt));
        },
        index{256});
  }
  double value = 0.0;
  copy_to_host(be, &value, res, 1);
  fence(be);
  return value;
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
// Per sequence j (one item each): its value L_j and dL/ds, both in expert order; the count of used
// sequences and the mean of the L_j (in sequence order) on one item each.
template <execution_backend B, input_scalar T>
T seq_aux_loss(const B& be, matrix_view<const T> logits, const seq_aux_options& opts, matrix_view<T> dlogits,
               vector_view<const std::uint8_t> valid = {}) {
  detail::check_loss_backend<B>();
  const bool want_grad = detail::loss_check_common(logits, dlogits, valid);
  const index Tn = logits.rows, E = logits.cols;
  detail::loss_check_top_k(opts.top_k, E);
  detail::require(opts.seq_len >= 1 && Tn % opts.seq_len == 0, "seq_len",
                  "seq_len >= 1 dividing the number of tokens (" + std::to_string(Tn) + ")", opts.seq_len);
  const std::uint8_t* const mask = detail::loss_mask(valid);
  const detail::loss_chunking ch = detail::loss_chunks(Tn, opts.seq_len);
  const detail::loss_sums<B> sums = detail::loss_forward(be, logits, opts.score, opts.top_k, mask, ch);
  const index S = ch.nseg;
  auto out = allocate<double>(be, S * E + S + 2);  // dL/ds (S×E), L_j (S), then the value and the used count
  double* const gs = out.data();
  double* const lj = gs + S * E;
  double* const res = lj + S;
  const double* const P = sums.P;
  const std::int64_t* const C = sums.C;
  const std::int64_t* const Nv = sums.N;
  const double coeff = opts.coeff, k = static_cast<double>(opts.top_k), Ed = static_cast<double>(E);
  for_each(be, 1, [=](index) {
    index used = 0;
    for (index j = 0; j < S; ++j) used += Nv[j] > 0 ? 1 : 0;
    res[1] = static_cast<double>(used);
  });
  for_each(
      be, S,
      [=](index j) {
        double* g = gs + j * E;
        const std::int64_t nj = Nv[j];
        if (nj == 0) {
          for (index e = 0; e < E; ++e) g[e] = 0.0;
          lj[j] = 0.0;
          return;
        }
        const double N = static_cast<double>(nj), Su = res[1];
        double l = 0.0;
        for (index e = 0; e < E; ++e) {
          const double f = static_cast<double>(C[j * E + e]) / (N * k);
          l += f * (P[j * E + e] / N);
          g[e] = coeff * Ed * f / (N * Su);
        }
        lj[j] = l;
      },
      index{64});
  for_each(be, 1, [=](index) {
    const double Su = res[1];
    double loss = 0.0;
    for (index j = 0; j < S; ++j)
      if (Nv[j] > 0) loss += lj[j];
    res[0] = Su > 0.0 ? coeff * Ed * loss / Su : 0.0;
  });
  if (want_grad) detail::loss_write_grad(be, logits, opts.score, gs, opts.seq_len, mask, dlogits);
  double value = 0.0;
  copy_to_host(be, &value, res, 1);
  fence(be);
  return static_cast<T>(value);
}

// 3. Global-batch auxiliary loss: adds this micro-batch's counts to acc, then uses the accumulated f.
template <execution_backend B, input_scalar T>
T global_aux_loss(const B& be, matrix_view<const T> logits, const switch_options& opts, global_aux_accumulator& acc,
                  matrix_view<T> dlogits, vector_view<const std::uint8_t> valid = {}) {
  return static_cast<T>(detail::loss_switch_impl(be, logits, opts, dlogits, valid, &acc));
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
