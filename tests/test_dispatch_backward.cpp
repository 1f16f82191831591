// dispatch_backward and combine_backward: against central finite differences of <G, dispatch(x)> and
// <G, combine(expert_out)> (double rows; the weights perturbed through a rebuilt plan), against
// brute-force loops that find each token's slots through the expert-major slot arrays, not the token
// CSR the functions walk (float and bfloat16 rows), bitwise equal to serial on every host backend, scrambled and a
// device-typed backend, every shape error named with the outputs untouched, and the empty cases.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/resonance.hpp>

#include "backends.hpp"
#include "device_backend.hpp"
#include "error_of.hpp"
#include "random_inputs.hpp"

namespace {

namespace rs = resonance;
namespace rt = resonance::routing;
using resonance::bfloat16;
using resonance_test::usz;

struct routed {
  std::string name;
  rs::routing_plan plan;
};

template <class Capacity>
routed route_random(std::mt19937_64& rng, rs::index T, rs::index E, rs::index k, const Capacity& cap,
                    const std::string& name) {
  const std::vector<float> logits = resonance_test::normal_values(rng, T * E, 2.0);
  const rs::router<rs::affinity::precomputed, rt::token_choice, Capacity> r{{}, {.top_k = k}, cap};
  return {name + " T=" + std::to_string(T) + " E=" + std::to_string(E) + " k=" + std::to_string(k),
          r.route(rs::matrix_view<const float>{logits.data(), T, E})};
}

// Plans with drops (tokens that keep fewer than k, some none), padding slots and aligned experts.
std::vector<routed> plans(std::initializer_list<rs::index> tokens, rs::index E, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  namespace cap = rs::capacity;
  std::vector<routed> out;
  for (rs::index T : tokens) {
    for (rs::index k : {1, 2, 3}) {
      out.push_back(route_random(rng, T, E, k, cap::dropless{}, "dropless"));
      out.push_back(route_random(rng, T, E, k, cap::dropless{.align = 4}, "dropless align 4"));
      out.push_back(route_random(rng, T, E, k,
                                 cap::factor{.factor = 0.5, .drop = rs::drop_policy::position, .pad_to_capacity = true},
                                 "factor 0.5 position pad"));
      out.push_back(route_random(rng, T, E, k,
                                 cap::factor{.factor = 0.75, .drop = rs::drop_policy::random, .align = 8, .seed = 7},
                                 "factor 0.75 random align 8"));
      out.push_back(route_random(rng, T, E, k,
                                 cap::factor{.factor = 1.25, .min_capacity = 3, .pad_to_capacity = true, .align = 4},
                                 "factor 1.25 min 3 pad align 4"));
    }
  }
  return out;
}

template <class T>
T from_double(double v) {
  if constexpr (std::is_same_v<T, bfloat16>) {
    return bfloat16::from_float(static_cast<float>(v));
  } else {
    return static_cast<T>(v);
  }
}

template <class T>
std::vector<T> random_rows(std::mt19937_64& rng, rs::index n) {
  std::normal_distribution<double> g(0.0, 1.0);
  std::vector<T> v(usz(n));
  for (T& x : v) x = from_double<T>(g(rng));
  return v;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// What the backward functions wrote, for one backend.
template <class T, class W>
struct gradients {
  std::vector<T> dx, d_expert_out;
  std::vector<W> dweight;
};

// dispatch_backward and combine_backward of host rows on backend be, into outputs that start as garbage.
template <class W, class T, class Backend>
gradients<T, W> run_backward(const Backend& be, const rs::routing_plan& plan, rs::index d,
                             const std::vector<T>& dbuffer, const std::vector<T>& expert_out,
                             const std::vector<T>& dy) {
  const rs::index Tn = plan.num_tokens(), S = plan.num_slots(), A = plan.num_assignments();
  gradients<T, W> g;
  g.dx.assign(usz(Tn * d), from_double<T>(-777.0));
  g.d_expert_out.assign(usz(S * d), from_double<T>(-777.0));
  g.dweight.assign(usz(A), W(-777));
  rs::dispatch_backward(be, plan, rs::matrix_view<const T>{dbuffer.data(), S, d},
                        rs::matrix_view<T>{g.dx.data(), Tn, d});
  rs::combine_backward(be, plan, rs::matrix_view<const T>{expert_out.data(), S, d},
                       rs::matrix_view<const T>{dy.data(), Tn, d}, rs::matrix_view<T>{g.d_expert_out.data(), S, d},
                       rs::vector_view<W>{g.dweight.data(), A});
  return g;
}

// ---------------------------------------------------------------------------------------------------
// Central finite differences (double rows)

double inner(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// <G, dispatch(x)> and <G, combine(expert_out)> on serial.
double dispatch_loss(const rs::routing_plan& plan, const std::vector<double>& x, rs::index d,
                     const std::vector<double>& G) {
  std::vector<double> buf(usz(plan.num_slots() * d));
  rs::dispatch(rs::backend::serial{}, plan, rs::matrix_view<const double>{x.data(), plan.num_tokens(), d},
               rs::matrix_view<double>{buf.data(), plan.num_slots(), d});
  return inner(G, buf);
}
double combine_loss(const rs::routing_plan& plan, const std::vector<double>& expert_out, rs::index d,
                    const std::vector<double>& G) {
  std::vector<double> y(usz(plan.num_tokens() * d));
  rs::combine(rs::backend::serial{}, plan, rs::matrix_view<const double>{expert_out.data(), plan.num_slots(), d},
              rs::matrix_view<double>{y.data(), plan.num_tokens(), d});
  return inner(G, y);
}

template <class T>
std::vector<T> to_vector(std::span<const T> s) {
  return {s.begin(), s.end()};
}

// The plan with assignment i's weight set to w (in both orders the plan stores it).
rs::routing_plan with_weight(const rs::routing_plan& p, rs::index i, float w) {
  rs::detail::plan_arrays a;
  const auto vec = [](auto span) { return to_vector(span); };
  a.expert_offsets = vec(p.expert_offsets());
  a.expert_counts = vec(p.expert_counts());
  a.expert_demand = vec(p.expert_demand());
  a.slot_token = vec(p.slot_token());
  a.slot_weight = vec(p.slot_weight());
  a.token_offsets = vec(p.token_offsets());
  a.token_expert = vec(p.token_expert());
  a.token_weight = vec(p.token_weight());
  a.token_slot = vec(p.token_slot());
  a.token_weight[usz(i)] = w;
  a.slot_weight[usz(a.token_slot[usz(i)])] = w;
  return rs::detail::host_plan(p.num_tokens(), p.num_experts(), p.capacity(), a);
}

bool close(double analytic, double fd, double scale) {
  return std::fabs(analytic - fd) <= 1e-6 * (scale + std::fabs(fd));
}

TEST_CASE(
    "test_dispatch_backward: dispatch_backward and combine_backward equal central finite differences, on every "
    "backend") {
  std::mt19937_64 rng(51);
  const double h = 1e-3;
  int tokens_without_slot = 0, padding_slots = 0;
  for (const routed& r : plans({1, 9, 23}, 6, 50)) {
    const rs::routing_plan& plan = r.plan;
    const rs::index Tn = plan.num_tokens(), S = plan.num_slots(), A = plan.num_assignments();
    for (rs::index t = 0; t < Tn; ++t)
      tokens_without_slot += plan.token_offsets()[usz(t)] == plan.token_offsets()[usz(t + 1)] ? 1 : 0;
    for (rs::id_type tok : plan.slot_token()) padding_slots += tok < 0 ? 1 : 0;
    for (rs::index d : {3, 11}) {  // 11: the dot products' eight partial sums and a tail
      CAPTURE(r.name);
      CAPTURE(d);
      const std::vector<double> x = random_rows<double>(rng, Tn * d), Gb = random_rows<double>(rng, S * d);
      const std::vector<double> eo = random_rows<double>(rng, S * d), Gy = random_rows<double>(rng, Tn * d);

      // The finite differences, each entry perturbed by ±h (the loss is linear, so they are exact up
      // to rounding).
      std::vector<double> fd_dx(usz(Tn * d)), fd_deo(usz(S * d)), fd_dw(usz(A));
      for (std::size_t j = 0; j < x.size(); ++j) {
        std::vector<double> xp = x, xm = x;
        xp[j] += h;
        xm[j] -= h;
        fd_dx[j] = (dispatch_loss(plan, xp, d, Gb) - dispatch_loss(plan, xm, d, Gb)) / (xp[j] - xm[j]);
      }
      for (std::size_t j = 0; j < eo.size(); ++j) {
        std::vector<double> ep = eo, em = eo;
        ep[j] += h;
        em[j] -= h;
        fd_deo[j] = (combine_loss(plan, ep, d, Gy) - combine_loss(plan, em, d, Gy)) / (ep[j] - em[j]);
      }
      for (rs::index i = 0; i < A; ++i) {
        // The weights are fp32: the step is what the perturbed weights really differ by.
        const float w = plan.token_weight()[usz(i)];
        const float wp = w + static_cast<float>(h), wm = w - static_cast<float>(h);
        fd_dw[usz(i)] =
            (combine_loss(with_weight(plan, i, wp), eo, d, Gy) - combine_loss(with_weight(plan, i, wm), eo, d, Gy)) /
            (static_cast<double>(wp) - static_cast<double>(wm));
      }
      const double gscale = 1.0;  // G and the rows are standard normal

      resonance_test::for_each_backend([&](const auto& be, const std::string& name) {
        CAPTURE(name);
        const gradients<double, double> g = run_backward<double>(be, plan, d, Gb, eo, Gy);
        bool ok = true;
        for (std::size_t j = 0; j < fd_dx.size(); ++j) ok = ok && close(g.dx[j], fd_dx[j], gscale);
        CHECK_MESSAGE(ok, "dx");
        ok = true;
        for (std::size_t j = 0; j < fd_deo.size(); ++j) ok = ok && close(g.d_expert_out[j], fd_deo[j], gscale);
        CHECK_MESSAGE(ok, "d_expert_out");
        ok = true;
        for (std::size_t j = 0; j < fd_dw.size(); ++j)
          ok = ok && close(g.dweight[j], fd_dw[j], gscale * static_cast<double>(d));
        CHECK_MESSAGE(ok, "dweight");
      });
    }
  }
  // The cases above cover what the brief of these functions is about.
  CHECK(tokens_without_slot > 0);
  CHECK(padding_slots > 0);
}

// ---------------------------------------------------------------------------------------------------
// Brute force through the slot arrays

// slot_of[t·E + e]: the slot of kept pair (t, e), or -1; read from expert_offsets and slot_token only.
std::vector<rs::index> slot_map(const rs::routing_plan& p) {
  const rs::index Tn = p.num_tokens(), E = p.num_experts();
  std::vector<rs::index> slot_of(usz(Tn * E), -1);
  for (rs::index e = 0; e < E; ++e)
    for (rs::index s = p.expert_offsets()[usz(e)]; s < p.expert_offsets()[usz(e + 1)]; ++s)
      if (const rs::index t = p.slot_token()[usz(s)]; t >= 0) slot_of[usz(t * E + e)] = s;
  return slot_of;
}

template <class T>
float as_float(T v) {
  return rs::detail::to_fp32(v);
}

template <class T>
void check_brute_force(const routed& r, rs::index d, std::mt19937_64& rng) {
  const rs::routing_plan& plan = r.plan;
  const rs::index Tn = plan.num_tokens(), S = plan.num_slots(), E = plan.num_experts();
  const std::vector<rs::index> slot_of = slot_map(plan);
  const std::vector<T> dbuf = random_rows<T>(rng, S * d), eo = random_rows<T>(rng, S * d),
                       dy = random_rows<T>(rng, Tn * d);
  const gradients<T, float> g = run_backward<float>(rs::backend::serial{}, plan, d, dbuf, eo, dy);

  // dx: a token's kept slots in ascending expert order, summed from 0 in fp32 for float and bfloat16
  // (rounded once), so bitwise.
  std::vector<T> dx(usz(Tn * d));
  for (rs::index t = 0; t < Tn; ++t)
    for (rs::index c = 0; c < d; ++c) {
      float acc = 0.0f;
      for (rs::index e = 0; e < E; ++e)
        if (const rs::index s = slot_of[usz(t * E + e)]; s >= 0) acc += as_float(dbuf[usz(s * d + c)]);
      dx[usz(t * d + c)] = rs::detail::from_fp32<T>(acc);
    }
  CHECK(same_bits(g.dx, dx));

  // The kept pairs in token-major order (t, then e ascending): the order of the plan's token_weight(),
  // which gives each pair's weight (so the slot arrays and the token CSR must agree).
  std::vector<rs::index> pairs;
  for (rs::index t = 0; t < Tn; ++t)
    for (rs::index e = 0; e < E; ++e)
      if (slot_of[usz(t * E + e)] >= 0) pairs.push_back(t * E + e);
  REQUIRE(pairs.size() == g.dweight.size());

  // d_expert_out: the pair's weight times its token's dy row, one rounding; zero rows at padding.
  std::vector<T> deo(usz(S * d), T{});
  for (std::size_t i = 0; i < pairs.size(); ++i) {
    const rs::index t = pairs[i] / E, s = slot_of[usz(pairs[i])];
    for (rs::index c = 0; c < d; ++c)
      deo[usz(s * d + c)] = rs::detail::from_fp32<T>(plan.token_weight()[i] * as_float(dy[usz(t * d + c)]));
  }
  CHECK(same_bits(g.d_expert_out, deo));

  // dweight: a double sum in column order. Both it and the function's are within d·2^-53 of the exact
  // sum relative to the terms' magnitudes, and the function's is then rounded once to fp32.
  bool ok = true;
  for (std::size_t i = 0; i < pairs.size(); ++i) {
    const rs::index t = pairs[i] / E, s = slot_of[usz(pairs[i])];
    double want = 0.0, magnitude = 0.0;
    for (rs::index c = 0; c < d; ++c) {
      const double term =
          static_cast<double>(as_float(dy[usz(t * d + c)])) * static_cast<double>(as_float(eo[usz(s * d + c)]));
      want += term;
      magnitude += std::fabs(term);
    }
    const double got = static_cast<double>(g.dweight[i]);
    const double tol = 0x1p-24 * std::fabs(want) + 4.0 * static_cast<double>(d) * 0x1p-53 * magnitude;
    if (!(std::fabs(got - want) <= tol)) {
      ok = false;
      FAIL_CHECK("dweight " << i << ": " << got << " vs " << want);
    }
  }
  CHECK(ok);
}

TEST_CASE(
    "test_dispatch_backward: dispatch_backward and combine_backward of float and bfloat16 rows equal brute force over "
    "the slot arrays") {
  std::mt19937_64 rng(52);
  for (const routed& r : plans({1, 37, 150}, 8, 53)) {
    CAPTURE(r.name);
    check_brute_force<float>(r, 5, rng);
    check_brute_force<float>(r, 19, rng);
    check_brute_force<bfloat16>(r, 13, rng);
  }
}

TEST_CASE("test_dispatch_backward: combine_backward sums dweight in double: a cancellation keeps the small term") {
  // One token, one expert, weight whatever: dy = (2^27, 1, -2^27), expert_out = (1, 1, 1). An fp32
  // running sum loses the 1 (2^27 + 1 is not a float); the double sum is exactly 1.
  const std::vector<float> logits{1.0f};
  const rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::dropless> r{{}, {.top_k = 1}, {}};
  const rs::routing_plan plan = r.route(rs::matrix_view<const float>{logits.data(), 1, 1});
  REQUIRE(plan.num_assignments() == 1);
  const std::vector<float> dy{0x1p27f, 1.0f, -0x1p27f}, eo{1.0f, 1.0f, 1.0f};
  std::vector<float> dweight{-1.0f};
  resonance_test::for_each_backend([&](const auto& be, const std::string& name) {
    dweight[0] = -1.0f;
    rs::combine_backward(be, plan, rs::matrix_view<const float>{eo.data(), 1, 3},
                         rs::matrix_view<const float>{dy.data(), 1, 3}, rs::matrix_view<float>{},
                         rs::vector_view<float>{dweight.data(), 1});
    CHECK_MESSAGE(dweight[0] == 1.0f, name);
  });
}

// ---------------------------------------------------------------------------------------------------
// Bitwise equal on every backend

template <class T, class W>
bool same_gradients(const gradients<T, W>& a, const gradients<T, W>& b) {
  return same_bits(a.dx, b.dx) && same_bits(a.d_expert_out, b.d_expert_out) && same_bits(a.dweight, b.dweight);
}

template <class T, class W>
void check_backends(const routed& r, rs::index d, std::mt19937_64& rng) {
  const rs::index Tn = r.plan.num_tokens(), S = r.plan.num_slots();
  const std::vector<T> dbuf = random_rows<T>(rng, S * d), eo = random_rows<T>(rng, S * d),
                       dy = random_rows<T>(rng, Tn * d);
  const gradients<T, W> want = run_backward<W>(rs::backend::serial{}, r.plan, d, dbuf, eo, dy);
  // A second call gives the same bits.
  CHECK(same_gradients(run_backward<W>(rs::backend::serial{}, r.plan, d, dbuf, eo, dy), want));
  resonance_test::for_each_backend_and_scrambled([&](const auto& be, const std::string& name) {
    CHECK_MESSAGE(same_gradients(run_backward<W>(be, r.plan, d, dbuf, eo, dy), want), name);
  });
}

TEST_CASE("test_dispatch_backward: dispatch_backward and combine_backward are serial's bitwise on every host backend") {
  std::mt19937_64 rng(54);
  // Several blocks of 256 rows and assignments.
  for (const routed& r : plans({0, 300, 2049}, 16, 55)) {
    CAPTURE(r.name);
    check_backends<float, float>(r, 37, rng);
    check_backends<double, double>(r, 9, rng);
    check_backends<bfloat16, float>(r, 20, rng);
    check_backends<float, double>(r, 8, rng);
  }
}

// On a backend whose memory the host cannot read: columns_per_item splits rows into 8-column items.
template <class T>
void check_device(const rs::routing_plan& host, const rs::basic_routing_plan<resonance_test::sim_device_space>& dev,
                  rs::index d, std::mt19937_64& rng) {
  using resonance_test::device_backend;
  using resonance_test::sim_buffer;
  using Dev = resonance_test::sim_device_space;
  const rs::index Tn = host.num_tokens(), S = host.num_slots(), A = host.num_assignments();
  const std::vector<T> dbuf = random_rows<T>(rng, S * d), eo = random_rows<T>(rng, S * d),
                       dy = random_rows<T>(rng, Tn * d);
  const gradients<T, float> want = run_backward<float>(rs::backend::serial{}, host, d, dbuf, eo, dy);
  const auto upload = [](const std::vector<T>& v) {
    sim_buffer<T> b(static_cast<rs::index>(v.size()));
    copy(device_backend{}, b.data(), v.data(), static_cast<rs::index>(v.size()));
    return b;
  };
  const sim_buffer<T> d_dbuf = upload(dbuf), d_eo = upload(eo), d_dy = upload(dy);
  sim_buffer<T> d_dx(Tn * d), d_deo(S * d);
  sim_buffer<float> d_dw(A);
  rs::dispatch_backward(device_backend{}, dev, rs::matrix_view<const T, Dev>{d_dbuf.data(), S, d},
                        rs::matrix_view<T, Dev>{d_dx.data(), Tn, d});
  rs::combine_backward(device_backend{}, dev, rs::matrix_view<const T, Dev>{d_eo.data(), S, d},
                       rs::matrix_view<const T, Dev>{d_dy.data(), Tn, d}, rs::matrix_view<T, Dev>{d_deo.data(), S, d},
                       rs::matrix_view<float, Dev>{d_dw.data(), A, 1});
  gradients<T, float> got;
  got.dx.resize(usz(Tn * d));
  got.d_expert_out.resize(usz(S * d));
  got.dweight.resize(usz(A));
  copy_to_host(device_backend{}, got.dx.data(), d_dx.data(), Tn * d);
  copy_to_host(device_backend{}, got.d_expert_out.data(), d_deo.data(), S * d);
  copy_to_host(device_backend{}, got.dweight.data(), d_dw.data(), A);
  CHECK(same_gradients(got, want));
}

TEST_CASE(
    "test_dispatch_backward: dispatch_backward and combine_backward on a device-typed backend equal serial's bitwise") {
  std::mt19937_64 rng(56);
  namespace cap = rs::capacity;
  const auto both = [&](rs::index T, rs::index E, rs::index k, auto capacity) {
    const std::vector<float> logits = resonance_test::normal_values(rng, T * E, 2.0);
    const rs::router<rs::affinity::precomputed, rt::token_choice, decltype(capacity)> r{{}, {.top_k = k}, capacity};
    resonance_test::sim_buffer<float> d_logits(T * E);
    copy(resonance_test::device_backend{}, d_logits.data(), logits.data(), T * E);
    const rs::routing_plan host = r.route(rs::matrix_view<const float>{logits.data(), T, E});
    const auto dev = r.route(resonance_test::device_backend{},
                             rs::matrix_view<const float, resonance_test::sim_device_space>{d_logits.data(), T, E});
    REQUIRE(rs::to_host(resonance_test::device_backend{}, dev) == host);
    for (rs::index d : {1, 8, 13, 70}) {  // 13 and 70 cross 8-column items
      CAPTURE(T);
      CAPTURE(d);
      check_device<float>(host, dev, d, rng);
      check_device<bfloat16>(host, dev, d, rng);
    }
  };
  both(37, 8, 2, cap::dropless{});
  both(64, 16, 4, cap::factor{.factor = 0.6});
  both(50, 6, 1, cap::factor{.factor = 2.0, .pad_to_capacity = true, .align = 4});
  both(0, 4, 1, cap::factor{.factor = 1.0, .min_capacity = 2, .pad_to_capacity = true});
}

// ---------------------------------------------------------------------------------------------------
// Errors

TEST_CASE("test_dispatch_backward: dispatch_backward and combine_backward name the bad argument and write nothing") {
  std::mt19937_64 rng(57);
  const routed r =
      route_random(rng, 9, 6, 2, rs::capacity::factor{.factor = 0.75, .pad_to_capacity = true}, "factor pad");
  const rs::routing_plan& plan = r.plan;
  const rs::index Tn = plan.num_tokens(), S = plan.num_slots(), A = plan.num_assignments(), d = 4;
  REQUIRE(A > 1);
  // Inputs and outputs with room for one more row and column than any case asks for.
  const rs::index big = (std::max(Tn, S) + 2) * (d + 2);
  const std::vector<float> in = random_rows<float>(rng, big);
  const float sentinel = -12345.0f;
  std::vector<float> out(usz(big), sentinel), dw(usz(A + 2), sentinel);
  using cm = rs::matrix_view<const float>;
  using m = rs::matrix_view<float>;
  const float* p = in.data();

  const auto untouched = [&] {
    bool ok = true;
    for (float v : out) ok = ok && v == sentinel;
    for (float v : dw) ok = ok && v == sentinel;
    return ok;
  };
  const auto expect = [&](const std::string& argument, const auto& call) {
    CAPTURE(argument);
    const std::string want = resonance_test::error_of([&] { call(rs::backend::serial{}); });
    CHECK_MESSAGE(want.starts_with("resonance: " + argument + ": expected "), want);
    CHECK(untouched());
    resonance_test::for_each_backend_and_scrambled([&](const auto& be, const std::string& name) {
      CHECK_MESSAGE(resonance_test::error_of([&] { call(be); }) == want, name);
      CHECK_MESSAGE(untouched(), name);
    });
  };

  // dispatch_backward(dbuffer S×d, dx T×d)
  const auto db = [&](cm dbuffer, m dx) {
    return [=, &plan](const auto& be) { rs::dispatch_backward(be, plan, dbuffer, dx); };
  };
  expect("dbuffer", db(cm{p, S + 1, d}, m{out.data(), Tn, d}));
  expect("dbuffer", db(cm{p, S - 1, d}, m{out.data(), Tn, d}));
  expect("dbuffer", db(cm{p, S, d, d - 1}, m{out.data(), Tn, d}));
  expect("dbuffer", db(cm{nullptr, S, d}, m{out.data(), Tn, d}));
  expect("dx", db(cm{p, S, d}, m{out.data(), Tn + 1, d}));
  expect("dx", db(cm{p, S, d}, m{out.data(), Tn, d + 1}));
  expect("dx", db(cm{p, S, d}, m{out.data(), Tn, d, d - 1}));
  expect("dx", db(cm{p, S, d}, m{nullptr, Tn, d}));

  // combine_backward(expert_out S×d, dy T×d, d_expert_out S×d, dweight A×1)
  const auto cb = [&](cm eo, cm dy, m deo, m dweight) {
    return [=, &plan](const auto& be) { rs::combine_backward(be, plan, eo, dy, deo, dweight); };
  };
  const cm eo{p, S, d}, dy{p, Tn, d};
  const m deo{out.data(), S, d}, dwv{dw.data(), A, 1};
  expect("expert_out", cb(cm{p, S + 1, d}, dy, deo, dwv));
  expect("expert_out", cb(cm{p, S, d, 2}, dy, deo, dwv));
  expect("expert_out", cb(cm{nullptr, S, d}, dy, deo, dwv));
  expect("dy", cb(eo, cm{p, Tn - 1, d}, deo, dwv));
  expect("dy", cb(eo, cm{p, Tn, d + 1}, deo, dwv));
  expect("dy", cb(eo, cm{p, Tn, d, 0}, deo, dwv));
  expect("d_expert_out", cb(eo, dy, m{out.data(), S + 1, d}, dwv));
  expect("d_expert_out", cb(eo, dy, m{out.data(), S, d - 1}, dwv));
  expect("d_expert_out", cb(eo, dy, m{out.data(), S, d, d - 1}, dwv));
  expect("d_expert_out", cb(eo, dy, m{nullptr, S, d}, dwv));
  expect("d_expert_out", cb(eo, dy, m{out.data(), -1, 0}, dwv));
  expect("dweight", cb(eo, dy, deo, m{dw.data(), A + 1, 1}));
  expect("dweight", cb(eo, dy, deo, m{dw.data(), A - 1, 1}));
  expect("dweight", cb(eo, dy, deo, m{dw.data(), A, 2}));
  expect("dweight", cb(eo, dy, deo, m{nullptr, A, 1}));
  // The vector_view form.
  const auto cv = [&](rs::vector_view<float> dweight) {
    return [=, &plan](const auto& be) { rs::combine_backward(be, plan, eo, dy, deo, dweight); };
  };
  expect("dweight", cv({dw.data(), A - 1}));
  expect("dweight", cv({dw.data(), A + 2}));
  expect("dweight", cv({nullptr, A}));
  expect("dweight", cv({dw.data(), -1}));
  // The first bad argument is named when several are.
  expect("expert_out", cb(cm{p, S + 1, d}, cm{p, Tn + 1, d}, m{out.data(), S + 1, d}, m{dw.data(), A + 1, 1}));
}

// ---------------------------------------------------------------------------------------------------
// Empty cases and skipped outputs

TEST_CASE(
    "test_dispatch_backward: dispatch_backward and combine_backward: no tokens, no columns, and outputs not wanted") {
  std::mt19937_64 rng(58);
  // No tokens, but padding slots (every expert padded to min_capacity): d_expert_out is all zeros.
  const routed padded = route_random(
      rng, 0, 4, 2, rs::capacity::factor{.factor = 1.0, .min_capacity = 2, .pad_to_capacity = true}, "empty padded");
  const routed empty = route_random(rng, 0, 4, 2, rs::capacity::dropless{}, "empty dropless");
  REQUIRE(padded.plan.num_slots() > 0);
  REQUIRE(empty.plan.num_slots() == 0);
  resonance_test::for_each_backend_and_scrambled([&](const auto& be, const std::string& name) {
    CAPTURE(name);
    for (const routed* r : {&padded, &empty}) {
      const rs::index S = r->plan.num_slots(), d = 3;
      const std::vector<float> eo = random_rows<float>(rng, S * d);
      std::vector<float> deo(usz(S * d), 5.0f);
      rs::dispatch_backward(be, r->plan, rs::matrix_view<const float>{eo.data(), S, d},
                            rs::matrix_view<float>{nullptr, 0, d});
      rs::combine_backward(be, r->plan, rs::matrix_view<const float>{eo.data(), S, d},
                           rs::matrix_view<const float>{nullptr, 0, d}, rs::matrix_view<float>{deo.data(), S, d},
                           rs::vector_view<float>{});
      bool zero = true;
      for (float v : deo) zero = zero && v == 0.0f && !std::signbit(v);
      CHECK(zero);
    }
  });

  // No columns: nothing to write but dweight, which is an empty sum: +0.
  const routed r = route_random(rng, 20, 5, 2, rs::capacity::factor{.factor = 1.0}, "factor 1");
  const rs::index Tn = r.plan.num_tokens(), S = r.plan.num_slots(), A = r.plan.num_assignments();
  resonance_test::for_each_backend_and_scrambled([&](const auto& be, const std::string& name) {
    CAPTURE(name);
    std::vector<double> dw(usz(A), 9.0);
    std::vector<double> row(1);
    rs::dispatch_backward(be, r.plan, rs::matrix_view<const double>{row.data(), S, 0},
                          rs::matrix_view<double>{row.data(), Tn, 0});
    rs::combine_backward(be, r.plan, rs::matrix_view<const double>{row.data(), S, 0},
                         rs::matrix_view<const double>{row.data(), Tn, 0}, rs::matrix_view<double>{row.data(), S, 0},
                         rs::vector_view<double>{dw.data(), A});
    bool zero = true;
    for (double v : dw) zero = zero && v == 0.0 && !std::signbit(v);
    CHECK(zero);
  });

  // Each output alone equals its part of both, with mutable inputs (the non-const views) and dweight
  // as a vector or a column.
  const rs::index d = 6;
  std::vector<float> eo = random_rows<float>(rng, S * d), dy = random_rows<float>(rng, Tn * d);
  const gradients<float, float> both = run_backward<float>(rs::backend::serial{}, r.plan, d, eo, eo, dy);
  resonance_test::for_each_backend([&](const auto& be, const std::string& name) {
    CAPTURE(name);
    std::vector<float> deo(usz(S * d), -1.0f), dw(usz(A), -1.0f), dw_col(usz(2 * A), -1.0f);
    rs::combine_backward(be, r.plan, rs::matrix_view<float>{eo.data(), S, d}, rs::matrix_view<float>{dy.data(), Tn, d},
                         rs::matrix_view<float>{deo.data(), S, d}, rs::vector_view<float>{});
    CHECK(same_bits(deo, both.d_expert_out));
    deo.assign(deo.size(), -1.0f);
    rs::combine_backward(be, r.plan, rs::matrix_view<float>{eo.data(), S, d}, rs::matrix_view<float>{dy.data(), Tn, d},
                         rs::matrix_view<float>{}, rs::vector_view<float>{dw.data(), A});
    CHECK(same_bits(dw, both.dweight));
    bool untouched = true;
    for (float v : deo) untouched = untouched && v == -1.0f;
    CHECK(untouched);
    // A column with stride 2: every other entry is written.
    rs::combine_backward(be, r.plan, rs::matrix_view<float>{eo.data(), S, d}, rs::matrix_view<float>{dy.data(), Tn, d},
                         rs::matrix_view<float>{}, rs::matrix_view<float>{dw_col.data(), A, 1, 2});
    bool col = true;
    for (rs::index i = 0; i < A; ++i)
      col = col && dw_col[usz(2 * i)] == both.dweight[usz(i)] && dw_col[usz(2 * i + 1)] == -1.0f;
    CHECK(col);
    std::vector<float> dx(usz(Tn * d), -1.0f);
    rs::dispatch_backward(be, r.plan, rs::matrix_view<float>{eo.data(), S, d},
                          rs::matrix_view<float>{dx.data(), Tn, d});
    CHECK(same_bits(dx, both.dx));
  });
}

}  // namespace
