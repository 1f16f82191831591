#pragma once

// backend::cuda: the execution primitives (execution.hpp) on one CUDA stream, with the data in device
// memory (cuda_space; owning buffers from the stream-ordered allocator). The stages are the ones every
// backend runs; only the primitives below are CUDA code.
//
//   for_each           grid-stride kernel, one thread per index
//   for_each_group     one thread per row, its scratch in dynamic shared memory
//   for_each_warp_row  one warp per row (all 32 lanes), its scratch per warp in dynamic shared memory:
//                      the lane group (cuda_warp_group, detail/warp_topk.hpp's lane operations) that
//                      token choice selects on when no group limit applies, top_k <= 16 and E <= 512
//                      (detail::warp_topk in registers; the weights and the token's tail on one lane,
//                      w.single, since they update the token's arrays in place)
//   reduce_min(_into)  warp shuffles, then one integer atomicMin per warp (a minimum: order-free)
//   exclusive_scan     one block, cub::BlockScan over tiles with a running prefix (no workspace)
//   stable_bucket      cub::DeviceRadixSort::SortPairs over ceil(log2 nbins) bits (stable), then each
//                      bin's start from the sorted keys
//   segmented_select   one block per segment, detail::radix_kth_largest (core/select.hpp, the Kokkos
//                      backend's too) with its histogram in shared memory
//   allocate_host      pinned host memory (router::route_into's copy back, graph-capturable)
//
// Determinism: every output is unique (sorts are stable, selections use a strict order on unique keys,
// the warp top-k's too: key bits, then the inverted expert id; scans and minima are over integers), so
// the plan is serial's, bit for bit, whatever the launch shapes; no atomic decides an order. Scores are
// computed with explicit roundings (exp_portable) and resonance::cuda compiles with --fmad=false, so FMA
// contraction cannot change a plan.
//
// Requirements: nvcc with --extended-lambda (the stages' RESONANCE_LAMBDA functors) and
// --expt-relaxed-constexpr; resonance::cuda adds both. A backend value holds a stream (the default
// stream when none is given); buffers are freed on the stream they were allocated on, so a stream must
// outlive the plans made on it. This header is the only one that includes CUDA.

#include <cstddef>
#include <cstdint>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <memory>
#include <string>
#include <type_traits>

#include <cuda_runtime.h>

#include "../core/config.hpp"
#include "../core/error.hpp"
#include "../core/select.hpp"
#include "detail/warp_topk.hpp"
#include "execution.hpp"
#include "rows.hpp"

namespace resonance {

// Device memory of the current CUDA device.
struct cuda_space {
  static constexpr const char* name = "cuda";
};

namespace backend::cuda_detail {

// A failed CUDA call as the library's error, naming the call.
inline void check(cudaError_t status, const char* call) {
  if (status != cudaSuccess)
    detail::fail("cuda", "a successful call", call, ": ", cudaGetErrorName(status), " (", cudaGetErrorString(status),
                 ")");
}

// A kernel launch's error (a bad configuration), without waiting for the kernel.
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

// An array owned by a shared pointer whose deleter gives the memory back: copies share it (a plan is
// copied like a handle) and the last owner frees it. The two kinds of memory below differ only in how
// they are obtained and returned.
template <class T>
class shared_array {
 public:
  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  std::size_t size() const { return static_cast<std::size_t>(size_); }

  shared_array() = default;
  template <class Free>
  shared_array(void* p, index n, Free free) : data_(static_cast<T*>(p), free), size_(n) {}

 private:
  std::shared_ptr<T> data_;
  index size_ = 0;
};
}  // namespace backend::cuda_detail

// An owning device array from the stream-ordered allocator, freed on the stream it was allocated on.
// Entries start uninitialised: the stages write every entry they read.
template <class T>
class cuda_buffer : public backend::cuda_detail::shared_array<T> {
 public:
  cuda_buffer() = default;
  cuda_buffer(index n, cudaStream_t stream) {
    if (n <= 0) return;
    void* p = nullptr;
    backend::cuda_detail::check(cudaMallocAsync(&p, static_cast<std::size_t>(n) * sizeof(T), stream),
                                "cudaMallocAsync");
    static_cast<backend::cuda_detail::shared_array<T>&>(*this) =
        backend::cuda_detail::shared_array<T>(p, n, [stream](T* q) { (void)cudaFreeAsync(q, stream); });
  }
};

// Pinned host memory (cudaMallocHost): what a route's one copy back lands in, so that the copy is
// asynchronous and a CUDA graph can capture it.
template <class T>
class cuda_host_buffer : public backend::cuda_detail::shared_array<T> {
 public:
  cuda_host_buffer() = default;
  explicit cuda_host_buffer(index n) {
    if (n <= 0) return;
    void* p = nullptr;
    backend::cuda_detail::check(cudaMallocHost(&p, static_cast<std::size_t>(n) * sizeof(T)), "cudaMallocHost");
    static_cast<backend::cuda_detail::shared_array<T>&>(*this) =
        backend::cuda_detail::shared_array<T>(p, n, [](T* q) { (void)cudaFreeHost(q); });
  }
};

template <>
struct space_traits<cuda_space> {
  static constexpr bool host_accessible = false;
  template <class T>
  using buffer = cuda_buffer<T>;
};

namespace backend {

// A row-op group on CUDA: one thread, the scalar row primitives, its scratch in shared memory.
struct cuda_thread_group {
  using rows = detail::scalar_rows;
  void* scratch_ = nullptr;
  RESONANCE_HOST_DEVICE void* scratch() const { return scratch_; }
};

// A row-op group of lanes on CUDA: the 32 threads of one warp, its scratch in shared memory; the lane
// operations of detail/warp_topk.hpp on warp intrinsics (for_each_warp_row runs every lane of the warp
// on the same rows, so the full mask is always right). The functions exist in the host pass too, where
// nothing calls them (a stage's functor is compiled for both).
struct cuda_warp_group {
  static constexpr int width = 32;
  void* scratch_ = nullptr;
  RESONANCE_HOST_DEVICE void* scratch() const { return scratch_; }
  RESONANCE_HOST_DEVICE int lane() const {
#if defined(__CUDA_ARCH__)
    return static_cast<int>(threadIdx.x & 31u);
#else
    return 0;
#endif
  }
  RESONANCE_HOST_DEVICE void sync() const {
#if defined(__CUDA_ARCH__)
    __syncwarp();
#endif
  }
  RESONANCE_HOST_DEVICE bool all(bool v) const {
#if defined(__CUDA_ARCH__)
    return __all_sync(0xFFFFFFFFu, v ? 1 : 0) != 0;
#else
    return v;
#endif
  }
  RESONANCE_HOST_DEVICE std::uint64_t shfl_xor(std::uint64_t v, int mask) const {
#if defined(__CUDA_ARCH__)
    return static_cast<std::uint64_t>(__shfl_xor_sync(0xFFFFFFFFu, static_cast<unsigned long long>(v), mask));
#else
    (void)mask;
    return v;
#endif
  }
  // Lane 0 runs f, the others wait (a scalar tail that updates arrays in place: several lanes running it
  // would race under independent thread scheduling); f's bool result is returned on every lane.
  template <class F>
  RESONANCE_HOST_DEVICE auto single(const F& f) const {
    if constexpr (std::is_void_v<decltype(f())>) {
      if (lane() == 0) f();
      sync();
    } else {
      static_assert(std::is_same_v<decltype(f()), bool>, "single(f): f returns void or bool");
      bool r = false;
      if (lane() == 0) r = f();
      sync();
#if defined(__CUDA_ARCH__)
      r = __shfl_sync(0xFFFFFFFFu, r ? 1 : 0, 0) != 0;
#endif
      return r;
    }
  }
};

struct cuda {
  static constexpr const char* name = "cuda";
  using memory_space = cuda_space;
  template <class T>
  using buffer = cuda_buffer<T>;
  using group = cuda_thread_group;
  using warp_group = cuda_warp_group;

  // The stream every primitive launches on, and every buffer is allocated and freed on.
  cudaStream_t stream = nullptr;

  friend bool operator==(const cuda&, const cuda&) = default;
};

namespace cuda_detail {

inline constexpr int block_threads = 256;
// Grid-stride loops: enough blocks to fill a large GPU; a bigger n loops.
inline constexpr index max_blocks = 65535;

inline unsigned blocks_for(index n, index threads = block_threads) {
  const index b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 1 ? 1 : b < max_blocks ? b : max_blocks);
}

RESONANCE_DEVICE inline index global_thread() {
  return static_cast<index>(blockIdx.x) * static_cast<index>(blockDim.x) + static_cast<index>(threadIdx.x);
}
RESONANCE_DEVICE inline index grid_threads() { return static_cast<index>(gridDim.x) * static_cast<index>(blockDim.x); }

template <class F>
__global__ void for_each_kernel(index n, F f) {
  for (index i = global_thread(); i < n; i += grid_threads()) f(i);
}

// min over a warp (shuffles), then one atomicMin per warp into *result. Indices are non-negative and
// no_index is the largest, so the unsigned minimum is the signed one.
RESONANCE_DEVICE inline void warp_min_into(index v, index* result) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const index other = __shfl_down_sync(0xFFFFFFFFu, v, offset);
    v = other < v ? other : v;
  }
  if ((threadIdx.x & 31u) == 0 && v != no_index)
    atomicMin(reinterpret_cast<unsigned long long*>(result), static_cast<unsigned long long>(v));
}

template <class F>
__global__ void reduce_min_kernel(index n, F f, index* result) {
  index m = no_index;
  // Every thread of the block runs the loop to the same number of warps' shuffles: the bound is
  // rounded up to whole blocks, and threads past n contribute no_index.
  const index stride = grid_threads();
  const index rounds = (n + stride - 1) / stride;
  for (index r = 0; r < rounds; ++r) {
    const index i = r * stride + global_thread();
    if (i < n) {
      const index v = static_cast<index>(f(i));
      m = v < m ? v : m;
    }
  }
  warp_min_into(m, result);
}

// One row per thread; each thread's scratch at shared + threadIdx.x * stride.
template <class F>
__global__ void group_kernel(index n, index stride, F f) {
  extern __shared__ unsigned char shared[];
  const index i = global_thread();
  if (i >= n) return;
  f(cuda_thread_group{stride > 0 ? shared + static_cast<index>(threadIdx.x) * stride : nullptr}, i);
}

// The same, with the lowest failing row into *result. A block may be a partial warp (its threads are
// set by the scratch), so no shuffles: a failing row is rare and makes its own atomicMin.
template <class F>
__global__ void group_min_kernel(index n, index stride, F f, index* result) {
  extern __shared__ unsigned char shared[];
  const index i = global_thread();
  if (i >= n) return;
  if (f(cuda_thread_group{stride > 0 ? shared + static_cast<index>(threadIdx.x) * stride : nullptr}, i))
    atomicMin(reinterpret_cast<unsigned long long*>(result), static_cast<unsigned long long>(i));
}

// One row per warp (all 32 lanes run f on it), each warp's scratch at shared + warp * stride; rows
// grid-stride, the same for every lane of a warp.
inline constexpr int warp_threads = 32;

template <class F>
__global__ void warp_row_kernel(index n, index stride, F f) {
  extern __shared__ unsigned char shared[];
  const index warp = static_cast<index>(threadIdx.x) / warp_threads;
  const index warps = static_cast<index>(blockDim.x) / warp_threads;
  const cuda_warp_group w{stride > 0 ? shared + warp * stride : nullptr};
  for (index i = static_cast<index>(blockIdx.x) * warps + warp; i < n; i += static_cast<index>(gridDim.x) * warps)
    f(w, i);
}

// The same, with the lowest failing row into *result (f's result is the same on every lane: lane 0
// reports it).
template <class F>
__global__ void warp_row_min_kernel(index n, index stride, F f, index* result) {
  extern __shared__ unsigned char shared[];
  const index warp = static_cast<index>(threadIdx.x) / warp_threads;
  const index warps = static_cast<index>(blockDim.x) / warp_threads;
  const cuda_warp_group w{stride > 0 ? shared + warp * stride : nullptr};
  for (index i = static_cast<index>(blockIdx.x) * warps + warp; i < n; i += static_cast<index>(gridDim.x) * warps)
    if (f(w, i) && (threadIdx.x & 31u) == 0)
      atomicMin(reinterpret_cast<unsigned long long*>(result), static_cast<unsigned long long>(i));
}

struct set_index {
  index* out;
  index value;
  RESONANCE_HOST_DEVICE void operator()(index) const { *out = value; }
};

// Exclusive scan of n + 1 outputs (in[n] read as 0) in one block: tiles of tile_items entries, each
// thread holding scan_items consecutive ones; the running total carried from tile to tile by the
// block-prefix callback. A tile reads all its inputs before the block scan's barriers and writes only
// its own entries after them, so in may alias out.
inline constexpr int scan_threads = 1024;
inline constexpr int scan_items = 4;
inline constexpr index scan_tile = static_cast<index>(scan_threads) * scan_items;

struct running_prefix {
  id_type total;
  RESONANCE_DEVICE id_type operator()(id_type tile_sum) {
    const id_type before = total;
    total += tile_sum;
    return before;
  }
};

// The kernels that take no functor are templates too (of nothing), so that two translation units
// including this header link: a __global__ function cannot be inline.
template <int = 0>
__global__ void __launch_bounds__(scan_threads) exclusive_scan_kernel(const id_type* in, id_type* out, index n) {
  using block_scan = cub::BlockScan<id_type, scan_threads>;
  __shared__ typename block_scan::TempStorage temp;
  running_prefix prefix{0};
  for (index base = 0; base < n + 1; base += scan_tile) {
    id_type items[scan_items];
    const index first = base + static_cast<index>(threadIdx.x) * scan_items;
    for (int j = 0; j < scan_items; ++j) items[j] = first + j < n ? in[first + j] : id_type{0};
    block_scan(temp).ExclusiveSum(items, items, prefix);
    __syncthreads();  // temp is reused by the next tile
    for (int j = 0; j < scan_items; ++j)
      if (first + j <= n) out[first + j] = items[j];
  }
}

template <int = 0>
__global__ void iota_kernel(id_type* out, index n) {
  for (index i = global_thread(); i < n; i += grid_threads()) out[i] = static_cast<id_type>(i);
}

// start[b] for b in [0, nbins]: the first position of bin b in the sorted keys. Position i writes the
// starts of the bins (sorted[i - 1], sorted[i]] (i = 0: [0, sorted[0]]; i = n: (sorted[n - 1], nbins]),
// so each entry is written once.
template <int = 0>
__global__ void bucket_starts_kernel(const std::uint32_t* sorted, index n, index nbins, id_type* start) {
  for (index i = global_thread(); i <= n; i += grid_threads()) {
    const index lo = i == 0 ? 0 : static_cast<index>(sorted[i - 1]) + 1;
    const index hi = i == n ? nbins : static_cast<index>(sorted[i]);
    for (index b = lo; b <= hi; ++b) start[b] = static_cast<id_type>(i);
  }
}

// Bits of a bin id below nbins.
inline int bucket_bits(index nbins) {
  int bits = 0;
  while ((index{1} << bits) < nbins) ++bits;
  return bits > 0 ? bits : 1;
}

// The workspace of stable_bucket: CUB's temporary storage, the sorted keys and the identity values,
// each at a 256-byte boundary.
struct bucket_layout {
  std::size_t temp_bytes = 0;
  index sorted = 0, values = 0, temp = 0, bytes = 0;
  bucket_layout(index n, index nbins) {
    detail::require(n <= index{0x7FFFFFFF}, "stable_bucket", "at most 2^31 - 1 keys (CUB's item count)", n);
    if (n > 0) {
      check(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, static_cast<const std::uint32_t*>(nullptr),
                                            static_cast<std::uint32_t*>(nullptr), static_cast<const id_type*>(nullptr),
                                            static_cast<id_type*>(nullptr), static_cast<int>(n), 0, bucket_bits(nbins)),
            "cub::DeviceRadixSort::SortPairs (size query)");
    }
    const auto round = [](index b) { return (b + 255) / 256 * 256; };
    sorted = 0;
    values = round(sorted + n * static_cast<index>(sizeof(std::uint32_t)));
    temp = round(values + n * static_cast<index>(sizeof(id_type)));
    bytes = temp + static_cast<index>(temp_bytes);
  }
};

// One single-thread block per segment: the shared radix select with its histogram in shared memory.
template <int = 0>
__global__ void select_kernel(const std::uint64_t* keys, const id_type* offsets, index k, std::uint64_t* kth) {
  __shared__ id_type histogram[detail::radix_select_bins];
  const index s = blockIdx.x;
  const index begin = offsets[s], n = offsets[s + 1] - begin;
  if (n > k) kth[s] = detail::radix_kth_largest(keys + begin, n, k, histogram);
}

// The largest dynamic shared memory one block may use on the current device.
inline index max_shared_bytes() {
  int device = 0, bytes = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
  return bytes;
}

// Threads per block and the per-thread stride of a group kernel with `scratch_bytes` per row.
struct group_shape {
  index stride = 0;
  int threads = block_threads;
  index shared = 0;
};

// The launch shape of a kernel whose units (a thread of a group kernel, a warp of a warp-row kernel:
// `unit_threads` threads) each get `scratch_bytes` of shared memory: as many units per block as fit in
// the default 48 KB (the device's opt-in maximum for a larger scratch, which `primitive`'s error names
// when even one does not fit), at most block_threads threads, whole warps when there are 32 or more.
template <class Kernel>
group_shape shape_launch(Kernel kernel, index scratch_bytes, index unit_threads, const char* primitive) {
  group_shape g;
  if (scratch_bytes <= 0) return g;
  g.stride = (scratch_bytes + 15) / 16 * 16;
  constexpr index default_shared = 48 * 1024;
  index limit = default_shared;
  if (g.stride > default_shared) {
    limit = max_shared_bytes();
    detail::require(g.stride <= limit, primitive, "scratch that fits a block's shared memory", scratch_bytes,
                    " bytes per row (at most ", limit, " on this device)");
  }
  index units = limit / g.stride;
  units = units * unit_threads > block_threads ? block_threads / unit_threads : units;
  if (units * unit_threads >= 32) units = units * unit_threads / 32 * 32 / unit_threads;
  g.threads = static_cast<int>(units * unit_threads);
  g.shared = units * g.stride;
  if (g.shared > default_shared)
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(g.shared)),
          "cudaFuncSetAttribute");
  return g;
}

inline unsigned warp_blocks(index n, int threads) {
  const index warps = threads / warp_threads;
  const index b = (n + warps - 1) / warps;
  return static_cast<unsigned>(b < max_blocks ? b : max_blocks);
}

}  // namespace cuda_detail

template <class F>
void for_each(const cuda& be, index n, const F& f, index = 0) {
  if (n <= 0) return;
  cuda_detail::for_each_kernel<<<cuda_detail::blocks_for(n), cuda_detail::block_threads, 0, be.stream>>>(n, f);
  cuda_detail::check_launch("for_each");
}

template <class F>
void reduce_min_into(const cuda& be, index n, const F& f, index* result, index = 0) {
  cuda_detail::for_each_kernel<<<1, 1, 0, be.stream>>>(index{1}, cuda_detail::set_index{result, no_index});
  cuda_detail::check_launch("reduce_min_into");
  if (n <= 0) return;
  cuda_detail::reduce_min_kernel<<<cuda_detail::blocks_for(n), cuda_detail::block_threads, 0, be.stream>>>(n, f,
                                                                                                           result);
  cuda_detail::check_launch("reduce_min_into");
}

template <class T>
cuda_buffer<T> allocate(const cuda& be, index n) {
  return cuda_buffer<T>(n, be.stream);
}

// Host memory the backend's copies fill asynchronously (and inside a captured graph).
template <class T>
cuda_host_buffer<T> allocate_host(const cuda&, index n) {
  return cuda_host_buffer<T>(n);
}

// Any direction (the pointers say which: unified addressing); asynchronous on the backend's stream.
template <class T>
void copy(const cuda& be, T* dst, const T* src, index n) {
  if (n <= 0) return;
  cuda_detail::check(cudaMemcpyAsync(dst, src, static_cast<std::size_t>(n) * sizeof(T), cudaMemcpyDefault, be.stream),
                     "cudaMemcpyAsync");
}

// Asynchronous on the backend's stream: fence(be) before reading dst.
template <class T>
void copy_to_host(const cuda& be, T* dst, const T* src, index n) {
  copy(be, dst, src, n);
}

inline void fence(const cuda& be) { cuda_detail::check(cudaStreamSynchronize(be.stream), "cudaStreamSynchronize"); }

template <class F>
index reduce_min(const cuda& be, index n, const F& f, index grain = 0) {
  if (n <= 0) return no_index;
  auto result = allocate<index>(be, 1);
  reduce_min_into(be, n, f, result.data(), grain);
  index m = no_index;
  copy_to_host(be, &m, result.data(), 1);
  fence(be);
  return m;
}

template <class F>
index for_each_group(const cuda& be, index n, index scratch_bytes, const F& f, index = 0) {
  if (n <= 0) return n;
  if constexpr (std::is_void_v<decltype(f(std::declval<const cuda_thread_group&>(), index{}))>) {
    const auto g = cuda_detail::shape_launch(cuda_detail::group_kernel<F>, scratch_bytes, 1, "for_each_group");
    const auto blocks = static_cast<unsigned>((n + g.threads - 1) / g.threads);
    cuda_detail::group_kernel<<<blocks, g.threads, static_cast<std::size_t>(g.shared), be.stream>>>(n, g.stride, f);
    cuda_detail::check_launch("for_each_group");
    return n;
  } else {
    const auto g = cuda_detail::shape_launch(cuda_detail::group_min_kernel<F>, scratch_bytes, 1, "for_each_group");
    auto result = allocate<index>(be, 1);
    cuda_detail::for_each_kernel<<<1, 1, 0, be.stream>>>(index{1}, cuda_detail::set_index{result.data(), no_index});
    const auto blocks = static_cast<unsigned>((n + g.threads - 1) / g.threads);
    cuda_detail::group_min_kernel<<<blocks, g.threads, static_cast<std::size_t>(g.shared), be.stream>>>(n, g.stride, f,
                                                                                                        result.data());
    cuda_detail::check_launch("for_each_group");
    index lowest = no_index;
    copy_to_host(be, &lowest, result.data(), 1);
    fence(be);
    return lowest < n ? lowest : n;
  }
}

// f(w, i) run by the 32 lanes of one warp for every row i, with scratch_bytes of shared memory in
// w.scratch() (detail::warp_row_backend). As for_each_group: an f returning bool (the same on every
// lane) gives the lowest failing row, or n; an f returning void gives no result and no wait.
template <class F>
index for_each_warp_row(const cuda& be, index n, index scratch_bytes, const F& f) {
  if (n <= 0) return n;
  if constexpr (std::is_void_v<decltype(f(std::declval<const cuda_warp_group&>(), index{}))>) {
    const auto g = cuda_detail::shape_launch(cuda_detail::warp_row_kernel<F>, scratch_bytes, cuda_detail::warp_threads,
                                             "for_each_warp_row");
    cuda_detail::warp_row_kernel<<<cuda_detail::warp_blocks(n, g.threads), g.threads,
                                   static_cast<std::size_t>(g.shared), be.stream>>>(n, g.stride, f);
    cuda_detail::check_launch("for_each_warp_row");
    return n;
  } else {
    const auto g = cuda_detail::shape_launch(cuda_detail::warp_row_min_kernel<F>, scratch_bytes,
                                             cuda_detail::warp_threads, "for_each_warp_row");
    auto result = allocate<index>(be, 1);
    cuda_detail::for_each_kernel<<<1, 1, 0, be.stream>>>(index{1}, cuda_detail::set_index{result.data(), no_index});
    cuda_detail::warp_row_min_kernel<<<cuda_detail::warp_blocks(n, g.threads), g.threads,
                                       static_cast<std::size_t>(g.shared), be.stream>>>(n, g.stride, f, result.data());
    cuda_detail::check_launch("for_each_warp_row");
    index lowest = no_index;
    copy_to_host(be, &lowest, result.data(), 1);
    fence(be);
    return lowest < n ? lowest : n;
  }
}

inline void exclusive_scan(const cuda& be, const id_type* in, id_type* out, index n) {
  cuda_detail::exclusive_scan_kernel<><<<1, cuda_detail::scan_threads, 0, be.stream>>>(in, out, n);
  cuda_detail::check_launch("exclusive_scan");
}

inline index stable_bucket_workspace(const cuda&, index n, index nbins) {
  return cuda_detail::bucket_layout(n, nbins).bytes;
}

inline void stable_bucket(const cuda& be, const id_type* keys, index n, index nbins, id_type* start, id_type* perm,
                          void* work) {
  const cuda_detail::bucket_layout l(n, nbins);
  auto* base = static_cast<unsigned char*>(work);
  auto* sorted = reinterpret_cast<std::uint32_t*>(base + l.sorted);
  auto* values = reinterpret_cast<id_type*>(base + l.values);
  if (n > 0) {
    cuda_detail::iota_kernel<><<<cuda_detail::blocks_for(n), cuda_detail::block_threads, 0, be.stream>>>(values, n);
    cuda_detail::check_launch("stable_bucket");
    std::size_t temp_bytes = l.temp_bytes;
    // Bin ids are non-negative: their bits read as unsigned sort the same.
    cuda_detail::check(cub::DeviceRadixSort::SortPairs(
                           base + l.temp, temp_bytes, reinterpret_cast<const std::uint32_t*>(keys), sorted, values,
                           perm, static_cast<int>(n), 0, cuda_detail::bucket_bits(nbins), be.stream),
                       "cub::DeviceRadixSort::SortPairs");
  }
  cuda_detail::bucket_starts_kernel<>
      <<<cuda_detail::blocks_for(n + 1), cuda_detail::block_threads, 0, be.stream>>>(sorted, n, nbins, start);
  cuda_detail::check_launch("stable_bucket");
}

// The histograms live in shared memory: no workspace.
inline index segmented_select_workspace(const cuda&, index, index) { return 0; }

inline void segmented_select(const cuda& be, std::uint64_t* keys, const id_type* offsets, index nseg, index k,
                             std::uint64_t* kth, void*) {
  if (nseg <= 0 || k < 1) return;
  cuda_detail::select_kernel<><<<static_cast<unsigned>(nseg), 1, 0, be.stream>>>(keys, offsets, k, kth);
  cuda_detail::check_launch("segmented_select");
}

static_assert(execution_backend<cuda>);
static_assert(detail::warp_row_backend<cuda>);

}  // namespace backend
}  // namespace resonance
