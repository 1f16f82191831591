// The lane top-k (backend/detail/warp_topk.hpp) and the token-choice stage's lane-group path, without a
// GPU: a simulated warp runs each lane on its own std::thread, its lane operations through a shared
// array and a std::barrier. The top-k is checked against a full sort written here and against
// detail::topk_row (scalar_rows::topk's values and ids, bit for bit); the whole stage, on a test
// backend that offers the warp primitive, against backend::serial's plans and errors.

#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <variant>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/backend/detail/warp_topk.hpp>
#include <resonance/resonance.hpp>

#include "conformance.hpp"
#include "device_backend.hpp"

namespace {

namespace rs = resonance;
namespace rt = resonance::routing;
using resonance_test::usz;
using rs::id_type;
using rs::index;

// ---------------------------------------------------------------------------------------------------
// A simulated warp

// What the lanes of one simulated warp share: a word per lane, the barrier, the row's scratch.
template <int W>
struct sim_warp_state {
  std::barrier<> barrier{W};
  std::uint64_t slot[W] = {};
  void* scratch = nullptr;
};

// The lane operations of detail/warp_topk.hpp on host threads: every exchange writes the lane's word,
// waits for all lanes, reads, and waits again before a slot may be reused.
template <int W>
struct sim_lanes {
  static constexpr int width = W;
  sim_warp_state<W>* s = nullptr;
  int id = 0;

  int lane() const { return id; }
  void sync() const { s->barrier.arrive_and_wait(); }
  std::uint64_t shfl_xor(std::uint64_t v, int mask) const {
    s->slot[id] = v;
    sync();
    const std::uint64_t r = s->slot[id ^ mask];
    sync();
    return r;
  }
  bool all(bool v) const {
    s->slot[id] = v ? 1 : 0;
    sync();
    bool r = true;
    for (int l = 0; l < W; ++l) r = r && s->slot[l] != 0;
    sync();
    return r;
  }
  template <class F>
  auto single(const F& f) const {
    if constexpr (std::is_void_v<decltype(f())>) {
      if (id == 0) f();
      sync();
    } else {
      if (id == 0) s->slot[0] = f() ? 1 : 0;
      sync();
      const bool r = s->slot[0] != 0;
      sync();
      return r;
    }
  }
  void* scratch() const { return s->scratch; }
};

// body(lanes) on W threads, one per lane; returns when every lane has returned.
template <int W, class Body>
void run_lanes(sim_warp_state<W>& state, const Body& body) {
  std::vector<std::thread> lanes;
  lanes.reserve(W);
  for (int l = 0; l < W; ++l) lanes.emplace_back([&state, &body, l] { body(sim_lanes<W>{&state, l}); });
  for (std::thread& t : lanes) t.join();
}

// ---------------------------------------------------------------------------------------------------
// The lane top-k

struct topk_result {
  std::vector<float> vals;
  std::vector<id_type> ids;
  bool finite = false;
};

// key(i) as scalar_rows::topk writes it.
float key_of(const std::vector<float>& x, float scale, const std::vector<float>& bias, index i) {
  return bias.empty() ? x[usz(i)] * scale : x[usz(i)] * scale + bias[usz(i)];
}

// The brute-force reference: every (key, index) pair sorted by key descending (-0 == +0: the float
// comparison), then index ascending; the first k.
topk_result reference_topk(const std::vector<float>& x, index k, float scale, const std::vector<float>& bias) {
  const auto n = static_cast<index>(x.size());
  std::vector<std::pair<float, index>> all;
  for (index i = 0; i < n; ++i) all.emplace_back(key_of(x, scale, bias, i), i);
  std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) {
    if (a.first > b.first) return true;
    if (b.first > a.first) return false;
    return a.second < b.second;
  });
  topk_result r;
  for (index j = 0; j < k; ++j) {
    r.vals.push_back(all[usz(j)].first);
    r.ids.push_back(static_cast<id_type>(all[usz(j)].second));
  }
  r.finite = std::all_of(x.begin(), x.end(), [](float v) { return std::isfinite(v); });
  return r;
}

// scalar_rows::topk (detail::topk_row) on the same row.
topk_result scalar_topk(const std::vector<float>& x, index k, float scale, const std::vector<float>& bias) {
  topk_result r;
  r.vals.resize(usz(k));
  r.ids.resize(usz(k));
  r.finite = rs::detail::scalar_rows::topk(x.data(), static_cast<index>(x.size()), k, scale,
                                           bias.empty() ? nullptr : bias.data(), r.vals.data(), r.ids.data());
  return r;
}

// detail::warp_topk on W simulated lanes. Every lane must return the same flag; the outputs are read
// after the lanes have joined.
template <int W>
topk_result lanes_topk(const std::vector<float>& x, index k, float scale, const std::vector<float>& bias,
                       bool& lanes_agree) {
  topk_result r;
  r.vals.assign(usz(k), std::bit_cast<float>(0x7FA5A5A5u));  // garbage: every entry must be written
  r.ids.assign(usz(k), -7);
  sim_warp_state<W> state;
  int finite_lanes = 0;
  std::atomic<int> counted{0};
  run_lanes<W>(state, [&](const sim_lanes<W>& w) {
    const bool f = rs::detail::warp_topk(w, x.data(), static_cast<index>(x.size()), k, scale,
                                         bias.empty() ? nullptr : bias.data(), r.vals.data(), r.ids.data());
    counted.fetch_add(f ? 1 : 0);
  });
  finite_lanes = counted.load();
  lanes_agree = finite_lanes == 0 || finite_lanes == W;
  r.finite = finite_lanes == W;
  return r;
}

std::string bits(float v) {
  char s[16];
  std::snprintf(s, sizeof s, "%08x", std::bit_cast<std::uint32_t>(v));
  return s;
}

// The first difference between two results, or "": ids, then values bit for bit, then the flag.
std::string difference(const topk_result& a, const topk_result& b, bool selection_defined) {
  if (a.finite != b.finite) return std::string("finite flag ") + (a.finite ? "true" : "false");
  if (!selection_defined) return {};
  for (std::size_t j = 0; j < a.ids.size(); ++j) {
    if (a.ids[j] != b.ids[j])
      return "ids[" + std::to_string(j) + "]: " + std::to_string(a.ids[j]) + " vs " + std::to_string(b.ids[j]);
    if (std::bit_cast<std::uint32_t>(a.vals[j]) != std::bit_cast<std::uint32_t>(b.vals[j]))
      return "vals[" + std::to_string(j) + "]: " + bits(a.vals[j]) + " vs " + bits(b.vals[j]);
  }
  return {};
}

enum class row_kind { normal, three_values, signed_zeros, overflow, infinite };

const char* name_of(row_kind r) {
  constexpr const char* names[] = {"normal", "three values", "signed zeros", "keys overflow", "an infinite entry"};
  return names[static_cast<int>(r)];
}

std::vector<float> make_row(std::mt19937_64& rng, index n, row_kind kind) {
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> x(usz(n));
  switch (kind) {
    case row_kind::normal:
    case row_kind::overflow:
      for (float& v : x) v = normal(rng);
      break;
    case row_kind::three_values:
      x = resonance_test::draw_from(rng, n, {-1.5f, 0.25f, 3.0f});
      break;
    case row_kind::signed_zeros:
      x = resonance_test::draw_from(rng, n, {-0.0f, 0.0f, 0.0f, -0.0f, 1.0f, -1.0f});
      break;
    case row_kind::infinite: {
      for (float& v : x) v = normal(rng);
      const float bad[] = {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                           std::numeric_limits<float>::quiet_NaN()};
      x[usz(std::uniform_int_distribution<index>(0, n - 1)(rng))] = bad[rng() % 3];
      break;
    }
  }
  return x;
}

// One row through the lanes, the scalar top-k and the reference.
template <int W>
void check_row(const std::vector<float>& x, index k, float scale, const std::vector<float>& bias,
               const std::string& what) {
  bool agree = false;
  const topk_result got = lanes_topk<W>(x, k, scale, bias, agree);
  const topk_result scalar = scalar_topk(x, k, scale, bias);
  const bool defined = scalar.finite;  // a selection over non-finite x is unspecified
  CHECK_MESSAGE(agree, what << ": the lanes returned different flags");
  const std::string vs_scalar = difference(got, scalar, defined);
  CHECK_MESSAGE(vs_scalar.empty(), what << ": " << vs_scalar << " (lanes, then scalar_rows::topk)");
  const std::string vs_reference = difference(got, reference_topk(x, k, scale, bias), defined);
  CHECK_MESSAGE(vs_reference.empty(), what << ": " << vs_reference << " (lanes, then the full sort)");
}

TEST_CASE("warp_topk on 32 simulated lanes: scalar_rows::topk's values and ids, and a full sort's") {
  std::mt19937_64 rng(0x3A7F'0001);
  int rows = 0;
  for (index E : {1, 2, 31, 32, 33, 64, 256, 512, 1000}) {
    for (index k : {1, 2, 8, 16}) {
      if (k > E) continue;
      for (row_kind kind :
           {row_kind::normal, row_kind::three_values, row_kind::signed_zeros, row_kind::overflow, row_kind::infinite}) {
        for (int variant = 0; variant < 2; ++variant) {
          const std::vector<float> x = make_row(rng, E, kind);
          // variant 0: scale 1, no bias (the logits themselves); 1: a scale and a bias (from three values
          // too, so that ties survive the bias).
          float scale = 1.0f;
          std::vector<float> bias;
          if (variant == 1) {
            scale = 0.7f;
            bias = kind == row_kind::three_values ? resonance_test::draw_from(rng, E, {0.0f, 0.5f, -0.0f})
                                                  : resonance_test::draw_from(rng, E, {0.125f, -0.25f, 0.0f, 1.5f});
          }
          if (kind == row_kind::overflow) scale = 3e38f;  // finite x, keys at ±Inf: a defined selection, with ties
          const std::string what = "E=" + std::to_string(E) + " k=" + std::to_string(k) + " " + name_of(kind) +
                                   (variant == 1 ? " scale and bias" : "");
          check_row<32>(x, k, scale, bias, what);
          ++rows;
        }
      }
    }
  }
  CHECK(rows == 310);
}

TEST_CASE("warp_topk: the flag is false exactly when an entry is not finite, on every lane") {
  std::mt19937_64 rng(0x3A7F'0002);
  const float inf = std::numeric_limits<float>::infinity();
  for (index E : {1, 40, 512}) {
    for (float bad : {inf, -inf, std::numeric_limits<float>::quiet_NaN()}) {
      std::vector<float> x = make_row(rng, E, row_kind::normal);
      for (index at : {index{0}, E - 1}) {
        std::vector<float> y = x;
        y[usz(at)] = bad;
        bool agree = false;
        const topk_result got = lanes_topk<32>(y, std::min<index>(E, 2), 1.0f, {}, agree);
        CHECK(agree);
        CHECK_FALSE(got.finite);
      }
      // A row of ±Inf only.
      std::vector<float> all(usz(E), bad);
      bool agree = false;
      CHECK_FALSE(lanes_topk<32>(all, 1, 1.0f, {}, agree).finite);
      CHECK(agree);
    }
  }
}

TEST_CASE("warp_topk: the algorithm does not depend on the number of lanes (1, 2, 4, 8 and 16 lanes)") {
  std::mt19937_64 rng(0x3A7F'0003);
  for (index E : {1, 5, 16, 17, 100}) {
    for (index k : {1, 3, 16}) {
      if (k > E) continue;
      for (row_kind kind : {row_kind::normal, row_kind::three_values, row_kind::signed_zeros}) {
        const std::vector<float> x = make_row(rng, E, kind);
        const std::string what = "E=" + std::to_string(E) + " k=" + std::to_string(k) + " " + name_of(kind);
        check_row<1>(x, k, 1.0f, {}, what + " on 1 lane");
        check_row<2>(x, k, 1.0f, {}, what + " on 2 lanes");
        check_row<4>(x, k, 1.0f, {}, what + " on 4 lanes");
        check_row<8>(x, k, 1.0f, {}, what + " on 8 lanes");
        check_row<16>(x, k, 1.0f, {}, what + " on 16 lanes");
      }
    }
  }
}

TEST_CASE("warp_topk: the packed order puts -0 with +0 and NaN-free keys in float order") {
  using rs::detail::ordered_bits;
  CHECK(ordered_bits(-0.0f) == ordered_bits(0.0f));
  const float ordered[] = {-std::numeric_limits<float>::infinity(),
                           -std::numeric_limits<float>::max(),
                           -1.0f,
                           -std::numeric_limits<float>::denorm_min(),
                           0.0f,
                           std::numeric_limits<float>::denorm_min(),
                           1.0f,
                           std::numeric_limits<float>::max(),
                           std::numeric_limits<float>::infinity()};
  for (std::size_t i = 1; i < std::size(ordered); ++i) CHECK(ordered_bits(ordered[i - 1]) < ordered_bits(ordered[i]));
  // Equal keys: the lower index is the larger word.
  CHECK(rs::detail::warp_topk_word(1.0f, 3) > rs::detail::warp_topk_word(1.0f, 4));
  CHECK(rs::detail::warp_topk_word(-0.0f, 3) > rs::detail::warp_topk_word(0.0f, 4));
  CHECK(rs::detail::warp_topk_index(rs::detail::warp_topk_word(-2.5f, 999)) == 999);
}

// ---------------------------------------------------------------------------------------------------
// The token-choice stage on simulated warps

struct warp_counters {
  index rows = 0;         // rows run on a lane group
  int disagreements = 0;  // rows whose lanes returned different results
};

// device_backend (memory the host may not read, scrambled primitives) with lane groups of 32 simulated
// lanes: detail::warp_row_backend, so the token-choice stage takes its lane path on it.
struct warp_backend : resonance_test::device_backend {
  static constexpr const char* name = "warp-sim";
  using warp_group = sim_lanes<32>;
  warp_counters* warps = nullptr;

  template <class F>
  friend index for_each_warp_row(const warp_backend& be, index n, index bytes, const F& f) {
    if (n <= 0) return n;
    if (be.warps != nullptr) be.warps->rows += n;
    rs::backend::host_scratch scratch(bytes);
    sim_warp_state<32> state;
    state.scratch = scratch.get();
    std::vector<std::uint8_t> lane_result(usz(n) * 32, 0);
    run_lanes<32>(state, [&](const sim_lanes<32>& w) {
      for (index i = 0; i < n; ++i) {
        // A garbage pattern in the scratch before each row: a lane that read an entry no lane wrote
        // would give a different plan.
        w.single([&] { std::memset(state.scratch, 0xA5, static_cast<std::size_t>(bytes)); });
        if constexpr (std::is_void_v<decltype(f(w, i))>) {
          f(w, i);
        } else {
          lane_result[usz(i) * 32 + usz(w.lane())] = f(w, i) ? 1 : 0;
        }
      }
    });
    index failed = n;
    for (index i = n - 1; i >= 0; --i) {
      const auto* r = &lane_result[usz(i) * 32];
      if (std::any_of(r, r + 32, [&](std::uint8_t v) { return v != r[0]; }) && be.warps != nullptr)
        ++be.warps->disagreements;
      if (r[0] != 0) failed = i;
    }
    return failed;
  }
};
static_assert(rs::execution_backend<warp_backend>);
static_assert(rs::detail::warp_row_backend<warp_backend>);
static_assert(rs::detail::warp_row_backend<const warp_backend>);
static_assert(!rs::detail::warp_row_backend<resonance_test::device_backend>);
static_assert(!rs::detail::warp_row_backend<rs::backend::serial>);

using device_view = rs::matrix_view<const float, resonance_test::sim_device_space>;

resonance_test::sim_buffer<float> to_device(const std::vector<float>& x) {
  resonance_test::sim_buffer<float> d(static_cast<index>(x.size()));
  copy(resonance_test::device_backend{}, d.data(), x.data(), static_cast<index>(x.size()));
  return d;
}

// The plan of router r on the warp backend (mirrored to the host) or its error, against serial's.
template <class Router>
void check_route(const Router& r, const std::vector<float>& x, index T, index E, warp_counters& counters,
                 const std::string& what) {
  std::optional<rs::routing_plan> want, got;
  const std::string want_error = resonance_test::error_of([&] {
    want = r.route(rs::backend::serial{}, rs::matrix_view<const float>{x.data(), T, E});
  });
  const auto dx = to_device(x);
  warp_backend be;
  be.warps = &counters;
  const std::string got_error = resonance_test::error_of([&] {
    got = rs::to_host(be, r.route(be, device_view{dx.data(), T, E, E}));
  });
  CHECK_MESSAGE(got_error == want_error, what << ": \"" << got_error << "\", serial: \"" << want_error << "\"");
  if (want && got) {
    const std::string diff = resonance_test::plan_difference(*want, *got);
    CHECK_MESSAGE(diff.empty(), what << ": " << diff << " (serial's first)");
  }
}

TEST_CASE("token choice on simulated warps: serial's plans and errors, softmax post and pre, sigmoid with a bias") {
  std::mt19937_64 rng(0x3A7F'0004);
  using router = rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::dropless>;
  using factor_router = rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::factor>;
  const index T = 6;
  for (index E : {64, 256, 384, 512, 600}) {
    std::vector<float> bias = resonance_test::draw_from(rng, E, {0.0f, 0.25f, -0.5f});
    for (index k : {1, 2, 8, 16}) {
      for (int policy = 0; policy < 5; ++policy) {
        rt::token_choice p{.top_k = k};
        std::string name;
        switch (policy) {
          case 0:
            name = "softmax";
            p.temperature = 0.75f;
            break;
          case 1:
            name = "softmax pre";
            p.pre_softmax = true;
            break;
          case 2:
            name = "sigmoid with a bias";
            p.score = rs::score::sigmoid;
            p.expert_bias = {bias.data(), E};
            p.scaling_factor = 2.5f;
            break;
          case 3:
            name = "sqrt_softplus";
            p.score = rs::score::sqrt_softplus;
            p.renorm = rt::renormalize::never;
            break;
          default:
            name = "softmax with a bias";
            p.expert_bias = {bias.data(), E};
            break;
        }
        // Ties everywhere (five levels), ±0 in some rows, a NaN logit in row 3 of the last kind.
        std::vector<float> x = resonance_test::draw_from(rng, T * E, {-2.0f, -0.0f, 0.0f, 0.5f, 1.0f});
        const bool fault = policy == 4 && k == 2;
        if (fault) x[usz(3 * E + E / 2)] = std::numeric_limits<float>::quiet_NaN();
        const std::string what = "E=" + std::to_string(E) + " k=" + std::to_string(k) + " " + name;
        warp_counters counters;
        check_route(router{{}, p, {}}, x, T, E, counters, what);
        if (policy == 1) check_route(factor_router{{}, p, {.factor = 1.0}}, x, T, E, counters, what + " factor 1");
        CHECK_MESSAGE(counters.disagreements == 0, what);
        // The lane path for E <= 512; above, the per-row path (no row on a lane group).
        const index expected = E <= rt::kernel::warp_select_max_experts ? T * (policy == 1 ? 2 : 1) : 0;
        CHECK_MESSAGE(counters.rows == expected, what << ": " << counters.rows << " rows on lane groups");
      }
    }
  }
}

TEST_CASE("token choice on simulated warps: overflowed keys and non-finite rows fail as on serial") {
  using router = rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::dropless>;
  const index T = 4, E = 40;
  std::mt19937_64 rng(0x3A7F'0005);
  for (int fault = 0; fault < 4; ++fault) {
    std::vector<float> x = resonance_test::draw_from(rng, T * E, {-1.0f, 0.5f, 2.0f});
    rt::token_choice p{.top_k = 3};
    std::string what;
    if (fault == 0) {
      what = "+Inf logit, softmax";
      x[usz(2 * E + 7)] = std::numeric_limits<float>::infinity();
    } else if (fault == 1) {
      what = "-Inf logit, sigmoid";
      p.score = rs::score::sigmoid;
      x[usz(1 * E + 39)] = -std::numeric_limits<float>::infinity();
    } else if (fault == 2) {
      what = "logits / temperature overflow, softmax";
      p.temperature = 1e-38f;
      x[usz(3 * E)] = 1e10f;
    } else {
      what = "NaN logit, softmax pre, two rows";
      p.pre_softmax = true;
      x[usz(3 * E + 1)] = std::numeric_limits<float>::quiet_NaN();
      x[usz(1 * E + 2)] = std::numeric_limits<float>::quiet_NaN();
    }
    warp_counters counters;
    check_route(router{{}, p, {}}, x, T, E, counters, what);
    CHECK_MESSAGE(counters.rows == T, what);
    CHECK_MESSAGE(counters.disagreements == 0, what);
  }
}

TEST_CASE("token choice on simulated warps: the precomputed conformance cases give serial's plans and errors") {
  using namespace resonance_test::conformance;
  int routed = 0, errors = 0;
  warp_counters counters;
  for (int id = 0; id < conformance_cases; ++id) {
    const test_case c = make_case(id);
    const bool proposes =
        std::holds_alternative<rt::token_choice>(c.direction) || std::holds_alternative<rt::bidirectional>(c.direction);
    // Each simulated lane operation costs two thread barriers: the largest cases are left to the device
    // route's test (tests/test_device_route.cpp), which takes the per-row path.
    if (c.affinity != affinity_kind::precomputed || !proposes || c.T > 300) continue;
    std::string want_error;
    const std::optional<rs::routing_plan> want = route_case(rs::backend::serial{}, c, want_error);
    const auto x = to_device(c.x);
    warp_backend be;
    be.warps = &counters;
    std::optional<rs::routing_plan> got;
    const std::string got_error = resonance_test::error_of([&] {
      std::visit(
          [&](const auto& direction, const auto& capacity) {
            using D = std::decay_t<decltype(direction)>;
            if constexpr (std::is_same_v<D, rt::token_choice> || std::is_same_v<D, rt::bidirectional>) {
              const rs::router<rs::affinity::precomputed, D, std::decay_t<decltype(capacity)>> r{
                  {}, direction, capacity};
              got = rs::to_host(be, r.route(be, device_view{x.data(), c.T, c.d, c.stride}));
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
    const std::string diff = resonance_test::plan_difference(*want, *got);
    CHECK_MESSAGE(diff.empty(), c.text << ": " << diff << " (serial's first)");
  }
  CHECK(counters.disagreements == 0);
  CHECK(counters.rows > 500);
  MESSAGE("routed " << routed << " cases, " << errors << " errors, " << counters.rows << " rows on lane groups");
  CHECK(routed >= 20);
  CHECK(errors >= 2);
}

}  // namespace
