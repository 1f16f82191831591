#pragma once

// The conformance suite every backend runs against backend::serial (DESIGN §3 and §9):
//
//   resonance_test::check_conformance(be, name);
//
// routes conformance_cases seeded random cases (shapes, logits with and without exact ties, every
// direction and its options, dropless and factor capacities, precomputed / grap / grap_cosine / cosine
// affinities, injected faults) on `be` and on serial. Expert ids, slots, counts, offsets, demand and
// the token CSR must be identical; weights bitwise on a host-memory backend and within 1e-6 relative
// elsewhere; an error must be the same resonance::error message. Every plan of `be` is also checked
// against the plan contract (DESIGN §4), and a subset of cases (identity scores, whose weights are the
// logits) against a brute-force plan computed here, without serial. A few stateful-scheduler runs and
// random candidate sets for build_plan complete it. Plans of any memory space are compared after
// resonance::to_host, so a device backend runs the same suite (tests/kokkos/).
//
// Case i draws everything from std::mt19937_64(conformance_seed + i): a failure names its case, and
// make_case(i) rebuilds it.

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <numeric>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/resonance.hpp>

#include "backends.hpp"
#include "error_of.hpp"
#include "random_inputs.hpp"

namespace resonance_test {
namespace conformance {

namespace rs = resonance;
namespace rt = resonance::routing;
namespace ra = resonance::affinity;
namespace cap = resonance::capacity;
using rs::id_type;
using rs::index;

inline constexpr std::uint64_t conformance_seed = 0x5EED'C0F0'2025ull;
inline constexpr int conformance_cases = 400;

// The cases check_conformance routes: conformance_cases from 0, or, for a soak (scripts/soak.sh),
// RESONANCE_CONFORMANCE_CASES cases from RESONANCE_CONFORMANCE_FIRST (each at most 10^8; a bad value
// fails the test rather than silently running the default).
struct case_range {
  int first = 0;
  int count = conformance_cases;
};
inline int env_count(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  const std::string why = std::string(name) + " must be an integer in [0, 1e8], got " + v;
  REQUIRE_MESSAGE((*end == '\0' && n >= 0 && n <= 100'000'000), why);
  return static_cast<int>(n);
}
inline case_range soak_range() {
  return {env_count("RESONANCE_CONFORMANCE_FIRST", 0), env_count("RESONANCE_CONFORMANCE_CASES", conformance_cases)};
}
// DESIGN §3: weights of a backend that is not bitwise agree to 1e-6 relative.
inline constexpr double weight_tolerance = 1e-6;

// ---------------------------------------------------------------------------------------------------
// Random draws

template <class T>
T pick(std::mt19937_64& rng, std::initializer_list<T> values) {
  return *(values.begin() + std::uniform_int_distribution<std::size_t>(0, values.size() - 1)(rng));
}
inline index uniform(std::mt19937_64& rng, index lo, index hi) {
  return std::uniform_int_distribution<index>(lo, hi)(rng);
}
inline bool chance(std::mt19937_64& rng, double p) { return std::uniform_real_distribution<double>(0.0, 1.0)(rng) < p; }

// ---------------------------------------------------------------------------------------------------
// A case

enum class affinity_kind { precomputed, precomputed_double, grap, grap_cosine, cosine };
// normal: no ties; quantised: five levels, exact ties everywhere; signed_zeros: ±0 mixed with a few values.
enum class input_kind { normal, quantised, signed_zeros };
// What must make the route throw: a NaN / ±Inf input entry (in one or two random rows), finite logits
// that overflow once divided by a tiny temperature, or a configuration the direction rejects.
enum class fault_kind { none, nan, pos_inf, neg_inf, overflow, configuration };

using direction_variant = std::variant<rt::token_choice, rt::expert_choice, rt::bidirectional, rt::sinkhorn>;
using capacity_variant = std::variant<cap::dropless, cap::factor>;

// One case and the data its views point into. Moving keeps the vectors' buffers, so the views stay
// valid; copying would not, hence no copies.
struct test_case {
  int id = 0;
  index T = 0, E = 1, k = 1;
  index d = 1, stride = 1;  // input columns (E for precomputed logits) and row stride
  affinity_kind affinity = affinity_kind::precomputed;
  input_kind input = input_kind::normal;
  fault_kind fault = fault_kind::none;
  float cosine_temperature = 1.0f;
  direction_variant direction;
  capacity_variant capacity;
  // Checked against the brute-force plan too (identity scores at temperature 1: weights are logits).
  bool reference = false;
  std::vector<float> x;           // T×stride, float input (the gap columns hold NaN: never read)
  std::vector<double> xd;         // the same for precomputed double logits
  std::vector<float> gate;        // E×d cosine embeddings
  std::vector<float> bias;        // E, when the direction has an expert bias
  std::vector<float> thresholds;  // E, causal expert choice with thresholds
  std::string text;

  test_case() = default;
  test_case(test_case&&) = default;
  test_case& operator=(test_case&&) = default;
  test_case(const test_case&) = delete;
  test_case& operator=(const test_case&) = delete;

  float logit(index t, index e) const {  // precomputed only: the fp32 logit the router sees
    return affinity == affinity_kind::precomputed_double ? static_cast<float>(xd[usz(t * stride + e)])
                                                         : x[usz(t * stride + e)];
  }
};

inline const char* name_of(rs::score s) {
  switch (s) {
    case rs::score::softmax:
      return "softmax";
    case rs::score::sigmoid:
      return "sigmoid";
    case rs::score::sqrt_softplus:
      return "sqrt_softplus";
    default:
      return "identity";
  }
}
inline const char* name_of(rs::drop_policy d) {
  return d == rs::drop_policy::score ? "score" : d == rs::drop_policy::position ? "position" : "random";
}
inline const char* name_of(affinity_kind a) {
  constexpr const char* names[] = {"precomputed", "precomputed double", "grap", "grap_cosine", "cosine"};
  return names[static_cast<int>(a)];
}
inline const char* name_of(input_kind i) {
  constexpr const char* names[] = {"normal", "quantised", "signed zeros"};
  return names[static_cast<int>(i)];
}
inline const char* name_of(fault_kind f) {
  constexpr const char* names[] = {"none", "NaN", "+Inf", "-Inf", "overflow (temperature 1e-3)", "configuration"};
  return names[static_cast<int>(f)];
}

inline std::string describe_proposal(const rt::token_choice& p) {
  std::ostringstream os;
  os << name_of(p.score) << (p.pre_softmax ? " pre" : "") << " temperature " << p.temperature << " renorm "
     << static_cast<int>(p.renorm) << " scaling " << p.scaling_factor << (p.expert_bias.empty() ? "" : " bias");
  if (p.grouped())
    os << " groups " << p.num_groups << "/" << p.group_topk << " scoring " << static_cast<int>(p.group_scoring);
  return os.str();
}

inline std::string describe(const test_case& c) {
  std::ostringstream os;
  os << "case " << c.id << ": T=" << c.T << " E=" << c.E << " k=" << c.k << " " << name_of(c.affinity) << " d=" << c.d
     << " stride=" << c.stride << " " << name_of(c.input) << " input";
  if (c.affinity == affinity_kind::cosine) os << " (cosine temperature " << c.cosine_temperature << ")";
  os << "; ";
  std::visit(
      [&](const auto& p) {
        using D = std::decay_t<decltype(p)>;
        if constexpr (std::is_same_v<D, rt::token_choice>) {
          os << "token_choice " << describe_proposal(p);
        } else if constexpr (std::is_same_v<D, rt::bidirectional>) {
          os << "bidirectional " << describe_proposal(p.proposal()) << " rank " << static_cast<int>(p.rank)
             << (p.causal ? " causal" : "");
        } else if constexpr (std::is_same_v<D, rt::expert_choice>) {
          os << "expert_choice " << name_of(p.score) << " temperature " << p.temperature << (p.causal ? " causal" : "")
             << (p.thresholds.empty() ? "" : " thresholds");
        } else {
          os << "sinkhorn iterations " << p.max_iterations << " tolerance " << p.tolerance;
        }
      },
      c.direction);
  os << "; ";
  std::visit(
      [&](const auto& q) {
        if constexpr (std::is_same_v<std::decay_t<decltype(q)>, cap::dropless>) {
          os << "dropless align " << q.align;
        } else {
          os << "factor " << q.factor << " drop " << name_of(q.drop) << " seed " << q.seed << " min_capacity "
             << q.min_capacity << (q.pad_to_capacity ? " pad" : "") << " align " << q.align;
        }
      },
      c.capacity);
  os << "; fault " << name_of(c.fault) << (c.reference ? "; brute-force reference" : "");
  return os.str();
}

// Calls f(affinity, input view) with the case's affinity and its input (float, or double logits).
template <class F>
void with_affinity(const test_case& c, F&& f) {
  const rs::matrix_view<const float> x{c.x.data(), c.T, c.d, c.stride};
  switch (c.affinity) {
    case affinity_kind::precomputed:
      f(ra::precomputed{}, x);
      break;
    case affinity_kind::precomputed_double:
      f(ra::precomputed{}, rs::matrix_view<const double>{c.xd.data(), c.T, c.d, c.stride});
      break;
    case affinity_kind::grap:
      f(ra::grap{.num_experts = c.E}, x);
      break;
    case affinity_kind::grap_cosine:
      f(ra::grap_cosine{.num_experts = c.E}, x);
      break;
    case affinity_kind::cosine:
      f(ra::cosine{.weight = {c.gate.data(), c.E, c.d}, .temperature = c.cosine_temperature}, x);
      break;
  }
}

// The T×E fp32 logits of the case on serial (for expert choice's thresholds).
inline std::vector<float> serial_logits(const test_case& c) {
  std::vector<float> out;
  with_affinity(c, [&](const auto& a, auto x) {
    std::vector<float> storage;
    const rs::matrix_view<const float> l = a.compute(rs::backend::serial{}, x, storage);
    out.resize(usz(c.T * c.E));
    for (index t = 0; t < c.T; ++t)
      for (index e = 0; e < c.E; ++e) out[usz(t * c.E + e)] = l(t, e);
  });
  return out;
}

// Token-choice options valid for E and k. `plain`: identity score at temperature 1, no scaling, no
// renormalisation, no groups (the weights are the logits; the brute-force reference applies).
inline rt::token_choice draw_proposal(std::mt19937_64& rng, index E, index k, bool plain, bool& use_bias) {
  rt::token_choice p{.top_k = k};
  use_bias = chance(rng, 0.3);
  if (plain) {
    p.score = rs::score::identity;
    p.renorm = pick(rng, {rt::renormalize::automatic, rt::renormalize::never});
    return p;
  }
  switch (uniform(rng, 0, 4)) {
    case 0:
      break;  // softmax after top-k
    case 1:
      p.pre_softmax = true;
      break;
    case 2:
      p.score = rs::score::sigmoid;
      break;
    case 3:
      p.score = rs::score::sqrt_softplus;
      break;
    default:
      p.score = rs::score::identity;
  }
  p.renorm = pick(
      rng, {rt::renormalize::automatic, rt::renormalize::automatic, rt::renormalize::always, rt::renormalize::never});
  p.temperature = pick(rng, {1.0f, 1.0f, 0.7f, 1.3f, 0.25f});
  p.scaling_factor = pick(rng, {1.0f, 1.0f, 2.5f, 0.5f});
  if (chance(rng, 0.3)) {
    std::vector<index> divisors;
    for (index g = 2; g <= E; ++g)
      if (E % g == 0) divisors.push_back(g);
    if (!divisors.empty()) {
      const index G = divisors[usz(uniform(rng, 0, static_cast<index>(divisors.size()) - 1))];
      p.num_groups = G;
      p.group_scoring = pick(rng, {rt::group_score::top_m_sum, rt::group_score::top2_sum, rt::group_score::max});
      // k <= group_topk·E/G, and group_topk <= k for top_m_sum (each group scored by its top k/group_topk).
      const index lo = (k + E / G - 1) / (E / G);
      index hi = p.group_scoring == rt::group_score::top_m_sum ? std::min(G, k) : G;
      if (lo > hi) {
        p.group_scoring = rt::group_score::max;
        hi = G;
      }
      p.group_topk = uniform(rng, lo, hi);
    }
  }
  return p;
}

inline void fill_input(std::mt19937_64& rng, test_case& c) {
  const bool logits = c.affinity == affinity_kind::precomputed || c.affinity == affinity_kind::precomputed_double;
  const index n = c.T * c.d;
  std::vector<float> v;
  switch (c.input) {
    case input_kind::normal:
      v = normal_values(rng, n, logits ? 2.0 : 1.0);
      break;
    case input_kind::quantised:
      v = grid_values(rng, n, 2, 0.5f);
      break;
    case input_kind::signed_zeros:
      v = logits ? draw_from(rng, n, {0.0f, -0.0f, 0.0f, -0.0f, 0.5f, -0.5f, 1.0f})
                 : draw_from(rng, n, {0.0f, -0.0f, 0.0f, -0.0f, 1.0f, -1.0f});
      break;
  }
  // At least one entry, so that an empty batch still has a non-null pointer.
  const std::size_t size = usz(std::max<index>(1, c.T * c.stride));
  c.x.assign(size, std::numeric_limits<float>::quiet_NaN());
  for (index t = 0; t < c.T; ++t)
    for (index j = 0; j < c.d; ++j) c.x[usz(t * c.stride + j)] = v[usz(t * c.d + j)];
  if (c.affinity == affinity_kind::precomputed_double) {
    c.xd.assign(size, std::numeric_limits<double>::quiet_NaN());
    for (std::size_t i = 0; i < c.x.size(); ++i) c.xd[i] = c.x[i];
    // Values a float cannot hold exactly (the conversion's rounding is part of the route).
    if (c.input == input_kind::normal)
      for (index t = 0; t < c.T; ++t)
        for (index j = 0; j < c.d; ++j) c.xd[usz(t * c.stride + j)] += 1e-9 * static_cast<double>(j % 7);
  }
  if (c.affinity == affinity_kind::cosine) c.gate = normal_values(rng, c.E * c.d);
}

// Sets input entry (t, j) to v (the float input, or the double one).
inline void set_input(test_case& c, index t, index j, float v) {
  if (c.affinity == affinity_kind::precomputed_double)
    c.xd[usz(t * c.stride + j)] = static_cast<double>(v);
  else
    c.x[usz(t * c.stride + j)] = v;
}

// Case `id` of the suite: deterministic, whatever the backend.
inline test_case make_case(int id) {
  std::mt19937_64 rng(conformance_seed + static_cast<std::uint64_t>(id));
  test_case c;
  c.id = id;
  c.T = pick<index>(rng, {0, 1, 2, 7, 64, 300, 2500});
  c.E = pick<index>(rng, {1, 2, 3, 8, 64, 160});
  c.k = chance(rng, 0.6) ? uniform(rng, 1, std::min<index>(c.E, 8)) : uniform(rng, 1, c.E);
  c.affinity = static_cast<affinity_kind>(std::discrete_distribution<int>({35, 15, 15, 20, 15})(rng));
  c.input = static_cast<input_kind>(uniform(rng, 0, 2));
  const bool logits = c.affinity == affinity_kind::precomputed || c.affinity == affinity_kind::precomputed_double;
  // cosine costs T·E·d: a narrow input for the large shapes.
  const index widen = c.affinity == affinity_kind::cosine && c.T * c.E > 20000 ? 1 : pick<index>(rng, {1, 2, 4});
  c.d = logits ? c.E : c.E * widen;
  c.stride = chance(rng, 0.2) ? c.d + 3 : c.d;
  c.cosine_temperature = pick(rng, {1.0f, 0.1f, 0.05f});
  if (c.T >= 1 && chance(rng, 0.12)) {
    c.fault = pick(rng, {fault_kind::nan, fault_kind::pos_inf, fault_kind::neg_inf, fault_kind::overflow});
    if (c.fault == fault_kind::overflow && !logits) c.fault = fault_kind::nan;
  }
  fill_input(rng, c);

  // The direction. `plain` cases (precomputed logits, no fault) use identity scores at temperature 1.
  const bool plain = logits && c.fault == fault_kind::none && chance(rng, 0.35);
  bool use_bias = false;
  const int kind =
      c.fault == fault_kind::overflow ? pick(rng, {0, 2}) : std::discrete_distribution<int>({35, 20, 25, 20})(rng);
  bool expert_choice_needs_capacity = false;
  if (kind == 0 || kind == 2) {
    rt::token_choice p = draw_proposal(rng, c.E, c.k, plain, use_bias);
    if (c.fault == fault_kind::overflow) {
      // Scores that cannot absorb an infinite logit: the softmaxes (Inf - Inf) and identity.
      p.score = pick(rng, {rs::score::softmax, rs::score::identity});
      p.pre_softmax = p.score == rs::score::softmax && chance(rng, 0.5);
      p.temperature = 1e-3f;
    }
    if (kind == 0) {
      c.direction = p;
    } else {
      rt::bidirectional b{.top_k = p.top_k,
                          .score = p.score,
                          .pre_softmax = p.pre_softmax,
                          .temperature = p.temperature,
                          .renorm = p.renorm,
                          .scaling_factor = p.scaling_factor,
                          .num_groups = p.num_groups,
                          .group_topk = p.group_topk,
                          .group_scoring = p.group_scoring,
                          .rank = pick(rng, {rt::rank_by::affinity, rt::rank_by::score, rt::rank_by::weight}),
                          .causal = chance(rng, 0.3)};
      c.direction = b;
    }
    c.reference = plain;
  } else if (kind == 1) {
    rt::expert_choice p{.top_k = c.k};
    if (!plain) {
      p.score = pick(rng, {rs::score::softmax, rs::score::sigmoid, rs::score::sqrt_softplus, rs::score::identity});
      p.temperature = pick(rng, {1.0f, 0.7f, 1.3f});
    } else {
      p.score = rs::score::identity;
    }
    p.causal = chance(rng, 0.4);
    expert_choice_needs_capacity = !p.causal;
    c.direction = p;
    c.reference = plain;
  } else {
    const bool large = c.T * c.E > 100000;
    c.direction = rt::sinkhorn{.top_k = c.k,
                               .max_iterations = large ? pick<index>(rng, {1, 3}) : pick<index>(rng, {1, 5, 20, 100}),
                               .tolerance = pick(rng, {1e-4, 1e-2})};
  }

  // The capacity: dropless, or a factor that forces drops (< 1) or does not.
  if (chance(rng, expert_choice_needs_capacity ? 0.05 : 0.35)) {
    c.capacity = cap::dropless{.align = pick<index>(rng, {1, 1, 1, 2, 4, 8})};
    if (expert_choice_needs_capacity && c.fault == fault_kind::none) c.fault = fault_kind::configuration;
  } else {
    c.capacity =
        cap::factor{.factor = pick(rng, {0.1, 0.25, 0.5, 0.75, 1.0, 1.0, 1.25, 2.0, 8.0}),
                    .drop = pick(rng, {rs::drop_policy::score, rs::drop_policy::position, rs::drop_policy::random}),
                    .min_capacity = pick<index>(rng, {0, 0, 0, 1, 3, c.T + 5}),
                    .pad_to_capacity = chance(rng, 0.3),
                    .align = pick<index>(rng, {1, 1, 1, 2, 4, 8}),
                    .seed = rng()};
  }

  // Bias on the score scale of the direction, on a grid (ties between biased keys too).
  if (use_bias) c.bias = grid_values(rng, c.E, 8, 0.125f);
  if (auto* p = std::get_if<rt::token_choice>(&c.direction); p && use_bias) p->expert_bias = {c.bias.data(), c.E};
  if (auto* p = std::get_if<rt::bidirectional>(&c.direction); p && use_bias) p->expert_bias = {c.bias.data(), c.E};
  // Thresholds at the C-th largest score of each expert (from finite logits, before any fault).
  if (auto* p = std::get_if<rt::expert_choice>(&c.direction); p && p->causal && c.T >= 1 && chance(rng, 0.5)) {
    const std::vector<float> l = serial_logits(c);
    c.thresholds =
        rt::expert_choice_thresholds(*p, rs::matrix_view<const float>{l.data(), c.T, c.E}, uniform(rng, 1, c.T));
    p->thresholds = {c.thresholds.data(), c.E};
  }

  // The fault: one or two bad entries, the second in a later row (the lowest row must be reported).
  if (c.fault != fault_kind::none && c.fault != fault_kind::configuration) {
    const float bad = c.fault == fault_kind::nan       ? std::numeric_limits<float>::quiet_NaN()
                      : c.fault == fault_kind::pos_inf ? std::numeric_limits<float>::infinity()
                      : c.fault == fault_kind::neg_inf ? -std::numeric_limits<float>::infinity()
                                                       : 3e38f;
    const index r1 = uniform(rng, 0, c.T - 1);
    set_input(c, r1, uniform(rng, 0, c.d - 1), bad);
    if (r1 + 1 < c.T && chance(rng, 0.5)) {
      const float other =
          c.fault == fault_kind::overflow
              ? 3e38f
              : pick(rng, {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()});
      set_input(c, uniform(rng, r1 + 1, c.T - 1), uniform(rng, 0, c.d - 1), other);
    }
  }
  c.text = describe(c);
  return c;
}

// ---------------------------------------------------------------------------------------------------
// Routing a case

// The case routed on `be` and mirrored to the host; or nothing, with the error message in `error`
// ("no throw" when it routed).
template <class Backend>
std::optional<rs::routing_plan> route_case(const Backend& be, const test_case& c, std::string& error) {
  std::optional<rs::routing_plan> plan;
  error = error_of([&] {
    std::visit(
        [&](const auto& direction, const auto& capacity) {
          with_affinity(c, [&](const auto& affinity, auto x) {
            using router_type = rs::router<std::decay_t<decltype(affinity)>, std::decay_t<decltype(direction)>,
                                           std::decay_t<decltype(capacity)>>;
            const router_type r{affinity, direction, capacity};
            plan = rs::to_host(be, r.route(be, x));
          });
        },
        c.direction, c.capacity);
  });
  return plan;
}

// The limits the case's capacity policy must give, by the formula (DESIGN §3: C = ⌈(T·k/E)·cf⌉,
// clamped below by min_capacity).
inline rs::capacity_limits expected_limits(const test_case& c) {
  if (const auto* q = std::get_if<cap::dropless>(&c.capacity)) return {.capacity = -1, .align = q->align};
  const auto& q = std::get<cap::factor>(c.capacity);
  const double C =
      std::ceil((static_cast<double>(c.T) * static_cast<double>(c.k) / static_cast<double>(c.E)) * q.factor);
  return {.capacity = std::max(static_cast<index>(C), q.min_capacity),
          .drop = q.drop,
          .pad_to_capacity = q.pad_to_capacity,
          .align = q.align,
          .seed = q.seed};
}

inline index round_up(index n, index m) { return (n + m - 1) / m * m; }

// The plan contract (DESIGN §4), checked on any plan: the first violation, or "". max_per_token bounds
// each token's kept assignments; exact_k: every token proposes exactly k candidates (token choice,
// bidirectional, sinkhorn).
inline std::string contract_violation(const rs::routing_plan& p, index T, index E, const rs::capacity_limits& lim,
                                      index max_per_token, index exact_k) {
  std::ostringstream os;
  const index C = lim.capacity;
  const bool pad = lim.pad_to_capacity && C >= 0;
  if (p.num_tokens() != T || p.num_experts() != E) return "shape";
  if (p.capacity() != C) return "capacity " + std::to_string(p.capacity()) + ", expected " + std::to_string(C);
  const auto off = p.expert_offsets();
  const auto counts = p.expert_counts();
  const auto demand = p.expert_demand();
  const auto st = p.slot_token();
  const auto sw = p.slot_weight();
  if (off[0] != 0 || off[usz(E)] != p.num_slots()) return "expert_offsets do not span the slots";
  index kept = 0, demanded = 0;
  for (index e = 0; e < E; ++e) {
    const index n = counts[usz(e)], want = C < 0 ? demand[usz(e)] : std::min<index>(demand[usz(e)], C);
    if (n != want) {
      os << "expert " << e << ": count " << n << ", expected min(demand " << demand[usz(e)] << ", C " << C << ")";
      return os.str();
    }
    if (off[usz(e + 1)] - off[usz(e)] != round_up(pad ? C : n, lim.align)) {
      os << "expert " << e << ": " << off[usz(e + 1)] - off[usz(e)] << " slots for " << n << " kept";
      return os.str();
    }
    // Kept slots: valid tokens, strictly ascending (plan.hpp: ascending token order); then padding.
    for (index s = off[usz(e)]; s < off[usz(e + 1)]; ++s) {
      const bool is_kept = s < off[usz(e)] + n;
      const id_type t = st[usz(s)];
      const bool ok = is_kept ? t >= 0 && t < T && (s == off[usz(e)] || st[usz(s - 1)] < t) && std::isfinite(sw[usz(s)])
                              : t == -1 && std::bit_cast<std::uint32_t>(sw[usz(s)]) == 0;
      if (!ok) {
        os << "expert " << e << ": slot " << s << (is_kept ? " (kept)" : " (padding)") << " holds token " << t
           << " weight " << sw[usz(s)];
        return os.str();
      }
    }
    kept += n;
    demanded += demand[usz(e)];
  }
  if (exact_k > 0 && demanded != T * exact_k) return "demand " + std::to_string(demanded) + ", expected T·k";
  if (exact_k > 0 && C < 0 && kept != T * exact_k) return "a dropless plan dropped candidates";
  const auto to = p.token_offsets();
  const auto te = p.token_expert();
  const auto tw = p.token_weight();
  const auto ts = p.token_slot();
  if (to[0] != 0 || to[usz(T)] != p.num_assignments() || p.num_assignments() != kept)
    return "token_offsets do not span the " + std::to_string(kept) + " kept assignments";
  // Token CSR: ascending experts, each entry the slot of its expert that holds this token with this
  // weight. Experts are distinct per token, so no slot is listed twice; the totals match, so every kept
  // slot is listed once.
  for (index t = 0; t < T; ++t) {
    if (to[usz(t + 1)] < to[usz(t)] || to[usz(t + 1)] - to[usz(t)] > max_per_token)
      return "token " + std::to_string(t) + ": bad extent";
    for (index i = to[usz(t)]; i < to[usz(t + 1)]; ++i) {
      const id_type e = te[usz(i)], s = ts[usz(i)];
      const bool ok = e >= 0 && e < E && (i == to[usz(t)] || te[usz(i - 1)] < e) && s >= off[usz(e)] &&
                      s < off[usz(e)] + counts[usz(e)] && st[usz(s)] == t &&
                      std::bit_cast<std::uint32_t>(sw[usz(s)]) == std::bit_cast<std::uint32_t>(tw[usz(i)]);
      if (!ok) {
        os << "token " << t << ": assignment " << i << " (expert " << e << ", slot " << s << ")";
        return os.str();
      }
    }
  }
  return {};
}

// ---------------------------------------------------------------------------------------------------
// The brute-force reference: candidates, then the capacity cut, written from the contract alone

// Indices [0, n) of the k largest keys, ties to the lowest index (DESIGN §3), in ascending index order.
inline std::vector<id_type> brute_topk(const std::vector<float>& key, index k) {
  std::vector<id_type> order(key.size());
  std::iota(order.begin(), order.end(), id_type{0});
  std::stable_sort(order.begin(), order.end(), [&](id_type a, id_type b) { return key[usz(a)] > key[usz(b)]; });
  order.resize(usz(k));
  std::sort(order.begin(), order.end());
  return order;
}

// The plan of candidates c under lim: every expert keeps all its candidates, or (more than C) the top C
// by the drop policy (position: lowest tokens; score: priority descending, then token ascending, -0
// equal to +0 as floats compare; random: the seeded hash descending); kept tokens in ascending order,
// then padding (-1, 0) up to C when padded, rounded up to `align`; the token CSR in expert order.
inline rs::routing_plan reference_plan(const rs::candidate_set& c, const rs::capacity_limits& lim) {
  const index T = c.num_tokens, E = c.num_experts, C = lim.capacity, nnz = c.size();
  const rs::drop_policy drop = c.forced_drop.value_or(lim.drop);
  const std::vector<float>& priority = c.priority.empty() ? c.weight : c.priority;
  std::vector<id_type> token_of(usz(nnz));
  std::vector<std::vector<index>> of(usz(E));  // each expert's candidates, ascending token
  for (index t = 0; t < T; ++t)
    for (index i = c.offsets[usz(t)]; i < c.offsets[usz(t + 1)]; ++i) {
      token_of[usz(i)] = static_cast<id_type>(t);
      of[usz(c.expert[usz(i)])].push_back(i);
    }
  std::vector<char> keep(usz(nnz), 1);
  for (index e = 0; e < E; ++e) {
    std::vector<index> order = of[usz(e)];
    if (C < 0 || static_cast<index>(order.size()) <= C) continue;
    if (drop == rs::drop_policy::score)
      std::stable_sort(order.begin(), order.end(),
                       [&](index a, index b) { return priority[usz(a)] > priority[usz(b)]; });
    if (drop == rs::drop_policy::random)
      std::sort(order.begin(), order.end(), [&](index a, index b) {
        return rs::detail::random_priority(lim.seed, usz(token_of[usz(a)]), usz(e)) >
               rs::detail::random_priority(lim.seed, usz(token_of[usz(b)]), usz(e));
      });
    for (std::size_t j = usz(C); j < order.size(); ++j) keep[usz(order[j])] = 0;
  }
  rs::detail::plan_arrays d;
  std::vector<id_type> slot_of(usz(nnz), -1);
  d.expert_offsets.push_back(0);
  for (index e = 0; e < E; ++e) {
    id_type n = 0;
    for (index i : of[usz(e)]) {
      if (!keep[usz(i)]) continue;
      slot_of[usz(i)] = static_cast<id_type>(d.slot_token.size());
      d.slot_token.push_back(token_of[usz(i)]);
      d.slot_weight.push_back(c.weight[usz(i)]);
      ++n;
    }
    const index width = round_up(lim.pad_to_capacity && C >= 0 ? C : n, lim.align);
    for (index j = n; j < width; ++j) {
      d.slot_token.push_back(-1);
      d.slot_weight.push_back(0.0f);
    }
    d.expert_counts.push_back(n);
    d.expert_demand.push_back(c.demand.empty() ? static_cast<id_type>(of[usz(e)].size()) : c.demand[usz(e)]);
    d.expert_offsets.push_back(static_cast<id_type>(d.slot_token.size()));
  }
  d.token_offsets.push_back(0);
  for (index t = 0; t < T; ++t) {
    for (index i = c.offsets[usz(t)]; i < c.offsets[usz(t + 1)]; ++i) {
      if (!keep[usz(i)]) continue;
      d.token_expert.push_back(c.expert[usz(i)]);
      d.token_weight.push_back(c.weight[usz(i)]);
      d.token_slot.push_back(slot_of[usz(i)]);
    }
    d.token_offsets.push_back(static_cast<id_type>(d.token_expert.size()));
  }
  return rs::detail::host_plan(T, E, C, d);
}

// The candidates of a `reference` case, from the logits alone. Identity scores at temperature 1 make
// every weight, score and affinity priority the logit itself.
inline rs::candidate_set reference_candidates(const test_case& c) {
  const index T = c.T, E = c.E;
  rs::candidate_set out;
  out.num_tokens = T;
  out.num_experts = E;
  std::vector<std::vector<char>> chosen(usz(T), std::vector<char>(usz(E), 0));
  std::vector<float> row(usz(E));
  const auto logits_of = [&](index t) {
    for (index e = 0; e < E; ++e) row[usz(e)] = c.logit(t, e);
  };
  if (const auto* p = std::get_if<rt::expert_choice>(&c.direction); p && !p->causal) {
    // Each expert takes its top min(C, T) tokens by (logit descending, token ascending).
    const index C = std::min(expected_limits(c).capacity, T);
    std::vector<float> column(usz(T));
    for (index e = 0; e < E; ++e) {
      for (index t = 0; t < T; ++t) column[usz(t)] = c.logit(t, e);
      for (id_type t : brute_topk(column, C)) chosen[usz(t)][usz(e)] = 1;
    }
    out.demand.assign(usz(E), static_cast<id_type>(T));
  } else {
    // Each token proposes its top k (by logit + bias), or, for thresholds, every expert it reaches.
    const auto* ec = std::get_if<rt::expert_choice>(&c.direction);
    for (index t = 0; t < T; ++t) {
      logits_of(t);
      if (ec != nullptr && !ec->thresholds.empty()) {
        for (index e = 0; e < E; ++e) chosen[usz(t)][usz(e)] = row[usz(e)] >= c.thresholds[usz(e)];
        continue;
      }
      std::vector<float> key = row;
      if (!c.bias.empty())
        for (index e = 0; e < E; ++e) key[usz(e)] = row[usz(e)] + c.bias[usz(e)];
      for (id_type e : brute_topk(key, c.k)) chosen[usz(t)][usz(e)] = 1;
    }
    if (ec != nullptr) out.forced_drop = rs::drop_policy::position;
    if (const auto* b = std::get_if<rt::bidirectional>(&c.direction))
      out.forced_drop = b->causal ? rs::drop_policy::position : rs::drop_policy::score;
  }
  for (index t = 0; t < T; ++t) {
    for (index e = 0; e < E; ++e) {
      if (!chosen[usz(t)][usz(e)]) continue;
      out.expert.push_back(static_cast<id_type>(e));
      out.weight.push_back(c.logit(t, e));
    }
    out.offsets.push_back(static_cast<id_type>(out.expert.size()));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------
// The checks

struct tally {
  int cases = 0, routed = 0, errors = 0, with_drops = 0, padded = 0, referenced = 0;
  int directions[4] = {0, 0, 0, 0};
};

template <class Backend>
void check_case(const Backend& be, const std::string& name, const test_case& c, tally& n) {
  constexpr bool bitwise = std::is_same_v<rs::memory_space_t<Backend>, rs::host_space>;
  const double tolerance = bitwise ? 0.0 : weight_tolerance;
  std::string want_error, got_error;
  const std::optional<rs::routing_plan> want = route_case(rs::backend::serial{}, c, want_error);
  const std::optional<rs::routing_plan> got = route_case(be, c, got_error);
  ++n.cases;
  ++n.directions[c.direction.index()];
  // A fault must raise an error (else the error comparison below is vacuous), and nothing else may.
  if (c.fault != fault_kind::none) {
    CHECK_MESSAGE(!want.has_value(), c.text << ": serial routed despite the fault");
  } else {
    CHECK_MESSAGE(want.has_value(), c.text << ": serial threw \"" << want_error << "\"");
  }
  CHECK_MESSAGE(got_error == want_error,
                name << ", " << c.text << ": \"" << got_error << "\", serial: \"" << want_error << "\"");
  if (!want || !got) {
    n.errors += want ? 0 : 1;
    return;
  }
  ++n.routed;
  n.with_drops += want->num_dropped() > 0 ? 1 : 0;
  n.padded += want->num_slots() > want->num_assignments() ? 1 : 0;
  const std::string diff = plan_difference(*want, *got, tolerance);
  CHECK_MESSAGE(diff.empty(), name << ", " << c.text << ": " << diff << " (serial's first)");

  const bool per_expert = std::holds_alternative<rt::expert_choice>(c.direction);
  const std::string broken =
      contract_violation(*got, c.T, c.E, expected_limits(c), per_expert ? c.E : c.k, per_expert ? 0 : c.k);
  CHECK_MESSAGE(broken.empty(), name << ", " << c.text << ": plan contract: " << broken);
  if (c.reference) {
    ++n.referenced;
    const std::string ref =
        plan_difference(reference_plan(reference_candidates(c), expected_limits(c)), *got, tolerance);
    CHECK_MESSAGE(ref.empty(), name << ", " << c.text << ": brute force: " << ref << " (brute force first)");
  }
}

// Random candidate sets straight into build_plan: priorities with ties and ±0, a given demand, a forced
// drop policy, tokens with no candidate; against serial and the brute force. Invalid sets must raise
// serial's error.
template <class Backend>
void check_build_plan(const Backend& be, const std::string& name) {
  constexpr bool bitwise = std::is_same_v<rs::memory_space_t<Backend>, rs::host_space>;
  const double tolerance = bitwise ? 0.0 : weight_tolerance;
  std::mt19937_64 rng(conformance_seed - 1);
  int built = 0;
  for (const auto& [T, E, k] :
       {std::tuple<index, index, index>{0, 4, 2}, {1, 1, 1}, {300, 16, 3}, {2500, 3, 3}, {4100, 64, 4}}) {
    for (int variant = 0; variant < 5; ++variant) {
      rs::candidate_set c;
      c.num_tokens = T;
      c.num_experts = E;
      std::vector<id_type> experts(usz(E));
      std::iota(experts.begin(), experts.end(), id_type{0});
      for (index t = 0; t < T; ++t) {
        std::shuffle(experts.begin(), experts.end(), rng);
        std::vector<id_type> mine(experts.begin(), experts.begin() + uniform(rng, 0, k));  // 0 to k candidates
        std::sort(mine.begin(), mine.end());
        for (id_type e : mine) {
          c.expert.push_back(e);
          c.weight.push_back(pick(rng, {0.0f, -0.0f, 0.25f, 0.5f, -0.5f, 1.0f}));
          if (variant == 1) c.priority.push_back(pick(rng, {0.0f, -0.0f, 1.0f, -1.0f, 1e-30f}));
        }
        c.offsets.push_back(static_cast<id_type>(c.expert.size()));
      }
      if (variant == 2) {
        c.demand.assign(usz(E), 3);  // more than the candidates: dropped upstream
        for (id_type e : c.expert) ++c.demand[usz(e)];
      }
      if (variant == 3) c.forced_drop = pick(rng, {rs::drop_policy::position, rs::drop_policy::score});
      // variant 4: an invalid set (when there is a candidate to spoil).
      const bool invalid = variant == 4 && c.size() > 0;
      if (invalid) {
        const std::size_t i = usz(uniform(rng, 0, c.size() - 1));
        if (chance(rng, 0.5))
          c.weight[i] = std::numeric_limits<float>::quiet_NaN();
        else
          c.expert[i] = static_cast<id_type>(E);
      }
      for (const rs::capacity_limits& lim :
           {rs::capacity_limits{}, rs::capacity_limits{.capacity = 0, .pad_to_capacity = true},
            rs::capacity_limits{.capacity = 2, .drop = rs::drop_policy::score, .align = 3},
            rs::capacity_limits{.capacity = 5, .drop = rs::drop_policy::random, .align = 4, .seed = rng()},
            rs::capacity_limits{.capacity = 3, .drop = rs::drop_policy::position, .pad_to_capacity = true},
            rs::capacity_limits{.capacity = T / 4 + 1, .drop = rs::drop_policy::random, .seed = rng()},
            rs::capacity_limits{.capacity = 40, .pad_to_capacity = true, .align = 8}}) {
        const std::string what = name + ", build_plan T=" + std::to_string(T) + " E=" + std::to_string(E) +
                                 " variant " + std::to_string(variant) + " capacity " + std::to_string(lim.capacity) +
                                 " drop " + name_of(lim.drop) + (lim.pad_to_capacity ? " pad" : "") + " align " +
                                 std::to_string(lim.align);
        std::optional<rs::routing_plan> want, got;
        const std::string want_error = error_of([&] { want = rs::build_plan(rs::backend::serial{}, c, lim); });
        const std::string got_error = error_of([&] { got = rs::to_host(be, rs::build_plan(be, c, lim)); });
        CHECK_MESSAGE(got_error == want_error, what << ": \"" << got_error << "\", serial: \"" << want_error << "\"");
        CHECK_MESSAGE(want.has_value() != invalid, what << ": serial: \"" << want_error << "\"");
        if (!want || !got) continue;
        ++built;
        const std::string diff = plan_difference(*want, *got, tolerance);
        CHECK_MESSAGE(diff.empty(), what << ": " << diff << " (serial's first)");
        const std::string ref = plan_difference(reference_plan(c, lim), *got, tolerance);
        CHECK_MESSAGE(ref.empty(), what << ": brute force: " << ref << " (brute force first)");
      }
    }
  }
  CHECK(built >= 100);
}

// Stateful schedulers: a few steps of one router, the state carried from step to step, plans and
// states compared with serial's after every step.
template <class Backend>
void check_stateful(const Backend& be, const std::string& name) {
  constexpr bool bitwise = std::is_same_v<rs::memory_space_t<Backend>, rs::host_space>;
  const double tolerance = bitwise ? 0.0 : weight_tolerance;
  std::mt19937_64 rng(conformance_seed - 2);
  const auto run = [&](const std::string& what, const auto& router, const std::vector<std::vector<float>>& batches,
                       index cols) {
    using state_type = rs::capacity_state_t<typename std::decay_t<decltype(router)>::capacity_type>;
    state_type want_state{}, got_state{};
    for (std::size_t step = 0; step < batches.size(); ++step) {
      const std::vector<float>& x = batches[step];
      const rs::matrix_view<const float> view{x.data(), static_cast<index>(x.size()) / cols, cols};
      const std::string at = name + ", " + what + ", step " + std::to_string(step);
      std::optional<rs::routing_plan> want, got;
      const std::string want_error = error_of([&] { want = router.route(rs::backend::serial{}, view, want_state); });
      const std::string got_error = error_of([&] { got = rs::to_host(be, router.route(be, view, got_state)); });
      CHECK_MESSAGE(got_error == want_error, at << ": \"" << got_error << "\", serial: \"" << want_error << "\"");
      REQUIRE_MESSAGE(want.has_value(), at << ": serial threw \"" << want_error << "\"");
      if (!got) continue;
      CHECK_MESSAGE(got_state == want_state, at << ": the scheduler's state differs from serial's");
      const std::string diff = plan_difference(*want, *got, tolerance);
      CHECK_MESSAGE(diff.empty(), at << ": " << diff << " (serial's first)");
      CHECK_MESSAGE(want->num_assignments() > 0, at << ": serial's plan keeps nothing");
    }
  };
  const index E = 16, d = 64;
  std::vector<std::vector<float>> hidden;
  for (index T : {2500, 300, 2049}) hidden.push_back(normal_values(rng, T * d));
  const rt::token_choice tc{.top_k = 2};
  run("grap_cosine, token choice, adaptive",
      rs::router<ra::grap_cosine, rt::token_choice, cap::adaptive>{
          {.num_experts = E}, tc, {.max_step = 0.5, .warmup = 1}},  // step 0 at the ceiling, then the estimate
      hidden, d);
  run("grap_cosine, token choice, adaptive etr_bound pad",
      rs::router<ra::grap_cosine, rt::token_choice, cap::adaptive>{
          {.num_experts = E},
          tc,
          {.estimate = cap::capacity_estimate::etr_bound, .warmup = 1, .pad_to_capacity = true}},
      hidden, d);
  run("grap, token choice, schedule (fused)",
      rs::router<ra::grap, rt::token_choice, cap::schedule>{
          {.num_experts = E}, tc, {.start = 1.0, .end = 0.25, .steps = 2, .drop = rs::drop_policy::random, .seed = 5}},
      hidden, d);
  // Cosine-valued precomputed logits (quantised: ties) for lower_bound, which fixes C on the first step.
  std::vector<std::vector<float>> logits;
  for (index T : {2500, 700}) logits.push_back(grid_values(rng, T * E, 8, 0.1f));
  run("precomputed, bidirectional, lower_bound",
      rs::router<ra::precomputed, rt::bidirectional, cap::lower_bound>{
          {.cosines = true}, {.top_k = 2}, {.hidden_size = d}},
      logits, E);
}

}  // namespace conformance

// The whole suite on `be`, named `name` in every message.
template <class Backend>
void check_conformance(const Backend& be, const std::string& name) {
  using namespace conformance;
  tally n;
  const case_range range = soak_range();
  for (int id = range.first; id < range.first + range.count; ++id) check_case(be, name, make_case(id), n);
  // The draws must reach every kind of case (guards against a generator that silently stopped).
  const int cases = range.count;
  CHECK(n.cases == cases);
  CHECK(n.routed >= cases * 3 / 4);
  CHECK(n.errors >= cases / 20);
  CHECK(n.with_drops >= cases / 5);
  CHECK(n.padded >= cases / 10);
  CHECK(n.referenced >= cases / 10);
  for (int count : n.directions) CHECK(count >= cases / 10);
  check_build_plan(be, name);
  check_stateful(be, name);
}

}  // namespace resonance_test
