#pragma once

// backend::tbb<Inner>: oneTBB threads running the execution primitives (execution.hpp) in parallel,
// with Inner's row-op group: backend::tbb<> (also named backend::cpu, the fastest CPU backend) is
// threads with backend::native's rows (vectorised for the CPU it runs on, see native.hpp),
// tbb<backend::serial> threads with the scalar reference rows, tbb<backend::simd<Arch>> threads with
// the rows of one compile-time architecture. Every primitive's output is unique, so
// the plan cannot depend on the thread count or on the schedule. The thread count is the calling task
// arena's (limit it with tbb::task_arena or tbb::global_control).
// This header is the only one that includes oneTBB.

#include <algorithm>
#include <atomic>

#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/partitioner.h>
#include <oneapi/tbb/task_arena.h>

#include "execution.hpp"
#include "native.hpp"
#include "serial.hpp"

// ThreadSanitizer sees no synchronisation inside libtbb unless oneTBB itself was built with it (Debian's
// is not), so under TSan blocks() states the orders parallel_for guarantees (docs/reliability.md,
// "Threads"). Nothing changes in any other build.
#if defined(__SANITIZE_THREAD__)
#define RESONANCE_TBB_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define RESONANCE_TBB_TSAN 1
#endif
#endif
#ifdef RESONANCE_TBB_TSAN
#include <memory>
#include <sanitizer/tsan_interface.h>
#endif

namespace resonance::backend {

template <execution_backend Inner = native>
struct tbb {
  using inner_type = Inner;
  static constexpr const char* name = "tbb";
  using memory_space = host_space;
  template <class T>
  using buffer = buffer_t<host_space, T>;
  using group = typename Inner::group;

  // Indices per task when a call gives no grain: enough work per task for cheap per-index bodies.
  static constexpr index default_grain = 1024;

  friend constexpr bool operator==(const tbb&, const tbb&) = default;
};

namespace tbb_detail {
template <class B>
inline constexpr bool is_tbb_v = false;
template <class Inner>
inline constexpr bool is_tbb_v<tbb<Inner>> = true;

// The two orders one parallel_for guarantees, stated to ThreadSanitizer (see the top of this file): the
// call happens before every block (the constructor, then block::begins) and every block before the
// return (block::ends, then joined). Blocks stay unordered among themselves, so a race between two
// blocks is still reported. A block gets the addresses by value, in the body TBB copies into its task,
// never by reading the caller's memory before its acquire. Empty outside TSan.
class fork_join_order {
 public:
#ifdef RESONANCE_TBB_TSAN
  struct block {
    char* sync;
    void begins() const { __tsan_acquire(sync); }
    void ends() const { __tsan_release(sync + 1); }
  };
  fork_join_order() : sync_(new char[2]) { __tsan_release(&sync_[0]); }
  block for_blocks() const { return {sync_.get()}; }
  void joined() const { __tsan_acquire(&sync_[1]); }

 private:
  std::unique_ptr<char[]> sync_;  // on the heap: freeing it clears TSan's clocks for these addresses
#else
  struct block {
    void begins() const {}
    void ends() const {}
  };
  block for_blocks() const { return {}; }
  void joined() const {}
#endif
};

// body(begin, end) over blocks of `grain` indices of [0, n), in parallel; one block runs inline.
template <class Body>
void blocks(index n, index grain, const Body& body) {
  if (n <= 0) return;
  if (grain <= 0) grain = tbb<>::default_grain;
  const index count = (n + grain - 1) / grain;
  if (count == 1) {
    body(index{0}, n);
    return;
  }
  const fork_join_order order;
  ::tbb::parallel_for(
      ::tbb::blocked_range<index>(0, count, 1),
      [&, block = order.for_blocks()](const ::tbb::blocked_range<index>& r) {
        block.begins();
        for (index b = r.begin(); b < r.end(); ++b) body(b * grain, b * grain + grain < n ? b * grain + grain : n);
        block.ends();
      },
      ::tbb::auto_partitioner{});
  order.joined();
}

// The lowest index any block proposes (an integer minimum: the result does not depend on the schedule).
class lowest {
 public:
  explicit lowest(index none) : value_(none) {}
  void propose(index i) {
    index current = value_.load(std::memory_order_relaxed);
    while (i < current && !value_.compare_exchange_weak(current, i, std::memory_order_relaxed)) {
    }
  }
  index get() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<index> value_;
};

// Rows per task of for_each_group: a row is a whole token's (or expert's) work.
inline constexpr index group_grain = 512;
// Below this many entries a scan runs on the calling thread.
inline constexpr index scan_serial_below = 1 << 16;
}  // namespace tbb_detail

template <class B>
concept tbb_backend = tbb_detail::is_tbb_v<B>;

template <tbb_backend B, class F>
void for_each(const B&, index n, const F& f, index grain = 0) {
  tbb_detail::blocks(n, grain, [&f](index begin, index end) { host::for_each(begin, end, f); });
}

template <tbb_backend B, class F>
index for_each_group(const B&, index n, index scratch_bytes, const F& f, index grain = 0) {
  tbb_detail::lowest bad(n);
  tbb_detail::blocks(n, grain > 0 ? grain : tbb_detail::group_grain, [&](index begin, index end) {
    if (const index i = host::for_each_group<typename B::group::rows>(begin, end, scratch_bytes, f); i < end)
      bad.propose(i);
  });
  return bad.get();
}

template <tbb_backend B, class F>
index reduce_min(const B&, index n, const F& f, index grain = 0) {
  tbb_detail::lowest m(no_index);
  tbb_detail::blocks(n, grain, [&](index begin, index end) { m.propose(host::reduce_min(begin, end, no_index, f)); });
  return m.get();
}

// Two passes over fixed blocks: block sums in parallel, a scan of the sums, then each block's scan.
template <tbb_backend B>
void exclusive_scan(const B&, const id_type* in, id_type* out, index n) {
  if (n < tbb_detail::scan_serial_below) {
    host::exclusive_scan(in, out, n);
    return;
  }
  constexpr index grain = tbb_detail::scan_serial_below / 4;
  const index count = (n + grain - 1) / grain;
  std::vector<id_type> sums(static_cast<std::size_t>(count + 1));
  tbb_detail::blocks(n, grain, [&](index begin, index end) {
    id_type s = 0;
    for (index i = begin; i < end; ++i) s += in[i];
    sums[static_cast<std::size_t>(begin / grain)] = s;
  });
  host::exclusive_scan(sums.data(), sums.data(), count);
  const id_type total = sums[static_cast<std::size_t>(count)];
  tbb_detail::blocks(n, grain, [&](index begin, index end) {
    id_type running = sums[static_cast<std::size_t>(begin / grain)];
    for (index i = begin; i < end; ++i) {
      const id_type v = in[i];
      out[i] = running;
      running += v;
    }
  });
  out[n] = total;
}

template <tbb_backend B>
index stable_bucket_workspace(const B&, index n, index nbins) {
  return detail::bucket_workspace(n, nbins);
}

template <tbb_backend B>
void stable_bucket(const B&, const id_type* keys, index n, index nbins, id_type* start, id_type* perm, void* work) {
  host::stable_bucket(keys, n, nbins, start, perm, work, [](index blocks, const auto& body) {
    tbb_detail::blocks(blocks, 1, [&](index begin, index end) { host::for_each(begin, end, body); });
  });
}

template <tbb_backend B>
index segmented_select_workspace(const B&, index, index) {
  return 0;
}

template <tbb_backend B>
void segmented_select(const B&, std::uint64_t* keys, const id_type* offsets, index nseg, index k, std::uint64_t* kth,
                      void*) {
  // About 16384 keys per task (a hint only): a small selection runs inline.
  const index keys_total = nseg > 0 ? offsets[nseg] - offsets[0] : 0;
  const index grain = std::max<index>(1, 16384 * nseg / (keys_total + 1));
  tbb_detail::blocks(nseg, grain, [&](index begin, index end) {
    for (index s = begin; s < end; ++s) host::select_segment(keys, offsets, s, k, kth);
  });
}

static_assert(execution_backend<tbb<>>);

// The fastest CPU backend, for a user who does not want to choose: oneTBB threads over rows vectorised
// for the CPU it runs on.
using cpu = tbb<native>;

}  // namespace resonance::backend
