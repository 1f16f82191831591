#pragma once

// Backward pass through routing: from the gradient with respect to every kept assignment's combine
// weight to the gradient with respect to the router logits, then through the affinity to the input
// and the gate parameters. The counterpart of router::route.
//
// What is differentiated. route() turns the logits l (T×E) into a plan whose kept assignments i
// (token-major, ascending expert ids: plan.token_weight() order) carry combine weights w_i(l). In an
// MoE layer y_t = Σ_{i of token t} w_i · expert_out_i, so for a loss L the caller's
//   dweight_i = ∂L/∂w_i = <∂L/∂y_t, expert_out_i>,
// and everything here computes the gradient of Σ_i dweight_i · w_i(l) with respect to l (and on to x,
// W, b). The weights are differentiated exactly as each direction computes them from the logits:
//   token_choice / bidirectional (z = l / temperature, sf = scaling_factor, S = the token's top-k
//   PROPOSALS, recomputed from the logits with the direction's own selection, so that experts the
//   capacity dropped still enter the normalisation, with dweight 0):
//     softmax (post):      w_j = sf · softmax(z_S)_j over S;
//     softmax, pre:        w_e = sf · softmax(z)_e over all E (divided by Σ_S + eps when renorm = always);
//     sigmoid, sqrt_softplus, identity: w_j = sf · s(z_j), or sf · s(z_j) / (Σ_S s + eps) when
//                          renormalised (automatic: elementwise scores with k > 1; always; never);
//   expert_choice:         w = S[t, e], the full score of z (softmax over all E, or elementwise);
//   sinkhorn:              w = sigmoid(l) for top_k = 1, softmax(l) over all E for top_k > 1.
// What is not: the selection (top-k, groups, expert bias, Sinkhorn's P, expert choice's top-C) and
// the capacity (which assignments were dropped) are piecewise constant and held fixed, as in every
// framework; an expert bias and groups therefore only decide S.
//
// Precision: the weights' derivatives are evaluated in double from logits in the input's precision
// (resonance::backward recomputes them with the affinity's forward), and rounded once to the output
// type. The selection is recomputed from the logits rounded to fp32, exactly as route() selects.
// Every token's gradient depends on that token alone, so results do not depend on the backend's split.
// As everywhere in the library, a call that throws resonance::error has written nothing.

#include <atomic>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "affinity/affinity.hpp"
#include "backend/backend.hpp"
#include "backend/serial.hpp"
#include "core/error.hpp"
#include "core/view.hpp"
#include "plan/plan.hpp"
#include "router.hpp"
#include "routing/bidirectional.hpp"
#include "routing/expert_choice.hpp"
#include "routing/sinkhorn.hpp"
#include "routing/token_choice.hpp"
#include "score/score.hpp"

namespace resonance {
namespace detail {

// How one direction turns a row of logits into combine weights (see the header comment).
struct weight_rule {
  resonance::score fn = resonance::score::softmax;
  bool post_softmax = false;  // softmax over the selected set only (token choice's default)
  bool renormalize = false;   // divided by (Σ_S s + epsilon)
  double epsilon = 0.0;
  double scaling = 1.0;
  double inv_temperature = 1.0;
  // Whether the gradient needs the selected set S (post softmax, or renormalised).
  bool needs_selection() const { return post_softmax || renormalize; }
};

inline weight_rule token_choice_rule(const routing::token_choice& p) {
  const bool post = p.score == resonance::score::softmax && !p.pre_softmax;
  const bool elementwise = p.score == resonance::score::sigmoid || p.score == resonance::score::sqrt_softplus;
  const bool renorm = !post && (p.renorm == routing::renormalize::always ||
                                (p.renorm == routing::renormalize::automatic && elementwise && p.top_k > 1));
  return {p.score,
          post,
          renorm,
          static_cast<double>(p.renorm_epsilon),
          static_cast<double>(p.scaling_factor),
          1.0 / static_cast<double>(p.temperature)};
}

// The gradient of Σ_e g_e · w_e(l) for one token: g (E) holds dweight at the kept experts and 0
// elsewhere, sel (E) marks S when the rule needs it. s and ds are E doubles of scratch; out gets E.
inline void weight_backward_row(const weight_rule& r, const double* l, index E, const double* g,
                                const unsigned char* sel, double* s, double* ds, double* out) {
  const double it = r.inv_temperature;
  if (r.post_softmax) {
    double m = -HUGE_VAL;
    for (index e = 0; e < E; ++e)
      if (sel[e] && l[e] * it > m) m = l[e] * it;
    double sum = 0.0;
    for (index e = 0; e < E; ++e) {
      s[e] = sel[e] ? std::exp(l[e] * it - m) : 0.0;
      sum += s[e];
    }
    double dot = 0.0;
    for (index e = 0; e < E; ++e) {
      s[e] /= sum;
      dot += g[e] * s[e];
    }
    for (index e = 0; e < E; ++e) out[e] = sel[e] ? r.scaling * s[e] * (g[e] - dot) * it : 0.0;
    return;
  }
  // Full scores s (ds holds the elementwise derivatives meanwhile).
  if (r.fn == resonance::score::softmax) {
    double m = l[0] * it;
    for (index e = 1; e < E; ++e) m = l[e] * it > m ? l[e] * it : m;
    double sum = 0.0;
    for (index e = 0; e < E; ++e) {
      s[e] = std::exp(l[e] * it - m);
      sum += s[e];
    }
    for (index e = 0; e < E; ++e) s[e] /= sum;
  } else {
    for (index e = 0; e < E; ++e) s[e] = elementwise_score_and_derivative(r.fn, l[e] * it, ds[e]);
  }
  // ∂F/∂s, written to out.
  if (r.renormalize) {
    double d = r.epsilon, num = 0.0;
    for (index e = 0; e < E; ++e)
      if (sel[e]) {
        d += s[e];
        num += g[e] * s[e];
      }
    const double dot = num / d;
    for (index e = 0; e < E; ++e) out[e] = sel[e] ? r.scaling * (g[e] - dot) / d : 0.0;
  } else {
    for (index e = 0; e < E; ++e) out[e] = r.scaling * g[e];
  }
  // Through the score to z, then to l.
  if (r.fn == resonance::score::softmax) {
    double c = 0.0;
    for (index e = 0; e < E; ++e) c += out[e] * s[e];
    for (index e = 0; e < E; ++e) out[e] = s[e] * (out[e] - c) * it;
  } else {
    for (index e = 0; e < E; ++e) out[e] = out[e] * ds[e] * it;
  }
}

// The checks every weight_backward shares, before anything is written.
template <input_scalar T>
void check_weight_backward(matrix_view<const T> logits, const plan_view<>& plan, vector_view<const T> dweight,
                           matrix_view<T> dlogits) {
  check_matrix(logits, "logits");
  const index T_ = logits.rows, E = logits.cols;
  require(plan.num_tokens() == T_, "plan", "as many tokens as the logits have rows (" + std::to_string(T_) + ")",
          plan.num_tokens());
  require(plan.num_experts() == E, "plan", "as many experts as the logits have columns (" + std::to_string(E) + ")",
          plan.num_experts());
  const index nnz = plan.num_assignments();
  require(dweight.size == nnz, "dweight",
          "one entry per kept assignment (plan.num_assignments() = " + std::to_string(nnz) + ")", dweight.size);
  require(dweight.data != nullptr || nnz == 0, "dweight", "non-null data");
  check_matrix(dlogits, "dlogits", T_, E);
  require(plan.token_offsets_ != nullptr && (nnz == 0 || plan.token_expert_ != nullptr), "plan",
          "a plan with its token-major arrays (routing_plan::view())");
  const auto off = plan.token_offsets();
  const auto ex = plan.token_expert();
  require(off[0] == 0 && off[static_cast<std::size_t>(T_)] == nnz, "plan", "token_offsets from 0 to num_assignments()");
  for (index t = 0; t < T_; ++t) {
    const id_type b = off[static_cast<std::size_t>(t)], e_ = off[static_cast<std::size_t>(t + 1)];
    require(b <= e_, "plan", "non-decreasing token_offsets", "at token ", t);
    for (id_type i = b; i < e_; ++i) {
      const id_type e = ex[static_cast<std::size_t>(i)];
      require(e >= 0 && e < E && (i == b || e > ex[static_cast<std::size_t>(i - 1)]), "plan",
              "strictly ascending expert ids in [0, num_experts) per token", e, " for token ", t);
    }
  }
  for (index t = 0; t < T_; ++t)
    for (index e = 0; e < E; ++e)
      require(std::isfinite(static_cast<double>(logits(t, e))), "logits", "finite values", logits(t, e), " at row ", t,
              ", column ", e);
  for (index i = 0; i < nnz; ++i)
    require(std::isfinite(static_cast<double>(dweight[i])), "dweight", "finite values", dweight[i], " at ", i);
}

// The shared driver. make_selector() gives, per parallel block, a callable (const T* row, mask) that
// marks the token's selected set S in mask (E bytes); it is only called when the rule needs S. Every
// kept expert must be in S (else the plan was not routed from these logits). The gradient goes to an
// internal buffer first, so that a mismatch throws with dlogits untouched.
template <execution_backend Backend, input_scalar T, class MakeSelector>
void weight_backward_impl(const Backend& be, const weight_rule& rule, matrix_view<const T> logits,
                          const plan_view<>& plan, vector_view<const T> dweight, matrix_view<T> dlogits,
                          MakeSelector&& make_selector) {
  const auto sz = [](index n) { return static_cast<std::size_t>(n); };
  const index T_ = logits.rows, E = logits.cols;
  std::vector<T> result(sz(T_ * E));
  std::atomic<index> first_bad{T_};
  detail::host_blocks(be, T_, 256, [&](index begin, index end) {
    auto select_row = make_selector();
    std::vector<double> l(sz(E)), g(sz(E)), s(sz(E)), ds(sz(E)), out(sz(E));
    std::vector<unsigned char> sel(sz(E), 1);
    const auto off = plan.token_offsets();
    const auto ex = plan.token_expert();
    for (index t = begin; t < end; ++t) {
      const T* row = logits.row(t);
      for (index e = 0; e < E; ++e) {
        l[sz(e)] = static_cast<double>(row[e]);
        g[sz(e)] = 0.0;
      }
      if (rule.needs_selection()) select_row(row, sel.data());
      bool ok = true;
      for (id_type i = off[sz(t)]; i < off[sz(t + 1)]; ++i) {
        const id_type e = ex[sz(i)];
        ok = ok && sel[sz(e)] != 0;
        g[sz(e)] = static_cast<double>(dweight[i]);
      }
      if (!ok) {
        index cur = first_bad.load();
        while (t < cur && !first_bad.compare_exchange_weak(cur, t)) {
        }
        continue;
      }
      weight_backward_row(rule, l.data(), E, g.data(), sel.data(), s.data(), ds.data(), out.data());
      for (index e = 0; e < E; ++e) result[sz(t * E + e)] = static_cast<T>(out[sz(e)]);
    }
  });
  const index bad = first_bad.load();
  require(bad == T_, "plan",
          "the plan route() produced from these logits (every kept expert among the token's selected experts)",
          "a kept expert outside the selection of token ", bad);
  detail::host_blocks(be, T_, 1024, [&](index begin, index end) {
    for (index t = begin; t < end; ++t)
      for (index e = 0; e < E; ++e) dlogits(t, e) = result[sz(t * E + e)];
  });
}

// Selects a token's top-k proposals with token_choice_row on the fp32-rounded row (as route() does).
template <input_scalar T>
struct token_choice_selector {
  const routing::token_choice* p;
  index E;
  std::vector<float> row, fs, w;
  std::vector<id_type> is, ids;

  token_choice_selector(const routing::token_choice& policy, index experts)
      : p(&policy),
        E(experts),
        row(static_cast<std::size_t>(experts)),
        fs(static_cast<std::size_t>(policy.scratch_size(experts))),
        w(static_cast<std::size_t>(policy.top_k)),
        is(static_cast<std::size_t>(policy.scratch_size(experts))),
        ids(static_cast<std::size_t>(policy.top_k)) {}

  void operator()(const T* in, unsigned char* mask) {
    for (index e = 0; e < E; ++e) {
      row[static_cast<std::size_t>(e)] = static_cast<float>(in[e]);
      mask[e] = 0;
    }
    const float* bias = p->expert_bias.empty() ? nullptr : p->expert_bias.data;
    routing::kernel::token_choice_row(*p, row.data(), E, bias, ids.data(), w.data(), fs.data(), is.data());
    for (index j = 0; j < p->top_k; ++j) mask[ids[static_cast<std::size_t>(j)]] = 1;
  }
};

// A selector for directions whose weights do not depend on the selection (never called).
template <input_scalar T>
struct no_selector {
  void operator()(const T*, unsigned char*) const {}
};

}  // namespace detail

namespace routing {

// dlogits (T×E, overwritten) = ∂/∂logits of Σ_i dweight_i · w_i(logits), i over the plan's kept
// assignments in token_weight() order, for the plan that route() produced from these logits (the
// logits in the input's precision; the selection is recomputed from them rounded to fp32). One
// overload per direction, found by ADL. Throws resonance::error, writing nothing, on a shape mismatch
// or when a kept expert is not among the token's recomputed proposals.
template <execution_backend Backend, input_scalar T>
void weight_backward(const Backend& be, const token_choice& p, matrix_view<const T> logits, const plan_view<>& plan,
                     vector_view<const T> dweight, matrix_view<T> dlogits) {
  detail::check_weight_backward(logits, plan, dweight, dlogits);
  p.validate(logits.cols);
  const index E = logits.cols;
  detail::weight_backward_impl(be, detail::token_choice_rule(p), logits, plan, dweight, dlogits,
                               [&] { return detail::token_choice_selector<T>(p, E); });
}

// Bidirectional routing keeps token choice's weights (its proposal step); only the kept set differs.
template <execution_backend Backend, input_scalar T>
void weight_backward(const Backend& be, const bidirectional& p, matrix_view<const T> logits, const plan_view<>& plan,
                     vector_view<const T> dweight, matrix_view<T> dlogits) {
  detail::check_weight_backward(logits, plan, dweight, dlogits);
  p.validate(logits.cols);
  weight_backward(be, p.proposal(), logits, plan, dweight, dlogits);
}

// Expert choice: w = S[t, e], the full score of logits / temperature.
template <execution_backend Backend, input_scalar T>
void weight_backward(const Backend& be, const expert_choice& p, matrix_view<const T> logits, const plan_view<>& plan,
                     vector_view<const T> dweight, matrix_view<T> dlogits) {
  detail::check_weight_backward(logits, plan, dweight, dlogits);
  p.validate(logits.cols);
  detail::weight_rule rule;
  rule.fn = p.score;
  rule.inv_temperature = 1.0 / static_cast<double>(p.temperature);
  detail::weight_backward_impl(be, rule, logits, plan, dweight, dlogits, [] { return detail::no_selector<T>{}; });
}

// Sinkhorn: w = sigmoid(logit) for top_k == 1, softmax(logits) over all E for top_k > 1.
template <execution_backend Backend, input_scalar T>
void weight_backward(const Backend& be, const sinkhorn& p, matrix_view<const T> logits, const plan_view<>& plan,
                     vector_view<const T> dweight, matrix_view<T> dlogits) {
  detail::check_weight_backward(logits, plan, dweight, dlogits);
  p.validate(logits.cols);
  detail::weight_rule rule;
  rule.fn = p.top_k == 1 ? resonance::score::sigmoid : resonance::score::softmax;
  detail::weight_backward_impl(be, rule, logits, plan, dweight, dlogits, [] { return detail::no_selector<T>{}; });
}

}  // namespace routing

// The outputs of resonance::backward, views the caller owns (each is overwritten when given):
//   dlogits  T×E: ∂/∂logits; empty: computed in an internal buffer and not returned;
//   dx       T×d: ∂/∂x; empty: not wanted;
//   dweight  E×d: ∂/∂(gate weight) for linear, ∂/∂(embeddings) for cosine; must stay empty for the
//            parameter-free affinities (precomputed, grap, grap_cosine); empty: not wanted;
//   dbias    E:   ∂/∂(gate bias), linear only (a linear gate without a bias may still ask for it: it gets
//            what a bias would get); empty: not wanted.
template <class T>
struct router_gradients {
  matrix_view<T> dlogits = {};
  matrix_view<T> dx = {};
  matrix_view<T> dweight = {};
  vector_view<T> dbias = {};
};

namespace detail {

template <class A, class Backend, class T>
concept affinity_backward_full = requires(const A& a, const Backend& be, matrix_view<const T> x,
                                          matrix_view<const T> dl, matrix_view<T> m, vector_view<T> v) {
  a.backward(be, x, dl, m, m, v);
};
template <class A, class Backend, class T>
concept affinity_backward_weight = requires(const A& a, const Backend& be, matrix_view<const T> x,
                                            matrix_view<const T> dl, matrix_view<T> m) {
  a.backward(be, x, dl, m, m);
};
template <class A, class Backend, class T>
concept affinity_backward_input = requires(const A& a, const Backend& be, matrix_view<const T> x,
                                           matrix_view<const T> dl, matrix_view<T> m) {
  a.backward(be, x, dl, m);
};

}  // namespace detail

// The backward pass of router::route: given the router, the input x (T×d) that route() was called
// with, the plan it produced, and dweight (one entry per kept assignment, in plan.token_weight()
// order: dweight_i = <dL/dy_t, expert output of assignment i>), computes the gradient of
// Σ_i dweight_i · w_i with respect to the logits (recomputed from x with the affinity's forward, in
// x's precision), then through the affinity to x and its parameters (see router_gradients). Selection
// and capacity are held fixed. Every argument is validated before anything is written; a call that
// throws resonance::error leaves every output untouched.
template <execution_backend Backend, affinity_policy Affinity, routing_policy Direction, capacity_policy Capacity,
          input_scalar T>
void backward(const Backend& be, const router<Affinity, Direction, Capacity>& r, matrix_view<const T> x,
              const plan_view<>& plan, vector_view<const std::type_identity_t<T>> dweight,
              const router_gradients<std::type_identity_t<T>>& grads) {
  using S = std::remove_cv_t<T>;
  static_assert(
      requires(const Affinity& a, matrix_view<const S> in, matrix_view<S> out) { a.forward(be, in, out); },
      "resonance::backward: the affinity needs forward(backend, x, logits)");
  constexpr bool full = detail::affinity_backward_full<Affinity, Backend, S>;
  constexpr bool weight_only = !full && detail::affinity_backward_weight<Affinity, Backend, S>;
  constexpr bool input_only = !full && !weight_only && detail::affinity_backward_input<Affinity, Backend, S>;
  static_assert(full || weight_only || input_only, "resonance::backward: the affinity needs a backward(...)");
  static_assert(
      requires(matrix_view<const S> l, matrix_view<S> dl) {
        weight_backward(be, r.direction, l, plan, vector_view<const S>{}, dl);
      },
      "resonance::backward: the routing direction needs a weight_backward overload");

  // Validation, before anything is computed or written.
  detail::check_matrix(x, "input");
  const index E = r.validate(x.cols);
  const index T_ = x.rows, d = x.cols;
  const auto sz = [](index n) { return static_cast<std::size_t>(n); };
  if (!grads.dlogits.empty()) detail::check_matrix(grads.dlogits, "dlogits", T_, E);
  if (!grads.dx.empty()) detail::check_matrix(grads.dx, "dx", T_, d);
  if constexpr (full || weight_only) {
    if (!grads.dweight.empty()) detail::check_matrix(grads.dweight, "dweight (gate)", E, d);
  } else {
    detail::require(grads.dweight.empty(), "dweight (gate)", "empty (the affinity has no weight)", grads.dweight.rows,
                    "x", grads.dweight.cols);
  }
  if constexpr (full) {
    detail::require(grads.dbias.empty() || grads.dbias.size == E, "dbias",
                    "empty or " + std::to_string(E) + " entries (one per expert)", grads.dbias.size);
    detail::require(grads.dbias.empty() || grads.dbias.data != nullptr, "dbias", "non-null data");
  } else {
    detail::require(grads.dbias.empty(), "dbias", "empty (the affinity has no bias)", grads.dbias.size);
  }

  // Logits in x's precision, then the weights' backward into dlogits (validates plan and dweight).
  std::vector<S> lbuf(sz(T_ * E));
  const matrix_view<S> logits{lbuf.data(), T_, E, E};
  r.affinity.forward(be, x, logits);
  // A dlogits view given by the caller is written last, once everything has succeeded.
  std::vector<S> staged(sz(T_ * E));
  const matrix_view<S> dls{staged.data(), T_, E, E};
  weight_backward(be, r.direction, matrix_view<const S>(logits), plan, dweight, dls);

  const bool want_params = !grads.dweight.empty() || !grads.dbias.empty();
  if (!grads.dx.empty() || want_params) {
    std::vector<S> dx_buf, dw_buf, db_buf;
    matrix_view<S> dx = grads.dx;
    if (dx.empty()) {
      dx_buf.resize(sz(T_ * d));
      dx = {dx_buf.data(), T_, d, d};
    }
    if constexpr (full || weight_only) {
      matrix_view<S> dw = grads.dweight;
      if (dw.empty()) {
        dw_buf.resize(sz(E * d));
        dw = {dw_buf.data(), E, d, d};
      }
      if constexpr (full) {
        vector_view<S> db = grads.dbias;
        if (db.empty() && !r.affinity.bias.empty()) {
          db_buf.resize(sz(E));
          db = {db_buf.data(), E};
        }
        r.affinity.backward(be, x, matrix_view<const S>(dls), dx, dw, db);
      } else {
        r.affinity.backward(be, x, matrix_view<const S>(dls), dx, dw);
      }
    } else {
      r.affinity.backward(be, x, matrix_view<const S>(dls), dx);
    }
  }
  if (!grads.dlogits.empty())
    for (index t = 0; t < T_; ++t)
      for (index e = 0; e < E; ++e) grads.dlogits(t, e) = staged[sz(t * E + e)];
}

// The same on backend::serial.
template <affinity_policy Affinity, routing_policy Direction, capacity_policy Capacity, input_scalar T>
void backward(const router<Affinity, Direction, Capacity>& r, matrix_view<const T> x, const plan_view<>& plan,
              vector_view<const std::type_identity_t<T>> dweight,
              const router_gradients<std::type_identity_t<T>>& grads) {
  backward(backend::serial{}, r, x, plan, dweight, grads);
}

}  // namespace resonance
