// Aux-loss-free expert-bias updater and routing statistics (entropy, Calinski-Harabasz), each checked
// against an independent brute-force restatement written here and against closed forms, and bitwise
// the same on every backend.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/resonance.hpp>

#include "backends.hpp"
#include "error_of.hpp"
#include "random_inputs.hpp"

namespace {

namespace rs = resonance;
namespace rt = resonance::routing;
namespace rb = resonance::balance;
using resonance_test::error_of;
using resonance_test::usz;

bool close_rel(double got, double want, double rel) { return std::fabs(got - want) <= rel * std::fabs(want) + 1e-300; }

// A plan from explicit (token -> experts) lists, all weights w, optionally with a capacity.
rs::routing_plan plan_of(rs::index E, const std::vector<std::vector<rs::id_type>>& choices,
                         rs::capacity_limits lim = {}, float w = 1.0f) {
  rs::candidate_set c;
  c.num_tokens = static_cast<rs::index>(choices.size());
  c.num_experts = E;
  c.offsets = {0};
  for (const auto& row : choices) {
    for (rs::id_type e : row) {
      c.expert.push_back(e);
      c.weight.push_back(w);
    }
    c.offsets.push_back(static_cast<rs::id_type>(c.expert.size()));
  }
  return rs::build_plan(rs::backend::serial{}, c, lim);
}

// Tokens with `load[e]` choices of expert e, one choice per token.
rs::routing_plan plan_with_loads(const std::vector<int>& load) {
  std::vector<std::vector<rs::id_type>> ch;
  for (std::size_t e = 0; e < load.size(); ++e)
    for (int i = 0; i < load[e]; ++i) ch.push_back({static_cast<rs::id_type>(e)});
  return plan_of(static_cast<rs::index>(load.size()), ch);
}

// The sign rule restated: mean as a plain average, sign written with comparisons.
std::vector<double> ref_update(std::vector<double> b, const std::vector<double>& load, double rate, bool recentre) {
  double mean = 0.0;
  for (double l : load) mean += l;
  mean /= static_cast<double>(load.size());
  for (std::size_t e = 0; e < b.size(); ++e) {
    if (mean > load[e]) b[e] += rate;
    if (mean < load[e]) b[e] -= rate;
  }
  if (recentre) {
    double m = 0.0;
    for (double x : b) m += x;
    m /= static_cast<double>(b.size());
    for (double& x : b) x -= m;
  }
  return b;
}

void check_bias(const rb::bias_state& s, const std::vector<double>& want) {
  REQUIRE(s.bias().size() == want.size());
  for (std::size_t e = 0; e < want.size(); ++e) {
    CAPTURE(e);
    CHECK(static_cast<double>(s.bias()[e]) == doctest::Approx(want[e]).epsilon(1e-6));
  }
}

}  // namespace

TEST_CASE("test_balance: bias update sign rule on hand cases") {
  // Loads {3,1,2,2}: mean 2, so expert 0 down, expert 1 up, experts 2 and 3 (sign 0) unchanged.
  rb::bias_state s(4);
  CHECK(s.num_experts() == 4);
  s.update(plan_with_loads({3, 1, 2, 2}), {.rate = 0.5});
  CHECK(std::vector<float>(s.bias().begin(), s.bias().end()) == std::vector<float>{-0.5f, 0.5f, 0.0f, 0.0f});
  CHECK(s.pending_batches() == 0);

  // Balanced loads move nothing; rate 0 moves nothing.
  s.update(plan_with_loads({2, 2, 2, 2}), {.rate = 0.5});
  CHECK(std::vector<float>(s.bias().begin(), s.bias().end()) == std::vector<float>{-0.5f, 0.5f, 0.0f, 0.0f});
  s.update(plan_with_loads({9, 0, 0, 0}), {.rate = 0.0});
  CHECK(std::vector<float>(s.bias().begin(), s.bias().end()) == std::vector<float>{-0.5f, 0.5f, 0.0f, 0.0f});

  // Re-centring: from {1,0,0,0}, loads {3,1,2,2}, rate 0.5 -> {0.5,0.5,0,0} -> minus 0.25.
  rb::bias_state r(std::vector<float>{1.0f, 0.0f, 0.0f, 0.0f});
  r.update(plan_with_loads({3, 1, 2, 2}), {.rate = 0.5, .recentre = true});
  CHECK(std::vector<float>(r.bias().begin(), r.bias().end()) == std::vector<float>{0.25f, 0.25f, -0.25f, -0.25f});

  // A mean that is not an integer: loads {1,0,0} (mean 1/3): expert 0 down, others up.
  rb::bias_state t(3);
  t.update(plan_with_loads({1, 0, 0}), {.rate = 0.25});
  CHECK(std::vector<float>(t.bias().begin(), t.bias().end()) == std::vector<float>{-0.25f, 0.25f, 0.25f});

  // The view plugs into token choice and follows updates in place.
  const rs::vector_view<const float> v = t.view();
  CHECK(v.size == 3);
  t.update(plan_with_loads({0, 1, 0}), {.rate = 0.25});
  CHECK(v.data == t.bias().data());
  CHECK(v[1] == 0.0f);
  CHECK(rb::bias_state(0).view().empty());
}

TEST_CASE("test_balance: bias update equals brute force with recentre mean zero") {
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<int> cnt(0, 6);
  for (int trial = 0; trial < 30; ++trial) {
    const std::size_t E = 1 + static_cast<std::size_t>(trial % 9);
    std::vector<int> load(E);
    for (int& l : load) l = cnt(rng);
    const std::vector<float> init = resonance_test::normal_values(rng, static_cast<rs::index>(E), 0.1);
    const bool recentre = trial % 2 == 1;
    rb::bias_state s(init);
    s.update(plan_with_loads(load), {.rate = 0.01, .recentre = recentre});
    const std::vector<double> want = ref_update(std::vector<double>(init.begin(), init.end()),
                                                std::vector<double>(load.begin(), load.end()), 0.01, recentre);
    CAPTURE(trial);
    for (std::size_t e = 0; e < E; ++e) CHECK(std::fabs(static_cast<double>(s.bias()[e]) - want[e]) < 1e-7);
    if (recentre) {
      double m = 0.0;
      for (float b : s.bias()) m += static_cast<double>(b);
      CHECK(std::fabs(m) < 1e-6);
    }
  }
}

TEST_CASE("test_balance: accumulate over micro-batches equals one update on summed counts") {
  // Three micro-batches whose separate signs disagree with the sign of their sum.
  const std::vector<std::vector<int>> micro = {{5, 0, 1, 2}, {0, 4, 1, 3}, {0, 0, 6, 1}};
  std::vector<int> sum(4, 0);
  for (const auto& m : micro)
    for (std::size_t e = 0; e < 4; ++e) sum[e] += m[e];  // {5,4,8,6}: mean 5.75
  rb::bias_state a(4), b(4);
  for (const auto& m : micro) a.accumulate(plan_with_loads(m));
  CHECK(a.pending_batches() == 3);
  CHECK(a.pending()[2] == 8.0);
  CHECK(std::all_of(a.bias().begin(), a.bias().end(), [](float x) { return x == 0.0f; }));
  a.update({.rate = 0.1});
  b.update(plan_with_loads(sum), {.rate = 0.1});
  CHECK(a == b);
  check_bias(a, {0.1, 0.1, -0.1, -0.1});
  CHECK(a.pending_batches() == 0);
  CHECK(a.pending()[2] == 0.0);

  // Loads given directly (e.g. all-reduced) accumulate the same way.
  rb::bias_state c(4);
  const std::vector<double> direct = {5.0, 4.0, 8.0, 6.0};
  c.accumulate(direct);
  c.update({.rate = 0.1});
  CHECK(c == b);

  // update(plan) adds what was accumulated before.
  rb::bias_state d(4);
  d.accumulate(plan_with_loads(micro[0]));
  d.accumulate(plan_with_loads(micro[1]));
  d.update(plan_with_loads(micro[2]), {.rate = 0.1});
  CHECK(d == b);
}

TEST_CASE("test_balance: bias load source demand versus kept") {
  // Expert 0 demanded by 4 tokens, capacity 1: demand {4,1,1,1} (mean 7/4), kept {1,1,1,1}.
  const rs::routing_plan p = plan_of(4, {{0}, {0}, {0}, {0}, {1}, {2}, {3}},
                                     rs::capacity_limits{.capacity = 1, .drop = rs::drop_policy::position});
  rb::bias_state dem(4), kept(4);
  dem.update(p, {.rate = 1.0});
  kept.update(p, {.rate = 1.0, .load = rb::load_source::kept});
  check_bias(dem, {-1.0, 1.0, 1.0, 1.0});
  check_bias(kept, {0.0, 0.0, 0.0, 0.0});
}

TEST_CASE("test_balance: bias errors leave the state untouched") {
  rb::bias_state s(std::vector<float>{0.5f, -0.5f, 0.0f});
  s.accumulate(plan_with_loads({1, 2, 3}));
  const rb::bias_state before = s;
  const rs::routing_plan p3 = plan_with_loads({1, 0, 0});
  const rs::routing_plan p4 = plan_with_loads({1, 0, 0, 0});
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  CHECK(error_of([&] { s.update({.rate = -1.0}); }).find("rate") != std::string::npos);
  CHECK(error_of([&] { s.update(p3, {.rate = nan}); }).find("rate") != std::string::npos);
  CHECK(error_of([&] { s.update(p3, {.rate = inf}); }).find("rate") != std::string::npos);
  CHECK(error_of([&] { s.accumulate(p3, {.rate = -0.1}); }).find("rate") != std::string::npos);
  CHECK(error_of([&] { s.update(p4); }).find("resonance: plan: expected 3 experts") != std::string::npos);
  CHECK(error_of([&] { s.accumulate(p4); }).find("resonance: plan:") != std::string::npos);
  const std::vector<double> bad = {1.0, -1.0, 0.0};
  const std::vector<double> short_loads = {1.0, 1.0};
  CHECK(error_of([&] { s.accumulate(bad); }).find("resonance: loads:") != std::string::npos);
  CHECK(error_of([&] { s.accumulate(short_loads); }).find("resonance: loads:") != std::string::npos);
  CHECK(error_of([&] { s.update(p3, {.rate = 1e300}); }).find("resonance: rate:") != std::string::npos);
  CHECK(error_of([&] {
          rb::bias_state(std::vector<float>{0.0f, std::numeric_limits<float>::infinity()});
        }).find("resonance: initial:") != std::string::npos);
  CHECK(error_of([&] { rb::bias_state(rs::index{-1}); }).find("resonance: num_experts:") != std::string::npos);
  CHECK(s == before);
}

namespace {

// Routes `steps` batches of a skewed stream (N(0,1) + a fixed per-expert skew) with the bias updated
// after each; returns {mean CV of the first 10 steps without bias, mean CV of the last 20 with it}.
std::pair<double, double> simulate(rt::token_choice dir, double rate, int steps) {
  constexpr rs::index T = 2048, E = 16;
  std::mt19937_64 rng(1234);
  std::vector<float> skew(usz(E));
  for (rs::index e = 0; e < E; ++e) skew[usz(e)] = 2.0f * static_cast<float>(e) / static_cast<float>(E - 1) - 1.0f;
  auto batch = [&] {
    std::vector<float> x = resonance_test::normal_values(rng, T * E, 1.0);
    for (rs::index t = 0; t < T; ++t)
      for (rs::index e = 0; e < E; ++e) x[usz(t * E + e)] += skew[usz(e)];
    return x;
  };
  using router_t = rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::dropless>;
  const router_t plain{{}, dir, {}};
  double cv0 = 0.0;
  for (int i = 0; i < 10; ++i) {
    const std::vector<float> x = batch();
    cv0 += rb::compute_stats(plain.route(rs::matrix_view<const float>{x.data(), T, E})).load_cv / 10.0;
  }
  rb::bias_state state(E);
  router_t biased{{}, dir, {}};
  biased.direction.expert_bias = state.view();
  double cv1 = 0.0;
  for (int i = 0; i < steps; ++i) {
    const std::vector<float> x = batch();
    const rs::routing_plan plan = biased.route(rs::matrix_view<const float>{x.data(), T, E});
    if (i >= steps - 20) cv1 += rb::compute_stats(plan).load_cv / 20.0;
    state.update(plan, {.rate = rate});
  }
  return {cv0, cv1};
}

}  // namespace

TEST_CASE("test_balance: bias updater balances a skewed stream for every score function") {
  struct variant {
    std::string name;
    rt::token_choice dir;
    double rate;
  };
  // pre_softmax ranks probabilities (order 1/E), so its rate is an order of magnitude smaller.
  const variant vs[] = {
      {"softmax post", {.top_k = 2}, 0.01},
      {"sigmoid", {.top_k = 2, .score = rs::score::sigmoid}, 0.01},
      {"softmax pre", {.top_k = 2, .pre_softmax = true}, 0.001},
  };
  for (const variant& v : vs) {
    CAPTURE(v.name);
    const auto [cv0, cv1] = simulate(v.dir, v.rate, 200);
    MESSAGE(v.name, ": load cv ", cv0, " -> ", cv1);
    CHECK(cv0 > 0.3);
    CHECK(cv1 < 0.5 * cv0);
  }
}

namespace {

// Entropy restated in long double: the mean of row-normalised scores, then -sum p log p.
double ref_entropy(const std::vector<double>& s, rs::index T, rs::index E) {
  std::vector<long double> p(usz(E), 0.0L);
  for (rs::index t = 0; t < T; ++t) {
    long double z = 0.0L;
    for (rs::index e = 0; e < E; ++e) z += s[usz(t * E + e)];
    for (rs::index e = 0; e < E; ++e) p[usz(e)] += s[usz(t * E + e)] / z / static_cast<long double>(T);
  }
  long double h = 0.0L;
  for (long double q : p)
    if (q > 0.0L) h -= q * std::log(q);
  return static_cast<double>(h);
}

}  // namespace

TEST_CASE("test_balance: routing entropy equals brute force") {
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (rs::index E : {1, 2, 5, 16}) {
    const rs::index T = 37;
    std::vector<double> s(usz(T * E));
    for (double& x : s) x = u(rng);
    s[0] = 0.0;  // a zero score is allowed
    if (E == 1) s[0] = 0.5;
    std::vector<float> sf(s.begin(), s.end());
    std::vector<double> sd(sf.begin(), sf.end());
    const double want = ref_entropy(sd, T, E);
    CAPTURE(E);
    // E == 1: both are 0 up to rounding (the brute force is not clamped), hence the absolute term.
    CHECK(std::fabs(rb::routing_entropy(rs::matrix_view<const float>{sf.data(), T, E}) - want) <= 1e-12 * want + 1e-15);
    CHECK(std::fabs(rb::routing_entropy(rs::matrix_view<const double>{sd.data(), T, E}) - want) <=
          1e-12 * want + 1e-15);
    const double norm = rb::routing_entropy(rs::matrix_view<const double>{sd.data(), T, E}, true);
    if (E == 1)
      CHECK(norm == 0.0);
    else
      CHECK(close_rel(norm, want / std::log(static_cast<double>(E)), 1e-12));
  }

  // Uniform rows: log E (normalised 1). One-hot rows all on one expert: 0. One-hot rows spread evenly
  // over the experts: the mean is uniform again, log E.
  const rs::index T = 8, E = 4;
  std::vector<float> uni(usz(T * E), 0.25f), hot(usz(T * E), 0.0f), spread(usz(T * E), 0.0f);
  for (rs::index t = 0; t < T; ++t) {
    hot[usz(t * E + 2)] = 1.0f;
    spread[usz(t * E + t % E)] = 3.0f;  // rows are normalised, so scale does not matter
  }
  CHECK(close_rel(rb::routing_entropy(rs::matrix_view<const float>{uni.data(), T, E}), std::log(4.0), 1e-15));
  CHECK(close_rel(rb::routing_entropy(rs::matrix_view<const float>{uni.data(), T, E}, true), 1.0, 1e-15));
  CHECK(rb::routing_entropy(rs::matrix_view<const float>{hot.data(), T, E}) == 0.0);
  CHECK(rb::routing_entropy(rs::matrix_view<const float>{hot.data(), T, E}, true) == 0.0);
  CHECK(close_rel(rb::routing_entropy(rs::matrix_view<const float>{spread.data(), T, E}), std::log(4.0), 1e-15));
  CHECK(rb::routing_entropy(rs::matrix_view<const float>{nullptr, 0, E}) == 0.0);

  // From a plan: the kept weight share per expert. Weights {1,1,1} on 3 of 4 experts -> log 3; all on one
  // expert -> 0.
  const rs::routing_plan p = plan_of(4, {{0}, {1}, {3}});
  CHECK(close_rel(rb::routing_entropy(p), std::log(3.0), 1e-15));
  CHECK(close_rel(rb::routing_entropy(p, true), std::log(3.0) / std::log(4.0), 1e-15));
  CHECK(rb::routing_entropy(plan_of(4, {{2}, {2}})) == 0.0);
  // Brute force on a routed plan with capacity and padding.
  std::vector<float> x = resonance_test::normal_values(rng, 50 * 6, 1.0);
  const rs::routing_plan q = rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::factor>{
      {},
      {.top_k = 2},
      {.factor = 0.8,
       .pad_to_capacity = true}}.route(rs::matrix_view<const float>{x.data(), 50, 6});
  std::vector<long double> mass(6, 0.0L);
  long double total = 0.0L;
  for (rs::index t = 0; t < 50; ++t)
    for (rs::id_type i = q.token_offsets()[usz(t)]; i < q.token_offsets()[usz(t + 1)]; ++i) {
      mass[static_cast<std::size_t>(q.token_expert()[static_cast<std::size_t>(i)])] +=
          q.token_weight()[static_cast<std::size_t>(i)];
      total += q.token_weight()[static_cast<std::size_t>(i)];
    }
  long double h = 0.0L;
  for (long double m : mass)
    if (m > 0.0L) h -= (m / total) * std::log(m / total);
  CHECK(close_rel(rb::routing_entropy(q), static_cast<double>(h), 1e-12));
}

TEST_CASE("test_balance: routing entropy errors") {
  std::vector<float> s = {0.5f, 0.5f, -0.1f, 1.0f};
  CHECK(error_of([&] {
          (void)rb::routing_entropy(rs::matrix_view<const float>{s.data(), 2, 2});
        }).find("resonance: scores: expected finite values >= 0") != std::string::npos);
  s = {0.5f, 0.5f, 0.0f, 0.0f};
  CHECK(error_of([&] {
          (void)rb::routing_entropy(rs::matrix_view<const float>{s.data(), 2, 2});
        }).find("resonance: scores: expected rows with a finite positive sum") != std::string::npos);
  s[2] = std::numeric_limits<float>::quiet_NaN();
  CHECK(error_of([&] {
          (void)rb::routing_entropy(rs::matrix_view<const float>{s.data(), 2, 2});
        }).find("resonance: scores:") != std::string::npos);
  CHECK(error_of([&] {
          (void)rb::routing_entropy(rs::matrix_view<const float>{nullptr, 2, 2});
        }).find("resonance: scores:") != std::string::npos);
}

namespace {

// CH restated: each kept assignment is a labelled point; W from the cluster means, B = total scatter - W
// (a different route to the between-cluster term), in long double.
double ref_ch(const std::vector<double>& f, rs::index d, const rs::routing_plan& p, bool paper) {
  std::vector<std::pair<rs::id_type, rs::id_type>> pts;  // (token, expert)
  for (rs::index t = 0; t < p.num_tokens(); ++t)
    for (rs::id_type i = p.token_offsets()[usz(t)]; i < p.token_offsets()[usz(t + 1)]; ++i)
      pts.emplace_back(static_cast<rs::id_type>(t), p.token_expert()[static_cast<std::size_t>(i)]);
  const rs::index E = p.num_experts();
  std::vector<long double> mean(usz(E * d), 0.0L), grand(usz(d), 0.0L);
  std::vector<long double> n(usz(E), 0.0L);
  for (auto [t, e] : pts) {
    n[usz(e)] += 1.0L;
    for (rs::index j = 0; j < d; ++j) {
      mean[usz(e * d + j)] += f[usz(t * d + j)];
      grand[usz(j)] += f[usz(t * d + j)];
    }
  }
  const long double N = static_cast<long double>(pts.size());
  long double K = 0.0L;
  for (long double c : n) K += c > 0.0L ? 1.0L : 0.0L;
  if (K < 2.0L) return 0.0;
  for (rs::index e = 0; e < E; ++e)
    for (rs::index j = 0; j < d; ++j)
      if (n[usz(e)] > 0.0L) mean[usz(e * d + j)] /= n[usz(e)];
  for (long double& g : grand) g /= N;
  long double W = 0.0L, Tot = 0.0L;
  for (auto [t, e] : pts)
    for (rs::index j = 0; j < d; ++j) {
      const long double x = f[usz(t * d + j)];
      W += (x - mean[usz(e * d + j)]) * (x - mean[usz(e * d + j)]);
      Tot += (x - grand[usz(j)]) * (x - grand[usz(j)]);
    }
  const long double B = Tot - W;
  if (paper) return static_cast<double>(B / W);
  return static_cast<double>((B / (K - 1.0L)) / (W / (N - K)));
}

}  // namespace

TEST_CASE("test_balance: Calinski-Harabasz equals brute force on clustered features") {
  std::mt19937_64 rng(99);
  const rs::index T = 300, E = 6, d = 5;
  // Features: a per-cluster centre plus noise; logits favour the token's cluster, so the plan groups
  // them (imperfectly: top-2 and capacity drops).
  std::vector<double> centres = resonance_test::normal_values<double>(rng, E * d, 3.0);
  std::vector<double> f(usz(T * d));
  std::vector<float> logits = resonance_test::normal_values(rng, T * E, 1.0);
  std::normal_distribution<double> noise(0.0, 1.0);
  for (rs::index t = 0; t < T; ++t) {
    const rs::index c = t % E;
    for (rs::index j = 0; j < d; ++j) f[usz(t * d + j)] = centres[usz(c * d + j)] + noise(rng);
    logits[usz(t * E + c)] += 2.0f;
  }
  const std::vector<float> ff(f.begin(), f.end());
  const std::vector<double> fd(ff.begin(), ff.end());
  for (rs::index k : {1, 2}) {
    for (double factor : {0.0, 1.0}) {
      CAPTURE(k);
      CAPTURE(factor);
      using rf = rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::factor>;
      const rs::routing_plan p =
          factor > 0.0
              ? rf{{}, {.top_k = k}, {.factor = factor, .pad_to_capacity = true}}.route(
                    rs::matrix_view<const float>{logits.data(), T, E})
              : rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::dropless>{{}, {.top_k = k}, {}}
                    .route(rs::matrix_view<const float>{logits.data(), T, E});
      const double want = ref_ch(fd, d, p, false);
      const double want_paper = ref_ch(fd, d, p, true);
      CHECK(want > 10.0);  // clustered: far above the ~1 of random labels
      CHECK(close_rel(rb::calinski_harabasz(rs::matrix_view<const double>{fd.data(), T, d}, p), want, 1e-10));
      CHECK(close_rel(rb::calinski_harabasz(rs::matrix_view<const float>{ff.data(), T, d}, p), want, 1e-10));
      CHECK(close_rel(rb::calinski_harabasz(rs::matrix_view<const double>{fd.data(), T, d}, p, rb::ch_form::paper),
                      want_paper, 1e-10));
    }
  }
  // Random labels: CH of order 1.
  const std::vector<float> rnd = resonance_test::normal_values(rng, T * E, 1.0);
  const std::vector<double> g = resonance_test::normal_values<double>(rng, T * d, 1.0);
  const rs::routing_plan pr = rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::dropless>{
      {}, {.top_k = 1}, {}}.route(rs::matrix_view<const float>{rnd.data(), T, E});
  const double ch = rb::calinski_harabasz(rs::matrix_view<const double>{g.data(), T, d}, pr);
  CHECK(close_rel(ch, ref_ch(g, d, pr, false), 1e-10));
  CHECK(ch < 5.0);
}

TEST_CASE("test_balance: Calinski-Harabasz closed forms and degenerate cases") {
  // Two clusters in 1-D: {-a-1, -a+1} and {a-1, a+1}. Centres -a, a; grand mean 0.
  // B = 2·a² + 2·a² = 4a², W = 4 (four points at distance 1), N = 4, K = 2:
  // standard CH = (4a²/1) / (4/2) = 2a², paper CH = a².
  const double a = 10.0;
  const std::vector<double> f = {-a - 1, -a + 1, a - 1, a + 1};
  const rs::routing_plan p = plan_of(3, {{0}, {0}, {2}, {2}});
  const rs::matrix_view<const double> fv{f.data(), 4, 1};
  CHECK(close_rel(rb::calinski_harabasz(fv, p), 2 * a * a, 1e-14));
  CHECK(close_rel(rb::calinski_harabasz(fv, p, rb::ch_form::paper), a * a, 1e-14));

  // Two well-separated 2-D clusters: squares of half-side h centred at (±L, 0), 4 points each.
  // B = 8L², W = 8·2h² = 16h², N = 8, K = 2: standard CH = 8L² / (16h²/6) = 3L²/h².
  const double L = 7.0, h = 0.5;
  std::vector<double> sq;
  std::vector<std::vector<rs::id_type>> lab;
  for (int c = 0; c < 2; ++c)
    for (int i = 0; i < 4; ++i) {
      sq.push_back((c == 0 ? -L : L) + ((i & 1) ? h : -h));
      sq.push_back((i & 2) ? h : -h);
      lab.push_back({static_cast<rs::id_type>(c)});
    }
  CHECK(close_rel(rb::calinski_harabasz(rs::matrix_view<const double>{sq.data(), 8, 2}, plan_of(2, lab)),
                  3 * L * L / (h * h), 1e-13));

  // A token kept by two experts counts in both clusters: tokens 0,1 at -1,+1 on expert 0, token 2 at 5
  // on experts 0 and 1. Points: cluster 0 {-1,1,5} (mean 5/3), cluster 1 {5}. N = 4, K = 2, grand 10/4.
  const std::vector<double> m = {-1.0, 1.0, 5.0};
  const rs::routing_plan pm = plan_of(2, {{0}, {0}, {0, 1}});
  const double g = 2.5, c0 = 5.0 / 3.0;
  const double B = 3 * (c0 - g) * (c0 - g) + (5.0 - g) * (5.0 - g);
  const double W = (-1 - c0) * (-1 - c0) + (1 - c0) * (1 - c0) + (5 - c0) * (5 - c0);
  CHECK(close_rel(rb::calinski_harabasz(rs::matrix_view<const double>{m.data(), 3, 1}, pm), (B / 1.0) / (W / 2.0),
                  1e-14));

  // Degenerate: one cluster -> 0; singletons (N == K, W == 0) -> +inf; identical points -> 0; tokens kept
  // by none are excluded (the capacity-dropped token does not move the result).
  CHECK(rb::calinski_harabasz(fv, plan_of(3, {{1}, {1}, {1}, {1}})) == 0.0);
  CHECK(std::isinf(rb::calinski_harabasz(fv, plan_of(4, {{0}, {1}, {2}, {3}}))));
  const std::vector<double> same = {1.0, 1.0, 1.0, 1.0};
  CHECK(rb::calinski_harabasz(rs::matrix_view<const double>{same.data(), 4, 1}, p) == 0.0);
  CHECK(rb::calinski_harabasz(rs::matrix_view<const double>{nullptr, 0, 3}, plan_of(2, {})) == 0.0);
  const std::vector<double> f5 = {-a - 1, -a + 1, a - 1, a + 1, 1e6};
  const rs::routing_plan p5 =
      plan_of(3, {{0}, {0}, {2}, {2}, {2}}, rs::capacity_limits{.capacity = 2, .drop = rs::drop_policy::position});
  REQUIRE(p5.num_assignments() == 4);
  CHECK(close_rel(rb::calinski_harabasz(rs::matrix_view<const double>{f5.data(), 5, 1}, p5), 2 * a * a, 1e-14));
}

TEST_CASE("test_balance: Calinski-Harabasz errors") {
  const rs::routing_plan p = plan_of(2, {{0}, {1}});
  std::vector<double> f = {0.0, 1.0, 2.0};
  CHECK(error_of([&] {
          (void)rb::calinski_harabasz(rs::matrix_view<const double>{f.data(), 3, 1}, p);
        }).find("resonance: features: expected 2 rows") != std::string::npos);
  f[1] = std::numeric_limits<double>::infinity();
  CHECK(error_of([&] {
          (void)rb::calinski_harabasz(rs::matrix_view<const double>{f.data(), 2, 1}, p);
        }).find("resonance: features: expected finite values") != std::string::npos);
  CHECK(error_of([&] {
          (void)rb::calinski_harabasz(rs::matrix_view<const double>{f.data(), 2, 2, 1}, p);
        }).find("resonance: features: expected stride >= cols") != std::string::npos);
}

TEST_CASE("test_balance: compute_stats exposes per-expert demand and kept counts") {
  const rs::routing_plan p =
      plan_of(3, {{0}, {0}, {0}, {1}}, rs::capacity_limits{.capacity = 2, .drop = rs::drop_policy::position});
  const rb::routing_stats s = rb::compute_stats(p);
  CHECK(s.expert_demand == std::vector<rs::id_type>{3, 1, 0});
  CHECK(s.expert_kept == std::vector<rs::id_type>{2, 1, 0});
  CHECK(s.dropped == 1);
  CHECK(rb::compute_stats(p.view()).expert_kept == s.expert_kept);
}

// ---------------------------------------------------------------------------------------------------
// Determinism: the token sums run over fixed chunks of 1024 tokens, the per-expert sums in slot order,
// the sums over experts in expert order, so every backend gives the same bits.

TEST_CASE("test_balance: statistics and the bias update are bitwise the same on every backend") {
  std::mt19937_64 rng(101);
  const rs::index T = 2500, E = 7, d = 5;  // 3 chunks of 1024 tokens
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<double> sd(usz(T * E));
  for (double& x : sd) x = u(rng);
  const std::vector<float> sf(sd.begin(), sd.end());
  std::vector<float> logits = resonance_test::normal_values(rng, T * E, 1.0);
  for (rs::index t = 0; t < T; ++t) logits[usz(t * E + t % E)] += 1.5f;
  const rs::routing_plan plan = rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::factor>{
      {},
      {.top_k = 2},
      {.factor = 0.8,
       .pad_to_capacity = true}}.route(rs::matrix_view<const float>{logits.data(), T, E});
  REQUIRE(plan.num_dropped() > 0);
  std::vector<double> fd = resonance_test::normal_values<double>(rng, T * d, 1.0);
  for (rs::index t = 0; t < T; ++t) fd[usz(t * d + t % d)] += 3.0;
  const std::vector<float> ff(fd.begin(), fd.end());

  const auto all = [&](const auto& be) {
    std::vector<double> out;
    for (const bool norm : {false, true}) {
      out.push_back(rb::routing_entropy(be, rs::matrix_view<const float>{sf.data(), T, E}, norm));
      out.push_back(rb::routing_entropy(be, rs::matrix_view<const double>{sd.data(), T, E}, norm));
      out.push_back(rb::routing_entropy(be, plan, norm));
    }
    for (const auto form : {rb::ch_form::standard, rb::ch_form::paper}) {
      out.push_back(rb::calinski_harabasz(be, rs::matrix_view<const float>{ff.data(), T, d}, plan, form));
      out.push_back(rb::calinski_harabasz(be, rs::matrix_view<const double>{fd.data(), T, d}, plan.view(), form));
    }
    return out;
  };
  const auto biases = [&](const auto& be) {
    rb::bias_state s(E);
    s.accumulate(be, plan);
    s.accumulate(be, plan.view(), {.load = rb::load_source::kept});
    s.update(be, plan, {.rate = 0.01, .recentre = true});
    s.update(be, plan.view(), {.rate = 0.01, .load = rb::load_source::kept});
    return s;
  };
  const std::vector<double> want = all(rs::backend::serial{});
  const rb::bias_state want_bias = biases(rs::backend::serial{});
  // The overloads without a backend are serial's.
  CHECK(rb::routing_entropy(rs::matrix_view<const float>{sf.data(), T, E}) == want[0]);
  CHECK(rb::routing_entropy(plan) == want[2]);
  CHECK(rb::calinski_harabasz(rs::matrix_view<const float>{ff.data(), T, d}, plan) == want[6]);
  rb::bias_state host(E);
  host.accumulate(plan);
  host.accumulate(plan.view(), {.load = rb::load_source::kept});
  host.update(plan, {.rate = 0.01, .recentre = true});
  host.update(plan.view(), {.rate = 0.01, .load = rb::load_source::kept});
  CHECK(host == want_bias);
  resonance_test::for_each_backend_and_scrambled([&](const auto& be, const std::string& name) {
    CAPTURE(name);
    const std::vector<double> got = all(be);
    REQUIRE(got.size() == want.size());
    CHECK(std::memcmp(got.data(), want.data(), want.size() * sizeof(double)) == 0);
    CHECK(biases(be) == want_bias);
  });
}

TEST_CASE("test_balance: statistics errors name the first offending entry on every backend") {
  std::mt19937_64 rng(102);
  const rs::index T = 3000, E = 4, d = 3;
  std::vector<float> s(usz(T * E), 0.5f);
  s[usz(2200 * E + 1)] = std::numeric_limits<float>::quiet_NaN();  // the third chunk
  s[usz(1800 * E + 2)] = -0.25f;                                   // the second chunk: the first one
  std::vector<float> zero_row(usz(T * E), 0.5f);
  for (rs::index e = 0; e < E; ++e) zero_row[usz(1100 * E + e)] = 0.0f;
  zero_row[usz(2900 * E)] = -1.0f;
  std::vector<double> f = resonance_test::normal_values<double>(rng, T * d, 1.0);
  f[usz(2100 * d + 0)] = std::numeric_limits<double>::infinity();
  f[usz(1800 * d + 2)] = std::numeric_limits<double>::quiet_NaN();
  // One expert per token, weight 1, except two negative kept weights: expert 2's slots come first.
  rs::candidate_set c;
  c.num_tokens = T;
  c.num_experts = 6;
  c.offsets.clear();
  for (rs::index t = 0; t < T; ++t) {
    c.offsets.push_back(static_cast<rs::id_type>(t));
    c.expert.push_back(static_cast<rs::id_type>(t % 6));
    c.weight.push_back(t == 100 ? -0.5f : t == 2000 ? -1.0f : 1.0f);
  }
  c.offsets.push_back(static_cast<rs::id_type>(T));
  const rs::routing_plan p = rs::build_plan(rs::backend::serial{}, c, rs::capacity_limits{});
  const std::string slot = std::to_string(p.token_slot()[2000]);
  resonance_test::for_each_backend_and_scrambled([&](const auto& be, const std::string& name) {
    CAPTURE(name);
    std::string msg = error_of([&] { (void)rb::routing_entropy(be, rs::matrix_view<const float>{s.data(), T, E}); });
    CHECK(msg.find("resonance: scores: expected finite values >= 0") == 0);
    CHECK(msg.find("scores(1800, 2) = -0.25") != std::string::npos);
    msg = error_of([&] { (void)rb::routing_entropy(be, rs::matrix_view<const float>{zero_row.data(), T, E}); });
    CHECK(msg.find("resonance: scores: expected rows with a finite positive sum") == 0);
    CHECK(msg.find("row 1100 sums to 0") != std::string::npos);
    msg = error_of([&] { (void)rb::routing_entropy(be, p); });
    CHECK(msg.find("resonance: plan: expected finite kept weights >= 0") == 0);
    CHECK(msg.find("slot " + slot + " has weight -1") != std::string::npos);
    msg = error_of([&] { (void)rb::calinski_harabasz(be, rs::matrix_view<const double>{f.data(), T, d}, p); });
    CHECK(msg.find("resonance: features: expected finite values") == 0);
    CHECK(msg.find("features(1800, 2) = ") != std::string::npos);
  });
}
