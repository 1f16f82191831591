#pragma once

// The backend axis. A backend only executes: it runs a body over blocks of an index range. Algorithms
// are written once against this interface, so a plan is the same whichever backend runs it, provided
// each block's work is independent of how the range was split (every algorithm here guarantees that).

#include <concepts>

#include "../core/config.hpp"

namespace resonance {

template <class B>
concept execution_backend = std::copyable<B> && requires(const B& b) {
  { B::name } -> std::convertible_to<const char*>;
  { b.concurrency() } -> std::convertible_to<index>;
  b.parallel_for_blocks(index{}, index{}, [](index, index) {});
};

}  // namespace resonance
