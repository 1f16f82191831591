// Load-balancing loss, z-loss and routing statistics against brute-force restatements in double and
// against closed forms derived by hand, and bitwise the same on every backend.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/resonance.hpp>

#include "backends.hpp"
#include "random_inputs.hpp"

namespace {

namespace rs = resonance;
namespace rt = resonance::routing;
using resonance_test::usz;

bool close_rel(double got, double want, double rel) { return std::fabs(got - want) <= rel * std::fabs(want) + 1e-300; }

// Megatron-Core's compute_routing_scores_for_aux_loss + switch_load_balancing_loss_func, coefficient 1,
// restated in double: full score distribution per token, a plain top-k over it (ties to the lower
// expert), P_e = mean score, f_e = count / (T·k), loss = E · Σ f_e · P_e.
double ref_switch_aux(rs::matrix_view<const float> l, rs::score fn, rs::index k) {
  const rs::index T = l.rows, E = l.cols;
  if (T == 0) return 0.0;
  std::vector<double> p(usz(E), 0.0), count(usz(E), 0.0), s(usz(E));
  for (rs::index t = 0; t < T; ++t) {
    double sum = 0.0;
    if (fn == rs::score::softmax) {
      double m = l(t, 0);
      for (rs::index e = 1; e < E; ++e) m = std::max(m, static_cast<double>(l(t, e)));
      for (rs::index e = 0; e < E; ++e) sum += s[usz(e)] = std::exp(l(t, e) - m);
      for (double& v : s) v /= sum;
    } else {
      for (rs::index e = 0; e < E; ++e) {
        const double z = l(t, e);
        s[usz(e)] = fn == rs::score::sigmoid ? 1.0 / (1.0 + std::exp(-z))
                                             : std::sqrt(std::max(z, 0.0) + std::log1p(std::exp(-std::fabs(z))));
        sum += s[usz(e)];
      }
      for (double& v : s) v /= sum + 1e-20;
    }
    std::vector<rs::index> ids(usz(E));
    std::iota(ids.begin(), ids.end(), rs::index{0});
    std::stable_sort(ids.begin(), ids.end(), [&](rs::index a, rs::index b) { return s[usz(a)] > s[usz(b)]; });
    for (rs::index j = 0; j < k; ++j) count[usz(ids[usz(j)])] += 1.0;
    for (rs::index e = 0; e < E; ++e) p[usz(e)] += s[usz(e)];
  }
  double loss = 0.0;
  for (rs::index e = 0; e < E; ++e)
    loss += count[usz(e)] / static_cast<double>(T * k) * (p[usz(e)] / static_cast<double>(T));
  return static_cast<double>(E) * loss;
}

TEST_CASE("test_loss: switch_aux_loss equals the Megatron restatement in double") {
  std::mt19937_64 rng(51);
  // Grid logits: exact ties (so the lowest-index rule decides many counts) and no near ties.
  for (rs::index E : {1, 4, 6, 16}) {
    for (rs::index T : {1, 50, 2500}) {
      for (rs::score fn : {rs::score::softmax, rs::score::sigmoid, rs::score::sqrt_softplus}) {
        for (rs::index k = 1; k <= std::min<rs::index>(E, 4); ++k) {
          const rs::index stride = E + (T % 2 == 0 ? 3 : 0);
          const std::vector<float> x = resonance_test::grid_values(rng, T * stride, 6, 0.25f);
          const rs::matrix_view<const float> l{x.data(), T, E, stride};
          CAPTURE(E);
          CAPTURE(T);
          CAPTURE(static_cast<int>(fn));
          CAPTURE(k);
          CHECK(close_rel(rs::loss::switch_aux_loss(rs::backend::serial{}, l, fn, k), ref_switch_aux(l, fn, k), 1e-5));
        }
      }
    }
  }
}

TEST_CASE("test_loss: switch_aux_loss closed forms") {
  // Uniform logits: s_te = 1/E; the top-k of every token is experts 0..k-1 (ties to the lowest), so
  // f_e = 1/k for e < k and 0 otherwise, P_e = 1/E, and loss = E · k · (1/k) · (1/E) = 1 for every k.
  for (rs::index E : {4, 8, 6, 5}) {
    for (rs::index k = 1; k <= E; ++k) {
      const rs::index T = 33;
      const std::vector<float> x(usz(T * E), 0.7f);
      const rs::matrix_view<const float> l{x.data(), T, E};
      CAPTURE(E);
      CAPTURE(k);
      // 1/E is exact in fp32 for a power of two; otherwise it is rounded once.
      const double tol = (E & (E - 1)) == 0 ? 1e-12 : 1e-6;
      CHECK(std::fabs(rs::loss::switch_aux_loss(rs::backend::serial{}, l, rs::score::softmax, k) - 1.0) <= tol);
      CHECK(std::fabs(rs::loss::switch_aux_loss(rs::backend::serial{}, l, rs::score::sigmoid, k) - 1.0) <= 1e-6);
      CHECK(std::fabs(rs::loss::switch_aux_loss(rs::backend::serial{}, l, rs::score::sqrt_softplus, k) - 1.0) <= 1e-6);
    }
  }
  // One dominant logit per token and k = 1: s is one-hot up to e^-30, so f_e = P_e = n_e / T and
  // loss = E · Σ (n_e / T)². All tokens on one expert: E. Round-robin over E experts: 1.
  const rs::index E = 8, T = 64;
  std::vector<float> one(usz(T * E), 0.0f), robin(usz(T * E), 0.0f), skew(usz(T * E), 0.0f);
  std::vector<double> n(usz(E), 0.0);
  for (rs::index t = 0; t < T; ++t) {
    one[usz(t * E + 3)] = 30.0f;
    robin[usz(t * E + t % E)] = 30.0f;
    const rs::index e = t % 3 == 0 ? 0 : t % 5;  // an uneven spread
    skew[usz(t * E + e)] = 30.0f;
    n[usz(e)] += 1.0;
  }
  double want_skew = 0.0;
  for (double c : n) want_skew += (c / T) * (c / T);
  want_skew *= E;
  const auto aux = [&](const std::vector<float>& v) {
    return rs::loss::switch_aux_loss(rs::backend::serial{}, rs::matrix_view<const float>{v.data(), T, E},
                                     rs::score::softmax, 1);
  };
  CHECK(std::fabs(aux(one) - 8.0) <= 1e-6);
  CHECK(std::fabs(aux(robin) - 1.0) <= 1e-6);
  CHECK(std::fabs(aux(skew) - want_skew) <= 1e-6);
  // No tokens: zero.
  CHECK(rs::loss::switch_aux_loss(rs::backend::serial{}, rs::matrix_view<const float>{nullptr, 0, E},
                                  rs::score::softmax, 2) == 0.0);
}

TEST_CASE("test_loss: z_loss equals mean logsumexp squared in double") {
  std::mt19937_64 rng(52);
  for (rs::index E : {1, 3, 16}) {
    for (rs::index T : {1, 10, 5000}) {
      const rs::index stride = E + 2;
      const std::vector<float> x = resonance_test::normal_values(rng, T * stride, 4.0);
      const rs::matrix_view<const float> l{x.data(), T, E, stride};
      double want = 0.0;
      for (rs::index t = 0; t < T; ++t) {
        double m = l(t, 0), sum = 0.0;
        for (rs::index e = 1; e < E; ++e) m = std::max(m, static_cast<double>(l(t, e)));
        for (rs::index e = 0; e < E; ++e) sum += std::exp(l(t, e) - m);
        want += (m + std::log(sum)) * (m + std::log(sum));
      }
      want /= static_cast<double>(T);
      CAPTURE(E);
      CAPTURE(T);
      CHECK(close_rel(rs::loss::z_loss(rs::backend::serial{}, l), want, 1e-5));
    }
  }
  // Closed form: all-zero logits give logsumexp = log E for every token.
  const std::vector<float> zeros(usz(7 * 8), 0.0f);
  CHECK(close_rel(rs::loss::z_loss(rs::backend::serial{}, rs::matrix_view<const float>{zeros.data(), 7, 8}),
                  std::log(8.0) * std::log(8.0), 1e-6));
  CHECK(rs::loss::z_loss(rs::backend::serial{}, rs::matrix_view<const float>{nullptr, 0, 8}) == 0.0);
}

TEST_CASE("test_loss: switch_aux_loss and z_loss are bitwise the same on every backend") {
  std::mt19937_64 rng(54);
  const rs::index T = 5000, E = 16, stride = 19;  // 5 chunks of 1024 tokens
  const std::vector<float> x = resonance_test::grid_values(rng, T * stride, 8, 0.125f);
  const rs::matrix_view<const float> l{x.data(), T, E, stride};
  const auto bits = [](double v) {
    std::uint64_t u = 0;
    std::memcpy(&u, &v, sizeof u);
    return u;
  };
  const auto all = [&](const auto& be) {
    std::vector<std::uint64_t> out;
    for (rs::score fn : {rs::score::softmax, rs::score::sigmoid, rs::score::sqrt_softplus})
      for (rs::index k : {1, 2, 5}) out.push_back(bits(rs::loss::switch_aux_loss(be, l, fn, k)));
    out.push_back(bits(rs::loss::z_loss(be, l)));
    return out;
  };
  const std::vector<std::uint64_t> want = all(rs::backend::serial{});
  resonance_test::for_each_backend_and_scrambled([&](const auto& be, const std::string& name) {
    CAPTURE(name);
    CHECK(all(be) == want);
  });
}

// ---------------------------------------------------------------------------------------------------
// routing statistics

struct ref_stats {
  double drop_rate = 0, padding_fraction = 0, mean = 0, max = 0, cv = 0, max_over_mean = 0;
  rs::index kept = 0, slots = 0;
};

// From the slot array and the closed-form demand T·k of token choice.
ref_stats brute_stats(const rs::routing_plan& p, rs::index demanded) {
  ref_stats r;
  const rs::index E = p.num_experts();
  std::vector<double> load(usz(E), 0.0);
  const auto off = p.expert_offsets();
  const auto st = p.slot_token();
  rs::index padding = 0;
  for (rs::index e = 0; e < E; ++e) {
    for (rs::index s = off[usz(e)]; s < off[usz(e + 1)]; ++s) {
      if (st[usz(s)] >= 0) {
        load[usz(e)] += 1.0;
        ++r.kept;
      } else {
        ++padding;
      }
    }
  }
  r.slots = static_cast<rs::index>(st.size());
  r.drop_rate = demanded > 0 ? static_cast<double>(demanded - r.kept) / static_cast<double>(demanded) : 0.0;
  r.padding_fraction = r.slots > 0 ? static_cast<double>(padding) / static_cast<double>(r.slots) : 0.0;
  r.mean = std::accumulate(load.begin(), load.end(), 0.0) / static_cast<double>(E);
  r.max = *std::max_element(load.begin(), load.end());
  double var = 0.0;
  for (double c : load) var += (c - r.mean) * (c - r.mean);
  var /= static_cast<double>(E);
  r.cv = r.mean > 0 ? std::sqrt(var) / r.mean : 0.0;
  r.max_over_mean = r.mean > 0 ? r.max / r.mean : 0.0;
  return r;
}

template <class Capacity>
void check_stats(std::mt19937_64& rng, rs::index T, rs::index E, rs::index k, const Capacity& cap,
                 rs::index want_capacity) {
  CAPTURE(T);
  CAPTURE(E);
  CAPTURE(k);
  // Skewed logits (a per-expert offset) so that loads differ and drops happen.
  std::vector<float> x = resonance_test::normal_values(rng, T * E, 1.0);
  for (rs::index t = 0; t < T; ++t)
    for (rs::index e = 0; e < E; ++e) x[usz(t * E + e)] += 0.3f * static_cast<float>(e);
  const rs::routing_plan plan =
      rs::router<rs::affinity::precomputed, rt::token_choice, Capacity>{{}, {.top_k = k}, cap}.route(
          rs::matrix_view<const float>{x.data(), T, E});
  const rs::balance::routing_stats got = rs::balance::compute_stats(plan);
  const ref_stats want = brute_stats(plan, T * k);
  CHECK(got.capacity == want_capacity);
  CHECK(got.demanded == T * k);
  CHECK(got.kept == want.kept);
  CHECK(got.dropped == T * k - want.kept);
  CHECK(got.slots == want.slots);
  CHECK(close_rel(got.drop_rate, want.drop_rate, 1e-12));
  CHECK(close_rel(got.padding_fraction, want.padding_fraction, 1e-12));
  CHECK(close_rel(got.mean_load, want.mean, 1e-12));
  CHECK(got.max_load == want.max);
  CHECK(close_rel(got.load_cv, want.cv, 1e-12));
  CHECK(close_rel(got.max_over_mean, want.max_over_mean, 1e-12));
}

TEST_CASE("test_stats: compute_stats equals brute force on random plans") {
  std::mt19937_64 rng(53);
  namespace cap = rs::capacity;
  // C = max(ceil(T·k/E · cf), min_capacity), written out by hand for each case.
  check_stats(rng, 100, 8, 2, cap::dropless{}, -1);
  check_stats(rng, 100, 8, 2, cap::dropless{.align = 16}, -1);
  check_stats(rng, 100, 8, 2, cap::factor{.factor = 1.0}, 25);
  check_stats(rng, 100, 8, 2, cap::factor{.factor = 0.5, .pad_to_capacity = true}, 13);
  check_stats(rng, 97, 6, 3, cap::factor{.factor = 1.1, .drop = rs::drop_policy::position, .align = 8}, 54);
  check_stats(rng, 10, 8, 1,
              cap::factor{.factor = 0.3, .drop = rs::drop_policy::random, .min_capacity = 4, .pad_to_capacity = true},
              4);
  check_stats(rng, 1, 4, 4, cap::factor{.factor = 1.0}, 1);
}

TEST_CASE("test_stats: compute_stats closed forms") {
  // Four tokens all on expert 0 of 4: loads {4,0,0,0}: mean 1, population std sqrt(3), max/mean 4.
  rs::candidate_set c;
  c.num_tokens = 4;
  c.num_experts = 4;
  c.offsets = {0, 1, 2, 3, 4};
  c.expert = {0, 0, 0, 0};
  c.weight = {1.0f, 1.0f, 1.0f, 1.0f};
  const rs::routing_plan all = rs::build_plan(rs::backend::serial{}, c, rs::capacity_limits{});
  rs::balance::routing_stats s = rs::balance::compute_stats(all);
  CHECK(s.capacity == -1);
  CHECK(s.drop_rate == 0.0);
  CHECK(s.padding_fraction == 0.0);
  CHECK(s.mean_load == 1.0);
  CHECK(s.max_load == 4.0);
  CHECK(close_rel(s.load_cv, std::sqrt(3.0), 1e-15));
  CHECK(s.max_over_mean == 4.0);

  // Capacity 2, padded: 2 of 4 kept (drop 1/2), 8 slots of which 6 padding; loads {2,0,0,0} again have
  // cv sqrt(3) (scale invariant) and max/mean 4.
  const rs::routing_plan capped =
      rs::build_plan(rs::backend::serial{}, c,
                     rs::capacity_limits{.capacity = 2, .drop = rs::drop_policy::position, .pad_to_capacity = true});
  s = rs::balance::compute_stats(capped);
  CHECK(s.capacity == 2);
  CHECK(s.demanded == 4);
  CHECK(s.kept == 2);
  CHECK(s.dropped == 2);
  CHECK(s.slots == 8);
  CHECK(s.drop_rate == 0.5);
  CHECK(s.padding_fraction == 0.75);
  CHECK(close_rel(s.load_cv, std::sqrt(3.0), 1e-15));
  CHECK(s.max_over_mean == 4.0);

  // Perfect balance: cv 0, max/mean 1.
  c.expert = {0, 1, 2, 3};
  s = rs::balance::compute_stats(rs::build_plan(rs::backend::serial{}, c, rs::capacity_limits{}));
  CHECK(s.load_cv == 0.0);
  CHECK(s.max_over_mean == 1.0);

  // No tokens: every ratio is 0, never NaN.
  const rs::routing_plan empty = rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::factor>{
      {}, {.top_k = 2}, {}}.route(rs::matrix_view<const float>{nullptr, 0, 4});
  s = rs::balance::compute_stats(empty);
  CHECK(s.demanded == 0);
  CHECK(s.slots == 0);
  CHECK(s.drop_rate == 0.0);
  CHECK(s.padding_fraction == 0.0);
  CHECK(s.mean_load == 0.0);
  CHECK(s.load_cv == 0.0);
  CHECK(s.max_over_mean == 0.0);
}

TEST_CASE("test_stats: compute_stats is the same on every backend and for a view") {
  std::mt19937_64 rng(55);
  const rs::index T = 3000, E = 12, k = 2;
  std::vector<float> x = resonance_test::normal_values(rng, T * E, 1.0);
  for (rs::index t = 0; t < T; ++t)
    for (rs::index e = 0; e < E; ++e) x[usz(t * E + e)] += 0.2f * static_cast<float>(e);
  const rs::routing_plan plan = rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::factor>{
      {},
      {.top_k = k},
      {.factor = 0.9,
       .pad_to_capacity = true}}.route(rs::matrix_view<const float>{x.data(), T, E});
  const rs::balance::routing_stats want = rs::balance::compute_stats(plan);
  REQUIRE(want.dropped > 0);
  const auto same = [&](const rs::balance::routing_stats& got) {
    // Every field, the doubles bit for bit.
    CHECK(got.capacity == want.capacity);
    CHECK(got.demanded == want.demanded);
    CHECK(got.kept == want.kept);
    CHECK(got.dropped == want.dropped);
    CHECK(got.slots == want.slots);
    for (const auto field : {&rs::balance::routing_stats::drop_rate, &rs::balance::routing_stats::padding_fraction,
                             &rs::balance::routing_stats::mean_load, &rs::balance::routing_stats::max_load,
                             &rs::balance::routing_stats::load_cv, &rs::balance::routing_stats::max_over_mean})
      CHECK(std::memcmp(&(got.*field), &(want.*field), sizeof(double)) == 0);
    CHECK(got.expert_demand == want.expert_demand);
    CHECK(got.expert_kept == want.expert_kept);
  };
  same(rs::balance::compute_stats(plan.view()));
  resonance_test::for_each_backend_and_scrambled([&](const auto& be, const std::string& name) {
    CAPTURE(name);
    same(rs::balance::compute_stats(be, plan));
    same(rs::balance::compute_stats(be, plan.view()));
  });
}

}  // namespace
