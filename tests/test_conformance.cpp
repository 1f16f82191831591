// The conformance suite (tests/conformance.hpp) on every host backend of the build: serial against
// itself (the suite's own sanity: a route must be deterministic), simd<>, tbb<> and tbb<simd<>> in
// arenas of 1, 2 and 3 threads, and scrambled_backend (every primitive in reverse order, with reference
// implementations of its own).

#include <string>

#include <doctest/doctest.h>

#include <resonance/resonance.hpp>

#include "backends.hpp"
#include "conformance.hpp"

namespace {

TEST_CASE("conformance: every host backend routes the random cases as serial does") {
  resonance_test::for_each_backend(
      [](const auto& be, const std::string& name) { resonance_test::check_conformance(be, name); });
}

TEST_CASE("conformance: scrambled_backend routes the random cases as serial does") {
  resonance_test::check_conformance(resonance_test::scrambled_backend{}, "scrambled");
}

}  // namespace
