#pragma once

#include <cmath>
#include <span>
#include <type_traits>

#include "config.hpp"
#include "error.hpp"
#include "space.hpp"

namespace resonance {

// Non-owning row-major 2-D view {data, rows, cols, stride} of memory in Space; stride defaults to cols.
// Trivially copyable, usable in device code, and an aggregate so that `matrix_view<const float>{p, T, E}`
// works. A host function takes matrix_view<T> (host_space), so a device view passed to it does not
// compile.
template <class T, class Space = host_space>
struct matrix_view {
  using element_type = T;
  using value_type = std::remove_cv_t<T>;
  using memory_space = Space;

  T* data = nullptr;
  index rows = 0;
  index cols = 0;
  index stride = cols;

  RESONANCE_HOST_DEVICE constexpr T* row(index r) const { return data + r * stride; }
  RESONANCE_HOST_DEVICE constexpr T& operator()(index r, index c) const { return data[r * stride + c]; }
  RESONANCE_HOST_DEVICE constexpr index size() const { return rows * cols; }
  RESONANCE_HOST_DEVICE constexpr bool empty() const { return rows == 0 || cols == 0; }

  // matrix_view<float> converts to matrix_view<const float>, in the same space.
  template <class U = T>
  requires(!std::is_const_v<U>) RESONANCE_HOST_DEVICE constexpr operator matrix_view<const U, Space>() const {
    return {data, rows, cols, stride};
  }

  friend constexpr bool operator==(const matrix_view&, const matrix_view&) = default;
};

// Non-owning 1-D view {data, size}, the device-usable counterpart of std::span (regular, comparable by
// identity, so policies holding one stay std::regular).
template <class T>
struct vector_view {
  using element_type = T;
  using value_type = std::remove_cv_t<T>;

  T* data = nullptr;
  index size = 0;

  RESONANCE_HOST_DEVICE constexpr T& operator[](index i) const { return data[i]; }
  RESONANCE_HOST_DEVICE constexpr bool empty() const { return size == 0; }

  template <class U = T>
  requires(!std::is_const_v<U>) RESONANCE_HOST_DEVICE constexpr operator vector_view<const U>() const {
    return {data, size};
  }

  std::span<T> span() const { return {data, static_cast<std::size_t>(size)}; }

  friend constexpr bool operator==(const vector_view&, const vector_view&) = default;
};

template <class T>
vector_view<T> make_vector_view(std::span<T> s) {
  return {s.data(), static_cast<index>(s.size())};
}

namespace detail {

// Shape check shared by every entry point; `name` is the argument name used in the error. It reads no
// element, so it takes a view in any space.
template <class T, class Space>
void check_matrix(const matrix_view<T, Space>& m, std::string_view name) {
  require(m.rows >= 0 && m.cols >= 0, name, "non-negative rows and cols", m.rows, "x", m.cols);
  require(m.stride >= m.cols, name, "stride >= cols", "stride ", m.stride, " with cols ", m.cols);
  require(m.data != nullptr || m.rows == 0 || m.cols == 0, name, "non-null data for a non-empty matrix");
}

template <class T, class Space>
void check_matrix(const matrix_view<T, Space>& m, std::string_view name, index rows, index cols) {
  check_matrix(m, name);
  require(m.rows == rows && m.cols == cols, name,
          std::string("shape ") + std::to_string(rows) + "x" + std::to_string(cols), m.rows, "x", m.cols);
}

// NaN or Inf anywhere in m is an error naming the first offending entry (it would make every top-k
// order and every loss meaningless). `first_row` is the row number of m's first row in the caller's
// matrix, for the message.
template <class T>
void check_finite(matrix_view<const T> m, std::string_view name, index first_row = 0) {
  for (index r = 0; r < m.rows; ++r) {
    const T* p = m.row(r);
    for (index c = 0; c < m.cols; ++c)
      if (!std::isfinite(static_cast<double>(p[c])))
        fail(name, "finite values", p[c], " at row ", first_row + r, ", column ", c);
  }
}

}  // namespace detail
}  // namespace resonance
