// Rows and exports on a backend whose memory the host cannot read (tests/device_backend.hpp), and
// bfloat16 rows everywhere: dispatch, combine and the three exports of a device plan into device
// memory equal serial's on the host plan, bit for bit (the device splits rows into 8-column items, so
// d = 13 and 70 cross item boundaries); bfloat16's rounding equals a brute-force nearest-value search;
// bfloat16 combine equals an fp32 sum in ascending expert order rounded once.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/resonance.hpp>

#include "device_backend.hpp"
#include "error_of.hpp"

namespace {

namespace rs = resonance;
namespace rt = resonance::routing;
using resonance::bfloat16;
using resonance::id_type;
using resonance::index;
using resonance_test::device_backend;
using resonance_test::sim_buffer;
using resonance_test::sim_device_space;

std::size_t usz(index n) { return static_cast<std::size_t>(n); }

template <class T>
sim_buffer<T> to_device(const std::vector<T>& v) {
  sim_buffer<T> d(static_cast<index>(v.size()));
  copy(device_backend{}, d.data(), v.data(), static_cast<index>(v.size()));
  return d;
}

template <class T, class Buffer>
std::vector<T> to_host_vector(const Buffer& b, index n) {
  std::vector<T> h(usz(n));
  copy_to_host(device_backend{}, h.data(), b.data(), n);
  return h;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  // (memcmp takes no null pointer, even for 0 bytes: an empty plan's vectors may have none.)
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// A routed case: the same logits routed on serial (host plan) and on the device (device plan).
struct routed_pair {
  rs::routing_plan host;
  rs::basic_routing_plan<sim_device_space> device;
};

template <class Capacity>
routed_pair route_both(index T, index E, index k, Capacity cap, std::mt19937& rng) {
  std::vector<float> logits(usz(T * E));
  std::uniform_int_distribution<int> level(0, 5);  // few levels: ties
  for (float& v : logits) v = 0.5f * static_cast<float>(level(rng));
  const rs::router<rs::affinity::precomputed, rt::token_choice, Capacity> r{{}, {.top_k = k}, cap};
  const auto d_logits = to_device(logits);
  routed_pair p{r.route(rs::backend::serial{}, rs::matrix_view<const float>{logits.data(), T, E}),
                r.route(device_backend{}, rs::matrix_view<const float, sim_device_space>{d_logits.data(), T, E})};
  REQUIRE(rs::to_host(device_backend{}, p.device) == p.host);
  return p;
}

std::vector<routed_pair> cases(std::mt19937& rng) {
  std::vector<routed_pair> out;
  out.push_back(route_both(37, 8, 2, rs::capacity::dropless{}, rng));
  out.push_back(route_both(64, 16, 4, rs::capacity::factor{.factor = 0.6}, rng));                          // drops
  out.push_back(route_both(50, 6, 1, rs::capacity::factor{.factor = 2.0, .pad_to_capacity = true}, rng));  // padding
  out.push_back(route_both(0, 4, 1, rs::capacity::dropless{}, rng));
  return out;
}

template <class T>
std::vector<T> random_rows(index n, std::mt19937& rng) {
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<T> v(usz(n));
  for (T& x : v) x = rs::detail::from_fp32<T>(g(rng));
  return v;
}

// dispatch and combine of T rows on the device equal serial's on the host, bit for bit.
template <class T>
void check_rows_on_device(const routed_pair& p, index d, std::mt19937& rng) {
  const index Tn = p.host.num_tokens(), S = p.host.num_slots();
  CAPTURE(Tn);
  CAPTURE(S);
  CAPTURE(d);
  const std::vector<T> x = random_rows<T>(Tn * d, rng);
  std::vector<T> buffer(usz(S * d));
  rs::dispatch(rs::backend::serial{}, p.host, rs::matrix_view<const T>{x.data(), Tn, d},
               rs::matrix_view<T>{buffer.data(), S, d});
  const auto dx = to_device(x);
  sim_buffer<T> dbuf(S * d);
  rs::dispatch(device_backend{}, p.device, rs::matrix_view<const T, sim_device_space>{dx.data(), Tn, d},
               rs::matrix_view<T, sim_device_space>{dbuf.data(), S, d});
  CHECK(same_bits(to_host_vector<T>(dbuf, S * d), buffer));

  const std::vector<T> expert_out = random_rows<T>(S * d, rng);
  std::vector<T> y(usz(Tn * d));
  rs::combine(rs::backend::serial{}, p.host, rs::matrix_view<const T>{expert_out.data(), S, d},
              rs::matrix_view<T>{y.data(), Tn, d});
  const auto de = to_device(expert_out);
  sim_buffer<T> dy(Tn * d);
  rs::combine(device_backend{}, p.device, rs::matrix_view<const T, sim_device_space>{de.data(), S, d},
              rs::matrix_view<T, sim_device_space>{dy.data(), Tn, d});
  CHECK(same_bits(to_host_vector<T>(dy, Tn * d), y));
}

// The nearest bfloat16 to v, ties to even, by search: every bfloat16 of v's sign compared in double.
std::uint16_t nearest_bf16(float v) {
  const double x = v;
  std::uint16_t best = 0;
  double best_err = std::numeric_limits<double>::infinity();
  const std::uint16_t sign = std::signbit(v) ? 0x8000 : 0;
  for (std::uint32_t m = 0; m <= 0x7F80; ++m) {  // finite magnitudes and +Inf
    const auto b = static_cast<std::uint16_t>(sign | m);
    const double y = static_cast<double>(bfloat16{b}.to_float());
    // Past the largest finite value: Inf when |x| >= max + half an ulp (the tie goes to Inf, even).
    double err = std::fabs(y - x);
    if (m == 0x7F80)
      err = std::fabs(x) >= std::ldexp(2.0 - 1.0 / 256.0, 127) ? 0.0 : std::numeric_limits<double>::infinity();
    if (err < best_err || (err == best_err && (b & 1) == 0)) {
      best = b;
      best_err = err;
    }
  }
  return best;
}

}  // namespace

TEST_CASE("bfloat16: from_float rounds to the nearest value, ties to even, and keeps Inf, NaN and the sign of 0") {
  std::mt19937 rng(7);
  std::uniform_int_distribution<std::uint32_t> bits;
  std::vector<float> values = {0.0f,
                               -0.0f,
                               1.0f,
                               -1.5f,
                               1.00390625f /* a tie: 1 + 2^-8 */,
                               1.01171875f /* tie, odd */,
                               std::numeric_limits<float>::max(),
                               -std::numeric_limits<float>::max(),
                               std::numeric_limits<float>::denorm_min(),
                               3.3961775e38f,
                               3.389e38f};
  for (int i = 0; i < 300; ++i) {
    const float v = __builtin_bit_cast(float, bits(rng));
    if (std::isfinite(v)) values.push_back(v);
  }
  for (const float v : values) {
    CAPTURE(v);
    CHECK(bfloat16::from_float(v).bits == nearest_bf16(v));
  }
  CHECK(bfloat16::from_float(std::numeric_limits<float>::infinity()).bits == 0x7F80);
  CHECK(bfloat16::from_float(-std::numeric_limits<float>::infinity()).bits == 0xFF80);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  CHECK(std::isnan(bfloat16::from_float(nan).to_float()));
  CHECK(std::isnan(bfloat16::from_float(__builtin_bit_cast(float, 0x7F800001u)).to_float()));  // low-bit NaN
  // Every bfloat16 converts to float and back unchanged.
  for (std::uint32_t b = 0; b <= 0xFFFF; ++b) {
    const bfloat16 h{static_cast<std::uint16_t>(b)};
    if (!std::isnan(h.to_float())) REQUIRE(bfloat16::from_float(h.to_float()).bits == h.bits);
  }
}

TEST_CASE("bfloat16 rows: combine is the fp32 sum in ascending expert order, rounded once, and dispatch copies bits") {
  std::mt19937 rng(11);
  for (const routed_pair& p : cases(rng)) {
    const rs::routing_plan& plan = p.host;
    const rs::index Tn = plan.num_tokens(), S = plan.num_slots(), d = 70;
    const std::vector<bfloat16> x = random_rows<bfloat16>(Tn * d, rng);
    std::vector<bfloat16> buffer(usz(S * d), bfloat16{0x1234});
    rs::dispatch(rs::backend::serial{}, plan, rs::matrix_view<const bfloat16>{x.data(), Tn, d},
                 rs::matrix_view<bfloat16>{buffer.data(), S, d});
    bool ok = true;
    for (rs::index s = 0; s < S; ++s) {
      const id_type t = plan.slot_token()[usz(s)];
      for (rs::index c = 0; c < d; ++c) ok &= buffer[usz(s * d + c)] == (t >= 0 ? x[usz(t * d + c)] : bfloat16{});
    }
    CHECK(ok);

    const std::vector<bfloat16> e = random_rows<bfloat16>(S * d, rng);
    std::vector<bfloat16> y(usz(Tn * d));
    rs::combine(rs::backend::serial{}, plan, rs::matrix_view<const bfloat16>{e.data(), S, d},
                rs::matrix_view<bfloat16>{y.data(), Tn, d});
    // The reference walks the slot arrays (not the token CSR combine reads): each token's kept slots
    // in ascending expert id.
    ok = true;
    for (rs::index t = 0; t < Tn; ++t) {
      for (rs::index c = 0; c < d; ++c) {
        float acc = 0.0f;
        for (rs::index ex = 0; ex < plan.num_experts(); ++ex) {
          const rs::index first = plan.expert_offsets()[usz(ex)];
          for (rs::index s = first; s < first + plan.expert_counts()[usz(ex)]; ++s)
            if (plan.slot_token()[usz(s)] == t) acc += plan.slot_weight()[usz(s)] * e[usz(s * d + c)].to_float();
        }
        ok &= y[usz(t * d + c)] == bfloat16::from_float(acc);
      }
    }
    CHECK(ok);
  }
}

TEST_CASE("device rows: dispatch and combine of fp32 and bfloat16 rows equal serial's, bit for bit") {
  std::mt19937 rng(3);
  for (const routed_pair& p : cases(rng)) {
    for (const rs::index d : {1, 8, 13, 70}) {
      check_rows_on_device<float>(p, d, rng);
      check_rows_on_device<bfloat16>(p, d, rng);
    }
  }
}

TEST_CASE("device rows: the three exports of a device plan equal the host plan's") {
  std::mt19937 rng(5);
  for (const routed_pair& p : cases(rng)) {
    const rs::index Tn = p.host.num_tokens(), E = p.host.num_experts();
    // to_dense into device matrices.
    std::vector<float> probs(usz(Tn * E));
    std::vector<std::uint8_t> mask(usz(Tn * E));
    rs::to_dense(rs::backend::serial{}, p.host, rs::matrix_view<float>{probs.data(), Tn, E},
                 rs::matrix_view<std::uint8_t>{mask.data(), Tn, E});
    sim_buffer<float> dprobs(Tn * E);
    sim_buffer<std::uint8_t> dmask(Tn * E);
    rs::to_dense(device_backend{}, p.device, rs::matrix_view<float, sim_device_space>{dprobs.data(), Tn, E},
                 rs::matrix_view<std::uint8_t, sim_device_space>{dmask.data(), Tn, E});
    CHECK(same_bits(to_host_vector<float>(dprobs, Tn * E), probs));
    CHECK(same_bits(to_host_vector<std::uint8_t>(dmask, Tn * E), mask));

    for (const rs::index block : {1, 4, 16}) {
      const rs::block_aligned_layout h = rs::to_block_aligned(rs::backend::serial{}, p.host, block);
      const rs::basic_block_aligned_layout<sim_device_space> g =
          rs::to_block_aligned(device_backend{}, p.device, block);
      CHECK(g.num_tokens_post_pad == h.num_tokens_post_pad);
      CHECK(g.block == h.block);
      CHECK(to_host_vector<id_type>(g.sorted_token_ids, g.num_tokens_post_pad) == h.sorted_token_ids);
      CHECK(to_host_vector<id_type>(g.expert_ids, static_cast<rs::index>(g.expert_ids.size())) == h.expert_ids);
    }

    for (const rs::index ranks : {rs::index{1}, rs::index{2}, E}) {
      const auto placement = rs::dist::expert_placement::contiguous(E, ranks, ranks > 1 ? 2 : 1);
      const rs::rank_layout h = rs::to_rank_layout(rs::backend::serial{}, p.host, placement);
      const rs::basic_rank_layout<sim_device_space> g = rs::to_rank_layout(device_backend{}, p.device, placement);
      CHECK(g.num_ranks == h.num_ranks);
      CHECK(to_host_vector<id_type>(g.num_tokens_per_rank, ranks) == h.num_tokens_per_rank);
      CHECK(to_host_vector<id_type>(g.num_tokens_per_node, static_cast<rs::index>(h.num_tokens_per_node.size())) ==
            h.num_tokens_per_node);
      CHECK(to_host_vector<id_type>(g.num_tokens_per_expert, E) == h.num_tokens_per_expert);
      CHECK(to_host_vector<std::uint8_t>(g.is_token_in_rank, Tn * ranks) == h.is_token_in_rank);
    }
  }
}

TEST_CASE("device rows: a shape error is reported before anything is written") {
  std::mt19937 rng(9);
  const routed_pair p = route_both(10, 4, 2, rs::capacity::dropless{}, rng);
  const rs::index S = p.host.num_slots();
  sim_buffer<bfloat16> x(10 * 4), buf(S * 4);
  const rs::matrix_view<const bfloat16, sim_device_space> xv{x.data(), 9, 4};  // one row short
  CHECK(resonance_test::error_of([&] {
          rs::dispatch(device_backend{}, p.device, xv, rs::matrix_view<bfloat16, sim_device_space>{buf.data(), S, 4});
        }) == "resonance: x: expected 10 rows (one per token), got 9");
  CHECK(resonance_test::error_of([&] {
          rs::combine(device_backend{}, p.device, rs::matrix_view<const bfloat16, sim_device_space>{buf.data(), S, 4},
                      rs::matrix_view<bfloat16, sim_device_space>{x.data(), 10, 3});
        }) == "resonance: y: expected shape 10x4, got 10x3");
}
