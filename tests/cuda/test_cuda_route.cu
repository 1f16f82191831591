// Routes on backend::cuda beyond the conformance cases: route_into captured in a CUDA graph, replayed
// on new logits at the same address, gives serial's plan on each replay (and serial's error for a
// replay with a NaN); dispatch / combine of bf16 and fp32 rows in device memory equal serial's;
// grap_cosine and cosine compute their logits on the device from fp32 and bf16 hidden states, giving
// serial's plan;
// Sinkhorn and expert choice route there as on serial.

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/backend/cuda.cuh>
#include <resonance/resonance.hpp>

#include "../error_of.hpp"

namespace {

namespace rs = resonance;
namespace rt = resonance::routing;
using resonance_test::error_of;
using rs::index;

// The copy back of route_into lands in pinned memory: a graph can capture it.
static_assert(std::is_same_v<rs::host_readable_t<rs::backend::cuda, rs::index>, rs::cuda_host_buffer<rs::index>>);

void check_cuda(cudaError_t s) { REQUIRE_MESSAGE(s == cudaSuccess, cudaGetErrorString(s)); }

std::vector<float> random_logits(index n, std::mt19937& rng) {
  std::uniform_int_distribution<int> level(-40, 40);  // coarse levels: ties
  std::vector<float> v(static_cast<std::size_t>(n));
  for (float& x : v) x = 0.125f * static_cast<float>(level(rng));
  return v;
}

}  // namespace

TEST_CASE("cuda: route_into captured in a CUDA graph replays to serial's plan on new logits") {
  cudaStream_t stream = nullptr;
  check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  {
    const rs::backend::cuda be{stream};
    const rs::index T = 1000, E = 64, k = 8;
    std::mt19937 rng(2024);
    std::vector<float> bias(static_cast<std::size_t>(E));
    for (float& b : bias) b = 0.01f * static_cast<float>(rng() % 7);
    const rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::factor> r{
        {}, {.top_k = k, .score = rs::score::sigmoid, .expert_bias = {bias.data(), E}}, {.factor = 1.0}};

    auto x = allocate<float>(be, T * E);
    const rs::matrix_view<const float, rs::cuda_space> dx{x.data(), T, E};
    rs::route_workspace<rs::backend::cuda> ws;
    rs::basic_routing_plan<rs::cuda_space> plan;

    // One route outside the capture gives the workspace and the plan their room.
    std::vector<float> logits = random_logits(T * E, rng);
    copy(be, x.data(), logits.data(), T * E);
    r.route_into(be, dx, ws, plan);
    r.finish(be, ws, plan);
    CHECK(rs::to_host(be, plan) == r.route(rs::backend::serial{}, rs::matrix_view<const float>{logits.data(), T, E}));

    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    check_cuda(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    r.route_into(be, dx, ws, plan);
    check_cuda(cudaStreamEndCapture(stream, &graph));
    check_cuda(cudaGraphInstantiate(&exec, graph, 0));

    for (int replay = 0; replay < 3; ++replay) {
      logits = random_logits(T * E, rng);
      copy(be, x.data(), logits.data(), T * E);
      check_cuda(cudaGraphLaunch(exec, stream));
      r.finish(be, ws, plan);
      CHECK(rs::to_host(be, plan) == r.route(rs::backend::serial{}, rs::matrix_view<const float>{logits.data(), T, E}));
    }

    // A replay on logits with a NaN: finish throws serial's error.
    logits[static_cast<std::size_t>(17 * E + 3)] = __builtin_nanf("");
    copy(be, x.data(), logits.data(), T * E);
    check_cuda(cudaGraphLaunch(exec, stream));
    const std::string want = error_of([&] {
      (void)r.route(rs::backend::serial{}, rs::matrix_view<const float>{logits.data(), T, E});
    });
    CHECK(error_of([&] { r.finish(be, ws, plan); }) == want);

    check_cuda(cudaGraphExecDestroy(exec));
    check_cuda(cudaGraphDestroy(graph));
    fence(be);
  }
  check_cuda(cudaStreamDestroy(stream));
}

TEST_CASE("cuda: dispatch and combine of bf16 and fp32 rows in device memory equal serial's") {
  const rs::backend::cuda be{};
  const rs::index T = 257, E = 16, k = 2;
  std::mt19937 rng(5);
  const std::vector<float> logits = random_logits(T * E, rng);
  const rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::factor> r{
      {}, {.top_k = k}, {.factor = 1.0, .pad_to_capacity = true}};
  auto dl = allocate<float>(be, T * E);
  copy(be, dl.data(), logits.data(), T * E);
  const rs::routing_plan host = r.route(rs::backend::serial{}, rs::matrix_view<const float>{logits.data(), T, E});
  const auto plan = r.route(be, rs::matrix_view<const float, rs::cuda_space>{dl.data(), T, E});
  const rs::index S = host.num_slots();
  for (const rs::index d : {rs::index{7}, rs::index{64}, rs::index{7168}}) {
    CAPTURE(d);
    std::normal_distribution<float> g;
    std::vector<rs::bfloat16> x(static_cast<std::size_t>(T * d)), e(static_cast<std::size_t>(S * d));
    for (auto& v : x) v = rs::bfloat16::from_float(g(rng));
    for (auto& v : e) v = rs::bfloat16::from_float(g(rng));
    std::vector<rs::bfloat16> buf(static_cast<std::size_t>(S * d)), y(static_cast<std::size_t>(T * d));
    rs::dispatch(rs::backend::serial{}, host, rs::matrix_view<const rs::bfloat16>{x.data(), T, d},
                 rs::matrix_view<rs::bfloat16>{buf.data(), S, d});
    rs::combine(rs::backend::serial{}, host, rs::matrix_view<const rs::bfloat16>{e.data(), S, d},
                rs::matrix_view<rs::bfloat16>{y.data(), T, d});

    auto dx = allocate<rs::bfloat16>(be, T * d), de = allocate<rs::bfloat16>(be, S * d);
    auto dbuf = allocate<rs::bfloat16>(be, S * d), dy = allocate<rs::bfloat16>(be, T * d);
    copy(be, dx.data(), x.data(), T * d);
    copy(be, de.data(), e.data(), S * d);
    rs::dispatch(be, plan, rs::matrix_view<const rs::bfloat16, rs::cuda_space>{dx.data(), T, d},
                 rs::matrix_view<rs::bfloat16, rs::cuda_space>{dbuf.data(), S, d});
    rs::combine(be, plan, rs::matrix_view<const rs::bfloat16, rs::cuda_space>{de.data(), S, d},
                rs::matrix_view<rs::bfloat16, rs::cuda_space>{dy.data(), T, d});
    std::vector<rs::bfloat16> got_buf(buf.size()), got_y(y.size());
    copy_to_host(be, got_buf.data(), dbuf.data(), S * d);
    copy_to_host(be, got_y.data(), dy.data(), T * d);
    fence(be);
    CHECK(std::memcmp(got_buf.data(), buf.data(), buf.size() * sizeof(rs::bfloat16)) == 0);
    CHECK(std::memcmp(got_y.data(), y.data(), y.size() * sizeof(rs::bfloat16)) == 0);

    // fp32 rows of the same shapes.
    std::vector<float> xf(x.size()), ef(e.size()), yf(y.size());
    for (std::size_t i = 0; i < x.size(); ++i) xf[i] = x[i].to_float();
    for (std::size_t i = 0; i < e.size(); ++i) ef[i] = e[i].to_float();
    rs::combine(rs::backend::serial{}, host, rs::matrix_view<const float>{ef.data(), S, d},
                rs::matrix_view<float>{yf.data(), T, d});
    auto def = allocate<float>(be, S * d), dyf = allocate<float>(be, T * d);
    copy(be, def.data(), ef.data(), S * d);
    rs::combine(be, plan, rs::matrix_view<const float, rs::cuda_space>{def.data(), S, d},
                rs::matrix_view<float, rs::cuda_space>{dyf.data(), T, d});
    std::vector<float> got_yf(yf.size());
    copy_to_host(be, got_yf.data(), dyf.data(), T * d);
    fence(be);
    CHECK(std::memcmp(got_yf.data(), yf.data(), yf.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("cuda: grap_cosine routes fp32 and bf16 hidden states on the device as serial does") {
  const rs::backend::cuda be{};
  std::mt19937 rng(77);
  for (const rs::index E : {rs::index{8}, rs::index{64}}) {
    for (const rs::index d : {E * 3, E * 16, E * 40}) {
      const rs::index T = 333, k = 2;
      CAPTURE(E);
      CAPTURE(d);
      std::normal_distribution<float> g;
      std::vector<float> x(static_cast<std::size_t>(T * d));
      std::vector<rs::bfloat16> xb(x.size());
      for (std::size_t i = 0; i < x.size(); ++i) {
        xb[i] = rs::bfloat16::from_float(g(rng));
        x[i] = xb[i].to_float();  // the same values: the two routes must agree
      }
      const rs::router<rs::affinity::grap_cosine, rt::token_choice, rs::capacity::factor> r{
          {.num_experts = E}, {.top_k = k, .score = rs::score::sigmoid}, {.factor = 1.25}};
      const rs::routing_plan want = r.route(rs::backend::serial{}, rs::matrix_view<const float>{x.data(), T, d});
      auto dx = allocate<float>(be, T * d);
      auto dxb = allocate<rs::bfloat16>(be, T * d);
      copy(be, dx.data(), x.data(), T * d);
      copy(be, dxb.data(), xb.data(), T * d);
      CHECK(rs::to_host(be, r.route(be, rs::matrix_view<const float, rs::cuda_space>{dx.data(), T, d})) == want);
      CHECK(rs::to_host(be, r.route(be, rs::matrix_view<const rs::bfloat16, rs::cuda_space>{dxb.data(), T, d})) ==
            want);
    }
  }
}

TEST_CASE("cuda: Sinkhorn and expert choice route on the device as serial does") {
  const rs::backend::cuda be{};
  std::mt19937 rng(31);
  for (const rs::index T : {rs::index{1}, rs::index{300}, rs::index{700}}) {
    const rs::index E = 16;
    CAPTURE(T);
    const std::vector<float> logits = random_logits(T * E, rng);
    auto dl = allocate<float>(be, T * E);
    copy(be, dl.data(), logits.data(), T * E);
    const rs::matrix_view<const float> hv{logits.data(), T, E};
    const rs::matrix_view<const float, rs::cuda_space> dv{dl.data(), T, E};
    for (const rs::index k : {rs::index{1}, rs::index{2}}) {
      const rs::router<rs::affinity::precomputed, rt::sinkhorn, rs::capacity::factor> sk{
          {}, {.top_k = k, .max_iterations = 50}, {.factor = 1.0}};
      CHECK(rs::to_host(be, sk.route(be, dv)) == sk.route(rs::backend::serial{}, hv));
    }
    const rs::router<rs::affinity::precomputed, rt::expert_choice, rs::capacity::factor> ec{{}, {}, {.factor = 1.5}};
    CHECK(rs::to_host(be, ec.route(be, dv)) == ec.route(rs::backend::serial{}, hv));
  }
}

TEST_CASE("cuda: cosine with its embeddings in device memory routes fp32 and bf16 hidden states as serial does") {
  const rs::backend::cuda be{};
  std::mt19937 rng(13);
  std::normal_distribution<float> g;
  const rs::index T = 200, E = 16, d = 96, k = 2;
  std::vector<float> w(static_cast<std::size_t>(E * d)), x(static_cast<std::size_t>(T * d));
  std::vector<rs::bfloat16> xb(x.size());
  for (float& v : w) v = g(rng);
  for (std::size_t i = 0; i < x.size(); ++i) {
    xb[i] = rs::bfloat16::from_float(g(rng));
    x[i] = xb[i].to_float();
  }
  auto dw = allocate<float>(be, E * d);
  auto dx = allocate<float>(be, T * d);
  auto dxb = allocate<rs::bfloat16>(be, T * d);
  copy(be, dw.data(), w.data(), E * d);
  copy(be, dx.data(), x.data(), T * d);
  copy(be, dxb.data(), xb.data(), T * d);
  const rt::token_choice tc{.top_k = k};
  const rs::router<rs::affinity::cosine, rt::token_choice, rs::capacity::dropless> host{
      {.weight = {w.data(), E, d}, .temperature = 0.5f}, tc, {}};
  const rs::router<rs::affinity::basic_cosine<float, rs::cuda_space>, rt::token_choice, rs::capacity::dropless> device{
      {.weight = {dw.data(), E, d}, .temperature = 0.5f}, tc, {}};
  const rs::routing_plan want = host.route(rs::backend::serial{}, rs::matrix_view<const float>{x.data(), T, d});
  CHECK(rs::to_host(be, device.route(be, rs::matrix_view<const float, rs::cuda_space>{dx.data(), T, d})) == want);
  CHECK(rs::to_host(be, device.route(be, rs::matrix_view<const rs::bfloat16, rs::cuda_space>{dxb.data(), T, d})) ==
        want);
}
