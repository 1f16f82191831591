#pragma once

// backend::tbb<Inner>: oneTBB threads over the same blocks the serial backend visits (block b covers
// [b·grain, min(n, (b+1)·grain))), so a block's work, and therefore the plan, cannot depend on the
// thread count or on the schedule. Inner supplies the row primitives: backend::tbb<> is threads with
// the scalar reference rows, backend::tbb<backend::simd<>> is threads with vectorised rows. The thread
// count is the calling task arena's (limit it with tbb::task_arena or tbb::global_control).
// This header is the only one that includes oneTBB.

#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/partitioner.h>
#include <oneapi/tbb/task_arena.h>

#include "backend.hpp"
#include "rows.hpp"
#include "serial.hpp"

namespace resonance::backend {

template <execution_backend Inner = serial>
struct tbb {
  using inner_type = Inner;
  using row_ops = detail::row_ops_t<Inner>;
  static constexpr const char* name = "tbb";

  index concurrency() const { return static_cast<index>(::tbb::this_task_arena::max_concurrency()); }

  template <class Body>
  void parallel_for_blocks(index n, index grain, Body&& body) const {
    if (n <= 0) return;
    if (grain <= 0) grain = n;
    const index blocks = (n + grain - 1) / grain;
    if (blocks == 1) {
      body(index{0}, n);
      return;
    }
    ::tbb::parallel_for(
        ::tbb::blocked_range<index>(0, blocks, 1),
        [&](const ::tbb::blocked_range<index>& r) {
          for (index b = r.begin(); b < r.end(); ++b) body(b * grain, b * grain + grain < n ? b * grain + grain : n);
        },
        ::tbb::auto_partitioner{});
  }

  friend constexpr bool operator==(const tbb&, const tbb&) = default;
};

static_assert(execution_backend<tbb<>>);

}  // namespace resonance::backend
