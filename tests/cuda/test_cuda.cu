// backend::cuda on a GPU: each primitive against a host reference written here (loops, std::stable_sort,
// a full sort), the warp top-k against scalar_rows::topk, token choice on warps against serial, then the
// conformance cases with precomputed fp32 logits routed on the GPU: serial's plan bit for bit and
// serial's error message.

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <type_traits>
#include <variant>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/backend/cuda.cuh>
#include <resonance/backend/detail/warp_topk.hpp>
#include <resonance/resonance.hpp>

#include "../conformance.hpp"

namespace {

namespace rs = resonance;
namespace rt = resonance::routing;
using resonance_test::error_of;
using rs::id_type;
using rs::index;

const rs::backend::cuda gpu{};

template <class T>
rs::cuda_buffer<T> to_device(const std::vector<T>& v) {
  auto d = allocate<T>(gpu, static_cast<index>(v.size()));
  copy(gpu, d.data(), v.data(), static_cast<index>(v.size()));
  return d;
}

template <class T>
std::vector<T> to_host(const T* d, index n) {
  std::vector<T> v(static_cast<std::size_t>(n));
  copy_to_host(gpu, v.data(), d, n);
  fence(gpu);
  return v;
}

// Functors of the primitive tests (named: a test case is a function nvcc allows no extended lambda in).
struct times_three {
  index* out;
  RESONANCE_HOST_DEVICE void operator()(index i) const { out[i] = 3 * i; }
};
struct marked_min {
  const id_type* mark;
  RESONANCE_HOST_DEVICE index operator()(index i) const { return mark[i] != 0 ? i : rs::no_index; }
};
// Each row fills its scratch with i, j and sums it back: rows whose scratch overlapped would read
// another row's entries.
struct scratch_rows {
  index words;
  const id_type* mark;
  index* out;
  RESONANCE_HOST_DEVICE bool operator()(const rs::backend::cuda_thread_group& g, index i) const {
    auto* s = static_cast<index*>(g.scratch());
    for (index j = 0; j < words; ++j) s[j] = i * 1000 + j;
    index sum = 0;
    for (index j = 0; j < words; ++j) sum += s[j];
    out[i] = sum;
    return mark[i] != 0;
  }
};

TEST_CASE("cuda: for_each, reduce_min_into and for_each_group against loops") {
  std::mt19937_64 rng(7);
  for (index n : {index{0}, index{1}, index{31}, index{1000}, index{70000}}) {
    CAPTURE(n);
    auto out = allocate<index>(gpu, n);
    for_each(gpu, n, times_three{out.data()});
    const auto got = to_host(out.data(), n);
    for (index i = 0; i < n; ++i) REQUIRE(got[static_cast<std::size_t>(i)] == 3 * i);

    std::vector<id_type> mark(static_cast<std::size_t>(n), 0);
    index lowest = rs::no_index;
    for (int m = 0; m < 3 && n > 0; ++m) {
      const index at = std::uniform_int_distribution<index>(0, n - 1)(rng);
      mark[static_cast<std::size_t>(at)] = 1;
      lowest = std::min(lowest, at);
    }
    const auto dmark = to_device(mark);
    auto result = allocate<index>(gpu, 1);
    reduce_min_into(gpu, n, marked_min{dmark.data()}, result.data());
    CHECK(to_host(result.data(), 1)[0] == lowest);
    CHECK(reduce_min(gpu, n, marked_min{dmark.data()}) == lowest);

    for (index words : {index{0}, index{5}, index{300}}) {
      auto sums = allocate<index>(gpu, n);
      const index failed = for_each_group(gpu, n, words * 8, scratch_rows{words, dmark.data(), sums.data()});
      CHECK(failed == std::min(lowest, n));
      const auto s = to_host(sums.data(), n);
      for (index i = 0; i < n; ++i)
        REQUIRE(s[static_cast<std::size_t>(i)] == words * i * 1000 + words * (words - 1) / 2);
    }
  }
}

// for_each_warp_row: every lane of one warp per row (each lane marks its own entry of the row), each
// warp's scratch its own (filled by the lanes, summed back by one), the lowest failing row reported.
struct warp_lanes_rows {
  index words;
  const id_type* mark;
  std::uint8_t* lanes;
  index* sums;
  RESONANCE_HOST_DEVICE bool operator()(const rs::backend::cuda_warp_group& w, index i) const {
    auto* s = static_cast<index*>(w.scratch());
    lanes[i * rs::backend::cuda_warp_group::width + w.lane()] = 1;
    for (index j = w.lane(); j < words; j += rs::backend::cuda_warp_group::width) s[j] = i * 1000 + j;
    w.sync();
    return w.single([&] {
      index sum = 0;
      for (index j = 0; j < words; ++j) sum += s[j];
      sums[i] = sum;
      return mark[i] != 0;
    });
  }
};

TEST_CASE("cuda: for_each_warp_row runs 32 lanes per row, with scratch per warp and the lowest failing row") {
  std::mt19937_64 rng(19);
  for (index n : {index{1}, index{33}, index{5000}, index{600000}}) {
    CAPTURE(n);
    std::vector<id_type> mark(static_cast<std::size_t>(n), 0);
    index lowest = n;
    for (int m = 0; m < 3; ++m) {
      const index at = std::uniform_int_distribution<index>(0, n - 1)(rng);
      mark[static_cast<std::size_t>(at)] = 1;
      lowest = std::min(lowest, at);
    }
    const auto dmark = to_device(mark);
    // 7000 words: 56 KB per warp, above the default 48 KB of a block (not for the largest n: lane 0
    // sums them one by one).
    for (index words : {index{0}, index{40}, index{7000}}) {
      if (words > 40 && n > 5000) continue;
      CAPTURE(words);
      auto lanes = to_device(std::vector<std::uint8_t>(static_cast<std::size_t>(n) * 32, 0));
      auto sums = allocate<index>(gpu, n);
      const warp_lanes_rows f{words, dmark.data(), lanes.data(), sums.data()};
      CHECK(for_each_warp_row(gpu, n, words * 8, f) == lowest);
      const auto l = to_host(lanes.data(), n * 32);
      const auto s = to_host(sums.data(), n);
      CHECK(std::count(l.begin(), l.end(), std::uint8_t{1}) == n * 32);
      for (index i = 0; i < n; ++i)
        REQUIRE(s[static_cast<std::size_t>(i)] == words * i * 1000 + words * (words - 1) / 2);
    }
  }
}

// detail::warp_topk on the rows of x (T rows of E), one warp per row.
struct warp_topk_rows {
  const float* x;
  index E, k;
  float scale;
  const float* bias;
  float* vals;
  id_type* ids;
  id_type* finite;
  RESONANCE_HOST_DEVICE void operator()(const rs::backend::cuda_warp_group& w, index r) const {
    const bool f = rs::detail::warp_topk(w, x + r * E, E, k, scale, bias, vals + r * k, ids + r * k);
    if (w.lane() == 0) finite[r] = f ? 1 : 0;
  }
};

TEST_CASE("cuda: the warp top-k gives scalar_rows::topk's values (bit for bit), ids and finiteness") {
  std::mt19937_64 rng(23);
  const float inf = std::numeric_limits<float>::infinity();
  const index T = 40;
  for (index E : {1, 2, 31, 33, 64, 256, 512, 1000}) {
    for (index k : {1, 2, 3, 8, 16}) {
      if (k > E) continue;
      CAPTURE(E);
      CAPTURE(k);
      // Rows of five kinds: normal values, three values (ties), ±0 with ±1, finite values whose keys
      // overflow to ±Inf (scale 3e38: ties at ±Inf), and one non-finite entry.
      std::normal_distribution<float> normal(0.0f, 2.0f);
      std::vector<float> x(static_cast<std::size_t>(T * E));
      for (index r = 0; r < T; ++r) {
        for (index i = 0; i < E; ++i) {
          const auto u = rng();
          float v = normal(rng);
          if (r % 5 == 1) v = std::array<float, 3>{-1.5f, 0.25f, 3.0f}[u % 3];
          if (r % 5 == 2) v = std::array<float, 4>{-0.0f, 0.0f, 1.0f, -1.0f}[u % 4];
          x[static_cast<std::size_t>(r * E + i)] = v;
        }
        if (r % 5 == 4) x[static_cast<std::size_t>(r * E) + rng() % static_cast<std::size_t>(E)] = r % 2 ? inf : -inf;
      }
      std::vector<float> bias(static_cast<std::size_t>(E));
      for (float& b : bias) b = std::array<float, 3>{0.0f, -0.0f, 0.5f}[rng() % 3];
      for (int variant = 0; variant < 3; ++variant) {
        // 0: the values themselves; 1: a scale and a bias; 2: scale 3e38 (keys overflow), no bias.
        const float scale = variant == 0 ? 1.0f : variant == 1 ? 0.7f : 3e38f;
        const bool with_bias = variant == 1;
        const auto dx = to_device(x);
        const auto dbias = to_device(bias);
        auto vals = allocate<float>(gpu, T * k);
        auto ids = allocate<id_type>(gpu, T * k);
        auto finite = allocate<id_type>(gpu, T);
        for_each_warp_row(gpu, T, 0,
                          warp_topk_rows{dx.data(), E, k, scale, with_bias ? dbias.data() : nullptr, vals.data(),
                                         ids.data(), finite.data()});
        const auto got_vals = to_host(vals.data(), T * k);
        const auto got_ids = to_host(ids.data(), T * k);
        const auto got_finite = to_host(finite.data(), T);
        for (index r = 0; r < T; ++r) {
          std::vector<float> want_vals(static_cast<std::size_t>(k));
          std::vector<id_type> want_ids(static_cast<std::size_t>(k));
          const bool want_finite = rs::detail::scalar_rows::topk(
              x.data() + r * E, E, k, scale, with_bias ? bias.data() : nullptr, want_vals.data(), want_ids.data());
          CHECK_MESSAGE((got_finite[static_cast<std::size_t>(r)] != 0) == want_finite, "row " << r);
          if (!want_finite) continue;  // the selection over a non-finite entry is unspecified
          for (index j = 0; j < k; ++j) {
            const auto at = static_cast<std::size_t>(r * k + j);
            REQUIRE_MESSAGE(got_ids[at] == want_ids[static_cast<std::size_t>(j)], "row " << r << " entry " << j);
            REQUIRE_MESSAGE(std::bit_cast<std::uint32_t>(got_vals[at]) ==
                                std::bit_cast<std::uint32_t>(want_vals[static_cast<std::size_t>(j)]),
                            "row " << r << " entry " << j);
          }
        }
      }
    }
  }
}

TEST_CASE("cuda: token choice on warps (E <= 512, k <= 16) and on the per-row path give serial's plans and errors") {
  using router = rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::dropless>;
  std::mt19937_64 rng(29);
  const index T = 1000;
  for (index E : {64, 256, 384, 512, 600}) {
    std::vector<float> bias(static_cast<std::size_t>(E));
    for (float& b : bias) b = std::array<float, 3>{0.0f, 0.25f, -0.5f}[rng() % 3];
    for (index k : {1, 2, 8, 16}) {
      for (int policy = 0; policy < 5; ++policy) {
        rt::token_choice p{.top_k = k};
        const char* name = "softmax, temperature 0.75";
        if (policy == 0) p.temperature = 0.75f;
        if (policy == 1) {
          name = "softmax pre";
          p.pre_softmax = true;
        }
        if (policy == 2) {
          name = "sigmoid, bias, scaling 2.5";
          p.score = rs::score::sigmoid;
          p.expert_bias = {bias.data(), E};
          p.scaling_factor = 2.5f;
        }
        if (policy == 3) {
          name = "sqrt_softplus, no renormalisation";
          p.score = rs::score::sqrt_softplus;
          p.renorm = rt::renormalize::never;
        }
        if (policy == 4) {
          name = "softmax, bias, a NaN logit in rows 700 and 3";
          p.expert_bias = {bias.data(), E};
        }
        CAPTURE(E);
        CAPTURE(k);
        CAPTURE(name);
        // Five levels, ±0 among them: ties everywhere.
        std::vector<float> x(static_cast<std::size_t>(T * E));
        for (float& v : x) v = std::array<float, 5>{-2.0f, -0.0f, 0.0f, 0.5f, 1.0f}[rng() % 5];
        if (policy == 4) {
          x[static_cast<std::size_t>(700 * E + 5)] = std::numeric_limits<float>::quiet_NaN();
          x[static_cast<std::size_t>(3 * E + E - 1)] = std::numeric_limits<float>::quiet_NaN();
        }
        const router r{{}, p, {}};
        std::optional<rs::routing_plan> want, got;
        const std::string want_error = error_of([&] {
          want = r.route(rs::backend::serial{}, rs::matrix_view<const float>{x.data(), T, E});
        });
        const auto dx = to_device(x);
        const std::string got_error = error_of([&] {
          got = rs::to_host(gpu, r.route(gpu, rs::matrix_view<const float, rs::cuda_space>{dx.data(), T, E}));
        });
        CHECK_MESSAGE(got_error == want_error, "\"" << got_error << "\", serial: \"" << want_error << "\"");
        if (want && got) {
          const std::string diff = resonance_test::plan_difference(*want, *got);  // bitwise, weights too
          CHECK_MESSAGE(diff.empty(), diff << " (serial's first)");
        }
      }
    }
  }
}

TEST_CASE("cuda: exclusive_scan against a sequential sum, in place and not") {
  std::mt19937_64 rng(11);
  for (index n : {index{0}, index{1}, index{4095}, index{4096}, index{4097}, index{100003}}) {
    CAPTURE(n);
    std::vector<id_type> in(static_cast<std::size_t>(n));
    for (auto& v : in) v = static_cast<id_type>(std::uniform_int_distribution<int>(0, 9)(rng));
    std::vector<id_type> want(static_cast<std::size_t>(n) + 1, 0);
    for (index i = 0; i < n; ++i)
      want[static_cast<std::size_t>(i) + 1] = want[static_cast<std::size_t>(i)] + in[static_cast<std::size_t>(i)];
    for (bool in_place : {false, true}) {
      std::vector<id_type> padded = in;
      padded.push_back(-1);  // the (n+1)-th entry: overwritten by the total
      auto d = to_device(padded);
      auto out = allocate<id_type>(gpu, n + 1);
      exclusive_scan(gpu, d.data(), in_place ? d.data() : out.data(), n);
      CHECK(to_host(in_place ? d.data() : out.data(), n + 1) == want);
    }
  }
}

TEST_CASE("cuda: stable_bucket against std::stable_sort") {
  std::mt19937_64 rng(13);
  for (auto [n, nbins] : {std::pair<index, index>{0, 4}, {1, 1}, {1000, 1}, {5000, 7}, {70000, 256}, {3000, 1000}}) {
    CAPTURE(n);
    CAPTURE(nbins);
    std::vector<id_type> keys(static_cast<std::size_t>(n));
    for (auto& k : keys) k = static_cast<id_type>(std::uniform_int_distribution<index>(0, nbins - 1)(rng));
    std::vector<id_type> want_perm(keys.size());
    std::iota(want_perm.begin(), want_perm.end(), 0);
    std::stable_sort(want_perm.begin(), want_perm.end(), [&](id_type a, id_type b) {
      return keys[static_cast<std::size_t>(a)] < keys[static_cast<std::size_t>(b)];
    });
    std::vector<id_type> want_start(static_cast<std::size_t>(nbins) + 1, 0);
    for (index b = 0; b <= nbins; ++b)
      want_start[static_cast<std::size_t>(b)] =
          static_cast<id_type>(std::count_if(keys.begin(), keys.end(), [&](id_type k) { return k < b; }));

    const auto dkeys = to_device(keys);
    auto start = allocate<id_type>(gpu, nbins + 1);
    auto perm = allocate<id_type>(gpu, n);
    auto work = allocate<unsigned char>(gpu, stable_bucket_workspace(gpu, n, nbins));
    stable_bucket(gpu, dkeys.data(), n, nbins, start.data(), perm.data(), work.data());
    CHECK(to_host(start.data(), nbins + 1) == want_start);
    CHECK(to_host(perm.data(), n) == want_perm);
  }
}

TEST_CASE("cuda: segmented_select against a full sort") {
  std::mt19937_64 rng(17);
  const std::vector<index> sizes = {0, 1, 5, 8, 9, 100, 4000, 3};
  for (index k : {index{1}, index{8}, index{50}}) {
    CAPTURE(k);
    std::vector<id_type> offsets{0};
    std::vector<std::uint64_t> keys;
    for (index s : sizes) {
      for (index i = 0; i < s; ++i) {
        // Unique within the segment: a random high part (few values: shared prefixes) and the index.
        keys.push_back(std::uniform_int_distribution<std::uint64_t>(0, 3)(rng) << 62 | static_cast<std::uint64_t>(i));
      }
      offsets.push_back(static_cast<id_type>(keys.size()));
    }
    const auto nseg = static_cast<index>(sizes.size());
    const auto dkeys = to_device(keys);
    const auto doff = to_device(offsets);
    std::vector<std::uint64_t> init(sizes.size(), 0xDEADull);
    auto kth = to_device(init);
    segmented_select(gpu, const_cast<std::uint64_t*>(dkeys.data()), doff.data(), nseg, k, kth.data(), nullptr);
    const auto got = to_host(kth.data(), nseg);
    for (index s = 0; s < nseg; ++s) {
      std::vector<std::uint64_t> seg(keys.begin() + offsets[static_cast<std::size_t>(s)],
                                     keys.begin() + offsets[static_cast<std::size_t>(s) + 1]);
      std::sort(seg.begin(), seg.end(), std::greater<>{});
      const std::uint64_t want = static_cast<index>(seg.size()) > k ? seg[static_cast<std::size_t>(k) - 1] : 0xDEADull;
      CHECK_MESSAGE(got[static_cast<std::size_t>(s)] == want, "segment " << s);
    }
  }
}

TEST_CASE("cuda: the precomputed conformance cases give serial's plans and errors") {
  using namespace resonance_test::conformance;
  int routed = 0, errors = 0;
  for (int id = 0; id < conformance_cases; ++id) {
    const test_case c = make_case(id);
    if (c.affinity != affinity_kind::precomputed || std::holds_alternative<rt::sinkhorn>(c.direction)) continue;
    std::string want_error;
    const std::optional<rs::routing_plan> want = route_case(rs::backend::serial{}, c, want_error);

    const auto x = to_device(c.x);
    const rs::matrix_view<const float, rs::cuda_space> dx{x.data(), c.T, c.d, c.stride};
    std::optional<rs::routing_plan> got;
    const std::string got_error = error_of([&] {
      std::visit(
          [&](const auto& direction, const auto& capacity) {
            using D = std::decay_t<decltype(direction)>;
            if constexpr (!std::is_same_v<D, rt::sinkhorn>) {
              const rs::router<rs::affinity::precomputed, D, std::decay_t<decltype(capacity)>> r{
                  {}, direction, capacity};
              got = rs::to_host(gpu, r.route(gpu, dx));
            }
          },
          c.direction, c.capacity);
    });
    CHECK_MESSAGE(got_error == want_error, c.text << ": \"" << got_error << "\", serial: \"" << want_error << "\"");
    if (!want || !got) {
      errors += want ? 0 : 1;
      continue;
    }
    ++routed;
    // Ids, slots and counts identical; weights within the documented tolerance of a device backend
    // (every score is computed with explicit roundings, so they should agree bit for bit as well).
    const std::string diff = resonance_test::plan_difference(*want, *got, weight_tolerance);
    CHECK_MESSAGE(diff.empty(), c.text << ": " << diff << " (serial's first)");
  }
  CHECK(routed >= 60);
  CHECK(errors >= 5);
}

}  // namespace
