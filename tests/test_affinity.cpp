// Affinity policies against brute force: precomputed double input against its fp32 conversion, and
// the Eigen linear gate against X·Wᵀ + b summed in double, over strides and block-boundary row counts.

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/affinity/linear.hpp>
#include <resonance/resonance.hpp>

#include "random_inputs.hpp"

namespace {

namespace rs = resonance;
namespace rt = resonance::routing;
using resonance_test::usz;

template <class Capacity = rs::capacity::dropless>
using precomputed_router = rs::router<rs::affinity::precomputed, rt::token_choice, Capacity>;

// ---------------------------------------------------------------------------------------------------
// precomputed

TEST_CASE("test_affinity: precomputed double input routes as its fp32 conversion") {
  std::mt19937_64 rng(41);
  const rs::index T = 300, E = 16, gap = 3;
  // Doubles that are not representable in fp32, so the conversion really rounds.
  // The gap columns hold 1e300, which would become an (invalid) fp32 Inf if they were ever read.
  std::vector<double> xd = resonance_test::strided_normal<double>(rng, T, E, E + gap, 1e300);
  std::vector<float> xf(usz(T * E));
  for (rs::index t = 0; t < T; ++t) {
    for (rs::index e = 0; e < E; ++e) {
      xd[usz(t * (E + gap) + e)] *= 3.0;
      xf[usz(t * E + e)] = static_cast<float>(xd[usz(t * (E + gap) + e)]);
    }
  }
  const rs::matrix_view<const double> dv{xd.data(), T, E, E + gap};
  const rs::matrix_view<const float> fv{xf.data(), T, E};

  const std::vector<rt::token_choice> directions{
      {.top_k = 2},
      {.top_k = 4, .score = rs::score::sigmoid, .num_groups = 4, .group_topk = 2},
      {.top_k = 1, .pre_softmax = true, .temperature = 0.7f},
      {.top_k = 3, .score = rs::score::sqrt_softplus, .scaling_factor = 2.5f},
  };
  for (const rt::token_choice& dir : directions) {
    CAPTURE(dir.top_k);
    const precomputed_router<> dropless{{}, dir, {}};
    CHECK(dropless.route(dv) == dropless.route(fv));
    const precomputed_router<rs::capacity::factor> capped{{}, dir, {.factor = 0.8}};
    CHECK(capped.route(dv) == capped.route(fv));
  }

  // The fp32 logits are the elementwise conversion.
  std::vector<float> storage;
  const precomputed_router<> r{};
  const rs::matrix_view<const float> l = r.logits(rs::backend::serial{}, dv, storage);
  REQUIRE(l.rows == T);
  REQUIRE(l.cols == E);
  bool same = true;
  for (rs::index t = 0; t < T; ++t)
    for (rs::index e = 0; e < E; ++e) same = same && l(t, e) == static_cast<float>(dv(t, e));
  CHECK(same);
  // A float input is routed as is: the logits are a view of the caller's data, not a copy.
  CHECK(r.logits(rs::backend::serial{}, fv, storage).data == xf.data());
}

// ---------------------------------------------------------------------------------------------------
// linear

// X·Wᵀ + b in double, and Σ|x·w| + |b| per entry: the scale that bounds a GEMM's rounding error.
struct dense_logits {
  std::vector<double> value, scale;
};

template <class S>
dense_logits brute_linear(rs::matrix_view<const S> x, rs::matrix_view<const S> w, const std::vector<S>* bias) {
  dense_logits out;
  out.value.assign(usz(x.rows * w.rows), 0.0);
  out.scale.assign(usz(x.rows * w.rows), 0.0);
  for (rs::index t = 0; t < x.rows; ++t) {
    for (rs::index e = 0; e < w.rows; ++e) {
      double v = 0.0, s = 0.0;
      for (rs::index c = 0; c < x.cols; ++c) {
        const double p = static_cast<double>(x(t, c)) * static_cast<double>(w(e, c));
        v += p;
        s += std::fabs(p);
      }
      if (bias) {
        v += static_cast<double>((*bias)[usz(e)]);
        s += std::fabs(static_cast<double>((*bias)[usz(e)]));
      }
      out.value[usz(t * w.rows + e)] = v;
      out.scale[usz(t * w.rows + e)] = s;
    }
  }
  return out;
}

template <class S>
void check_linear(rs::index T, rs::index d, rs::index E, rs::index x_gap, rs::index w_gap, bool with_bias,
                  std::mt19937_64& rng) {
  CAPTURE(T);
  CAPTURE(d);
  CAPTURE(x_gap);
  CAPTURE(w_gap);
  CAPTURE(with_bias);
  const std::vector<S> x = resonance_test::strided_normal<S>(rng, T, d, d + x_gap, S(1e30));
  const std::vector<S> w = resonance_test::strided_normal<S>(rng, E, d, d + w_gap, S(1e30));
  const std::vector<S> b = resonance_test::normal_values<S>(rng, E, 2.0);
  const rs::matrix_view<const S> xv{x.data(), T, d, d + x_gap};
  const rs::matrix_view<const S> wv{w.data(), E, d, d + w_gap};
  rs::affinity::basic_linear<S> gate{.weight = wv};
  if (with_bias) gate.bias = {b.data(), E};
  const rs::router<rs::affinity::basic_linear<S>, rt::token_choice, rs::capacity::dropless> r{gate, {.top_k = 2}, {}};
  std::vector<float> storage;
  const rs::matrix_view<const float> l = r.logits(rs::backend::serial{}, xv, storage);
  REQUIRE(l.rows == T);
  REQUIRE(l.cols == E);
  const dense_logits want = brute_linear(xv, wv, with_bias ? &b : nullptr);
  // fp32 GEMM: error within a small multiple of eps·d·scale; double GEMM: the final fp32 rounding.
  const double rel_scale = std::is_same_v<S, float> ? 1e-5 : 1e-12;
  int bad = 0;
  for (rs::index t = 0; t < T; ++t) {
    for (rs::index e = 0; e < E; ++e) {
      const double got = l(t, e), ref = want.value[usz(t * E + e)];
      const double tol = rel_scale * want.scale[usz(t * E + e)] + 1.2e-7 * std::fabs(ref) + 1e-30;
      if (!(std::fabs(got - ref) <= tol) && bad++ < 5)
        FAIL_CHECK("logit (" << t << ", " << e << "): " << got << " vs " << ref);
    }
  }
  CHECK(bad == 0);
}

TEST_CASE("test_affinity: linear logits equal X·Wᵀ + b in double across block boundaries and strides") {
  std::mt19937_64 rng(42);
  for (rs::index T : {0, 1, 255, 256, 257, 600}) {
    check_linear<float>(T, 48, 8, 0, 0, false, rng);
    check_linear<float>(T, 48, 8, 0, 0, true, rng);
    check_linear<float>(T, 33, 6, 3, 5, true, rng);
  }
  check_linear<float>(300, 7, 64, 2, 0, true, rng);
}

TEST_CASE("test_affinity: basic_linear<double> with double input") {
  std::mt19937_64 rng(43);
  for (rs::index T : {1, 257, 600}) {
    check_linear<double>(T, 40, 8, 0, 0, true, rng);
    check_linear<double>(T, 40, 8, 4, 1, false, rng);
  }
}

TEST_CASE("test_affinity: linear with zero hidden size gives the bias") {
  const std::vector<float> b{0.5f, -1.0f, 2.0f};
  const rs::affinity::linear gate{.weight = {nullptr, 3, 0}, .bias = {b.data(), 3}};
  const rs::router<rs::affinity::linear, rt::token_choice, rs::capacity::dropless> r{gate, {}, {}};
  std::vector<float> storage;
  const rs::matrix_view<const float> l =
      r.logits(rs::backend::serial{}, rs::matrix_view<const float>{nullptr, 4, 0}, storage);
  REQUIRE(l.rows == 4);
  REQUIRE(l.cols == 3);
  for (rs::index t = 0; t < 4; ++t)
    for (rs::index e = 0; e < 3; ++e) CHECK(l(t, e) == b[usz(e)]);
}

// X whose exact logits (double) have every adjacent pair of a row at least `gap` apart, so that fp32
// rounding of the GEMM cannot change any selection.
void separated_inputs(std::mt19937_64& rng, rs::index T, rs::index d, rs::index E, const std::vector<float>& w,
                      const std::vector<float>& b, std::vector<float>& x, std::vector<float>& exact, double gap) {
  x.assign(usz(T * d), 0.0f);
  exact.assign(usz(T * E), 0.0f);
  std::normal_distribution<double> dist(0.0, 1.0);
  for (rs::index t = 0; t < T; ++t) {
    for (int attempt = 0;; ++attempt) {
      REQUIRE(attempt < 100);
      for (rs::index c = 0; c < d; ++c) x[usz(t * d + c)] = static_cast<float>(dist(rng));
      std::vector<double> row(usz(E));
      for (rs::index e = 0; e < E; ++e) {
        double v = b[usz(e)];
        for (rs::index c = 0; c < d; ++c) v += static_cast<double>(x[usz(t * d + c)]) * w[usz(e * d + c)];
        row[usz(e)] = v;
        exact[usz(t * E + e)] = static_cast<float>(v);
      }
      std::sort(row.begin(), row.end());
      bool ok = true;
      for (rs::index e = 1; e < E; ++e) ok = ok && row[usz(e)] - row[usz(e - 1)] >= gap;
      if (ok) break;
    }
  }
}

template <class Capacity>
void check_linear_route(const rt::token_choice& dir, const Capacity& cap, std::mt19937_64& rng) {
  const rs::index T = 400, d = 32, E = 8;
  const std::vector<float> w = resonance_test::normal_values(rng, E * d, 1.0);
  const std::vector<float> b = resonance_test::normal_values(rng, E, 1.0);
  std::vector<float> x, exact;
  separated_inputs(rng, T, d, E, w, b, x, exact, 1e-2);
  const rs::affinity::linear gate{.weight = {w.data(), E, d}, .bias = {b.data(), E}};
  const rs::routing_plan via_linear =
      rs::router<rs::affinity::linear, rt::token_choice, Capacity>{gate, dir, cap}.route(
          rs::matrix_view<const float>{x.data(), T, d});
  const rs::routing_plan via_logits =
      rs::router<rs::affinity::precomputed, rt::token_choice, Capacity>{{}, dir, cap}.route(
          rs::matrix_view<const float>{exact.data(), T, E});
  // Same selection and slots exactly; weights within fp32 GEMM rounding.
  CHECK(via_linear.capacity() == via_logits.capacity());
  CHECK(std::ranges::equal(via_linear.expert_offsets(), via_logits.expert_offsets()));
  CHECK(std::ranges::equal(via_linear.expert_demand(), via_logits.expert_demand()));
  CHECK(std::ranges::equal(via_linear.slot_token(), via_logits.slot_token()));
  CHECK(std::ranges::equal(via_linear.token_offsets(), via_logits.token_offsets()));
  CHECK(std::ranges::equal(via_linear.token_expert(), via_logits.token_expert()));
  CHECK(std::ranges::equal(via_linear.token_slot(), via_logits.token_slot()));
  const auto wl = via_linear.token_weight(), wp = via_logits.token_weight();
  REQUIRE(wl.size() == wp.size());
  double worst = 0.0;
  for (std::size_t i = 0; i < wl.size(); ++i) worst = std::max(worst, std::fabs(double{wl[i]} - double{wp[i]}));
  CHECK(worst <= 1e-5);
}

TEST_CASE("test_affinity: routing through linear equals routing its exact logits when well separated") {
  std::mt19937_64 rng(44);
  check_linear_route(rt::token_choice{.top_k = 2}, rs::capacity::dropless{}, rng);
  check_linear_route(rt::token_choice{.top_k = 1, .pre_softmax = true}, rs::capacity::dropless{.align = 4}, rng);
  check_linear_route(rt::token_choice{.top_k = 3, .score = rs::score::sigmoid},
                     rs::capacity::factor{.factor = 1.0, .drop = rs::drop_policy::position}, rng);
  check_linear_route(
      rt::token_choice{.top_k = 2, .num_groups = 4, .group_topk = 2, .group_scoring = rt::group_score::max},
      rs::capacity::factor{.factor = 0.5, .drop = rs::drop_policy::random, .pad_to_capacity = true}, rng);
}

}  // namespace
