// ETR's affinities (grap, grap_cosine, cosine) and the backward passes of the host affinities (with
// linear), each against an independent reference: group means and cosines recomputed in double from
// their definitions, with GrAP's matrix W materialised (which the library never does), and central
// finite differences of Σ dlogits ∘ forward(x) in double.

#include <algorithm>
#include <cmath>
#include <cstring>
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

#include "backends.hpp"
#include "error_of.hpp"
#include "random_inputs.hpp"

namespace {

namespace rs = resonance;
namespace ra = resonance::affinity;
namespace rt = resonance::routing;
using resonance_test::error_of;
using resonance_test::usz;

// ---------------------------------------------------------------------------------------------------
// helpers

// A rows×cols matrix stored with `gap` extra columns per row, all initialised to `fill`: views with a
// stride, and a way to check that nothing was written outside the view (or at all).
template <class T>
struct strided {
  rs::index rows = 0, cols = 0, stride = 0;
  std::vector<T> data;

  strided(rs::index r, rs::index c, rs::index gap, T fill)
      : rows(r), cols(c), stride(c + gap), data(usz(r * (c + gap)), fill) {}

  rs::matrix_view<T> view() { return {data.data(), rows, cols, stride}; }
  rs::matrix_view<const T> cview() const { return {data.data(), rows, cols, stride}; }
  T& operator()(rs::index r, rs::index c) { return data[usz(r * stride + c)]; }
  T operator()(rs::index r, rs::index c) const { return data[usz(r * stride + c)]; }

  void fill_normal(std::mt19937_64& rng, double scale = 1.0) {
    std::normal_distribution<double> dist(0.0, scale);
    for (rs::index r = 0; r < rows; ++r)
      for (rs::index c = 0; c < cols; ++c) (*this)(r, c) = static_cast<T>(dist(rng));
  }
  // Every entry outside the view still equals `fill`.
  bool gaps_hold(T fill) const {
    for (rs::index r = 0; r < rows; ++r)
      for (rs::index c = cols; c < stride; ++c)
        if (!((*this)(r, c) == fill)) return false;
    return true;
  }
  bool all_equal(T fill) const {
    return std::all_of(data.begin(), data.end(), [&](T v) { return v == fill; });
  }
  std::vector<double> dense() const {
    std::vector<double> out;
    for (rs::index r = 0; r < rows; ++r)
      for (rs::index c = 0; c < cols; ++c) out.push_back(static_cast<double>((*this)(r, c)));
    return out;
  }
};

// Row-major rows×cols doubles.
struct dense {
  rs::index rows = 0, cols = 0;
  std::vector<double> v;
  double operator()(rs::index r, rs::index c) const { return v[usz(r * cols + c)]; }
};

template <class T>
dense to_dense(rs::matrix_view<const T> m) {
  dense out{m.rows, m.cols, std::vector<double>(usz(m.rows * m.cols))};
  for (rs::index r = 0; r < m.rows; ++r)
    for (rs::index c = 0; c < m.cols; ++c) out.v[usz(r * m.cols + c)] = static_cast<double>(m(r, c));
  return out;
}

// GrAP's fixed weights, materialised: E×d with w_e = (E/d)·1{e·d/E <= j < (e+1)·d/E}  (LocMoE Eq. 4,
// ETR Eq. 3).
dense grap_matrix(rs::index E, rs::index d) {
  dense w{E, d, std::vector<double>(usz(E * d), 0.0)};
  for (rs::index e = 0; e < E; ++e)
    for (rs::index j = 0; j < d; ++j)
      if (e * d <= j * E && j * E < (e + 1) * d) w.v[usz(e * d + j)] = static_cast<double>(E) / static_cast<double>(d);
  return w;
}

// cos(x_t, w_e) / τ = x·w / (‖x‖·‖w‖·τ) from the definition, 0 where either vector is zero.
dense ref_cosine(const dense& x, const dense& w, double tau) {
  dense out{x.rows, w.rows, std::vector<double>(usz(x.rows * w.rows), 0.0)};
  for (rs::index t = 0; t < x.rows; ++t) {
    for (rs::index e = 0; e < w.rows; ++e) {
      double dot = 0.0, xx = 0.0, ww = 0.0;
      for (rs::index j = 0; j < x.cols; ++j) {
        dot += x(t, j) * w(e, j);
        xx += x(t, j) * x(t, j);
        ww += w(e, j) * w(e, j);
      }
      if (xx > 0.0 && ww > 0.0) out.v[usz(t * w.rows + e)] = dot / (std::sqrt(xx) * std::sqrt(ww)) / tau;
    }
  }
  return out;
}

// The mean of each of E contiguous channel groups.
dense ref_group_means(const dense& x, rs::index E) {
  const rs::index g = x.cols / E;
  dense out{x.rows, E, std::vector<double>(usz(x.rows * E), 0.0)};
  for (rs::index t = 0; t < x.rows; ++t)
    for (rs::index e = 0; e < E; ++e) {
      double s = 0.0;
      for (rs::index j = 0; j < g; ++j) s += x(t, e * g + j);
      out.v[usz(t * E + e)] = s / static_cast<double>(g);
    }
  return out;
}

// Checks got against want entrywise within rel·|want| + abs; reports the first few misses.
template <class T>
void check_close(const strided<T>& got, const dense& want, double rel, double abs) {
  REQUIRE(got.rows == want.rows);
  REQUIRE(got.cols == want.cols);
  int bad = 0;
  for (rs::index r = 0; r < want.rows; ++r)
    for (rs::index c = 0; c < want.cols; ++c) {
      const double g = static_cast<double>(got(r, c)), w = want(r, c);
      if (!(std::fabs(g - w) <= rel * std::fabs(w) + abs) && bad++ < 5)
        FAIL_CHECK("(" << r << ", " << c << "): " << g << " vs " << w);
    }
  CHECK(bad == 0);
}

// A backend whose primitives run rows last first (tests/backends.hpp): any result that depended on the
// order of the rows would differ from serial.
using resonance_test::scrambled_backend;

constexpr float sentinel_f = 12345.0f;
constexpr double sentinel_d = 12345.0;

template <class T>
constexpr T sentinel() {
  return std::is_same_v<T, float> ? T(sentinel_f) : T(sentinel_d);
}

// ---------------------------------------------------------------------------------------------------
// grap and grap_cosine against brute force

struct shape {
  rs::index T, d, E;
};
const std::vector<shape> grap_shapes{{0, 12, 3}, {1, 12, 3}, {7, 8, 8}, {9, 9, 1}, {130, 64, 8}, {65, 30, 5}};

template <class T>
void check_grap_shapes(std::mt19937_64& rng) {
  const bool is_float = std::is_same_v<T, float>;
  for (const shape& s : grap_shapes) {
    for (rs::index gap : {0, 3}) {
      CAPTURE(s.T);
      CAPTURE(s.d);
      CAPTURE(s.E);
      CAPTURE(gap);
      strided<T> x(s.T, s.d, gap, sentinel<T>());
      x.fill_normal(rng);
      if (s.T > 2)
        for (rs::index j = 0; j < s.d; ++j) x(1, j) = T(0);  // a zero token
      const dense xd = to_dense(x.cview());

      // grap: the group means. Both sides sum in double, so only the final rounding to T differs.
      strided<T> means(s.T, s.E, gap, sentinel<T>());
      ra::grap{.num_experts = s.E}.forward(rs::backend::serial{}, x.cview(), means.view());
      check_close(means, ref_group_means(xd, s.E), is_float ? 1.2e-7 : 1e-15, 1e-15);
      CHECK(means.gaps_hold(sentinel<T>()));

      // grap_cosine: the cosine with the materialised W.
      strided<T> delta(s.T, s.E, gap, sentinel<T>());
      ra::grap_cosine{.num_experts = s.E}.forward(rs::backend::serial{}, x.cview(), delta.view());
      check_close(delta, ref_cosine(xd, grap_matrix(s.E, s.d), 1.0), is_float ? 1.2e-7 : 1e-14, 1e-14);
      CHECK(delta.gaps_hold(sentinel<T>()));
      if (s.T > 2)
        for (rs::index e = 0; e < s.E; ++e) CHECK(delta(1, e) == T(0));
    }
  }
}

TEST_CASE("test_affinity_etr: grap is the brute-force group mean, grap_cosine the cosine with W materialised") {
  std::mt19937_64 rng(51);
  check_grap_shapes<float>(rng);
  check_grap_shapes<double>(rng);
}

TEST_CASE("test_affinity_etr: the router's fp32 logits are forward's, rounded once") {
  std::mt19937_64 rng(52);
  const rs::index T = 70, d = 48, E = 6;
  strided<double> x(T, d, 2, 0.0);
  x.fill_normal(rng);
  strided<float> xf(T, d, 0, 0.0f);
  for (rs::index t = 0; t < T; ++t)
    for (rs::index j = 0; j < d; ++j) xf(t, j) = static_cast<float>(x(t, j));

  const rs::router<ra::grap_cosine, rt::token_choice, rs::capacity::dropless> r{{.num_experts = E}, {}, {}};
  strided<double> wide(T, E, 0, 0.0);
  r.affinity.forward(rs::backend::serial{}, x.cview(), wide.view());
  std::vector<float> storage;
  const rs::matrix_view<const float> l = r.logits(rs::backend::serial{}, x.cview(), storage);
  strided<float> narrow(T, E, 0, 0.0f);
  r.affinity.forward(rs::backend::serial{}, xf.cview(), narrow.view());
  std::vector<float> storage_f;
  const rs::matrix_view<const float> lf = r.logits(rs::backend::serial{}, xf.cview(), storage_f);
  bool same = true;
  for (rs::index t = 0; t < T; ++t)
    for (rs::index e = 0; e < E; ++e)
      same = same && l(t, e) == static_cast<float>(wide(t, e)) && lf(t, e) == narrow(t, e);
  CHECK(same);
}

TEST_CASE("test_affinity_etr: per token grap_cosine ranks experts as grap, across tokens it does not") {
  std::mt19937_64 rng(53);
  const rs::index T = 200, d = 48, E = 6;
  strided<double> x(T, d, 0, 0.0);
  x.fill_normal(rng);
  for (rs::index t = 0; t < T; ++t)  // tokens of very different norms, so cross-token orders can differ
    for (rs::index j = 0; j < d; ++j) x(t, j) *= 0.2 + 0.05 * static_cast<double>(t % 37);
  strided<double> means(T, E, 0, 0.0), delta(T, E, 0, 0.0);
  ra::grap{.num_experts = E}.forward(rs::backend::serial{}, x.cview(), means.view());
  ra::grap_cosine{.num_experts = E}.forward(rs::backend::serial{}, x.cview(), delta.view());

  const auto ranking = [](rs::index n, const std::function<double(rs::index)>& key) {
    std::vector<rs::index> ids(usz(n));
    std::iota(ids.begin(), ids.end(), rs::index{0});
    std::stable_sort(ids.begin(), ids.end(), [&](rs::index a, rs::index b) { return key(a) > key(b); });
    return ids;
  };
  // δ_te = √g·mean_te/‖x_t‖: one positive factor per token, so the expert order of a token is the same.
  int same_tokens = 0;
  for (rs::index t = 0; t < T; ++t)
    same_tokens +=
        ranking(E, [&](rs::index e) { return means(t, e); }) == ranking(E, [&](rs::index e) { return delta(t, e); });
  CHECK(same_tokens == T);
  // The token order of an expert (what expert choice ranks) generally differs.
  int same_experts = 0;
  for (rs::index e = 0; e < E; ++e)
    same_experts +=
        ranking(T, [&](rs::index t) { return means(t, e); }) == ranking(T, [&](rs::index t) { return delta(t, e); });
  CHECK(same_experts < E);

  // One explicit case, d = 4, E = 2: token 0 has the larger group-0 mean (2 > 1), token 1 the larger
  // cosine with group 0 (1 > 0.196), because token 0's other group dominates its norm.
  const std::vector<double> two{2, 2, 10, 10, 1, 1, 0, 0};
  const rs::matrix_view<const double> xv{two.data(), 2, 4};
  std::vector<double> m(4), c(4);
  ra::grap{.num_experts = 2}.forward(rs::backend::serial{}, xv, rs::matrix_view<double>{m.data(), 2, 2});
  ra::grap_cosine{.num_experts = 2}.forward(rs::backend::serial{}, xv, rs::matrix_view<double>{c.data(), 2, 2});
  CHECK(m[0] == 2.0);
  CHECK(m[2] == 1.0);
  CHECK(c[0] == doctest::Approx(4.0 / (std::sqrt(2.0) * std::sqrt(208.0))).epsilon(1e-14));
  CHECK(c[2] == doctest::Approx(1.0).epsilon(1e-15));
  CHECK(m[0] > m[2]);
  CHECK(c[0] < c[2]);
}

template <class T>
void check_bessel(std::mt19937_64& rng, rs::index T_, rs::index d, rs::index E, bool aligned) {
  CAPTURE(d);
  CAPTURE(E);
  CAPTURE(aligned);
  strided<T> x(T_, d, 0, T(0));
  x.fill_normal(rng);
  if (aligned)  // constant within each group: x lies in span{w_e}, and Bessel's inequality is an equality
    for (rs::index t = 0; t < T_; ++t)
      for (rs::index j = 0; j < d; ++j) x(t, j) = x(t, (j / (d / E)) * (d / E));
  strided<T> delta(T_, E, 0, T(0));
  ra::grap_cosine{.num_experts = E}.forward(rs::backend::serial{}, x.cview(), delta.view());
  const double tol = std::is_same_v<T, float> ? 1e-6 : 1e-13;
  int bad = 0;
  for (rs::index t = 0; t < T_; ++t) {
    double sq = 0.0;
    for (rs::index e = 0; e < E; ++e) {
      bad += !(std::fabs(delta(t, e)) <= T(1));
      sq += static_cast<double>(delta(t, e)) * static_cast<double>(delta(t, e));
    }
    bad += !(sq <= 1.0 + tol);
    if (aligned) bad += !(std::fabs(sq - 1.0) <= tol);
  }
  CHECK(bad == 0);
}

TEST_CASE("test_affinity_etr: |δ| <= 1 and Σ_e δ_te² <= 1 (Bessel), with equality when x lies in span{w_e}") {
  std::mt19937_64 rng(54);
  for (bool aligned : {false, true}) {
    check_bessel<float>(rng, 100, 64, 8, aligned);
    check_bessel<float>(rng, 100, 16, 16, aligned);
    check_bessel<float>(rng, 100, 30, 1, aligned);
    check_bessel<double>(rng, 100, 64, 8, aligned);
    check_bessel<double>(rng, 100, 9, 3, aligned);
  }
  // E = 1 and a constant token: δ = 1 exactly (a cosine rounded above 1 is clamped back).
  const std::vector<float> ones(37, 0.3f);
  float delta = 0.0f;
  ra::grap_cosine{.num_experts = 1}.forward(rs::backend::serial{}, rs::matrix_view<const float>{ones.data(), 1, 37},
                                            rs::matrix_view<float>{&delta, 1, 1});
  CHECK(delta == 1.0f);
}

TEST_CASE("test_affinity_etr: cosines are scale invariant over double's whole range") {
  // Entries of 2^±700 overflow or underflow a plain sum of squares; scaling by a power of two is exact,
  // so the affinities must be bitwise those of the unscaled row, and the gradients scale by 2^∓700.
  std::mt19937_64 rng(55);
  const rs::index T = 3, d = 12, E = 4;
  strided<double> x(T, d, 0, 0.0), dl(T, E, 0, 0.0);
  x.fill_normal(rng);
  dl.fill_normal(rng);
  strided<double> w(E, d, 0, 0.0);
  w.fill_normal(rng);
  for (int k : {700, -700, -1000}) {
    CAPTURE(k);
    strided<double> xs = x;
    for (double& v : xs.data) v = std::ldexp(v, k);
    strided<double> a(T, E, 0, 0.0), b(T, E, 0, 0.0), ga(T, d, 0, 0.0), gb(T, d, 0, 0.0);
    const ra::grap_cosine gc{.num_experts = E};
    gc.forward(rs::backend::serial{}, x.cview(), a.view());
    gc.forward(rs::backend::serial{}, xs.cview(), b.view());
    CHECK(a.data == b.data);
    gc.backward(rs::backend::serial{}, x.cview(), dl.cview(), ga.view());
    gc.backward(rs::backend::serial{}, xs.cview(), dl.cview(), gb.view());
    for (std::size_t i = 0; i < ga.data.size(); ++i)
      CHECK(std::ldexp(gb.data[i], k) == doctest::Approx(ga.data[i]).epsilon(1e-14));

    const ra::cosine_double cg{.weight = w.cview()};
    cg.forward(rs::backend::serial{}, x.cview(), a.view());
    cg.forward(rs::backend::serial{}, xs.cview(), b.view());
    CHECK(a.data == b.data);
  }
}

// ---------------------------------------------------------------------------------------------------
// cosine against brute force

template <class S>
void check_cosine(std::mt19937_64& rng, rs::index T, rs::index d, rs::index E, rs::index gap, float tau) {
  CAPTURE(T);
  CAPTURE(d);
  CAPTURE(E);
  CAPTURE(gap);
  CAPTURE(tau);
  strided<S> x(T, d, gap, sentinel<S>()), w(E, d, gap + 1, sentinel<S>());
  x.fill_normal(rng);
  w.fill_normal(rng, 0.5);
  if (T > 3)
    for (rs::index j = 0; j < d; ++j) x(2, j) = S(0);  // a zero token
  if (E > 2)
    for (rs::index j = 0; j < d; ++j) w(1, j) = S(0);  // a zero embedding
  strided<S> logits(T, E, gap, sentinel<S>());
  const ra::basic_cosine<S> gate{.weight = w.cview(), .temperature = tau};
  gate.forward(rs::backend::serial{}, x.cview(), logits.view());
  const double t = static_cast<double>(tau);
  check_close(logits, ref_cosine(to_dense(x.cview()), to_dense(w.cview()), t),
              std::is_same_v<S, float> ? 1.2e-7 : 1e-14, 1e-14 / t);
  CHECK(logits.gaps_hold(sentinel<S>()));
  for (rs::index e = 0; e < E && T > 3; ++e) CHECK(logits(2, e) == S(0));
  for (rs::index r = 0; r < T && E > 2; ++r) CHECK(logits(r, 1) == S(0));
}

TEST_CASE("test_affinity_etr: cosine logits are cos(x_t, w_e)/τ in double, zero rows give 0") {
  std::mt19937_64 rng(56);
  check_cosine<float>(rng, 100, 32, 8, 0, 1.0f);
  check_cosine<float>(rng, 67, 20, 5, 3, 0.1f);
  check_cosine<float>(rng, 1, 5, 1, 1, 2.0f);
  check_cosine<double>(rng, 100, 32, 8, 2, 1.0f);
  check_cosine<double>(rng, 10, 7, 3, 0, 0.05f);

  // A token whose norm is at most epsilon counts as zero.
  const std::vector<float> w{1, 0, 0, 1};
  const std::vector<float> x{1e-3f, 2e-3f, 3.0f, 4.0f};
  std::vector<float> out(4, sentinel_f);
  ra::cosine{.weight = {w.data(), 2, 2}, .epsilon = 0.01f}.forward(
      rs::backend::serial{}, rs::matrix_view<const float>{x.data(), 2, 2}, rs::matrix_view<float>{out.data(), 2, 2});
  CHECK(out[0] == 0.0f);
  CHECK(out[1] == 0.0f);
  CHECK(out[2] == doctest::Approx(0.6));
  CHECK(out[3] == doctest::Approx(0.8));
}

// ---------------------------------------------------------------------------------------------------
// backward by central finite differences (double)

// Central differences of objective() with respect to every entry of m (perturbed in place, restored).
std::vector<double> central_differences(strided<double>& m, const std::function<double()>& objective) {
  std::vector<double> out;
  for (rs::index r = 0; r < m.rows; ++r)
    for (rs::index c = 0; c < m.cols; ++c) {
      const double p = m(r, c), h = 1e-6 * std::max(1.0, std::fabs(p));
      const double up = p + h, down = p - h;
      m(r, c) = up;
      const double f_up = objective();
      m(r, c) = down;
      const double f_down = objective();
      m(r, c) = p;
      out.push_back((f_up - f_down) / (up - down));
    }
  return out;
}

// |fd − an| <= 1e-6·(|an| + 1e-2·max|an|): relative where the entry is not tiny next to the others.
void check_gradient(const char* what, const std::vector<double>& fd, const std::vector<double>& an) {
  CAPTURE(what);
  REQUIRE(fd.size() == an.size());
  double top = 0.0;
  for (double v : an) top = std::max(top, std::fabs(v));
  CHECK(top > 0.0);
  int bad = 0;
  for (std::size_t i = 0; i < an.size(); ++i)
    if (!(std::fabs(fd[i] - an[i]) <= 1e-6 * (std::fabs(an[i]) + 1e-2 * top)) && bad++ < 5)
      FAIL_CHECK(std::string(what) << "[" << i << "]: analytic " << an[i] << ", finite difference " << fd[i]);
  CHECK(bad == 0);
}

// Σ dl ∘ logits with the logits from a forward in double.
template <class Forward>
double objective(const strided<double>& dl, Forward&& forward) {
  strided<double> logits(dl.rows, dl.cols, 0, 0.0);
  forward(logits.view());
  double f = 0.0;
  for (rs::index t = 0; t < dl.rows; ++t)
    for (rs::index e = 0; e < dl.cols; ++e) f += dl(t, e) * logits(t, e);
  return f;
}

TEST_CASE("test_affinity_etr: grap and grap_cosine backward equal central differences") {
  std::mt19937_64 rng(57);
  for (const shape& s : std::vector<shape>{{5, 12, 3}, {4, 6, 6}, {3, 10, 1}}) {
    CAPTURE(s.d);
    CAPTURE(s.E);
    strided<double> x(s.T, s.d, 2, 0.0), dl(s.T, s.E, 1, 0.0);
    x.fill_normal(rng);
    dl.fill_normal(rng);

    const ra::grap g{.num_experts = s.E};
    const auto f_grap = [&] {
      return objective(dl, [&](rs::matrix_view<double> l) { g.forward(rs::backend::serial{}, x.cview(), l); });
    };
    strided<double> dx(s.T, s.d, 3, sentinel_d);
    g.backward(rs::backend::serial{}, x.cview(), dl.cview(), dx.view());
    CHECK(dx.gaps_hold(sentinel_d));
    check_gradient("grap dx", central_differences(x, f_grap), dx.dense());

    const ra::grap_cosine gc{.num_experts = s.E};
    const auto f_grap_cosine = [&] {
      return objective(dl, [&](rs::matrix_view<double> l) { gc.forward(rs::backend::serial{}, x.cview(), l); });
    };
    gc.backward(rs::backend::serial{}, x.cview(), dl.cview(), dx.view());
    CHECK(dx.gaps_hold(sentinel_d));
    check_gradient("grap_cosine dx", central_differences(x, f_grap_cosine), dx.dense());
  }
}

TEST_CASE("test_affinity_etr: cosine backward (dx and dweight) equals central differences") {
  std::mt19937_64 rng(58);
  for (float tau : {1.0f, 0.3f}) {
    const rs::index T = 6, d = 7, E = 4;
    strided<double> x(T, d, 1, 0.0), w(E, d, 2, 0.0), dl(T, E, 0, 0.0);
    x.fill_normal(rng);
    w.fill_normal(rng, 0.7);
    dl.fill_normal(rng);
    const ra::cosine_double gate{.weight = w.cview(), .temperature = tau};
    strided<double> dx(T, d, 2, sentinel_d), dw(E, d, 1, sentinel_d);
    gate.backward(rs::backend::serial{}, x.cview(), dl.cview(), dx.view(), dw.view());
    CHECK(dx.gaps_hold(sentinel_d));
    CHECK(dw.gaps_hold(sentinel_d));
    const auto f = [&] {
      return objective(dl, [&](rs::matrix_view<double> l) { gate.forward(rs::backend::serial{}, x.cview(), l); });
    };
    check_gradient("cosine dx", central_differences(x, f), dx.dense());
    check_gradient("cosine dweight", central_differences(w, f), dw.dense());
  }
}

TEST_CASE("test_affinity_etr: linear backward (dx, dweight, dbias) equals central differences") {
  std::mt19937_64 rng(59);
  for (rs::index T : {5, 300}) {  // 300 crosses a 256-row block
    CAPTURE(T);
    const rs::index d = 6, E = 3;
    strided<double> x(T, d, 1, 0.0), w(E, d, 2, 0.0), b(1, E, 0, 0.0), dl(T, E, 1, 0.0);
    x.fill_normal(rng);
    w.fill_normal(rng);
    b.fill_normal(rng);
    dl.fill_normal(rng);
    const ra::linear_double gate{.weight = w.cview(), .bias = {b.data.data(), E}};
    strided<double> dx(T, d, 2, sentinel_d), dw(E, d, 1, sentinel_d);
    std::vector<double> db(usz(E), sentinel_d);
    gate.backward(rs::backend::serial{}, x.cview(), dl.cview(), dx.view(), dw.view(),
                  rs::vector_view<double>{db.data(), E});
    CHECK(dx.gaps_hold(sentinel_d));
    CHECK(dw.gaps_hold(sentinel_d));
    const auto f = [&] {
      return objective(dl, [&](rs::matrix_view<double> l) { gate.forward(rs::backend::serial{}, x.cview(), l); });
    };
    if (T < 10) check_gradient("linear dx", central_differences(x, f), dx.dense());
    check_gradient("linear dweight", central_differences(w, f), dw.dense());
    check_gradient("linear dbias", central_differences(b, f), db);

    // Without a bias, dbias may be left out.
    const ra::linear_double no_bias{.weight = w.cview()};
    strided<double> dw2(E, d, 0, sentinel_d);
    no_bias.backward(rs::backend::serial{}, x.cview(), dl.cview(), dx.view(), dw2.view(), rs::vector_view<double>{});
    CHECK(dw2.dense() == dw.dense());
  }
}

TEST_CASE("test_affinity_etr: linear forward in Scalar precision is X·Wᵀ + b") {
  std::mt19937_64 rng(60);
  const rs::index T = 260, d = 9, E = 5;
  strided<double> x(T, d, 2, 0.0), w(E, d, 0, 0.0), b(1, E, 0, 0.0);
  x.fill_normal(rng);
  w.fill_normal(rng);
  b.fill_normal(rng);
  strided<double> l(T, E, 1, sentinel_d);
  ra::linear_double{.weight = w.cview(), .bias = {b.data.data(), E}}.forward(rs::backend::serial{}, x.cview(),
                                                                             l.view());
  dense want{T, E, std::vector<double>(usz(T * E))};
  for (rs::index t = 0; t < T; ++t)
    for (rs::index e = 0; e < E; ++e) {
      double v = b(0, e);
      for (rs::index j = 0; j < d; ++j) v += x(t, j) * w(e, j);
      want.v[usz(t * E + e)] = v;
    }
  check_close(l, want, 1e-13, 1e-13);
  CHECK(l.gaps_hold(sentinel_d));
}

TEST_CASE("test_affinity_etr: zero tokens and zero embeddings have zero gradient") {
  const rs::index d = 4, E = 2;
  const std::vector<double> x{0, 0, 0, 0, 1, -2, 0.5, 3};
  const std::vector<double> w{0, 0, 0, 0, 0.3, 1, -1, 2};
  const std::vector<double> dl{1, -1, 2, 0.5};
  const rs::matrix_view<const double> xv{x.data(), 2, d}, dlv{dl.data(), 2, E};
  std::vector<double> dx(8, sentinel_d), dw(8, sentinel_d);
  ra::grap_cosine{.num_experts = E}.backward(rs::backend::serial{}, xv, dlv, rs::matrix_view<double>{dx.data(), 2, d});
  for (rs::index j = 0; j < d; ++j) CHECK(dx[usz(j)] == 0.0);
  CHECK(dx[4] != 0.0);

  std::fill(dx.begin(), dx.end(), sentinel_d);
  ra::cosine_double{.weight = {w.data(), E, d}}.backward(rs::backend::serial{}, xv, dlv,
                                                         rs::matrix_view<double>{dx.data(), 2, d},
                                                         rs::matrix_view<double>{dw.data(), E, d});
  for (rs::index j = 0; j < d; ++j) {
    CHECK(dx[usz(j)] == 0.0);  // zero token
    CHECK(dw[usz(j)] == 0.0);  // zero embedding
  }
  // Token 1 only meets expert 1: dx_1 = dl·(v − c·u)/‖x‖ /τ, from the definition.
  const double nx = std::sqrt(1 + 4 + 0.25 + 9), nw = std::sqrt(0.09 + 1 + 1 + 4);
  double c = 0.0;
  for (rs::index j = 0; j < d; ++j) c += x[usz(4 + j)] * w[usz(4 + j)];
  c /= nx * nw;
  for (rs::index j = 0; j < d; ++j) {
    CHECK(dx[usz(4 + j)] == doctest::Approx(0.5 * (w[usz(4 + j)] / nw - c * x[usz(4 + j)] / nx) / nx).epsilon(1e-13));
    CHECK(dw[usz(4 + j)] == doctest::Approx(0.5 * (x[usz(4 + j)] / nx - c * w[usz(4 + j)] / nw) / nw).epsilon(1e-13));
  }

  // No tokens: dweight is still overwritten (with zeros).
  std::fill(dw.begin(), dw.end(), sentinel_d);
  ra::cosine_double{.weight = {w.data(), E, d}}.backward(
      rs::backend::serial{}, rs::matrix_view<const double>{nullptr, 0, d}, rs::matrix_view<const double>{nullptr, 0, E},
      rs::matrix_view<double>{nullptr, 0, d}, rs::matrix_view<double>{dw.data(), E, d});
  CHECK(std::all_of(dw.begin(), dw.end(), [](double v) { return v == 0.0; }));
  std::vector<double> db(usz(E), sentinel_d);
  std::fill(dw.begin(), dw.end(), sentinel_d);
  ra::linear_double{.weight = {w.data(), E, d}, .bias = {db.data(), E}}.backward(
      rs::backend::serial{}, rs::matrix_view<const double>{nullptr, 0, d}, rs::matrix_view<const double>{nullptr, 0, E},
      rs::matrix_view<double>{nullptr, 0, d}, rs::matrix_view<double>{dw.data(), E, d},
      rs::vector_view<double>{db.data(), E});
  CHECK(std::all_of(dw.begin(), dw.end(), [](double v) { return v == 0.0; }));
  CHECK(std::all_of(db.begin(), db.end(), [](double v) { return v == 0.0; }));
}

// ---------------------------------------------------------------------------------------------------
// determinism across backends

template <class S>
void check_split_independence(std::mt19937_64& rng) {
  const rs::index T = 300, d = 24, E = 6;  // 300 tokens: several blocks of 64 and of 256
  strided<S> x(T, d, 1, S(0)), w(E, d, 0, S(0)), dl(T, E, 0, S(0));
  x.fill_normal(rng);
  w.fill_normal(rng);
  dl.fill_normal(rng);
  const std::vector<S> b = resonance_test::normal_values<S>(rng, E);
  const ra::grap g{.num_experts = E};
  const ra::grap_cosine gc{.num_experts = E};
  const ra::basic_cosine<S> cs{.weight = w.cview(), .temperature = 0.5f};
  const ra::basic_linear<S> lin{.weight = w.cview(), .bias = {b.data(), E}};

  const auto run = [&](const auto& be) {
    std::vector<std::vector<S>> out;
    const auto keep = [&](const strided<S>& m) { out.push_back(m.data); };
    strided<S> l(T, E, 0, S(0)), dx(T, d, 0, S(0)), dw(E, d, 0, S(0));
    std::vector<S> db(usz(E));
    g.forward(be, x.cview(), l.view());
    keep(l);
    g.backward(be, x.cview(), dl.cview(), dx.view());
    keep(dx);
    gc.forward(be, x.cview(), l.view());
    keep(l);
    gc.backward(be, x.cview(), dl.cview(), dx.view());
    keep(dx);
    cs.forward(be, x.cview(), l.view());
    keep(l);
    cs.backward(be, x.cview(), dl.cview(), dx.view(), dw.view());
    keep(dx);
    keep(dw);
    lin.forward(be, x.cview(), l.view());
    keep(l);
    lin.backward(be, x.cview(), dl.cview(), dx.view(), dw.view(), rs::vector_view<S>{db.data(), E});
    keep(dx);
    keep(dw);
    out.push_back(db);
    return out;
  };
  const auto serial = run(rs::backend::serial{});
  const auto scrambled = run(scrambled_backend{});
  REQUIRE(serial.size() == scrambled.size());
  for (std::size_t i = 0; i < serial.size(); ++i) {
    CAPTURE(i);
    CHECK(std::memcmp(serial[i].data(), scrambled[i].data(), serial[i].size() * sizeof(S)) == 0);
  }
}

TEST_CASE("test_affinity_etr: forward and backward are bitwise independent of the backend's split") {
  std::mt19937_64 rng(61);
  check_split_independence<float>(rng);
  check_split_independence<double>(rng);
}

// ---------------------------------------------------------------------------------------------------
// errors

TEST_CASE("test_affinity_etr: bad policies and shapes raise resonance::error naming the argument") {
  // num_experts is designated like a number and called like the affinity_policy function.
  constexpr ra::grap_cosine designated{.num_experts = 8};
  static_assert(designated.num_experts == 8 && designated.experts_for(64) == 8 && designated.epsilon == 0.0);
  static_assert(rs::affinity_policy<ra::grap> && rs::affinity_policy<ra::grap_cosine> &&
                rs::affinity_policy<ra::cosine> && rs::affinity_policy<ra::cosine_double>);
  CHECK(ra::grap{.num_experts = 4} != ra::grap{.num_experts = 2});

  const std::string divisible =
      "a hidden size divisible by num_experts (E = 3), so that every expert owns d/E >= 1 contiguous channels";
  CHECK(error_of([] { ra::grap{.num_experts = 3}.validate(10); }) ==
        "resonance: input: expected " + divisible + ", got 10 columns");
  CHECK(error_of([] { ra::grap_cosine{.num_experts = 3}.validate(2); }) ==
        "resonance: input: expected " + divisible + ", got 2 columns");
  CHECK(error_of([] { ra::grap{}.validate(8); }) == "resonance: grap.num_experts: expected at least 1 expert, got 0");
  CHECK(error_of([] { ra::grap_cosine{.num_experts = -2}.validate(8); }) ==
        "resonance: grap_cosine.num_experts: expected at least 1 expert, got -2");
  CHECK(error_of([] { ra::grap_cosine{.num_experts = 2, .epsilon = -1.0}.validate(8); }) ==
        "resonance: grap_cosine.epsilon: expected a finite value >= 0, got -1");

  // Through the router: the same message, and no plan.
  const std::vector<float> x(50, 1.0f);
  const rs::router<ra::grap_cosine, rt::token_choice, rs::capacity::dropless> r{{.num_experts = 3}, {}, {}};
  CHECK(error_of([&] {
          (void)r.route(rs::matrix_view<const float>{x.data(), 5, 10});
        }) == "resonance: input: expected " + divisible + ", got 10 columns");

  const std::vector<float> w(24, 0.5f);
  const ra::cosine good{.weight = {w.data(), 3, 8}};
  CHECK(error_of([&] { good.validate(8); }) == "no throw");
  CHECK(error_of([&] { good.validate(7); }) ==
        "resonance: cosine.weight: expected as many columns as the input has (7), got 8");
  for (float tau : {0.0f, -1.0f, std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()}) {
    CAPTURE(tau);
    ra::cosine bad = good;
    bad.temperature = tau;
    CHECK(error_of([&] { bad.validate(8); }).starts_with("resonance: cosine.temperature: expected a finite value > 0"));
  }
  CHECK(error_of([&] {
          ra::cosine{.weight = {w.data(), 0, 8}}.validate(8);
        }) == "resonance: cosine.weight: expected at least 1 row (expert), got 0");
  CHECK(error_of([&] {
          ra::cosine{.weight = {w.data(), 3, 8}, .epsilon = -1e-3f}.validate(8);
        }).starts_with("resonance: cosine.epsilon: expected a finite value >= 0"));
}

TEST_CASE("test_affinity_etr: a forward or backward that throws writes nothing") {
  std::mt19937_64 rng(62);
  const rs::index T = 5, d = 8, E = 4;
  strided<float> x(T, d, 0, 0.0f), dl(T, E, 0, 0.0f), w(E, d, 0, 0.0f);
  x.fill_normal(rng);
  dl.fill_normal(rng);
  w.fill_normal(rng);
  const ra::grap g{.num_experts = E};
  const ra::grap_cosine gc{.num_experts = E};
  const ra::cosine cs{.weight = w.cview()};
  const ra::linear lin{.weight = w.cview()};
  const rs::backend::serial be;

  strided<float> wrong_l(T, E + 1, 0, sentinel_f);
  const std::string bad_logits = "resonance: logits: expected shape 5x4, got 5x5";
  CHECK(error_of([&] { g.forward(be, x.cview(), wrong_l.view()); }) == bad_logits);
  CHECK(error_of([&] { gc.forward(be, x.cview(), wrong_l.view()); }) == bad_logits);
  CHECK(error_of([&] { cs.forward(be, x.cview(), wrong_l.view()); }) == bad_logits);
  CHECK(error_of([&] { lin.forward(be, x.cview(), wrong_l.view()); }) == bad_logits);
  CHECK(wrong_l.all_equal(sentinel_f));

  strided<float> dx(T, d, 0, sentinel_f), dw(E, d, 0, sentinel_f);
  strided<float> wrong_dl(T + 1, E, 0, 0.0f), wrong_dx(T, d - 1, 0, sentinel_f), wrong_dw(E, d + 1, 0, sentinel_f);
  std::vector<float> db(usz(E), sentinel_f);
  const rs::vector_view<float> dbv{db.data(), E};
  const std::string bad_dl = "resonance: dlogits: expected shape 5x4, got 6x4";
  const std::string bad_dx = "resonance: dx: expected shape 5x8, got 5x7";
  const std::string bad_dw = "resonance: dweight: expected shape 4x8, got 4x9";
  CHECK(error_of([&] { g.backward(be, x.cview(), wrong_dl.cview(), dx.view()); }) == bad_dl);
  CHECK(error_of([&] { gc.backward(be, x.cview(), wrong_dl.cview(), dx.view()); }) == bad_dl);
  CHECK(error_of([&] { cs.backward(be, x.cview(), wrong_dl.cview(), dx.view(), dw.view()); }) == bad_dl);
  CHECK(error_of([&] { lin.backward(be, x.cview(), wrong_dl.cview(), dx.view(), dw.view(), dbv); }) == bad_dl);
  CHECK(error_of([&] { g.backward(be, x.cview(), dl.cview(), wrong_dx.view()); }) == bad_dx);
  CHECK(error_of([&] { gc.backward(be, x.cview(), dl.cview(), wrong_dx.view()); }) == bad_dx);
  CHECK(error_of([&] { cs.backward(be, x.cview(), dl.cview(), wrong_dx.view(), dw.view()); }) == bad_dx);
  CHECK(error_of([&] { lin.backward(be, x.cview(), dl.cview(), wrong_dx.view(), dw.view(), dbv); }) == bad_dx);
  CHECK(error_of([&] { cs.backward(be, x.cview(), dl.cview(), dx.view(), wrong_dw.view()); }) == bad_dw);
  CHECK(error_of([&] { lin.backward(be, x.cview(), dl.cview(), dx.view(), wrong_dw.view(), dbv); }) == bad_dw);
  CHECK(error_of([&] {
          lin.backward(be, x.cview(), dl.cview(), dx.view(), dw.view(), {db.data(), E - 1});
        }) == "resonance: dbias: expected 0 or 4 entries (one per expert), got 3");
  const ra::linear with_bias{.weight = w.cview(), .bias = {db.data(), E}};
  std::vector<float> db2(usz(E), sentinel_f);
  CHECK(error_of([&] { with_bias.backward(be, x.cview(), dl.cview(), dx.view(), dw.view(), {}); }) ==
        "resonance: dbias: expected 4 entries (one per expert: the gate has a bias), got 0");
  // A policy error comes before any write, too.
  const ra::grap bad_grap{.num_experts = 3};
  CHECK(error_of([&] { bad_grap.backward(be, x.cview(), dl.cview(), dx.view()); }).starts_with("resonance: input:"));
  CHECK(dx.all_equal(sentinel_f));
  CHECK(dw.all_equal(sentinel_f));
  CHECK(wrong_dx.all_equal(sentinel_f));
  CHECK(wrong_dw.all_equal(sentinel_f));
  CHECK(std::all_of(db.begin(), db.end(), [](float v) { return v == sentinel_f; }));
}

// ---------------------------------------------------------------------------------------------------
// routing

// T tokens whose exact affinities (double, from `reference`) have every adjacent pair of a row at least
// `gap` apart, so that rounding cannot change a selection; returns them as fp32 logits.
std::vector<float> separated_tokens(std::mt19937_64& rng, rs::index T, rs::index d, rs::index E,
                                    const std::function<dense(const dense&)>& reference, std::vector<float>& x,
                                    double gap) {
  x.assign(usz(T * d), 0.0f);
  std::vector<float> exact(usz(T * E));
  std::normal_distribution<double> dist(0.0, 1.0);
  for (rs::index t = 0; t < T; ++t) {
    for (int attempt = 0;; ++attempt) {
      REQUIRE(attempt < 100);
      for (rs::index j = 0; j < d; ++j) x[usz(t * d + j)] = static_cast<float>(dist(rng));
      const dense ref = reference(to_dense(rs::matrix_view<const float>{x.data() + t * d, 1, d}));
      std::vector<double> row(ref.v);
      std::sort(row.begin(), row.end());
      bool ok = true;
      for (rs::index e = 1; e < E; ++e) ok = ok && row[usz(e)] - row[usz(e - 1)] >= gap;
      if (!ok) continue;
      for (rs::index e = 0; e < E; ++e) exact[usz(t * E + e)] = static_cast<float>(ref.v[usz(e)]);
      break;
    }
  }
  return exact;
}

template <class Affinity>
void check_same_plan(const Affinity& affinity, const rt::token_choice& dir, const std::vector<float>& x,
                     const std::vector<float>& exact, rs::index T, rs::index d, rs::index E) {
  CAPTURE(dir.top_k);
  const rs::routing_plan via_affinity = rs::router<Affinity, rt::token_choice, rs::capacity::dropless>{
      affinity, dir, {}}.route(rs::matrix_view<const float>{x.data(), T, d});
  const rs::routing_plan via_logits = rs::router<ra::precomputed, rt::token_choice, rs::capacity::dropless>{
      {}, dir, {}}.route(rs::matrix_view<const float>{exact.data(), T, E});
  CHECK(std::ranges::equal(via_affinity.expert_offsets(), via_logits.expert_offsets()));
  CHECK(std::ranges::equal(via_affinity.expert_counts(), via_logits.expert_counts()));
  CHECK(std::ranges::equal(via_affinity.expert_demand(), via_logits.expert_demand()));
  CHECK(std::ranges::equal(via_affinity.slot_token(), via_logits.slot_token()));
  CHECK(std::ranges::equal(via_affinity.token_offsets(), via_logits.token_offsets()));
  CHECK(std::ranges::equal(via_affinity.token_expert(), via_logits.token_expert()));
  CHECK(std::ranges::equal(via_affinity.token_slot(), via_logits.token_slot()));
  const auto wa = via_affinity.token_weight(), wl = via_logits.token_weight();
  REQUIRE(wa.size() == wl.size());
  double worst = 0.0;
  for (std::size_t i = 0; i < wa.size(); ++i) worst = std::max(worst, std::fabs(double{wa[i]} - double{wl[i]}));
  CHECK(worst <= 1e-6);
}

TEST_CASE("test_affinity_etr: routing through grap_cosine (or cosine) equals routing the brute-force δ") {
  std::mt19937_64 rng(63);
  const rs::index T = 500, d = 64, E = 8;
  std::vector<float> x;
  const dense W = grap_matrix(E, d);
  const std::vector<float> exact = separated_tokens(
      rng, T, d, E, [&](const dense& xt) { return ref_cosine(xt, W, 1.0); }, x, 1e-4);
  for (const rt::token_choice& dir : {rt::token_choice{.top_k = 1}, rt::token_choice{.top_k = 2},
                                      rt::token_choice{.top_k = 3, .score = rs::score::identity}})
    check_same_plan(ra::grap_cosine{.num_experts = E}, dir, x, exact, T, d, E);

  strided<float> w(E, d, 0, 0.0f);
  w.fill_normal(rng);
  const dense wd = to_dense(w.cview());
  std::vector<float> xc;
  const std::vector<float> exact_c = separated_tokens(
      rng, T, d, E, [&](const dense& xt) { return ref_cosine(xt, wd, 0.5); }, xc, 1e-4);
  check_same_plan(ra::cosine{.weight = w.cview(), .temperature = 0.5f}, rt::token_choice{.top_k = 2}, xc, exact_c, T, d,
                  E);
}

}  // namespace
