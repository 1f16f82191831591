// Expert choice and Sinkhorn routing against brute-force references written here, in double and with
// std::stable_sort (no code shared with the library):
//   expert choice: per expert, stable-sort the tokens by S[:, e] descending and keep the first C;
//   causal:        per token, the candidates (threshold or top-k by S), then per expert the earliest C;
//   Sinkhorn:      Megatron-Core's sinkhorn loop as written there (cost = exp(logits), no max
//                  subtraction), then a stable top-k of each row of P; weights sigmoid / softmax.
// Plus properties: causality (and its violation by non-causal expert choice), the doubly stochastic
// P, plan invariants (tests/reference.hpp), determinism across block splits, and every error path.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/resonance.hpp>

#include "backends.hpp"
#include "error_of.hpp"
#include "random_inputs.hpp"
#include "reference.hpp"

namespace {

namespace rs = resonance;
namespace rt = resonance::routing;
using resonance_test::close_rel;
using resonance_test::error_of;
using resonance_test::sz;

template <class Capacity>
using ec_router = rs::router<rs::affinity::precomputed, rt::expert_choice, Capacity>;
template <class Capacity>
using sk_router = rs::router<rs::affinity::precomputed, rt::sinkhorn, Capacity>;
using tc_router = rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::factor>;

rs::matrix_view<const float> view(const std::vector<float>& x, rs::index T, rs::index E) {
  return {T > 0 ? x.data() : nullptr, T, E};
}

template <class Router, class Backend = rs::backend::serial>
rs::routing_plan route(const Router& r, const std::vector<float>& x, rs::index T, rs::index E, Backend be = {}) {
  return r.route(be, view(x, T, E));
}

// A backend whose primitives run rows last first (tests/backends.hpp): any result that depends on the
// order of the work differs from serial's.
using odd_blocks = resonance_test::scrambled_backend;

// ---------------------------------------------------------------------------------------------------
// References.

// The full score distribution of one row in double: softmax over all E, or the elementwise function.
std::vector<double> ref_scores(rs::score fn, float temperature, const float* row, rs::index E) {
  std::vector<double> z(sz(E)), s(sz(E));
  for (rs::index e = 0; e < E; ++e) z[sz(e)] = static_cast<double>(row[e]) / static_cast<double>(temperature);
  if (fn == rs::score::softmax) {
    const double m = *std::max_element(z.begin(), z.end());
    double sum = 0.0;
    for (double v : z) sum += std::exp(v - m);
    for (rs::index e = 0; e < E; ++e) s[sz(e)] = std::exp(z[sz(e)] - m) / sum;
  } else {
    for (rs::index e = 0; e < E; ++e) s[sz(e)] = resonance_test::ref_elementwise(fn, z[sz(e)]);
  }
  return s;
}

// S for a whole batch, T×E row-major.
std::vector<double> ref_score_matrix(rs::score fn, float temperature, const std::vector<float>& x, rs::index T,
                                     rs::index E) {
  std::vector<double> S(sz(T * E));
  for (rs::index t = 0; t < T; ++t) {
    const std::vector<double> s = ref_scores(fn, temperature, x.data() + t * E, E);
    std::copy(s.begin(), s.end(), S.begin() + t * E);
  }
  return S;
}

// Two different double values closer than fp32 could resolve: the fp32 library may order them either way.
bool near_tie(double a, double b) { return a != b && std::fabs(a - b) <= 1e-5 * std::max(std::fabs(a), std::fabs(b)); }

// Non-causal expert choice: kept[e] = the first C tokens of a stable sort by S[:, e] descending
// (ascending token order afterwards). `ok` turns false when a near tie sits at a cut.
std::vector<std::vector<rs::index>> ref_expert_choice(const std::vector<double>& S, rs::index T, rs::index E,
                                                      rs::index C, bool& ok) {
  std::vector<std::vector<rs::index>> kept(sz(E));
  for (rs::index e = 0; e < E; ++e) {
    std::vector<rs::index> order(sz(T));
    std::iota(order.begin(), order.end(), rs::index{0});
    std::stable_sort(order.begin(), order.end(),
                     [&](rs::index a, rs::index b) { return S[sz(a * E + e)] > S[sz(b * E + e)]; });
    if (C < T && C > 0 && near_tie(S[sz(order[sz(C - 1)] * E + e)], S[sz(order[sz(C)] * E + e)])) ok = false;
    order.resize(sz(std::min(C, T)));
    std::sort(order.begin(), order.end());
    kept[sz(e)] = order;
  }
  return kept;
}

// Causal expert choice: candidates per token (S >= threshold, or the stable top-k of the row), then
// each expert keeps its earliest C candidates (C < 0: all). `ok` turns false on a near tie at a cut.
std::vector<std::vector<rs::index>> ref_causal(const std::vector<double>& S, rs::index T, rs::index E, rs::index k,
                                               const std::vector<float>& thresholds, rs::index C, bool& ok,
                                               std::vector<rs::index>* demand = nullptr) {
  std::vector<std::vector<rs::index>> cand(sz(E));
  for (rs::index t = 0; t < T; ++t) {
    const double* row = S.data() + t * E;
    if (!thresholds.empty()) {
      for (rs::index e = 0; e < E; ++e) {
        const double thr = static_cast<double>(thresholds[sz(e)]);
        if (near_tie(row[e], thr)) ok = false;
        if (row[e] >= thr) cand[sz(e)].push_back(t);
      }
    } else {
      std::vector<rs::index> ids(sz(E));
      std::iota(ids.begin(), ids.end(), rs::index{0});
      std::stable_sort(ids.begin(), ids.end(), [&](rs::index a, rs::index b) { return row[a] > row[b]; });
      if (k < E && near_tie(row[ids[sz(k - 1)]], row[ids[sz(k)]])) ok = false;
      for (rs::index j = 0; j < k; ++j) cand[sz(ids[sz(j)])].push_back(t);
    }
  }
  if (demand != nullptr) {
    demand->clear();
    for (const auto& c : cand) demand->push_back(static_cast<rs::index>(c.size()));
  }
  for (auto& c : cand)
    if (C >= 0 && static_cast<rs::index>(c.size()) > C) c.resize(sz(C));
  return cand;
}

// First disagreement between a plan's token-major CSR and per-expert kept sets with weights S[t, e].
std::string kept_mismatch(const rs::routing_plan& plan, const std::vector<std::vector<rs::index>>& kept,
                          const std::vector<double>& S, rs::index T, rs::index E) {
  const auto off = plan.token_offsets();
  const auto ex = plan.token_expert();
  const auto w = plan.token_weight();
  for (rs::index t = 0; t < T; ++t) {
    std::vector<rs::index> want;
    for (rs::index e = 0; e < E; ++e)
      if (std::binary_search(kept[sz(e)].begin(), kept[sz(e)].end(), t)) want.push_back(e);
    const rs::index b = off[sz(t)], n = off[sz(t + 1)] - b;
    const std::string where = "token " + std::to_string(t) + ": ";
    if (n != static_cast<rs::index>(want.size()))
      return where + std::to_string(n) + " experts, reference " + std::to_string(want.size());
    for (rs::index j = 0; j < n; ++j) {
      if (ex[sz(b + j)] != want[sz(j)])
        return where + "expert " + std::to_string(ex[sz(b + j)]) + " vs reference " + std::to_string(want[sz(j)]);
      const double ref_w = S[sz(t * E + want[sz(j)])];
      if (!close_rel(w[sz(b + j)], ref_w))
        return where + "weight " + std::to_string(w[sz(b + j)]) + " vs reference " + std::to_string(ref_w);
    }
  }
  return {};
}

rs::index factor_capacity(rs::index T, rs::index E, rs::index k, double cf) {
  return static_cast<rs::index>(
      std::ceil(static_cast<double>(T) * static_cast<double>(k) / static_cast<double>(E) * cf));
}

// One token's kept (expert, weight) pairs, for comparisons between plans.
std::vector<std::pair<rs::id_type, float>> assignments(const rs::routing_plan& plan, rs::index t) {
  std::vector<std::pair<rs::id_type, float>> out;
  for (rs::id_type i = plan.token_offsets()[sz(t)]; i < plan.token_offsets()[sz(t + 1)]; ++i)
    out.emplace_back(plan.token_expert()[sz(i)], plan.token_weight()[sz(i)]);
  return out;
}

// Random logits for expert-choice tests: a grid (exact ties for elementwise scores), and for softmax
// a few repeated rows (identical rows tie exactly in fp32 and in double).
std::vector<float> ec_logits(std::mt19937_64& rng, rs::index T, rs::index E, bool repeat_rows) {
  std::vector<float> x = resonance_test::grid_values(rng, T * E, 12, 0.25f);
  if (repeat_rows && T > 1) {
    std::uniform_int_distribution<rs::index> pick(0, T - 1);
    for (rs::index n = 0; n < T / 4; ++n) {
      const rs::index from = pick(rng), to = pick(rng);
      std::copy_n(x.begin() + from * E, E, x.begin() + to * E);
    }
  }
  return x;
}

// Megatron-Core's sinkhorn(), restated in double: cost = exp(logits), loop while error > tol (capped
// here only so that a test cannot hang), return d1 * cost * d0.
struct ref_sinkhorn_result {
  std::vector<double> p;
  std::vector<double> d1;
  rs::index iterations = 0;
};

ref_sinkhorn_result ref_sinkhorn(const std::vector<float>& logits, rs::index T, rs::index E, double tol,
                                 rs::index cap) {
  std::vector<double> cost(sz(T * E));
  for (rs::index i = 0; i < T * E; ++i) cost[sz(i)] = std::exp(static_cast<double>(logits[sz(i)]));
  std::vector<double> d0(sz(T), 1.0), d1(sz(E), 1.0), d1_old = d1;
  const double eps = 1e-8;
  double error = 1e9;
  ref_sinkhorn_result r;
  while (error > tol && r.iterations < cap) {
    for (rs::index t = 0; t < T; ++t) {
      double s = 0.0;
      for (rs::index e = 0; e < E; ++e) s += d1[sz(e)] * cost[sz(t * E + e)];
      d0[sz(t)] = (1.0 / static_cast<double>(T)) * 1.0 / (s + eps);
    }
    for (rs::index e = 0; e < E; ++e) {
      double s = 0.0;
      for (rs::index t = 0; t < T; ++t) s += d0[sz(t)] * cost[sz(t * E + e)];
      d1[sz(e)] = (1.0 / static_cast<double>(E)) * 1.0 / (s + eps);
    }
    error = 0.0;
    for (rs::index e = 0; e < E; ++e) error += std::fabs(d1_old[sz(e)] - d1[sz(e)]);
    error /= static_cast<double>(E);
    d1_old = d1;
    ++r.iterations;
  }
  r.p.resize(sz(T * E));
  for (rs::index t = 0; t < T; ++t)
    for (rs::index e = 0; e < E; ++e) r.p[sz(t * E + e)] = d1[sz(e)] * cost[sz(t * E + e)] * d0[sz(t)];
  r.d1 = d1;
  return r;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Expert choice, non-causal.

TEST_CASE("test_expert_choice_sinkhorn: expert choice keeps each expert's top-C tokens by S, as brute force") {
  std::mt19937_64 rng(2022);
  auto pick = [&](rs::index lo, rs::index hi) { return std::uniform_int_distribution<rs::index>(lo, hi)(rng); };
  const rs::index widths[] = {1, 2, 3, 5, 8, 16};
  const double factors[] = {0.25, 0.5, 1.0, 1.25, 2.0, 4.0};
  const rs::score fns[] = {rs::score::softmax, rs::score::sigmoid, rs::score::sqrt_softplus, rs::score::identity};
  const float temps[] = {1.0f, 0.5f, 2.0f};
  const rs::index aligns[] = {1, 1, 4};
  for (int n = 0; n < 150; ++n) {
    const rs::index T = n < 3 ? n : pick(1, 90);
    const rs::index E = widths[sz(pick(0, 5))];
    const rt::expert_choice p{.top_k = pick(1, std::min<rs::index>(E, 3)),
                              .score = fns[sz(pick(0, 3))],
                              .temperature = temps[sz(pick(0, 2))]};
    const rs::capacity::factor f{.factor = factors[sz(pick(0, 5))],
                                 .drop = pick(0, 1) ? rs::drop_policy::score : rs::drop_policy::random,
                                 .pad_to_capacity = pick(0, 1) == 1,
                                 .align = aligns[sz(pick(0, 2))]};
    CAPTURE(n);
    CAPTURE(T);
    CAPTURE(E);
    CAPTURE(p.top_k);
    CAPTURE(static_cast<int>(p.score));
    CAPTURE(f.factor);
    CAPTURE(f.pad_to_capacity);
    CAPTURE(f.align);
    const rs::index C = factor_capacity(T, E, p.top_k, f.factor);
    std::vector<float> x;
    std::vector<double> S;
    std::vector<std::vector<rs::index>> kept;
    for (int attempt = 0;; ++attempt) {
      REQUIRE(attempt < 50);
      x = ec_logits(rng, T, E, p.score == rs::score::softmax);
      S = ref_score_matrix(p.score, p.temperature, x, T, E);
      bool ok = true;
      kept = ref_expert_choice(S, T, E, C, ok);
      if (ok) break;
    }
    const ec_router<rs::capacity::factor> r{{}, p, f};
    const rs::routing_plan plan = route(r, x, T, E);
    std::string bad =
        resonance_test::plan_violation(plan, {.capacity = C, .pad_to_capacity = f.pad_to_capacity, .align = f.align});
    CHECK_MESSAGE(bad.empty(), bad);
    bad = kept_mismatch(plan, kept, S, T, E);
    CHECK_MESSAGE(bad.empty(), bad);
    for (rs::index e = 0; e < E; ++e) {
      CHECK(plan.expert_counts()[sz(e)] == std::min(C, T));
      CHECK(plan.expert_demand()[sz(e)] == T);
      if (f.pad_to_capacity && f.align == 1)
        CHECK(plan.expert_offsets()[sz(e + 1)] - plan.expert_offsets()[sz(e)] == C);
    }
    // The same plan whatever the block split and order, and routing twice gives the same plan.
    CHECK(route(r, x, T, E, odd_blocks{}) == plan);
    CHECK(route(r, x, T, E) == plan);
  }
}

TEST_CASE("test_expert_choice_sinkhorn: a token may get no expert or several, ties go to the lower token") {
  // Sigmoid scores, T = 4, E = 2, C = ceil(0.5 * 4 * 1 / 2) = 1: token 0 is both experts' favourite.
  const std::vector<float> x = {3.0f,  3.0f,   // t0
                                0.0f,  -1.0f,  // t1
                                -1.0f, 0.0f,   // t2
                                -2.0f, -2.0f};
  const ec_router<rs::capacity::factor> r{{}, {.score = rs::score::sigmoid}, {.factor = 0.5}};
  const rs::routing_plan plan = route(r, x, 4, 2);
  CHECK(plan.capacity() == 1);
  CHECK(assignments(plan, 0).size() == 2);  // both experts took token 0
  CHECK(assignments(plan, 1).empty());
  CHECK(assignments(plan, 2).empty());
  CHECK(assignments(plan, 3).empty());

  // All rows equal: every score ties, so each expert keeps the lowest token ids 0..C-1.
  const rs::index T = 10, E = 4;
  const std::vector<float> same(sz(T * E), 0.5f);
  for (double cf : {0.4, 1.0, 1.5}) {
    const ec_router<rs::capacity::factor> rr{{}, {.top_k = 2}, {.factor = cf}};
    const rs::routing_plan p2 = route(rr, same, T, E);
    const rs::index C = factor_capacity(T, E, 2, cf);
    CAPTURE(cf);
    for (rs::index e = 0; e < E; ++e) {
      const auto off = p2.expert_offsets();
      std::vector<rs::id_type> got(p2.slot_token().begin() + off[sz(e)], p2.slot_token().begin() + off[sz(e + 1)]);
      std::vector<rs::id_type> want(sz(std::min(C, T)));
      std::iota(want.begin(), want.end(), 0);
      CHECK(got == want);
    }
  }
}

TEST_CASE("test_expert_choice_sinkhorn: non-causal expert choice needs a finite capacity") {
  const std::vector<float> x = {0.0f, 1.0f, 2.0f, 3.0f};
  const ec_router<rs::capacity::dropless> r{};
  const std::string msg = error_of([&] { (void)route(r, x, 2, 2); });
  CHECK(msg.rfind("resonance: capacity: expected a finite capacity", 0) == 0);
  // The causal variant accepts dropless: every candidate is kept.
  const ec_router<rs::capacity::dropless> causal{{}, {.top_k = 1, .causal = true}, {}};
  const rs::routing_plan plan = route(causal, x, 2, 2);
  CHECK(plan.capacity() == -1);
  CHECK(plan.num_assignments() == 2);
  CHECK(resonance_test::plan_violation(plan, {.per_token = 1}).empty());
}

// ---------------------------------------------------------------------------------------------------
// Expert choice, causal.

TEST_CASE("test_expert_choice_sinkhorn: causal expert choice equals brute force, with and without thresholds") {
  std::mt19937_64 rng(77);
  auto pick = [&](rs::index lo, rs::index hi) { return std::uniform_int_distribution<rs::index>(lo, hi)(rng); };
  const rs::index widths[] = {1, 2, 4, 8, 16};
  const double factors[] = {0.5, 1.0, 1.5, 3.0};
  const rs::score fns[] = {rs::score::softmax, rs::score::sigmoid, rs::score::sqrt_softplus, rs::score::identity};
  for (int n = 0; n < 120; ++n) {
    const rs::index T = pick(1, 80);
    const rs::index E = widths[sz(pick(0, 4))];
    const bool use_thresholds = pick(0, 1) == 1;
    const bool dropless = pick(0, 4) == 0;
    rt::expert_choice p{.top_k = pick(1, std::min<rs::index>(E, 3)), .score = fns[sz(pick(0, 3))], .causal = true};
    const double cf = factors[sz(pick(0, 3))];
    const bool pad = pick(0, 1) == 1;
    CAPTURE(n);
    CAPTURE(T);
    CAPTURE(E);
    CAPTURE(p.top_k);
    CAPTURE(static_cast<int>(p.score));
    CAPTURE(use_thresholds);
    CAPTURE(dropless);
    const rs::index C = dropless ? -1 : factor_capacity(T, E, p.top_k, cf);
    std::vector<float> x, thr;
    std::vector<double> S;
    std::vector<std::vector<rs::index>> kept;
    std::vector<rs::index> demand;
    for (int attempt = 0;; ++attempt) {
      REQUIRE(attempt < 50);
      x = ec_logits(rng, T, E, p.score == rs::score::softmax);
      S = ref_score_matrix(p.score, p.temperature, x, T, E);
      thr.clear();
      if (use_thresholds) {
        // Thresholds between the grid's score values: a quantile-ish level per expert.
        for (rs::index e = 0; e < E; ++e) {
          const double lo = *std::min_element(S.begin(), S.end()), hi = *std::max_element(S.begin(), S.end());
          const double q = std::uniform_real_distribution<double>(0.2, 0.9)(rng);
          thr.push_back(static_cast<float>(lo + q * (hi - lo)));
        }
      }
      bool ok = true;
      kept = ref_causal(S, T, E, p.top_k, thr, C, ok, &demand);
      if (ok) break;
    }
    p.thresholds = {thr.empty() ? nullptr : thr.data(), static_cast<rs::index>(thr.size())};
    rs::routing_plan plan;
    if (dropless) {
      plan = route(ec_router<rs::capacity::dropless>{{}, p, {}}, x, T, E);
    } else {
      // Whatever drop policy the capacity asks for, the causal direction imposes position priority.
      const ec_router<rs::capacity::factor> r{
          {}, p, {.factor = cf, .drop = rs::drop_policy::score, .pad_to_capacity = pad}};
      plan = route(r, x, T, E);
      CHECK(route(r, x, T, E, odd_blocks{}) == plan);
    }
    std::string bad = resonance_test::plan_violation(plan, {.capacity = C, .pad_to_capacity = pad && !dropless});
    CHECK_MESSAGE(bad.empty(), bad);
    bad = kept_mismatch(plan, kept, S, T, E);
    CHECK_MESSAGE(bad.empty(), bad);
    for (rs::index e = 0; e < E; ++e) CHECK(plan.expert_demand()[sz(e)] == demand[sz(e)]);
  }
}

TEST_CASE("test_expert_choice_sinkhorn: causal expert choice: later tokens never change an earlier token's fate") {
  std::mt19937_64 rng(5);
  auto pick = [&](rs::index lo, rs::index hi) { return std::uniform_int_distribution<rs::index>(lo, hi)(rng); };
  const rs::score fns[] = {rs::score::softmax, rs::score::sigmoid, rs::score::identity};
  int changed_later = 0;
  for (int n = 0; n < 300; ++n) {
    const rs::index T = pick(2, 48), E = pick(1, 8);
    const rs::index k = pick(1, std::min<rs::index>(E, 3));
    std::vector<float> x = resonance_test::normal_values(rng, T * E, 1.5);
    std::vector<float> thr;
    if (pick(0, 1) == 1) {  // calibrated on another batch, as a caller would
      const std::vector<float> prev = resonance_test::normal_values(rng, T * E, 1.5);
      thr = rt::expert_choice_thresholds(rt::expert_choice{.top_k = k, .score = fns[sz(n % 3)]}, view(prev, T, E),
                                         std::max<rs::index>(1, T * k / E));
    }
    const rt::expert_choice p{.top_k = k,
                              .score = fns[sz(n % 3)],
                              .causal = true,
                              .thresholds = {thr.empty() ? nullptr : thr.data(), static_cast<rs::index>(thr.size())}};
    const ec_router<rs::capacity::factor> r{{}, p, {.factor = 0.5 + 0.25 * static_cast<double>(pick(0, 4))}};
    const rs::routing_plan before = route(r, x, T, E);
    // Redraw every token after position u.
    const rs::index u = pick(0, T - 2);
    const std::vector<float> fresh = resonance_test::normal_values(rng, (T - u - 1) * E, 3.0);
    std::copy(fresh.begin(), fresh.end(), x.begin() + (u + 1) * E);
    const rs::routing_plan after = route(r, x, T, E);
    CAPTURE(n);
    CAPTURE(u);
    for (rs::index t = 0; t <= u; ++t) CHECK(assignments(after, t) == assignments(before, t));
    for (rs::index t = u + 1; t < T; ++t) changed_later += assignments(after, t) != assignments(before, t);
  }
  CHECK(changed_later > 0);  // the redraws did matter somewhere
}

TEST_CASE("test_expert_choice_sinkhorn: non-causal expert choice leaks the future, causal does not") {
  // E = 2, T = 2, C = ceil(1 * 2 * 1 / 2) = 1. Token 0 = [1, 0]: S0 = (.73, .27). Token 1 = [0, 0]:
  // S1 = (.5, .5), so expert 0 takes token 0 and expert 1 takes token 1. Make token 1 = [3, 0]:
  // S1 = (.95, .05), expert 0 now takes token 1 and expert 1 takes token 0: token 0's expert changed
  // because of a later token.
  std::vector<float> x = {1.0f, 0.0f, 0.0f, 0.0f};
  const ec_router<rs::capacity::factor> acausal{{}, {}, {.factor = 1.0}};
  const rs::routing_plan a = route(acausal, x, 2, 2);
  const ec_router<rs::capacity::factor> causal{{}, {.causal = true}, {.factor = 1.0}};
  const rs::routing_plan c = route(causal, x, 2, 2);
  x[2] = 3.0f;
  const rs::routing_plan a2 = route(acausal, x, 2, 2);
  const rs::routing_plan c2 = route(causal, x, 2, 2);
  REQUIRE(assignments(a, 0).size() == 1);
  CHECK(assignments(a, 0)[0].first == 0);
  REQUIRE(assignments(a2, 0).size() == 1);
  CHECK(assignments(a2, 0)[0].first == 1);
  CHECK(assignments(a, 0) != assignments(a2, 0));
  CHECK(assignments(c, 0) == assignments(c2, 0));
}

TEST_CASE(
    "test_expert_choice_sinkhorn: causal expert choice without thresholds is pre-softmax token choice with "
    "position drop") {
  std::mt19937_64 rng(11);
  for (int n = 0; n < 40; ++n) {
    const rs::index T = 1 + static_cast<rs::index>(rng() % 60), E = 1 + static_cast<rs::index>(rng() % 12);
    const rs::index k = 1 + static_cast<rs::index>(rng() % static_cast<std::uint64_t>(std::min<rs::index>(E, 3)));
    const bool soft = n % 2 == 0;
    const std::vector<float> x = resonance_test::grid_values(rng, T * E, 8, 0.5f);
    const rs::capacity::factor f{.factor = 1.0, .drop = rs::drop_policy::position, .pad_to_capacity = n % 3 == 0};
    const ec_router<rs::capacity::factor> ec{
        {}, {.top_k = k, .score = soft ? rs::score::softmax : rs::score::sigmoid, .causal = true}, f};
    const tc_router tc{{},
                       {.top_k = k,
                        .score = soft ? rs::score::softmax : rs::score::sigmoid,
                        .pre_softmax = soft,
                        .renorm = rt::renormalize::never},
                       f};
    CAPTURE(n);
    CHECK(route(ec, x, T, E) == route(tc, x, T, E));
  }
}

TEST_CASE("test_expert_choice_sinkhorn: causal with thresholds calibrated on the same batch equals non-causal") {
  // Tie-free scores: every expert's threshold (its C-th largest score) admits exactly its top-C tokens,
  // so position priority keeps them all and the kept pairs are those of non-causal expert choice.
  std::mt19937_64 rng(99);
  for (int n = 0; n < 30; ++n) {
    const rs::index T = 20 + static_cast<rs::index>(rng() % 60), E = 2 + static_cast<rs::index>(rng() % 10);
    std::vector<float> x(sz(T * E));
    std::vector<int> grid(sz(T * E));
    std::iota(grid.begin(), grid.end(), 0);
    std::shuffle(grid.begin(), grid.end(), rng);
    for (rs::index i = 0; i < T * E; ++i) x[sz(i)] = static_cast<float>(grid[sz(i)]) * 0.01f - 3.0f;
    const rs::index C = factor_capacity(T, E, 1, 1.0);
    const rt::expert_choice base{.score = rs::score::sigmoid};
    const std::vector<float> thr = rt::expert_choice_thresholds(base, view(x, T, E), C);
    const rt::expert_choice causal{
        .score = rs::score::sigmoid, .causal = true, .thresholds = {thr.data(), static_cast<rs::index>(thr.size())}};
    const rs::routing_plan a = route(ec_router<rs::capacity::factor>{{}, base, {.factor = 1.0}}, x, T, E);
    const rs::routing_plan c = route(ec_router<rs::capacity::factor>{{}, causal, {.factor = 1.0}}, x, T, E);
    CAPTURE(n);
    for (rs::index t = 0; t < T; ++t) CHECK(assignments(a, t) == assignments(c, t));
    for (rs::index e = 0; e < E; ++e) CHECK(c.expert_demand()[sz(e)] == C);
  }
}

TEST_CASE("test_expert_choice_sinkhorn: expert_choice_thresholds is each expert's C-th largest score") {
  std::mt19937_64 rng(3);
  for (int n = 0; n < 60; ++n) {
    const rs::index T = 1 + static_cast<rs::index>(rng() % 50), E = 1 + static_cast<rs::index>(rng() % 9);
    const rs::index C = 1 + static_cast<rs::index>(rng() % static_cast<std::uint64_t>(T + 5));  // C > T sometimes
    const std::vector<float> s = resonance_test::draw_from(rng, T * E, {-1.0f, 0.0f, 0.25f, 0.5f, 0.75f, 2.0f});
    const std::vector<float> got = rt::expert_choice_thresholds(view(s, T, E), C);
    REQUIRE(got.size() == sz(E));
    for (rs::index e = 0; e < E; ++e) {
      std::vector<float> col;
      for (rs::index t = 0; t < T; ++t) col.push_back(s[sz(t * E + e)]);
      std::sort(col.begin(), col.end(), std::greater<>());
      CHECK(got[sz(e)] == col[sz(std::min(C, T) - 1)]);
    }
    // From logits: S as the direction computes it, compared with the double reference.
    const std::vector<float> x = resonance_test::normal_values(rng, T * E, 2.0);
    const rt::expert_choice p{.score = rs::score::softmax, .temperature = 0.7f};
    const std::vector<float> got2 = rt::expert_choice_thresholds(p, view(x, T, E), C);
    const std::vector<double> S = ref_score_matrix(p.score, p.temperature, x, T, E);
    for (rs::index e = 0; e < E; ++e) {
      std::vector<double> col;
      for (rs::index t = 0; t < T; ++t) col.push_back(S[sz(t * E + e)]);
      std::sort(col.begin(), col.end(), std::greater<>());
      CHECK(close_rel(got2[sz(e)], col[sz(std::min(C, T) - 1)]));
    }
  }
}

TEST_CASE("test_expert_choice_sinkhorn: expert choice's selection is the same on every backend, with many exact ties") {
  // Scores drawn from a few values (signed zeros included): most columns tie at the cut, and the keys
  // (score bits, inverted token) must still pick the same tokens whatever order the primitives run in.
  const auto same = [](const rs::candidate_set& a, const rs::candidate_set& b) {
    const auto bits = [](const auto& x, const auto& y) {
      return x.size() == y.size() && (x.empty() || std::memcmp(x.data(), y.data(), x.size() * sizeof(x[0])) == 0);
    };
    return a.num_tokens == b.num_tokens && a.num_experts == b.num_experts && bits(a.offsets, b.offsets) &&
           bits(a.expert, b.expert) && bits(a.weight, b.weight) && bits(a.demand, b.demand) && a.priority.empty() &&
           b.priority.empty() && a.forced_drop == b.forced_drop;
  };
  std::mt19937_64 rng(11);
  const rs::score fns[] = {rs::score::identity, rs::score::sigmoid, rs::score::softmax};
  for (int n = 0; n < 40; ++n) {
    const rs::index T = 1 + static_cast<rs::index>(rng() % 200), E = 1 + static_cast<rs::index>(rng() % 12);
    const std::vector<float> x = resonance_test::draw_from(rng, T * E, {-1.0f, -0.0f, 0.0f, 0.5f, 2.0f});
    const rs::score fn = fns[n % 3];
    const rs::index Cr = 1 + static_cast<rs::index>(rng() % static_cast<std::uint64_t>(T));
    for (rs::index C : {rs::index{0}, rs::index{1}, Cr, T - 1, T, T + 3}) {
      if (C < 0) continue;
      CAPTURE(n);
      CAPTURE(C);
      const rs::capacity_limits lim{.capacity = C};
      std::vector<rt::expert_choice> policies = {{.score = fn},
                                                 {.top_k = std::min<rs::index>(E, 2), .score = fn, .causal = true}};
      std::vector<float> thr;
      if (C >= 1) {
        thr = rt::expert_choice_thresholds(rt::expert_choice{.score = fn}, view(x, T, E), C);
        policies.push_back({.score = fn, .causal = true, .thresholds = {thr.data(), E}});
      }
      for (const rt::expert_choice& p : policies) {
        CAPTURE(p.causal);
        rs::candidate_set want;
        rt::select(rs::backend::serial{}, p, view(x, T, E), lim, want);
        if (fn == rs::score::identity && !p.causal) {
          // S = x exactly: the brute-force selection has no near ties to excuse.
          bool ok = true;
          const std::vector<double> S(x.begin(), x.end());
          const auto kept = ref_expert_choice(S, T, E, C, ok);
          std::vector<std::vector<rs::index>> got(sz(E));
          for (rs::index t = 0; t < T; ++t)
            for (rs::id_type i = want.offsets[sz(t)]; i < want.offsets[sz(t + 1)]; ++i)
              got[sz(want.expert[sz(i)])].push_back(t);
          CHECK(got == kept);
        }
        rs::candidate_set got;
        rt::select(odd_blocks{}, p, view(x, T, E), lim, got);
        CHECK(same(got, want));
        resonance_test::for_each_parallel_backend([&](const auto& be, const std::string& name) {
          CAPTURE(name);
          rs::candidate_set other;
          rt::select(be, p, view(x, T, E), lim, other);
          CHECK(same(other, want));
        });
      }
    }
  }
}

TEST_CASE("test_expert_choice_sinkhorn: capacity::quantile is the nearest-rank element, with many exact ties") {
  std::mt19937_64 rng(5);
  CHECK(rs::capacity::quantile({}, 0.5) == 0.0);
  for (int n = 0; n < 200; ++n) {
    const rs::index m = 1 + static_cast<rs::index>(rng() % 60);
    const std::vector<float> v = n % 2 == 0 ? resonance_test::draw_from(rng, m, {-0.5f, 0.0f, 0.25f, 0.25f, 1.0f})
                                            : resonance_test::normal_values(rng, m, 1.0);
    std::vector<float> sorted = v;
    std::sort(sorted.begin(), sorted.end());
    for (double q : {0.0, 0.1, 0.5, 0.9, 0.999, 1.0, static_cast<double>(rng() % 1000) / 1000.0}) {
      const double want = sorted[sz(std::min<rs::index>(m - 1, static_cast<rs::index>(q * static_cast<double>(m))))];
      CAPTURE(m);
      CAPTURE(q);
      CHECK(rs::capacity::quantile(v, q) == want);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Sinkhorn.

TEST_CASE("test_expert_choice_sinkhorn: sinkhorn_normalize is Megatron's sinkhorn and doubly stochastic") {
  std::mt19937_64 rng(1);
  const std::pair<rs::index, rs::index> shapes[] = {{1, 1}, {1, 5}, {7, 1}, {16, 4}, {64, 8}, {300, 16}, {513, 6}};
  for (const auto& shape : shapes) {
    const rs::index T = shape.first, E = shape.second;
    // Not much tighter: Megatron's eps = 1e-8 in the denominators breaks the (d0, d1) -> (c·d0, d1/c)
    // symmetry, so d1 keeps drifting by about eps·d1 per iteration and a tolerance near eps may never
    // be met; how far that drift goes depends on the row scaling, the one place the max subtraction shows.
    for (double tol : {1e-4, 1e-6}) {
      CAPTURE(T);
      CAPTURE(E);
      CAPTURE(tol);
      const std::vector<float> x = resonance_test::normal_values(rng, T * E, 1.5);
      std::vector<double> p(sz(T * E), -1.0);
      const rs::index cap = 5000;
      const rs::index it = rt::sinkhorn_normalize(rs::backend::serial{}, view(x, T, E), {p.data(), T, E}, cap, tol);
      const ref_sinkhorn_result ref = ref_sinkhorn(x, T, E, tol, cap);
      CHECK(it >= 1);
      if (tol >= 1e-4) CHECK(it < cap);  // Megatron's tolerance is always reached on such logits
      CHECK(std::abs(it - ref.iterations) <= 1);
      for (rs::index i = 0; i < T * E; ++i)
        CHECK(close_rel(p[sz(i)], ref.p[sz(i)], it == ref.iterations ? 1e-6 : 1e-2));
      // Columns sum to 1/E (the last update normalises them); rows to 1/T within the bound the stopping
      // rule gives: |T·row − 1| <= Σ_e |Δd1_e| / min_e d1_e <= E·tol / min_e d1_e.
      const double min_d1 = *std::min_element(ref.d1.begin(), ref.d1.end());
      const double row_bound = 2.0 * static_cast<double>(E) * tol / min_d1 + 1e-12;
      for (rs::index t = 0; t < T && it < cap; ++t) {
        double row = 0.0;
        for (rs::index e = 0; e < E; ++e) row += p[sz(t * E + e)];
        CHECK(std::fabs(static_cast<double>(T) * row - 1.0) <= row_bound);
      }
      for (rs::index e = 0; e < E; ++e) {
        double col = 0.0;
        for (rs::index t = 0; t < T; ++t) col += p[sz(t * E + e)];
        CHECK(std::fabs(static_cast<double>(E) * col - 1.0) <= 1e-6);
      }
      // The same P, bit for bit, whatever the block split (the column sums use fixed chunks).
      std::vector<double> q(sz(T * E), -2.0);
      CHECK(rt::sinkhorn_normalize(odd_blocks{}, view(x, T, E), {q.data(), T, E}, cap, tol) == it);
      CHECK(q == p);
    }
  }
  // Strided output, an empty matrix.
  const std::vector<float> x = resonance_test::normal_values(rng, 5 * 3, 1.0);
  std::vector<double> wide(5 * 4, 7.0), tight(5 * 3);
  rt::sinkhorn_normalize(rs::backend::serial{}, view(x, 5, 3), {wide.data(), 5, 3, 4}, 100, 1e-6);
  rt::sinkhorn_normalize(rs::backend::serial{}, view(x, 5, 3), {tight.data(), 5, 3}, 100, 1e-6);
  for (rs::index t = 0; t < 5; ++t) {
    for (rs::index e = 0; e < 3; ++e) CHECK(wide[sz(t * 4 + e)] == tight[sz(t * 3 + e)]);
    CHECK(wide[sz(t * 4 + 3)] == 7.0);
  }
  CHECK(rt::sinkhorn_normalize(rs::backend::serial{}, rs::matrix_view<const float>{nullptr, 0, 4},
                               rs::matrix_view<double>{nullptr, 0, 4}, 10, 1e-4) == 0);
}

TEST_CASE("test_expert_choice_sinkhorn: sinkhorn_normalize respects the iteration cap") {
  std::mt19937_64 rng(8);
  const rs::index T = 40, E = 8;
  const std::vector<float> x = resonance_test::normal_values(rng, T * E, 3.0);
  for (rs::index cap : {1, 2, 3}) {
    std::vector<double> p(sz(T * E));
    CHECK(rt::sinkhorn_normalize(rs::backend::serial{}, view(x, T, E), {p.data(), T, E}, cap, 1e-300) == cap);
    const ref_sinkhorn_result ref = ref_sinkhorn(x, T, E, 1e-300, cap);
    REQUIRE(ref.iterations == cap);
    for (rs::index i = 0; i < T * E; ++i)
      CHECK(close_rel(p[sz(i)], ref.p[sz(i)], 1e-6));  // eps/row sum: the max subtraction's only trace
    // The last half-step normalises the columns exactly (up to eps), even before convergence.
    for (rs::index e = 0; e < E; ++e) {
      double col = 0.0;
      for (rs::index t = 0; t < T; ++t) col += p[sz(t * E + e)];
      CHECK(std::fabs(static_cast<double>(E) * col - 1.0) <= 1e-6);
    }
  }
}

TEST_CASE("test_expert_choice_sinkhorn: sinkhorn selects the top-k of P, weights sigmoid (k = 1) or softmax") {
  std::mt19937_64 rng(4242);
  int rows = 0, skipped = 0;
  const std::pair<rs::index, rs::index> shapes[] = {{1, 4}, {20, 2}, {64, 8}, {128, 16}, {300, 5}};
  for (const auto& shape : shapes) {
    const rs::index T = shape.first, E = shape.second;
    for (rs::index k : {1, 2, 4}) {
      if (k > E) continue;
      for (double scale : {0.5, 2.0}) {
        CAPTURE(T);
        CAPTURE(E);
        CAPTURE(k);
        CAPTURE(scale);
        std::vector<float> x = resonance_test::normal_values(rng, T * E, scale);
        // A skewed batch: expert 0 is everyone's favourite before balancing.
        for (rs::index t = 0; t < T; ++t) x[sz(t * E)] += 1.0f;
        const rt::sinkhorn p{.top_k = k, .max_iterations = 10000};
        const ref_sinkhorn_result ref = ref_sinkhorn(x, T, E, p.tolerance, 10000);
        const rs::routing_plan plan = route(sk_router<rs::capacity::dropless>{{}, p, {}}, x, T, E);
        const std::string bad = resonance_test::plan_violation(plan, {.per_token = k});
        CHECK_MESSAGE(bad.empty(), bad);
        for (rs::index t = 0; t < T; ++t) {
          const double* row = ref.p.data() + t * E;
          std::vector<rs::index> ids(sz(E));
          std::iota(ids.begin(), ids.end(), rs::index{0});
          std::stable_sort(ids.begin(), ids.end(), [&](rs::index a, rs::index b) { return row[a] > row[b]; });
          ++rows;
          // Skip rows whose k-th and (k+1)-th entries of P are within what differs between the two
          // computations (max subtraction vs none, fixed-chunk vs plain sums).
          if (k < E && std::fabs(row[ids[sz(k - 1)]] - row[ids[sz(k)]]) <= 1e-9 * row[ids[sz(k - 1)]]) {
            ++skipped;
            continue;
          }
          ids.resize(sz(k));
          std::sort(ids.begin(), ids.end());
          const std::vector<double> soft = ref_scores(rs::score::softmax, 1.0f, x.data() + t * E, E);
          const auto got = assignments(plan, t);
          REQUIRE(got.size() == sz(k));
          for (rs::index j = 0; j < k; ++j) {
            const rs::index e = ids[sz(j)];
            CHECK(got[sz(j)].first == e);
            const double want = k == 1 ? 1.0 / (1.0 + std::exp(-static_cast<double>(x[sz(t * E + e)]))) : soft[sz(e)];
            CHECK(close_rel(got[sz(j)].second, want));
          }
        }
        // Balance: the counts after Sinkhorn are much flatter than plain top-k would give.
        if (T >= 64) {
          const auto counts = plan.expert_counts();
          const rs::index most = *std::max_element(counts.begin(), counts.end());
          CHECK(static_cast<double>(most) <= 2.0 * static_cast<double>(T * k) / static_cast<double>(E));
        }
      }
    }
  }
  CHECK(skipped * 100 <= rows);
}

TEST_CASE("test_expert_choice_sinkhorn: sinkhorn's P and selection are serial's bitwise on every backend") {
  std::mt19937_64 rng(55);
  // Several 256-token chunks (the column sums' fixed order), and more rows than one block of any backend.
  const std::pair<rs::index, rs::index> shapes[] = {{1, 3}, {255, 8}, {257, 5}, {1100, 16}, {2600, 24}};
  for (const auto& shape : shapes) {
    const rs::index T = shape.first, E = shape.second;
    CAPTURE(T);
    CAPTURE(E);
    const std::vector<float> x = resonance_test::normal_values(rng, T * E, 2.0);
    std::vector<double> want(sz(T * E));
    const rs::index it = rt::sinkhorn_normalize(rs::backend::serial{}, view(x, T, E), {want.data(), T, E}, 200, 1e-7);
    rs::candidate_set want_sel;
    const rt::sinkhorn policy{.top_k = std::min<rs::index>(E, 3), .max_iterations = 40};
    rt::select(rs::backend::serial{}, policy, view(x, T, E), rs::capacity_limits{}, want_sel);
    const auto check = [&](const auto& be, const std::string& name) {
      CAPTURE(name);
      std::vector<double> got(sz(T * E), -1.0);
      CHECK(rt::sinkhorn_normalize(be, view(x, T, E), {got.data(), T, E}, 200, 1e-7) == it);
      CHECK(std::memcmp(got.data(), want.data(), got.size() * sizeof(double)) == 0);
      rs::candidate_set sel;
      rt::select(be, policy, view(x, T, E), rs::capacity_limits{}, sel);
      CHECK(sel.offsets == want_sel.offsets);
      CHECK(sel.expert == want_sel.expert);
      CHECK(std::memcmp(sel.weight.data(), want_sel.weight.data(), sel.weight.size() * sizeof(float)) == 0);
    };
    check(odd_blocks{}, "scrambled");
    resonance_test::for_each_parallel_backend(check);
  }
}

TEST_CASE("test_expert_choice_sinkhorn: sinkhorn ties go to the lowest expert id") {
  const rs::index T = 6, E = 5;
  const std::vector<float> x(sz(T * E), 0.25f);  // P is uniform: every row ties everywhere
  for (rs::index k : {1, 3}) {
    const rs::routing_plan plan = route(sk_router<rs::capacity::dropless>{{}, {.top_k = k}, {}}, x, T, E);
    for (rs::index t = 0; t < T; ++t) {
      const auto got = assignments(plan, t);
      REQUIRE(got.size() == sz(k));
      for (rs::index j = 0; j < k; ++j) CHECK(got[sz(j)].first == j);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Router integration and determinism.

TEST_CASE("test_expert_choice_sinkhorn: routers with factor and dropless capacity give valid, repeatable plans") {
  std::mt19937_64 rng(31);
  for (int n = 0; n < 40; ++n) {
    const rs::index T = static_cast<rs::index>(rng() % 200), E = 1 + static_cast<rs::index>(rng() % 16);
    const rs::index k = 1 + static_cast<rs::index>(rng() % static_cast<std::uint64_t>(std::min<rs::index>(E, 4)));
    const std::vector<float> x = resonance_test::normal_values(rng, T * E, 2.0);
    const rs::capacity::factor f{.factor = 0.5 + 0.5 * static_cast<double>(n % 4),
                                 .drop = n % 2 ? rs::drop_policy::score : rs::drop_policy::position,
                                 .min_capacity = n % 5 == 0 ? 3 : 0,
                                 .pad_to_capacity = n % 3 == 0,
                                 .align = n % 4 == 1 ? 8 : 1};
    const rs::index C = std::max(factor_capacity(T, E, k, f.factor), f.min_capacity);
    CAPTURE(n);
    CAPTURE(T);
    CAPTURE(E);
    CAPTURE(k);
    const resonance_test::plan_expectation want{.capacity = C, .pad_to_capacity = f.pad_to_capacity, .align = f.align};

    const ec_router<rs::capacity::factor> ec{{}, {.top_k = k}, f};
    const rs::routing_plan a = route(ec, x, T, E);
    std::string bad = resonance_test::plan_violation(a, want);
    CHECK_MESSAGE(bad.empty(), bad);
    CHECK(route(ec, x, T, E) == a);
    CHECK(route(ec, x, T, E, odd_blocks{}) == a);

    const ec_router<rs::capacity::factor> ecc{{}, {.top_k = k, .causal = true}, f};
    const rs::routing_plan b = route(ecc, x, T, E);
    bad = resonance_test::plan_violation(b, want);
    CHECK_MESSAGE(bad.empty(), bad);
    CHECK(route(ecc, x, T, E, odd_blocks{}) == b);

    const sk_router<rs::capacity::factor> sk{{}, {.top_k = k}, f};
    const rs::routing_plan c = route(sk, x, T, E);
    bad = resonance_test::plan_violation(c, want);
    CHECK_MESSAGE(bad.empty(), bad);
    CHECK(route(sk, x, T, E) == c);
    CHECK(route(sk, x, T, E, odd_blocks{}) == c);

    const sk_router<rs::capacity::dropless> skd{{}, {.top_k = k}, {.align = f.align}};
    const rs::routing_plan d = route(skd, x, T, E);
    bad = resonance_test::plan_violation(d, {.align = f.align, .per_token = k});
    CHECK_MESSAGE(bad.empty(), bad);
    CHECK(route(skd, x, T, E, odd_blocks{}) == d);
    // Capacity cuts the dropless Sinkhorn selection: the candidates (and so the demand) are the same.
    CHECK(std::equal(c.expert_demand().begin(), c.expert_demand().end(), d.expert_counts().begin()));
  }
}

// ---------------------------------------------------------------------------------------------------
// Errors.

TEST_CASE("test_expert_choice_sinkhorn: every validation error names its argument and writes nothing") {
  auto starts = [](const std::string& msg, const std::string& arg) {
    const bool ok = msg.rfind("resonance: " + arg + ": expected", 0) == 0;
    if (!ok) MESSAGE("expected an error naming '" << arg << "', got: " << msg);
    return ok;
  };
  const rs::index E = 4;
  const float nan_f = std::numeric_limits<float>::quiet_NaN();
  const float inf_f = std::numeric_limits<float>::infinity();
  const std::vector<float> good_thr(sz(E), 0.1f), short_thr(sz(E - 1), 0.1f);
  std::vector<float> bad_thr(sz(E), 0.1f);
  bad_thr[2] = nan_f;
  auto ec_err = [&](const rt::expert_choice& p) { return error_of([&] { p.validate(E); }); };
  CHECK(ec_err({}) == "no throw");
  CHECK(ec_err({.causal = true, .thresholds = {good_thr.data(), E}}) == "no throw");
  CHECK(starts(ec_err({.top_k = 0}), "top_k"));
  CHECK(starts(ec_err({.top_k = E + 1}), "top_k"));
  CHECK(starts(ec_err({.score = static_cast<rs::score>(9)}), "score"));
  CHECK(starts(ec_err({.temperature = 0.0f}), "temperature"));
  CHECK(starts(ec_err({.temperature = -1.0f}), "temperature"));
  CHECK(starts(ec_err({.temperature = nan_f}), "temperature"));
  CHECK(starts(ec_err({.temperature = inf_f}), "temperature"));
  CHECK(starts(ec_err({.causal = true, .thresholds = {short_thr.data(), E - 1}}), "thresholds"));
  CHECK(starts(ec_err({.causal = true, .thresholds = {bad_thr.data(), E}}), "thresholds"));
  CHECK(starts(ec_err({.causal = true, .thresholds = {nullptr, E}}), "thresholds"));
  CHECK(starts(ec_err({.causal = false, .thresholds = {good_thr.data(), E}}), "thresholds"));
  CHECK(starts(error_of([&] { rt::expert_choice{}.validate(0); }), "num_experts"));

  auto sk_err = [&](const rt::sinkhorn& p) { return error_of([&] { p.validate(E); }); };
  CHECK(sk_err({}) == "no throw");
  CHECK(starts(sk_err({.top_k = 0}), "top_k"));
  CHECK(starts(sk_err({.top_k = E + 1}), "top_k"));
  CHECK(starts(sk_err({.max_iterations = 0}), "max_iterations"));
  CHECK(starts(sk_err({.tolerance = 0.0}), "tolerance"));
  CHECK(starts(sk_err({.tolerance = -1e-4}), "tolerance"));
  CHECK(starts(sk_err({.tolerance = std::numeric_limits<double>::quiet_NaN()}), "tolerance"));
  CHECK(starts(sk_err({.tolerance = std::numeric_limits<double>::infinity()}), "tolerance"));

  // Through the router: the policy is validated before anything is computed.
  const rs::index T = 3;
  std::vector<float> x = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f, 0.7f, 0.8f, 0.9f, 1.0f, 1.1f, 1.2f};
  CHECK(starts(error_of([&] {
                 (void)route(ec_router<rs::capacity::factor>{{}, {.top_k = 5}, {}}, x, T, E);
               }),
               "top_k"));
  CHECK(starts(error_of([&] {
                 (void)route(sk_router<rs::capacity::factor>{{}, {.max_iterations = 0}, {}}, x, T, E);
               }),
               "max_iterations"));
  // Overflowing scores (identity of logits / a tiny temperature) are refused, in both forms.
  std::vector<float> big = x;
  big[7] = 1e10f;
  for (bool causal : {false, true}) {
    const ec_router<rs::capacity::factor> r{
        {}, {.score = rs::score::identity, .temperature = 1e-30f, .causal = causal}, {}};
    CHECK(starts(error_of([&] { (void)route(r, big, T, E); }), "routing weight"));
  }

  // sinkhorn_normalize: nothing written on error.
  std::vector<double> out(sz(T * E), 42.0);
  const std::vector<double> untouched = out;
  auto norm_err = [&](rs::matrix_view<const float> l, rs::matrix_view<double> o, rs::index it, double tol) {
    return error_of([&] { (void)rt::sinkhorn_normalize(rs::backend::serial{}, l, o, it, tol); });
  };
  const rs::matrix_view<double> o{out.data(), T, E};
  CHECK(norm_err(view(x, T, E), o, 10, 1e-4) == "no throw");
  out = untouched;
  CHECK(starts(norm_err(view(x, T, E), o, 0, 1e-4), "max_iterations"));
  CHECK(starts(norm_err(view(x, T, E), o, 10, 0.0), "tolerance"));
  CHECK(starts(norm_err(view(x, T, E), o, 10, std::numeric_limits<double>::quiet_NaN()), "tolerance"));
  CHECK(starts(norm_err(view(x, T, E), {out.data(), T, E - 1}, 10, 1e-4), "out"));
  CHECK(starts(norm_err(view(x, T, E), {out.data(), T - 1, E}, 10, 1e-4), "out"));
  CHECK(starts(norm_err(view(x, T, E), {out.data(), T, E, E - 1}, 10, 1e-4), "out"));
  CHECK(starts(norm_err({x.data(), T, E, E - 1}, o, 10, 1e-4), "logits"));
  x[5] = nan_f;
  CHECK(starts(norm_err(view(x, T, E), o, 10, 1e-4), "logits"));
  x[5] = inf_f;
  CHECK(starts(norm_err(view(x, T, E), o, 10, 1e-4), "logits"));
  CHECK(out == untouched);
  x[5] = 0.6f;

  // expert_choice_thresholds.
  CHECK(starts(error_of([&] { (void)rt::expert_choice_thresholds(view(x, T, E), 0); }), "capacity"));
  CHECK(starts(error_of([&] {
                 (void)rt::expert_choice_thresholds(rs::matrix_view<const float>{nullptr, 0, E}, 1);
               }),
               "scores"));
  CHECK(starts(error_of([&] { (void)rt::expert_choice_thresholds({x.data(), T, E, E - 1}, 1); }), "scores"));
  x[1] = inf_f;
  CHECK(starts(error_of([&] { (void)rt::expert_choice_thresholds(view(x, T, E), 1); }), "scores"));
  CHECK(starts(error_of([&] { (void)rt::expert_choice_thresholds(rt::expert_choice{}, view(x, T, E), 1); }), "logits"));
  x[1] = 0.2f;
  CHECK(starts(error_of([&] { (void)rt::expert_choice_thresholds(rt::expert_choice{.top_k = 9}, view(x, T, E), 1); }),
               "top_k"));
  CHECK(starts(error_of([&] { (void)rt::expert_choice_thresholds(rt::expert_choice{}, view(x, T, E), -1); }),
               "capacity"));
}
