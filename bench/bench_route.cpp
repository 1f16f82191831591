// Route (score + select + capacity + plan) and dispatch/combine on the serial backend.
// Counters: items = tokens, bytes = logits read (route) or rows moved (dispatch, combine).
#include <random>
#include <vector>

#include <benchmark/benchmark.h>

#include <resonance/resonance.hpp>

namespace rs = resonance;

namespace {

std::vector<float> random_logits(rs::index tokens, rs::index experts) {
  std::vector<float> v(static_cast<std::size_t>(tokens * experts));
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  for (float& x : v) x = normal(rng);
  return v;
}

void bm_route(benchmark::State& state) {
  const rs::index T = state.range(0), E = state.range(1), k = state.range(2);
  const auto logits = random_logits(T, E);
  const rs::router<rs::affinity::precomputed, rs::routing::token_choice, rs::capacity::factor> r{
      {}, {.top_k = k}, {.factor = 1.25}};
  for (auto _ : state) {
    rs::routing_plan plan = r.route(rs::backend::serial{}, rs::matrix_view<const float>{logits.data(), T, E});
    benchmark::DoNotOptimize(plan.slot_token().data());
  }
  state.SetItemsProcessed(state.iterations() * T);
  state.SetBytesProcessed(state.iterations() * T * E * static_cast<std::int64_t>(sizeof(float)));
}
BENCHMARK(bm_route)
    ->ArgsProduct({{1, 128, 4096, 16384}, {8, 64, 256}, {1, 2, 8}})
    ->ArgNames({"T", "E", "k"})
    ->Unit(benchmark::kMicrosecond);

void bm_dispatch_combine(benchmark::State& state) {
  const rs::index T = state.range(0), E = 64, k = 2, d = 1024;
  const auto logits = random_logits(T, E);
  const rs::router<rs::affinity::precomputed, rs::routing::token_choice, rs::capacity::dropless> r{
      {}, {.top_k = k}, {}};
  const rs::routing_plan plan = r.route(rs::matrix_view<const float>{logits.data(), T, E});
  std::vector<float> x(static_cast<std::size_t>(T * d), 1.0f), buf(static_cast<std::size_t>(plan.num_slots() * d)),
      y(static_cast<std::size_t>(T * d));
  for (auto _ : state) {
    rs::dispatch(rs::backend::serial{}, plan, rs::matrix_view<const float>{x.data(), T, d},
                 rs::matrix_view<float>{buf.data(), plan.num_slots(), d});
    rs::combine(rs::backend::serial{}, plan, rs::matrix_view<const float>{buf.data(), plan.num_slots(), d},
                rs::matrix_view<float>{y.data(), T, d});
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * T);
  // dispatch reads T*k rows and writes S rows; combine reads S rows and writes T rows.
  state.SetBytesProcessed(state.iterations() * (2 * plan.num_slots() + T * (k + 1)) * d *
                          static_cast<std::int64_t>(sizeof(float)));
}
BENCHMARK(bm_dispatch_combine)->Arg(128)->Arg(4096)->ArgNames({"T"})->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
