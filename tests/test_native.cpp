// backend::native: the instruction set is picked at run time and can be changed; every table this build
// and CPU have returns bitwise what the scalar reference returns, and its top-k is the brute-force one.
// (The plans of backend::native on every table are checked by the conformance suite, tests/backends.hpp.)

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/backend/native.hpp>

#include "backends.hpp"
#include "error_of.hpp"

namespace {

namespace rs = resonance;
using resonance_test::error_of;
using resonance_test::native_isa_guard;

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// A row of n entries: normal values, with ties (values drawn from a small set) and, when asked, a NaN
// or an infinity at a random place.
std::vector<float> make_row(std::mt19937& g, rs::index n, bool ties, int special) {
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::uniform_int_distribution<int> small(-3, 3);
  std::vector<float> x(static_cast<std::size_t>(n));
  for (float& v : x) v = ties ? static_cast<float>(small(g)) * 0.5f : normal(g);
  if (special != 0 && n > 0) {
    const auto at = static_cast<std::size_t>(std::uniform_int_distribution<rs::index>(0, n - 1)(g));
    x[at] = special == 1 ? std::numeric_limits<float>::quiet_NaN() : -std::numeric_limits<float>::infinity();
  }
  return x;
}

// The brute-force top-k: every index sorted by key descending, then index ascending.
void brute_topk(const std::vector<float>& x, rs::index k, float scale, const float* bias, std::vector<float>& vals,
                std::vector<rs::id_type>& ids) {
  const rs::index n = static_cast<rs::index>(x.size());
  std::vector<float> key(x.size());
  for (rs::index i = 0; i < n; ++i) {
    const auto u = static_cast<std::size_t>(i);
    key[u] = bias != nullptr ? x[u] * scale + bias[u] : x[u] * scale;
  }
  std::vector<rs::index> order(x.size());
  std::iota(order.begin(), order.end(), rs::index{0});
  std::stable_sort(order.begin(), order.end(), [&](rs::index a, rs::index b) {
    return key[static_cast<std::size_t>(a)] > key[static_cast<std::size_t>(b)];
  });
  vals.assign(static_cast<std::size_t>(k), 0.0f);
  ids.assign(static_cast<std::size_t>(k), 0);
  for (rs::index j = 0; j < k; ++j) {
    vals[static_cast<std::size_t>(j)] = key[static_cast<std::size_t>(order[static_cast<std::size_t>(j)])];
    ids[static_cast<std::size_t>(j)] = static_cast<rs::id_type>(order[static_cast<std::size_t>(j)]);
  }
}

}  // namespace

TEST_CASE("native: the instruction sets, the choice and its errors") {
  const std::vector<std::string> isas = rs::native_isas();
  REQUIRE(!isas.empty());
  CHECK(isas.back() == "scalar");
  CHECK(std::find(isas.begin(), isas.end(), rs::native_isa()) != isas.end());
  const native_isa_guard guard;
  for (const std::string& isa : isas) {
    rs::set_native_isa(isa);
    CHECK(rs::native_isa() == isa);
  }
  const std::string before = rs::native_isa();
  const std::string e = error_of([] { rs::set_native_isa("avx9000"); });
  CHECK(e.find("isa") != std::string::npos);
  CHECK(e.find("scalar") != std::string::npos);  // the message lists the choices
  CHECK(e.find("avx9000") != std::string::npos);
  CHECK(rs::native_isa() == before);  // a refused choice changes nothing
}

TEST_CASE("native: every table's rows are the scalar reference's, bit for bit, and top-k is the brute force's") {
  using scalar = rs::detail::scalar_rows;
  const native_isa_guard guard;
  std::mt19937 g(71);
  const rs::index lengths[] = {1, 3, 7, 8, 15, 16, 17, 31, 64, 100, 128, 256, 257, 300, 1024, 1031};
  for (const std::string& isa : rs::native_isas()) {
    CAPTURE(isa);
    rs::set_native_isa(isa);
    // The table itself (native_rows sends short rows to the scalar reference before the table sees them).
    const rs::detail::row_kernels& native = rs::detail::native_kernels();
    REQUIRE(std::string(native.isa) == isa);
    for (const rs::index n : lengths) {
      for (int special : {0, 1, 2}) {
        for (bool ties : {false, true}) {
          CAPTURE(n);
          CAPTURE(special);
          CAPTURE(ties);
          const std::vector<float> x = make_row(g, n, ties, special);
          CHECK(native.all_finite(x.data(), n) == scalar::all_finite(x.data(), n));
          CHECK(native.all_finite(x.data(), n) == (special == 0));
          if (special != 0) continue;
          for (rs::score fn : {rs::score::softmax, rs::score::sigmoid, rs::score::sqrt_softplus, rs::score::identity}) {
            std::vector<float> a(x.size()), b(x.size());
            native.score(fn, x.data(), a.data(), n, 0.7f);
            scalar::score(fn, x.data(), b.data(), n, 0.7f);
            CHECK(same_bits(a, b));
          }
          {
            std::vector<float> a(x.size()), b(x.size());
            native.exp_n(x.data(), a.data(), n);
            scalar::exp_n(x.data(), b.data(), n);
            CHECK(same_bits(a, b));
          }
          const std::vector<float> bias = make_row(g, n, false, 0);
          for (const rs::index k :
               {rs::index{1}, rs::index{2}, rs::index{4}, rs::index{8}, rs::index{16}, rs::index{20}}) {
            if (k > n) continue;
            for (const float* b : {static_cast<const float*>(nullptr), bias.data()}) {
              for (float scale : {1.0f, 0.5f}) {
                std::vector<float> vals(static_cast<std::size_t>(k)), want_vals;
                std::vector<rs::id_type> ids(static_cast<std::size_t>(k)), want_ids;
                REQUIRE(native.topk(x.data(), n, k, scale, b, vals.data(), ids.data()));
                brute_topk(x, k, scale, b, want_vals, want_ids);
                CHECK(ids == want_ids);
                CHECK(same_bits(vals, want_vals));
              }
            }
          }
        }
      }
    }
    // GrAP's group sums of float rows, groups of every size class (under 16, multiples of 16, others).
    for (const rs::index group :
         {rs::index{1}, rs::index{5}, rs::index{16}, rs::index{32}, rs::index{40}, rs::index{64}}) {
      const rs::index E = 6;
      const std::vector<float> row = make_row(g, E * group, false, 0);
      std::vector<double> a(static_cast<std::size_t>(E)), b(static_cast<std::size_t>(E));
      native.group_sums(row.data(), E, group, a.data());
      scalar::group_sums(row.data(), E, group, b.data());
      CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0);
      const double qa = native.group_sums_squares(row.data(), E, group, a.data());
      const double qb = scalar::group_sums_squares(row.data(), E, group, b.data());
      CHECK(std::memcmp(&qa, &qb, sizeof qa) == 0);
      CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0);
    }
  }
}

TEST_CASE("native: the row group sends short rows to the scalar reference and long ones to the table") {
  using rows = rs::detail::native_rows;
  const native_isa_guard guard;
  std::mt19937 g(3);
  for (const std::string& isa : rs::native_isas()) {
    CAPTURE(isa);
    rs::set_native_isa(isa);
    for (const rs::index n : {rs::index{1}, rows::short_row - 1, rows::short_row, rows::short_top_row - 1,
                              rows::short_top_row, rs::index{200}}) {
      CAPTURE(n);
      const std::vector<float> x = make_row(g, n, n % 2 == 0, 0);
      std::vector<float> a(x.size()), b(x.size());
      rows::score(rs::score::softmax, x.data(), a.data(), n, 1.0f);
      rs::detail::scalar_rows::score(rs::score::softmax, x.data(), b.data(), n, 1.0f);
      CHECK(same_bits(a, b));
      const rs::index k = std::min<rs::index>(n, 4);
      std::vector<float> vals(static_cast<std::size_t>(k)), want_vals;
      std::vector<rs::id_type> ids(static_cast<std::size_t>(k)), want_ids;
      REQUIRE(rows::topk(x.data(), n, k, 1.0f, nullptr, vals.data(), ids.data()));
      brute_topk(x, k, 1.0f, nullptr, want_vals, want_ids);
      CHECK(ids == want_ids);
      CHECK(same_bits(vals, want_vals));
    }
  }
}

TEST_CASE("native: the default is the first of native_isas(), AVX2 before AVX-512") {
  const std::vector<std::string> isas = rs::native_isas();
  const auto at = [&](const char* name) { return std::find(isas.begin(), isas.end(), name) - isas.begin(); };
  if (std::find(isas.begin(), isas.end(), "avx512bw") != isas.end()) CHECK(at("avx2") < at("avx512bw"));
#if RESONANCE_HAS_SIMD
  CHECK(isas.front() != "scalar");  // a build with xsimd vectorises on any CPU it runs on
#endif
}

#if RESONANCE_HAS_TBB
TEST_CASE("native: backend::cpu is tbb<> over native's rows") {
  static_assert(std::is_same_v<rs::backend::cpu, rs::backend::tbb<>>);
  static_assert(std::is_same_v<rs::backend::tbb<>::inner_type, rs::backend::native>);
}
#endif
