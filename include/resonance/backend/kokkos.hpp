#pragma once

// backend::kokkos<ExecSpace>: the execution primitives (execution.hpp) on a Kokkos execution space, with
// the data in its memory space (kokkos_space<ExecSpace::memory_space>, owning buffers are Kokkos::View).
// It is the second execution model running the same stages as the host backends: the plan builder and
// the selection are not written again for it, only the primitives below are.
//
// Determinism: every primitive's output is unique (execution.hpp), and each one here computes it
// without an order-dependent step: for_each writes disjoint outputs, reductions are integer minima,
// the scan is over integers, the counting sort is stable by construction (fixed chunks, per-chunk
// histograms, a scan in (bin, chunk) order, a scatter in index order inside each chunk; never
// Kokkos::BinSort, which fills bins with atomics), and the selection returns the k-th largest of unique
// keys by a radix select (core/select.hpp). So the plan is serial's, bit for bit, whatever the
// execution space, league or team size.
//
// Tested with Debian 12's Kokkos 3.4.01 (Trilinos 13.2; the Serial space only, the library built as
// C++14, used here from C++20). Written against the API common to Kokkos 3.4 and 4.x: parallel_for,
// parallel_reduce, parallel_scan, RangePolicy, TeamPolicy with level-0 team scratch, View, deep_copy,
// Kokkos::Min and fence; comments mark where the two differ. Kokkos must be initialised (a
// Kokkos::ScopeGuard) before a backend is constructed and while its buffers live.
//
// The stages still orchestrate from the host and capture host memory, so routing needs an execution
// space whose memory the host can read (Kokkos::DefaultHostExecutionSpace: Serial, OpenMP, Threads);
// the primitives themselves are written for any space. The library's functors are plain lambdas,
// which is fine on host spaces; a device space will need them annotated (RESONANCE_HOST_DEVICE).
// This header is the only one that includes Kokkos.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include <Kokkos_Core.hpp>

#include "../core/config.hpp"
#include "../core/select.hpp"
#include "execution.hpp"
#include "rows.hpp"

namespace resonance {

// The memory space of Kokkos memory space MemSpace (Kokkos::HostSpace, Kokkos::CudaSpace, ...).
template <class MemSpace>
struct kokkos_space {
  using kokkos_memory_space = MemSpace;
  static constexpr const char* name = "kokkos";
};

template <class MemSpace>
struct space_traits<kokkos_space<MemSpace>> {
  static constexpr bool host_accessible = Kokkos::SpaceAccessibility<Kokkos::HostSpace, MemSpace>::accessible;
  template <class T>
  using buffer = Kokkos::View<T*, MemSpace>;
};

// Host memory (a host matrix, host candidates) may be passed to a Kokkos backend whose execution can
// read it (a host execution space), and a host-accessible Kokkos space's data to the host backends.
template <class MemSpace>
inline constexpr bool accessible_from_v<host_space, kokkos_space<MemSpace>> =
    Kokkos::SpaceAccessibility<typename MemSpace::execution_space, Kokkos::HostSpace>::accessible;

template <class MemSpace>
inline constexpr bool accessible_from_v<kokkos_space<MemSpace>, host_space> =
    Kokkos::SpaceAccessibility<Kokkos::HostSpace, MemSpace>::accessible;

namespace backend {

// A row-op group on a Kokkos team: the scalar row primitives and the team's level-0 scratch.
template <class ExecSpace>
struct kokkos_team_group {
  using rows = detail::scalar_rows;
  using member_type = typename Kokkos::TeamPolicy<ExecSpace>::member_type;

  const member_type* member_ = nullptr;
  void* scratch_ = nullptr;

  KOKKOS_INLINE_FUNCTION const member_type& team() const { return *member_; }
  KOKKOS_INLINE_FUNCTION void* scratch() const { return scratch_; }
};

template <class ExecSpace = Kokkos::DefaultExecutionSpace>
struct kokkos {
  using execution_space = ExecSpace;
  static constexpr const char* name = "kokkos";
  using memory_space = kokkos_space<typename ExecSpace::memory_space>;
  template <class T>
  using buffer = buffer_t<memory_space, T>;
  using group = kokkos_team_group<ExecSpace>;

  // The instance every primitive launches on (one stream or queue of a device space).
  ExecSpace exec{};

  // Backends are equal when they launch on the same instance, where the space can tell (Kokkos 3.4's
  // spaces have no operator==: they compare equal).
  friend bool operator==(const kokkos& a, const kokkos& b) {
    if constexpr (requires {
                    { a.exec == b.exec } -> std::convertible_to<bool>;
                  }) {
      return a.exec == b.exec;
    } else {
      return true;
    }
  }
};

namespace kokkos_detail {

static_assert(sizeof(index) == 8, "the Kokkos policies iterate over a 64-bit index");

// Policies over `index` itself, so that a functor receives the library's index type.
template <class ExecSpace>
using range_policy = Kokkos::RangePolicy<ExecSpace, Kokkos::IndexType<index>>;
template <class ExecSpace>
using team_policy = Kokkos::TeamPolicy<ExecSpace>;

template <class ExecSpace>
range_policy<ExecSpace> range(const ExecSpace& exec, index n, index grain) {
  // The grain is only a tuning hint: Kokkos' chunk size. (3.4's RangePolicy::set_chunk_size is const
  // and returns a copy, 4.x's returns a reference: the ChunkSize argument is the same in both.)
  if (grain > 0) return range_policy<ExecSpace>(exec, 0, n, Kokkos::ChunkSize(static_cast<int>(grain)));
  return range_policy<ExecSpace>(exec, 0, n);
}

// Kokkos::PerTeam's argument: an int in 3.4, a size_t in 4.x.
#if KOKKOS_VERSION >= 40000
using per_team_bytes = std::size_t;
#else
using per_team_bytes = int;
#endif

// One team of one thread per row: the library's row kernels are sequential. The team scratch holds the
// stage's bytes; a grain is the policy's chunk size (leagues per scheduling chunk).
template <class ExecSpace>
team_policy<ExecSpace> teams(const ExecSpace& exec, index league, index scratch_bytes, index grain = 0) {
  team_policy<ExecSpace> policy(exec, static_cast<int>(league), 1);
  if (scratch_bytes > 0) policy.set_scratch_size(0, Kokkos::PerTeam(static_cast<per_team_bytes>(scratch_bytes)));
  if (grain > 0) policy.set_chunk_size(static_cast<int>(grain));
  return policy;
}

template <class F>
struct for_each_functor {
  F f;
  KOKKOS_INLINE_FUNCTION void operator()(index i) const { f(i); }
};

template <class F>
struct reduce_min_functor {
  F f;
  KOKKOS_INLINE_FUNCTION void operator()(index i, index& m) const {
    const index v = static_cast<index>(f(i));
    if (v < m) m = v;
  }
};

// f(g, i) on team i, with the team's scratch. Two functors, not one with two call operators: Kokkos
// deduces a functor's value type from its call operator.
template <class ExecSpace>
KOKKOS_INLINE_FUNCTION kokkos_team_group<ExecSpace> group_of(const typename team_policy<ExecSpace>::member_type& team,
                                                             index scratch_bytes) {
  return {&team, scratch_bytes > 0 ? team.team_scratch(0).get_shmem(scratch_bytes) : nullptr};
}

// f returns void.
template <class ExecSpace, class F>
struct group_for_functor {
  F f;
  index scratch_bytes;
  KOKKOS_INLINE_FUNCTION void operator()(const typename team_policy<ExecSpace>::member_type& team) const {
    f(group_of<ExecSpace>(team, scratch_bytes), static_cast<index>(team.league_rank()));
  }
};

// f returns whether row i failed: the lowest failing i (Min's identity, no_index, when none).
template <class ExecSpace, class F>
struct group_min_functor {
  F f;
  index scratch_bytes;
  KOKKOS_INLINE_FUNCTION void operator()(const typename team_policy<ExecSpace>::member_type& team,
                                         index& lowest) const {
    const index i = static_cast<index>(team.league_rank());
    if (f(group_of<ExecSpace>(team, scratch_bytes), i) && i < lowest) lowest = i;
  }
};

// Exclusive scan over n + 1 entries, the last one 0: out[n] receives the total (and out[0] = 0 when n
// is 0) inside the same kernel. in[i] is read by the calls for index i only, before the final call
// writes out[i], and the final call for i is the last one for i in every Kokkos scan (Serial runs the
// final pass only; the parallel spaces run their non-final passes first): in may alias out.
struct scan_functor {
  using value_type = id_type;
  const id_type* in;
  id_type* out;
  index n;
  KOKKOS_INLINE_FUNCTION void operator()(index i, id_type& update, const bool final) const {
    const id_type v = i < n ? in[i] : id_type{0};
    if (final) out[i] = update;
    update += v;
  }
};

// The counting sort's chunk passes (detail::bucket_count_chunk / bucket_scatter_chunk, shared with the
// host backends) and its scan of the counters in (bin, chunk) order: one parallel_scan whose index j
// reads counter detail::bucket_counter(j, ...), and which writes each bin's start at its first chunk.
struct bucket_count_functor {
  const id_type* keys;
  index n, nbins;
  id_type* count;
  KOKKOS_INLINE_FUNCTION void operator()(index c) const { detail::bucket_count_chunk(keys, n, nbins, c, count); }
};

struct bucket_scan_functor {
  using value_type = id_type;
  id_type* count;
  index nbins, chunks;
  id_type* start;
  KOKKOS_INLINE_FUNCTION void operator()(index j, id_type& update, const bool final) const {
    const index size = nbins * chunks;
    const index at = j < size ? detail::bucket_counter(j, nbins, chunks) : 0;
    const id_type v = j < size ? count[at] : id_type{0};
    if (final) {
      if (j < size) count[at] = update;
      if (j % chunks == 0) start[j / chunks] = update;
    }
    update += v;
  }
};

struct bucket_scatter_functor {
  const id_type* keys;
  index n, nbins;
  id_type* cursor;
  id_type* perm;
  KOKKOS_INLINE_FUNCTION void operator()(index c) const {
    detail::bucket_scatter_chunk(keys, n, nbins, c, cursor, perm);
  }
};

struct zero_functor {
  id_type* out;
  KOKKOS_INLINE_FUNCTION void operator()(index i) const { out[i] = 0; }
};

// One team per segment: a segment with more than k keys gets its k-th largest, by the radix select with
// its 256-bin histogram in the team's scratch.
template <class ExecSpace>
struct select_functor {
  using member_type = typename team_policy<ExecSpace>::member_type;
  static constexpr index scratch_bytes = detail::radix_select_bins * static_cast<index>(sizeof(id_type));
  const std::uint64_t* keys;
  const id_type* offsets;
  index k;
  std::uint64_t* kth;
  KOKKOS_INLINE_FUNCTION void operator()(const member_type& team) const {
    const index s = static_cast<index>(team.league_rank());
    const index begin = offsets[s], n = offsets[s + 1] - begin;
    if (n <= k) return;
    auto* histogram = static_cast<id_type*>(team.team_scratch(0).get_shmem(scratch_bytes));
    kth[s] = detail::radix_kth_largest(keys + begin, n, k, histogram);
  }
};

template <class T, class MemSpace>
using unmanaged_view = Kokkos::View<T*, MemSpace, Kokkos::MemoryUnmanaged>;

}  // namespace kokkos_detail

template <class ExecSpace, class F>
void for_each(const kokkos<ExecSpace>& be, index n, const F& f, index grain = 0) {
  if (n <= 0) return;
  Kokkos::parallel_for("resonance::for_each", kokkos_detail::range(be.exec, n, grain),
                       kokkos_detail::for_each_functor<F>{f});
}

template <class ExecSpace, class F>
index for_each_group(const kokkos<ExecSpace>& be, index n, index scratch_bytes, const F& f, index grain = 0) {
  if (n <= 0) return n;
  using group = kokkos_team_group<ExecSpace>;
  const auto policy = kokkos_detail::teams(be.exec, n, scratch_bytes, grain);
  if constexpr (std::is_void_v<decltype(f(std::declval<const group&>(), index{}))>) {
    Kokkos::parallel_for("resonance::for_each_group", policy,
                         kokkos_detail::group_for_functor<ExecSpace, F>{f, scratch_bytes});
    return n;
  } else {
    index lowest = no_index;
    // A reduction into a host scalar: the call returns when the kernel is done.
    Kokkos::parallel_reduce("resonance::for_each_group", policy,
                            kokkos_detail::group_min_functor<ExecSpace, F>{f, scratch_bytes},
                            Kokkos::Min<index>(lowest));
    return lowest < n ? lowest : n;
  }
}

template <class ExecSpace, class F>
index reduce_min(const kokkos<ExecSpace>& be, index n, const F& f, index grain = 0) {
  if (n <= 0) return no_index;
  // Min's identity is the largest index, no_index: the result of an empty range.
  index m = no_index;
  Kokkos::parallel_reduce("resonance::reduce_min", kokkos_detail::range(be.exec, n, grain),
                          kokkos_detail::reduce_min_functor<F>{f}, Kokkos::Min<index>(m));
  return m;
}

// The minimum into result[0] in the backend's memory: a reduction into a View does not wait for the
// kernel.
template <class ExecSpace, class F>
void reduce_min_into(const kokkos<ExecSpace>& be, index n, const F& f, index* result, index grain = 0) {
  using space = typename ExecSpace::memory_space;
  // Min's result: a rank-0 View of the caller's entry.
  const Kokkos::View<index, space, Kokkos::MemoryUnmanaged> out(result);
  if (n <= 0) {
    Kokkos::deep_copy(be.exec, out, no_index);
    return;
  }
  Kokkos::parallel_reduce("resonance::reduce_min_into", kokkos_detail::range(be.exec, n, grain),
                          kokkos_detail::reduce_min_functor<F>{f}, Kokkos::Min<index, space>(out));
}

template <class ExecSpace>
void exclusive_scan(const kokkos<ExecSpace>& be, const id_type* in, id_type* out, index n) {
  Kokkos::parallel_scan("resonance::exclusive_scan", kokkos_detail::range(be.exec, n + 1, 0),
                        kokkos_detail::scan_functor{in, out, n});
}

template <class ExecSpace>
index stable_bucket_workspace(const kokkos<ExecSpace>&, index n, index nbins) {
  return detail::bucket_workspace(n, nbins);
}

template <class ExecSpace>
void stable_bucket(const kokkos<ExecSpace>& be, const id_type* keys, index n, index nbins, id_type* start,
                   id_type* perm, void* work) {
  const index chunks = detail::bucket_chunks(n);
  if (chunks == 0) {
    Kokkos::parallel_for("resonance::stable_bucket", kokkos_detail::range(be.exec, nbins + 1, 0),
                         kokkos_detail::zero_functor{start});
    return;
  }
  auto* count = static_cast<id_type*>(work);
  Kokkos::parallel_for("resonance::stable_bucket::count", kokkos_detail::range(be.exec, chunks, 1),
                       kokkos_detail::bucket_count_functor{keys, n, nbins, count});
  Kokkos::parallel_scan("resonance::stable_bucket::scan", kokkos_detail::range(be.exec, nbins * chunks + 1, 0),
                        kokkos_detail::bucket_scan_functor{count, nbins, chunks, start});
  Kokkos::parallel_for("resonance::stable_bucket::scatter", kokkos_detail::range(be.exec, chunks, 1),
                       kokkos_detail::bucket_scatter_functor{keys, n, nbins, count, perm});
}

// The histograms live in team scratch: no workspace.
template <class ExecSpace>
index segmented_select_workspace(const kokkos<ExecSpace>&, index, index) {
  return 0;
}

template <class ExecSpace>
void segmented_select(const kokkos<ExecSpace>& be, std::uint64_t* keys, const id_type* offsets, index nseg, index k,
                      std::uint64_t* kth, void*) {
  if (nseg <= 0 || k < 1) return;
  using functor = kokkos_detail::select_functor<ExecSpace>;
  Kokkos::parallel_for("resonance::segmented_select", kokkos_detail::teams(be.exec, nseg, functor::scratch_bytes),
                       functor{keys, offsets, k, kth});
}

// An uninitialised View: the stages write every entry they read.
template <class T, class ExecSpace>
buffer_t<typename kokkos<ExecSpace>::memory_space, T> allocate(const kokkos<ExecSpace>&, index n) {
  using view = buffer_t<typename kokkos<ExecSpace>::memory_space, T>;
  return view(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("resonance")), static_cast<std::size_t>(n));
}

// dst in the backend's space; src there or in a space its execution can read.
template <class ExecSpace, class T>
void copy(const kokkos<ExecSpace>& be, T* dst, const T* src, index n) {
  if (n <= 0) return;
  using space = typename ExecSpace::memory_space;
  const auto size = static_cast<std::size_t>(n);
  Kokkos::deep_copy(be.exec, kokkos_detail::unmanaged_view<T, space>(dst, size),
                    kokkos_detail::unmanaged_view<const T, space>(src, size));
}

// Asynchronous on the backend's instance: fence(be) before reading dst.
template <class ExecSpace, class T>
void copy_to_host(const kokkos<ExecSpace>& be, T* dst, const T* src, index n) {
  if (n <= 0) return;
  using space = typename ExecSpace::memory_space;
  const auto size = static_cast<std::size_t>(n);
  Kokkos::deep_copy(be.exec, kokkos_detail::unmanaged_view<T, Kokkos::HostSpace>(dst, size),
                    kokkos_detail::unmanaged_view<const T, space>(src, size));
}

template <class ExecSpace>
void fence(const kokkos<ExecSpace>& be) {
  be.exec.fence();
}

static_assert(execution_backend<kokkos<Kokkos::DefaultHostExecutionSpace>>);

}  // namespace backend
}  // namespace resonance
