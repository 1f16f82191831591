// Backward through routing against central finite differences in double of F = Σ_i dweight_i · w_i,
// with w_i written out independently in this file and the selection taken from the library's own
// routing of the perturbed inputs (checked unchanged); a coarse check through the plan's fp32 weights;
// the chain through every affinity to dx, dW and db; and the argument errors.

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/affinity/linear.hpp>
#include <resonance/backward.hpp>
#include <resonance/resonance.hpp>

#include "error_of.hpp"
#include "random_inputs.hpp"

namespace {

namespace rs = resonance;
namespace rt = resonance::routing;
using resonance_test::usz;
using mask = std::vector<unsigned char>;  // T×E membership

// ---------------------------------------------------------------------------------------------------
// Independent weight formulas (double).

double ref_elementwise(rs::score fn, double z) {
  if (fn == rs::score::sigmoid) return 1.0 / (1.0 + std::exp(-z));
  if (fn == rs::score::sqrt_softplus) return std::sqrt(z > 20.0 ? z : std::log(1.0 + std::exp(z)));
  return z;
}

// The full score row of z = l / tau: softmax over all E, or elementwise.
std::vector<double> ref_full(rs::score fn, const double* l, rs::index E, double tau) {
  std::vector<double> s(usz(E));
  if (fn == rs::score::softmax) {
    double sum = 0.0;
    for (rs::index e = 0; e < E; ++e) sum += std::exp(l[e] / tau);
    for (rs::index e = 0; e < E; ++e) s[usz(e)] = std::exp(l[e] / tau) / sum;
  } else {
    for (rs::index e = 0; e < E; ++e) s[usz(e)] = ref_elementwise(fn, l[e] / tau);
  }
  return s;
}

// Token choice's weights of one token for every expert of the proposal set `sel` (0 elsewhere).
std::vector<double> ref_token_choice(const rt::token_choice& p, const double* l, rs::index E,
                                     const unsigned char* sel) {
  const double tau = p.temperature, sf = p.scaling_factor;
  std::vector<double> w(usz(E), 0.0);
  if (p.score == rs::score::softmax && !p.pre_softmax) {
    double sum = 0.0;
    for (rs::index e = 0; e < E; ++e)
      if (sel[e]) sum += std::exp(l[e] / tau);
    for (rs::index e = 0; e < E; ++e)
      if (sel[e]) w[usz(e)] = sf * std::exp(l[e] / tau) / sum;
    return w;
  }
  const std::vector<double> s = ref_full(p.score, l, E, tau);
  bool renorm = p.renorm == rt::renormalize::always;
  if (p.renorm == rt::renormalize::automatic)
    renorm = (p.score == rs::score::sigmoid || p.score == rs::score::sqrt_softplus) && p.top_k > 1;
  double denom = 1.0;
  if (renorm) {
    denom = p.renorm_epsilon;
    for (rs::index e = 0; e < E; ++e)
      if (sel[e]) denom += s[usz(e)];
  }
  for (rs::index e = 0; e < E; ++e)
    if (sel[e]) w[usz(e)] = sf * s[usz(e)] / denom;
  return w;
}

std::vector<double> ref_weights(const rt::token_choice& p, const double* l, rs::index E, const unsigned char* sel) {
  return ref_token_choice(p, l, E, sel);
}
std::vector<double> ref_weights(const rt::bidirectional& p, const double* l, rs::index E, const unsigned char* sel) {
  return ref_token_choice(p.proposal(), l, E, sel);
}
std::vector<double> ref_weights(const rt::expert_choice& p, const double* l, rs::index E, const unsigned char*) {
  return ref_full(p.score, l, E, p.temperature);
}
std::vector<double> ref_weights(const rt::sinkhorn& p, const double* l, rs::index E, const unsigned char*) {
  if (p.top_k == 1) return ref_full(rs::score::sigmoid, l, E, 1.0);
  return ref_full(rs::score::softmax, l, E, 1.0);
}

// ---------------------------------------------------------------------------------------------------
// Plans: selection, masks, F.

struct selection {
  std::vector<rs::id_type> offsets, experts;
  friend bool operator==(const selection&, const selection&) = default;
};

selection selection_of(const rs::routing_plan& p) {
  return {{p.token_offsets().begin(), p.token_offsets().end()}, {p.token_expert().begin(), p.token_expert().end()}};
}

mask mask_of(const rs::routing_plan& p) {
  mask m(usz(p.num_tokens() * p.num_experts()), 0);
  for (rs::index t = 0; t < p.num_tokens(); ++t)
    for (rs::id_type i = p.token_offsets()[usz(t)]; i < p.token_offsets()[usz(t + 1)]; ++i)
      m[usz(t * p.num_experts() + p.token_expert()[usz(i)])] = 1;
  return m;
}

// F(l) = Σ_i dw_i · w_i(l) with the kept set of `plan` and the proposal set `sel` held fixed.
template <class Direction>
double objective(const Direction& dir, const std::vector<double>& l, rs::index E, const rs::routing_plan& plan,
                 const mask& sel, const std::vector<double>& dw) {
  double f = 0.0;
  for (rs::index t = 0; t < plan.num_tokens(); ++t) {
    const std::vector<double> w = ref_weights(dir, l.data() + t * E, E, sel.data() + t * E);
    for (rs::id_type i = plan.token_offsets()[usz(t)]; i < plan.token_offsets()[usz(t + 1)]; ++i)
      f += dw[usz(i)] * w[usz(plan.token_expert()[usz(i)])];
  }
  return f;
}

double max_abs(const std::vector<double>& v) {
  double m = 0.0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

double rel_error(const std::vector<double>& got, const std::vector<double>& want) {
  double m = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) m = std::max(m, std::fabs(got[i] - want[i]));
  return m / std::max(max_abs(want), 1e-9);  // a constant weight (top-1 softmax) has gradient 0
}

template <class Direction>
constexpr bool proposes_first =
    std::is_same_v<Direction, rt::token_choice> || std::is_same_v<Direction, rt::bidirectional>;

// Routes the T×E double logits with `dir` and `cap`; checks the gradient of weight_backward (and of
// resonance::backward with the precomputed affinity) against central differences of the independent
// formula (rel < 1e-6) and of the plan's fp32 weights (rel < 1e-3).
template <class Direction, class Capacity>
void check_direction(const Direction& dir, const Capacity& cap, rs::index T, rs::index E, std::uint64_t seed,
                     double offset = 0.0, bool expect_drops = false) {
  std::mt19937_64 rng(seed);
  std::vector<double> l = resonance_test::normal_values<double>(rng, T * E, 1.5);
  for (double& v : l) v += offset;
  const rs::router<rs::affinity::precomputed, Direction, Capacity> r{{}, dir, cap};
  const rs::router<rs::affinity::precomputed, Direction, rs::capacity::dropless> proposer{{}, dir, {}};
  const auto view = [&](const std::vector<double>& v) { return rs::matrix_view<const double>{v.data(), T, E}; };
  const rs::routing_plan plan = r.route(view(l));
  const mask sel = proposes_first<Direction> ? mask_of(proposer.route(view(l))) : mask_of(plan);
  if (expect_drops) CHECK(plan.num_dropped() > 0);
  const rs::index n = plan.num_assignments();
  REQUIRE(n > 0);
  const std::vector<double> dw = resonance_test::normal_values<double>(rng, n, 1.0);
  const rs::vector_view<const double> dwv{dw.data(), n};

  std::vector<double> dl(usz(T * E), -7.0);
  weight_backward(rs::backend::serial{}, dir, view(l), plan.view(), dwv, rs::matrix_view<double>{dl.data(), T, E});

  // resonance::backward with the precomputed affinity: dx = dlogits, identical bits.
  std::vector<double> dl2(usz(T * E)), dx(usz(T * E));
  rs::backward(r, view(l), plan.view(), dwv,
               rs::router_gradients<double>{.dlogits = {dl2.data(), T, E}, .dx = {dx.data(), T, E}});
  CHECK(dl2 == dl);
  CHECK(dx == dl);

  // fp32 path: float logits, float dweight, same gradient to fp32 accuracy.
  std::vector<float> lf(l.begin(), l.end()), dwf(dw.begin(), dw.end()), dlf(usz(T * E));
  const rs::matrix_view<const float> lfv{lf.data(), T, E};
  REQUIRE(selection_of(r.route(lfv)) == selection_of(plan));
  weight_backward(rs::backend::serial{}, dir, lfv, plan.view(), rs::vector_view<const float>{dwf.data(), n},
                  rs::matrix_view<float>{dlf.data(), T, E});

  const selection base = selection_of(plan);
  const auto same_selection = [&](const std::vector<double>& lp) {
    return selection_of(r.route(view(lp))) == base &&
           (!proposes_first<Direction> || mask_of(proposer.route(view(lp))) == sel);
  };
  std::vector<double> fd(usz(T * E)), fd_plan(usz(T * E));
  const double h = 1e-5, hc = 2e-3;
  for (rs::index i = 0; i < T * E; ++i) {
    std::vector<double> lp = l, lm = l;
    lp[usz(i)] += h;
    lm[usz(i)] -= h;
    REQUIRE(same_selection(lp));
    REQUIRE(same_selection(lm));
    fd[usz(i)] = (objective(dir, lp, E, plan, sel, dw) - objective(dir, lm, E, plan, sel, dw)) / (2.0 * h);
    // Coarse: through the plan's fp32 weights.
    lp[usz(i)] = l[usz(i)] + hc;
    lm[usz(i)] = l[usz(i)] - hc;
    const rs::routing_plan pp = r.route(view(lp)), pm = r.route(view(lm));
    REQUIRE(selection_of(pp) == base);
    REQUIRE(selection_of(pm) == base);
    double fp = 0.0, fm = 0.0;
    for (rs::index j = 0; j < n; ++j) {
      fp += dw[usz(j)] * static_cast<double>(pp.token_weight()[usz(j)]);
      fm += dw[usz(j)] * static_cast<double>(pm.token_weight()[usz(j)]);
    }
    fd_plan[usz(i)] = (fp - fm) / (2.0 * hc);
  }
  CHECK(rel_error(dl, fd) < 1e-6);
  CHECK(rel_error(dl, fd_plan) < 1e-3);
  CHECK(rel_error(std::vector<double>(dlf.begin(), dlf.end()), fd) < 1e-4);
}

// ---------------------------------------------------------------------------------------------------

TEST_CASE("test_backward: token choice softmax after top-k with capacity drops") {
  check_direction(rt::token_choice{.top_k = 2}, rs::capacity::factor{.factor = 0.6}, 10, 8, 1, 0.0, true);
  check_direction(rt::token_choice{.top_k = 1}, rs::capacity::factor{.factor = 0.7}, 10, 4, 2, 0.0, true);
  check_direction(rt::token_choice{.top_k = 3, .temperature = 0.7f, .scaling_factor = 2.5f}, rs::capacity::dropless{},
                  7, 8, 3);
}

TEST_CASE("test_backward: token choice pre-softmax") {
  check_direction(rt::token_choice{.top_k = 2, .pre_softmax = true}, rs::capacity::factor{.factor = 0.6}, 10, 8, 4, 0.0,
                  true);
  check_direction(rt::token_choice{.top_k = 3,
                                   .pre_softmax = true,
                                   .temperature = 1.7f,
                                   .renorm = rt::renormalize::always,
                                   .scaling_factor = 1.5f},
                  rs::capacity::dropless{}, 8, 6, 5);
}

TEST_CASE("test_backward: token choice sigmoid and sqrt_softplus with every renormalisation") {
  for (const rs::score fn : {rs::score::sigmoid, rs::score::sqrt_softplus}) {
    CAPTURE(static_cast<int>(fn));
    for (const rt::renormalize rn : {rt::renormalize::automatic, rt::renormalize::always, rt::renormalize::never}) {
      CAPTURE(static_cast<int>(rn));
      check_direction(rt::token_choice{.top_k = 3, .score = fn, .renorm = rn}, rs::capacity::factor{.factor = 0.7}, 10,
                      8, 6, 0.0, true);
      check_direction(rt::token_choice{.top_k = 1, .score = fn, .temperature = 0.8f, .renorm = rn},
                      rs::capacity::dropless{}, 6, 5, 7);
    }
    check_direction(rt::token_choice{.top_k = 2, .score = fn, .renorm_epsilon = 0.1f, .scaling_factor = 2.0f},
                    rs::capacity::dropless{}, 6, 6, 8);
  }
}

TEST_CASE("test_backward: token choice identity score") {
  for (const rt::renormalize rn : {rt::renormalize::automatic, rt::renormalize::always, rt::renormalize::never})
    check_direction(
        rt::token_choice{
            .top_k = 2, .score = rs::score::identity, .temperature = 1.3f, .renorm = rn, .scaling_factor = 0.5f},
        rs::capacity::factor{.factor = 0.8}, 9, 6, 9, 3.0);
}

TEST_CASE("test_backward: token choice expert bias and groups only select") {
  const std::vector<float> bias{0.9f, -1.2f, 0.4f, 0.0f, -0.6f, 1.1f, -0.3f, 0.7f};
  const rs::vector_view<const float> bv{bias.data(), 8};
  check_direction(rt::token_choice{.top_k = 2, .expert_bias = bv}, rs::capacity::factor{.factor = 0.7}, 10, 8, 10);
  check_direction(rt::token_choice{.top_k = 3, .score = rs::score::sigmoid, .expert_bias = bv},
                  rs::capacity::dropless{}, 8, 8, 11);
  check_direction(rt::token_choice{.top_k = 3, .pre_softmax = true, .expert_bias = bv}, rs::capacity::dropless{}, 8, 8,
                  12);
  check_direction(rt::token_choice{.top_k = 4, .num_groups = 4, .group_topk = 2}, rs::capacity::dropless{}, 8, 8, 13);
  check_direction(
      rt::token_choice{.top_k = 4, .score = rs::score::sigmoid, .expert_bias = bv, .num_groups = 2, .group_topk = 1},
      rs::capacity::factor{.factor = 0.8}, 10, 8, 14);
}

TEST_CASE("test_backward: bidirectional") {
  check_direction(rt::bidirectional{.top_k = 2}, rs::capacity::factor{.factor = 0.6}, 10, 8, 15, 0.0, true);
  check_direction(rt::bidirectional{.top_k = 3, .score = rs::score::sigmoid, .rank = rt::rank_by::score},
                  rs::capacity::factor{.factor = 0.7}, 10, 8, 16, 0.0, true);
  check_direction(rt::bidirectional{.top_k = 1, .temperature = 0.5f, .causal = true},
                  rs::capacity::factor{.factor = 0.8}, 10, 4, 17);
}

TEST_CASE("test_backward: expert choice for every score") {
  for (const rs::score fn : {rs::score::softmax, rs::score::sigmoid, rs::score::sqrt_softplus, rs::score::identity}) {
    CAPTURE(static_cast<int>(fn));
    check_direction(rt::expert_choice{.top_k = 2, .score = fn, .temperature = 0.9f},
                    rs::capacity::factor{.factor = 1.0}, 10, 6, 18);
    check_direction(rt::expert_choice{.top_k = 1, .score = fn, .causal = true}, rs::capacity::factor{.factor = 0.8}, 9,
                    4, 19);
  }
}

TEST_CASE("test_backward: sinkhorn top-1 and top-2") {
  check_direction(rt::sinkhorn{.top_k = 1}, rs::capacity::dropless{}, 10, 4, 20);
  check_direction(rt::sinkhorn{.top_k = 2}, rs::capacity::factor{.factor = 0.8}, 10, 6, 21);
}

// ---------------------------------------------------------------------------------------------------
// The chain through the affinities.

// logits_of() computes the logits independently from the current contents of the inputs the router's
// affinity views; params are the vectors (x first) whose entries are differentiated, grads the
// library's gradients in the same order.
template <class Router, class LogitsFn>
void check_chain(const Router& r, rs::index T, rs::index d, std::vector<double>& x, LogitsFn&& logits_of,
                 std::vector<std::vector<double>*> params, std::uint64_t seed) {
  const rs::index E = r.affinity.experts_for(d);
  const rs::router<typename Router::affinity_type, rt::token_choice, rs::capacity::dropless> proposer{
      r.affinity, r.direction, {}};
  const auto xv = [&] { return rs::matrix_view<const double>{x.data(), T, d}; };
  const rs::routing_plan plan = r.route(xv());
  const mask sel = mask_of(proposer.route(xv()));
  const selection base = selection_of(plan);
  std::mt19937_64 rng(seed);
  const rs::index n = plan.num_assignments();
  const std::vector<double> dw = resonance_test::normal_values<double>(rng, n, 1.0);

  std::vector<double> dl(usz(T * E)), dx(usz(T * d)), dW(usz(E * d)), db(usz(E));
  rs::router_gradients<double> g{.dlogits = {dl.data(), T, E}, .dx = {dx.data(), T, d}};
  if (params.size() > 1) g.dweight = {dW.data(), E, d};
  if (params.size() > 2) g.dbias = {db.data(), E};
  rs::backward(rs::backend::serial{}, r, xv(), plan.view(), rs::vector_view<const double>{dw.data(), n}, g);

  // dlogits against the direction's FD on the independently computed logits.
  const std::vector<double> l0 = logits_of();
  {
    std::vector<double> fd(usz(T * E));
    for (rs::index i = 0; i < T * E; ++i) {
      std::vector<double> lp = l0, lm = l0;
      lp[usz(i)] += 1e-5;
      lm[usz(i)] -= 1e-5;
      fd[usz(i)] = (objective(r.direction, lp, E, plan, sel, dw) - objective(r.direction, lm, E, plan, sel, dw)) / 2e-5;
    }
    CHECK(rel_error(dl, fd) < 1e-6);
  }

  const std::vector<std::vector<double>*> got{&dx, &dW, &db};
  for (std::size_t p = 0; p < params.size(); ++p) {
    CAPTURE(p);
    std::vector<double>& v = *params[p];
    std::vector<double> fd(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) {
      const double v0 = v[i], h = 1e-6 * std::max(1.0, std::fabs(v0));
      v[i] = v0 + h;
      REQUIRE(selection_of(r.route(xv())) == base);
      const double fp = objective(r.direction, logits_of(), E, plan, sel, dw);
      v[i] = v0 - h;
      REQUIRE(selection_of(r.route(xv())) == base);
      const double fm = objective(r.direction, logits_of(), E, plan, sel, dw);
      v[i] = v0;
      fd[i] = (fp - fm) / (2.0 * h);
    }
    REQUIRE(max_abs(fd) > 1e-6);
    CHECK(rel_error(*got[p], fd) < 1e-6);
  }
}

TEST_CASE("test_backward: chain through linear and cosine gates to dx and dW") {
  const rs::index T = 9, d = 6, E = 5;
  std::mt19937_64 rng(30);
  std::vector<double> x = resonance_test::normal_values<double>(rng, T * d, 1.0);
  std::vector<double> W = resonance_test::normal_values<double>(rng, E * d, 0.8);
  std::vector<double> b = resonance_test::normal_values<double>(rng, E, 0.5);
  const rt::token_choice tc{.top_k = 2};

  SUBCASE("linear with bias") {
    const rs::router<rs::affinity::linear_double, rt::token_choice, rs::capacity::factor> r{
        {.weight = {W.data(), E, d}, .bias = {b.data(), E}}, tc, {.factor = 0.7}};
    check_chain(
        r, T, d, x,
        [&] {
          std::vector<double> l(usz(T * E));
          for (rs::index t = 0; t < T; ++t)
            for (rs::index e = 0; e < E; ++e) {
              double s = b[usz(e)];
              for (rs::index j = 0; j < d; ++j) s += x[usz(t * d + j)] * W[usz(e * d + j)];
              l[usz(t * E + e)] = s;
            }
          return l;
        },
        {&x, &W, &b}, 31);
  }
  SUBCASE("cosine") {
    const rs::router<rs::affinity::cosine_double, rt::token_choice, rs::capacity::factor> r{
        {.weight = {W.data(), E, d}, .temperature = 0.25f}, {.top_k = 2, .score = rs::score::sigmoid}, {.factor = 0.7}};
    check_chain(
        r, T, d, x,
        [&] {
          std::vector<double> l(usz(T * E));
          for (rs::index t = 0; t < T; ++t)
            for (rs::index e = 0; e < E; ++e) {
              double xy = 0.0, xx = 0.0, yy = 0.0;
              for (rs::index j = 0; j < d; ++j) {
                xy += x[usz(t * d + j)] * W[usz(e * d + j)];
                xx += x[usz(t * d + j)] * x[usz(t * d + j)];
                yy += W[usz(e * d + j)] * W[usz(e * d + j)];
              }
              l[usz(t * E + e)] = xy / std::sqrt(xx * yy) / 0.25;
            }
          return l;
        },
        {&x, &W}, 32);
  }
}

TEST_CASE("test_backward: chain through grap and grap_cosine to dx") {
  const rs::index T = 9, E = 4, g = 3, d = E * g;
  std::mt19937_64 rng(33);
  std::vector<double> x = resonance_test::normal_values<double>(rng, T * d, 1.0);
  const auto group_sums = [&](rs::index t, rs::index e) {
    double s = 0.0;
    for (rs::index j = e * g; j < (e + 1) * g; ++j) s += x[usz(t * d + j)];
    return s;
  };
  SUBCASE("grap") {
    const rs::router<rs::affinity::grap, rt::token_choice, rs::capacity::factor> r{
        {.num_experts = E}, {.top_k = 2, .temperature = 0.3f}, {.factor = 0.7}};
    check_chain(
        r, T, d, x,
        [&] {
          std::vector<double> l(usz(T * E));
          for (rs::index t = 0; t < T; ++t)
            for (rs::index e = 0; e < E; ++e) l[usz(t * E + e)] = group_sums(t, e) / static_cast<double>(g);
          return l;
        },
        {&x}, 34);
  }
  SUBCASE("grap_cosine") {
    const rs::router<rs::affinity::grap_cosine, rt::token_choice, rs::capacity::factor> r{
        {.num_experts = E},
        {.top_k = 2, .score = rs::score::identity, .temperature = 0.2f, .renorm = rt::renormalize::never},
        {.factor = 0.7}};
    check_chain(
        r, T, d, x,
        [&] {
          std::vector<double> l(usz(T * E));
          for (rs::index t = 0; t < T; ++t) {
            double nn = 0.0;
            for (rs::index j = 0; j < d; ++j) nn += x[usz(t * d + j)] * x[usz(t * d + j)];
            for (rs::index e = 0; e < E; ++e)
              l[usz(t * E + e)] = group_sums(t, e) / (std::sqrt(static_cast<double>(g)) * std::sqrt(nn));
          }
          return l;
        },
        {&x}, 35);
  }
}

TEST_CASE("test_backward: float input through the linear gate matches double") {
  const rs::index T = 7, d = 5, E = 4;
  std::mt19937_64 rng(36);
  const std::vector<double> xd = resonance_test::normal_values<double>(rng, T * d, 1.0);
  const std::vector<double> Wd = resonance_test::normal_values<double>(rng, E * d, 1.0);
  const std::vector<float> xf(xd.begin(), xd.end()), Wf(Wd.begin(), Wd.end());
  const rs::router<rs::affinity::linear, rt::token_choice, rs::capacity::dropless> r{
      {.weight = {Wf.data(), E, d}}, {.top_k = 2}, {}};
  const rs::routing_plan plan = r.route(rs::matrix_view<const float>{xf.data(), T, d});
  const std::vector<float> dw = resonance_test::normal_values<float>(rng, plan.num_assignments(), 1.0);
  std::vector<float> dx(usz(T * d)), dW(usz(E * d));
  rs::backward(r, rs::matrix_view<const float>{xf.data(), T, d}, plan.view(),
               rs::vector_view<const float>{dw.data(), plan.num_assignments()},
               rs::router_gradients<float>{.dx = {dx.data(), T, d}, .dweight = {dW.data(), E, d}});
  // The same in double (the float values widened exactly).
  const std::vector<double> xw(xf.begin(), xf.end()), Ww(Wf.begin(), Wf.end()), dww(dw.begin(), dw.end());
  const rs::router<rs::affinity::linear_double, rt::token_choice, rs::capacity::dropless> rd{
      {.weight = {Ww.data(), E, d}}, {.top_k = 2}, {}};
  std::vector<double> dxd(usz(T * d)), dWd(usz(E * d));
  rs::backward(rd, rs::matrix_view<const double>{xw.data(), T, d}, plan.view(),
               rs::vector_view<const double>{dww.data(), plan.num_assignments()},
               rs::router_gradients<double>{.dx = {dxd.data(), T, d}, .dweight = {dWd.data(), E, d}});
  CHECK(rel_error(std::vector<double>(dx.begin(), dx.end()), dxd) < 1e-5);
  CHECK(rel_error(std::vector<double>(dW.begin(), dW.end()), dWd) < 1e-5);
}

// ---------------------------------------------------------------------------------------------------
// Errors: the argument is named and nothing is written.

TEST_CASE("test_backward: errors name the argument and leave outputs untouched") {
  using resonance_test::error_of;
  const rs::index T = 6, E = 4, d = 8;
  std::mt19937_64 rng(40);
  const std::vector<double> l = resonance_test::normal_values<double>(rng, T * E, 1.0);
  const rs::matrix_view<const double> lv{l.data(), T, E};
  const rt::token_choice tc{.top_k = 1};
  const rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::dropless> r{{}, tc, {}};
  const rs::routing_plan plan = r.route(lv);
  const std::vector<double> dw(usz(plan.num_assignments()), 1.0);
  const rs::vector_view<const double> dwv{dw.data(), plan.num_assignments()};
  std::vector<double> out(usz(T * E), 7.0);
  const rs::matrix_view<double> ov{out.data(), T, E};
  const auto untouched = [](const std::vector<double>& v) {
    return std::all_of(v.begin(), v.end(), [](double x) { return x == 7.0; });
  };

  CHECK(error_of([&] {
          weight_backward(rs::backend::serial{}, tc, lv, plan.view(),
                          rs::vector_view<const double>{dw.data(), plan.num_assignments() - 1}, ov);
        }).find("dweight") != std::string::npos);
  CHECK(
      error_of([&] {
        weight_backward(rs::backend::serial{}, tc, lv, plan.view(), dwv, rs::matrix_view<double>{out.data(), T, E - 1});
      }).find("dlogits") != std::string::npos);
  const rs::routing_plan shorter = r.route(rs::matrix_view<const double>{l.data(), T - 1, E});
  CHECK(error_of([&] { weight_backward(rs::backend::serial{}, tc, lv, shorter.view(), dwv, ov); }).find("plan") !=
        std::string::npos);
  // A plan routed from other logits: the kept top-1 expert of some token is not its top-1 here.
  std::vector<double> neg(l);
  for (double& v : neg) v = -v;
  const rs::routing_plan other = r.route(rs::matrix_view<const double>{neg.data(), T, E});
  CHECK(error_of([&] { weight_backward(rs::backend::serial{}, tc, lv, other.view(), dwv, ov); }).find("plan") !=
        std::string::npos);
  CHECK(error_of([&] {
          rs::backward(r, lv, other.view(), dwv, rs::router_gradients<double>{.dlogits = ov});
        }).find("plan") != std::string::npos);
  CHECK(untouched(out));

  // The chain: shapes of dx, dweight on a parameter-free gate, x against the plan.
  const std::vector<double> x = resonance_test::normal_values<double>(rng, T * d, 1.0);
  const rs::matrix_view<const double> xv{x.data(), T, d};
  const rs::router<rs::affinity::grap, rt::token_choice, rs::capacity::dropless> rg{{.num_experts = E}, tc, {}};
  const rs::routing_plan gp = rg.route(xv);
  const rs::vector_view<const double> gdw{dw.data(), gp.num_assignments()};
  std::vector<double> dx(usz(T * d), 7.0), dW(usz(E * d), 7.0);
  CHECK(
      error_of([&] {
        rs::backward(rg, xv, gp.view(), gdw, rs::router_gradients<double>{.dlogits = ov, .dx = {dx.data(), T, d - 1}});
      }).find("dx") != std::string::npos);
  CHECK(error_of([&] {
          rs::backward(
              rg, xv, gp.view(), gdw,
              rs::router_gradients<double>{.dlogits = ov, .dx = {dx.data(), T, d}, .dweight = {dW.data(), E, d}});
        }).find("dweight") != std::string::npos);
  CHECK(error_of([&] {
          rs::backward(rg, rs::matrix_view<const double>{x.data(), T - 1, d}, gp.view(),
                       rs::vector_view<const double>{dw.data(), gp.num_assignments()},
                       rs::router_gradients<double>{.dlogits = {out.data(), T - 1, E}, .dx = {dx.data(), T - 1, d}});
        }).find("plan") != std::string::npos);
  CHECK(error_of([&] {
          rs::backward(rg, xv, gp.view(), rs::vector_view<const double>{dw.data(), gp.num_assignments() + 1},
                       rs::router_gradients<double>{.dlogits = ov, .dx = {dx.data(), T, d}});
        }).find("dweight") != std::string::npos);
  CHECK(untouched(out));
  CHECK(untouched(dx));
  CHECK(untouched(dW));
}

}  // namespace
