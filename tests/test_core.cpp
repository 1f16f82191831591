// Core building blocks against independent references: views against pointer arithmetic, the per-row
// top-k kernels against std::stable_sort brute force over rows full of exact ties, the score kernels
// against closed forms evaluated in double, and the random-priority hash.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <type_traits>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/resonance.hpp>

#include "random_inputs.hpp"

namespace {

namespace rs = resonance;
namespace rd = resonance::detail;
using resonance_test::usz;

// ---------------------------------------------------------------------------------------------------
// Views

TEST_CASE("test_core: matrix_view aggregate init, stride default, element access") {
  static_assert(std::is_trivially_copyable_v<rs::matrix_view<float>>);
  static_assert(std::is_aggregate_v<rs::matrix_view<const double>>);
  static_assert(std::is_trivially_copyable_v<rs::vector_view<const float>>);

  // The default member initialiser `stride = cols` must see the cols given in the same braces.
  constexpr rs::matrix_view<const float> c{nullptr, 3, 5};
  static_assert(c.stride == 5 && c.size() == 15 && !c.empty());
  static_assert(rs::matrix_view<const float>{}.empty());
  static_assert(rs::matrix_view<const float>{nullptr, 0, 4}.empty());
  static_assert(rs::matrix_view<const float>{nullptr, 4, 0}.empty());

  std::vector<float> buf(40);
  std::iota(buf.begin(), buf.end(), 0.0f);
  const rs::matrix_view<float> dense{buf.data(), 4, 10};
  CHECK(dense.stride == 10);
  const rs::matrix_view<float> m{buf.data(), 3, 4, 13};
  CHECK(m.rows == 3);
  CHECK(m.cols == 4);
  CHECK(m.stride == 13);
  CHECK(m.size() == 12);
  for (rs::index r = 0; r < m.rows; ++r) {
    CHECK(m.row(r) == buf.data() + r * 13);
    for (rs::index col = 0; col < m.cols; ++col) {
      CHECK(&m(r, col) == buf.data() + r * 13 + col);
      CHECK(m(r, col) == static_cast<float>(r * 13 + col));
    }
  }
  // Writes through operator() land at data[r * stride + c].
  m(2, 3) = -1.0f;
  CHECK(buf[2 * 13 + 3] == -1.0f);

  // Conversion to a const view keeps every field.
  const rs::matrix_view<const float> cm = m;
  CHECK(cm.data == buf.data());
  CHECK(cm.rows == 3);
  CHECK(cm.cols == 4);
  CHECK(cm.stride == 13);
  CHECK(&cm(1, 2) == &m(1, 2));
  // Equality compares identity (pointer and extents), not contents.
  CHECK(m == rs::matrix_view<float>{buf.data(), 3, 4, 13});
  CHECK_FALSE(m == rs::matrix_view<float>{buf.data(), 3, 4});
  static_assert(!std::is_convertible_v<rs::matrix_view<const float>, rs::matrix_view<float>>);
}

TEST_CASE("test_core: vector_view access, span and const conversion") {
  std::vector<int> v{5, 6, 7, 8};
  const rs::vector_view<int> w = rs::make_vector_view(std::span<int>(v));
  CHECK(w.size == 4);
  CHECK(w.data == v.data());
  CHECK_FALSE(w.empty());
  for (rs::index i = 0; i < w.size; ++i) CHECK(&w[i] == v.data() + i);
  w[1] = 60;
  CHECK(v[1] == 60);
  const rs::vector_view<const int> cw = w;
  CHECK(cw.data == v.data());
  CHECK(cw.size == 4);
  const std::span<const int> s = cw.span();
  CHECK(s.data() == v.data());
  CHECK(s.size() == 4u);
  CHECK(rs::vector_view<const int>{}.empty());
  CHECK(rs::vector_view<const int>{}.span().empty());
  static_assert(!std::is_convertible_v<rs::vector_view<const int>, rs::vector_view<int>>);
}

// ---------------------------------------------------------------------------------------------------
// Top-k

// Brute force: ids ranked by value descending with ties to the lower id (stable sort of ascending ids).
std::vector<rs::id_type> brute_topk(const std::vector<float>& v, const std::vector<rs::id_type>& pool, rs::index k) {
  std::vector<rs::id_type> ids = pool;
  std::stable_sort(ids.begin(), ids.end(), [&](rs::id_type a, rs::id_type b) { return v[usz(a)] > v[usz(b)]; });
  ids.resize(usz(k));
  return ids;
}

std::vector<rs::id_type> iota_ids(rs::index n) {
  std::vector<rs::id_type> ids(usz(n));
  std::iota(ids.begin(), ids.end(), 0);
  return ids;
}

TEST_CASE("test_core: topk_row equals a stable-sort brute force on rows with many ties") {
  std::mt19937_64 rng(11);
  // Few distinct values (and -0 beside +0) so that almost every selection is decided by a tie.
  const std::vector<float> set{-1.5f, -0.0f, 0.0f, 0.5f, 2.0f, 1e-30f};
  for (rs::index n = 1; n <= 17; ++n) {
    for (int rep = 0; rep < 20; ++rep) {
      const std::vector<float> v = resonance_test::draw_from(rng, n, set);
      for (rs::index k = 1; k <= n; ++k) {
        CAPTURE(n);
        CAPTURE(k);
        std::vector<float> vals(usz(k), 99.0f);
        std::vector<rs::id_type> ids(usz(k), -7);
        rd::topk_row(
            n, k, [&](rs::index i) { return v[usz(i)]; }, vals.data(), ids.data());
        const std::vector<rs::id_type> want = brute_topk(v, iota_ids(n), k);
        CHECK(ids == want);
        for (rs::index j = 0; j < k; ++j) CHECK(vals[usz(j)] == v[usz(want[usz(j)])]);
      }
    }
  }
}

TEST_CASE("test_core: topk_row on all-equal and strictly monotone rows") {
  for (rs::index n : {1, 5, 32}) {
    for (rs::index k : {rs::index{1}, n / 2 + 1, n}) {
      std::vector<float> vals(usz(k));
      std::vector<rs::id_type> ids(usz(k));
      // All equal: the lowest ids, ascending.
      rd::topk_row(
          n, k, [](rs::index) { return 3.0f; }, vals.data(), ids.data());
      for (rs::index j = 0; j < k; ++j) CHECK(ids[usz(j)] == j);
      // Increasing values: the highest ids, descending.
      rd::topk_row(
          n, k, [](rs::index i) { return static_cast<float>(i); }, vals.data(), ids.data());
      for (rs::index j = 0; j < k; ++j) CHECK(ids[usz(j)] == n - 1 - j);
    }
  }
}

// Brute-force group-limited top-k: group scores summed in fp32 from exactly representable values (so
// the order of summation cannot matter), groups ranked with ties to the lower group, then a plain
// top-k over the members of the kept groups.
std::vector<rs::id_type> brute_group_topk(const std::vector<float>& v, rs::index k, rs::index G, rs::index M,
                                          rd::group_score_kind kind) {
  const rs::index n = static_cast<rs::index>(v.size()), size = n / G;
  rs::index m = 1;
  if (kind == rd::group_score_kind::top_m_sum) m = k / M;
  if (kind == rd::group_score_kind::top2_sum) m = 2;
  m = std::min(m, size);
  std::vector<float> gscore(usz(G));
  for (rs::index g = 0; g < G; ++g) {
    std::vector<float> members(v.begin() + g * size, v.begin() + (g + 1) * size);
    std::sort(members.begin(), members.end(), std::greater<>());
    float s = 0.0f;
    for (rs::index j = 0; j < m; ++j) s += members[usz(j)];
    gscore[usz(g)] = s;
  }
  const std::vector<rs::id_type> groups = brute_topk(gscore, iota_ids(G), M);
  std::vector<rs::id_type> pool;
  for (rs::index e = 0; e < n; ++e)
    if (std::find(groups.begin(), groups.end(), static_cast<rs::id_type>(e / size)) != groups.end())
      pool.push_back(static_cast<rs::id_type>(e));
  return brute_topk(v, pool, k);
}

TEST_CASE("test_core: group_limited_topk_row equals brute force for every group score kind") {
  std::mt19937_64 rng(12);
  // Multiples of 0.25: every fp32 sum of a few of them is exact, and group-score ties are frequent.
  const std::vector<float> set{-1.0f, -0.25f, 0.0f, 0.25f, 0.5f, 1.0f};
  const rd::group_score_kind kinds[] = {rd::group_score_kind::top_m_sum, rd::group_score_kind::top2_sum,
                                        rd::group_score_kind::max};
  int checked = 0;
  for (rs::index n : {2, 4, 6, 8, 12, 16}) {
    for (rs::index G = 2; G <= n; ++G) {
      if (n % G != 0) continue;
      for (rs::index M = 1; M <= G; ++M) {
        for (rs::index k = 1; k <= M * (n / G); ++k) {
          for (auto kind : kinds) {
            if (kind == rd::group_score_kind::top_m_sum && k / M < 1) continue;
            for (int rep = 0; rep < 3; ++rep) {
              const std::vector<float> v = resonance_test::draw_from(rng, n, set);
              CAPTURE(n);
              CAPTURE(G);
              CAPTURE(M);
              CAPTURE(k);
              CAPTURE(static_cast<int>(kind));
              const rs::index scratch = rd::group_topk_scratch(G, k, M);
              std::vector<float> fs(usz(scratch), 0.0f), vals(usz(k));
              std::vector<rs::id_type> is(usz(scratch), 0), ids(usz(k), -1);
              rd::group_limited_topk_row(
                  n, k, G, M, kind, [&](rs::index i) { return v[usz(i)]; }, vals.data(), ids.data(), fs.data(),
                  is.data());
              const std::vector<rs::id_type> want = brute_group_topk(v, k, G, M, kind);
              CHECK(ids == want);
              for (rs::index j = 0; j < k; ++j) CHECK(vals[usz(j)] == v[usz(want[usz(j)])]);
              ++checked;
            }
          }
        }
      }
    }
  }
  CHECK(checked > 1000);
}

TEST_CASE("test_core: group_limited_topk_row sends tied group scores to the lowest group") {
  // Four groups of two. By top-2 sum every group scores 2, so the two lowest groups win; by max (and
  // top_m_sum with m = k / group_topk = 1) group 3 leads and groups 0, 1, 2 tie, so group 0 joins it.
  const std::vector<float> v{1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 2.0f, 0.0f};
  std::vector<float> fs(16), vals(2);
  std::vector<rs::id_type> is(16), ids(2);
  auto key = [&](rs::index i) { return v[usz(i)]; };
  rd::group_limited_topk_row(8, 2, 4, 2, rd::group_score_kind::top_m_sum, key, vals.data(), ids.data(), fs.data(),
                             is.data());
  // top_m_sum with m = 1 is the max: group 3 (2.0) first, then the lowest of the tied groups (0).
  CHECK(ids == std::vector<rs::id_type>{6, 0});
  rd::group_limited_topk_row(8, 2, 4, 2, rd::group_score_kind::top2_sum, key, vals.data(), ids.data(), fs.data(),
                             is.data());
  // top2_sum: all four groups score 2.0, so groups 0 and 1 are kept; experts 0 and 1 win the tie.
  CHECK(ids == std::vector<rs::id_type>{0, 1});
  rd::group_limited_topk_row(8, 2, 4, 2, rd::group_score_kind::max, key, vals.data(), ids.data(), fs.data(), is.data());
  CHECK(ids == std::vector<rs::id_type>{6, 0});
}

TEST_CASE("test_core: sort_by_id sorts pairs by id and keeps each value with its id") {
  std::mt19937_64 rng(13);
  for (rs::index n = 0; n <= 12; ++n) {
    for (int rep = 0; rep < 10; ++rep) {
      std::vector<rs::id_type> ids = iota_ids(n);
      for (auto& id : ids) id = id * 3 + 1;  // sparse ids
      std::shuffle(ids.begin(), ids.end(), rng);
      std::vector<float> vals(usz(n));
      for (rs::index i = 0; i < n; ++i) vals[usz(i)] = static_cast<float>(ids[usz(i)]) * 0.5f;  // value tracks id
      rd::sort_by_id(ids.data(), vals.data(), n);
      CHECK(std::is_sorted(ids.begin(), ids.end()));
      for (rs::index i = 0; i < n; ++i) {
        CHECK(ids[usz(i)] == i * 3 + 1);
        CHECK(vals[usz(i)] == static_cast<float>(ids[usz(i)]) * 0.5f);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Score functions

bool close(double got, double want, double rel, double abs = 0.0) {
  return std::fabs(got - want) <= rel * std::fabs(want) + abs;
}

TEST_CASE("test_core: softmax_row matches exp/sum in double and sums to one") {
  std::mt19937_64 rng(14);
  for (rs::index n : {1, 2, 7, 64, 257}) {
    for (float scale : {1.0f, 0.5f, 3.0f}) {
      for (double spread : {1.0, 10.0, 200.0}) {
        std::vector<float> in = resonance_test::normal_values(rng, n, spread);
        if (spread > 100.0) in[0] = 1000.0f;  // would overflow expf without the max subtraction
        std::vector<float> out(usz(n), -1.0f);
        rd::softmax_row(in.data(), out.data(), n, scale);
        double m = -std::numeric_limits<double>::infinity();
        for (float x : in) m = std::max(m, static_cast<double>(x) * scale);
        double sum = 0.0;
        for (float x : in) sum += std::exp(static_cast<double>(x) * scale - m);
        double total = 0.0;
        for (rs::index i = 0; i < n; ++i) {
          const double want = std::exp(static_cast<double>(in[usz(i)]) * scale - m) / sum;
          CAPTURE(n);
          CAPTURE(i);
          CHECK(std::isfinite(out[usz(i)]));
          // fp32 rounds the exponent's argument: error ~ eps * (|x * scale| + |max|) relative.
          const double rel = 4e-7 * (4.0 + std::fabs(static_cast<double>(in[usz(i)]) * scale) + std::fabs(m));
          CHECK(close(out[usz(i)], want, rel, 1e-30));
          total += out[usz(i)];
        }
        CHECK(std::fabs(total - 1.0) <= 1e-5);
      }
    }
  }
  // Equal inputs give exactly equal outputs (ties survive scoring).
  const std::vector<float> eq{0.3f, 0.3f, 0.3f, 0.3f};
  std::vector<float> out(4);
  rd::softmax_row(eq.data(), out.data(), 4, 1.0f);
  for (float o : out) CHECK(o == 0.25f);
}

TEST_CASE("test_core: sigmoid and sqrt_softplus match closed forms in double") {
  std::vector<float> xs;
  for (int i = -400; i <= 400; ++i) xs.push_back(static_cast<float>(i) * 0.1f);
  for (float x : {-87.0f, -60.0f, -30.0f, 19.99f, 20.0f, 20.01f, 21.0f, 50.0f, 88.0f, 100.0f, 1e4f, 1e30f, 3e38f})
    xs.push_back(x);
  for (float x : xs) {
    CAPTURE(x);
    const double z = x;
    const double sig = 1.0 / (1.0 + std::exp(-z));
    CHECK(close(rd::sigmoid(x), sig, 2e-6, 1e-45));
    CHECK(rd::elementwise_score(rs::score::sigmoid, x) == rd::sigmoid(x));
    // softplus(z) = log(1 + e^z) = max(z, 0) + log1p(e^-|z|), stable for every z.
    const double softplus = std::max(z, 0.0) + std::log1p(std::exp(-std::fabs(z)));
    const float got = rd::sqrt_softplus(x);
    CHECK(std::isfinite(got));
    CHECK(close(got, std::sqrt(softplus), 2e-6));
    CHECK(rd::elementwise_score(rs::score::sqrt_softplus, x) == got);
    CHECK(rd::elementwise_score(rs::score::identity, x) == x);
    // Above torch's threshold softplus is the identity exactly.
    if (x > 20.0f) CHECK(rd::softplus(x) == x);
  }
  // Very negative x: the result underflows gracefully, never NaN or negative.
  for (float x : {-100.0f, -200.0f, -1e10f, -3e38f}) {
    CAPTURE(x);
    CHECK(rd::sigmoid(x) >= 0.0f);
    CHECK(rd::sigmoid(x) < 1e-30f);
    CHECK(rd::sqrt_softplus(x) >= 0.0f);
    CHECK(rd::sqrt_softplus(x) < 1e-15f);
  }
}

TEST_CASE("test_core: score_row applies the scale before the score function") {
  std::mt19937_64 rng(15);
  const std::vector<float> in = resonance_test::normal_values(rng, 9, 2.0);
  for (rs::score fn : {rs::score::sigmoid, rs::score::sqrt_softplus, rs::score::identity}) {
    std::vector<float> out(9);
    rd::score_row(fn, in.data(), out.data(), 9, 0.5f);
    for (rs::index i = 0; i < 9; ++i) CHECK(out[usz(i)] == rd::elementwise_score(fn, in[usz(i)] * 0.5f));
  }
  std::vector<float> a(9), b(9);
  rd::score_row(rs::score::softmax, in.data(), a.data(), 9, 0.5f);
  rd::softmax_row(in.data(), b.data(), 9, 0.5f);
  CHECK(a == b);
}

TEST_CASE("test_core: logsumexp_row matches log(sum(exp)) in double") {
  std::mt19937_64 rng(16);
  for (rs::index n : {1, 3, 8, 100}) {
    for (double spread : {0.1, 5.0, 500.0}) {
      std::vector<float> in = resonance_test::normal_values(rng, n, spread);
      double m = -std::numeric_limits<double>::infinity();
      for (float x : in) m = std::max(m, static_cast<double>(x));
      double sum = 0.0;
      for (float x : in) sum += std::exp(static_cast<double>(x) - m);
      CAPTURE(n);
      CAPTURE(spread);
      CHECK(close(rd::logsumexp_row(in.data(), n), m + std::log(sum), 1e-6, 1e-6));
    }
  }
  // Closed forms: n equal entries c give c + log n; huge magnitudes do not overflow.
  const std::vector<float> big{1000.0f, 1000.0f, 1000.0f, 1000.0f};
  CHECK(close(rd::logsumexp_row(big.data(), 4), 1000.0 + std::log(4.0), 1e-7));
  const std::vector<float> neg{-1000.0f, -1000.0f};
  CHECK(close(rd::logsumexp_row(neg.data(), 2), -1000.0 + std::log(2.0), 1e-7));
}

// ---------------------------------------------------------------------------------------------------
// Random priority

TEST_CASE("test_core: random_priority is deterministic and differs across token, expert and seed") {
  std::set<std::uint64_t> seen;
  std::vector<int> bit_count(64, 0);
  int total = 0;
  for (std::uint64_t seed : {0ull, 1ull, 42ull, 0xFFFFFFFFFFFFFFFFull}) {
    for (std::uint64_t t = 0; t < 64; ++t) {
      for (std::uint64_t e = 0; e < 16; ++e) {
        const std::uint64_t p = rd::random_priority(seed, t, e);
        CHECK(p == rd::random_priority(seed, t, e));
        seen.insert(p);
        for (int b = 0; b < 64; ++b) bit_count[usz(b)] += static_cast<int>((p >> b) & 1u);
        ++total;
      }
    }
  }
  // Every (seed, token, expert) triple gets its own value: no collision among 4096 64-bit hashes.
  CHECK(seen.size() == static_cast<std::size_t>(total));
  // Token and expert are not interchangeable.
  CHECK(rd::random_priority(0, 3, 5) != rd::random_priority(0, 5, 3));
  // Each output bit is set about half the time (loose bound: 6 sigma is ~0.047 for 4096 samples).
  for (int b = 0; b < 64; ++b) {
    CAPTURE(b);
    const double frac = static_cast<double>(bit_count[usz(b)]) / total;
    CHECK(frac > 0.4);
    CHECK(frac < 0.6);
  }
}

}  // namespace
