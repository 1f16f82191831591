#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace resonance {

// Every precondition failure of the public API. The message names the argument and what was expected,
// and the call that throws has written nothing to its outputs.
class error : public std::invalid_argument {
 public:
  explicit error(const std::string& what) : std::invalid_argument(what) {}
};

namespace detail {

template <class... Got>
[[noreturn]] void fail(std::string_view argument, std::string_view expected, const Got&... got) {
  std::ostringstream os;
  os << "resonance: " << argument << ": expected " << expected;
  if constexpr (sizeof...(Got) > 0) {
    os << ", got ";
    (os << ... << got);
  }
  throw error(os.str());
}

// require(cond, "top_k", "1 <= top_k <= num_experts (8)", k) throws when cond is false.
template <class... Got>
void require(bool condition, std::string_view argument, std::string_view expected, const Got&... got) {
  if (!condition) fail(argument, expected, got...);
}

}  // namespace detail
}  // namespace resonance
