// capacity::adaptive's smoothed estimate and warm-up, and the cosine requirement of the schedulers that
// read logits as cosines (lower_bound estimating δ, adaptive), against references written here:
// brute-force counts of each synthetic batch (top-1 by a linear scan, ties to the lower expert), the
// moving average as an explicit weighted mean over the whole history (not the library's running
// update), the resonance rule and the monotone, rate-limited controller evaluated in double, and
// LocMoE's Eq. 9 with δ recomputed from the hidden states.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/affinity/linear.hpp>
#include <resonance/resonance.hpp>

#include "error_of.hpp"
#include "random_inputs.hpp"
#include "reference.hpp"

namespace {

namespace rs = resonance;
namespace ra = resonance::affinity;
namespace rt = resonance::routing;
namespace cap = resonance::capacity;
using resonance_test::close_rel;
using resonance_test::error_of;

constexpr double infinite = std::numeric_limits<double>::infinity();
constexpr double not_a_number = std::numeric_limits<double>::quiet_NaN();
constexpr rs::index d = 64;        // the hidden size the statistics assume
constexpr double thr = 3.0 / 8.0;  // the default resonance threshold 3/sqrt(d)

std::size_t at(rs::index i) { return static_cast<std::size_t>(i); }

double uniform(std::mt19937_64& rng, double lo, double hi) {
  return std::uniform_real_distribution<double>(lo, hi)(rng);
}

// ---------------------------------------------------------------------------------------------------
// Synthetic affinity streams.

// One batch of top-1 cosine logits (T×E): for each expert e, demand[e] tokens whose largest logit is on
// e, the first resonating[e] of them at an affinity in [thr + 0.05, thr + 0.15), the others in
// [thr - 0.1, thr - 0.05); every other logit in [-0.3, thr - 0.2). Tokens shuffled.
struct batch {
  rs::index T = 0, E = 0;
  std::vector<float> logits;

  rs::matrix_view<const float> view() const { return {logits.data(), T, E}; }
  // The context a router would pass for these cosine logits (no proposals: top-1 of the logits).
  rs::capacity_context context(double cosine_scale = 1.0) const { return {T, E, 1, d, view(), nullptr, cosine_scale}; }
};

batch make_batch(std::mt19937_64& rng, const std::vector<rs::index>& demand, const std::vector<rs::index>& resonating) {
  const auto E = static_cast<rs::index>(demand.size());
  std::vector<std::pair<rs::index, bool>> tokens;  // (home expert, resonates)
  for (rs::index e = 0; e < E; ++e)
    for (rs::index j = 0; j < demand[at(e)]; ++j) tokens.emplace_back(e, j < resonating[at(e)]);
  std::shuffle(tokens.begin(), tokens.end(), rng);
  batch b{static_cast<rs::index>(tokens.size()), E, std::vector<float>(tokens.size() * at(E))};
  for (std::size_t t = 0; t < tokens.size(); ++t) {
    float* row = b.logits.data() + t * at(E);
    for (rs::index e = 0; e < E; ++e) row[e] = static_cast<float>(uniform(rng, -0.3, thr - 0.2));
    const auto [home, hot] = tokens[t];
    row[home] = static_cast<float>(hot ? uniform(rng, thr + 0.05, thr + 0.15) : uniform(rng, thr - 0.1, thr - 0.05));
  }
  return b;
}

std::vector<rs::index> times(const std::vector<rs::index>& v, rs::index m) {
  std::vector<rs::index> out = v;
  for (rs::index& x : out) x *= m;
  return out;
}

// ---------------------------------------------------------------------------------------------------
// The reference.

// Per-expert TCR demand and resonating counts of one batch, and its number of pairs.
struct counts {
  std::vector<double> demand, resonating;
  double pairs = 0.0;
};

counts count_batch(const batch& b) {
  counts c{std::vector<double>(at(b.E), 0.0), std::vector<double>(at(b.E), 0.0), static_cast<double>(b.T)};
  for (rs::index t = 0; t < b.T; ++t) {
    const float* row = b.logits.data() + at(t * b.E);
    rs::index top = 0;
    for (rs::index e = 1; e < b.E; ++e)
      if (row[e] > row[top]) top = e;
    c.demand[at(top)] += 1.0;
    if (static_cast<double>(row[top]) >= thr) c.resonating[at(top)] += 1.0;
  }
  return c;
}

// The smoothed statistics after `history`: batch i of n weighs 2^(-(n-1-i)/half_life) (half_life 0:
// the last batch alone), normalised by the sum of the weights.
counts smooth(const std::vector<counts>& history, double half_life) {
  const std::size_t n = history.size(), E = history.front().demand.size();
  counts s{std::vector<double>(E, 0.0), std::vector<double>(E, 0.0), 0.0};
  double total = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    const double age = static_cast<double>(n - 1 - i);
    const double w = half_life > 0.0 ? std::pow(2.0, -age / half_life) : (age == 0.0 ? 1.0 : 0.0);
    total += w;
    for (std::size_t e = 0; e < E; ++e) {
      s.demand[e] += w * history[i].demand[e];
      s.resonating[e] += w * history[i].resonating[e];
    }
    s.pairs += w * history[i].pairs;
  }
  for (std::size_t e = 0; e < E; ++e) {
    s.demand[e] /= total;
    s.resonating[e] /= total;
  }
  s.pairs /= total;
  return s;
}

// The resonance rule on statistics rescaled to a batch of `pairs` pairs: an expert whose resonating
// count exceeds 2·μ0 + 3 (μ0 = D·(1 − Φ(3)^E)) needs min(D, margin·n); one that does not makes the
// estimate unbounded when D exceeds the floor capacity, and needs D otherwise.
double rule(const counts& s, double pairs, double margin, double floor_capacity) {
  const auto E = static_cast<double>(s.demand.size());
  const double p0 = 1.0 - std::pow(0.5 * std::erfc(-3.0 / std::sqrt(2.0)), E);
  double c = 0.0;
  for (std::size_t e = 0; e < s.demand.size(); ++e) {
    const double D = s.demand[e] * pairs / s.pairs, n = s.resonating[e] * pairs / s.pairs;
    if (n > 2.0 * D * p0 + 3.0) {
      c = std::max(c, std::min(D, margin * n));
    } else if (D > floor_capacity) {
      return infinite;
    } else {
      c = std::max(c, D);
    }
  }
  return c;
}

// The controller: the ceiling during the warm-up or for an unbounded estimate, else the estimate as a
// factor; clamped to [floor, ceiling]; then never above the last factor nor more than max_step below.
struct controller {
  double floor = 0.5, ceiling = 2.0, max_step = 0.1;
  rs::index warmup = 20;
  double factor = infinite;
  rs::index observed = 0;

  double next(double estimate, double per_expert) {
    ++observed;
    double cf = observed > warmup && std::isfinite(estimate) ? estimate / per_expert : ceiling;
    cf = std::min(std::max(cf, floor), ceiling);
    if (std::isfinite(factor)) cf = std::min(std::max(cf, factor * (1.0 - max_step)), factor);
    factor = std::max(cf, floor);
    return factor;
  }
};

// ceil(per_expert · cf), allowing the library's cf to differ from the reference's in the last bits.
bool capacity_matches(rs::index C, double per_expert, double cf) {
  const double v = per_expert * cf;
  return C >= static_cast<rs::index>(std::ceil(v * (1.0 - 1e-12))) &&
         C <= static_cast<rs::index>(std::ceil(v * (1.0 + 1e-12)));
}

// Runs a stream through the policy and the reference side by side; returns the capacities. Checks at
// every step: the estimate, the factor and C against the reference, and C never above the last C.
std::vector<rs::index> run_stream(const cap::adaptive& policy, const std::vector<batch>& stream,
                                  cap::adaptive::state_type& state) {
  std::vector<counts> history;
  controller ref{policy.floor, policy.ceiling, policy.max_step, policy.warmup};
  std::vector<rs::index> caps;
  for (std::size_t step = 0; step < stream.size(); ++step) {
    const batch& b = stream[step];
    history.push_back(count_batch(b));
    const double per_expert = static_cast<double>(b.T) / static_cast<double>(b.E);
    const double want_estimate =
        rule(smooth(history, policy.half_life), static_cast<double>(b.T), policy.margin, policy.floor * per_expert);
    const double want_cf = ref.next(want_estimate, per_expert);
    const rs::capacity_limits lim = policy.limits(b.context(), state);
    CAPTURE(step);
    CHECK(state.step == static_cast<rs::index>(step + 1));
    if (std::isinf(want_estimate)) {
      CHECK(std::isinf(state.estimate));
    } else {
      CHECK(close_rel(state.estimate, want_estimate, 1e-12));
    }
    CHECK(close_rel(state.factor, want_cf, 1e-12));
    CHECK(capacity_matches(lim.capacity, per_expert, want_cf));
    CHECK(lim.capacity == state.capacity);
    if (!caps.empty() && stream[step - 1].T == b.T) CHECK(lim.capacity <= caps.back());
    caps.push_back(lim.capacity);
  }
  return caps;
}

bool non_increasing(const std::vector<rs::index>& v) { return std::is_sorted(v.rbegin(), v.rend()); }

bool starts_with(const std::string& message, const std::string& prefix) { return message.rfind(prefix, 0) == 0; }

// The GrAP-cosine affinity of token x for expert e by definition: cos(x, 1{group e}).
double grap_cosine_of(const float* x, rs::index e, rs::index E, rs::index cols) {
  const rs::index g = cols / E;
  double group = 0.0, norm = 0.0;
  for (rs::index j = 0; j < cols; ++j) {
    norm += static_cast<double>(x[j]) * static_cast<double>(x[j]);
    if (j / g == e) group += static_cast<double>(x[j]);
  }
  return group / (std::sqrt(static_cast<double>(g)) * std::sqrt(norm));
}

// LocMoE Eq. 9 for one sample, clamped to [1, T] (capacity::lower_bound's C).
rs::index locmoe_capacity(double delta, rs::index hidden, rs::index E, rs::index T) {
  const double ec = 1.0 / (static_cast<double>(E) *
                           std::erfc(std::sqrt(delta * delta * static_cast<double>(hidden) / (2.0 - delta * delta))));
  return std::clamp(static_cast<rs::index>(std::ceil(ec)), rs::index{1}, T);
}

}  // namespace

// ===================================================================================================
// The smoothed estimate on synthetic streams.

TEST_CASE("test_adaptive_stable: a constant stream converges to the closed form and stays there") {
  std::mt19937_64 rng(1601);
  const std::vector<rs::index> demand(8, 64), resonating{20, 16, 24, 12, 18, 22, 10, 14};
  std::vector<batch> stream;
  for (int i = 0; i < 60; ++i) stream.push_back(make_batch(rng, demand, resonating));
  // Closed form from the brute-force counts: every expert resonates beyond the null, the neediest
  // needs min(64, 2 · 24) = 48 of the 64 slots per expert: cf 0.75.
  const counts c = count_batch(stream.front());
  double need = 0.0;
  for (std::size_t e = 0; e < 8; ++e) need = std::max(need, std::min(c.demand[e], 2.0 * c.resonating[e]));
  REQUIRE(need == 48.0);
  REQUIRE(rule(c, 512.0, 2.0, 32.0) == 48.0);

  const cap::adaptive policy{};
  CHECK(policy.estimate_capacity(stream.front().context()) == 48.0);
  cap::adaptive::state_type state;
  const std::vector<rs::index> caps = run_stream(policy, stream, state);
  CHECK(non_increasing(caps));
  // Warm-up: the first 20 batches at the ceiling 2 · 64, the estimate already exact (the statistics of
  // a constant stream are the batch's own). Then 10% a step down to 48, which it keeps.
  for (std::size_t i = 0; i < 20; ++i) CHECK(caps[i] == 128);
  CHECK(caps[20] == static_cast<rs::index>(std::ceil(64.0 * 2.0 * 0.9)));
  CHECK(caps[20] < 128);
  for (std::size_t i = 40; i < caps.size(); ++i) CHECK(caps[i] == 48);
  CHECK(state.factor == 0.75);
  CHECK(state.estimate == 48.0);
  CHECK(state.observed == 60);
}

TEST_CASE("test_adaptive_stable: the warm-up holds C at the ceiling for `warmup` non-empty batches") {
  std::mt19937_64 rng(1602);
  const std::vector<rs::index> demand(4, 32), resonating(4, 6);  // need 12 of 32: cf 0.375, the floor binds
  const batch empty{0, 4, {}};
  for (const rs::index warmup : {rs::index{0}, rs::index{1}, rs::index{5}}) {
    CAPTURE(warmup);
    const cap::adaptive policy{.half_life = 2.0, .warmup = warmup};
    cap::adaptive::state_type state;
    rs::index seen = 0;
    for (int step = 0; step < 2 * static_cast<int>(warmup) + 6; ++step) {
      CAPTURE(step);
      if (step % 2 == 1) {
        // An empty batch routes nothing and counts for nothing: statistics, factor and warm-up stay.
        const cap::adaptive::state_type before = state;
        CHECK(policy.limits(empty.context(), state).capacity == 0);
        CHECK(state.step == before.step + 1);
        CHECK(state.factor == before.factor);
        CHECK(state.observed == before.observed);
        CHECK(state.demand == before.demand);
        CHECK(state.weight == before.weight);
        continue;
      }
      const rs::index C = policy.limits(make_batch(rng, demand, resonating).context(), state).capacity;
      ++seen;
      CHECK(state.observed == seen);
      CHECK(state.estimate == 12.0);
      if (seen <= warmup) {
        CHECK(C == 64);  // ceiling 2 · 32
      } else if (seen == warmup + 1) {
        // The first step after the warm-up: from the ceiling, at most 10% lower; without a warm-up (no
        // factor yet) straight to the target, the floor.
        CHECK(C == (warmup == 0 ? 16 : static_cast<rs::index>(std::ceil(32.0 * 2.0 * 0.9))));
      } else {
        CHECK(C < 64);
      }
    }
  }
}

TEST_CASE("test_adaptive_stable: a drifting stream (resonance strengthening) leaves the ceiling and settles") {
  // E = 4, T = 128 (32 per expert), demands 40/32/32/24. The resonating counts rise linearly from 0 to
  // 30/24/24/18 over 12 steps, then stay: at first no expert resonates beyond the null (unbounded: TCR),
  // in the end every expert resonates and needs all of its demand, so the closed form is 40.
  std::mt19937_64 rng(1603);
  const std::vector<rs::index> demand{40, 32, 32, 24}, settled{30, 24, 24, 18};
  std::vector<batch> stream;
  for (rs::index step = 1; step <= 80; ++step) {
    std::vector<rs::index> n(4);
    for (std::size_t e = 0; e < 4; ++e) n[e] = settled[e] * std::min<rs::index>(step, 12) / 12;
    stream.push_back(make_batch(rng, demand, n));
  }
  REQUIRE(std::isinf(rule(count_batch(stream[0]), 128.0, 2.0, 16.0)));
  REQUIRE(rule(count_batch(stream.back()), 128.0, 2.0, 16.0) == 40.0);
  cap::adaptive::state_type state;
  const std::vector<rs::index> caps = run_stream(cap::adaptive{}, stream, state);
  CHECK(non_increasing(caps));
  CHECK(caps[19] == 64);
  const auto drops = std::inner_product(caps.begin() + 1, caps.end(), caps.begin(), 0, std::plus<>(),
                                        [](rs::index now, rs::index before) { return now < before ? 1 : 0; });
  CHECK(drops >= 3);         // progressively, not in one jump
  CHECK(caps.back() == 40);  // the closed form of the settled stream
  CHECK(state.estimate == doctest::Approx(40.0));
}

TEST_CASE("test_adaptive_stable: a noisy stream never flips, never oscillates, and is not pinned") {
  // Batches alternate: A, where every expert resonates (need 2 · 20 = 40 of 64), and B, where expert 0
  // has 2 resonating candidates of 64, no more than the isotropic null explains, so that B alone reads
  // "unbounded". Smoothed, expert 0 resonates (about 11 of 64) and the others need 40: C settles at 40.
  std::mt19937_64 rng(1604);
  const std::vector<rs::index> demand(8, 64), a(8, 20);
  std::vector<rs::index> b = a;
  b[0] = 2;
  std::vector<batch> stream;
  for (int i = 0; i < 80; ++i) stream.push_back(make_batch(rng, demand, i % 2 == 0 ? b : a));
  REQUIRE(std::isinf(rule(count_batch(stream[0]), 512.0, 2.0, 32.0)));
  REQUIRE(rule(count_batch(stream[1]), 512.0, 2.0, 32.0) == 40.0);
  const cap::adaptive policy{};
  CHECK(std::isinf(policy.estimate_capacity(stream[0].context())));
  CHECK(policy.estimate_capacity(stream[1].context()) == 40.0);

  // Batch by batch (no smoothing, no warm-up) the estimate flips at every step.
  const cap::adaptive batchwise{.half_life = 0.0, .warmup = 0};
  cap::adaptive::state_type raw_state;
  int flips = 0;
  bool was_finite = false;
  for (std::size_t i = 0; i < stream.size(); ++i) {
    (void)batchwise.limits(stream[i].context(), raw_state);
    if (i > 0 && std::isfinite(raw_state.estimate) != was_finite) ++flips;
    was_finite = std::isfinite(raw_state.estimate);
  }
  CHECK(flips == 79);

  cap::adaptive::state_type state;
  const std::vector<rs::index> caps = run_stream(policy, stream, state);
  CHECK(non_increasing(caps));
  // Smoothed, only the first batch (B alone) reads unbounded.
  cap::adaptive::state_type replay;
  for (std::size_t i = 0; i < stream.size(); ++i) {
    (void)policy.limits(stream[i].context(), replay);
    CAPTURE(i);
    CHECK(std::isfinite(replay.estimate) == (i > 0));
  }
  CHECK(caps[19] == 128);
  CHECK(caps[20] < 128);  // left the ceiling right after the warm-up
  CHECK(caps.back() == 40);
  CHECK(state.factor == 40.0 / 64.0);
}

TEST_CASE("test_adaptive_stable: a few misleading first batches do not decide C for good") {
  // E = 4, T = 128, demands 40/32/32/24. The first three batches resonate weakly (6 per expert: need
  // 12, below the floor 16), then the stream settles where every expert needs all of its demand (40).
  std::mt19937_64 rng(1605);
  const std::vector<rs::index> demand{40, 32, 32, 24}, weak(4, 6), settled{30, 24, 24, 18};
  std::vector<batch> stream;
  for (int i = 0; i < 70; ++i) stream.push_back(make_batch(rng, demand, i < 3 ? weak : settled));
  REQUIRE(rule(count_batch(stream[0]), 128.0, 2.0, 16.0) == 12.0);
  REQUIRE(rule(count_batch(stream.back()), 128.0, 2.0, 16.0) == 40.0);
  // Batch by batch, the first batch sets cf = max(12/32, floor 0.5) and the monotone rule keeps it.
  const cap::adaptive batchwise{.half_life = 0.0, .warmup = 0};
  cap::adaptive::state_type raw_state;
  for (const batch& bt : stream) (void)batchwise.limits(bt.context(), raw_state);
  CHECK(raw_state.capacity == 16);
  // Smoothed with a warm-up, C ends at the settled closed form.
  cap::adaptive::state_type state;
  const std::vector<rs::index> caps = run_stream(cap::adaptive{}, stream, state);
  CHECK(non_increasing(caps));
  CHECK(caps.back() == 40);
}

TEST_CASE("test_adaptive_stable: an expert without resonance holds C up only if it may overflow the floor") {
  // E = 4, T = 128 (32 slots per expert at cf 1). Experts 0 and 1 resonate (20 of 60, 15 of 50: they
  // need 40 and 30); experts 2 and 3 have 10 and 8 candidates, none resonating. With the floor at 0.5
  // (16 slots) any allowed C keeps all of theirs: the estimate is 40. With the floor at 0.25 (8 slots)
  // expert 2's 10 may not fit: unbounded. Expert 3's 8 fit under both.
  std::mt19937_64 rng(1613);
  const batch b = make_batch(rng, {60, 50, 10, 8}, {20, 15, 0, 0});
  const counts c = count_batch(b);
  REQUIRE(rule(c, 128.0, 2.0, 16.0) == 40.0);
  REQUIRE(std::isinf(rule(c, 128.0, 2.0, 8.0)));
  CHECK(cap::adaptive{}.estimate_capacity(b.context()) == 40.0);
  CHECK(std::isinf(cap::adaptive{.floor = 0.25}.estimate_capacity(b.context())));
  CHECK(std::isinf(cap::adaptive{.floor = 0.3}.estimate_capacity(b.context())));  // 9.6 slots: 10 may overflow
  CHECK(cap::adaptive{.floor = 0.3125}.estimate_capacity(b.context()) == 40.0);   // 10 slots: 10 fit
}

TEST_CASE("test_adaptive_stable: the statistic is a rate, so T may change between steps") {
  // The same shares at T = 128 and T = 256, alternating, give the factors of a stream at T = 128 alone.
  std::mt19937_64 rng(1606);
  const std::vector<rs::index> demand{40, 32, 32, 24}, resonating{12, 10, 10, 8};  // need 24 of 32: cf 0.75
  const cap::adaptive policy{.half_life = 4.0, .warmup = 3};
  cap::adaptive::state_type fixed, varying;
  for (int i = 0; i < 40; ++i) {
    const rs::index m = i % 2 == 0 ? 1 : 2;
    const batch one = make_batch(rng, demand, resonating);
    const batch scaled = make_batch(rng, times(demand, m), times(resonating, m));
    (void)policy.limits(one.context(), fixed);
    const rs::index C = policy.limits(scaled.context(), varying).capacity;
    CAPTURE(i);
    CHECK(close_rel(varying.factor, fixed.factor, 1e-12));
    CHECK(capacity_matches(C, 32.0 * static_cast<double>(m), fixed.factor));
  }
  CHECK(fixed.factor == 0.75);
}

TEST_CASE("test_adaptive_stable: a copied state replays the same capacities") {
  std::mt19937_64 rng(1607);
  const std::vector<rs::index> demand(8, 64);
  std::vector<batch> stream;
  for (int i = 0; i < 40; ++i) {
    std::vector<rs::index> n(8);
    for (rs::index& x : n) x = std::uniform_int_distribution<rs::index>(0, 30)(rng);
    stream.push_back(make_batch(rng, demand, n));
  }
  const cap::adaptive policy{.half_life = 3.0, .warmup = 4};
  cap::adaptive::state_type state;
  for (std::size_t i = 0; i < 20; ++i) (void)policy.limits(stream[i].context(), state);
  cap::adaptive::state_type copy = state;
  CHECK(copy == state);
  std::vector<rs::index> first, second;
  for (std::size_t i = 20; i < stream.size(); ++i) first.push_back(policy.limits(stream[i].context(), state).capacity);
  CHECK(!(copy == state));
  for (std::size_t i = 20; i < stream.size(); ++i) second.push_back(policy.limits(stream[i].context(), copy).capacity);
  CHECK(first == second);
  CHECK(copy == state);
}

TEST_CASE("test_adaptive_stable: the router passes its proposals and the affinity's cosine scale") {
  std::mt19937_64 rng(1608);
  const std::vector<rs::index> demand{40, 32, 32, 24}, resonating{12, 10, 10, 8};
  const cap::adaptive policy{.hidden_size = d, .half_life = 2.0, .warmup = 2};  // the logits' width is E
  const rs::router<ra::precomputed, rt::bidirectional, cap::adaptive> r{{.cosines = true}, {}, policy};
  cap::adaptive::state_type routed, direct;
  for (int i = 0; i < 8; ++i) {
    const batch b = make_batch(rng, demand, resonating);
    const rs::index C = r.route(rs::backend::serial{}, b.view(), routed).capacity();
    CHECK(policy.limits(b.context(), direct).capacity == C);
    CHECK(routed == direct);
  }
  // Undeclared precomputed logits are not cosines: refused, the state untouched.
  const rs::router<ra::precomputed, rt::bidirectional, cap::adaptive> undeclared{{}, {}, policy};
  const cap::adaptive::state_type before = routed;
  const batch b = make_batch(rng, demand, resonating);
  const std::string msg = error_of([&] { (void)undeclared.route(rs::backend::serial{}, b.view(), routed); });
  CHECK(starts_with(msg, "resonance: adaptive: expected the router's logits to be cosines"));
  CHECK(msg.find("affinity::precomputed{.cosines = true}") != std::string::npos);
  CHECK(routed == before);
}

// ===================================================================================================
// The cosine requirement.

TEST_CASE("test_adaptive_stable: lower_bound estimates delta only from cosine logits") {
  std::mt19937_64 rng(1609);
  const rs::index T = 96, E = 4, cols = 32;
  const std::vector<float> x = resonance_test::normal_values(rng, T * cols);
  const rs::matrix_view<const float> xv{x.data(), T, cols};
  const std::vector<float> w = resonance_test::normal_values(rng, E * cols);
  const ra::linear gate{.weight = {w.data(), E, cols}};
  const std::string fix_prefix = "resonance: lower_bound.delta: expected the router's logits to be cosines";
  auto refused = [&](const auto& router) {
    cap::lower_bound::state_type state;
    const std::string msg = error_of([&] { (void)router.route(rs::backend::serial{}, xv, state); });
    CAPTURE(msg);
    CHECK(starts_with(msg, fix_prefix));
    CHECK(msg.find("set lower_bound.delta") != std::string::npos);
    CHECK(msg.find("affinity::grap_cosine") != std::string::npos);
    CHECK(state == cap::lower_bound::state_type{});
  };
  // GrAP means, linear scores and undeclared precomputed logits are no cosines.
  refused(rs::router<ra::grap, rt::token_choice, cap::lower_bound>{{.num_experts = E}, {}, {}});
  refused(rs::router<ra::linear, rt::token_choice, cap::lower_bound>{gate, {}, {}});
  refused(rs::router<ra::precomputed, rt::token_choice, cap::lower_bound>{{}, {}, {}});
  // Also on an empty first batch: the configuration is wrong whatever the batch.
  {
    const rs::router<ra::grap, rt::token_choice, cap::lower_bound> r{{.num_experts = E}, {}, {}};
    cap::lower_bound::state_type state;
    CHECK(starts_with(error_of([&] {
                        (void)r.route(rs::backend::serial{}, rs::matrix_view<const float>{nullptr, 0, cols}, state);
                      }),
                      fix_prefix));
  }
  // A given δ works with any affinity (LocMoE's own gate included).
  {
    const rs::router<ra::grap, rt::token_choice, cap::lower_bound> r{{.num_experts = E}, {}, {.delta = 0.3}};
    cap::lower_bound::state_type state;
    CHECK(r.route(rs::backend::serial{}, xv, state).capacity() == locmoe_capacity(0.3, cols, E, T));
    const rs::router<ra::linear, rt::token_choice, cap::lower_bound> l{gate, {}, {.delta = 0.3}};
    cap::lower_bound::state_type lstate;
    CHECK(l.route(rs::backend::serial{}, xv, lstate).capacity() == locmoe_capacity(0.3, cols, E, T));
  }
  // grap_cosine: δ̂ is the median of each token's largest GrAP cosine, recomputed here by definition.
  {
    std::vector<float> top(at(T));
    for (rs::index t = 0; t < T; ++t) {
      double best = -infinite;
      for (rs::index e = 0; e < E; ++e) best = std::max(best, grap_cosine_of(x.data() + t * cols, e, E, cols));
      top[at(t)] = static_cast<float>(best);
    }
    std::sort(top.begin(), top.end());
    const double delta_hat = static_cast<double>(top[at(T / 2)]);  // nearest rank floor(0.5 · 96) = 48
    const rs::router<ra::grap_cosine, rt::token_choice, cap::lower_bound> r{{.num_experts = E}, {}, {}};
    cap::lower_bound::state_type state;
    const rs::index C = r.route(rs::backend::serial{}, xv, state).capacity();
    CHECK(close_rel(state.delta, std::fabs(delta_hat), 1e-6));
    CHECK(C == locmoe_capacity(state.delta, cols, E, T));
    // The same cosines given as declared precomputed logits: the same δ.
    std::vector<float> logits(at(T * E));
    for (rs::index t = 0; t < T; ++t)
      for (rs::index e = 0; e < E; ++e)
        logits[at(t * E + e)] = static_cast<float>(grap_cosine_of(x.data() + t * cols, e, E, cols));
    const rs::router<ra::precomputed, rt::token_choice, cap::lower_bound> p{
        {.cosines = true}, {}, {.hidden_size = cols}};
    cap::lower_bound::state_type pstate;
    (void)p.route(rs::backend::serial{}, rs::matrix_view<const float>{logits.data(), T, E}, pstate);
    CHECK(close_rel(pstate.delta, state.delta, 1e-6));
  }
}

TEST_CASE("test_adaptive_stable: a cosine gate's temperature is undone before the statistics") {
  // affinity::cosine's logits are cos/τ: the schedulers read τ · logit, so δ̂ does not depend on τ.
  std::mt19937_64 rng(1610);
  const rs::index T = 80, E = 6, cols = 48;
  const std::vector<float> x = resonance_test::normal_values(rng, T * cols);
  const std::vector<float> w = resonance_test::normal_values(rng, E * cols);
  const rs::matrix_view<const float> xv{x.data(), T, cols};
  auto delta_at = [&](float tau) {
    const rs::router<ra::cosine, rt::token_choice, cap::lower_bound> r{
        {.weight = {w.data(), E, cols}, .temperature = tau}, {}, {}};
    cap::lower_bound::state_type state;
    (void)r.route(rs::backend::serial{}, xv, state);
    CHECK(state.capacity == locmoe_capacity(state.delta, cols, E, T));
    return state.delta;
  };
  // The median of the largest cosine per token, by definition.
  std::vector<double> top(at(T));
  for (rs::index t = 0; t < T; ++t) {
    double best = -infinite;
    for (rs::index e = 0; e < E; ++e) {
      double dot = 0.0, nx = 0.0, nw = 0.0;
      for (rs::index j = 0; j < cols; ++j) {
        const double a = static_cast<double>(x[at(t * cols + j)]), b = static_cast<double>(w[at(e * cols + j)]);
        dot += a * b;
        nx += a * a;
        nw += b * b;
      }
      best = std::max(best, dot / std::sqrt(nx * nw));
    }
    top[at(t)] = best;
  }
  std::sort(top.begin(), top.end());
  const double want = std::fabs(top[at(T / 2)]);
  CHECK(close_rel(delta_at(1.0f), want, 1e-6));
  CHECK(delta_at(0.5f) == delta_at(1.0f));  // a power of two: exactly
  CHECK(close_rel(delta_at(0.1f), want, 1e-6));
}

TEST_CASE("test_adaptive_stable: adaptive refuses an affinity whose logits are not cosines") {
  std::mt19937_64 rng(1611);
  const rs::index T = 64, E = 4, cols = 32;
  const std::vector<float> x = resonance_test::normal_values(rng, T * cols);
  const rs::matrix_view<const float> xv{x.data(), T, cols};
  const rs::router<ra::grap, rt::bidirectional, cap::adaptive> grap{{.num_experts = E}, {}, {}};
  cap::adaptive::state_type state;
  const std::string msg = error_of([&] { (void)grap.route(rs::backend::serial{}, xv, state); });
  CHECK(starts_with(msg, "resonance: adaptive: expected the router's logits to be cosines"));
  CHECK(msg.find("capacity::schedule") != std::string::npos);
  CHECK(state == cap::adaptive::state_type{});
  // GrAP-cosine is: it routes, and the statistics start filling.
  const rs::router<ra::grap_cosine, rt::bidirectional, cap::adaptive> etr{{.num_experts = E}, {}, {}};
  CHECK(etr.route(rs::backend::serial{}, xv, state).capacity() == 32);  // warm-up: ceiling 2 · 16
  CHECK(state.observed == 1);
  CHECK(state.demand.size() == 4);
}

// ===================================================================================================
// Errors: every new field and context value, named; the state untouched.

TEST_CASE("test_adaptive_stable: every new argument is validated, the message names it") {
  auto names = [](const std::string& msg, const std::string& argument) {
    return starts_with(msg, "resonance: " + argument + ": expected");
  };
  for (const double bad : {-1.0, infinite, not_a_number}) {
    CAPTURE(bad);
    CHECK(names(error_of([&] { cap::adaptive{.half_life = bad}.validate(); }), "adaptive.half_life"));
  }
  for (const rs::index bad : {rs::index{-1}, rs::index{-20}})
    CHECK(names(error_of([&] { cap::adaptive{.warmup = bad}.validate(); }), "adaptive.warmup"));
  CHECK(error_of([] { cap::adaptive{.half_life = 0.0, .warmup = 0}.validate(); }) == "no throw");
  CHECK(error_of([] { cap::adaptive{.half_life = 1e6, .warmup = 1000000}.validate(); }) == "no throw");

  std::mt19937_64 rng(1612);
  const batch b = make_batch(rng, std::vector<rs::index>(4, 16), std::vector<rs::index>(4, 8));
  const cap::adaptive policy{.half_life = 2.0, .warmup = 1};
  cap::adaptive::state_type state;
  for (int i = 0; i < 3; ++i) (void)policy.limits(b.context(), state);
  const cap::adaptive::state_type before = state;
  // The policy's own fields, through limits().
  CHECK(names(error_of([&] { (void)cap::adaptive{.half_life = not_a_number}.limits(b.context(), state); }),
              "adaptive.half_life"));
  CHECK(names(error_of([&] { (void)cap::adaptive{.warmup = -1}.limits(b.context(), state); }), "adaptive.warmup"));
  // The context's cosine scale: negative or not finite is malformed; 0 says "not cosines".
  for (const double bad : {-1.0, infinite, not_a_number}) {
    CAPTURE(bad);
    CHECK(names(error_of([&] { (void)policy.limits(b.context(bad), state); }), "cosine_scale"));
    cap::lower_bound::state_type lb;
    CHECK(names(error_of([&] { (void)cap::lower_bound{.delta = 0.1}.limits(b.context(bad), lb); }), "cosine_scale"));
    CHECK(lb == cap::lower_bound::state_type{});
  }
  CHECK(names(error_of([&] { (void)policy.limits(b.context(0.0), state); }), "adaptive"));
  CHECK(names(error_of([&] { (void)policy.estimate_capacity(b.context(0.0)); }), "adaptive"));
  {
    cap::lower_bound::state_type lb;
    CHECK(names(error_of([&] { (void)cap::lower_bound{}.limits(b.context(0.0), lb); }), "lower_bound.delta"));
    CHECK(lb == cap::lower_bound::state_type{});
    CHECK(cap::lower_bound{.delta = 0.1}.limits(b.context(0.0), lb).capacity >= 1);  // a given δ needs no cosines
  }
  // A state from a router with another number of experts.
  const batch wider = make_batch(rng, std::vector<rs::index>(5, 16), std::vector<rs::index>(5, 8));
  const std::string msg = error_of([&] { (void)policy.limits(wider.context(), state); });
  CHECK(names(msg, "adaptive state"));
  CHECK(msg.find("got 4 experts") != std::string::npos);
  // Declared cosines that are not: the existing statistic check still fires.
  batch hot = b;
  for (float& v : hot.logits) v += 5.0f;
  CHECK(names(error_of([&] { (void)policy.limits(hot.context(), state); }), "adaptive (largest TCR affinity)"));
  CHECK(state == before);
}
