#pragma once

// Small random-input helpers shared by the core, dispatch/export, affinity, loss and error tests.
// Everything is seeded, so a failure reproduces.

#include <cstdint>
#include <random>
#include <vector>

#include <resonance/resonance.hpp>

namespace resonance_test {

inline std::size_t usz(resonance::index n) { return static_cast<std::size_t>(n); }

// n values drawn uniformly from `set`: a small set gives many exact ties.
inline std::vector<float> draw_from(std::mt19937_64& rng, resonance::index n, const std::vector<float>& set) {
  std::uniform_int_distribution<std::size_t> pick(0, set.size() - 1);
  std::vector<float> v(usz(n));
  for (float& x : v) x = set[pick(rng)];
  return v;
}

// n values on the grid step * {-half, ..., half}: ties are exact, and distinct values differ by at
// least `step`, so no comparison is a near tie that fp32 and double could order differently.
inline std::vector<float> grid_values(std::mt19937_64& rng, resonance::index n, int half, float step) {
  std::uniform_int_distribution<int> pick(-half, half);
  std::vector<float> v(usz(n));
  for (float& x : v) x = static_cast<float>(pick(rng)) * step;
  return v;
}

// n standard-normal values scaled by `scale`.
template <class T = float>
std::vector<T> normal_values(std::mt19937_64& rng, resonance::index n, double scale = 1.0) {
  std::normal_distribution<double> dist(0.0, scale);
  std::vector<T> v(usz(n));
  for (T& x : v) x = static_cast<T>(dist(rng));
  return v;
}

// A rows×cols matrix stored with `stride` columns per row; the gap columns hold `fill`.
template <class T>
std::vector<T> strided_normal(std::mt19937_64& rng, resonance::index rows, resonance::index cols,
                              resonance::index stride, T fill = T(0)) {
  std::normal_distribution<double> dist(0.0, 1.0);
  std::vector<T> v(usz(rows * stride), fill);
  for (resonance::index r = 0; r < rows; ++r)
    for (resonance::index c = 0; c < cols; ++c) v[usz(r * stride + c)] = static_cast<T>(dist(rng));
  return v;
}

}  // namespace resonance_test
