#pragma once

#include <concepts>
#include <type_traits>

#include "bfloat16.hpp"

namespace resonance {

// Element types accepted as routing input: scores are always computed in fp32, inputs may be wider.
template <class T>
concept input_scalar = std::same_as < std::remove_cv_t<T>,
float > || std::same_as<std::remove_cv_t<T>, double>;

// Element types of hidden states: the input_scalar types and bfloat16 (read as fp32).
template <class T>
concept hidden_scalar = input_scalar<T> || std::same_as<std::remove_cv_t<T>, bfloat16>;

// A policy is a small regular struct of parameters: copyable, default-constructible and comparable, so
// it can be designated-initialised, stored in a router and compared in tests.
template <class P>
concept policy_struct = std::regular<P> && std::is_aggregate_v<P>;

}  // namespace resonance
