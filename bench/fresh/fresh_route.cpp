// What a new user measures: a stand-alone program, a fresh process whose allocator nothing has warmed,
// the default backend (backend::cpu = tbb<>, else native), the same logits as bench_route's bm_route
// (standard normal from std::mt19937(7)), token choice top-k with softmax after top-k, capacity factor
// 1.25 with score drop. It routes `repeats` times with route() and then with route_into() (one workspace,
// one plan) and prints, as one JSON object, each mode's best and median milliseconds.
//
//   fresh_route T E k [repeats]
//
// bench/fresh/check.py compares these figures with bench_route's in a separate process: a benchmark
// that a warmed allocator flatters would disagree with this program.

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <resonance/backend/native.hpp>
#include <resonance/resonance.hpp>
#if defined(RESONANCE_HAS_TBB)
#include <resonance/backend/tbb.hpp>
#endif

namespace rs = resonance;

namespace {

#if defined(RESONANCE_HAS_TBB)
using default_backend = rs::backend::cpu;
constexpr const char* default_name = "tbb";
#else
using default_backend = rs::backend::native;
constexpr const char* default_name = "native";
#endif

long parse(const char* s, long lo, long hi, const char* what) {
  char* end = nullptr;
  const long v = std::strtol(s, &end, 10);
  if (end == s || *end != '\0' || v < lo || v > hi) {
    std::fprintf(stderr, "fresh_route: %s: expected an integer in [%ld, %ld], got '%s'\n", what, lo, hi, s);
    std::exit(2);
  }
  return v;
}

struct timing {
  double best_ms, median_ms;
};

template <class F>
timing time_runs(int repeats, F&& f) {
  std::vector<double> ms;
  for (int i = 0; i < repeats; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return {ms.front(), ms[ms.size() / 2]};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4 || argc > 5) {
    std::fprintf(stderr, "usage: fresh_route T E k [repeats]\n");
    return 2;
  }
  const rs::index T = parse(argv[1], 1, 1 << 22, "T"), E = parse(argv[2], 1, 4096, "E"), k = parse(argv[3], 1, 64, "k");
  const int repeats = argc == 5 ? static_cast<int>(parse(argv[4], 1, 100000, "repeats")) : 20;
  std::vector<float> logits(static_cast<std::size_t>(T * E));
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  for (float& v : logits) v = normal(rng);
  const rs::matrix_view<const float> x{logits.data(), T, E};
  const rs::router<rs::affinity::precomputed, rs::routing::token_choice, rs::capacity::factor> r{
      {}, {.top_k = k}, {.factor = 1.25}};
  const default_backend be{};
  rs::index kept = 0;  // read, so that no route is optimised away
  const timing route = time_runs(repeats, [&] { kept += r.route(be, x).num_assignments(); });
  rs::route_workspace<default_backend> ws;
  rs::routing_plan plan;
  const timing into = time_runs(repeats, [&] {
    r.route_into(be, x, ws, plan);
    kept += plan.num_assignments();
  });
  std::printf(
      "{\"backend\": \"%s\", \"isa\": \"%s\", \"T\": %ld, \"E\": %ld, \"k\": %ld, \"repeats\": %d, "
      "\"route_best_ms\": %.4f, \"route_median_ms\": %.4f, \"route_into_best_ms\": %.4f, "
      "\"route_into_median_ms\": %.4f, \"kept\": %ld}\n",
      default_name, rs::native_isa().c_str(), static_cast<long>(T), static_cast<long>(E), static_cast<long>(k), repeats,
      route.best_ms, route.median_ms, into.best_ms, into.median_ms, static_cast<long>(kept));
  return 0;
}
