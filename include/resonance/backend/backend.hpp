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

namespace detail {
// The backend that runs work inside one block of B: a threaded wrapper's inner backend (tbb<Inner> ->
// Inner, which has the same row primitives), so nested work does not spawn threads; B itself otherwise.
template <class B>
struct block_backend {
  using type = B;
};
template <class B>
requires requires { typename B::inner_type; }
struct block_backend<B> {
  using type = typename block_backend<typename B::inner_type>::type;
};
template <class B>
using block_backend_t = typename block_backend<B>::type;

template <class B>
block_backend_t<B> block_backend_of(const B& be) {
  if constexpr (requires { typename B::inner_type; }) {
    return block_backend_t<B>{};  // the wrappers hold no inner instance
  } else {
    return be;
  }
}
}  // namespace detail

}  // namespace resonance
