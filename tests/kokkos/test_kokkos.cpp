// backend::kokkos<Kokkos::Serial>: every execution primitive against an independent brute-force
// reference (a loop for the scan, std::stable_sort for the counting sort, a full sort for the
// selection), the radix select alone against std::nth_element, and whole routes, whose plans must be
// serial's bit for bit once mirrored with to_host; then the generic conformance suite
// (tests/conformance.hpp).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <Kokkos_Core.hpp>
#include <doctest/doctest.h>

#include <resonance/backend/kokkos.hpp>
#include <resonance/core/select.hpp>
#include <resonance/resonance.hpp>

#include "backends.hpp"
#include "conformance.hpp"
#include "random_inputs.hpp"

namespace {

namespace rs = resonance;
namespace rt = resonance::routing;
namespace ra = resonance::affinity;
namespace cap = resonance::capacity;
using resonance_test::usz;
using rs::id_type;
using rs::index;

using kk = rs::backend::kokkos<Kokkos::Serial>;
using kk_space = rs::kokkos_space<Kokkos::HostSpace>;

static_assert(rs::execution_backend<kk>);
static_assert(std::is_same_v<kk::memory_space, kk_space>);
static_assert(std::is_same_v<kk::buffer<float>, Kokkos::View<float*, Kokkos::HostSpace>>);
static_assert(std::is_same_v<kk::group::rows, rs::detail::scalar_rows>);
static_assert(rs::host_accessible_v<kk_space>);
static_assert(rs::accessible_from_v<rs::host_space, kk_space>);
static_assert(rs::accessible_from_v<kk_space, rs::host_space>);
static_assert(std::copyable<kk>);

index isize(const auto& v) { return static_cast<index>(v.size()); }

// Host data into a fresh View of the backend's space (allocate + copy), and back (copy_to_host).
template <class T>
kk::buffer<T> to_device(const kk& be, const std::vector<T>& v) {
  auto b = allocate<T>(be, isize(v));
  copy(be, b.data(), v.data(), isize(v));
  return b;
}

template <class T>
std::vector<T> to_vector(const kk& be, const kk::buffer<T>& b, index n) {
  std::vector<T> v(usz(n));
  copy_to_host(be, v.data(), b.data(), n);
  fence(be);
  return v;
}

// Sizes that cross the counting sort's 2048-index chunks, 0 and 1 included.
constexpr index sizes[] = {0, 1, 2, 7, 255, 2047, 2048, 2049, 4097, 30011};

// ---------------------------------------------------------------------------------------------------
// for_each, for_each_group, reduce_min

TEST_CASE("test_kokkos: for_each visits every index once, whatever the grain") {
  const kk be;
  for (index n : sizes) {
    for (index grain : {index{0}, index{1}, index{7}, index{1000}}) {
      auto hits = to_device(be, std::vector<id_type>(usz(n), 0));
      id_type* h = hits.data();
      for_each(
          be, n, [=](index i) { h[i] += static_cast<id_type>(3 * i + 1); }, grain);
      const std::vector<id_type> got = to_vector(be, hits, n);
      for (index i = 0; i < n; ++i) REQUIRE_MESSAGE(got[usz(i)] == 3 * i + 1, "n=" << n << " grain=" << grain);
    }
  }
}

TEST_CASE("test_kokkos: for_each_group returns the lowest failing row and gives each row its scratch") {
  const kk be;
  std::mt19937_64 rng(1);
  for (index n : sizes) {
    for (index bytes : {index{0}, index{8}, index{1000}}) {
      // Rows fail with probability 0, 1/50 or 1: the lowest failing row (or n) is the answer.
      for (int rate : {0, 50, 1}) {
        std::vector<unsigned char> fails(usz(n), 0);
        if (rate > 0)
          for (auto& f : fails) f = rng() % static_cast<unsigned>(rate) == 0 ? 1 : 0;
        const auto first = std::find(fails.begin(), fails.end(), 1);
        const index want = first - fails.begin();
        auto flags = to_device(be, fails);
        auto visits = to_device(be, std::vector<id_type>(usz(n), 0));
        const unsigned char* fl = flags.data();
        id_type* vis = visits.data();
        const index got = for_each_group(be, n, bytes, [=](const kk::group& g, index i) {
          ++vis[i];
          if (bytes > 0) {
            // The scratch is this row's: aligned, writable over `bytes` bytes, and not shared.
            if (reinterpret_cast<std::uintptr_t>(g.scratch()) % 8 != 0) return true;
            auto* s = static_cast<unsigned char*>(g.scratch());
            for (index b = 0; b < bytes; ++b) s[b] = static_cast<unsigned char>(i + b);
            for (index b = 0; b < bytes; ++b)
              if (s[b] != static_cast<unsigned char>(i + b)) return true;
          }
          return fl[i] != 0;
        });
        CHECK_MESSAGE(got == want, "n=" << n << " bytes=" << bytes << " rate=" << rate);
        // Every row runs, failing or not (the result does not depend on stopping early).
        const std::vector<id_type> v = to_vector(be, visits, n);
        CHECK(std::all_of(v.begin(), v.end(), [](id_type x) { return x == 1; }));
      }
    }
  }
}

TEST_CASE("test_kokkos: for_each_group with a void body returns n") {
  const kk be;
  for (index n : sizes) {
    auto out = to_device(be, std::vector<id_type>(usz(n), -1));
    id_type* o = out.data();
    const index got = for_each_group(be, n, 16, [=](const auto& g, index i) { o[i] = g.scratch() != nullptr ? 1 : 0; });
    CHECK(got == n);
    const std::vector<id_type> v = to_vector(be, out, n);
    CHECK(std::all_of(v.begin(), v.end(), [](id_type x) { return x == 1; }));
  }
}

TEST_CASE("test_kokkos: reduce_min is the minimum of f, and no_index over an empty range") {
  const kk be;
  std::mt19937_64 rng(2);
  for (index n : sizes) {
    std::vector<index> values(usz(n));
    for (auto& v : values) v = static_cast<index>(rng() % 1000000) + 5;
    if (n > 3) values[usz(n / 3)] = 4;  // a unique minimum somewhere inside
    const index want = n == 0 ? rs::no_index : *std::min_element(values.begin(), values.end());
    const auto dev = to_device(be, values);
    const index* d = dev.data();
    for (index grain : {index{0}, index{3}}) {
      CHECK(reduce_min(
                be, n, [=](index i) { return d[i]; }, grain) == want);
      // reduce_min_into: the same minimum into the backend's memory, over what was there before.
      auto result = allocate<index>(be, 1);
      const std::vector<index> stale{-5};
      copy(be, result.data(), stale.data(), 1);
      reduce_min_into(
          be, n, [=](index i) { return d[i]; }, result.data(), grain);
      CHECK(to_vector(be, result, 1)[0] == want);
    }
    // An id_type-valued f is an index-valued one.
    CHECK(reduce_min(be, n, [=](index i) { return static_cast<id_type>(d[i] % 1000); }) ==
          (n == 0 ? rs::no_index : [&] {
            index m = rs::no_index;
            for (index v : values) m = std::min(m, v % 1000);
            return m;
          }()));
  }
}

// ---------------------------------------------------------------------------------------------------
// exclusive_scan

TEST_CASE("test_kokkos: exclusive_scan writes n + 1 prefix sums, in place or not") {
  const kk be;
  std::mt19937_64 rng(3);
  for (index n : sizes) {
    std::vector<id_type> in(usz(n));
    for (auto& v : in) v = static_cast<id_type>(rng() % 17);
    std::vector<id_type> want(usz(n + 1));
    id_type running = 0;
    for (index i = 0; i < n; ++i) {
      want[usz(i)] = running;
      running += in[usz(i)];
    }
    want[usz(n)] = running;

    const auto src = to_device(be, in);
    auto dst = to_device(be, std::vector<id_type>(usz(n + 1), -7));
    exclusive_scan(be, src.data(), dst.data(), n);
    CHECK_MESSAGE(to_vector(be, dst, n + 1) == want, "n=" << n);
    CHECK(to_vector(be, src, n) == in);  // the input is only read

    std::vector<id_type> padded = in;
    padded.push_back(-7);
    auto both = to_device(be, padded);
    exclusive_scan(be, both.data(), both.data(), n);
    CHECK_MESSAGE(to_vector(be, both, n + 1) == want, "in place, n=" << n);
  }
}

// ---------------------------------------------------------------------------------------------------
// stable_bucket

enum class key_kind { uniform, one_bin, skewed, sorted_descending };

std::vector<id_type> bucket_keys(std::mt19937_64& rng, index n, index nbins, key_kind kind) {
  std::vector<id_type> k(usz(n));
  for (index i = 0; i < n; ++i) {
    switch (kind) {
      case key_kind::uniform:
        k[usz(i)] = static_cast<id_type>(rng() % static_cast<std::uint64_t>(nbins));
        break;
      case key_kind::one_bin:
        k[usz(i)] = static_cast<id_type>(nbins - 1);
        break;
      case key_kind::skewed:  // most keys in two bins, a few elsewhere
        k[usz(i)] = static_cast<id_type>(
            rng() % static_cast<std::uint64_t>(rng() % 8 != 0 ? std::min<index>(nbins, 2) : nbins));
        break;
      case key_kind::sorted_descending:
        k[usz(i)] = static_cast<id_type>((n - 1 - i) * nbins / n);
        break;
    }
  }
  return k;
}

TEST_CASE("test_kokkos: stable_bucket equals std::stable_sort by bin") {
  const kk be;
  std::mt19937_64 rng(4);
  for (index n : sizes) {
    for (index nbins : {index{1}, index{3}, index{64}, index{1000}}) {
      for (key_kind kind : {key_kind::uniform, key_kind::one_bin, key_kind::skewed, key_kind::sorted_descending}) {
        const std::vector<id_type> keys = bucket_keys(rng, n, nbins, kind);
        std::vector<id_type> want_perm(usz(n));
        std::iota(want_perm.begin(), want_perm.end(), id_type{0});
        std::stable_sort(want_perm.begin(), want_perm.end(),
                         [&](id_type a, id_type b) { return keys[usz(a)] < keys[usz(b)]; });
        std::vector<id_type> want_start(usz(nbins + 1), 0);
        for (id_type key : keys) ++want_start[usz(key + 1)];
        std::partial_sum(want_start.begin(), want_start.end(), want_start.begin());

        const auto dkeys = to_device(be, keys);
        auto start = to_device(be, std::vector<id_type>(usz(nbins + 1), -1));
        auto perm = to_device(be, std::vector<id_type>(usz(n), -1));
        auto work = allocate<unsigned char>(be, stable_bucket_workspace(be, n, nbins));
        stable_bucket(be, dkeys.data(), n, nbins, start.data(), perm.data(), work.data());
        const std::string what = "n=" + std::to_string(n) + " nbins=" + std::to_string(nbins) +
                                 " kind=" + std::to_string(static_cast<int>(kind));
        CHECK_MESSAGE(to_vector(be, start, nbins + 1) == want_start, what);
        CHECK_MESSAGE(to_vector(be, perm, n) == want_perm, what);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// The radix select and segmented_select

// n distinct keys. Prefix kinds: random, sharing their top 56 bits (all differ in the last byte only),
// sharing the top 32 bits (a score's bits then a token id), and clustered: a few long shared prefixes.
enum class prefix_kind { random, last_byte, low_word, clustered };

std::vector<std::uint64_t> unique_keys(std::mt19937_64& rng, index n, prefix_kind kind) {
  std::vector<std::uint64_t> v;
  v.reserve(usz(n));
  const std::uint64_t base = rng();
  std::uint64_t clusters[3] = {rng(), rng(), rng()};
  while (isize(v) < n) {
    std::uint64_t x = 0;
    switch (kind) {
      case prefix_kind::random:
        x = rng();
        break;
      case prefix_kind::last_byte:
        x = (base & ~std::uint64_t{0xFF}) | (rng() & 0xFF);
        break;
      case prefix_kind::low_word:
        x = (base & ~std::uint64_t{0xFFFFFFFF}) | (rng() & 0xFFFFFFFF);
        break;
      case prefix_kind::clustered:  // 3 prefixes of 52 bits; 12 free bits
        x = (clusters[rng() % 3] & ~std::uint64_t{0xFFF}) | (rng() & 0xFFF);
        break;
    }
    v.push_back(x);
    if (isize(v) == n || isize(v) % 64 == 0) {
      std::sort(v.begin(), v.end());
      v.erase(std::unique(v.begin(), v.end()), v.end());
    }
  }
  std::shuffle(v.begin(), v.end(), rng);
  return v;
}

TEST_CASE("test_kokkos: radix_kth_largest equals std::nth_element on unique keys") {
  std::mt19937_64 rng(5);
  std::vector<id_type> histogram(usz(rs::detail::radix_select_bins));
  for (prefix_kind kind :
       {prefix_kind::random, prefix_kind::last_byte, prefix_kind::low_word, prefix_kind::clustered}) {
    for (index n : {index{1}, index{2}, index{3}, index{17}, index{255}, index{256}, index{1000}, index{4096}}) {
      if (kind == prefix_kind::last_byte && n > 256) continue;  // only 256 distinct keys exist
      const std::vector<std::uint64_t> keys = unique_keys(rng, n, kind);
      for (index k : {index{1}, index{2}, n / 2 + 1, n - 1, n}) {
        if (k < 1 || k > n) continue;
        std::vector<std::uint64_t> sorted = keys;
        std::nth_element(sorted.begin(), sorted.begin() + (k - 1), sorted.end(), std::greater<>{});
        std::fill(histogram.begin(), histogram.end(), 12345);  // garbage: the function clears it
        const std::uint64_t got = rs::detail::radix_kth_largest(keys.data(), n, k, histogram.data());
        CHECK_MESSAGE(got == sorted[usz(k - 1)], "n=" << n << " k=" << k << " kind=" << static_cast<int>(kind));
      }
    }
  }
  // The extremes of the key range.
  const std::vector<std::uint64_t> edge = {0, 1, std::numeric_limits<std::uint64_t>::max(),
                                           std::numeric_limits<std::uint64_t>::max() - 1, std::uint64_t{1} << 63};
  std::vector<std::uint64_t> desc = edge;
  std::sort(desc.begin(), desc.end(), std::greater<>{});
  for (index k = 1; k <= isize(edge); ++k)
    CHECK(rs::detail::radix_kth_largest(edge.data(), isize(edge), k, histogram.data()) == desc[usz(k - 1)]);
}

TEST_CASE("test_kokkos: segmented_select gives each segment with more than k keys its k-th largest") {
  const kk be;
  std::mt19937_64 rng(6);
  for (index k : {index{0}, index{1}, index{2}, index{5}, index{100}}) {
    for (index nseg : {index{0}, index{1}, index{9}, index{64}}) {
      // Segment sizes: empty, at most k, exactly k + 1, and larger ones (one long one).
      std::vector<id_type> offsets{0};
      std::vector<std::uint64_t> keys;
      for (index s = 0; s < nseg; ++s) {
        index n = 0;
        switch (s % 6) {
          case 0:
            n = 0;
            break;
          case 1:
            n = k;
            break;
          case 2:
            n = k + 1;
            break;
          case 3:
            n = k > 0 ? static_cast<index>(rng() % static_cast<std::uint64_t>(k)) : 0;
            break;
          case 4:
            n = k + 1 + static_cast<index>(rng() % 300);
            break;
          default:
            n = s == 5 ? 20000 : k + 2;
        }
        const std::vector<std::uint64_t> seg =
            unique_keys(rng, n, s % 2 == 0 ? prefix_kind::random : prefix_kind::low_word);
        keys.insert(keys.end(), seg.begin(), seg.end());
        offsets.push_back(static_cast<id_type>(keys.size()));
      }
      constexpr std::uint64_t untouched = 0xDEADBEEF;
      std::vector<std::uint64_t> want(usz(nseg), untouched);
      for (index s = 0; s < nseg; ++s) {
        const index b = offsets[usz(s)], n = offsets[usz(s + 1)] - b;
        if (k < 1 || n <= k) continue;
        std::vector<std::uint64_t> seg(keys.begin() + b, keys.begin() + b + n);
        std::sort(seg.begin(), seg.end(), std::greater<>{});
        want[usz(s)] = seg[usz(k - 1)];
      }
      auto dkeys = to_device(be, keys);
      const auto doffsets = to_device(be, offsets);
      auto kth = to_device(be, std::vector<std::uint64_t>(usz(nseg), untouched));
      auto work = allocate<unsigned char>(be, segmented_select_workspace(be, isize(keys), nseg));
      segmented_select(be, dkeys.data(), doffsets.data(), nseg, k, kth.data(), work.data());
      CHECK_MESSAGE(to_vector(be, kth, nseg) == want, "k=" << k << " nseg=" << nseg);
      // The keys may be permuted inside their segments, never moved across them.
      std::vector<std::uint64_t> after = to_vector(be, dkeys, isize(keys));
      for (index s = 0; s < nseg; ++s) {
        const auto b = keys.begin() + offsets[usz(s)], e = keys.begin() + offsets[usz(s + 1)];
        const auto ab = after.begin() + offsets[usz(s)], ae = after.begin() + offsets[usz(s + 1)];
        CHECK(std::is_permutation(b, e, ab, ae));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// allocate, copy, copy_to_host

TEST_CASE("test_kokkos: allocate, copy and copy_to_host round-trip, empty arrays included") {
  const kk be;
  std::mt19937_64 rng(7);
  for (index n : sizes) {
    const std::vector<float> v = resonance_test::normal_values(rng, n);
    auto a = allocate<float>(be, n);
    CHECK(static_cast<index>(a.extent(0)) == n);
    copy(be, a.data(), v.data(), n);
    auto b = allocate<float>(be, n);
    copy(be, b.data(), a.data(), n);
    std::vector<float> back(usz(n), -1.0f);
    copy_to_host(be, back.data(), b.data(), n);
    fence(be);
    CHECK((n == 0 || std::memcmp(back.data(), v.data(), usz(n) * sizeof(float)) == 0));
  }
}

// ---------------------------------------------------------------------------------------------------
// Whole plans: kokkos<Serial> against serial, bit for bit

// The kokkos plan, mirrored, against serial's: both the bitwise field diff and operator==. The kokkos
// plan lives in host-accessible memory, so it also compares without the mirror.
template <class Route>
void check_same_plan(const std::string& what, const Route& route, bool expect_assignments = true) {
  const kk be;
  const rs::routing_plan want = route(rs::backend::serial{});
  const rs::basic_routing_plan<kk_space> got = route(be);
  const rs::routing_plan mirrored = rs::to_host(be, got);
  const std::string diff = resonance_test::plan_difference(want, mirrored);
  CHECK_MESSAGE(diff.empty(), what << ": " << diff << " differs from serial's");
  CHECK_MESSAGE(mirrored == want, what);
  CHECK_MESSAGE(
      std::equal(got.slot_token().begin(), got.slot_token().end(), want.slot_token().begin(), want.slot_token().end()),
      what << ": slot_token read in place");
  if (expect_assignments) CHECK_MESSAGE(want.num_assignments() > 0, what << ": the serial plan keeps nothing");
}

template <class Direction, class Capacity>
rs::router<ra::precomputed, Direction, Capacity> precomputed_router(const Direction& d, const Capacity& c) {
  return {{}, d, c};
}

struct shape {
  index T, E, k;
};
// Token counts across the counting sort's 2048-index chunks.
constexpr shape shapes[] = {{1, 1, 1}, {7, 3, 2}, {2049, 8, 2}, {5000, 64, 8}};

std::string describe(const std::string& name, const shape& s, bool ties) {
  return name + " T=" + std::to_string(s.T) + " E=" + std::to_string(s.E) + " k=" + std::to_string(s.k) +
         (ties ? " (quantised logits)" : "");
}

TEST_CASE("test_kokkos: routes on kokkos<Serial> mirror to serial's plans bitwise") {
  std::mt19937_64 rng(8);
  for (const shape& s : shapes) {
    for (bool ties : {false, true}) {
      const std::vector<float> x = ties ? resonance_test::grid_values(rng, s.T * s.E, 2, 0.5f)
                                        : resonance_test::normal_values(rng, s.T * s.E, 2.0);
      const std::vector<float> bias = resonance_test::grid_values(rng, s.E, 8, 0.125f);
      const rs::matrix_view<const float> view{x.data(), s.T, s.E};
      const auto check = [&](const std::string& name, const auto& direction, const auto& capacity) {
        const auto r = precomputed_router(direction, capacity);
        check_same_plan(describe(name, s, ties), [&](const auto& be) { return r.route(be, view); });
      };
      const rt::token_choice tc{.top_k = s.k};
      const rt::token_choice sigmoid_bias{.top_k = s.k, .score = rs::score::sigmoid, .expert_bias = {bias.data(), s.E}};
      check("token choice factor 1 drop score", tc, cap::factor{.factor = 1.0});
      check("token choice factor 0.5 drop score", sigmoid_bias, cap::factor{.factor = 0.5});
      check("token choice factor 0.5 drop position pad", tc,
            cap::factor{.factor = 0.5, .drop = rs::drop_policy::position, .pad_to_capacity = true});
      check("token choice factor 0.75 drop random align 8", tc,
            cap::factor{.factor = 0.75, .drop = rs::drop_policy::random, .align = 8, .seed = 7});
      check("token choice factor 1.25 min_capacity 3 pad align 4", sigmoid_bias,
            cap::factor{.factor = 1.25, .min_capacity = 3, .pad_to_capacity = true, .align = 4});
      check("token choice dropless", tc, cap::dropless{});
      check("token choice dropless align 4", sigmoid_bias, cap::dropless{.align = 4});
      check("expert choice", rt::expert_choice{.top_k = s.k}, cap::factor{.factor = 1.0});
      check("causal expert choice pad", rt::expert_choice{.top_k = s.k, .causal = true},
            cap::factor{.factor = 2.0, .pad_to_capacity = true});
      check("bidirectional", rt::bidirectional{.top_k = s.k}, cap::factor{.factor = 0.75});
      check("bidirectional rank score", rt::bidirectional{.top_k = s.k, .rank = rt::rank_by::score},
            cap::factor{.factor = 0.5});
      check("causal bidirectional", rt::bidirectional{.top_k = s.k, .causal = true}, cap::factor{.factor = 0.5});
      const index iterations = s.T * s.E > 200000 ? 5 : 50;
      check("sinkhorn top-1", rt::sinkhorn{.top_k = 1, .max_iterations = iterations}, cap::factor{.factor = 1.0});
      check("sinkhorn top-k dropless", rt::sinkhorn{.top_k = s.k, .max_iterations = iterations}, cap::dropless{});
    }
  }
}

TEST_CASE("test_kokkos: grap_cosine routes on kokkos<Serial> mirror to serial's plans bitwise") {
  std::mt19937_64 rng(9);
  for (const shape& s : {shape{7, 3, 2}, shape{2049, 8, 2}, shape{700, 64, 8}}) {
    const index d = 4 * s.E;  // GrAP needs d to be a multiple of E
    const std::vector<float> x = resonance_test::normal_values(rng, s.T * d);
    const rs::matrix_view<const float> xv{x.data(), s.T, d};
    const auto check = [&](const std::string& name, const auto& direction, const auto& capacity) {
      using router_type =
          rs::router<ra::grap_cosine, std::decay_t<decltype(direction)>, std::decay_t<decltype(capacity)>>;
      const router_type r{ra::grap_cosine{.num_experts = s.E}, direction, capacity};
      check_same_plan(describe(name, s, false), [&](const auto& be) { return r.route(be, xv); });
    };
    check("grap_cosine token choice", rt::token_choice{.top_k = s.k}, cap::factor{.factor = 1.0});
    check("grap_cosine bidirectional", rt::bidirectional{.top_k = s.k}, cap::factor{.factor = 0.75});
    check("grap_cosine token choice drop random", rt::token_choice{.top_k = s.k},
          cap::factor{.factor = 0.5, .drop = rs::drop_policy::random, .seed = 3});
  }
}

TEST_CASE("test_kokkos: an empty batch gives serial's empty plan") {
  const std::vector<float> none(1);
  const rs::matrix_view<const float> view{none.data(), 0, 8};
  const auto check = [&](const std::string& name, const auto& direction, const auto& capacity) {
    const auto r = precomputed_router(direction, capacity);
    check_same_plan(
        name, [&](const auto& be) { return r.route(be, view); }, false);
  };
  check("token choice, padded", rt::token_choice{.top_k = 2},
        cap::factor{.factor = 1.0, .min_capacity = 2, .pad_to_capacity = true, .align = 4});
  check("expert choice", rt::expert_choice{.top_k = 2}, cap::factor{.factor = 1.0});
  check("sinkhorn", rt::sinkhorn{.top_k = 2}, cap::dropless{.align = 4});
}

// build_plan on caller-made candidates: priorities, given demand, a forced drop policy, empty tokens.
TEST_CASE("test_kokkos: build_plan on random candidate sets equals serial's") {
  std::mt19937_64 rng(10);
  for (const shape& s : {shape{0, 4, 2}, shape{1, 1, 1}, shape{300, 16, 3}, shape{4100, 64, 4}}) {
    for (int variant = 0; variant < 4; ++variant) {
      rs::candidate_set c;
      c.num_tokens = s.T;
      c.num_experts = s.E;
      std::vector<id_type> experts(usz(s.E));
      std::iota(experts.begin(), experts.end(), id_type{0});
      for (index t = 0; t < s.T; ++t) {
        const index n = static_cast<index>(rng() % static_cast<std::uint64_t>(s.k + 1));  // 0 to k candidates
        std::shuffle(experts.begin(), experts.end(), rng);
        std::vector<id_type> chosen(experts.begin(), experts.begin() + std::min(n, s.E));
        std::sort(chosen.begin(), chosen.end());
        for (id_type e : chosen) {
          c.expert.push_back(e);
          // Quantised weights: ties between tokens, broken by the token id.
          c.weight.push_back(static_cast<float>(rng() % 5) * 0.25f);
          if (variant == 1) c.priority.push_back(static_cast<float>(rng() % 3) - 1.0f);
        }
        c.offsets.push_back(static_cast<id_type>(c.expert.size()));
      }
      if (variant == 2) {
        c.demand.assign(usz(s.E), 0);
        for (id_type e : c.expert) ++c.demand[usz(e)];
        for (auto& d : c.demand) d += 3;  // a demand larger than the candidates (dropped upstream)
      }
      if (variant == 3) c.forced_drop = rs::drop_policy::position;
      for (const rs::capacity_limits& lim :
           {rs::capacity_limits{}, rs::capacity_limits{.capacity = 0},
            rs::capacity_limits{.capacity = 2, .drop = rs::drop_policy::score},
            rs::capacity_limits{.capacity = 5, .drop = rs::drop_policy::random, .align = 4, .seed = 11},
            rs::capacity_limits{.capacity = 3, .drop = rs::drop_policy::position, .pad_to_capacity = true},
            rs::capacity_limits{.capacity = 40, .pad_to_capacity = true, .align = 8}}) {
        check_same_plan(
            describe("build_plan variant " + std::to_string(variant) + " capacity " + std::to_string(lim.capacity), s,
                     false),
            [&](const auto& be) { return rs::build_plan(be, c, lim); }, false);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// The generic suite every backend runs

TEST_CASE("test_kokkos: kokkos<Serial> routes the conformance cases as serial does") {
  resonance_test::check_conformance(kk{}, "kokkos<Serial>");
}

}  // namespace
