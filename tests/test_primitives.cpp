// The execution primitives (backend/execution.hpp) on every host backend and on scrambled_backend,
// each against a brute-force reference written here: for_each, for_each_group, reduce_min,
// exclusive_scan, stable_bucket (std::stable_sort), segmented_select (a full sort); and the plan
// builder's selection keys: detail::ordered_bits and detail::drop_key.

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <unordered_set>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/resonance.hpp>

#include "backends.hpp"
#include "random_inputs.hpp"

namespace {

namespace rs = resonance;
using resonance_test::for_each_backend_and_scrambled;
using resonance_test::usz;
using rs::id_type;
using rs::index;

// Sizes around the tbb grain (1024), the group grain (512) and the counting sort's blocks (2048).
constexpr index sizes[] = {0, 1, 2, 511, 512, 513, 1023, 1024, 1025, 2047, 2048, 2049, 4097, 10001};

// One counter per index, safe to bump from several threads.
struct counters {
  explicit counters(index n) : n_(n), c_(std::make_unique<std::atomic<int>[]>(usz(std::max<index>(n, 1)))) {
    for (index i = 0; i < n; ++i) c_[usz(i)].store(0);
  }
  void bump(index i) const { c_[usz(i)].fetch_add(1, std::memory_order_relaxed); }
  // The first index not visited exactly once, or n.
  index first_wrong() const {
    for (index i = 0; i < n_; ++i)
      if (c_[usz(i)].load() != 1) return i;
    return n_;
  }

 private:
  index n_;
  std::unique_ptr<std::atomic<int>[]> c_;
};

TEST_CASE("primitives: for_each visits every index exactly once, whatever the grain") {
  for_each_backend_and_scrambled([](const auto& be, const std::string& name) {
    for (index n : sizes) {
      for (index grain : {index{0}, index{1}, index{7}, index{1000}, index{100000}}) {
        const counters hits(n);
        for_each(
            be, n, [&](index i) { hits.bump(i); }, grain);
        CHECK_MESSAGE(hits.first_wrong() == n, name << " n=" << n << " grain=" << grain);
      }
    }
  });
}

TEST_CASE("primitives: for_each_group returns the lowest failing row, whatever the grain, with usable scratch") {
  std::mt19937_64 rng(1);
  for_each_backend_and_scrambled([&](const auto& be, const std::string& name) {
    for (index n : sizes) {
      for (index bytes : {index{0}, index{1}, index{8}, index{1000}}) {
        if (bytes > 8 && n > 2049) continue;  // large scratch on the smaller sizes only (time)
        // No failing row, all rows, one row, and rows failing at random (1 in 50).
        for (int pattern = 0; pattern < 4; ++pattern) {
          std::vector<char> fails(usz(n), pattern == 1 ? 1 : 0);
          if (pattern == 2 && n > 0) fails[usz(std::uniform_int_distribution<index>(0, n - 1)(rng))] = 1;
          if (pattern == 3)
            for (char& f : fails) f = rng() % 50 == 0 ? 1 : 0;
          const index want = std::find(fails.begin(), fails.end(), 1) - fails.begin();
          std::atomic<int> bad_scratch{0};
          for (index grain : {index{0}, index{1}, index{7}, index{700}}) {
            const index got = for_each_group(
                be, n, bytes,
                [&](const auto& g, index i) {
                  // The scratch is this row's for the whole row: aligned for any scalar, and holding what
                  // the row wrote over all `bytes` bytes.
                  if (bytes > 0) {
                    if (reinterpret_cast<std::uintptr_t>(g.scratch()) % alignof(double) != 0) ++bad_scratch;
                    auto* s = static_cast<unsigned char*>(g.scratch());
                    for (index b = 0; b < bytes; ++b) s[b] = static_cast<unsigned char>(i * 31 + b);
                    for (index b = 0; b < bytes; ++b)
                      if (s[b] != static_cast<unsigned char>(i * 31 + b)) ++bad_scratch;
                  }
                  return fails[usz(i)] != 0;
                },
                grain);
            CHECK_MESSAGE(got == want,
                          name << " n=" << n << " bytes=" << bytes << " pattern=" << pattern << " grain=" << grain);
            CHECK_MESSAGE(bad_scratch.load() == 0, name << " n=" << n << " bytes=" << bytes);
          }
        }
      }
    }
  });
}

TEST_CASE("primitives: reduce_min is the minimum of f, and no_index over an empty range") {
  std::mt19937_64 rng(2);
  for_each_backend_and_scrambled([&](const auto& be, const std::string& name) {
    for (index n : sizes) {
      std::vector<index> v(usz(n));
      for (index& x : v) x = static_cast<index>(rng() % 1000000) + 10;
      // A unique minimum at a random place, or a repeated one, or every value equal.
      for (int pattern = 0; pattern < 3; ++pattern) {
        if (n > 0 && pattern == 0) v[usz(std::uniform_int_distribution<index>(0, n - 1)(rng))] = 3;
        if (n > 0 && pattern == 1) v[usz(n - 1)] = v[0] = 2;
        if (pattern == 2) std::fill(v.begin(), v.end(), index{7});
        const index want = n == 0 ? rs::no_index : *std::min_element(v.begin(), v.end());
        for (index grain : {index{0}, index{1}, index{3}, index{5000}}) {
          CHECK_MESSAGE(reduce_min(
                            be, n, [&](index i) { return v[usz(i)]; }, grain) == want,
                        name << " n=" << n << " pattern=" << pattern << " grain=" << grain);
          // reduce_min_into: the same minimum in the backend's memory, over whatever was there before.
          auto result = allocate<index>(be, 1);
          result[0] = -5;
          reduce_min_into(
              be, n, [&](index i) { return v[usz(i)]; }, result.data(), grain);
          fence(be);
          CHECK_MESSAGE(result[0] == want, name << " reduce_min_into n=" << n << " pattern=" << pattern);
        }
      }
    }
  });
}

TEST_CASE("primitives: exclusive_scan writes the n + 1 prefix sums, in place too") {
  std::mt19937_64 rng(3);
  for_each_backend_and_scrambled([&](const auto& be, const std::string& name) {
    // Past tbb's 65536-entry serial threshold, with a partial last block.
    for (index n : {index{0}, index{1}, index{2}, index{1000}, index{65535}, index{65536}, index{65537}, index{70000},
                    index{200003}}) {
      std::vector<id_type> in(usz(n));
      for (id_type& x : in) x = static_cast<id_type>(rng() % 9);
      std::vector<id_type> want(usz(n + 1));
      id_type running = 0;
      for (index i = 0; i < n; ++i) {
        want[usz(i)] = running;
        running += in[usz(i)];
      }
      want[usz(n)] = running;

      std::vector<id_type> out(usz(n + 1), -7);
      exclusive_scan(be, in.data(), out.data(), n);
      CHECK_MESSAGE(out == want, name << " n=" << n);
      // in == out: each entry must be read before it is overwritten.
      std::vector<id_type> inplace(usz(n + 1), -7);
      std::copy(in.begin(), in.end(), inplace.begin());
      exclusive_scan(be, inplace.data(), inplace.data(), n);
      CHECK_MESSAGE(inplace == want, name << " n=" << n << " in place");
    }
  });
}

enum class key_pattern { uniform, all_equal, even_bins_only, descending, skewed };

std::vector<id_type> bucket_keys(std::mt19937_64& rng, index n, index nbins, key_pattern kind) {
  std::vector<id_type> k(usz(n));
  for (index i = 0; i < n; ++i) {
    const auto any = [&] { return static_cast<id_type>(rng() % static_cast<std::uint64_t>(nbins)); };
    switch (kind) {
      case key_pattern::uniform:
        k[usz(i)] = any();
        break;
      case key_pattern::all_equal:
        k[usz(i)] = static_cast<id_type>(nbins / 2);
        break;
      case key_pattern::even_bins_only:  // every odd bin empty
        k[usz(i)] = any() / 2 * 2;
        break;
      case key_pattern::descending:
        k[usz(i)] = static_cast<id_type>((n - 1 - i) * nbins / n);
        break;
      case key_pattern::skewed:  // most keys in bin 0, a few elsewhere
        k[usz(i)] = rng() % 8 != 0 ? 0 : any();
        break;
    }
  }
  return k;
}

TEST_CASE("primitives: stable_bucket equals std::stable_sort by bin") {
  std::mt19937_64 rng(4);
  for_each_backend_and_scrambled([&](const auto& be, const std::string& name) {
    for (index n : {index{0}, index{1}, index{2}, index{2047}, index{2048}, index{2049}, index{4097}, index{10001}}) {
      for (index nbins : {index{1}, index{2}, index{3}, index{7}, index{64}, index{300}}) {
        for (key_pattern kind : {key_pattern::uniform, key_pattern::all_equal, key_pattern::even_bins_only,
                                 key_pattern::descending, key_pattern::skewed}) {
          const std::vector<id_type> keys = bucket_keys(rng, n, nbins, kind);
          std::vector<id_type> want_perm(usz(n));
          std::iota(want_perm.begin(), want_perm.end(), id_type{0});
          std::stable_sort(want_perm.begin(), want_perm.end(),
                           [&](id_type a, id_type b) { return keys[usz(a)] < keys[usz(b)]; });
          std::vector<id_type> want_start(usz(nbins + 1), 0);
          for (id_type key : keys) ++want_start[usz(key + 1)];
          std::partial_sum(want_start.begin(), want_start.end(), want_start.begin());

          std::vector<id_type> start(usz(nbins + 1), -1), perm(usz(n), -1);
          // Workspace filled with garbage: the primitive must not rely on zeroed memory.
          std::vector<unsigned char> work(usz(stable_bucket_workspace(be, n, nbins)) + 1, 0xAB);
          stable_bucket(be, keys.data(), n, nbins, start.data(), perm.data(), work.data());
          const std::string what = name + " n=" + std::to_string(n) + " nbins=" + std::to_string(nbins) +
                                   " pattern=" + std::to_string(static_cast<int>(kind));
          CHECK_MESSAGE(start == want_start, what);
          CHECK_MESSAGE(perm == want_perm, what);
        }
      }
    }
  });
}

// n distinct 64-bit keys; `shared_high` keeps the top 32 bits common (a score's bits, then a token id).
std::vector<std::uint64_t> unique_keys(std::mt19937_64& rng, index n, bool shared_high) {
  const std::uint64_t high = rng() & 0xFFFFFFFF00000000ull;
  std::unordered_set<std::uint64_t> seen;
  std::vector<std::uint64_t> v;
  while (static_cast<index>(v.size()) < n) {
    const std::uint64_t x = shared_high ? high | (rng() & 0xFFFFFFFFull) : rng();
    if (seen.insert(x).second) v.push_back(x);
  }
  return v;
}

TEST_CASE("primitives: segmented_select gives every segment with more than k keys its k-th largest") {
  std::mt19937_64 rng(5);
  for_each_backend_and_scrambled([&](const auto& be, const std::string& name) {
    for (index k : {index{1}, index{2}, index{5}, index{100}, index{3000}}) {
      // Segment sizes 0, 1, k, k + 1, random, and a large one (20000).
      std::vector<id_type> offsets{0};
      std::vector<std::uint64_t> keys;
      for (index s = 0; s < 13; ++s) {
        const index n = std::array<index, 6>{0, 1, k, k + 1, static_cast<index>(rng() % 400), 20000}[usz(s % 6)];
        const std::vector<std::uint64_t> seg = unique_keys(rng, n, s % 2 == 1);
        keys.insert(keys.end(), seg.begin(), seg.end());
        offsets.push_back(static_cast<id_type>(keys.size()));
      }
      const index nseg = static_cast<index>(offsets.size()) - 1;
      std::vector<std::uint64_t> kth(usz(nseg), 0), work_keys = keys;
      std::vector<unsigned char> work(usz(segmented_select_workspace(be, static_cast<index>(keys.size()), nseg)) + 1);
      segmented_select(be, work_keys.data(), offsets.data(), nseg, k, kth.data(), work.data());
      for (index s = 0; s < nseg; ++s) {
        const auto b = keys.begin() + offsets[usz(s)], e = keys.begin() + offsets[usz(s + 1)];
        // The keys may be permuted inside their segment, never moved out of it.
        std::vector<std::uint64_t> sorted(b, e),
            after(work_keys.begin() + offsets[usz(s)], work_keys.begin() + offsets[usz(s + 1)]);
        std::sort(sorted.begin(), sorted.end(), std::greater<>{});
        std::sort(after.begin(), after.end(), std::greater<>{});
        CHECK_MESSAGE(after == sorted, name << " k=" << k << " segment " << s);
        if (e - b <= k) continue;  // no selection asked: kth[s] is unspecified
        CHECK_MESSAGE(kth[usz(s)] == sorted[usz(k - 1)], name << " k=" << k << " segment " << s << " of " << e - b);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// The selection keys of the capacity cut

TEST_CASE("primitives: ordered_bits is monotone and reads -0 as +0") {
  std::mt19937_64 rng(6);
  constexpr float inf = std::numeric_limits<float>::infinity();
  const float denorm = std::numeric_limits<float>::denorm_min(), tiny = std::numeric_limits<float>::min(),
              big = std::numeric_limits<float>::max();
  std::vector<float> v = {0.0f, -0.0f, inf,  -inf,  denorm,     -denorm,     tiny,        -tiny,
                          big,  -big,  1.0f, -1.0f, 2 * denorm, -2 * denorm, 0.5f * tiny, -0.5f * tiny};
  // Random bit patterns (every finite float, negatives and subnormals included) and normal values.
  for (int i = 0; i < 200000; ++i) {
    const float x = std::bit_cast<float>(static_cast<std::uint32_t>(rng()));
    if (!std::isnan(x)) v.push_back(x);
  }
  for (float x : resonance_test::normal_values(rng, 10000, 1e-3)) v.push_back(x);
  std::sort(v.begin(), v.end());
  for (std::size_t i = 1; i < v.size(); ++i) {
    const std::uint32_t a = rs::detail::ordered_bits(v[i - 1]), b = rs::detail::ordered_bits(v[i]);
    if (v[i - 1] < v[i]) {
      REQUIRE_MESSAGE(a < b, v[i - 1] << " < " << v[i]);
    } else {
      REQUIRE_MESSAGE(a == b, v[i - 1] << " == " << v[i]);  // equal floats, ±0 included
    }
  }
  CHECK(rs::detail::ordered_bits(-0.0f) == rs::detail::ordered_bits(0.0f));
  CHECK(rs::detail::ordered_bits(-denorm) < rs::detail::ordered_bits(0.0f));
  CHECK(rs::detail::ordered_bits(0.0f) < rs::detail::ordered_bits(denorm));
}

TEST_CASE("primitives: the score drop key orders by priority descending, then token ascending") {
  std::mt19937_64 rng(7);
  const std::vector<float> levels = {0.0f, -0.0f, 1.0f, -1.0f, 0.25f, 1e-40f, -1e-40f, 3e38f, -3e38f};
  for (int i = 0; i < 200000; ++i) {
    const float p = levels[rng() % levels.size()], q = levels[rng() % levels.size()];
    const id_type s = static_cast<id_type>(rng() % 5), t = static_cast<id_type>(rng() % 5);
    const index e = static_cast<index>(rng() % 3);
    const std::uint64_t kp = rs::detail::drop_key(rs::drop_policy::score, 42, p, s, e);
    const std::uint64_t kq = rs::detail::drop_key(rs::drop_policy::score, 42, q, t, e);
    const bool p_first = p > q || (p == q && s < t);
    const bool q_first = q > p || (p == q && t < s);
    REQUIRE_MESSAGE((kp > kq) == p_first, "(" << p << ", token " << s << ") vs (" << q << ", token " << t << ")");
    REQUIRE_MESSAGE((kq > kp) == q_first, "(" << p << ", token " << s << ") vs (" << q << ", token " << t << ")");
  }
  // The largest token ids too (the inverted id fills the low 32 bits).
  const id_type top = std::numeric_limits<id_type>::max();
  CHECK(rs::detail::drop_key(rs::drop_policy::score, 0, 1.0f, top - 1, 0) >
        rs::detail::drop_key(rs::drop_policy::score, 0, 1.0f, top, 0));
  CHECK(rs::detail::drop_key(rs::drop_policy::score, 0, 1.0f, top, 0) >
        rs::detail::drop_key(rs::drop_policy::score, 0, 0.5f, 0, 0));
}

TEST_CASE("primitives: the random drop key is unique within one expert for 100k tokens") {
  for (std::uint64_t seed : {std::uint64_t{0}, std::uint64_t{1}, std::uint64_t{7}, ~std::uint64_t{0},
                             std::uint64_t{0x9E3779B97F4A7C15ull}}) {
    for (index e : {index{0}, index{1}, index{63}, index{100000}}) {
      std::vector<std::uint64_t> keys;
      for (id_type t = 0; t < 100000; ++t)
        keys.push_back(rs::detail::drop_key(rs::drop_policy::random, seed, 0.0f, t, e));
      std::sort(keys.begin(), keys.end());
      CHECK_MESSAGE(std::adjacent_find(keys.begin(), keys.end()) == keys.end(), "seed " << seed << " expert " << e);
    }
  }
  // It is the hash alone: the priority does not move it.
  CHECK(rs::detail::drop_key(rs::drop_policy::random, 3, 1.0f, 5, 2) ==
        rs::detail::drop_key(rs::drop_policy::random, 3, -7.0f, 5, 2));
}

}  // namespace
