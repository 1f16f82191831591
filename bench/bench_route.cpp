// Benchmarks of routing (score + select + capacity + plan), the affinities, dispatch and combine, on
// every backend this build has (serial and native always; simd, tbb, tbb_serial and tbb_simd when their
// components are found),
// plus two in-process memory references. Families (registered from main, so that the backend list is
// decided at compile time):
//
//   bm_route/<backend>/T:<T>/E:<E>/k:<k>        precomputed logits, token choice top-k (softmax after
//                                               top-k), capacity factor 1.25 with score drop
//   bm_affinity/<affinity>/<backend>/T:4096/d:<d>   forward() of grap, grap_cosine, cosine, linear (Eigen);
//                                               E = 64, d in {1024, 4096}
//   bm_route_hidden/<affinity>/<mode>/<backend>/T:<T>/d:<d>   routing from hidden states, grap_cosine or
//                                               linear, E = 64, token choice top-2, capacity factor 1.25;
//                                               mode fused = the router on the hidden states (logits
//                                               computed and selected block by block), unfused =
//                                               forward() into a T×E buffer, then the precomputed router
//                                               on it; serial and tbb_simd only
//   bm_dispatch/<backend>/T:<T>                 d = 1024, plan: top-2 of 64 experts, dropless
//   bm_combine/<backend>/T:<T>                  same plan
//   bm_dispatch_combine/<backend>/T:<T>         both, back to back
//   bm_dispatch_backward/<backend>/T:<T>        dispatch's gradient (dx from dbuffer), same plan
//   bm_combine_backward/<backend>/T:<T>         combine's gradient (d_expert_out and dweight), same plan
//   bm_memory_read, bm_memcpy                   bandwidth references (one thread)
//   bm_peer/<name>/<backend>                    with --peer_inputs=DIR only (see load_peer_cases)
//
// Threaded variants (tbb, tbb_simd) use wall-clock time (UseRealTime), which Google Benchmark shows as a
// "/real_time" suffix on the name; bm_peer names carry no suffix (see bm_peer).
// Counters: items = tokens; bytes = logits read (route, peer), input read (affinity, route_hidden), rows read +
// written (dispatch, combine and their backward), buffer bytes read (memory_read), read + written (memcpy).
//
// Extra flags, removed before Google Benchmark sees the command line:
//   --peer_inputs=DIR   register bm_peer cases from DIR/cases.txt; a bad manifest exits with status 2
//   --memory_mib=N      buffer size of bm_memory_read and bm_memcpy (default 256)
// JSON output as usual: --benchmark_format=json or --benchmark_out=FILE --benchmark_out_format=json.
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <system_error>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <benchmark/benchmark.h>

#include <resonance/backend/native.hpp>
#include <resonance/resonance.hpp>

#if defined(RESONANCE_HAS_SIMD)
#include <resonance/backend/simd.hpp>
#endif
#if defined(RESONANCE_HAS_TBB)
#include <oneapi/tbb/task_arena.h>

#include <resonance/backend/tbb.hpp>
#endif
#if defined(RESONANCE_HAS_EIGEN)
#include <resonance/affinity/linear.hpp>
#endif

#include "npy.hpp"

namespace rs = resonance;
namespace npy = resonance::tools::npy;

namespace {

// ---------------------------------------------------------------------------------------------------
// Backends

// Calls f(backend, name, threaded) for every backend compiled in, in a fixed order. "tbb" is tbb<>, the
// default (backend::cpu: threads over native's rows, dispatched at run time); "tbb_serial" is threads
// over the scalar reference rows; "simd" and "tbb_simd" use this build's compile-time architecture.
template <class F>
void for_each_backend(F&& f) {
  f(rs::backend::serial{}, "serial", false);
#if defined(RESONANCE_HAS_SIMD)
  f(rs::backend::simd<>{}, "simd", false);
#endif
  f(rs::backend::native{}, "native", false);
#if defined(RESONANCE_HAS_TBB)
  f(rs::backend::tbb<>{}, "tbb", true);
  f(rs::backend::tbb<rs::backend::serial>{}, "tbb_serial", true);
#if defined(RESONANCE_HAS_SIMD)
  f(rs::backend::tbb<rs::backend::simd<>>{}, "tbb_simd", true);
#endif
#endif
}

std::string backend_names() {
  std::string s;
  for_each_backend([&](const auto&, const char* name, bool) { s += (s.empty() ? "" : ",") + std::string(name); });
  return s;
}

// Registers `fn` under `name` in microseconds; threaded backends are timed by the wall clock.
template <class Fn>
benchmark::internal::Benchmark* add(const std::string& name, bool threaded, Fn&& fn) {
  benchmark::internal::Benchmark* b = benchmark::RegisterBenchmark(name.c_str(), std::forward<Fn>(fn));
  b->Unit(benchmark::kMicrosecond);
  if (threaded) b->UseRealTime();
  return b;
}

// ---------------------------------------------------------------------------------------------------
// Inputs

constexpr std::uint32_t seed_logits = 7;
constexpr std::uint32_t seed_hidden = 11;
constexpr std::uint32_t seed_weight = 13;
constexpr std::uint32_t seed_expert_out = 17;

constexpr std::int64_t float_bytes = static_cast<std::int64_t>(sizeof(float));

std::size_t count(rs::index rows, rs::index cols) { return static_cast<std::size_t>(rows * cols); }

// A rows×cols matrix of standard normal entries from std::mt19937(seed), generated on first use and
// kept for the whole run (every backend of a shape reads the same one; std::map keeps references valid).
const std::vector<float>& normal_matrix(rs::index rows, rs::index cols, std::uint32_t seed) {
  static std::map<std::tuple<rs::index, rs::index, std::uint32_t>, std::vector<float>> cache;
  auto [it, inserted] = cache.try_emplace({rows, cols, seed});
  if (inserted) {
    std::vector<float>& v = it->second;
    v.resize(count(rows, cols));
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal;
    for (float& x : v) x = normal(rng);
  }
  return it->second;
}

rs::matrix_view<const float> normal_view(rs::index rows, rs::index cols, std::uint32_t seed) {
  return {normal_matrix(rows, cols, seed).data(), rows, cols};
}

using route_router = rs::router<rs::affinity::precomputed, rs::routing::token_choice, rs::capacity::factor>;

// Token choice top-k with softmax after top-k, capacity factor `cf` with score drop (Megatron's defaults).
route_router make_router(rs::index k, double cf) { return route_router{{}, {.top_k = k}, {.factor = cf}}; }

// The plan of dispatch and combine: top-2 of 64 experts, dropless, from standard normal logits.
constexpr rs::index dc_experts = 64, dc_top_k = 2, dc_width = 1024;

const rs::routing_plan& dropless_plan(rs::index T) {
  static std::map<rs::index, rs::routing_plan> cache;
  auto it = cache.find(T);
  if (it == cache.end()) {
    const rs::router<rs::affinity::precomputed, rs::routing::token_choice, rs::capacity::dropless> r{
        {}, {.top_k = dc_top_k}, {}};
    it = cache.emplace(T, r.route(rs::backend::serial{}, normal_view(T, dc_experts, seed_logits))).first;
  }
  return it->second;
}

// ---------------------------------------------------------------------------------------------------
// Families

// The timed loop of bm_route and bm_peer: one routing step per iteration. Returns false (after
// SkipWithError) when routing throws.
template <class Backend>
bool route_loop(benchmark::State& state, const Backend& be, const route_router& r, rs::matrix_view<const float> x) {
  try {
    for (auto _ : state) {
      rs::routing_plan plan = r.route(be, x);
      benchmark::DoNotOptimize(plan.slot_token().data());
    }
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return false;
  }
  return true;
}

template <class Backend>
void bm_route(benchmark::State& state, Backend be, rs::index T, rs::index E, rs::index k) {
  if (!route_loop(state, be, make_router(k, 1.25), normal_view(T, E, seed_logits))) return;
  state.SetItemsProcessed(state.iterations() * T);
  state.SetBytesProcessed(state.iterations() * T * E * float_bytes);  // the logits, read once
}

// forward(be, x, logits) of one affinity; make() builds it (weights are generated on first use).
template <class Backend, class Make>
void bm_affinity(benchmark::State& state, Backend be, Make make, rs::index T, rs::index d) {
  const auto a = make(d);
  const rs::index E = a.experts_for(d);
  const rs::matrix_view<const float> x = normal_view(T, d, seed_hidden);
  std::vector<float> logits(count(T, E));
  try {
    for (auto _ : state) {
      a.forward(be, x, rs::matrix_view<float>{logits.data(), T, E});
      benchmark::ClobberMemory();
    }
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  state.SetItemsProcessed(state.iterations() * T);
  state.SetBytesProcessed(state.iterations() * T * d * float_bytes);  // the input, read once
}

// One routing step from hidden states per iteration: fused (the router with the affinity, which never
// forms the T×E logits) or unfused (forward() into a T×E buffer allocated once, then route_router).
template <class Backend, class Make>
void bm_route_hidden(benchmark::State& state, Backend be, Make make, bool fused, rs::index T, rs::index d) {
  const auto a = make(d);
  const rs::index E = a.experts_for(d);
  const rs::matrix_view<const float> x = normal_view(T, d, seed_hidden);
  const route_router unfused = make_router(2, 1.25);
  const rs::router<std::remove_cvref_t<decltype(a)>, rs::routing::token_choice, rs::capacity::factor> router{
      a, unfused.direction, unfused.capacity};
  std::vector<float> logits(fused ? 0 : count(T, E));
  try {
    for (auto _ : state) {
      if (fused) {
        rs::routing_plan plan = router.route(be, x);
        benchmark::DoNotOptimize(plan.slot_token().data());
      } else {
        a.forward(be, x, rs::matrix_view<float>{logits.data(), T, E});
        rs::routing_plan plan = unfused.route(be, rs::matrix_view<const float>{logits.data(), T, E});
        benchmark::DoNotOptimize(plan.slot_token().data());
      }
    }
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  state.SetItemsProcessed(state.iterations() * T);
  state.SetBytesProcessed(state.iterations() * T * d * float_bytes);  // the input, read once
}

// Dispatch reads one token row per kept assignment and writes every slot row (padding included);
// combine reads one expert-output row per kept assignment and writes every token row.
std::int64_t dispatch_bytes(const rs::routing_plan& p, rs::index d) {
  return (p.num_assignments() + p.num_slots()) * d * float_bytes;
}
std::int64_t combine_bytes(const rs::routing_plan& p, rs::index d) {
  return (p.num_assignments() + p.num_tokens()) * d * float_bytes;
}

enum class dc_stage { dispatch, combine, both };

template <class Backend>
void bm_dispatch_combine(benchmark::State& state, Backend be, dc_stage stage, rs::index T) {
  const rs::index d = dc_width;
  const rs::routing_plan& plan = dropless_plan(T);
  const rs::plan_view pv = plan.view();
  const rs::index S = plan.num_slots();
  const rs::matrix_view<const float> x = normal_view(T, d, seed_hidden);
  const rs::matrix_view<const float> expert_out = normal_view(S, d, seed_expert_out);
  std::vector<float> buffer(stage == dc_stage::combine ? 0 : count(S, d));
  std::vector<float> y(stage == dc_stage::dispatch ? 0 : count(T, d));
  const rs::matrix_view<float> buf{buffer.data(), S, d}, out{y.data(), T, d};
  try {
    for (auto _ : state) {
      if (stage != dc_stage::combine) rs::dispatch(be, pv, x, buf);
      // The round trip combines what dispatch wrote; combine alone reads a fixed expert output.
      if (stage == dc_stage::both) rs::combine(be, pv, rs::matrix_view<const float>(buf), out);
      if (stage == dc_stage::combine) rs::combine(be, pv, expert_out, out);
      benchmark::ClobberMemory();
    }
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  const std::int64_t bytes = (stage != dc_stage::combine ? dispatch_bytes(plan, d) : 0) +
                             (stage != dc_stage::dispatch ? combine_bytes(plan, d) : 0);
  state.SetItemsProcessed(state.iterations() * T);
  state.SetBytesProcessed(state.iterations() * bytes);
}

// dispatch_backward reads one dbuffer row per kept assignment and writes every token row (combine's
// bytes). combine_backward reads one dy row per kept slot and writes every slot row (d_expert_out),
// then reads a dy and an expert-output row per kept assignment and writes its dweight.
std::int64_t combine_backward_bytes(const rs::routing_plan& p, rs::index d) {
  return (3 * p.num_assignments() + p.num_slots()) * d * float_bytes + p.num_assignments() * float_bytes;
}

template <class Backend>
void bm_backward(benchmark::State& state, Backend be, bool of_combine, rs::index T) {
  const rs::index d = dc_width;
  const rs::routing_plan& plan = dropless_plan(T);
  const rs::plan_view pv = plan.view();
  const rs::index S = plan.num_slots(), A = plan.num_assignments();
  const rs::matrix_view<const float> dbuffer = normal_view(S, d, seed_hidden);
  const rs::matrix_view<const float> expert_out = normal_view(S, d, seed_expert_out);
  const rs::matrix_view<const float> dy = normal_view(T, d, seed_hidden);
  std::vector<float> dx(of_combine ? 0 : count(T, d)), d_expert_out(of_combine ? count(S, d) : 0);
  std::vector<float> dweight(of_combine ? static_cast<std::size_t>(A) : 0);
  try {
    for (auto _ : state) {
      if (of_combine) {
        rs::combine_backward(be, pv, expert_out, dy, rs::matrix_view<float>{d_expert_out.data(), S, d},
                             rs::vector_view<float>{dweight.data(), A});
      } else {
        rs::dispatch_backward(be, pv, dbuffer, rs::matrix_view<float>{dx.data(), T, d});
      }
      benchmark::ClobberMemory();
    }
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  state.SetItemsProcessed(state.iterations() * T);
  state.SetBytesProcessed(state.iterations() * (of_combine ? combine_backward_bytes(plan, d) : combine_bytes(plan, d)));
}

// Sixteen independent accumulators: no reassociation is needed to vectorise the loop, so it runs at
// the vector units' speed (or the memory's) without -ffast-math. Not inlined: inlined into the
// benchmark's loop, GCC 12 compiled it to a loop that read 6.3 GB/s where this function reads 12 (as
// does a hand-written AVX2 loop with four accumulators), a floor twice too low.
[[gnu::noinline]] float sum_floats(const float* p, std::size_t n) {
  constexpr std::size_t lanes = 16;
  float acc[lanes] = {};
  std::size_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    // Unrolled, the 16 accumulators stay in vector registers (else GCC keeps them on the stack).
#pragma GCC unroll 16
    for (std::size_t j = 0; j < lanes; ++j) acc[j] += p[i + j];
  }
  for (; i < n; ++i) acc[i % lanes] += p[i];
  float s = 0.0f;
  for (float a : acc) s += a;
  return s;
}

// One thread summing a buffer: bytes/s = bytes read.
void bm_memory_read(benchmark::State& state, std::size_t bytes) {
  std::vector<float> buf(bytes / sizeof(float), 1.0f);
  for (auto _ : state) {
    float s = sum_floats(buf.data(), buf.size());
    benchmark::DoNotOptimize(s);
  }
  state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(buf.size() * sizeof(float)));
}

// One std::memcpy of the whole buffer per iteration: bytes/s = bytes read + bytes written (2 × size).
void bm_memcpy(benchmark::State& state, std::size_t bytes) {
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), bytes);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * 2 * static_cast<std::int64_t>(bytes));
}

// ---------------------------------------------------------------------------------------------------
// Peer mode

struct peer_case {
  std::string name;
  rs::index T = 0, E = 0, k = 0;
  double cf = 0.0;
  std::vector<float> logits;  // T×E
};

[[noreturn]] void peer_fail(const std::string& message) {
  std::fprintf(stderr, "bench_route: --peer_inputs: %s\n", message.c_str());
  std::exit(2);
}

std::vector<std::string_view> split_fields(std::string_view line) {
  std::vector<std::string_view> out;
  std::size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && (line[i] == ' ' || line[i] == '\t')) ++i;
    const std::size_t begin = i;
    while (i < line.size() && line[i] != ' ' && line[i] != '\t') ++i;
    if (i > begin) out.push_back(line.substr(begin, i - begin));
  }
  return out;
}

// The whole field as a number, or false.
template <class N>
bool parse_number(std::string_view s, N& value) {
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  return ec == std::errc{} && end == s.data() + s.size();
}

// DIR/cases.txt: one case per line, "name T E k cf file.npy" separated by blanks, the file relative to
// DIR (or absolute) holding float32 logits of shape (T, E); blank lines and lines starting with '#' are
// skipped. Every case is routed once on the serial backend here, so that a case the router rejects is
// reported before any benchmark runs. Any problem: a message naming the line on stderr, exit status 2.
std::vector<peer_case> load_peer_cases(const std::string& dir) {
  const std::string manifest = dir + "/cases.txt";
  std::ifstream in(manifest);
  if (!in) peer_fail("cannot open the manifest '" + manifest + "' (expected lines 'name T E k cf file.npy')");
  std::vector<peer_case> cases;
  std::set<std::string> names;
  std::string line;
  for (int lineno = 1; std::getline(in, line); ++lineno) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    const std::vector<std::string_view> f = split_fields(line);
    if (f.empty() || f[0].front() == '#') continue;
    const std::string where = manifest + ":" + std::to_string(lineno) + ": ";
    if (f.size() != 6) {
      peer_fail(where + "expected 6 fields 'name T E k cf file.npy', got " + std::to_string(f.size()) + ": '" + line +
                "'");
    }
    peer_case c;
    c.name = std::string(f[0]);
    if (c.name.find('/') != std::string::npos) peer_fail(where + "the case name '" + c.name + "' contains '/'");
    if (!names.insert(c.name).second) peer_fail(where + "duplicate case name '" + c.name + "'");
    if (!parse_number(f[1], c.T) || c.T < 1)
      peer_fail(where + "T must be an integer >= 1, got '" + std::string(f[1]) + "'");
    if (!parse_number(f[2], c.E) || c.E < 1)
      peer_fail(where + "E must be an integer >= 1, got '" + std::string(f[2]) + "'");
    if (!parse_number(f[3], c.k) || c.k < 1 || c.k > c.E)
      peer_fail(where + "k must be an integer in [1, E = " + std::to_string(c.E) + "], got '" + std::string(f[3]) +
                "'");
    if (!parse_number(f[4], c.cf) || !std::isfinite(c.cf) || c.cf <= 0.0)
      peer_fail(where + "cf must be a finite number > 0, got '" + std::string(f[4]) + "'");
    const std::string file = f[5].front() == '/' ? std::string(f[5]) : dir + "/" + std::string(f[5]);
    try {
      const npy::array a = npy::load(file);
      if (a.type != npy::dtype::float32)
        throw npy::error("expected float32 ('<f4'), got '" + std::string(npy::descr(a.type)) + "'");
      const std::vector<std::size_t> want{static_cast<std::size_t>(c.T), static_cast<std::size_t>(c.E)};
      if (a.shape != want)
        throw npy::error("expected shape " + npy::shape_string(want) + " (T, E), got " + npy::shape_string(a.shape));
      c.logits = a.values<float>();
    } catch (const npy::error& e) {
      peer_fail(where + "'" + file + "': " + e.what());
    }
    try {
      (void)make_router(c.k, c.cf).route(rs::backend::serial{},
                                         rs::matrix_view<const float>{c.logits.data(), c.T, c.E});
    } catch (const std::exception& e) {
      peer_fail(where + "case '" + c.name + "' cannot be routed: " + e.what());
    }
    cases.push_back(std::move(c));
  }
  if (in.bad()) peer_fail("error reading '" + manifest + "'");
  if (cases.empty()) peer_fail("the manifest '" + manifest + "' lists no cases");
  return cases;
}

// bm_peer is read by scripts that match its names exactly, so it does not use UseRealTime (which would
// append "/real_time"). Its rate counters are computed from the wall-clock time of the timed loop
// instead, on every backend, so that the threaded ones are not divided by the main thread's CPU time;
// the JSON's real_time field is wall-clock time as always.
template <class Backend>
void bm_peer(benchmark::State& state, Backend be, const peer_case* c) {
  const route_router r = make_router(c->k, c->cf);
  const auto start = std::chrono::steady_clock::now();
  if (!route_loop(state, be, r, rs::matrix_view<const float>{c->logits.data(), c->T, c->E})) return;
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const auto n = static_cast<double>(state.iterations());
  state.counters["items_per_second"] = benchmark::Counter(n * static_cast<double>(c->T) / seconds);
  state.counters["bytes_per_second"] = benchmark::Counter(n * static_cast<double>(c->T * c->E * float_bytes) / seconds,
                                                          benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
}

// ---------------------------------------------------------------------------------------------------
// Command line and registration

struct options {
  std::string peer_dir;
  bool peer = false;
  std::size_t memory_mib = 256;
};

[[noreturn]] void usage_fail(const std::string& message) {
  std::fprintf(stderr, "bench_route: %s\n", message.c_str());
  std::exit(2);
}

// Removes --peer_inputs=DIR and --memory_mib=N from argv (Google Benchmark rejects unknown flags).
options strip_options(int& argc, char** argv) {
  options opt;
  int out = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a.starts_with("--peer_inputs=")) {
      opt.peer_dir = std::string(a.substr(std::string_view("--peer_inputs=").size()));
      if (opt.peer_dir.empty()) usage_fail("--peer_inputs=DIR needs a directory");
      opt.peer = true;
    } else if (a == "--peer_inputs") {
      usage_fail("write --peer_inputs=DIR (with '=')");
    } else if (a.starts_with("--memory_mib=")) {
      const std::string_view v = a.substr(std::string_view("--memory_mib=").size());
      if (!parse_number(v, opt.memory_mib) || opt.memory_mib < 1 || opt.memory_mib > (std::size_t{1} << 20))
        usage_fail("--memory_mib=N needs an integer N in [1, 1048576], got '" + std::string(v) + "'");
    } else {
      argv[out++] = argv[i];
    }
  }
  argc = out;
  argv[argc] = nullptr;
  return opt;
}

void register_families(const options& opt) {
  for_each_backend([&](auto be, const char* backend, bool threaded) {
    using Backend = decltype(be);
    const std::string b(backend);
    for (rs::index T : {1, 128, 4096, 16384, 65536})
      for (rs::index E : {8, 64, 256})
        for (rs::index k : {1, 2, 8}) {
          add("bm_route/" + b + "/T:" + std::to_string(T) + "/E:" + std::to_string(E) + "/k:" + std::to_string(k),
              threaded, [=](benchmark::State& s) { bm_route<Backend>(s, be, T, E, k); });
        }

    constexpr rs::index affinity_T = 4096, affinity_E = 64;
    const auto add_affinity = [&](const char* name, auto make) {
      for (rs::index d : {1024, 4096}) {
        add("bm_affinity/" + std::string(name) + "/" + b + "/T:" + std::to_string(affinity_T) +
                "/d:" + std::to_string(d),
            threaded, [=](benchmark::State& s) { bm_affinity<Backend>(s, be, make, affinity_T, d); });
      }
    };
    add_affinity("grap", [](rs::index) { return rs::affinity::grap{.num_experts = affinity_E}; });
    add_affinity("grap_cosine", [](rs::index) { return rs::affinity::grap_cosine{.num_experts = affinity_E}; });
    add_affinity("cosine",
                 [](rs::index d) { return rs::affinity::cosine{.weight = normal_view(affinity_E, d, seed_weight)}; });
#if defined(RESONANCE_HAS_EIGEN)
    add_affinity("linear",
                 [](rs::index d) { return rs::affinity::linear{.weight = normal_view(affinity_E, d, seed_weight)}; });
#endif

    // T = 128 is the smoke size; 16384 the measured one.
    const auto add_route_hidden = [&](const char* name, auto make) {
      if (b != "serial" && b != "tbb_simd") return;
      for (rs::index T : {128, 16384})
        for (rs::index d : {1024, 4096})
          for (bool fused : {true, false}) {
            add("bm_route_hidden/" + std::string(name) + (fused ? "/fused/" : "/unfused/") + b +
                    "/T:" + std::to_string(T) + "/d:" + std::to_string(d),
                threaded, [=](benchmark::State& s) { bm_route_hidden<Backend>(s, be, make, fused, T, d); });
          }
    };
    add_route_hidden("grap_cosine", [](rs::index) { return rs::affinity::grap_cosine{.num_experts = affinity_E}; });
#if defined(RESONANCE_HAS_EIGEN)
    add_route_hidden(
        "linear", [](rs::index d) { return rs::affinity::linear{.weight = normal_view(affinity_E, d, seed_weight)}; });
#endif

    for (rs::index T : {128, 4096, 16384}) {
      const std::string suffix = "/" + b + "/T:" + std::to_string(T);
      add("bm_dispatch" + suffix, threaded,
          [=](benchmark::State& s) { bm_dispatch_combine<Backend>(s, be, dc_stage::dispatch, T); });
      add("bm_combine" + suffix, threaded,
          [=](benchmark::State& s) { bm_dispatch_combine<Backend>(s, be, dc_stage::combine, T); });
      add("bm_dispatch_combine" + suffix, threaded,
          [=](benchmark::State& s) { bm_dispatch_combine<Backend>(s, be, dc_stage::both, T); });
      add("bm_dispatch_backward" + suffix, threaded,
          [=](benchmark::State& s) { bm_backward<Backend>(s, be, false, T); });
      add("bm_combine_backward" + suffix, threaded, [=](benchmark::State& s) { bm_backward<Backend>(s, be, true, T); });
    }
  });

  const std::size_t bytes = opt.memory_mib << 20;
  add("bm_memory_read", false, [=](benchmark::State& s) { bm_memory_read(s, bytes); })->Unit(benchmark::kMillisecond);
  add("bm_memcpy", false, [=](benchmark::State& s) { bm_memcpy(s, bytes); })->Unit(benchmark::kMillisecond);
}

void register_peers(const std::vector<peer_case>& cases) {
  for (const peer_case& c : cases) {
    for_each_backend([&](auto be, const char* backend, bool) {
      using Backend = decltype(be);
      const peer_case* p = &c;
      add("bm_peer/" + c.name + "/" + backend, false, [=](benchmark::State& s) { bm_peer<Backend>(s, be, p); });
    });
  }
}

}  // namespace

int main(int argc, char** argv) {
#if defined(__AVX2__) && (defined(__GNUC__) || defined(__clang__))
  // bench_route_avx2 is this file built with -mavx2: on a CPU without AVX2 it reports a skip (77).
  if (!__builtin_cpu_supports("avx2")) {
    std::fprintf(stderr, "bench_route: this build needs AVX2, which this CPU lacks\n");
    return 77;
  }
#endif
  const options opt = strip_options(argc, argv);
  // Loaded before anything runs, and alive until the benchmarks have run (bm_peer points into it).
  const std::vector<peer_case> peers = opt.peer ? load_peer_cases(opt.peer_dir) : std::vector<peer_case>{};

  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

  register_families(opt);
  register_peers(peers);

  benchmark::AddCustomContext("resonance_version", std::to_string(RESONANCE_VERSION_MAJOR) + "." +
                                                       std::to_string(RESONANCE_VERSION_MINOR) + "." +
                                                       std::to_string(RESONANCE_VERSION_PATCH));
  benchmark::AddCustomContext("resonance_backends", backend_names());
  benchmark::AddCustomContext("resonance_native_isa", rs::native_isa());
#if defined(RESONANCE_HAS_SIMD)
  benchmark::AddCustomContext("resonance_simd_arch", xsimd::default_arch::name());
#endif
#if defined(RESONANCE_HAS_TBB)
  benchmark::AddCustomContext("resonance_tbb_threads", std::to_string(oneapi::tbb::this_task_arena::max_concurrency()));
#endif
  benchmark::AddCustomContext("memory_mib", std::to_string(opt.memory_mib));
  if (opt.peer) benchmark::AddCustomContext("peer_inputs", opt.peer_dir);

  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
