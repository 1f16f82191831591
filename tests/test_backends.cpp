// The simd and tbb backends against independent references: the vectorised row primitives (top-k,
// scores, exp) against brute force and against detail::scalar_rows; whole plans, dispatch and combine
// bitwise across backends and thread counts; the error paths; and runtime SIMD dispatch, whose AVX2
// side is tests/simd_avx2.cpp (built with -mavx2 when the compiler and the target allow it).

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/affinity/linear.hpp>
#include <resonance/resonance.hpp>

#include "backends.hpp"
#include "error_of.hpp"
#include "random_inputs.hpp"
#include "reference.hpp"

#if RESONANCE_TEST_AVX2_TU
namespace resonance_test {
// Defined in tests/simd_avx2.cpp (compiled with -mavx2; a signature that drifts from it fails to link).
// Call them only when the CPU has AVX2.
// A token-choice router with precomputed logits, on simd<avx2>.
resonance::routing_plan route_avx2(resonance::backend::simd<xsimd::avx2> be, const resonance::routing::token_choice& p,
                                   const resonance::capacity::factor& capacity,
                                   resonance::matrix_view<const float> logits);
// simd_rows<avx2>'s primitives; exp_avx2 takes n a multiple of 8.
bool all_finite_avx2(const float* x, resonance::index n);
bool topk_avx2(const float* x, resonance::index n, resonance::index k, float scale, const float* bias, float* vals,
               resonance::id_type* ids);
void score_avx2(resonance::score fn, const float* in, float* out, resonance::index n, float scale);
void exp_avx2(const float* x, float* out, resonance::index n);
// simd_rows<avx2>::group_sums_squares (squares) or group_sums (returns 0), and grap / grap_cosine with
// E experts on simd<avx2>.
double group_sums_avx2(const float* row, resonance::index E, resonance::index g, double* s, bool squares);
void grap_forward_avx2(resonance::index E, resonance::matrix_view<const float> x, resonance::matrix_view<float> logits);
void grap_cosine_forward_avx2(resonance::index E, resonance::matrix_view<const float> x,
                              resonance::matrix_view<float> logits);
void grap_cosine_backward_avx2(resonance::index E, resonance::matrix_view<const float> x,
                               resonance::matrix_view<const float> dlogits, resonance::matrix_view<float> dx);
}  // namespace resonance_test
#endif

namespace {

namespace rs = resonance;
namespace rt = resonance::routing;
namespace ra = resonance::affinity;
namespace cap = resonance::capacity;
using resonance_test::usz;

constexpr float inf = std::numeric_limits<float>::infinity();
constexpr float qnan = std::numeric_limits<float>::quiet_NaN();

using scalar_rows = rs::detail::scalar_rows;
#if RESONANCE_HAS_SIMD
using vector_rows = rs::detail::simd_rows<xsimd::default_arch>;
constexpr rs::index lanes = vector_rows::width;
#else
constexpr rs::index lanes = 4;  // only shapes the test rows; nothing vectorised is called
#endif

#if RESONANCE_TEST_AVX2_TU
// simd_rows<xsimd::avx2> (8 lanes), reached through tests/simd_avx2.cpp; only on a CPU with AVX2.
struct avx2_rows {
  static bool all_finite(const float* x, rs::index n) { return resonance_test::all_finite_avx2(x, n); }
  static bool topk(const float* x, rs::index n, rs::index k, float scale, const float* bias, float* vals,
                   rs::id_type* ids) {
    return resonance_test::topk_avx2(x, n, k, scale, bias, vals, ids);
  }
  static void score(rs::score fn, const float* in, float* out, rs::index n, float scale) {
    resonance_test::score_avx2(fn, in, out, n, scale);
  }
};

bool cpu_has_avx2() { return xsimd::available_architectures().avx2 != 0; }
#endif

std::uint32_t bits(float x) { return std::bit_cast<std::uint32_t>(x); }

template <class T>
std::string show(const T& v) {
  std::ostringstream os;
  os.precision(9);
  os << v;
  return os.str();
}

rs::index isize(const auto& v) { return static_cast<rs::index>(v.size()); }

// ---------------------------------------------------------------------------------------------------
// Row top-k against brute force

// The contract's selection: key(i) = x[i] * scale (+ bias[i]) in fp32, indices ranked by (key
// descending, index ascending), the first k.
struct topk_ref {
  std::vector<float> vals;
  std::vector<rs::id_type> ids;
};

topk_ref brute_topk(const std::vector<float>& x, rs::index k, float scale, const float* bias) {
  const rs::index n = isize(x);
  std::vector<float> key(usz(n));
  for (rs::index i = 0; i < n; ++i) {
    const float scaled = x[usz(i)] * scale;
    key[usz(i)] = bias != nullptr ? scaled + bias[i] : scaled;
  }
  std::vector<rs::id_type> order(usz(n));
  std::iota(order.begin(), order.end(), rs::id_type{0});
  std::sort(order.begin(), order.end(), [&](rs::id_type a, rs::id_type b) {
    return key[usz(a)] > key[usz(b)] || (key[usz(a)] == key[usz(b)] && a < b);
  });
  topk_ref out;
  for (rs::index j = 0; j < k; ++j) {
    out.ids.push_back(order[usz(j)]);
    out.vals.push_back(key[usz(order[usz(j)])]);
  }
  return out;
}

// The first difference between Rows::topk and the brute force (ids, and keys bit for bit), or "".
template <class Rows>
std::string topk_difference(const std::vector<float>& x, rs::index k, float scale, const float* bias) {
  const topk_ref want = brute_topk(x, k, scale, bias);
  std::vector<float> vals(usz(k), -1.0f);
  std::vector<rs::id_type> ids(usz(k), -1);
  if (!Rows::topk(x.data(), isize(x), k, scale, bias, vals.data(), ids.data())) return "returned false on a finite row";
  for (rs::index j = 0; j < k; ++j) {
    const std::size_t u = usz(j);
    if (ids[u] != want.ids[u] || bits(vals[u]) != bits(want.vals[u]))
      return "rank " + show(j) + ": id " + show(ids[u]) + " key " + show(vals[u]) + ", expected id " +
             show(want.ids[u]) + " key " + show(want.vals[u]);
  }
  return {};
}

// Row patterns: every kind of tie the selection must break by the lower index.
enum class row_kind { normal, quantised, signed_zeros, constant, ascending, descending, huge };
constexpr row_kind row_kinds[] = {row_kind::normal,    row_kind::quantised,  row_kind::signed_zeros, row_kind::constant,
                                  row_kind::ascending, row_kind::descending, row_kind::huge};

std::string kind_name(row_kind kind) {
  switch (kind) {
    case row_kind::normal:
      return "normal";
    case row_kind::quantised:
      return "quantised";
    case row_kind::signed_zeros:
      return "signed zeros";
    case row_kind::constant:
      return "constant";
    case row_kind::ascending:
      return "ascending";
    case row_kind::descending:
      return "descending";
    default:
      return "huge";
  }
}

std::vector<float> random_row(std::mt19937_64& rng, rs::index n, row_kind kind) {
  std::vector<float> v(usz(n));
  switch (kind) {
    case row_kind::normal:
      return resonance_test::normal_values(rng, n, 2.0);
    case row_kind::quantised:  // five levels: exact ties everywhere, at the k-th place too
      return resonance_test::grid_values(rng, n, 2, 0.5f);
    case row_kind::signed_zeros:  // +0 and -0 compare equal, so they tie
      return resonance_test::draw_from(rng, n, {0.0f, -0.0f, 0.0f, -0.0f, 1.0f, -1.0f});
    case row_kind::constant:  // every entry passes any bound: the most candidates a filter can meet
      std::fill(v.begin(), v.end(), 0.25f);
      return v;
    case row_kind::ascending:  // the top k at the end, in the tail when n is not a multiple of the width
      for (rs::index i = 0; i < n; ++i) v[usz(i)] = static_cast<float>(i) * 0.125f;
      return v;
    case row_kind::descending:
      for (rs::index i = 0; i < n; ++i) v[usz(i)] = -static_cast<float>(i) * 0.125f;
      return v;
    default:  // finite values whose keys overflow to ±Inf once scaled by 2 (ties between infinities)
      return resonance_test::draw_from(rng, n, {3e38f, -3e38f, 1e38f, 0.0f});
  }
}

// Checks one row on scalar_rows and on simd_rows<default_arch>.
void check_topk_row(const std::vector<float>& x, rs::index k, float scale, const std::vector<float>& bias,
                    row_kind kind) {
  const float* b = bias.empty() ? nullptr : bias.data();
  CAPTURE(x.size());
  CAPTURE(k);
  CAPTURE(scale);
  CAPTURE(bias.size());
  CAPTURE(kind_name(kind));
  const std::string s = topk_difference<scalar_rows>(x, k, scale, b);
  CHECK_MESSAGE(s.empty(), "scalar_rows: " << s);
#if RESONANCE_HAS_SIMD
  const std::string v = topk_difference<vector_rows>(x, k, scale, b);
  CHECK_MESSAGE(v.empty(), "simd_rows<default_arch>: " << v);
#endif
#if RESONANCE_TEST_AVX2_TU
  if (cpu_has_avx2()) {
    const std::string a = topk_difference<avx2_rows>(x, k, scale, b);
    CHECK_MESSAGE(a.empty(), "simd_rows<avx2>: " << a);
  }
#endif
}

TEST_CASE("test_backends: row top-k equals brute force for lengths 1 to 300, k up to 20, scales, biases, ties") {
  std::mt19937_64 rng(20240601);
  const float scales[] = {0.5f, 1.0f / 0.7f, 2.0f, 3.0f};
  int rows = 0;
  for (rs::index n = 1; n <= 300; ++n) {
    for (int rep = 0; rep < 10; ++rep) {
      const row_kind kind = row_kinds[usz((n + rep) % 7)];
      const rs::index k = std::uniform_int_distribution<rs::index>(1, std::min<rs::index>(n, 20))(rng);
      const float scale = rep % 2 == 0 ? 1.0f : scales[rng() % 4];
      std::vector<float> bias;
      if (rep % 3 == 1) bias = resonance_test::grid_values(rng, n, 4, 0.25f);  // ties between x and bias
      if (rep % 3 == 2) bias = resonance_test::normal_values(rng, n, 0.5);
      check_topk_row(random_row(rng, n, kind), k, scale, bias, kind);
      ++rows;
    }
  }
  // Every k around the vector width's multiples and the switch to the scalar scan above k = 16.
  for (rs::index n : {16, 17, 20, 31, 32, 33, 64, 67, 255, 256, 300}) {
    for (rs::index k = 1; k <= std::min<rs::index>(n, 20); ++k) {
      for (row_kind kind : row_kinds) {
        check_topk_row(random_row(rng, n, kind), k, 1.0f, {}, kind);
        check_topk_row(random_row(rng, n, kind), k, 2.0f, resonance_test::grid_values(rng, n, 4, 0.25f), kind);
        rows += 2;
      }
    }
  }
  CHECK(rows >= 4000);
}

TEST_CASE("test_backends: row top-k and all_finite reject NaN and ±Inf at the first, a middle and the last entry") {
  std::mt19937_64 rng(77);
  std::vector<rs::index> lengths(70);
  std::iota(lengths.begin(), lengths.end(), rs::index{1});
  for (rs::index n : {127, 128, 129, 300}) lengths.push_back(n);
  for (rs::index n : lengths) {
    const std::vector<float> base = resonance_test::normal_values(rng, n, 2.0);
    const std::vector<float> bias = resonance_test::normal_values(rng, n, 0.5);
    CHECK(scalar_rows::all_finite(base.data(), n));
#if RESONANCE_HAS_SIMD
    CHECK(vector_rows::all_finite(base.data(), n));
#endif
#if RESONANCE_TEST_AVX2_TU
    const bool avx2 = cpu_has_avx2();
    if (avx2) CHECK(avx2_rows::all_finite(base.data(), n));
#endif
    // First, middle, last (the tail when n is not a multiple of the width) and the body's last lane
    // for 4 and 8 lanes.
    std::vector<rs::index> positions = {0, n / 2, n - 1};
    for (rs::index w : {lanes, rs::index{8}})
      if (n / w > 0) positions.push_back(n / w * w - 1);
    for (float bad : {qnan, inf, -inf}) {
      for (rs::index pos : positions) {
        std::vector<float> x = base;
        x[usz(pos)] = bad;
        CAPTURE(n);
        CAPTURE(pos);
        CAPTURE(bad);
        CHECK_FALSE(scalar_rows::all_finite(x.data(), n));
#if RESONANCE_HAS_SIMD
        CHECK_FALSE(vector_rows::all_finite(x.data(), n));
#endif
#if RESONANCE_TEST_AVX2_TU
        if (avx2) CHECK_FALSE(avx2_rows::all_finite(x.data(), n));
#endif
        for (rs::index k : {rs::index{1}, std::min<rs::index>(n, 4), std::min<rs::index>(n, 17)}) {
          for (const float* b : {static_cast<const float*>(nullptr), bias.data()}) {
            for (float scale : {1.0f, 0.5f}) {
              std::vector<float> vals(usz(k));
              std::vector<rs::id_type> ids(usz(k));
              CAPTURE(k);
              CAPTURE(scale);
              CHECK_FALSE(scalar_rows::topk(x.data(), n, k, scale, b, vals.data(), ids.data()));
#if RESONANCE_HAS_SIMD
              CHECK_FALSE(vector_rows::topk(x.data(), n, k, scale, b, vals.data(), ids.data()));
#endif
#if RESONANCE_TEST_AVX2_TU
              if (avx2) CHECK_FALSE(avx2_rows::topk(x.data(), n, k, scale, b, vals.data(), ids.data()));
#endif
            }
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Scores and exp

constexpr rs::score score_functions[] = {rs::score::softmax, rs::score::sigmoid, rs::score::sqrt_softplus,
                                         rs::score::identity};

std::string score_name(rs::score fn) {
  switch (fn) {
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

// The score of the fp32 row scale * in (scaled in fp32, as the contract scales), evaluated in double.
std::vector<double> reference_scores(rs::score fn, const std::vector<float>& in, float scale) {
  const std::size_t n = in.size();
  std::vector<double> z(n), out(n);
  for (std::size_t i = 0; i < n; ++i) z[i] = static_cast<double>(in[i] * scale);
  if (fn == rs::score::softmax) {
    const double m = *std::max_element(z.begin(), z.end());
    double sum = 0.0;
    for (std::size_t i = 0; i < n; ++i) sum += out[i] = std::exp(z[i] - m);
    for (double& v : out) v /= sum;
    return out;
  }
  for (std::size_t i = 0; i < n; ++i) {
    if (fn == rs::score::sigmoid) out[i] = 1.0 / (1.0 + std::exp(-z[i]));
    if (fn == rs::score::sqrt_softplus) out[i] = std::sqrt(std::log1p(std::exp(z[i])));
    if (fn == rs::score::identity) out[i] = z[i];
  }
  return out;
}

// The vectorised scores of x, bit for bit against scalar_rows' `want`.
void check_vector_scores([[maybe_unused]] rs::score fn, const std::vector<float>& x, [[maybe_unused]] float scale,
                         const std::vector<float>& want) {
  [[maybe_unused]] const rs::index n = isize(x);
  [[maybe_unused]] const auto same = [&](const std::vector<float>& got) {
    return std::memcmp(got.data(), want.data(), want.size() * sizeof(float)) == 0;
  };
#if RESONANCE_HAS_SIMD
  std::vector<float> got(usz(n), -1.0f);
  vector_rows::score(fn, x.data(), got.data(), n, scale);
  CHECK_MESSAGE(same(got), "simd_rows<default_arch>");
#endif
#if RESONANCE_TEST_AVX2_TU
  if (cpu_has_avx2()) {
    std::fill(got.begin(), got.end(), -1.0f);
    avx2_rows::score(fn, x.data(), got.data(), n, scale);
    CHECK_MESSAGE(same(got), "simd_rows<avx2>");
  }
#endif
}

TEST_CASE("test_backends: simd row scores equal scalar_rows bitwise and a double reference within 1e-6") {
  std::mt19937_64 rng(5);
  std::vector<rs::index> lengths(70);
  std::iota(lengths.begin(), lengths.end(), rs::index{1});
  for (rs::index n : {127, 128, 129, 1000, 4099}) lengths.push_back(n);
  for (rs::score fn : score_functions) {
    for (rs::index n : lengths) {
      for (float scale : {1.0f, 0.5f, 1.25f}) {
        CAPTURE(score_name(fn));
        CAPTURE(n);
        CAPTURE(scale);
        const std::vector<float> x = resonance_test::normal_values(rng, n, 1.5);
        std::vector<float> scalar(usz(n), qnan);
        scalar_rows::score(fn, x.data(), scalar.data(), n, scale);
        // 1e-6 covers the few roundings of a short row; a softmax over n entries adds the error
        // bound of its 16 partial sums of n/16 terms each.
        const double tol = 1e-6 + (fn == rs::score::softmax ? std::ldexp(static_cast<double>(n) / 16.0, -24) : 0.0);
        const std::vector<double> want = reference_scores(fn, x, scale);
        double worst = 0.0;
        for (rs::index i = 0; i < n; ++i) {
          const double got = scalar[usz(i)], w = want[usz(i)];
          worst = std::max(worst, std::fabs(got - w) / std::max(std::fabs(w), 1e-300));
        }
        CHECK_MESSAGE(worst <= tol, "relative error " << worst);
        check_vector_scores(fn, x, scale, scalar);

        // Wide rows reach exp's cut-offs (underflow to 0, saturated sigmoids): bitwise only.
        const std::vector<float> wide = resonance_test::normal_values(rng, n, 60.0);
        scalar_rows::score(fn, wide.data(), scalar.data(), n, scale);
        check_vector_scores(fn, wide, scale, scalar);
      }
    }
  }
}

// Values for exp: a dense sweep of [-90, 90] (past both cut-offs), and runs of consecutive floats
// around 0, ±1 and the ends of [-87, 88].
std::vector<float> exp_inputs() {
  std::vector<float> x;
  constexpr int steps = 1 << 21;
  for (int i = 0; i <= steps; ++i) x.push_back(static_cast<float>(-90.0 + 180.0 * i / steps));
  for (float centre : {0.0f, 1.0f, -1.0f, -87.0f, 88.0f}) {
    float up = centre, down = centre;
    for (int i = 0; i < 20000; ++i) {
      up = std::nextafter(up, inf);
      down = std::nextafter(down, -inf);
      x.push_back(up);
      x.push_back(down);
    }
  }
  return x;
}

std::vector<float> exp_special_inputs() {
  using c = rs::detail::exp_constants;
  const float max = std::numeric_limits<float>::max(), tiny = std::numeric_limits<float>::denorm_min();
  return {qnan,
          -qnan,
          inf,
          -inf,
          0.0f,
          -0.0f,
          100.0f,
          -100.0f,
          max,
          -max,
          tiny,
          -tiny,
          c::lo,
          c::hi,
          std::nextafter(c::lo, inf),
          std::nextafter(c::lo, -inf),
          std::nextafter(c::hi, inf),
          std::nextafter(c::hi, -inf),
          88.7f,
          -87.3f,
          88.75f,
          -87.35f,
          1e-30f,
          -1e-30f,
          std::bit_cast<float>(0x7fc12345u)};  // a NaN with a payload
}

TEST_CASE("test_backends: exp_portable is within 2^-22 of exp over [-87, 88] and exact at the special values") {
  namespace d = rs::detail;
  double worst = 0.0;
  float worst_at = 0.0f;
  for (float x : exp_inputs()) {
    if (x < -87.0f || x > 88.0f) continue;
    const double want = std::exp(static_cast<double>(x));
    const double err = std::fabs(static_cast<double>(d::exp_portable(x)) - want) / want;
    if (err > worst) {
      worst = err;
      worst_at = x;
    }
  }
  CAPTURE(worst_at);
  CHECK(worst < std::ldexp(1.0, -22));
  CHECK(std::isnan(d::exp_portable(qnan)));
  CHECK(d::exp_portable(-inf) == 0.0f);
  CHECK(d::exp_portable(-100.0f) == 0.0f);
  CHECK(d::exp_portable(inf) == inf);
  CHECK(d::exp_portable(100.0f) == inf);
  CHECK(d::exp_portable(0.0f) == 1.0f);
  CHECK(d::exp_portable(-0.0f) == 1.0f);
}

TEST_CASE("test_backends: exp_portable in double is within 2 ulp of exp (long double reference), subnormals too") {
  namespace d = rs::detail;
  std::mt19937_64 rng(99);
  std::uniform_real_distribution<double> wide(-745.0, 709.7), narrow(-1.0, 1.0);
  std::vector<double> xs = {0.0,    -0.0,   1.0,    -1.0,   0.5,    -0.34657359027997264, 0.34657359027997264, 709.78,
                            -708.4, -720.0, -744.9, 1e-300, -1e-300};
  for (int i = 0; i < 20000; ++i) xs.push_back(i % 2 == 0 ? wide(rng) : narrow(rng));
  double worst = 0.0, worst_at = 0.0;
  for (const double x : xs) {
    const long double want = std::exp(static_cast<long double>(x));
    const double got = d::exp_portable(x);
    // Error in units of the last place of the double nearest to want (the smallest subnormal's below).
    const double ulp = std::max(
        std::nextafter(static_cast<double>(want), std::numeric_limits<double>::infinity()) - static_cast<double>(want),
        std::numeric_limits<double>::denorm_min());
    const double err = static_cast<double>(std::fabs(static_cast<long double>(got) - want) / ulp);
    if (err > worst) {
      worst = err;
      worst_at = x;
    }
  }
  CAPTURE(worst_at);
  CHECK(worst <= 2.0);
  CHECK(std::isnan(d::exp_portable(std::numeric_limits<double>::quiet_NaN())));
  CHECK(d::exp_portable(-std::numeric_limits<double>::infinity()) == 0.0);
  CHECK(d::exp_portable(-800.0) == 0.0);
  CHECK(d::exp_portable(710.0) == std::numeric_limits<double>::infinity());
  CHECK(d::exp_portable(0.0) == 1.0);
  CHECK(d::exp_portable(-0.0) == 1.0);
}

TEST_CASE("test_backends: log1p_portable is within 3 ulp of log1p for y >= 0, and exact at the special values") {
  namespace d = rs::detail;
  // y over every binade from the subnormals to 2^100 (16 values each, random mantissas), the values
  // softplus hands it (exp of x in [-87, 20]), and the neighbours of 1 and of sqrt(2) - 1 (m's switch).
  std::vector<float> ys = {0.0f, 1.0f, 2.0f, 0.41421354f, 0.41421357f, 1.0f - 1e-7f, 1.0f + 1e-7f, 1e-8f, 6e-8f};
  std::mt19937 rng(3);
  for (int e = -149; e <= 100; ++e)
    for (int j = 0; j < 16; ++j)
      ys.push_back(std::ldexp(1.0f + std::uniform_real_distribution<float>(0.0f, 1.0f)(rng), e));
  for (float x = -87.0f; x <= 20.0f; x += 0.01171875f) ys.push_back(d::exp_portable(x));
  double worst = 0.0;
  float worst_at = 0.0f;
  for (float y : ys) {
    if (!std::isfinite(y) || y < 0.0f) continue;
    const double want = std::log1p(static_cast<double>(y));
    const float got = d::log1p_portable(y);
    // Error in units of the last place of the float nearest to the true value.
    const float nearest = static_cast<float>(want);
    const double ulp = nearest == 0.0f ? std::numeric_limits<float>::denorm_min()
                                       : std::nextafter(nearest, std::numeric_limits<float>::infinity()) - nearest;
    const double err = std::fabs(static_cast<double>(got) - want) / ulp;
    if (err > worst) {
      worst = err;
      worst_at = y;
    }
  }
  CAPTURE(worst_at);
  CHECK(worst <= 3.0);
  CHECK(d::log1p_portable(0.0f) == 0.0f);
  CHECK(d::log1p_portable(inf) == inf);
  CHECK(std::isnan(d::log1p_portable(qnan)));
  CHECK(d::log1p_portable(1e-30f) == 1e-30f);  // 1 + y rounds to 1: y itself
}

#if RESONANCE_HAS_SIMD
// The first lane where a vector exp differs from exp_portable bit for bit, or "".
std::string exp_difference(const std::vector<float>& x, const std::vector<float>& got) {
  std::size_t mismatches = 0, first = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    if (bits(got[i]) != bits(rs::detail::exp_portable(x[i])) && mismatches++ == 0) first = i;
  }
  if (mismatches == 0) return {};
  return show(mismatches) + " lanes differ, the first at x = " + show(x[first]) + ": " + show(got[first]) + " vs " +
         show(rs::detail::exp_portable(x[first]));
}

TEST_CASE("test_backends: the vector exp equals exp_portable lane by lane, special values included") {
  std::vector<float> x = exp_inputs();
  const std::vector<float> special = exp_special_inputs();
  // The special values at every lane position of 4 and of 8 lanes; the length a multiple of both.
  for (rs::index shift = 0; shift < 8; ++shift) {
    for (rs::index i = 0; i < shift; ++i) x.push_back(1.5f);
    x.insert(x.end(), special.begin(), special.end());
  }
  while (x.size() % 16 != 0) x.push_back(0.5f);
  std::vector<float> got(x.size(), -1.0f);
  for (std::size_t i = 0; i < x.size(); i += usz(lanes))
    vector_rows::exp(vector_rows::batch::load_unaligned(x.data() + i)).store_unaligned(got.data() + i);
  const std::string diff = exp_difference(x, got);
  CHECK_MESSAGE(diff.empty(), "simd_rows<default_arch>::exp: " << diff);
#if RESONANCE_TEST_AVX2_TU
  if (cpu_has_avx2()) {
    std::fill(got.begin(), got.end(), -1.0f);
    resonance_test::exp_avx2(x.data(), got.data(), isize(x));
    const std::string wide = exp_difference(x, got);
    CHECK_MESSAGE(wide.empty(), "simd_rows<avx2>::exp: " << wide);
  }
#endif
}
#endif

// ---------------------------------------------------------------------------------------------------
// Plans across backends and thread counts

using resonance_test::for_each_parallel_backend;
using resonance_test::plan_difference;

// route(backend) on serial, the reference, and on every other backend: the plans must be bitwise
// equal. Returns serial's plan.
template <class Route>
rs::routing_plan check_backends_agree(const std::string& what, const Route& route) {
  rs::routing_plan want = route(rs::backend::serial{});
  for_each_parallel_backend([&](const auto& be, const std::string& name) {
    const std::string diff = plan_difference(want, route(be));
    CHECK_MESSAGE(diff.empty(), what << " on " << name << ": " << diff << " differs from serial's");
  });
  return want;
}

template <class Affinity, class Direction, class Capacity, class In>
void check_router(const std::string& what, const rs::router<Affinity, Direction, Capacity>& r,
                  rs::matrix_view<const In> x) {
  const rs::routing_plan serial = check_backends_agree(what, [&](const auto& be) { return r.route(be, x); });
  // Guards against a vacuous comparison of empty plans.
  CHECK_MESSAGE(serial.num_assignments() > 0, what << ": the serial plan keeps nothing");
}

template <class Direction, class Capacity>
rs::router<ra::precomputed, Direction, Capacity> precomputed_router(const Direction& d, const Capacity& c) {
  return {{}, d, c};
}

// Token counts across the plan builder's 2048-token blocks and the selection's 512-token blocks.
struct shape {
  rs::index T, E, k;
};
constexpr shape shapes[] = {{1, 1, 1}, {7, 3, 2}, {2049, 8, 2}, {5000, 64, 8}, {2049, 256, 8}};

std::string describe(const std::string& name, const shape& s, bool ties) {
  return name + " T=" + std::to_string(s.T) + " E=" + std::to_string(s.E) + " k=" + std::to_string(s.k) +
         (ties ? " (quantised logits)" : "");
}

// Normal logits (ties improbable), or quantised to five levels (ties everywhere, at the k-th key too).
std::vector<float> plan_logits(std::mt19937_64& rng, rs::index T, rs::index E, bool ties) {
  return ties ? resonance_test::grid_values(rng, T * E, 2, 0.5f) : resonance_test::normal_values(rng, T * E, 2.0);
}

struct named_token_choice {
  std::string name;
  rt::token_choice policy;
};

// Every token-choice option, valid for E experts and top-k; `bias` holds E entries.
std::vector<named_token_choice> token_choice_variants(rs::index E, rs::index k, const std::vector<float>& bias) {
  using rs::score;
  const rs::vector_view<const float> b{bias.data(), E};
  std::vector<named_token_choice> v = {
      {"softmax", {.top_k = k}},
      {"softmax temperature 0.7 scaling 2.5", {.top_k = k, .temperature = 0.7f, .scaling_factor = 2.5f}},
      {"pre_softmax", {.top_k = k, .pre_softmax = true}},
      {"pre_softmax temperature 1.3 bias", {.top_k = k, .pre_softmax = true, .temperature = 1.3f, .expert_bias = b}},
      {"sigmoid temperature 1.3", {.top_k = k, .score = score::sigmoid, .temperature = 1.3f}},
      {"sigmoid bias scaling 2.5", {.top_k = k, .score = score::sigmoid, .scaling_factor = 2.5f, .expert_bias = b}},
      {"sqrt_softplus renormalised", {.top_k = k, .score = score::sqrt_softplus, .renorm = rt::renormalize::always}},
      {"identity", {.top_k = k, .score = score::identity}},
      {"softmax bias", {.top_k = k, .expert_bias = b}},
  };
  const rs::index groups = 4, kept = k >= 2 ? 2 : 1;
  if (E % groups == 0 && k <= kept * (E / groups)) {
    v.push_back({"groups top_m_sum", {.top_k = k, .num_groups = groups, .group_topk = kept}});
    v.push_back({"sigmoid bias groups top2_sum",
                 {.top_k = k,
                  .score = score::sigmoid,
                  .expert_bias = b,
                  .num_groups = groups,
                  .group_topk = kept,
                  .group_scoring = rt::group_score::top2_sum}});
    v.push_back({"softmax temperature 0.7 groups max",
                 {.top_k = k,
                  .temperature = 0.7f,
                  .num_groups = groups,
                  .group_topk = kept,
                  .group_scoring = rt::group_score::max}});
  }
  return v;
}

TEST_CASE("test_backends: token choice plans are bitwise identical on every backend and thread count") {
  std::mt19937_64 rng(11);
  for (const shape& s : shapes) {
    for (bool ties : {false, true}) {
      const std::vector<float> x = plan_logits(rng, s.T, s.E, ties);
      const std::vector<float> bias = resonance_test::grid_values(rng, s.E, 8, 0.125f);
      const rs::matrix_view<const float> view{x.data(), s.T, s.E};
      for (const named_token_choice& v : token_choice_variants(s.E, s.k, bias))
        check_router(describe(v.name, s, ties), precomputed_router(v.policy, cap::factor{.factor = 1.0}), view);
    }
  }
}

TEST_CASE("test_backends: every capacity policy gives identical plans on every backend") {
  std::mt19937_64 rng(12);
  for (const shape& s : shapes) {
    for (bool ties : {false, true}) {
      const std::vector<float> x = plan_logits(rng, s.T, s.E, ties);
      const std::vector<float> bias = resonance_test::grid_values(rng, s.E, 8, 0.125f);
      const rs::matrix_view<const float> view{x.data(), s.T, s.E};
      const rt::token_choice directions[] = {
          {.top_k = s.k},
          {.top_k = s.k, .score = rs::score::sigmoid, .expert_bias = {bias.data(), s.E}},
      };
      for (const rt::token_choice& p : directions) {
        const std::string name = p.score == rs::score::softmax ? "softmax, " : "sigmoid bias, ";
        const auto check = [&](const std::string& capacity_name, const auto& capacity) {
          check_router(describe(name + capacity_name, s, ties), precomputed_router(p, capacity), view);
        };
        check("factor 1 drop score", cap::factor{.factor = 1.0});
        check("factor 0.5 drop position pad",
              cap::factor{.factor = 0.5, .drop = rs::drop_policy::position, .pad_to_capacity = true});
        check("factor 0.75 drop random align 8",
              cap::factor{.factor = 0.75, .drop = rs::drop_policy::random, .align = 8, .seed = 7});
        check("factor 1.25 min_capacity 3 pad align 4",
              cap::factor{.factor = 1.25, .min_capacity = 3, .pad_to_capacity = true, .align = 4});
        check("factor 0.3 min_capacity 2 drop score",
              cap::factor{.factor = 0.3, .drop = rs::drop_policy::score, .min_capacity = 2});
        check("dropless", cap::dropless{});
        check("dropless align 4", cap::dropless{.align = 4});
      }
    }
  }
}

TEST_CASE("test_backends: expert choice, bidirectional and sinkhorn plans are identical on every backend") {
  std::mt19937_64 rng(13);
  for (const shape& s : shapes) {
    for (bool ties : {false, true}) {
      const std::vector<float> x = plan_logits(rng, s.T, s.E, ties);
      const std::vector<float> bias = resonance_test::grid_values(rng, s.E, 8, 0.125f);
      const rs::matrix_view<const float> view{x.data(), s.T, s.E};
      const auto check = [&](const std::string& name, const auto& direction, const auto& capacity) {
        check_router(describe(name, s, ties), precomputed_router(direction, capacity), view);
      };
      const cap::factor factor1{.factor = 1.0};
      check("expert choice softmax", rt::expert_choice{.top_k = s.k}, factor1);
      check("expert choice sigmoid temperature 0.8 pad",
            rt::expert_choice{.top_k = s.k, .score = rs::score::sigmoid, .temperature = 0.8f},
            cap::factor{.factor = 2.0, .pad_to_capacity = true});
      check("causal expert choice dropless", rt::expert_choice{.top_k = s.k, .causal = true}, cap::dropless{});
      const rs::index C = factor1.capacity(s.T, s.E, s.k);
      const rt::expert_choice with_thresholds{.top_k = s.k, .causal = true};
      const std::vector<float> thresholds = rt::expert_choice_thresholds(with_thresholds, view, C);
      rt::expert_choice thresholded = with_thresholds;
      thresholded.thresholds = {thresholds.data(), s.E};
      check("causal expert choice thresholds", thresholded, factor1);

      check("bidirectional rank affinity", rt::bidirectional{.top_k = s.k}, cap::factor{.factor = 0.75});
      check("bidirectional rank score",
            rt::bidirectional{.top_k = s.k, .score = rs::score::sigmoid, .rank = rt::rank_by::score}, factor1);
      check("bidirectional rank weight bias",
            rt::bidirectional{.top_k = s.k, .expert_bias = {bias.data(), s.E}, .rank = rt::rank_by::weight},
            cap::factor{.factor = 0.5});
      check("causal bidirectional", rt::bidirectional{.top_k = s.k, .causal = true}, cap::factor{.factor = 0.5});

      // Sinkhorn iterates over the whole T×E matrix: the largest shapes only with few iterations.
      const rs::index iterations = s.T * s.E > 200000 ? 5 : 100;
      check("sinkhorn top-1", rt::sinkhorn{.top_k = 1, .max_iterations = iterations}, factor1);
      check("sinkhorn top-k dropless", rt::sinkhorn{.top_k = s.k, .max_iterations = iterations}, cap::dropless{});
    }
  }
}

TEST_CASE("test_backends: grap, grap_cosine, cosine, linear and double input give identical plans") {
  std::mt19937_64 rng(14);
  for (const shape& s : {shape{7, 3, 2}, shape{2049, 8, 2}, shape{2049, 64, 8}}) {
    const rs::index d = 4 * s.E;  // GrAP needs d to be a multiple of E
    const std::vector<float> x = resonance_test::normal_values(rng, s.T * d);
    const std::vector<float> w = resonance_test::normal_values(rng, s.E * d);
    const std::vector<float> b = resonance_test::normal_values(rng, s.E, 0.1);
    const rs::matrix_view<const float> xv{x.data(), s.T, d};
    const rs::matrix_view<const float> wv{w.data(), s.E, d};
    const rt::token_choice tc{.top_k = s.k};
    const cap::factor factor1{.factor = 1.0};
    const auto check = [&](const std::string& name, const auto& affinity, const auto& direction) {
      using router_type = rs::router<std::decay_t<decltype(affinity)>, std::decay_t<decltype(direction)>, cap::factor>;
      check_router(describe(name, s, false), router_type{affinity, direction, factor1}, xv);
    };
    check("grap", ra::grap{.num_experts = s.E}, tc);
    check("grap_cosine bidirectional", ra::grap_cosine{.num_experts = s.E}, rt::bidirectional{.top_k = s.k});
    check("cosine temperature 0.1", ra::cosine{.weight = wv, .temperature = 0.1f}, tc);
    check("linear with bias", ra::linear{.weight = wv, .bias = {b.data(), s.E}}, tc);
    check("linear sigmoid", ra::linear{.weight = wv}, rt::token_choice{.top_k = s.k, .score = rs::score::sigmoid});

    const std::vector<double> logits = resonance_test::normal_values<double>(rng, s.T * s.E, 2.0);
    check_router(describe("precomputed double input", s, false), precomputed_router(tc, factor1),
                 rs::matrix_view<const double>{logits.data(), s.T, s.E});
  }
}

// ---------------------------------------------------------------------------------------------------
// GrAP group sums: the fixed 16-lane order on every backend, and grap / grap_cosine bitwise across them

// Rows whose sums and norms reach every path: cancellation (the order decides the last bits), values
// near the type's overflow and underflow (double ones send grap_cosine to its rescaling pass), signed
// zeros, and NaN or ±Inf at a random place.
enum class grap_row { normal, cancelling, huge, tiny, zeros, with_nan, with_inf };
constexpr grap_row grap_rows[] = {grap_row::normal, grap_row::cancelling, grap_row::huge,    grap_row::tiny,
                                  grap_row::zeros,  grap_row::with_nan,   grap_row::with_inf};

std::string grap_row_name(grap_row kind) {
  switch (kind) {
    case grap_row::normal:
      return "normal";
    case grap_row::cancelling:
      return "cancelling";
    case grap_row::huge:
      return "huge";
    case grap_row::tiny:
      return "tiny";
    case grap_row::zeros:
      return "signed zeros";
    case grap_row::with_nan:
      return "NaN";
    default:
      return "Inf";
  }
}

template <class T>
std::vector<T> grap_row_values(std::mt19937_64& rng, rs::index n, grap_row kind) {
  constexpr bool is_float = std::is_same_v<T, float>;
  std::vector<T> v = resonance_test::normal_values<T>(rng, n);
  std::uniform_int_distribution<rs::index> at(0, n - 1);
  std::uniform_int_distribution<int> exponent(-12, 12);
  switch (kind) {
    case grap_row::cancelling:  // magnitudes 2^-12 .. 2^12 of both signs
      for (T& x : v) x = std::ldexp(x, exponent(rng));
      break;
    case grap_row::huge:  // sums (and, for double, squares) beyond the type's range
      for (T& x : v) x *= is_float ? T(1e37f) : T(1e300);
      break;
    case grap_row::tiny:  // subnormal floats; doubles whose squares underflow
      for (T& x : v) x *= is_float ? T(1e-42f) : T(1e-170);
      break;
    case grap_row::zeros:
      for (rs::index i = 0; i < n; ++i) v[usz(i)] = i % 3 == 0 ? T(0) : -T(0);
      break;
    case grap_row::with_nan:
      v[usz(at(rng))] = std::numeric_limits<T>::quiet_NaN();
      break;
    case grap_row::with_inf:
      v[usz(at(rng))] = std::numeric_limits<T>::infinity();
      if (n > 1) v[usz(at(rng))] = -std::numeric_limits<T>::infinity();
      break;
    default:
      break;
  }
  return v;
}

// Bitwise equal, or both NaN (a NaN's payload is not part of the contract).
template <class T>
bool same_bits(T a, T b) {
  return (a != a && b != b) || std::memcmp(&a, &b, sizeof(T)) == 0;
}

// The documented order written out from its description (rows.hpp), independently of
// detail::lane_group_sums: entry i of a group to partial i mod 16, each group's partials combined by
// the halving tree, squares by the same offset across the row's groups and combined once.
template <class T>
double documented_group_sums(const T* row, rs::index E, rs::index g, double* s) {
  using partials = std::array<double, 16>;
  const auto tree = [](partials p) {
    for (std::size_t w = 8; w >= 1; w /= 2)
      for (std::size_t j = 0; j < w; ++j) p[j] = p[j] + p[j + w];
    return p[0];
  };
  partials sq{};
  for (rs::index e = 0; e < E; ++e) {
    partials p{};
    for (rs::index i = 0; i < g; ++i) {
      const double v = static_cast<double>(row[e * g + i]);
      p[usz(i % 16)] += v;
      const double q = v * v;
      sq[usz(i % 16)] += q;
    }
    s[e] = tree(p);
  }
  return tree(sq);
}

// (E, g) pairs: g below, at and around multiples of 16 (the vector path's condition), g = 1, E = 1.
constexpr std::pair<rs::index, rs::index> group_shapes[] = {
    {1, 1}, {1, 16}, {3, 1}, {6, 2}, {7, 5}, {4, 8}, {4, 15}, {5, 16}, {2, 17}, {64, 16}, {8, 64}, {3, 100}, {1, 1024}};

// One row on every row-primitive implementation: group_sums_squares and group_sums equal the
// documented order bitwise; finite rows are within 1e-12·Σ|x| of a long double sum (the squares
// within 1e-12 relative while they stay normal doubles).
template <class T>
void check_group_sums_row(const std::vector<T>& x, rs::index E, rs::index g) {
  std::vector<double> want(usz(E)), got(usz(E));
  const double want_ss = documented_group_sums(x.data(), E, g, want.data());
  const auto sums_equal = [&] {
    for (rs::index e = 0; e < E; ++e)
      if (!same_bits(got[usz(e)], want[usz(e)])) return false;
    return true;
  };
  const auto check_rows = [&](const std::string& name, const auto& sums_squares, const auto& sums) {
    std::fill(got.begin(), got.end(), -1.0);
    const double ss = sums_squares(got.data());
    CHECK_MESSAGE((sums_equal() && same_bits(ss, want_ss)), name << "::group_sums_squares");
    std::fill(got.begin(), got.end(), -1.0);
    sums(got.data());
    CHECK_MESSAGE(sums_equal(), name << "::group_sums");
  };
  check_rows(
      "scalar_rows", [&](double* s) { return scalar_rows::group_sums_squares(x.data(), E, g, s); },
      [&](double* s) { scalar_rows::group_sums(x.data(), E, g, s); });
#if RESONANCE_HAS_SIMD
  check_rows(
      "simd_rows<default_arch>", [&](double* s) { return vector_rows::group_sums_squares(x.data(), E, g, s); },
      [&](double* s) { vector_rows::group_sums(x.data(), E, g, s); });
#endif
#if RESONANCE_TEST_AVX2_TU
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2()) {
      check_rows(
          "simd_rows<avx2>", [&](double* s) { return resonance_test::group_sums_avx2(x.data(), E, g, s, true); },
          [&](double* s) { resonance_test::group_sums_avx2(x.data(), E, g, s, false); });
    }
  }
#endif
  if (!std::all_of(x.begin(), x.end(), [](T v) { return std::isfinite(v); })) return;
  long double ss = 0;
  for (rs::index e = 0; e < E; ++e) {
    long double sum = 0, abs_sum = 0;
    for (rs::index i = e * g; i < (e + 1) * g; ++i) {
      const long double v = x[usz(i)];
      sum += v;
      abs_sum += std::fabs(v);
      ss += v * v;
    }
    CHECK_MESSAGE(std::fabs(static_cast<long double>(want[usz(e)]) - sum) <= 1e-12L * abs_sum,
                  "group " << e << ": " << show(want[usz(e)]) << " vs " << show(static_cast<double>(sum)));
  }
  if (std::isnormal(want_ss)) {
    CHECK_MESSAGE(std::fabs(static_cast<long double>(want_ss) - ss) <= 1e-12L * ss,
                  "sum of squares " << show(want_ss) << " vs " << show(static_cast<double>(ss)));
  }
}

TEST_CASE("test_backends: grap group sums follow the 16-lane order on every row implementation") {
  std::mt19937_64 rng(23);
  // The shapes above, and every g from 1 to 40 (each g < 16 has its own unrolled loop).
  std::vector<std::pair<rs::index, rs::index>> row_shapes(std::begin(group_shapes), std::end(group_shapes));
  for (rs::index g = 1; g <= 40; ++g) row_shapes.emplace_back(3, g);
  for (const auto& shape_eg : row_shapes) {
    const rs::index E = shape_eg.first, g = shape_eg.second;  // CAPTURE is a lambda: clang 14 rejects bindings
    for (grap_row kind : grap_rows) {
      CAPTURE(E);
      CAPTURE(g);
      CAPTURE(grap_row_name(kind));
      for (int rep = 0; rep < 3; ++rep) {
        check_group_sums_row(grap_row_values<float>(rng, E * g, kind), E, g);
        check_group_sums_row(grap_row_values<double>(rng, E * g, kind), E, g);
      }
    }
  }
}

// The first entry in which two row-major results differ (NaN equal to NaN), or "".
template <class T>
std::string first_difference(const std::vector<T>& want, const std::vector<T>& got, rs::index cols) {
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (!same_bits(want[i], got[i]))
      return "row " + std::to_string(i / usz(cols)) + " column " + std::to_string(i % usz(cols)) + ": " + show(got[i]) +
             " vs " + show(want[i]);
  }
  return {};
}

// |got - ref| within one spacing of T at ref, plus abs_tol (the double sums' error bound).
template <class T>
bool within_ulp(T got, long double ref, long double abs_tol) {
  const T r = std::fabs(static_cast<T>(ref));
  const long double spacing = static_cast<long double>(std::nextafter(r, std::numeric_limits<T>::infinity())) - r;
  return std::fabs(static_cast<long double>(got) - ref) <= spacing + abs_tol;
}

// grap forward and backward, grap_cosine forward and backward on 130 rows (three 64-token blocks)
// cycling through the row kinds: every backend bitwise equal to serial, serial close to brute force.
template <class T>
void check_grap_affinities(std::mt19937_64& rng, rs::index E, rs::index g) {
  const rs::index rows = 130, d = E * g;
  std::vector<T> x;
  for (rs::index t = 0; t < rows; ++t) {
    const std::vector<T> r = grap_row_values<T>(rng, d, grap_rows[usz(t) % std::size(grap_rows)]);
    x.insert(x.end(), r.begin(), r.end());
  }
  const std::vector<T> dl = resonance_test::normal_values<T>(rng, rows * E);
  const rs::matrix_view<const T> xv{x.data(), rows, d}, dlv{dl.data(), rows, E};
  const ra::grap mean{.num_experts = E};
  const ra::grap_cosine cosine{.num_experts = E};
  struct outputs {
    std::vector<T> mean, delta, dx_mean, dx_delta;
  };
  const auto fresh = [&] {
    const T nan = std::numeric_limits<T>::quiet_NaN();
    return outputs{std::vector<T>(usz(rows * E), nan), std::vector<T>(usz(rows * E), nan),
                   std::vector<T>(usz(rows * d), nan), std::vector<T>(usz(rows * d), nan)};
  };
  const auto run = [&](const auto& be) {
    outputs o = fresh();
    mean.forward(be, xv, rs::matrix_view<T>{o.mean.data(), rows, E});
    cosine.forward(be, xv, rs::matrix_view<T>{o.delta.data(), rows, E});
    mean.backward(be, xv, dlv, rs::matrix_view<T>{o.dx_mean.data(), rows, d});
    cosine.backward(be, xv, dlv, rs::matrix_view<T>{o.dx_delta.data(), rows, d});
    return o;
  };
  const outputs want = run(rs::backend::serial{});
  const auto compare = [&](const outputs& got, const std::string& name) {
    std::string diff = first_difference(want.mean, got.mean, E);
    CHECK_MESSAGE(diff.empty(), "grap forward on " << name << ": " << diff);
    diff = first_difference(want.delta, got.delta, E);
    CHECK_MESSAGE(diff.empty(), "grap_cosine forward on " << name << ": " << diff);
    diff = first_difference(want.dx_mean, got.dx_mean, d);
    CHECK_MESSAGE(diff.empty(), "grap backward on " << name << ": " << diff);
    diff = first_difference(want.dx_delta, got.dx_delta, d);
    CHECK_MESSAGE(diff.empty(), "grap_cosine backward on " << name << ": " << diff);
  };
  for_each_parallel_backend([&](const auto& be, const std::string& name) { compare(run(be), name); });
#if RESONANCE_TEST_AVX2_TU
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2()) {
      outputs o = fresh();
      resonance_test::grap_forward_avx2(E, xv, {o.mean.data(), rows, E});
      resonance_test::grap_cosine_forward_avx2(E, xv, {o.delta.data(), rows, E});
      o.dx_mean = want.dx_mean;  // no AVX2 entry point: grap's backward has no sums
      resonance_test::grap_cosine_backward_avx2(E, xv, dlv, {o.dx_delta.data(), rows, d});
      compare(o, "simd<avx2>");
    }
  }
#endif

  // Serial against long double: the group means, and the cosines s_e / (√g·‖x‖) (0 for a zero row,
  // NaN for a row with a NaN or an Inf).
  for (rs::index t = 0; t < rows; ++t) {
    const T* row = x.data() + t * d;
    CAPTURE(t);
    CAPTURE(grap_row_name(grap_rows[usz(t) % std::size(grap_rows)]));
    if (!std::all_of(row, row + d, [](T v) { return std::isfinite(v); })) {
      for (rs::index e = 0; e < E; ++e) CHECK(std::isnan(want.delta[usz(t * E + e)]));
      continue;
    }
    long double ss = 0;
    for (rs::index j = 0; j < d; ++j) ss += static_cast<long double>(row[j]) * row[j];
    for (rs::index e = 0; e < E; ++e) {
      long double sum = 0, abs_sum = 0;
      for (rs::index j = e * g; j < (e + 1) * g; ++j) {
        sum += row[j];
        abs_sum += std::fabs(static_cast<long double>(row[j]));
      }
      const T got_mean = want.mean[usz(t * E + e)], got_delta = want.delta[usz(t * E + e)];
      const long double ref_mean = sum / static_cast<long double>(g);
      CHECK_MESSAGE(within_ulp(got_mean, ref_mean, 1e-12L * abs_sum / static_cast<long double>(g)),
                    "grap expert " << e << ": " << show(got_mean) << " vs " << show(static_cast<double>(ref_mean)));
      if (ss == 0) {
        CHECK(got_delta == T(0));
        continue;
      }
      long double ref_delta = sum / (std::sqrt(static_cast<long double>(g)) * std::sqrt(ss));
      ref_delta = std::clamp(ref_delta, -1.0L, 1.0L);
      CHECK_MESSAGE(within_ulp(got_delta, ref_delta, 1e-12L), "grap_cosine expert "
                                                                  << e << ": " << show(got_delta) << " vs "
                                                                  << show(static_cast<double>(ref_delta)));
    }
  }
}

TEST_CASE("test_backends: grap and grap_cosine forward and backward are bitwise identical on every backend") {
  std::mt19937_64 rng(24);
  for (const auto& shape_eg : group_shapes) {
    const rs::index E = shape_eg.first, g = shape_eg.second;
    CAPTURE(E);
    CAPTURE(g);
    check_grap_affinities<float>(rng, E, g);
    check_grap_affinities<double>(rng, E, g);
  }
}

TEST_CASE("test_backends: an empty batch gives the same plan on every backend") {
  const std::vector<float> none(1);
  const rs::matrix_view<const float> view{none.data(), 0, 8};
  const auto check = [&](const std::string& name, const auto& direction, const auto& capacity) {
    const auto r = precomputed_router(direction, capacity);
    const rs::routing_plan plan = check_backends_agree(name, [&](const auto& be) { return r.route(be, view); });
    CHECK(plan.num_tokens() == 0);
  };
  check("token choice, padded", rt::token_choice{.top_k = 2},
        cap::factor{.factor = 1.0, .min_capacity = 2, .pad_to_capacity = true, .align = 4});
  check("expert choice", rt::expert_choice{.top_k = 2}, cap::factor{.factor = 1.0});
  check("bidirectional", rt::bidirectional{.top_k = 2}, cap::factor{.factor = 1.0});
  check("sinkhorn", rt::sinkhorn{.top_k = 2}, cap::dropless{.align = 4});
}

#if RESONANCE_HAS_TBB
TEST_CASE("test_backends: tbb plans do not depend on global_control's max_allowed_parallelism") {
  std::mt19937_64 rng(15);
  const rs::index T = 5000, E = 64, k = 8;
  const std::vector<float> x = plan_logits(rng, T, E, true);
  const rs::matrix_view<const float> view{x.data(), T, E};
  const auto r = precomputed_router(rt::token_choice{.top_k = k, .score = rs::score::sigmoid},
                                    cap::factor{.factor = 0.75, .drop = rs::drop_policy::random, .seed = 3});
  const rs::routing_plan want = r.route(rs::backend::serial{}, view);
  for (int threads : {1, 2, 3}) {
    const tbb::global_control limit(tbb::global_control::max_allowed_parallelism, static_cast<std::size_t>(threads));
    CAPTURE(threads);
    CHECK(plan_difference(want, r.route(rs::backend::tbb<>{}, view)) == "");
#if RESONANCE_HAS_SIMD
    CHECK(plan_difference(want, r.route(rs::backend::tbb<rs::backend::simd<>>{}, view)) == "");
#endif
  }
}
#endif

// ---------------------------------------------------------------------------------------------------
// dispatch and combine

template <class S>
void check_dispatch_combine(std::mt19937_64& rng, const rs::routing_plan& plan, rs::index d, const std::string& what) {
  const rs::index T = plan.num_tokens(), slots = plan.num_slots();
  const std::vector<S> x = resonance_test::normal_values<S>(rng, T * d);
  const std::vector<S> expert_out = resonance_test::normal_values<S>(rng, slots * d);
  // Outputs start as `fill`: serial's as 0, the others' as NaN, so a row one backend leaves unwritten
  // shows as a difference.
  const auto run = [&](const auto& be, S fill) {
    std::pair<std::vector<S>, std::vector<S>> out{std::vector<S>(usz(slots * d), fill),
                                                  std::vector<S>(usz(T * d), fill)};
    rs::dispatch(be, plan.view(), rs::matrix_view<const S>{x.data(), T, d},
                 rs::matrix_view<S>{out.first.data(), slots, d});
    rs::combine(be, plan.view(), rs::matrix_view<const S>{expert_out.data(), slots, d},
                rs::matrix_view<S>{out.second.data(), T, d});
    return out;
  };
  const auto want = run(rs::backend::serial{}, S(0));
  for_each_parallel_backend([&](const auto& be, const std::string& name) {
    const auto got = run(be, std::numeric_limits<S>::quiet_NaN());
    CHECK_MESSAGE(std::memcmp(got.first.data(), want.first.data(), want.first.size() * sizeof(S)) == 0,
                  what << ": dispatch on " << name);
    CHECK_MESSAGE(std::memcmp(got.second.data(), want.second.data(), want.second.size() * sizeof(S)) == 0,
                  what << ": combine on " << name);
  });
}

TEST_CASE("test_backends: dispatch and combine outputs are identical on every backend and thread count") {
  std::mt19937_64 rng(16);
  for (rs::index T : {7, 2049, 5000}) {
    const rs::index E = 16;
    const std::vector<float> x = resonance_test::normal_values(rng, T * E, 2.0);
    const rs::matrix_view<const float> view{x.data(), T, E};
    const rs::routing_plan padded =
        precomputed_router(
            rt::token_choice{.top_k = 4},
            cap::factor{.factor = 0.5, .drop = rs::drop_policy::position, .pad_to_capacity = true, .align = 4})
            .route(view);
    const rs::routing_plan dropless =
        precomputed_router(rt::token_choice{.top_k = 2}, cap::dropless{.align = 8}).route(view);
    const std::string t = " T=" + std::to_string(T);
    check_dispatch_combine<float>(rng, padded, 33, "padded float" + t);
    check_dispatch_combine<double>(rng, padded, 20, "padded double" + t);
    check_dispatch_combine<float>(rng, dropless, 17, "dropless float" + t);
  }
}

// ---------------------------------------------------------------------------------------------------
// Errors

// The route's error on serial must read "resonance: <argument>: ..." and end with `suffix` (which names
// the row or token); every other backend must throw the same message.
template <class Router>
void check_same_error(const std::string& what, const Router& r, rs::matrix_view<const float> x,
                      const std::string& argument, const std::string& suffix) {
  const std::string want = resonance_test::error_of([&] { (void)r.route(rs::backend::serial{}, x); });
  CHECK_MESSAGE(want.starts_with("resonance: " + argument + ": "),
                what << ": \"" << want << "\" does not name " << argument);
  CHECK_MESSAGE(want.ends_with(suffix), what << ": \"" << want << "\" does not end with \"" << suffix << "\"");
  for_each_parallel_backend([&](const auto& be, const std::string& name) {
    const std::string got = resonance_test::error_of([&] { (void)r.route(be, x); });
    CHECK_MESSAGE(got == want, what << " on " << name << ": \"" << got << "\", serial: \"" << want << "\"");
  });
}

TEST_CASE("test_backends: NaN or Inf logits name the lowest offending row on every backend") {
  std::mt19937_64 rng(17);
  const rs::index T = 3000;
  struct bad_rows {
    rs::index r1, c1, r2, c2;
  };
  for (rs::index E : {7, 64}) {
    const std::vector<float> clean = resonance_test::normal_values(rng, T * E, 2.0);
    const std::vector<float> bias = resonance_test::grid_values(rng, E, 8, 0.125f);
    // Rows in one 512-token selection block, in distant blocks, and at both ends.
    const bad_rows cases[] = {
        {3, E - 1, 4, 0}, {1100, 0, 2500, E - 1}, {0, E / 2, T - 1, E / 2}, {2999, E - 1, 2999, 0}};
    for (const bad_rows& c : cases) {
      for (const std::pair<float, float>& values :
           {std::pair{qnan, inf}, std::pair{inf, qnan}, std::pair{-inf, -inf}}) {
        std::vector<float> x = clean;
        x[usz(c.r2 * E + c.c2)] = values.second;
        x[usz(c.r1 * E + c.c1)] = values.first;
        const rs::index c1 = c.r1 == c.r2 ? std::min(c.c1, c.c2) : c.c1;
        const rs::matrix_view<const float> view{x.data(), T, E};
        const std::string at = "at row " + std::to_string(c.r1) + ", column " + std::to_string(c1);
        const std::string what = "E=" + std::to_string(E) + " rows " + std::to_string(c.r1) + " and " +
                                 std::to_string(c.r2) + " (" + show(values.first) + ", " + show(values.second) + ")";
        const rs::vector_view<const float> b{bias.data(), E};
        const cap::factor factor1{.factor = 1.0};
        check_same_error(what + " softmax", precomputed_router(rt::token_choice{.top_k = 2}, factor1), view, "logits",
                         at);
        check_same_error(what + " softmax k=1", precomputed_router(rt::token_choice{.top_k = 1}, factor1), view,
                         "logits", at);
        check_same_error(what + " pre_softmax",
                         precomputed_router(rt::token_choice{.top_k = 2, .pre_softmax = true}, factor1), view, "logits",
                         at);
        check_same_error(what + " sigmoid bias",
                         precomputed_router(rt::token_choice{.top_k = 3, .score = rs::score::sigmoid, .expert_bias = b},
                                            cap::dropless{}),
                         view, "logits", at);
        check_same_error(what + " softmax k=17",
                         precomputed_router(rt::token_choice{.top_k = std::min<rs::index>(E, 17)}, factor1), view,
                         "logits", at);
        if (E % 4 == 0)
          check_same_error(what + " groups",
                           precomputed_router(rt::token_choice{.top_k = 4, .num_groups = 4, .group_topk = 2}, factor1),
                           view, "logits", at);
        check_same_error(what + " bidirectional", precomputed_router(rt::bidirectional{.top_k = 2}, factor1), view,
                         "logits", at);
        check_same_error(what + " expert choice", precomputed_router(rt::expert_choice{.top_k = 2}, factor1), view,
                         "logits", at);
        check_same_error(what + " sinkhorn", precomputed_router(rt::sinkhorn{.top_k = 2}, factor1), view, "logits", at);
      }
    }
  }
}

TEST_CASE("test_backends: weights that overflow fp32 raise the routing weight error on every backend") {
  std::mt19937_64 rng(18);
  const rs::index T = 3000, E = 16;
  const cap::factor factor1{.factor = 1.0};
  for (const std::pair<rs::index, rs::index>& rows : {std::pair<rs::index, rs::index>{5, 6}, {1300, 2700}, {0, 2999}}) {
    const auto [r1, r2] = rows;
    const std::string at = " for token " + std::to_string(r1);
    const std::string what = "rows " + std::to_string(r1) + " and " + std::to_string(r2);

    // Finite logits that overflow once divided by the temperature.
    std::vector<float> x = resonance_test::normal_values(rng, T * E, 1.0);
    x[usz(r1 * E + 3)] = 3e38f;
    x[usz(r2 * E + 9)] = 3e38f;
    const rs::matrix_view<const float> view{x.data(), T, E};
    check_same_error(what + " softmax temperature 1e-3",
                     precomputed_router(rt::token_choice{.top_k = 2, .temperature = 1e-3f}, factor1), view,
                     "routing weight", at);
    check_same_error(
        what + " pre_softmax temperature 1e-3",
        precomputed_router(rt::token_choice{.top_k = 2, .pre_softmax = true, .temperature = 1e-3f}, factor1), view,
        "routing weight", at);
    check_same_error(what + " bidirectional temperature 1e-3",
                     precomputed_router(rt::bidirectional{.top_k = 2, .temperature = 1e-3f}, factor1), view,
                     "routing weight", at);
    check_same_error(
        what + " expert choice identity temperature 1e-3",
        precomputed_router(rt::expert_choice{.top_k = 2, .score = rs::score::identity, .temperature = 1e-3f}, factor1),
        view, "routing weight", at);

    // Weights of about 5 times a scaling factor of 3e38 (the other rows' weights stay below 1).
    std::vector<float> y = resonance_test::normal_values(rng, T * E, 0.1);
    for (float& v : y) v = std::clamp(v, -0.9f, 0.9f);
    y[usz(r1 * E + 11)] = 5.0f;
    y[usz(r2 * E + 0)] = 5.0f;
    check_same_error(
        what + " identity scaling_factor 3e38",
        precomputed_router(
            rt::token_choice{
                .top_k = 2, .score = rs::score::identity, .renorm = rt::renormalize::never, .scaling_factor = 3e38f},
            factor1),
        rs::matrix_view<const float>{y.data(), T, E}, "routing weight", at);
  }
  // A subnormal temperature (1 / temperature = +Inf) is rejected before any selection, on every backend.
  std::vector<float> z = resonance_test::grid_values(rng, T * E, 1, 1.0f);
  check_same_error("temperature 1e-45",
                   precomputed_router(rt::token_choice{.top_k = 2, .temperature = 1e-45f}, factor1),
                   rs::matrix_view<const float>{z.data(), T, E}, "temperature", "");
}

#if RESONANCE_HAS_SIMD
// An architecture no CPU has: dispatch_simd reads only version() and name().
struct unsupported_arch {
  static constexpr unsigned version() { return ~0u; }
  static constexpr const char* name() { return "unsupported_arch"; }
};

TEST_CASE("test_backends: dispatch_simd skips unsupported architectures and throws when none is left") {
  const auto arch_of = [](auto be, const std::string& suffix) {
    return std::string(decltype(be)::arch_type::name()) + suffix;
  };
  const std::string msg = resonance_test::error_of(
      [&] { (void)rs::backend::dispatch_simd(xsimd::arch_list<unsupported_arch>{}, arch_of, std::string("!")); });
  CHECK_MESSAGE(msg.find("resonance: dispatch_simd: ") == 0, msg);
  CHECK_MESSAGE(msg.find("unsupported_arch") != std::string::npos, msg);
  // The arguments are forwarded to the first supported entry.
  CHECK(rs::backend::dispatch_simd(xsimd::arch_list<unsupported_arch, xsimd::default_arch>{}, arch_of,
                                   std::string("!")) == std::string(xsimd::default_arch::name()) + "!");
}
#endif

// ---------------------------------------------------------------------------------------------------
// Runtime dispatch between an AVX2 translation unit and this baseline one

#if RESONANCE_TEST_AVX2_TU
// f(simd<A>, ...) for each listed A: the AVX2 overload calls into tests/simd_avx2.cpp, the SSE2 one
// is instantiated here (SSE2 is x86-64's baseline). Records which one ran.
struct route_on {
  std::string* ran;
  rs::routing_plan operator()(rs::backend::simd<xsimd::avx2> be, const rt::token_choice& p, const cap::factor& capacity,
                              rs::matrix_view<const float> x) const {
    *ran = xsimd::avx2::name();
    return resonance_test::route_avx2(be, p, capacity, x);
  }
  rs::routing_plan operator()(rs::backend::simd<xsimd::sse2> be, const rt::token_choice& p, const cap::factor& capacity,
                              rs::matrix_view<const float> x) const {
    *ran = xsimd::sse2::name();
    return precomputed_router(p, capacity).route(be, x);
  }
};

TEST_CASE("test_backends: dispatch_simd runs the AVX2 build exactly when the CPU has AVX2, with serial's plans") {
  std::mt19937_64 rng(19);
  const bool has_avx2 = xsimd::available_architectures().avx2 != 0;
  MESSAGE("this CPU " << std::string(has_avx2 ? "has" : "lacks") << " AVX2");
  for (const shape& s : shapes) {
    for (bool ties : {false, true}) {
      const std::vector<float> x = plan_logits(rng, s.T, s.E, ties);
      const std::vector<float> bias = resonance_test::grid_values(rng, s.E, 8, 0.125f);
      const rs::matrix_view<const float> view{x.data(), s.T, s.E};
      std::vector<named_token_choice> variants = token_choice_variants(s.E, s.k, bias);
      if (s.E >= 20) variants.push_back({"softmax k=20 (the scalar scan)", {.top_k = 20}});
      for (const named_token_choice& v : variants) {
        const cap::factor capacity{.factor = 1.0};
        std::string ran;
        const rs::routing_plan got = rs::backend::dispatch_simd(xsimd::arch_list<xsimd::avx2, xsimd::sse2>{},
                                                                route_on{&ran}, v.policy, capacity, view);
        const std::string what = describe(v.name, s, ties);
        CHECK_MESSAGE(ran == (has_avx2 ? "avx2" : "sse2"), what << " ran on " << ran);
        const std::string diff = plan_difference(precomputed_router(v.policy, capacity).route(view), got);
        CHECK_MESSAGE(diff.empty(), what << " on " << ran << ": " << diff << " differs from serial's");
      }
    }
  }
}
#endif

}  // namespace
