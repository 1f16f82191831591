// bench_gpu: the GPU benchmark of backend::cuda (issue 13, item 6). A standalone CUDA program (no Google
// Benchmark): every row is timed with CUDA events, warm-up runs first, then the median and the minimum of
// the timed runs. Rows:
//
//   route        router::route() on precomputed fp32 logits (token choice, softmax top-k, dropless): end to
//                end as a caller sees it, host-synchronous (its allocations, its launches, its one copy back)
//   route_graph  router::route_into captured once in a CUDA graph, the graph's replay timed: device time
//   select       the selection alone (routing::select_unchecked into preallocated candidates): device time
//   plan_build   detail::build_plan_unchecked from candidates in device memory: host-synchronous
//   plan_graph   detail::enqueue_build into a preallocated plan, captured in a CUDA graph: device time
//   read_floor   one read of the T×E fp32 logits (float4 loads, a sum-reduce): the HBM read floor
//   memcpy_d2d   cudaMemcpyAsync of the same bytes, device to device, for reference
//   dispatch     bf16 rows (d = 7168) gathered into the expert-major buffer: device time
//   combine      bf16 expert rows summed back per token in fp32: device time
//
// Device time: a spin kernel holds the stream while the host enqueues the start event, the work and the
// stop event, so the launch cost on the host is not counted. Host-synchronous rows synchronise before the
// start event, so everything the call does is. By default L2 is flushed (a memset of 4x its size) before
// every run, timed or not, so every run reads its inputs from HBM (--no-flush keeps L2 warm).
//
// Every plan is checked once against backend::serial's on the same logits before its shape is timed, and
// dispatch / combine against serial's (T <= 4096): a mismatch prints MISMATCH and exits with 1, so a
// wrong kernel posts no figure. Without a CUDA device the program says so and exits with 77 (a CTest
// skip). --json PATH writes the rows with the device's name and the CUDA runtime's version.

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#include <resonance/backend/cuda.cuh>
#include <resonance/resonance.hpp>

namespace {

namespace rs = resonance;
using rs::index;
using router_type = rs::router<rs::affinity::precomputed, rs::routing::token_choice, rs::capacity::dropless>;

constexpr index na = -1;  // a column that does not apply to a row (k of a floor row; d of a route row)

void check(cudaError_t status, const char* call) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(call) + ": " + cudaGetErrorString(status));
}

// A plan or an output that differs from backend::serial's.
struct mismatch : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ---------------------------------------------------------------------------------------------------------
// Options

struct options {
  bool quick = false;
  bool flush = true;
  int reps = 0;  // timed runs per row; 0: the mode's default
  std::string json;
};

constexpr int default_reps = 100, quick_reps = 10;
constexpr int default_warmup = 10, quick_warmup = 3;

int timed_runs(const options& o) {
  if (o.reps > 0) return o.reps;
  return o.quick ? quick_reps : default_reps;
}

void usage(std::FILE* out) {
  std::fprintf(out,
               "usage: bench_gpu [--quick] [--reps N] [--json PATH] [--no-flush]\n"
               "  --quick      fewer shapes and runs (a smoke test)\n"
               "  --reps N     timed runs per row (default %d, --quick %d); the median and the minimum are reported\n"
               "  --json PATH  also write the rows, the device and the CUDA runtime version as JSON\n"
               "  --no-flush   keep L2 warm between runs (default: flushed before each run)\n",
               default_reps, quick_reps);
}

// 0: run; otherwise the exit status (usage printed).
int parse(int argc, char** argv, options& o) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") {
      o.quick = true;
    } else if (a == "--no-flush") {
      o.flush = false;
    } else if (a == "--reps" && i + 1 < argc) {
      char* end = nullptr;
      const long n = std::strtol(argv[++i], &end, 10);
      if (end == argv[i] || *end != '\0' || n < 1 || n > 100000) {
        std::fprintf(stderr, "bench_gpu: --reps wants a count in [1, 100000], got '%s'\n", argv[i]);
        return 2;
      }
      o.reps = static_cast<int>(n);
    } else if (a == "--json" && i + 1 < argc) {
      o.json = argv[++i];
    } else if (a == "--help" || a == "-h") {
      usage(stdout);
      return -1;
    } else {
      std::fprintf(stderr, "bench_gpu: unknown or incomplete argument '%s'\n", a.c_str());
      usage(stderr);
      return 2;
    }
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------------------
// Kernels of the benchmark itself

// splitmix64's finaliser of a counter: reproducible random bits, whatever the launch shape.
__device__ std::uint64_t mix(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Standard normal logits (Box-Muller on 48 random bits): distinct values, so ties are unlikely.
__global__ void normal_logits_kernel(float* out, index n, std::uint64_t seed) {
  const index stride = static_cast<index>(gridDim.x) * blockDim.x;
  for (index i = static_cast<index>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const std::uint64_t h = mix(seed + 0x9E3779B97F4A7C15ull * static_cast<std::uint64_t>(i + 1));
    const float u1 = static_cast<float>((h >> 40) + 1) * 0x1p-24f;          // (0, 1]
    const float u2 = static_cast<float>((h >> 16) & 0xFFFFFFu) * 0x1p-24f;  // [0, 1)
    out[i] = sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
  }
}

// bf16 values uniform in [-1, 1).
__global__ void uniform_bf16_kernel(rs::bfloat16* out, index n, std::uint64_t seed) {
  const index stride = static_cast<index>(gridDim.x) * blockDim.x;
  for (index i = static_cast<index>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const std::uint64_t h = mix(seed + 0x9E3779B97F4A7C15ull * static_cast<std::uint64_t>(i + 1));
    out[i] = rs::bfloat16::from_float(static_cast<float>(h >> 40) * 0x1p-23f - 1.0f);
  }
}

__device__ std::uint64_t global_ns() {
  std::uint64_t t = 0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Holds the stream for `ns` nanoseconds, while the host enqueues what is timed behind it.
__global__ void spin_kernel(std::uint64_t ns) {
  const std::uint64_t start = global_ns();
  while (global_ns() - start < ns) {
  }
}

// The read floor: every float of `in` read once (float4 loads, four in flight per thread), summed, one
// partial per block written so that nothing is optimised away.
constexpr int floor_threads = 256;

__global__ void __launch_bounds__(floor_threads)
    read_floor_kernel(const float4* __restrict__ in, index n4, const float* __restrict__ tail, int ntail,
                      float* __restrict__ partial) {
  const index stride = static_cast<index>(gridDim.x) * floor_threads;
  index i = static_cast<index>(blockIdx.x) * floor_threads + threadIdx.x;
  float acc = 0.0f;
  for (; i + 3 * stride < n4; i += 4 * stride) {
    const float4 a = in[i], b = in[i + stride], c = in[i + 2 * stride], d = in[i + 3 * stride];
    acc += ((a.x + a.y) + (a.z + a.w)) + ((b.x + b.y) + (b.z + b.w)) + ((c.x + c.y) + (c.z + c.w)) +
           ((d.x + d.y) + (d.z + d.w));
  }
  for (; i < n4; i += stride) {
    const float4 a = in[i];
    acc += (a.x + a.y) + (a.z + a.w);
  }
  if (blockIdx.x == 0 && static_cast<int>(threadIdx.x) < ntail) acc += tail[threadIdx.x];
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_down_sync(0xFFFFFFFFu, acc, offset);
  __shared__ float warp_sums[floor_threads / 32];
  if ((threadIdx.x & 31u) == 0) warp_sums[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int w = 0; w < floor_threads / 32; ++w) s += warp_sums[w];
    partial[blockIdx.x] = s;
  }
}

unsigned fill_blocks(index n) { return static_cast<unsigned>(std::clamp<index>((n + 255) / 256, 1, 4096)); }

// ---------------------------------------------------------------------------------------------------------
// Timing

struct timing {
  double median_us = 0, min_us = 0;
};

timing summarise(std::vector<double> us) {
  std::sort(us.begin(), us.end());
  const std::size_t n = us.size();
  return {n % 2 == 1 ? us[n / 2] : 0.5 * (us[n / 2 - 1] + us[n / 2]), us.front()};
}

// The device's properties the benchmark reports and sizes its flush by.
struct device_info {
  std::string name;
  int major = 0, minor = 0, sms = 0;
  std::size_t l2_bytes = 0, memory_bytes = 0;
  int runtime = 0, driver = 0;
};

class timer {
 public:
  timer(cudaStream_t stream, const device_info& dev, bool flush, int warmup, int reps)
      : stream_(stream), warmup_(warmup), reps_(reps) {
    check(cudaEventCreate(&start_), "cudaEventCreate");
    check(cudaEventCreate(&stop_), "cudaEventCreate");
    if (flush) {
      flush_bytes_ = std::max<std::size_t>(4 * dev.l2_bytes, std::size_t{32} << 20);
      check(cudaMalloc(&flush_, flush_bytes_), "cudaMalloc (L2 flush)");
    }
  }
  timer(const timer&) = delete;
  timer& operator=(const timer&) = delete;
  ~timer() {
    if (flush_ != nullptr) (void)cudaFree(flush_);
    (void)cudaEventDestroy(start_);
    (void)cudaEventDestroy(stop_);
  }

  // Device time of what `enqueue` puts on the stream (it must not wait for the device); `after` runs
  // once the run is complete (a route's finish()), outside the timed interval.
  template <class Enqueue, class After>
  timing device(const Enqueue& enqueue, const After& after) {
    std::vector<double> us;
    for (int r = 0; r < warmup_ + reps_; ++r) {
      flush();
      spin_kernel<<<1, 1, 0, stream_>>>(spin_ns);
      check(cudaGetLastError(), "spin_kernel");
      check(cudaEventRecord(start_, stream_), "cudaEventRecord");
      enqueue();
      check(cudaEventRecord(stop_, stream_), "cudaEventRecord");
      check(cudaEventSynchronize(stop_), "cudaEventSynchronize");
      after();
      if (r >= warmup_) us.push_back(elapsed_us());
    }
    return summarise(std::move(us));
  }
  template <class Enqueue>
  timing device(const Enqueue& enqueue) {
    return device(enqueue, [] {});
  }

  // Time of a call that waits for its own results (a route, a plan build), from an idle stream: host
  // work and launch costs included.
  template <class Call>
  timing host(const Call& call) {
    std::vector<double> us;
    for (int r = 0; r < warmup_ + reps_; ++r) {
      flush();
      check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
      check(cudaEventRecord(start_, stream_), "cudaEventRecord");
      call();
      check(cudaEventRecord(stop_, stream_), "cudaEventRecord");
      check(cudaEventSynchronize(stop_), "cudaEventSynchronize");
      if (r >= warmup_) us.push_back(elapsed_us());
    }
    return summarise(std::move(us));
  }

 private:
  // Long enough for the host to enqueue a graph launch or a few kernels behind it.
  static constexpr std::uint64_t spin_ns = 50'000;

  void flush() {
    if (flush_ == nullptr) return;
    check(cudaMemsetAsync(flush_, ++flush_value_ & 0xFF, flush_bytes_, stream_), "cudaMemsetAsync (L2 flush)");
  }
  double elapsed_us() const {
    float ms = 0.0f;
    check(cudaEventElapsedTime(&ms, start_, stop_), "cudaEventElapsedTime");
    return 1000.0 * static_cast<double>(ms);
  }

  cudaStream_t stream_;
  int warmup_, reps_;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
  void* flush_ = nullptr;
  std::size_t flush_bytes_ = 0;
  int flush_value_ = 0;
};

// A captured CUDA graph and its executable.
class graph {
 public:
  template <class Enqueue>
  graph(cudaStream_t stream, const Enqueue& enqueue) {
    check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
    enqueue();
    check(cudaStreamEndCapture(stream, &graph_), "cudaStreamEndCapture");
    check(cudaGraphInstantiate(&exec_, graph_, 0), "cudaGraphInstantiate");
  }
  graph(const graph&) = delete;
  graph& operator=(const graph&) = delete;
  ~graph() {
    if (exec_ != nullptr) (void)cudaGraphExecDestroy(exec_);
    if (graph_ != nullptr) (void)cudaGraphDestroy(graph_);
  }
  void launch(cudaStream_t stream) const { check(cudaGraphLaunch(exec_, stream), "cudaGraphLaunch"); }

 private:
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
};

// ---------------------------------------------------------------------------------------------------------
// Rows

struct row {
  std::string name;
  index T = 0, E = 0, k = na, d = na;
  timing t;
  double bytes = 0;      // the bytes the GB/s column counts
  double floor_us = -1;  // the read floor of this shape's logits, when the row is compared with it
};

double items_per_s(const row& r) { return static_cast<double>(r.T) / (r.t.median_us * 1e-6); }
double gb_per_s(const row& r) { return r.bytes / (r.t.median_us * 1e-6) / 1e9; }

void print_header() {
  std::printf("%-22s %6s %4s %3s %11s %11s %12s %9s %8s\n", "row", "T", "E", "k", "median_us", "min_us", "tokens/s",
              "GB/s", "x_floor");
}

void print_row(const row& r) {
  std::string name = r.name;
  if (r.d != na) name += "/bf16/d=" + std::to_string(r.d);
  char k[16] = "-", ratio[32] = "-";
  if (r.k != na) std::snprintf(k, sizeof k, "%td", r.k);
  if (r.floor_us > 0) std::snprintf(ratio, sizeof ratio, "%.2f", r.t.median_us / r.floor_us);
  std::printf("%-22s %6td %4td %3s %11.2f %11.2f %12.4g %9.1f %8s\n", name.c_str(), r.T, r.E, k, r.t.median_us,
              r.t.min_us, items_per_s(r), gb_per_s(r), ratio);
  std::fflush(stdout);
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(static_cast<unsigned char>(c)));
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

std::string version_string(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

void write_json(const std::string& path, const device_info& dev, const options& o, int warmup, int reps,
                const std::vector<row>& rows) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) throw std::runtime_error("--json: cannot write '" + path + "'");
  std::fprintf(f, "{\n  \"benchmark\": \"bench_gpu\",\n");
  std::fprintf(f, "  \"resonance_version\": \"%d.%d.%d\",\n", RESONANCE_VERSION_MAJOR, RESONANCE_VERSION_MINOR,
               RESONANCE_VERSION_PATCH);
  std::fprintf(f, "  \"device\": %s,\n", json_string(dev.name).c_str());
  std::fprintf(f, "  \"compute_capability\": \"%d.%d\",\n  \"sms\": %d,\n", dev.major, dev.minor, dev.sms);
  std::fprintf(f, "  \"l2_bytes\": %zu,\n  \"memory_bytes\": %zu,\n", dev.l2_bytes, dev.memory_bytes);
  std::fprintf(f, "  \"cuda_runtime\": \"%s\",\n  \"cuda_driver\": \"%s\",\n", version_string(dev.runtime).c_str(),
               version_string(dev.driver).c_str());
  std::fprintf(f, "  \"quick\": %s,\n  \"warmup\": %d,\n  \"reps\": %d,\n  \"l2_flush\": %s,\n",
               o.quick ? "true" : "false", warmup, reps, o.flush ? "true" : "false");
  std::fprintf(f, "  \"checked_against_serial\": true,\n  \"rows\": [");
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const row& r = rows[i];
    const auto opt_index = [](index v) { return v == na ? std::string("null") : std::to_string(v); };
    std::fprintf(f, "%s\n    {\"name\": %s, \"T\": %td, \"E\": %td, \"k\": %s, \"d\": %s, ", i == 0 ? "" : ",",
                 json_string(r.name).c_str(), r.T, r.E, opt_index(r.k).c_str(), opt_index(r.d).c_str());
    std::fprintf(f, "\"median_us\": %.4f, \"min_us\": %.4f, \"items_per_s\": %.6g, \"gb_per_s\": %.6g, \"bytes\": %.0f",
                 r.t.median_us, r.t.min_us, items_per_s(r), gb_per_s(r), r.bytes);
    if (r.floor_us > 0) {
      std::fprintf(f, ", \"floor_us\": %.4f, \"ratio_to_floor\": %.4f}", r.floor_us, r.t.median_us / r.floor_us);
    } else {
      std::fprintf(f, ", \"floor_us\": null, \"ratio_to_floor\": null}");
    }
  }
  std::fprintf(f, "\n  ]\n}\n");
  if (std::fclose(f) != 0) throw std::runtime_error("--json: cannot write '" + path + "'");
}

// ---------------------------------------------------------------------------------------------------------
// The benchmark

class bench {
 public:
  bench(const options& o, const device_info& dev, cudaStream_t stream)
      : o_(o),
        dev_(dev),
        stream_(stream),
        be_{stream},
        warmup_(o.quick ? quick_warmup : default_warmup),
        reps_(timed_runs(o)),
        timer_(stream, dev, o.flush, warmup_, reps_) {}

  void run() {
    const std::vector<index> Ts =
        o_.quick ? std::vector<index>{1, 128, 4096} : std::vector<index>{1, 128, 4096, 8192, 16384, 65536};
    const std::vector<index> Es = {64, 256}, ks = {2, 8};
    const index T_max = Ts.back();
    std::printf(
        "bench_gpu: %s (sm_%d%d, %d SMs, L2 %zu MiB), CUDA runtime %s; %d warm-up + %d timed runs per row, "
        "L2 %s\n",
        dev_.name.c_str(), dev_.major, dev_.minor, dev_.sms, dev_.l2_bytes >> 20, version_string(dev_.runtime).c_str(),
        warmup_, reps_, o_.flush ? "flushed before each run" : "warm");
    print_header();
    for (const index E : Es) {
      // One set of logits per E (fixed seed); a shape routes its first T rows.
      auto logits = rs::backend::allocate<float>(be_, T_max * E);
      normal_logits_kernel<<<fill_blocks(T_max * E), 256, 0, stream_>>>(logits.data(), T_max * E,
                                                                        0x5EED0000ull + static_cast<std::uint64_t>(E));
      check(cudaGetLastError(), "normal_logits_kernel");
      std::vector<float> host(static_cast<std::size_t>(T_max * E));
      rs::backend::copy_to_host(be_, host.data(), logits.data(), T_max * E);
      rs::backend::fence(be_);

      for (const index T : Ts) floor_rows(logits.data(), T, E);
      for (const index k : ks)
        for (const index T : Ts) route_rows(logits.data(), host.data(), T, E, k, E == 256 && k == 8);
      if (E == 256) {
        const std::vector<index> dispatch_Ts =
            o_.quick ? std::vector<index>{128} : std::vector<index>{128, 4096, 16384};
        for (const index T : dispatch_Ts) dispatch_rows(logits.data(), T, E, 8, 7168);
      }
    }
    std::printf(
        "\nGB/s: route, route_graph, select, read_floor: T*E*4 bytes of logits / median; memcpy_d2d: read + write; "
        "plan_*: candidates read + plan written; dispatch, combine: rows read + rows written.\n"
        "x_floor: median / read_floor's median for the same T and E. Every plan equals backend::serial's.\n");
    if (!o_.json.empty()) {
      write_json(o_.json, dev_, o_, warmup_, reps_, rows_);
      std::printf("bench_gpu: wrote %s\n", o_.json.c_str());
    }
  }

 private:
  void add(row r) {
    print_row(r);
    rows_.push_back(std::move(r));
  }

  void floor_rows(const float* logits, index T, index E) {
    const index n = T * E, n4 = n / 4;
    const double bytes = static_cast<double>(n) * sizeof(float);
    const unsigned blocks =
        static_cast<unsigned>(std::clamp<index>((n4 + floor_threads - 1) / floor_threads, 1, 8 * index{dev_.sms}));
    auto partial = rs::backend::allocate<float>(be_, blocks);
    auto copy = rs::backend::allocate<float>(be_, n);
    const auto* in4 = reinterpret_cast<const float4*>(logits);  // cudaMallocAsync: 256-byte aligned
    const timing floor_t = timer_.device([&] {
      read_floor_kernel<<<blocks, floor_threads, 0, stream_>>>(in4, n4, logits + 4 * n4, static_cast<int>(n - 4 * n4),
                                                               partial.data());
      check(cudaGetLastError(), "read_floor_kernel");
    });
    floor_us_[{T, E}] = floor_t.median_us;
    add({"read_floor", T, E, na, na, floor_t, bytes, -1});
    const timing copy_t = timer_.device([&] {
      check(cudaMemcpyAsync(copy.data(), logits, static_cast<std::size_t>(bytes), cudaMemcpyDeviceToDevice, stream_),
            "cudaMemcpyAsync");
    });
    add({"memcpy_d2d", T, E, na, na, copy_t, 2 * bytes, -1});
  }

  void expect_same(const rs::routing_plan& got, const rs::routing_plan& want, const char* what, index T, index E,
                   index k) const {
    if (got == want) return;
    char msg[256];
    std::snprintf(msg, sizeof msg, "%s at T=%td E=%td k=%td: the plan differs from backend::serial's", what, T, E, k);
    throw mismatch(msg);
  }

  void route_rows(const float* logits, const float* host_logits, index T, index E, index k, bool plan_rows) {
    const router_type r{{}, {.top_k = k}, {}};
    const rs::matrix_view<const float, rs::cuda_space> l{logits, T, E};
    const rs::routing_plan want = r.route(rs::backend::serial{}, rs::matrix_view<const float>{host_logits, T, E});
    const double logit_bytes = static_cast<double>(T * E) * sizeof(float);
    const double floor_us = floor_us_.at({T, E});

    // route(): checked, then timed.
    rs::basic_routing_plan<rs::cuda_space> plan = r.route(be_, l);
    expect_same(rs::to_host(be_, plan), want, "route", T, E, k);
    add({"route", T, E, k, na, timer_.host([&] { plan = r.route(be_, l); }), logit_bytes, floor_us});
    expect_same(rs::to_host(be_, plan), want, "route (after timing)", T, E, k);

    // route_into captured in a graph, replayed.
    {
      rs::route_workspace<rs::backend::cuda> ws;
      rs::basic_routing_plan<rs::cuda_space> gplan;
      r.route_into(be_, l, ws, gplan);  // gives the workspace and the plan their room
      r.finish(be_, ws, gplan);
      const graph g(stream_, [&] { r.route_into(be_, l, ws, gplan); });
      g.launch(stream_);
      r.finish(be_, ws, gplan);
      expect_same(rs::to_host(be_, gplan), want, "route_graph", T, E, k);
      add({"route_graph", T, E, k, na, timer_.device([&] { g.launch(stream_); }, [&] { r.finish(be_, ws, gplan); }),
           logit_bytes, floor_us});
      expect_same(rs::to_host(be_, gplan), want, "route_graph (after timing)", T, E, k);
    }

    // The selection alone, into preallocated candidates; checked through the plan built from them.
    auto offsets = rs::backend::allocate<rs::id_type>(be_, T + 1);
    auto expert = rs::backend::allocate<rs::id_type>(be_, T * k);
    auto weight = rs::backend::allocate<float>(be_, T * k);
    rs::candidate_span<rs::cuda_space> cands;
    cands.offsets = offsets.data();
    cands.expert = expert.data();
    cands.weight = weight.data();
    const rs::capacity_limits lim = r.capacity.limits(T, E, k);
    const auto select = [&] { rs::routing::select_unchecked(be_, r.direction, l, lim, cands); };
    select();
    const rs::candidate_view<rs::cuda_space> view = rs::view_of(cands);
    rs::basic_routing_plan<rs::cuda_space> built = rs::detail::build_plan_unchecked(be_, view, lim);
    expect_same(rs::to_host(be_, built), want, "select + build_plan_unchecked", T, E, k);
    add({"select", T, E, k, na, timer_.device(select), logit_bytes, floor_us});
    built = rs::detail::build_plan_unchecked(be_, view, lim);
    expect_same(rs::to_host(be_, built), want, "select (after timing)", T, E, k);
    if (!plan_rows) return;

    // The plan builder alone, from those candidates: candidates read, the plan's arrays written.
    const double plan_bytes =
        static_cast<double>(T + 1 + 2 * T * k) * 4 + static_cast<double>(built.raw().layout().bytes);
    add({"plan_build", T, E, k, na, timer_.host([&] { built = rs::detail::build_plan_unchecked(be_, view, lim); }),
         plan_bytes, -1});
    expect_same(rs::to_host(be_, built), want, "plan_build", T, E, k);

    // The same build enqueued into the plan's storage, captured in a graph.
    auto work =
        rs::backend::allocate<unsigned char>(be_, rs::detail::build_workspace(be_, T * k, E, lim.capacity > 0).bytes);
    auto readback = rs::backend::allocate_host<index>(be_, 3);
    auto& d = built.raw();
    const auto sizes = [&] {
      d.num_slots = readback.data()[0];
      d.num_assignments = readback.data()[1];
    };
    const graph g(stream_, [&] {
      rs::detail::enqueue_build(be_, view, lim, d, static_cast<const index*>(nullptr), readback.data(), work.data());
    });
    g.launch(stream_);
    rs::backend::fence(be_);
    sizes();
    expect_same(rs::to_host(be_, built), want, "plan_graph", T, E, k);
    add({"plan_graph", T, E, k, na, timer_.device([&] { g.launch(stream_); }, sizes), plan_bytes, -1});
    expect_same(rs::to_host(be_, built), want, "plan_graph (after timing)", T, E, k);
  }

  void dispatch_rows(const float* logits, index T, index E, index k, index d) {
    const router_type r{{}, {.top_k = k}, {}};
    const rs::basic_routing_plan<rs::cuda_space> plan =
        r.route(be_, rs::matrix_view<const float, rs::cuda_space>{logits, T, E});
    const index S = plan.num_slots();
    using bf16 = rs::bfloat16;
    auto x = rs::backend::allocate<bf16>(be_, T * d);
    auto buffer = rs::backend::allocate<bf16>(be_, S * d);
    auto y = rs::backend::allocate<bf16>(be_, T * d);
    uniform_bf16_kernel<<<fill_blocks(T * d), 256, 0, stream_>>>(x.data(), T * d, 0xD15Full);
    uniform_bf16_kernel<<<fill_blocks(S * d), 256, 0, stream_>>>(buffer.data(), S * d, 0xC0B1ull);
    check(cudaGetLastError(), "uniform_bf16_kernel");
    const rs::matrix_view<const bf16, rs::cuda_space> xv{x.data(), T, d};
    const rs::matrix_view<bf16, rs::cuda_space> bv{buffer.data(), S, d};
    const rs::matrix_view<const bf16, rs::cuda_space> ev{buffer.data(), S, d};  // expert outputs: the buffer's rows
    const rs::matrix_view<bf16, rs::cuda_space> yv{y.data(), T, d};

    // Checked against serial where the host's share is small: combine first (it reads the buffer's random
    // rows as expert outputs), then dispatch (which overwrites them).
    const bool checked = T <= 4096;
    if (checked) {
      const rs::routing_plan host_plan = rs::to_host(be_, plan);
      std::vector<bf16> hx(static_cast<std::size_t>(T * d)), he(static_cast<std::size_t>(S * d));
      rs::backend::copy_to_host(be_, hx.data(), x.data(), T * d);
      rs::backend::copy_to_host(be_, he.data(), buffer.data(), S * d);
      rs::backend::fence(be_);
      std::vector<bf16> want_y(hx.size()), want_b(he.size()), got_y(hx.size()), got_b(he.size());
      rs::combine(rs::backend::serial{}, host_plan, rs::matrix_view<const bf16>{he.data(), S, d},
                  rs::matrix_view<bf16>{want_y.data(), T, d});
      rs::dispatch(rs::backend::serial{}, host_plan, rs::matrix_view<const bf16>{hx.data(), T, d},
                   rs::matrix_view<bf16>{want_b.data(), S, d});
      rs::combine(be_, plan, ev, yv);
      rs::backend::copy_to_host(be_, got_y.data(), y.data(), T * d);
      rs::backend::fence(be_);
      rs::dispatch(be_, plan, xv, bv);
      rs::backend::copy_to_host(be_, got_b.data(), buffer.data(), S * d);
      rs::backend::fence(be_);
      const auto same = [](const std::vector<bf16>& a, const std::vector<bf16>& b) {
        return std::memcmp(a.data(), b.data(), a.size() * sizeof(bf16)) == 0;
      };
      if (!same(got_y, want_y) || !same(got_b, want_b)) {
        char msg[256];
        std::snprintf(msg, sizeof msg, "dispatch/combine at T=%td E=%td k=%td d=%td: differ from backend::serial's", T,
                      E, k, d);
        throw mismatch(msg);
      }
    }
    const double row_bytes = static_cast<double>(d) * sizeof(bf16);
    add({"dispatch", T, E, k, d, timer_.device([&] { rs::dispatch(be_, plan, xv, bv); }),
         2.0 * static_cast<double>(S) * row_bytes, -1});
    add({"combine", T, E, k, d, timer_.device([&] { rs::combine(be_, plan, ev, yv); }),
         static_cast<double>(S + T) * row_bytes, -1});
  }

  const options& o_;
  const device_info& dev_;
  cudaStream_t stream_;
  rs::backend::cuda be_;
  int warmup_, reps_;
  timer timer_;
  std::map<std::pair<index, index>, double> floor_us_;
  std::vector<row> rows_;
};

}  // namespace

int main(int argc, char** argv) {
  options o;
  if (const int status = parse(argc, argv, o); status != 0) return status < 0 ? 0 : status;

  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  if (status != cudaSuccess || devices == 0) {
    std::printf("bench_gpu: no CUDA device (%s): nothing to measure\n",
                status != cudaSuccess ? cudaGetErrorString(status) : "none found");
    return 77;
  }

  cudaStream_t stream = nullptr;
  try {
    device_info dev;
    int device = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    cudaDeviceProp prop{};
    check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
    dev.name = prop.name;
    dev.major = prop.major;
    dev.minor = prop.minor;
    dev.sms = prop.multiProcessorCount;
    dev.l2_bytes = static_cast<std::size_t>(prop.l2CacheSize);
    dev.memory_bytes = prop.totalGlobalMem;
    check(cudaRuntimeGetVersion(&dev.runtime), "cudaRuntimeGetVersion");
    check(cudaDriverGetVersion(&dev.driver), "cudaDriverGetVersion");

    // The stream-ordered allocator keeps what a route frees for the next one (a caching allocator's
    // behaviour, as PyTorch's), instead of returning it to the driver at every synchronisation.
    cudaMemPool_t pool = nullptr;
    check(cudaDeviceGetDefaultMemPool(&pool, device), "cudaDeviceGetDefaultMemPool");
    std::uint64_t keep = std::numeric_limits<std::uint64_t>::max();
    check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep), "cudaMemPoolSetAttribute");

    check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    {
      bench b(o, dev, stream);
      b.run();
    }
    check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    check(cudaStreamDestroy(stream), "cudaStreamDestroy");
    return 0;
  } catch (const mismatch& e) {
    std::printf("MISMATCH: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_gpu: %s\n", e.what());
    return 1;
  }
}
