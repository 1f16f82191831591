#pragma once

// The execution model (DESIGN §9). A stage (selection, capacity cut, plan build, dispatch/combine, ...)
// is written once, as host orchestration plus functors captured by value; a backend is a small
// copyable value that only executes. It declares
//   memory_space      where its data lives (host_space, or a device space)
//   buffer<T>         the owning array of that space (std::vector on the host, Kokkos::View, ...)
//   group             the row-op group a cooperating row runs on (group::rows are the row primitives)
// and provides, found by argument-dependent lookup, the primitives below. Only these differ per
// backend; every other line of the library is shared.
//
//   for_each(be, n, f[, grain])                f(i) for i in [0, n), in any order
//   for_each_group(be, n, scratch_bytes, f[, grain])
//                                              f(g, i) -> bool (true: row i failed); returns the
//                                              lowest failing row, or n. g.rows, g.scratch(). An f
//                                              returning void: no result, and no wait for one
//   reduce_min(be, n, f[, grain])              min_i f(i) for an index-valued f (no_index when n is 0)
//   reduce_min_into(be, n, f, result[, grain]) the same minimum written to result[0] in the backend's
//                                              memory, without waiting for it (a device route's status
//                                              stays on the device until its one copy to the host)
//   exclusive_scan(be, in, out, n)             out[i] = in[0] + ... + in[i-1] for i in [0, n]
//                                              (n + 1 outputs; in may equal out); integers only
//   stable_bucket(be, keys, n, nbins, start, perm, work)
//                                              stable counting sort: start[b] is the first position of
//                                              bin b (nbins + 1 entries), perm the indices in (bin,
//                                              index) order
//   segmented_select(be, keys, offsets, nseg, k, kth, work)
//                                              for each segment holding more than k >= 1 keys, kth[s]
//                                              is its k-th largest key (keys unique within a segment;
//                                              the keys may be permuted inside their segment)
//   allocate<T>(be, n), copy(be, dst, src, n), copy_to_host(be, dst, src, n), fence(be)
//   allocate_host<T>(be, n)                    optional: host memory copies may fill asynchronously
//
// The outputs of every primitive are unique (sorts are stable, selections use a strict order on
// unique keys, the scan is over integers, reduce_min is a minimum), so a block, grain or team size
// is a tuning hint and never changes a result. Workspace sizes come from
// stable_bucket_workspace(be, n, nbins) and segmented_select_workspace(be, n, nseg) (bytes), so that
// a stage can allocate everything before it runs.

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/config.hpp"
#include "../core/space.hpp"
#include "rows.hpp"

namespace resonance {

// What the library needs to know of a memory space: its owning buffer and whether host code may read
// it directly. A device backend specialises it for its space.
template <class Space>
struct space_traits;

namespace detail {
// An allocator that default-initialises: a host buffer of scalars is not zeroed when it is created or
// grown, since every stage writes each entry it later reads (zeroing cost a pass over the memory).
template <class T>
struct default_init_allocator : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = default_init_allocator<U>;
  };
  default_init_allocator() = default;
  template <class U>
  constexpr default_init_allocator(const default_init_allocator<U>&) noexcept {}
  template <class U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
}  // namespace detail

// A host buffer: a std::vector whose new entries are left uninitialised.
template <class T>
using host_buffer = std::vector<T, detail::default_init_allocator<T>>;

template <>
struct space_traits<host_space> {
  static constexpr bool host_accessible = true;
  template <class T>
  using buffer = host_buffer<T>;
};

template <class Space>
inline constexpr bool host_accessible_v = space_traits<Space>::host_accessible;

// Whether data in space From may be passed to a backend whose memory space is To. The same space
// always; a backend adds the spaces its execution can read (a Kokkos host space reads host_space).
template <class From, class To>
inline constexpr bool accessible_from_v = std::is_same_v<From, To>;

// The identity of reduce_min: larger than any index.
inline constexpr index no_index = std::numeric_limits<index>::max();

template <class Space, class T>
using buffer_t = typename space_traits<Space>::template buffer<T>;

// Host memory that a backend's copy_to_host may fill without the host waiting, even inside a captured
// CUDA graph: a backend may provide allocate_host<T>(be, n) (CUDA: pinned memory); otherwise a host
// buffer. What a route reads back after its fence (router::route_into) lives in it.
template <class T, class Backend>
auto allocate_host_readable(const Backend& be, index n) {
  if constexpr (requires { allocate_host<T>(be, n); }) {
    return allocate_host<T>(be, n);
  } else {
    (void)be;
    return host_buffer<T>(static_cast<std::size_t>(n));
  }
}
template <class Backend, class T>
using host_readable_t = decltype(allocate_host_readable<T>(std::declval<const Backend&>(), index{}));

namespace detail {
// Archetypes for the concept check (named types: nvcc rejects lambdas inside a requires-expression).
struct index_functor_archetype {
  RESONANCE_HOST_DEVICE void operator()(index) const {}
};
struct index_valued_archetype {
  RESONANCE_HOST_DEVICE index operator()(index i) const { return i; }
};
}  // namespace detail

template <class B>
concept execution_backend = std::copyable<B> &&
    requires(const B& be, detail::index_functor_archetype f, detail::index_valued_archetype v, const id_type* in,
             id_type* out) {
  { B::name } -> std::convertible_to<const char*>;
  typename B::memory_space;
  typename B::template buffer<float>;
  typename B::group;
  typename B::group::rows;
  for_each(be, index{}, f);
  { reduce_min(be, index{}, v) } -> std::same_as<index>;
  reduce_min_into(be, index{}, v, static_cast<index*>(nullptr));
  exclusive_scan(be, in, out, index{});
  fence(be);
};

// The memory space a backend's data lives in.
template <class B>
using memory_space_t = typename B::memory_space;

namespace detail {
// The row primitives of a backend's group (scalar_rows unless the backend vectorises them).
template <class B>
using row_ops_t = typename B::group::rows;
}  // namespace detail

namespace backend {

// A row-op group on the host: one thread running the row primitives Rows, with the scratch memory the
// stage asked for (aligned for any scalar type).
template <class Rows>
struct host_group {
  using rows = Rows;
  void* scratch_ = nullptr;
  RESONANCE_HOST_DEVICE void* scratch() const { return scratch_; }
};

// Scratch of `bytes` bytes for one host group, aligned for every scalar the stages use.
class host_scratch {
 public:
  explicit host_scratch(index bytes) : words_(static_cast<std::size_t>((bytes + 7) / 8 + 1)) {}
  void* get() { return words_.data(); }

 private:
  std::vector<std::uint64_t> words_;
};

// ---- The host primitives shared by every host backend (the sequential ones use them directly; tbb
// ---- splits the index range first). They are the reference semantics of each primitive.
namespace host {

template <class F>
void for_each(index begin, index end, const F& f) {
  for (index i = begin; i < end; ++i) f(i);
}

template <class Rows, class F>
index for_each_group(index begin, index end, index scratch_bytes, const F& f) {
  host_scratch scratch(scratch_bytes);
  const host_group<Rows> g{scratch.get()};
  for (index i = begin; i < end; ++i) {
    if constexpr (std::is_void_v<decltype(f(g, i))>) {
      f(g, i);
    } else if (f(g, i)) {
      return i;  // nothing below i failed in this range
    }
  }
  return end;
}

template <class F>
index reduce_min(index begin, index end, index none, const F& f) {
  index m = none;
  for (index i = begin; i < end; ++i) {
    const index v = f(i);
    m = v < m ? v : m;
  }
  return m;
}

inline void exclusive_scan(const id_type* in, id_type* out, index n) {
  id_type running = 0;
  for (index i = 0; i < n; ++i) {
    const id_type v = in[i];  // read before the write: in may alias out
    out[i] = running;
    running += v;
  }
  out[n] = running;
}

// The k-th largest of the segment's keys, by a selection in place (the keys are unique, so the result
// does not depend on how std::nth_element partitions).
inline std::uint64_t kth_largest(std::uint64_t* first, index n, index k) {
  std::nth_element(first, first + (k - 1), first + n, std::greater<>{});
  return first[k - 1];
}

}  // namespace host

}  // namespace backend

namespace detail {
// The stable counting sort every backend runs (stable_bucket): fixed chunks of bucket_chunk indices;
// a histogram per chunk (chunk c's nbins counters at count + c·nbins), one exclusive scan of the
// counters in (bin, chunk) order, which turns them into each chunk's cursor per bin, then a scatter
// per chunk in index order. The chunk passes are written once here; a backend runs them over the
// chunks and supplies the scan. The chunks, not the backend, fix the work of each pass.
inline constexpr index bucket_chunk = 2048;

RESONANCE_INLINE_FUNCTION index bucket_chunks(index n) { return n > 0 ? (n + bucket_chunk - 1) / bucket_chunk : 0; }

// Bytes of counters the sort needs (the workspace of stable_bucket).
RESONANCE_INLINE_FUNCTION index bucket_workspace(index n, index nbins) {
  return bucket_chunks(n) * nbins * static_cast<index>(sizeof(id_type));
}

RESONANCE_INLINE_FUNCTION void bucket_count_chunk(const id_type* keys, index n, index nbins, index c, id_type* count) {
  id_type* own = count + c * nbins;
  for (index b = 0; b < nbins; ++b) own[b] = 0;
  const index last = (c + 1) * bucket_chunk < n ? (c + 1) * bucket_chunk : n;
  for (index i = c * bucket_chunk; i < last; ++i) ++own[keys[i]];
}

// Position j of the (bin, chunk) scan order in the counters' (chunk, bin) layout.
RESONANCE_INLINE_FUNCTION index bucket_counter(index j, index nbins, index chunks) {
  return j % chunks * nbins + j / chunks;
}

RESONANCE_INLINE_FUNCTION void bucket_scatter_chunk(const id_type* keys, index n, index nbins, index c, id_type* cursor,
                                                    id_type* perm) {
  id_type* own = cursor + c * nbins;
  const index last = (c + 1) * bucket_chunk < n ? (c + 1) * bucket_chunk : n;
  for (index i = c * bucket_chunk; i < last; ++i) perm[own[keys[i]]++] = static_cast<id_type>(i);
}
}  // namespace detail

namespace backend {
namespace host {
// The counting sort on the host: the chunk passes through `chunks_for_each(nchunks, body)` (body(c)
// for every chunk, sequentially or in parallel), the scan of the counters on the calling thread.
template <class ChunksForEach>
void stable_bucket(const id_type* keys, index n, index nbins, id_type* start, id_type* perm, void* work,
                   const ChunksForEach& chunks_for_each) {
  const index chunks = detail::bucket_chunks(n);
  id_type* cursor = static_cast<id_type*>(work);
  chunks_for_each(chunks, [=](index c) { detail::bucket_count_chunk(keys, n, nbins, c, cursor); });
  id_type running = 0;
  for (index bin = 0; bin < nbins; ++bin) {
    start[bin] = running;
    for (index c = 0; c < chunks; ++c) {
      id_type& counter = cursor[c * nbins + bin];
      const id_type v = counter;
      counter = running;
      running += v;
    }
  }
  start[nbins] = running;
  chunks_for_each(chunks, [=](index c) { detail::bucket_scatter_chunk(keys, n, nbins, c, cursor, perm); });
}

// Segment s's k-th largest key into kth[s] when the segment holds more than k keys.
inline void select_segment(std::uint64_t* keys, const id_type* offsets, index s, index k, std::uint64_t* kth) {
  const index n = offsets[s + 1] - offsets[s];
  if (k >= 1 && n > k) kth[s] = kth_largest(keys + offsets[s], n, k);
}
}  // namespace host

// The host primitives that do not depend on the threading: allocation and copies.
template <class B>
concept host_backend = std::is_same_v<typename B::memory_space, host_space>;

template <class T, host_backend B>
host_buffer<T> allocate(const B&, index n) {
  return host_buffer<T>(static_cast<std::size_t>(n));
}

template <host_backend B, class T>
void copy(const B&, T* dst, const T* src, index n) {
  if (n > 0) std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(T));
}

template <host_backend B, class T>
void copy_to_host(const B& be, T* dst, const T* src, index n) {
  copy(be, dst, src, n);
}

template <host_backend B>
void fence(const B&) {}

// On the host the minimum is ready at once; the result is written like any other output.
template <host_backend B, class F>
void reduce_min_into(const B& be, index n, const F& f, index* result, index grain = 0) {
  *result = reduce_min(be, n, f, grain);
}

}  // namespace backend

namespace detail {

// The bridge for stages that still run host code block by block (they capture host containers by
// reference, so they need a host-accessible backend): body(begin, end) on consecutive blocks of
// `grain` indices covering [0, n), each block on one thread. The blocks, not the threads, fix the
// work of each call.
template <class B, class Body>
void host_blocks(const B& be, index n, index grain, const Body& body) {
  static_assert(host_accessible_v<typename B::memory_space>,
                "this stage runs host code: it needs a backend whose memory the host can read");
  if (n <= 0) return;
  if (grain <= 0) grain = n;
  const index blocks = (n + grain - 1) / grain;
  for_each(
      be, blocks, [&body, n, grain](index b) { body(b * grain, b * grain + grain < n ? b * grain + grain : n); },
      index{1});
}

}  // namespace detail
}  // namespace resonance
