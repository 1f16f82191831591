// ETR bidirectional routing and the capacity schedulers (lower_bound, adaptive, schedule) against
// independent references written here: the brute-force token choice of tests/reference.hpp for the
// proposals, a brute-force candidate-restricted expert choice (std::stable_sort of each expert's
// candidates by the ranking key, ties to the lower token) for the cut, and the closed forms of
// LocMoE Eq. 9, ETR Remark 7, the resonance rule and the decay schedules, evaluated in double.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/resonance.hpp>

#include "error_of.hpp"
#include "random_inputs.hpp"
#include "reference.hpp"

namespace {

namespace rs = resonance;
namespace rt = resonance::routing;
namespace cap = resonance::capacity;
using resonance_test::error_of;
using resonance_test::sz;

// Router logits carried in the first `experts` columns of a wider input: the schedulers read the
// input's column count as the hidden size d, so this lets a test choose d and the logits separately.
// The tests put cosine-like values there, and say so (the schedulers refuse logits that are not cosines).
struct wide_logits {
  rs::index experts = 1;

  double cosine_scale() const { return 1.0; }
  rs::index experts_for(rs::index) const { return experts; }
  void validate(rs::index cols) const {
    rs::detail::require(cols >= experts, "wide_logits", "at least `experts` columns", cols);
  }
  template <rs::execution_backend Backend, rs::input_scalar T>
  rs::matrix_view<const float> compute(const Backend& be, rs::matrix_view<const T> x,
                                       std::vector<float>& storage) const {
    return rs::detail::as_float(be, rs::matrix_view<const T>{x.data, x.rows, experts, x.stride}, storage);
  }
  friend constexpr bool operator==(const wide_logits&, const wide_logits&) = default;
};
static_assert(rs::affinity_policy<wide_logits>);

template <class Direction, class Capacity>
using precomputed_router = rs::router<rs::affinity::precomputed, Direction, Capacity>;
template <class Capacity>
using wide_router = rs::router<wide_logits, rt::bidirectional, Capacity>;

rs::matrix_view<const float> view(const std::vector<float>& x, rs::index rows, rs::index cols) {
  return {rows > 0 ? x.data() : nullptr, rows, cols};
}

rs::index pick(std::mt19937_64& rng, rs::index lo, rs::index hi) {
  return std::uniform_int_distribution<rs::index>(lo, hi)(rng);
}

double uniform(std::mt19937_64& rng, double lo, double hi) {
  return std::uniform_real_distribution<double>(lo, hi)(rng);
}

// ---------------------------------------------------------------------------------------------------
// Random proposal options and logits.

// Random token-choice options for E experts, as a bidirectional policy (rank and causal left default).
// `bias` owns the expert bias the policy views.
rt::bidirectional random_policy(std::mt19937_64& rng, rs::index E, std::vector<float>& bias) {
  rt::bidirectional p;
  p.top_k = pick(rng, 1, std::min<rs::index>(E, 4));
  switch (pick(rng, 0, 3)) {
    case 0:
      break;  // softmax after top-k
    case 1:
      p.pre_softmax = true;
      break;
    case 2:
      p.score = rs::score::sigmoid;
      break;
    default:
      p.score = rs::score::sqrt_softplus;
      break;
  }
  const float temperatures[] = {1.0f, 1.0f, 0.5f, 2.0f};
  p.temperature = temperatures[sz(pick(rng, 0, 3))];
  p.scaling_factor = pick(rng, 0, 2) == 0 ? 2.5f : 1.0f;
  const rt::renormalize renorms[] = {rt::renormalize::automatic, rt::renormalize::always, rt::renormalize::never};
  p.renorm = renorms[sz(pick(rng, 0, 2))];
  if (pick(rng, 0, 2) == 0) {
    bias = resonance_test::normal_values(rng, E, 0.5);
    p.expert_bias = {bias.data(), E};
  }
  if (pick(rng, 0, 2) == 0) {
    // A group limit, when E has a divisor G > 1 that admits this top_k.
    std::vector<std::pair<rs::index, rs::index>> ok;  // (G, group_topk)
    for (rs::index G = 2; G <= E; ++G) {
      if (E % G != 0) continue;
      for (rs::index M = 1; M <= G; ++M)
        if (p.top_k <= M * (E / G) && M <= p.top_k) ok.emplace_back(G, M);
    }
    if (!ok.empty()) {
      const auto [G, M] = ok[sz(pick(rng, 0, static_cast<rs::index>(ok.size()) - 1))];
      p.num_groups = G;
      p.group_topk = M;
      const rt::group_score kinds[] = {rt::group_score::top_m_sum, rt::group_score::top2_sum, rt::group_score::max};
      p.group_scoring = kinds[sz(pick(rng, 0, 2))];
    }
  }
  return p;
}

// T×E continuous logits (distinct across tokens with probability one), each row redrawn until the
// reference selection is clear of a near tie; with `duplicates`, about half the rows copy an earlier
// row, so that every ranking key has exact ties between tokens (decided by the lower token id).
std::vector<float> random_logits(std::mt19937_64& rng, rs::index T, rs::index E, const rt::token_choice& p,
                                 bool duplicates) {
  std::normal_distribution<double> normal(0.0, 1.2);
  std::vector<float> x(sz(T * E));
  for (rs::index t = 0; t < T; ++t) {
    float* row = x.data() + t * E;
    if (duplicates && t > 0 && pick(rng, 0, 1) == 0) {
      std::copy_n(x.data() + pick(rng, 0, t - 1) * E, E, row);
      continue;
    }
    for (int attempt = 0;; ++attempt) {
      REQUIRE(attempt < 200);
      for (rs::index e = 0; e < E; ++e) row[e] = static_cast<float>(normal(rng));
      if (resonance_test::ref_token_choice(p, row, E).margin >= 1e-4) break;
    }
  }
  return x;
}

// ---------------------------------------------------------------------------------------------------
// The brute-force candidate-restricted expert choice.

// The full score s_te of one logit, in double: softmax over all E of l / temperature, or the
// elementwise function of l / temperature. No bias (the bias only selects).
double ref_full_score(const rt::bidirectional& p, const float* row, rs::index E, rs::index e) {
  const double inv_t = 1.0 / static_cast<double>(p.temperature);
  if (p.score == rs::score::softmax) {
    double m = -std::numeric_limits<double>::infinity();
    for (rs::index j = 0; j < E; ++j) m = std::max(m, static_cast<double>(row[j]) * inv_t);
    double sum = 0.0;
    for (rs::index j = 0; j < E; ++j) sum += std::exp(static_cast<double>(row[j]) * inv_t - m);
    return std::exp(static_cast<double>(row[e]) * inv_t - m) / sum;
  }
  return resonance_test::ref_elementwise(p.score, static_cast<double>(row[e]) * inv_t);
}

// One proposal (token -> expert) with every key an expert may rank it by.
struct ref_candidate {
  rs::id_type token = 0;
  double affinity = 0.0;  // the raw logit
  double score = 0.0;     // the full score
  double weight = 0.0;    // the token-choice combine weight
};

// Every expert's candidates (the tokens whose reference top-k contains it), ascending token.
// `stride` is the row length of x (the logits are its first E columns).
std::vector<std::vector<ref_candidate>> ref_candidates(const rt::bidirectional& p, const std::vector<float>& x,
                                                       rs::index T, rs::index E, rs::index stride = 0) {
  std::vector<std::vector<ref_candidate>> out(sz(E));
  for (rs::index t = 0; t < T; ++t) {
    const float* row = x.data() + t * (stride > 0 ? stride : E);
    const resonance_test::ref_choice c = resonance_test::ref_token_choice(p.proposal(), row, E);
    for (std::size_t j = 0; j < c.expert.size(); ++j) {
      const rs::index e = c.expert[j];
      out[sz(e)].push_back(
          {static_cast<rs::id_type>(t), static_cast<double>(row[e]), ref_full_score(p, row, E, e), c.weight[j]});
    }
  }
  return out;
}

double key_of(const ref_candidate& c, rt::rank_by rank) {
  switch (rank) {
    case rt::rank_by::affinity:
      return c.affinity;
    case rt::rank_by::score:
      return c.score;
    default:
      return c.weight;
  }
}

// The tokens an expert keeps from `list` (ascending token) with C slots: all of them when they fit,
// else the top C by key (std::stable_sort: equal keys keep the lower token first), or the earliest C
// when `by_position`. Returned ascending. `ambiguous` is set when the last kept and the first dropped
// keys differ by less than fp32 could resolve (the library ranks fp32 values, this reference doubles).
std::vector<rs::id_type> ref_keep(std::vector<ref_candidate> list, rs::index C, rt::rank_by rank, bool by_position,
                                  bool* ambiguous = nullptr) {
  if (static_cast<rs::index>(list.size()) > C) {
    if (!by_position) {
      std::stable_sort(list.begin(), list.end(), [&](const ref_candidate& a, const ref_candidate& b) {
        return key_of(a, rank) > key_of(b, rank);
      });
      const double a = key_of(list[sz(C - 1)], rank), b = key_of(list[sz(C)], rank);
      if (ambiguous != nullptr && a != b && std::fabs(a - b) <= 1e-5 * std::max(std::fabs(a), std::fabs(b)))
        *ambiguous = true;
    }
    list.resize(sz(C));
  }
  std::vector<rs::id_type> tokens;
  for (const ref_candidate& c : list) tokens.push_back(c.token);
  std::sort(tokens.begin(), tokens.end());
  return tokens;
}

// ---------------------------------------------------------------------------------------------------
// Reading plans.

std::vector<std::vector<rs::id_type>> kept_tokens(const rs::routing_plan& plan) {
  std::vector<std::vector<rs::id_type>> out(sz(plan.num_experts()));
  for (rs::index e = 0; e < plan.num_experts(); ++e) {
    const auto b = static_cast<std::ptrdiff_t>(plan.expert_offsets()[sz(e)]);
    out[sz(e)].assign(plan.slot_token().begin() + b, plan.slot_token().begin() + b + plan.expert_counts()[sz(e)]);
  }
  return out;
}

// Token t's kept (expert, weight) pairs.
std::vector<std::pair<rs::id_type, float>> token_pairs(const rs::routing_plan& plan, rs::index t) {
  std::vector<std::pair<rs::id_type, float>> out;
  for (rs::id_type i = plan.token_offsets()[sz(t)]; i < plan.token_offsets()[sz(t + 1)]; ++i)
    out.emplace_back(plan.token_expert()[sz(i)], plan.token_weight()[sz(i)]);
  return out;
}

std::vector<rs::id_type> demand_of(const rs::routing_plan& plan) {
  return {plan.expert_demand().begin(), plan.expert_demand().end()};
}

double drop_rate(const rs::routing_plan& plan) {
  return plan.num_demanded() > 0 ? static_cast<double>(plan.num_dropped()) / static_cast<double>(plan.num_demanded())
                                 : 0.0;
}

// The same assignments (token-major and expert-major), whatever capacity each plan reports: a
// bounded plan with nothing dropped against a dropless one.
bool same_assignments(const rs::routing_plan& a, const rs::routing_plan& b) {
  const auto eq = [](auto x, auto y) { return std::equal(x.begin(), x.end(), y.begin(), y.end()); };
  return eq(a.token_offsets(), b.token_offsets()) && eq(a.token_expert(), b.token_expert()) &&
         eq(a.token_weight(), b.token_weight()) && eq(a.token_slot(), b.token_slot()) &&
         eq(a.expert_offsets(), b.expert_offsets()) && eq(a.expert_counts(), b.expert_counts()) &&
         eq(a.expert_demand(), b.expert_demand()) && eq(a.slot_token(), b.slot_token()) &&
         eq(a.slot_weight(), b.slot_weight());
}

// First disagreement between a plan and the brute-force expert choice with C slots, or "": demand,
// counts, kept sets, and the kept weights against the reference token-choice weights.
std::string ecr_mismatch(const rs::routing_plan& plan, const std::vector<std::vector<ref_candidate>>& cands,
                         rs::index C, rt::rank_by rank, bool by_position) {
  const auto kept = kept_tokens(plan);
  for (std::size_t e = 0; e < cands.size(); ++e) {
    const std::string where = "expert " + std::to_string(e) + ": ";
    const auto demand = static_cast<rs::index>(cands[e].size());
    if (plan.expert_demand()[e] != demand) return where + "demand " + std::to_string(plan.expert_demand()[e]);
    if (plan.expert_counts()[e] != std::min(demand, C))
      return where + "count " + std::to_string(plan.expert_counts()[e]);
    if (kept[e] != ref_keep(cands[e], C, rank, by_position)) return where + "kept set differs";
    const auto b = sz(plan.expert_offsets()[e]);
    for (std::size_t j = 0; j < kept[e].size(); ++j) {
      const auto it =
          std::find_if(cands[e].begin(), cands[e].end(), [&](const ref_candidate& c) { return c.token == kept[e][j]; });
      if (!resonance_test::close_rel(plan.slot_weight()[b + j], it->weight))
        return where + "weight of token " + std::to_string(kept[e][j]);
    }
  }
  return {};
}

// ---------------------------------------------------------------------------------------------------
// Closed forms of the schedulers.

double phi(double z) { return 0.5 * std::erfc(-z / std::sqrt(2.0)); }

// LocMoE Eq. 9 (erfc form), tokens per expert per sample; +inf when the tail underflows.
double ref_locmoe(double delta, rs::index d, rs::index E) {
  const double tail = std::erfc(std::sqrt(delta * delta * static_cast<double>(d) / (2.0 - delta * delta)));
  return tail > 0.0 ? 1.0 / (static_cast<double>(E) * tail) : std::numeric_limits<double>::infinity();
}

// ETR Remark 7, per sample.
double ref_etr(double delta, rs::index d, rs::index E) {
  return std::exp(static_cast<double>(d) * delta * delta / (2.0 - delta * delta)) / static_cast<double>(E);
}

double ref_samples(rs::index T, rs::index tokens_per_sample) {
  return tokens_per_sample > 0 ? std::ceil(static_cast<double>(T) / static_cast<double>(tokens_per_sample)) : 1.0;
}

// capacity::lower_bound's C: ceil(samples * ec_min), clamped to [1, T].
rs::index ref_lower_bound_capacity(double delta, rs::index d, rs::index E, rs::index T, rs::index tokens_per_sample) {
  const double c = std::ceil(ref_samples(T, tokens_per_sample) * ref_locmoe(delta, d, E));
  if (c >= static_cast<double>(T)) return std::max<rs::index>(T, 1);
  return std::max<rs::index>(1, static_cast<rs::index>(c));
}

// Each token's top-k logits by brute force (ties to the lower expert), as (token, expert, logit).
struct tcr_pair {
  rs::index token, expert;
  float logit;
};
std::vector<tcr_pair> ref_tcr_pairs(const std::vector<float>& x, rs::index T, rs::index E, rs::index stride,
                                    rs::index k) {
  std::vector<tcr_pair> out;
  for (rs::index t = 0; t < T; ++t) {
    const float* row = x.data() + t * stride;
    std::vector<rs::index> ids(sz(E));
    std::iota(ids.begin(), ids.end(), rs::index{0});
    std::stable_sort(ids.begin(), ids.end(), [&](rs::index a, rs::index b) { return row[a] > row[b]; });
    for (rs::index j = 0; j < k; ++j) out.push_back({t, ids[sz(j)], row[ids[sz(j)]]});
  }
  return out;
}

// Nearest-rank quantile: the element of rank floor(q n) (at most n - 1) of the sorted values.
double ref_quantile(const std::vector<tcr_pair>& pairs, double q) {
  std::vector<float> v;
  for (const tcr_pair& p : pairs) v.push_back(p.logit);
  std::sort(v.begin(), v.end());
  const auto n = static_cast<double>(v.size());
  return v[static_cast<std::size_t>(std::min(n - 1.0, std::floor(q * n)))];
}

// The resonance estimate of one batch: per expert, demand d_e (TCR pairs) and resonating candidates n_e
// (affinity >= threshold, default 3/sqrt(d)); when n_e <= 2 mu0 + 3 with mu0 = d_e (1 - Phi(z)^E), z =
// threshold sqrt(d), C_e is unbounded if d_e exceeds the floor capacity and d_e otherwise, else
// C_e = min(d_e, margin n_e); the estimate is max_e C_e.
double ref_resonance_estimate(const std::vector<tcr_pair>& pairs, rs::index E, rs::index d, double threshold,
                              double margin, double floor_capacity) {
  const double thr = threshold > 0.0 ? threshold : 3.0 / std::sqrt(static_cast<double>(d));
  const double null_rate = 1.0 - std::pow(phi(thr * std::sqrt(static_cast<double>(d))), static_cast<double>(E));
  std::vector<double> demand(sz(E), 0.0), resonating(sz(E), 0.0);
  for (const tcr_pair& p : pairs) {
    demand[sz(p.expert)] += 1.0;
    if (static_cast<double>(p.logit) >= thr) resonating[sz(p.expert)] += 1.0;
  }
  // An expert without resonance beyond the null keeps all its candidates: unbounded (TCR) when they
  // may not fit under the floor.
  double c = 0.0;
  for (rs::index e = 0; e < E; ++e) {
    const double mu0 = demand[sz(e)] * null_rate;
    if (resonating[sz(e)] <= 2.0 * mu0 + 3.0) {
      if (demand[sz(e)] > floor_capacity) return std::numeric_limits<double>::infinity();
      c = std::max(c, demand[sz(e)]);
      continue;
    }
    c = std::max(c, std::min(demand[sz(e)], margin * resonating[sz(e)]));
  }
  return c;
}

double per_expert(rs::index T, rs::index k, rs::index E) { return static_cast<double>(T * k) / static_cast<double>(E); }

// One batch for the resonance rule: for each expert e, demand[e] tokens whose top-1 is e, of which
// resonating[e] have an affinity in [thr + 0.05, thr + 0.15) and the rest in [thr - 0.1, thr - 0.05);
// every other logit lies in [-0.3, thr - 0.2). Tokens are shuffled. T×d, the logits in the first E
// columns (the other columns are zero: only their count, d, matters).
std::vector<float> resonance_batch(std::mt19937_64& rng, rs::index E, rs::index d, double thr,
                                   const std::vector<rs::index>& demand, const std::vector<rs::index>& resonating) {
  std::vector<std::pair<rs::index, bool>> tokens;  // (home expert, resonates)
  for (rs::index e = 0; e < E; ++e)
    for (rs::index j = 0; j < demand[sz(e)]; ++j) tokens.emplace_back(e, j < resonating[sz(e)]);
  std::shuffle(tokens.begin(), tokens.end(), rng);
  std::vector<float> x(tokens.size() * sz(d), 0.0f);
  for (std::size_t t = 0; t < tokens.size(); ++t) {
    float* row = x.data() + t * sz(d);
    for (rs::index e = 0; e < E; ++e) row[e] = static_cast<float>(uniform(rng, -0.3, thr - 0.2));
    const auto [home, hot] = tokens[t];
    row[home] = static_cast<float>(hot ? uniform(rng, thr + 0.05, thr + 0.15) : uniform(rng, thr - 0.1, thr - 0.05));
  }
  return x;
}

}  // namespace

// ===================================================================================================
// 1. The TCR regime: bidirectional is token choice when nothing overflows.

TEST_CASE("test_bidirectional_capacity: bidirectional carries every token_choice option under its name") {
  const std::vector<float> bias = {0.5f, -0.25f, 0.0f, 1.0f};
  const rt::bidirectional b{.top_k = 3,
                            .score = rs::score::sigmoid,
                            .pre_softmax = false,
                            .temperature = 0.75f,
                            .renorm = rt::renormalize::never,
                            .renorm_epsilon = 1e-6f,
                            .scaling_factor = 2.0f,
                            .expert_bias = {bias.data(), 4},
                            .num_groups = 2,
                            .group_topk = 2,
                            .group_scoring = rt::group_score::max,
                            .rank = rt::rank_by::score,
                            .causal = true};
  const rt::token_choice t{.top_k = 3,
                           .score = rs::score::sigmoid,
                           .pre_softmax = false,
                           .temperature = 0.75f,
                           .renorm = rt::renormalize::never,
                           .renorm_epsilon = 1e-6f,
                           .scaling_factor = 2.0f,
                           .expert_bias = {bias.data(), 4},
                           .num_groups = 2,
                           .group_topk = 2,
                           .group_scoring = rt::group_score::max};
  CHECK(b.proposal() == t);
  CHECK(b.candidates_per_token(4) == 3);
  // The defaults agree too, and the default ranking is ETR's: affinity, not causal.
  CHECK(rt::bidirectional{}.proposal() == rt::token_choice{});
  CHECK(rt::bidirectional{}.rank == rt::rank_by::affinity);
  CHECK_FALSE(rt::bidirectional{}.causal);
}

TEST_CASE("test_bidirectional_capacity: at or above the largest demand, bidirectional == token choice") {
  std::mt19937_64 rng(101);
  const rs::index widths[] = {1, 2, 3, 4, 6, 8, 12, 16};
  const rt::rank_by ranks[] = {rt::rank_by::affinity, rt::rank_by::score, rt::rank_by::weight};
  const rs::drop_policy drops[] = {rs::drop_policy::score, rs::drop_policy::position, rs::drop_policy::random};
  const double above[] = {1.0, 1.0, 1.5, 4.0};  // multiples of the smallest factor that fits every demand
  int with_groups = 0, with_bias = 0, pre = 0, sigmoid = 0;
  for (int n = 0; n < 160; ++n) {
    const rs::index E = widths[sz(pick(rng, 0, 7))];
    const rs::index T = pick(rng, 1, 80);
    std::vector<float> bias;
    rt::bidirectional p = random_policy(rng, E, bias);
    p.rank = ranks[sz(pick(rng, 0, 2))];
    p.causal = pick(rng, 0, 3) == 0;
    with_groups += p.num_groups > 1;
    with_bias += !p.expert_bias.empty();
    pre += p.pre_softmax;
    sigmoid += p.score == rs::score::sigmoid;
    CAPTURE(n);
    CAPTURE(T);
    CAPTURE(E);
    CAPTURE(p.top_k);
    CAPTURE(static_cast<int>(p.score));
    CAPTURE(p.pre_softmax);
    CAPTURE(p.num_groups);
    CAPTURE(static_cast<int>(p.rank));
    CAPTURE(p.causal);
    const std::vector<float> x = random_logits(rng, T, E, p.proposal(), pick(rng, 0, 2) == 0);
    rs::index max_demand = 0;
    for (const auto& list : ref_candidates(p, x, T, E))
      max_demand = std::max(max_demand, static_cast<rs::index>(list.size()));

    // Dropless.
    const rs::index align = pick(rng, 1, 3);
    const rs::routing_plan tc =
        precomputed_router<rt::token_choice, cap::dropless>{{}, p.proposal(), {.align = align}}.route(
            rs::backend::serial{}, view(x, T, E));
    const rs::routing_plan bi = precomputed_router<rt::bidirectional, cap::dropless>{{}, p, {.align = align}}.route(
        rs::backend::serial{}, view(x, T, E));
    CHECK(bi == tc);

    // A capacity factor whose C is at least the largest demand (C = max demand exactly, or above).
    const double f = static_cast<double>(max_demand) / per_expert(T, p.top_k, E) * above[sz(pick(rng, 0, 3))];
    const cap::factor limit{.factor = f,
                            .drop = drops[sz(pick(rng, 0, 2))],
                            .min_capacity = pick(rng, 0, 2),
                            .pad_to_capacity = pick(rng, 0, 1) == 1,
                            .align = align};
    const rs::index C = std::max(static_cast<rs::index>(std::ceil(per_expert(T, p.top_k, E) * f)), limit.min_capacity);
    REQUIRE(C >= max_demand);
    const rs::routing_plan tc_c = precomputed_router<rt::token_choice, cap::factor>{{}, p.proposal(), limit}.route(
        rs::backend::serial{}, view(x, T, E));
    const rs::routing_plan bi_c =
        precomputed_router<rt::bidirectional, cap::factor>{{}, p, limit}.route(rs::backend::serial{}, view(x, T, E));
    CHECK(bi_c == tc_c);
    CHECK(bi_c.num_dropped() == 0);
    const std::string bad = resonance_test::plan_violation(
        bi_c, {.capacity = C, .pad_to_capacity = limit.pad_to_capacity, .align = align, .per_token = p.top_k});
    CHECK_MESSAGE(bad.empty(), bad);
  }
  // The random options did cover each feature.
  CHECK(with_groups > 10);
  CHECK(with_bias > 10);
  CHECK(pre > 10);
  CHECK(sigmoid > 10);
}

// ===================================================================================================
// 2. The ECR regime: below the largest demand, candidate-restricted expert choice.

TEST_CASE("test_bidirectional_capacity: below the largest demand, bidirectional == brute-force expert choice") {
  std::mt19937_64 rng(202);
  const rs::index widths[] = {2, 3, 4, 6, 8};
  const rt::rank_by ranks[] = {rt::rank_by::affinity, rt::rank_by::score, rt::rank_by::weight};
  int checked = 0, skipped = 0, rank_changes_cut = 0;
  for (int n = 0; n < 150; ++n) {
    const rs::index E = widths[sz(pick(rng, 0, 4))];
    const rs::index T = pick(rng, 4, 60);
    std::vector<float> bias;
    rt::bidirectional p = random_policy(rng, E, bias);
    const std::vector<float> x = random_logits(rng, T, E, p.proposal(), pick(rng, 0, 2) == 0);
    const auto cands = ref_candidates(p, x, T, E);
    rs::index max_demand = 0;
    for (const auto& list : cands) max_demand = std::max(max_demand, static_cast<rs::index>(list.size()));
    if (max_demand < 2) continue;
    const rs::index C = pick(rng, 1, max_demand - 1);
    // A tiny factor rounds up to one slot, so min_capacity sets C.
    const cap::factor limit{
        .factor = 1e-9, .min_capacity = C, .pad_to_capacity = pick(rng, 0, 1) == 1, .align = pick(rng, 1, 3)};
    CAPTURE(n);
    CAPTURE(T);
    CAPTURE(E);
    CAPTURE(C);
    CAPTURE(p.top_k);
    CAPTURE(static_cast<int>(p.score));
    CAPTURE(p.pre_softmax);
    CAPTURE(p.num_groups);
    std::vector<std::vector<std::vector<rs::id_type>>> cut_by_rank;
    for (rt::rank_by rank : ranks) {
      CAPTURE(static_cast<int>(rank));
      p.rank = rank;
      bool ambiguous = false;
      std::vector<std::vector<rs::id_type>> want;
      for (const auto& list : cands) want.push_back(ref_keep(list, C, rank, false, &ambiguous));
      cut_by_rank.push_back(want);
      if (ambiguous) {  // a near tie at some expert's boundary: fp32 may legitimately order it either way
        ++skipped;
        continue;
      }
      ++checked;
      const rs::routing_plan plan =
          precomputed_router<rt::bidirectional, cap::factor>{{}, p, limit}.route(rs::backend::serial{}, view(x, T, E));
      const std::string diff = ecr_mismatch(plan, cands, C, rank, false);
      CHECK_MESSAGE(diff.empty(), diff);
      const std::string bad = resonance_test::plan_violation(
          plan, {.capacity = C, .pad_to_capacity = limit.pad_to_capacity, .align = limit.align});
      CHECK_MESSAGE(bad.empty(), bad);
      CHECK(plan.num_dropped() > 0);
    }
    rank_changes_cut += cut_by_rank[0] != cut_by_rank[1] || cut_by_rank[1] != cut_by_rank[2];
  }
  CHECK(checked > 300);
  CHECK(skipped < checked / 20);
  CHECK(rank_changes_cut > 30);  // the three rankings are not one in disguise
}

TEST_CASE("test_bidirectional_capacity: affinity, score, weight and position rankings keep different tokens") {
  // E = 3, k = 2, softmax after top-k; every token proposes experts {0, 1}; expert 0 has one slot.
  // With a = l1 - l0 and b = l2 - l0: the weight is 1/(1 + e^a), the full score 1/(1 + e^a + e^b).
  //   t0 D [-1, -1.5, -1.6]: affinity -1,  score .4640, weight .6225 (first in position)
  //   t1 A [ 5,  4.9,  4.8]: affinity  5,  score .3672, weight .5250 (highest affinity)
  //   t2 B [.1,  -.9, -9.9]: affinity .1,  score .7310, weight .7311 (highest full score)
  //   t3 C [ 0, -1.2, -1.25]: affinity 0,  score .6298, weight .7685 (highest weight)
  const std::vector<float> x = {-1.0f, -1.5f, -1.6f, 5.0f, 4.9f, 4.8f, 0.1f, -0.9f, -9.9f, 0.0f, -1.2f, -1.25f};
  const rs::index T = 4, E = 3;
  const cap::factor one_slot{.factor = 1e-9, .min_capacity = 1};
  auto route = [&](rt::rank_by rank, bool causal) {
    const rt::bidirectional p{.top_k = 2, .rank = rank, .causal = causal};
    return precomputed_router<rt::bidirectional, cap::factor>{{}, p, one_slot}.route(rs::backend::serial{},
                                                                                     view(x, T, E));
  };
  const rs::routing_plan by_affinity = route(rt::rank_by::affinity, false);
  const rs::routing_plan by_score = route(rt::rank_by::score, false);
  const rs::routing_plan by_weight = route(rt::rank_by::weight, false);
  const rs::routing_plan by_position = route(rt::rank_by::affinity, true);
  using kept = std::vector<std::vector<rs::id_type>>;
  // Expert 1 (its logit, full score and weight all favour t1) keeps t1 unless causal.
  CHECK(kept_tokens(by_affinity) == kept{{1}, {1}, {}});
  CHECK(kept_tokens(by_score) == kept{{2}, {1}, {}});
  CHECK(kept_tokens(by_weight) == kept{{3}, {1}, {}});
  CHECK(kept_tokens(by_position) == kept{{0}, {0}, {}});
  CHECK(demand_of(by_affinity) == std::vector<rs::id_type>{4, 4, 0});
  // The brute force agrees, and the kept weights are token choice's (e.g. t3's .7685 on expert 0).
  const auto cands = ref_candidates(rt::bidirectional{.top_k = 2}, x, T, E);
  CHECK(ecr_mismatch(by_affinity, cands, 1, rt::rank_by::affinity, false).empty());
  CHECK(ecr_mismatch(by_score, cands, 1, rt::rank_by::score, false).empty());
  CHECK(ecr_mismatch(by_weight, cands, 1, rt::rank_by::weight, false).empty());
  CHECK(ecr_mismatch(by_position, cands, 1, rt::rank_by::affinity, true).empty());
  CHECK(token_pairs(by_weight, 3) ==
        std::vector<std::pair<rs::id_type, float>>{{0, token_pairs(by_weight, 3)[0].second}});
  CHECK(resonance_test::close_rel(token_pairs(by_weight, 3)[0].second, 1.0 / (1.0 + std::exp(-1.2))));
}

TEST_CASE("test_bidirectional_capacity: exact ties in the ranking key go to the lower token") {
  // Identical rows: every key (affinity, score, weight) ties, so each expert keeps its C lowest tokens;
  // the tokens proposing expert 0 are 1, 3, 4, 6 (rows r1) and expert 2 gets 0, 2, 5 (rows r0).
  const std::vector<float> r0 = {0.2f, -0.4f, 0.9f}, r1 = {0.7f, 0.1f, -0.3f};
  std::vector<float> x;
  for (int t = 0; t < 7; ++t) {
    const auto& r = (t == 0 || t == 2 || t == 5) ? r0 : r1;
    x.insert(x.end(), r.begin(), r.end());
  }
  const cap::factor two_slots{.factor = 1e-9, .min_capacity = 2};
  for (rt::rank_by rank : {rt::rank_by::affinity, rt::rank_by::score, rt::rank_by::weight}) {
    for (rs::score fn : {rs::score::softmax, rs::score::sigmoid}) {
      CAPTURE(static_cast<int>(rank));
      const rt::bidirectional p{.score = fn, .rank = rank};
      const rs::routing_plan plan = precomputed_router<rt::bidirectional, cap::factor>{{}, p, two_slots}.route(
          rs::backend::serial{}, view(x, 7, 3));
      CHECK(kept_tokens(plan) == std::vector<std::vector<rs::id_type>>{{1, 3}, {}, {0, 2}});
    }
  }
}

TEST_CASE("test_bidirectional_capacity: the capacity's drop policy does not replace the expert's ranking") {
  // Bidirectional fixes the cut itself (ranking, or position when causal): a factor asking for
  // position or random dropping still gets the affinity cut. Expert 0: t0 .1, t1 .9, t2 .5; C = 1.
  const std::vector<float> x = {0.1f, 0.0f, 0.9f, 0.0f, 0.5f, 0.0f};
  for (rs::drop_policy drop : {rs::drop_policy::score, rs::drop_policy::position, rs::drop_policy::random}) {
    const cap::factor limit{.factor = 1e-9, .drop = drop, .min_capacity = 1, .seed = 3};
    CHECK(kept_tokens(precomputed_router<rt::bidirectional, cap::factor>{{}, {}, limit}.route(
              rs::backend::serial{}, view(x, 3, 2)))[0] == std::vector<rs::id_type>{1});
    CHECK(kept_tokens(precomputed_router<rt::bidirectional, cap::factor>{{}, {.causal = true}, limit}.route(
              rs::backend::serial{}, view(x, 3, 2)))[0] == std::vector<rs::id_type>{0});
  }
}

// ===================================================================================================
// 3. Causal bidirectional.

TEST_CASE("test_bidirectional_capacity: causal bidirectional == token choice with position drop") {
  std::mt19937_64 rng(303);
  const rs::index widths[] = {2, 3, 4, 8};
  for (int n = 0; n < 80; ++n) {
    const rs::index E = widths[sz(pick(rng, 0, 3))];
    const rs::index T = pick(rng, 2, 50);
    std::vector<float> bias;
    rt::bidirectional p = random_policy(rng, E, bias);
    p.causal = true;
    p.rank = static_cast<rt::rank_by>(pick(rng, 0, 2));  // ignored when causal
    const std::vector<float> x = random_logits(rng, T, E, p.proposal(), pick(rng, 0, 2) == 0);
    const double factors[] = {0.25, 0.5, 0.8, 1.0, 1.5};
    const double f = factors[sz(pick(rng, 0, 4))];
    const rs::index C = static_cast<rs::index>(std::ceil(per_expert(T, p.top_k, E) * f));
    CAPTURE(n);
    CAPTURE(C);
    const rs::routing_plan bi = precomputed_router<rt::bidirectional, cap::factor>{{}, p, {.factor = f}}.route(
        rs::backend::serial{}, view(x, T, E));
    const rs::routing_plan tc =
        precomputed_router<rt::token_choice, cap::factor>{
            {}, p.proposal(), {.factor = f, .drop = rs::drop_policy::position}}
            .route(rs::backend::serial{}, view(x, T, E));
    CHECK(bi == tc);
    const std::string diff = ecr_mismatch(bi, ref_candidates(p, x, T, E), C, p.rank, true);
    CHECK_MESSAGE(diff.empty(), diff);
  }
}

TEST_CASE("test_bidirectional_capacity: causal routing never depends on later tokens, ranked routing does") {
  std::mt19937_64 rng(304);
  const rs::index T = 40, E = 4;
  int ranked_changed = 0;
  for (int n = 0; n < 60; ++n) {
    std::vector<float> bias;
    rt::bidirectional p = random_policy(rng, E, bias);
    const cap::factor limit{.factor = 0.5};  // C depends on T only, and T stays
    std::vector<float> x = random_logits(rng, T, E, p.proposal(), false);
    const rs::index t0 = pick(rng, 0, T - 2);
    std::vector<float> later = x;
    const std::vector<float> fresh = random_logits(rng, T, E, p.proposal(), false);
    std::copy(fresh.begin() + (t0 + 1) * E, fresh.end(), later.begin() + (t0 + 1) * E);
    CAPTURE(n);
    CAPTURE(t0);
    for (bool causal : {true, false}) {
      p.causal = causal;
      const precomputed_router<rt::bidirectional, cap::factor> r{{}, p, limit};
      const rs::routing_plan a = r.route(rs::backend::serial{}, view(x, T, E));
      const rs::routing_plan b = r.route(rs::backend::serial{}, view(later, T, E));
      bool same = true;
      for (rs::index t = 0; t <= t0; ++t) same = same && token_pairs(a, t) == token_pairs(b, t);
      if (causal) CHECK(same);
      ranked_changed += !causal && !same;
    }
  }
  CHECK(ranked_changed > 0);  // random trials already show the ranked cut looking ahead

  // A constructed violation: expert 0 has one slot; token 1 raising its affinity evicts token 0.
  const std::vector<float> low = {1.0f, 0.0f, 0.5f, 0.0f}, high = {1.0f, 0.0f, 2.0f, 0.0f};
  const cap::factor one{.factor = 1.0};  // T k / E = 1
  for (bool causal : {true, false}) {
    const precomputed_router<rt::bidirectional, cap::factor> r{{}, {.causal = causal}, one};
    const auto before = token_pairs(r.route(rs::backend::serial{}, view(low, 2, 2)), 0);
    const auto after = token_pairs(r.route(rs::backend::serial{}, view(high, 2, 2)), 0);
    CHECK(before == std::vector<std::pair<rs::id_type, float>>{{0, 1.0f}});
    CHECK(after == (causal ? before : std::vector<std::pair<rs::id_type, float>>{}));
  }
}

// ===================================================================================================
// 4. capacity::lower_bound (LocMoE).

TEST_CASE("test_bidirectional_capacity: lower_bound with a given delta follows LocMoE Eq. 9 and stays fixed") {
  struct given {
    double delta;
    rs::index d, E, T, tokens_per_sample;
  };
  const given cases[] = {
      {0.1, 512, 8, 200, 16},     // 13 samples x 5.36 -> 70
      {0.05, 1024, 8, 300, 0},    // one sample x 1.14 -> 2
      {0.03, 4096, 8, 500, 100},  // 5 x 2.3 -> 12
      {0.1, 64, 4, 90, 7},        // small d: the bound is under one token per sample
      {0.3, 512, 8, 120, 0},      // ec_min ~ 1e5: clamped to T
      {0.9, 4096, 16, 77, 0},     // erfc underflows to 0: infinite bound, clamped to T
      {1e-6, 512, 8, 50, 0},      // ec_min ~ 1/E: one slot
  };
  std::mt19937_64 rng(404);
  for (const given& g : cases) {
    CAPTURE(g.delta);
    CAPTURE(g.d);
    const rs::index C = ref_lower_bound_capacity(g.delta, g.d, g.E, g.T, g.tokens_per_sample);
    const wide_router<cap::lower_bound> r{
        {.experts = g.E}, {}, {.delta = g.delta, .tokens_per_sample = g.tokens_per_sample}};
    cap::lower_bound::state_type state;
    const std::vector<float> x = resonance_test::normal_values(rng, g.T * g.d, 0.05);
    const rs::routing_plan plan = r.route(rs::backend::serial{}, view(x, g.T, g.d), state);
    CHECK(state.capacity == C);
    CHECK(state.delta == g.delta);
    CHECK(plan.capacity() == C);
    CHECK(C >= 1);
    CHECK(C <= g.T);
    // A later, different batch (other T, other logits) keeps the first batch's C.
    const rs::index T2 = g.T / 2 + 3;
    const std::vector<float> y = resonance_test::normal_values(rng, T2 * g.d, 0.2);
    const cap::lower_bound::state_type before = state;
    CHECK(r.route(rs::backend::serial{}, view(y, T2, g.d), state).capacity() == C);
    CHECK(state == before);
  }
  // The values the table of the spec quotes (d = 512, n = 8, delta = 0.1: 5.4 tokens per sample).
  CHECK(ref_lower_bound_capacity(0.1, 512, 8, 200, 16) == 70);
  CHECK(ref_lower_bound_capacity(0.3, 512, 8, 120, 0) == 120);
  CHECK(ref_lower_bound_capacity(1e-6, 512, 8, 50, 0) == 1);
}

TEST_CASE("test_bidirectional_capacity: lower_bound estimates delta as a quantile of the TCR affinities") {
  std::mt19937_64 rng(405);
  const double quantiles[] = {0.0, 0.1, 0.25, 0.5, 0.9, 1.0};
  int negative = 0;
  for (int n = 0; n < 30; ++n) {
    const rs::index E = pick(rng, 2, 8), d = 64 * pick(rng, 1, 8), T = pick(rng, 10, 150);
    const rs::index k = pick(rng, 1, std::min<rs::index>(E, 3));
    const double q = quantiles[sz(pick(rng, 0, 5))];
    const rs::index tps = pick(rng, 0, 1) == 0 ? 0 : pick(rng, 5, 40);
    // Small logits of either sign (cosine-like), continuous: no ties.
    std::vector<float> x(sz(T * d), 0.0f);
    const double shift = uniform(rng, -0.25, 0.1);
    for (rs::index t = 0; t < T; ++t)
      for (rs::index e = 0; e < E; ++e) x[sz(t * d + e)] = static_cast<float>(shift + uniform(rng, -0.1, 0.1));
    const double delta_hat = ref_quantile(ref_tcr_pairs(x, T, E, d, k), q);
    negative += delta_hat < 0.0;
    const rs::index C = ref_lower_bound_capacity(std::fabs(delta_hat), d, E, T, tps);
    CAPTURE(n);
    CAPTURE(q);
    CAPTURE(delta_hat);
    const wide_router<cap::lower_bound> r{{.experts = E}, {.top_k = k}, {.quantile = q, .tokens_per_sample = tps}};
    cap::lower_bound::state_type state;
    const rs::routing_plan plan = r.route(rs::backend::serial{}, view(x, T, d), state);
    CHECK(state.delta == std::fabs(delta_hat));  // the sign does not matter to the bound: |delta|
    CHECK(state.capacity == C);
    CHECK(plan.capacity() == C);
  }
  CHECK(negative > 0);
}

TEST_CASE("test_bidirectional_capacity: lower_bound rejects an estimated delta that is not a cosine") {
  // Precomputed logits of magnitude 5, declared as cosines: the median top-1 logit is no cosine.
  std::mt19937_64 rng(406);
  const rs::index T = 30, E = 4;
  std::vector<float> x = resonance_test::normal_values(rng, T * E, 0.1);
  for (float& v : x) v += 5.0f;
  const precomputed_router<rt::bidirectional, cap::lower_bound> r{{.cosines = true}, {}, {}};
  cap::lower_bound::state_type state;
  const std::string msg = error_of([&] { (void)r.route(rs::backend::serial{}, view(x, T, E), state); });
  CHECK(msg.find("resonance: lower_bound (estimated delta): expected a cosine") == 0);
  CHECK(state == cap::lower_bound::state_type{});  // untouched: the next batch is still the "first"
  // A given delta is not estimated, so the same logits route; a cosine-like batch then fixes C.
  const precomputed_router<rt::bidirectional, cap::lower_bound> given{{}, {}, {.delta = 0.5}};
  CHECK(given.route(rs::backend::serial{}, view(x, T, E), state).capacity() ==
        ref_lower_bound_capacity(0.5, E, E, T, 0));
  cap::lower_bound::state_type fresh;
  for (float& v : x) v -= 5.0f;
  const double delta_hat = ref_quantile(ref_tcr_pairs(x, T, E, E, 1), 0.5);
  CHECK(r.route(rs::backend::serial{}, view(x, T, E), fresh).capacity() ==
        ref_lower_bound_capacity(std::fabs(delta_hat), E, E, T, 0));
}

TEST_CASE("test_bidirectional_capacity: hidden_size overrides the input width as d of the bounds") {
  // Precomputed logits have E columns, so the input width says d = E; hidden_size gives the real d.
  std::mt19937_64 rng(407);
  const rs::index T = 120, E = 8, d = 512;
  std::vector<float> x(sz(T * E));
  for (float& v : x) v = static_cast<float>(uniform(rng, -0.12, 0.12));
  const double delta_hat = ref_quantile(ref_tcr_pairs(x, T, E, E, 1), 0.5);
  cap::lower_bound::state_type lb;
  const precomputed_router<rt::bidirectional, cap::lower_bound> wide{{.cosines = true}, {}, {.hidden_size = d}};
  CHECK(wide.route(rs::backend::serial{}, view(x, T, E), lb).capacity() ==
        ref_lower_bound_capacity(std::fabs(delta_hat), d, E, T, 0));
  cap::lower_bound::state_type narrow_state;
  CHECK(precomputed_router<rt::bidirectional, cap::lower_bound>{{.cosines = true}, {}, {}}
            .route(rs::backend::serial{}, view(x, T, E), narrow_state)
            .capacity() == ref_lower_bound_capacity(std::fabs(delta_hat), E, E, T, 0));

  const cap::adaptive policy{.estimate = cap::capacity_estimate::etr_bound, .hidden_size = d};
  cap::adaptive::state_type st;
  (void)precomputed_router<rt::bidirectional, cap::adaptive>{{.cosines = true}, {}, policy}.route(rs::backend::serial{},
                                                                                                  view(x, T, E), st);
  CHECK(resonance_test::close_rel(st.estimate, ref_etr(delta_hat, d, E), 1e-12));
  // The resonance threshold follows it too: 3 / sqrt(512) = 0.133, where 3 / sqrt(8) = 1.06 would let
  // nothing resonate. 15 candidates per expert, 6 of them resonating: 2 * 6 = 12 instead of unbounded
  // (no resonance: the TCR regime).
  const std::vector<float> y = resonance_batch(rng, E, E, 3.0 / std::sqrt(512.0), std::vector<rs::index>(sz(E), 15),
                                               std::vector<rs::index>(sz(E), 6));
  cap::adaptive::state_type with_d, without_d;
  (void)precomputed_router<rt::bidirectional, cap::adaptive>{{.cosines = true}, {}, {.hidden_size = d}}.route(
      rs::backend::serial{}, view(y, 15 * E, E), with_d);
  (void)precomputed_router<rt::bidirectional, cap::adaptive>{{.cosines = true}, {}, {}}.route(
      rs::backend::serial{}, view(y, 15 * E, E), without_d);
  CHECK(with_d.estimate == 12.0);
  CHECK(std::isinf(without_d.estimate));
}

// ===================================================================================================
// 5. capacity::adaptive (ETR).

TEST_CASE("test_bidirectional_capacity: the resonance estimate on constructed batches") {
  std::mt19937_64 rng(505);
  const rs::index E = 4, d = 16;  // default threshold 3/sqrt(16) = 0.75
  struct hand_case {
    std::vector<rs::index> demand, resonating;
    double threshold, margin, estimate;
  };
  // Default threshold: z = 3, 1 - Phi(3)^4 = 0.00539, so 2 mu0 + 3 is 3.32 for demand 30, 3.22 for
  // 20, 3.11 for 10: 3 resonating candidates are the null's, 4 are not. An expert with candidates but
  // none resonating beyond the null keeps all of them: the estimate is unbounded (TCR, C at the ceiling).
  //   e0 30 with 6 -> 12, e1 10 with 4 -> 8, e2 20 with 4 -> 8, e3 20 with 9 -> 18: 18.
  //   e0 with 3 -> unbounded (no more than the null explains); with 4 -> 8: 18 again.
  //   e1 with 0 resonating (and demand 10) -> unbounded; no resonance anywhere -> unbounded.
  // Threshold 0.3, margin 1: z = 1.2, 1 - Phi(1.2)^4 = 0.3868, 2 mu0 + 3 = 33.94 for demand 40, and
  //   experts without candidates do not count: 33 resonating -> unbounded, 34 -> min(40, 34) = 34.
  const double inf = std::numeric_limits<double>::infinity();
  const hand_case cases[] = {
      {{30, 10, 20, 20}, {6, 4, 4, 9}, 0.0, 2.0, 18.0}, {{30, 10, 20, 20}, {3, 4, 4, 9}, 0.0, 2.0, inf},
      {{30, 10, 20, 20}, {4, 4, 4, 9}, 0.0, 2.0, 18.0}, {{30, 10, 20, 20}, {6, 0, 4, 9}, 0.0, 2.0, inf},
      {{40, 0, 0, 0}, {33, 0, 0, 0}, 0.3, 1.0, inf},    {{40, 0, 0, 0}, {34, 0, 0, 0}, 0.3, 1.0, 34.0},
      {{12, 12, 12, 12}, {0, 0, 0, 0}, 0.0, 2.0, inf},
  };
  for (const hand_case& h : cases) {
    CAPTURE(h.estimate);
    const double thr = h.threshold > 0.0 ? h.threshold : 0.75;
    const std::vector<float> x = resonance_batch(rng, E, d, thr, h.demand, h.resonating);
    const rs::index T = static_cast<rs::index>(x.size()) / d;
    // The brute force reproduces the hand numbers, and the scheduler agrees with both.
    CHECK(ref_resonance_estimate(ref_tcr_pairs(x, T, E, d, 1), E, d, h.threshold, h.margin,
                                 0.01 * per_expert(T, 1, E)) == h.estimate);
    // One step from a fresh state, no warm-up: the batch's own estimate.
    const cap::adaptive policy{
        .threshold = h.threshold, .margin = h.margin, .floor = 0.01, .ceiling = 10.0, .warmup = 0};
    CHECK(policy.estimate_capacity({T, E, 1, d, rs::matrix_view<const float>{x.data(), T, E, d}, nullptr, 1.0}) ==
          h.estimate);
    cap::adaptive::state_type state;
    const rs::routing_plan plan =
        wide_router<cap::adaptive>{{.experts = E}, {}, policy}.route(rs::backend::serial{}, view(x, T, d), state);
    CHECK(state.estimate == h.estimate);
    CHECK(state.step == 1);
    CHECK(state.factor == std::clamp(std::isfinite(h.estimate) ? h.estimate / per_expert(T, 1, E) : 10.0, 0.01, 10.0));
    CHECK(plan.capacity() == static_cast<rs::index>(std::ceil(per_expert(T, 1, E) * state.factor)));
  }
}

TEST_CASE("test_bidirectional_capacity: adaptive stays in token choice while features are isotropic") {
  std::mt19937_64 rng(506);
  for (int n = 0; n < 40; ++n) {
    const rs::index E = pick(rng, 2, 12), d = 16 * pick(rng, 1, 16), T = pick(rng, 5, 200);
    const rs::index k = pick(rng, 1, std::min<rs::index>(E, 3));
    const double thr = 3.0 / std::sqrt(static_cast<double>(d));
    // Isotropic small affinities: nothing reaches the threshold.
    std::vector<float> x(sz(T * d), 0.0f);
    for (rs::index t = 0; t < T; ++t)
      for (rs::index e = 0; e < E; ++e) x[sz(t * d + e)] = static_cast<float>(uniform(rng, -0.9, 0.9) * thr);
    const auto pairs = ref_tcr_pairs(x, T, E, d, k);
    std::vector<rs::index> demand(sz(E), 0);
    for (const tcr_pair& p : pairs) ++demand[sz(p.expert)];
    const rs::index max_demand = *std::max_element(demand.begin(), demand.end());
    CHECK(std::isinf(ref_resonance_estimate(pairs, E, d, 0.0, 2.0, 0.1 * per_expert(T, k, E))));
    // The ceiling lets C reach the largest demand: nothing is dropped, the plan is token choice's.
    const cap::adaptive policy{.floor = 0.1, .ceiling = static_cast<double>(E)};
    cap::adaptive::state_type state;
    const rt::bidirectional p{.top_k = k};
    const rs::routing_plan bi =
        wide_router<cap::adaptive>{{.experts = E}, p, policy}.route(rs::backend::serial{}, view(x, T, d), state);
    const rs::routing_plan tc =
        rs::router<wide_logits, rt::token_choice, cap::dropless>{{.experts = E}, p.proposal(), {}}.route(
            rs::backend::serial{}, view(x, T, d));
    CAPTURE(n);
    // No resonance: the estimate is unbounded and C = ceil((T k / E) * E) covers any demand (T k, or
    // T k + 1 when the double product rounds up past the integer).
    CHECK(std::isinf(state.estimate));
    CHECK((bi.capacity() == T * k || bi.capacity() == T * k + 1));
    CHECK(bi.capacity() >= max_demand);
    CHECK(bi.num_dropped() == 0);
    CHECK(same_assignments(bi, tc));
  }
}

TEST_CASE("test_bidirectional_capacity: the bound estimates follow ETR Remark 7 and LocMoE Eq. 9") {
  std::mt19937_64 rng(507);
  const double quantiles[] = {0.0, 0.1, 0.5, 0.9, 1.0};
  for (int n = 0; n < 40; ++n) {
    const bool etr = n % 2 == 0;
    const rs::index E = pick(rng, 2, 16), d = 32 * pick(rng, 1, 32), T = pick(rng, 8, 300);
    const rs::index k = pick(rng, 1, std::min<rs::index>(E, 2));
    const rs::index tps = pick(rng, 0, 1) == 0 ? 0 : pick(rng, 4, 64);
    const double q = quantiles[sz(pick(rng, 0, 4))];
    const double scale = uniform(rng, 0.01, 0.25);  // from a negligible bound to one past the ceiling
    std::vector<float> x(sz(T * d), 0.0f);
    for (rs::index t = 0; t < T; ++t)
      for (rs::index e = 0; e < E; ++e) x[sz(t * d + e)] = static_cast<float>(uniform(rng, -1.0, 1.0) * scale);
    const double delta_hat = ref_quantile(ref_tcr_pairs(x, T, E, d, k), q);
    const double want = ref_samples(T, tps) * (etr ? ref_etr(delta_hat, d, E) : ref_locmoe(delta_hat, d, E));
    const cap::adaptive policy{
        .estimate = etr ? cap::capacity_estimate::etr_bound : cap::capacity_estimate::locmoe_bound,
        .quantile = q,
        .tokens_per_sample = tps,
        .floor = 0.25,
        .ceiling = 3.0,
        .warmup = 0};  // one step: the batch's own estimate
    CAPTURE(n);
    CAPTURE(delta_hat);
    CAPTURE(want);
    cap::adaptive::state_type state;
    const rs::routing_plan plan = wide_router<cap::adaptive>{{.experts = E}, {.top_k = k}, policy}.route(
        rs::backend::serial{}, view(x, T, d), state);
    CHECK(resonance_test::close_rel(state.estimate, want, 1e-12));
    const double per = per_expert(T, k, E);
    const double cf = std::clamp(want / per, 0.25, 3.0);
    CHECK(resonance_test::close_rel(state.factor, cf, 1e-12));
    CHECK(plan.capacity() == static_cast<rs::index>(std::ceil(per * state.factor)));
  }
  // The two forms at the spec's table entry (d = 512, n = 8, delta = 0.1): 1.6 and 5.4.
  CHECK(std::fabs(cap::etr_bound(0.1, 512, 8) - 1.63) < 0.01);
  CHECK(std::fabs(cap::locmoe_bound(0.1, 512, 8) - 5.36) < 0.01);
  CHECK(cap::locmoe_bound(0.1, 512, 8) == ref_locmoe(0.1, 512, 8));
  CHECK(cap::etr_bound(0.1, 512, 8) == ref_etr(0.1, 512, 8));
}

TEST_CASE("test_bidirectional_capacity: adaptive capacity never rises and stays within its clamps") {
  std::mt19937_64 rng(508);
  const rs::index E = 8, d = 64, T = 256;
  const double thr = 3.0 / 8.0;
  const cap::capacity_estimate kinds[] = {cap::capacity_estimate::resonance, cap::capacity_estimate::etr_bound,
                                          cap::capacity_estimate::locmoe_bound};
  for (cap::capacity_estimate kind : kinds) {
    for (int stream = 0; stream < 4; ++stream) {
      const double floor = uniform(rng, 0.1, 0.9), ceiling = floor + uniform(rng, 0.0, 2.5);
      // Batch by batch (no smoothing, no warm-up): the reference below reads each batch alone.
      const cap::adaptive policy{.estimate = kind, .floor = floor, .ceiling = ceiling, .half_life = 0.0, .warmup = 0};
      const wide_router<cap::adaptive> r{{.experts = E}, {}, policy};
      cap::adaptive::state_type state;
      double factor = std::numeric_limits<double>::infinity(), prev_factor = factor;
      rs::index prev_c = std::numeric_limits<rs::index>::max();
      // Affinities that drift both ways: a resonating share that rises, falls and rises again.
      const rs::index shares[] = {0, 2, 10, 4, 20, 1, 28, 6, 0, 32};
      for (rs::index step = 0; step < 10; ++step) {
        std::vector<rs::index> demand(sz(E), T / E), resonating(sz(E), shares[sz(step)]);
        std::vector<float> x = resonance_batch(rng, E, d, thr, demand, resonating);
        const double est =
            kind == cap::capacity_estimate::resonance
                ? ref_resonance_estimate(ref_tcr_pairs(x, T, E, d, 1), E, d, 0.0, 2.0, floor * per_expert(T, 1, E))
                : (kind == cap::capacity_estimate::etr_bound ? ref_etr : ref_locmoe)(
                      ref_quantile(ref_tcr_pairs(x, T, E, d, 1), 0.5), d, E);
        // Clamped, then at most max_step (0.1) below the previous factor and never above it.
        const double raw_cf = std::isfinite(est) ? est / per_expert(T, 1, E) : ceiling;
        double next = std::clamp(raw_cf, floor, ceiling);
        if (std::isfinite(factor)) next = std::clamp(next, factor * 0.9, factor);
        factor = std::max(next, floor);
        const rs::routing_plan plan = r.route(rs::backend::serial{}, view(x, T, d), state);
        CAPTURE(static_cast<int>(kind));
        CAPTURE(step);
        CHECK(state.step == step + 1);
        CHECK(resonance_test::close_rel(state.factor, factor, 1e-12));
        CHECK(state.factor <= prev_factor);
        CHECK(plan.capacity() == state.capacity);
        CHECK(plan.capacity() <= prev_c);
        CHECK(plan.capacity() >= static_cast<rs::index>(std::ceil(floor * per_expert(T, 1, E))));
        CHECK(plan.capacity() <= static_cast<rs::index>(std::ceil(ceiling * per_expert(T, 1, E))));
        prev_factor = state.factor;
        prev_c = plan.capacity();
      }
    }
  }

  // With T changing between steps the factor stays monotone, and C follows ceil(T k / E * cf).
  const cap::adaptive policy{.floor = 0.2, .warmup = 0};
  cap::adaptive::state_type state;
  double prev = state.factor;
  for (rs::index T2 : {64, 400, 96, 512, 40}) {
    std::vector<rs::index> demand(sz(E), T2 / E), resonating(sz(E), T2 / E / 6);
    std::vector<float> x = resonance_batch(rng, E, d, thr, demand, resonating);
    const rs::routing_plan plan =
        wide_router<cap::adaptive>{{.experts = E}, {}, policy}.route(rs::backend::serial{}, view(x, T2, d), state);
    CHECK(state.factor <= prev);
    CHECK(plan.capacity() == static_cast<rs::index>(std::ceil(per_expert(T2, 1, E) * state.factor)));
    prev = state.factor;
  }
}

TEST_CASE("test_bidirectional_capacity: the TCR -> ECR transition end to end") {
  // T = 512, E = 8, top-1, d = 64: threshold 0.375, T k / E = 64. Isotropic batches (no affinity
  // reaches the threshold) give C = the largest demand: token choice. Resonant batches (12 tokens per
  // expert well above the threshold, the rest isotropic) give C = margin * 12 = 24 per expert: each
  // expert keeps its 24 highest-affinity candidates, the 12 resonant ones among them.
  std::mt19937_64 rng(509);
  const rs::index T = 512, E = 8, d = 64, resonant = 12;
  const double thr = 0.375;
  // max_step = 1: no rate limit, so the transition happens within one step (tested separately below).
  // Batch by batch (no smoothing, no warm-up), as the reference below.
  const wide_router<cap::adaptive> etr{
      {.experts = E}, {}, {.floor = 0.25, .max_step = 1.0, .half_life = 0.0, .warmup = 0}};
  const rs::router<wide_logits, rt::token_choice, cap::dropless> tcr{{.experts = E}, {}, {}};
  cap::adaptive::state_type state;
  const bool is_resonant[] = {false, false, false, true, true, false, true};
  double running_factor = std::numeric_limits<double>::infinity();
  std::vector<double> drops;
  for (std::size_t step = 0; step < std::size(is_resonant); ++step) {
    CAPTURE(step);
    std::vector<float> x(sz(T * d), 0.0f);
    std::vector<rs::index> hot(sz(T), -1);  // each token's resonant expert, if any
    for (rs::index t = 0; t < T; ++t) {
      // Isotropic below the threshold, balanced: token t's largest logit is on expert t mod E, so
      // every expert's demand is 64 and the monotone rule cannot ratchet C below a later demand.
      float* row = x.data() + t * d;
      for (rs::index e = 0; e < E; ++e) row[e] = static_cast<float>(uniform(rng, -0.8 * thr, 0.8 * thr));
      std::swap(row[t % E], *std::max_element(row, row + E));
    }
    if (is_resonant[step]) {
      std::vector<rs::index> order(sz(T));
      std::iota(order.begin(), order.end(), rs::index{0});
      std::shuffle(order.begin(), order.end(), rng);
      for (rs::index j = 0; j < E * resonant; ++j) {
        const rs::index t = order[sz(j)], e = j / resonant;
        hot[sz(t)] = e;
        x[sz(t * d + e)] = static_cast<float>(uniform(rng, thr + 0.025, 0.9));
      }
    }
    const auto pairs = ref_tcr_pairs(x, T, E, d, 1);
    const double est = ref_resonance_estimate(pairs, E, d, 0.0, 2.0, 0.25 * 64.0);
    std::vector<rs::index> demand(sz(E), 0);
    for (const tcr_pair& p : pairs) ++demand[sz(p.expert)];
    const rs::index max_demand = *std::max_element(demand.begin(), demand.end());
    // TCR regime: no resonance beyond the null, the estimate is unbounded and C sits at the ceiling.
    CHECK(est == (is_resonant[step] ? 2.0 * resonant : std::numeric_limits<double>::infinity()));
    running_factor = std::min(running_factor, std::clamp(std::isfinite(est) ? est / 64.0 : 2.0, 0.25, 2.0));
    const rs::index C = static_cast<rs::index>(std::ceil(64.0 * running_factor));

    const rs::routing_plan plan = etr.route(rs::backend::serial{}, view(x, T, d), state);
    CHECK(plan.capacity() == C);
    drops.push_back(drop_rate(plan));
    const auto cands = ref_candidates(rt::bidirectional{}, x, T, E, d);
    const std::string diff = ecr_mismatch(plan, cands, C, rt::rank_by::affinity, false);
    CHECK_MESSAGE(diff.empty(), diff);
    if (step < 3) {
      // TCR regime: C at the ceiling (2 * 64) covers every demand: nothing dropped, exactly token choice.
      CHECK(C == 128);
      CHECK(C >= max_demand);
      CHECK(same_assignments(plan, tcr.route(rs::backend::serial{}, view(x, T, d))));
    } else {
      // ECR regime: C = 24 from the first resonant batch on; every resonant token is kept.
      CHECK(C == 2 * resonant);
      CHECK(plan.num_dropped() > 0);
      const auto kept = kept_tokens(plan);
      for (rs::index t = 0; t < T; ++t)
        if (hot[sz(t)] >= 0) CHECK(std::binary_search(kept[sz(hot[sz(t)])].begin(), kept[sz(hot[sz(t)])].end(), t));
    }
  }
  CHECK(drops[0] == 0.0);
  CHECK(drops[2] == 0.0);
  CHECK(drops[3] > 0.5);  // 24 of about 64 candidates per expert kept
  // Monotone: the isotropic batch after the transition keeps the small C (and drops), ETR's
  // "progressively decrease" has no way back.
  CHECK(drops[5] > 0.5);
}

TEST_CASE("test_bidirectional_capacity: while isotropic, C stays at the ceiling, then it falls by max_step a step") {
  // Isotropic batches: every expert's estimate is unbounded (TCR), so C = ceil(ceiling * T k / E)
  // whatever the demands, and nothing is dropped while the largest demand fits.
  std::mt19937_64 rng(511);
  const rs::index T = 512, E = 8, d = 64;  // T k / E = 64
  // Batch by batch (no smoothing, no warm-up): each estimate below is its batch's own.
  const wide_router<cap::adaptive> r{{.experts = E}, {}, {.half_life = 0.0, .warmup = 0}};
  cap::adaptive::state_type state;
  for (int step = 0; step < 10; ++step) {
    std::vector<float> x(sz(T * d), 0.0f);
    for (rs::index t = 0; t < T; ++t)
      for (rs::index e = 0; e < E; ++e) x[sz(t * d + e)] = static_cast<float>(uniform(rng, -0.3, 0.3));
    std::vector<rs::index> demand(sz(E), 0);
    for (const tcr_pair& p : ref_tcr_pairs(x, T, E, d, 1)) ++demand[sz(p.expert)];
    const rs::index max_demand = *std::max_element(demand.begin(), demand.end());
    const rs::routing_plan plan = r.route(rs::backend::serial{}, view(x, T, d), state);
    CAPTURE(step);
    CHECK(std::isinf(state.estimate));
    CHECK(state.factor == 2.0);
    CHECK(plan.capacity() == 128);
    CHECK(max_demand <= 128);
    CHECK(plan.num_dropped() == 0);
  }
  // Then strongly resonating batches (estimate 2 * 12 = 24, cf 0.375, below the default floor 0.5):
  // the factor falls by at most max_step (default 0.1) of itself per step, 2 * 0.9^n, down to the floor.
  const double thr = 0.375;
  double want = 2.0;
  for (int step = 0; step < 25; ++step) {
    std::vector<float> x(sz(T * d), 0.0f);
    for (rs::index t = 0; t < T; ++t) {
      float* row = x.data() + t * d;
      for (rs::index e = 0; e < E; ++e) row[e] = static_cast<float>(uniform(rng, -0.8 * thr, 0.8 * thr));
      std::swap(row[t % E], *std::max_element(row, row + E));
      if (t < 8 * 12) row[t % E] = static_cast<float>(uniform(rng, thr + 0.025, 0.9));
    }
    (void)r.route(rs::backend::serial{}, view(x, T, d), state);
    want = std::max(0.5, want * 0.9);
    CAPTURE(step);
    CHECK(state.estimate == 24.0);
    CHECK(resonance_test::close_rel(state.factor, want, 1e-12));
  }
  CHECK(state.factor == 0.5);
}

TEST_CASE("test_bidirectional_capacity: a failed route leaves the scheduler state untouched") {
  std::mt19937_64 rng(510);
  const rs::index T = 64, E = 4, d = 16;
  std::vector<float> x(sz(T * d), 0.0f);
  for (rs::index t = 0; t < T; ++t)
    for (rs::index e = 0; e < E; ++e) x[sz(t * d + e)] = static_cast<float>(uniform(rng, -0.5, 0.5));
  std::vector<float> nan_x = x;
  nan_x[sz(5 * d + 2)] = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> big_x = x;  // top-1 logits near 5: not a cosine for the bound estimates
  for (rs::index t = 0; t < T; ++t)
    for (rs::index e = 0; e < E; ++e) big_x[sz(t * d + e)] += 5.0f;

  {
    const wide_router<cap::adaptive> r{{.experts = E}, {}, {}};
    cap::adaptive::state_type state;
    (void)r.route(rs::backend::serial{}, view(x, T, d), state);
    const cap::adaptive::state_type after_one = state;
    CHECK(error_of([&] {
            (void)r.route(rs::backend::serial{}, view(nan_x, T, d), state);
          }).find("resonance: logits:") == 0);
    CHECK(state == after_one);
    (void)r.route(rs::backend::serial{}, view(x, T, d), state);
    CHECK(state.step == 2);
  }
  for (cap::capacity_estimate kind : {cap::capacity_estimate::etr_bound, cap::capacity_estimate::locmoe_bound}) {
    const wide_router<cap::adaptive> r{{.experts = E}, {}, {.estimate = kind}};
    cap::adaptive::state_type state;
    (void)r.route(rs::backend::serial{}, view(x, T, d), state);
    const cap::adaptive::state_type after_one = state;
    CHECK(error_of([&] {
            (void)r.route(rs::backend::serial{}, view(big_x, T, d), state);
          }).find("resonance: adaptive (estimated delta): expected a cosine") == 0);
    CHECK(state == after_one);
  }
  {
    const wide_router<cap::lower_bound> r{{.experts = E}, {}, {}};
    cap::lower_bound::state_type state;
    CHECK(error_of([&] {
            (void)r.route(rs::backend::serial{}, view(nan_x, T, d), state);
          }).find("resonance: logits:") == 0);
    CHECK(state == cap::lower_bound::state_type{});
  }
  {
    const wide_router<cap::schedule> r{{.experts = E}, {}, {.steps = 10}};
    cap::schedule::state_type state;
    (void)r.route(rs::backend::serial{}, view(x, T, d), state);
    CHECK(error_of([&] {
            (void)r.route(rs::backend::serial{}, view(nan_x, T, d), state);
          }).find("resonance: logits:") == 0);
    CHECK(state.step == 1);
  }
}

// ===================================================================================================
// 6. capacity::schedule.

TEST_CASE("test_bidirectional_capacity: schedule decays the capacity factor linearly or along a cosine") {
  struct sched_case {
    double start, end;
    rs::index steps;
    cap::decay shape;
    rs::index min_capacity;
  };
  const sched_case cases[] = {
      {2.0, 0.66, 10, cap::decay::linear, 0}, {2.0, 0.66, 10, cap::decay::cosine, 0},
      {1.5, 1.5, 3, cap::decay::linear, 0},   {0.5, 1.25, 7, cap::decay::cosine, 0},  // an increase is allowed
      {4.0, 0.1, 1, cap::decay::linear, 0},   {1.0, 0.2, 5, cap::decay::cosine, 9},
      {1.2, 0.12, 4, cap::decay::linear, 0},  // end + (start - end) rounds to 1.2000000000000002
      {3.4, 0.8, 6, cap::decay::cosine, 0},   // ... and to 3.3999999999999995
  };
  std::mt19937_64 rng(606);
  for (const sched_case& c : cases) {
    const cap::schedule s{
        .start = c.start, .end = c.end, .steps = c.steps, .shape = c.shape, .min_capacity = c.min_capacity};
    CAPTURE(c.start);
    CAPTURE(c.end);
    CAPTURE(c.steps);
    CAPTURE(static_cast<int>(c.shape));
    auto closed_form = [&](rs::index step) {
      if (step >= c.steps) return c.end;
      const double x = static_cast<double>(step) / static_cast<double>(c.steps);
      const double w = c.shape == cap::decay::linear ? 1.0 - x : 0.5 * (1.0 + std::cos(std::numbers::pi * x));
      return c.end + (c.start - c.end) * w;
    };
    // The schedule starts at `start` and ends at `end` exactly, as the capacity factors they name.
    CHECK(s.factor_at(0) == c.start);
    CHECK(s.factor_at(c.steps) == c.end);
    CHECK(s.factor_at(c.steps + 100) == c.end);
    for (rs::index step = 0; step <= c.steps + 2; ++step)
      CHECK(resonance_test::close_rel(s.factor_at(step), closed_form(step), 1e-14));
    if (c.steps == 10 && c.shape == cap::decay::cosine)
      CHECK(resonance_test::close_rel(s.factor_at(5), (2.0 + 0.66) / 2, 1e-14));
    if (c.steps == 10 && c.shape == cap::decay::linear)
      CHECK(resonance_test::close_rel(s.factor_at(3), 0.66 + 1.34 * 0.7, 1e-14));

    // Through the router: C per step, the step count, any T. At the two ends C is exactly that of
    // capacity::factor{start} / {end}; in between ceil((T k / E) cf) of the closed form, where a
    // product within rounding of an integer may legitimately land on either side.
    const rs::index E = 8, k = 2;
    const precomputed_router<rt::bidirectional, cap::schedule> r{{}, {.top_k = k}, s};
    cap::schedule::state_type state;
    for (rs::index step = 0; step <= c.steps + 2; ++step) {
      const rs::index T = step == 0 ? 20 : pick(rng, 1, 90);  // T k / E = 5 at step 0: 5 * 1.2 == 6
      const std::vector<float> x = resonance_test::normal_values(rng, T * E);
      CAPTURE(step);
      CAPTURE(T);
      const rs::index C = r.route(rs::backend::serial{}, view(x, T, E), state).capacity();
      CHECK(state.step == step + 1);
      if (step == 0 || step >= c.steps) {
        const cap::factor at{.factor = step == 0 ? c.start : c.end, .min_capacity = c.min_capacity};
        CHECK(C == at.capacity(T, E, k));
      } else {
        const double v = per_expert(T, k, E) * closed_form(step);
        const auto lo = std::max(static_cast<rs::index>(std::ceil(v * (1 - 1e-12))), c.min_capacity);
        const auto hi = std::max(static_cast<rs::index>(std::ceil(v * (1 + 1e-12))), c.min_capacity);
        CHECK(C >= lo);
        CHECK(C <= hi);
      }
    }
  }
}

// ===================================================================================================
// 7. Validation of every new policy field.

TEST_CASE("test_bidirectional_capacity: every new policy field is validated, the message names it") {
  auto starts_with = [](const std::string& msg, const std::string& argument) {
    return msg.rfind("resonance: " + argument + ": expected", 0) == 0;
  };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();

  // bidirectional: its own field, and the proposal's.
  CHECK(starts_with(error_of([] { rt::bidirectional{.rank = static_cast<rt::rank_by>(7)}.validate(4); }), "rank"));
  CHECK(starts_with(error_of([] { rt::bidirectional{.top_k = 5}.validate(4); }), "top_k"));
  CHECK(starts_with(error_of([] { rt::bidirectional{.temperature = 0.0f}.validate(4); }), "temperature"));
  CHECK(starts_with(error_of([] { rt::bidirectional{.num_groups = 3, .group_topk = 1}.validate(4); }), "num_groups"));
  CHECK(error_of([] { rt::bidirectional{.rank = rt::rank_by::weight, .causal = true}.validate(4); }) == "no throw");

  // lower_bound.
  for (double bad : {-0.1, 1.0, 1.5, nan, inf})
    CHECK(starts_with(error_of([&] { cap::lower_bound{.delta = bad}.validate(); }), "lower_bound.delta"));
  for (double bad : {-0.01, 1.01, nan})
    CHECK(starts_with(error_of([&] { cap::lower_bound{.quantile = bad}.validate(); }), "lower_bound.quantile"));
  CHECK(starts_with(error_of([] { cap::lower_bound{.tokens_per_sample = -1}.validate(); }),
                    "lower_bound.tokens_per_sample"));
  CHECK(starts_with(error_of([] { cap::lower_bound{.align = 0}.validate(); }), "align"));
  CHECK(starts_with(error_of([] { cap::lower_bound{.hidden_size = -1}.validate(); }), "lower_bound.hidden_size"));
  CHECK(error_of([] { cap::lower_bound{.delta = 0.99, .quantile = 1.0}.validate(); }) == "no throw");

  // adaptive.
  CHECK(starts_with(error_of([] { cap::adaptive{.estimate = static_cast<cap::capacity_estimate>(9)}.validate(); }),
                    "adaptive.estimate"));
  for (double bad : {-0.1, 1.0, nan})
    CHECK(starts_with(error_of([&] { cap::adaptive{.threshold = bad}.validate(); }), "adaptive.threshold"));
  for (double bad : {0.0, -1.0, inf, nan})
    CHECK(starts_with(error_of([&] { cap::adaptive{.margin = bad}.validate(); }), "adaptive.margin"));
  for (double bad : {-0.5, 2.0, nan})
    CHECK(starts_with(error_of([&] { cap::adaptive{.quantile = bad}.validate(); }), "adaptive.quantile"));
  CHECK(starts_with(error_of([] { cap::adaptive{.tokens_per_sample = -3}.validate(); }), "adaptive.tokens_per_sample"));
  for (double bad : {0.0, -0.5, inf, nan})
    CHECK(starts_with(error_of([&] { cap::adaptive{.floor = bad, .ceiling = 3.0}.validate(); }), "adaptive.floor"));
  for (double bad : {0.4, inf, nan})
    CHECK(starts_with(error_of([&] { cap::adaptive{.floor = 0.5, .ceiling = bad}.validate(); }), "adaptive.ceiling"));
  CHECK(starts_with(error_of([] { cap::adaptive{.align = 0}.validate(); }), "align"));
  CHECK(starts_with(error_of([] { cap::adaptive{.hidden_size = -1}.validate(); }), "adaptive.hidden_size"));
  CHECK(error_of([] { cap::adaptive{.floor = 0.5, .ceiling = 0.5}.validate(); }) == "no throw");

  // schedule.
  for (double bad : {0.0, -1.0, inf, nan})
    CHECK(starts_with(error_of([&] { cap::schedule{.start = bad}.validate(); }), "schedule.start"));
  for (double bad : {0.0, -1.0, inf, nan})
    CHECK(starts_with(error_of([&] { cap::schedule{.end = bad}.validate(); }), "schedule.end"));
  for (rs::index bad : {0, -5})
    CHECK(starts_with(error_of([&] { cap::schedule{.steps = bad}.validate(); }), "schedule.steps"));
  CHECK(starts_with(error_of([] { cap::schedule{.shape = static_cast<cap::decay>(5)}.validate(); }), "schedule.shape"));
  CHECK(starts_with(error_of([] { cap::schedule{.min_capacity = -1}.validate(); }), "min_capacity"));
  CHECK(starts_with(error_of([] { cap::schedule{.align = 0}.validate(); }), "align"));
  CHECK(starts_with(error_of([] { cap::schedule{.drop = static_cast<rs::drop_policy>(9)}.validate(); }), "drop"));

  // The router validates before it reads or advances the state.
  const std::vector<float> x = {0.1f, 0.2f, 0.3f, 0.0f};
  {
    const precomputed_router<rt::bidirectional, cap::adaptive> r{{}, {}, {.floor = -1.0}};
    cap::adaptive::state_type state;
    CHECK(starts_with(error_of([&] { (void)r.route(rs::backend::serial{}, view(x, 2, 2), state); }), "adaptive.floor"));
    CHECK(state == cap::adaptive::state_type{});
  }
  {
    const precomputed_router<rt::bidirectional, cap::schedule> r{{}, {.rank = static_cast<rt::rank_by>(3)}, {}};
    cap::schedule::state_type state;
    CHECK(starts_with(error_of([&] { (void)r.route(rs::backend::serial{}, view(x, 2, 2), state); }), "rank"));
    CHECK(state.step == 0);
  }
  {
    // lower_bound and adaptive do not check `drop` in validate(); the router's limit check catches it.
    const precomputed_router<rt::bidirectional, cap::lower_bound> r{
        {}, {}, {.delta = 0.5, .drop = static_cast<rs::drop_policy>(9)}};
    cap::lower_bound::state_type state;
    CHECK(starts_with(error_of([&] { (void)r.route(rs::backend::serial{}, view(x, 2, 2), state); }), "drop"));
    CHECK(state == cap::lower_bound::state_type{});
  }
}
