#pragma once

// Shared by the libFuzzer targets of fuzz/: a reader that turns the fuzzer's bytes into shapes, options
// and values, the host backends a plan is compared across, and the one way a target reports a finding
// (a message on stderr, then abort(), which libFuzzer records as a crash with its input).

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <string>

#include <resonance/resonance.hpp>

#if RESONANCE_HAS_SIMD
#include <resonance/backend/simd.hpp>
#endif
#if RESONANCE_HAS_NATIVE
#include <resonance/backend/native.hpp>
#endif
#if RESONANCE_HAS_TBB
#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/task_arena.h>

#include <resonance/backend/tbb.hpp>
#endif

namespace resonance_fuzz {

using resonance::id_type;
using resonance::index;

// A finding: the message, then abort(), so that libFuzzer saves the input as a crash.
[[noreturn]] inline void finding(const std::string& what) {
  std::fprintf(stderr, "resonance fuzz finding: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

inline void require(bool ok, const std::string& what) {
  if (!ok) finding(what);
}

// The fuzzer's bytes, read front to back. Past the end every structural read gives 0 (the first, usual
// choice of each pick),
// while value() continues with a seeded generator on the finite grid, so that a short input can still
// describe a large, routable batch.
class byte_source {
 public:
  byte_source(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {
    for (std::size_t i = 0; i < size; ++i) state_ = (state_ ^ data[i]) * 0x100000001b3ull;
  }

  bool exhausted() const { return pos_ >= size_; }

  std::uint8_t byte() { return pos_ < size_ ? data_[pos_++] : std::uint8_t{0}; }

  // A value in [0, n), n >= 1: one byte when n <= 256, two otherwise.
  index below(index n) {
    if (n <= 1) return 0;
    index raw = byte();
    if (n > 256) raw = raw << 8 | byte();  // two statements: the order of the reads is fixed
    return raw % n;
  }

  // True once in n; false past the end, where every read takes the common branch.
  bool one_in(index n) { return below(n) == n - 1; }

  template <class T>
  T pick(std::initializer_list<T> values) {
    return *(values.begin() + below(static_cast<index>(values.size())));
  }

  std::uint64_t u64() {
    std::uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v = v << 8 | byte();
    return v;
  }

  // One input value. Most bytes give a point of a coarse grid (exact ties, signed zeros), some a large
  // one; the rest the values a router must reject or survive: raw bit patterns, NaN, ±Inf, ±3e38
  // (finite, but overflows once scaled), a denormal, -0.
  float value() {
    if (exhausted()) {
      state_ ^= state_ << 13;
      state_ ^= state_ >> 7;
      state_ ^= state_ << 17;
      return grid(static_cast<std::uint8_t>(state_ % 192));
    }
    const std::uint8_t b = byte();
    if (b < 192) return grid(b);
    if (b < 224) return static_cast<float>(static_cast<int>(b) - 208) * 1024.0f;
    if (b < 240) {
      std::uint32_t bits = 0;
      for (int i = 0; i < 4; ++i) bits = bits << 8 | byte();
      return std::bit_cast<float>(bits);
    }
    constexpr float inf = std::numeric_limits<float>::infinity();
    constexpr std::array<float, 16> special = {std::numeric_limits<float>::quiet_NaN(),
                                               inf,
                                               -inf,
                                               3e38f,
                                               -3e38f,
                                               1e-40f,
                                               -0.0f,
                                               0.0f,
                                               std::numeric_limits<float>::min(),
                                               std::numeric_limits<float>::max(),
                                               -std::numeric_limits<float>::max(),
                                               std::numeric_limits<float>::epsilon(),
                                               1.0f,
                                               -1.0f,
                                               88.0f,
                                               -104.0f};
    return special[b - 240];
  }

 private:
  // 48 grid points of step 1/8 around 0, repeated: b and b + 48 give the same value (ties).
  static float grid(std::uint8_t b) { return static_cast<float>(static_cast<int>(b % 48) - 24) * 0.125f; }

  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
  std::uint64_t state_ = 0xcbf29ce484222325ull;
};

// Calls f(backend, name) on every host backend of the build: serial first (the reference), then
// simd<>, native (the CPU's best instruction set), tbb<> and tbb<simd<>>. The threaded ones run in an
// arena of 3 threads (above the 2 cores of the CI machine, so that tasks interleave), as the
// conformance suite's largest arena does.
template <class F>
void for_each_host_backend(F&& f) {
  f(resonance::backend::serial{}, "serial");
#if RESONANCE_HAS_SIMD
  f(resonance::backend::simd<>{}, "simd<>");
#endif
#if RESONANCE_HAS_NATIVE
  f(resonance::backend::native{}, "native");
#endif
#if RESONANCE_HAS_TBB
  static const tbb::global_control allow(tbb::global_control::max_allowed_parallelism, 3);
  static tbb::task_arena arena(3);
  arena.execute([&] {
    f(resonance::backend::tbb<>{}, "tbb<>");
#if RESONANCE_HAS_SIMD
    f(resonance::backend::tbb<resonance::backend::simd<>>{}, "tbb<simd<>>");
#endif
  });
#endif
}

// Bitwise equality of two trivially copyable values (a scheduler's state; NaN equals itself).
template <class T>
bool same_bits(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

}  // namespace resonance_fuzz
