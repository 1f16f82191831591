#pragma once

#include <exception>
#include <string>

#include <resonance/core/error.hpp>

namespace resonance_test {

// The message of the resonance::error that f throws, "no throw" when it returns, or a marker naming
// the other exception: tests compare messages, so every outcome is a distinct string.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const resonance::error& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("<not a resonance::error> ") + e.what();
  } catch (...) {
    return "<not a resonance::error>";
  }
  return "no throw";
}

}  // namespace resonance_test
