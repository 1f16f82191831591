#pragma once

// The backend axis. A backend only executes: it runs a body over blocks of an index range. Algorithms
// are written once against this interface, so a plan is the same whichever backend runs it, provided
// each block's work is independent of how the range was split (every algorithm here guarantees that).

#include <atomic>
#include <concepts>

#include "../core/config.hpp"

namespace resonance {

namespace detail {
// A block body for the concept check (a named type: nvcc rejects a lambda inside a requires-expression).
struct block_body_archetype {
  void operator()(index, index) const {}
};

// The lowest index any block proposes: a parallel "first offending row" that does not depend on how
// blocks were scheduled, so every backend reports the same error.
class first_index {
 public:
  explicit first_index(index none) : value_(none) {}
  void propose(index i) {
    index current = value_.load(std::memory_order_relaxed);
    while (i < current && !value_.compare_exchange_weak(current, i, std::memory_order_relaxed)) {
    }
  }
  index get() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<index> value_;
};
}  // namespace detail

template <class B>
concept execution_backend = std::copyable<B> && requires(const B& b, detail::block_body_archetype body) {
  { B::name } -> std::convertible_to<const char*>;
  { b.concurrency() } -> std::convertible_to<index>;
  b.parallel_for_blocks(index{}, index{}, body);
};

}  // namespace resonance
