#pragma once

// device_backend: a test backend whose memory space the host may not read. Its data is host memory
// underneath (the primitives are scrambled_backend's, run in reverse order), but the types say
// "device": a buffer has data() and size() and nothing that reads an entry, plans and views of its
// space have no spans, and host data cannot be passed to it. So a stage that reads device data on the
// host, or passes host data to the device, fails to compile; a new buffer is filled with a garbage
// pattern, so a stage that reads an entry it never wrote gives a different plan; and the backend
// counts its allocations and its device-to-host copies, so a test can check what a route costs.

#include <cstddef>
#include <cstring>
#include <memory>

#include <resonance/resonance.hpp>

#include "backends.hpp"

namespace resonance_test {

struct sim_device_space {
  static constexpr const char* name = "sim-device";
};

// Host memory typed as device memory.
template <class T>
class sim_buffer {
 public:
  sim_buffer() = default;
  explicit sim_buffer(resonance::index n) : data_(new T[static_cast<std::size_t>(n)]), size_(n) {
    std::memset(static_cast<void*>(data_.get()), 0xA5, static_cast<std::size_t>(n) * sizeof(T));
  }
  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  std::size_t size() const { return static_cast<std::size_t>(size_); }

 private:
  std::shared_ptr<T[]> data_;  // shared: a plan (and its copies) may be copied like a device handle
  resonance::index size_ = 0;
};

struct device_counters {
  int allocations = 0;
  int copies_to_host = 0;
  int fences = 0;  // waits for the device
};

struct device_backend {
  static constexpr const char* name = "device";
  using memory_space = sim_device_space;
  template <class T>
  using buffer = sim_buffer<T>;
  using group = resonance::backend::host_group<resonance::detail::scalar_rows>;

  device_counters* counters = nullptr;  // optional

  template <class F>
  friend void for_each(const device_backend&, resonance::index n, const F& f, resonance::index grain = 0) {
    for_each(scrambled_backend{}, n, f, grain);
  }
  template <class F>
  friend resonance::index for_each_group(const device_backend&, resonance::index n, resonance::index bytes, const F& f,
                                         resonance::index grain = 0) {
    return for_each_group(scrambled_backend{}, n, bytes, f, grain);
  }
  template <class F>
  friend resonance::index reduce_min(const device_backend&, resonance::index n, const F& f,
                                     resonance::index grain = 0) {
    return reduce_min(scrambled_backend{}, n, f, grain);
  }
  template <class F>
  friend void reduce_min_into(const device_backend&, resonance::index n, const F& f, resonance::index* result,
                              resonance::index grain = 0) {
    *result = reduce_min(scrambled_backend{}, n, f, grain);
  }
  friend void exclusive_scan(const device_backend&, const resonance::id_type* in, resonance::id_type* out,
                             resonance::index n) {
    exclusive_scan(scrambled_backend{}, in, out, n);
  }
  friend resonance::index stable_bucket_workspace(const device_backend&, resonance::index n, resonance::index nbins) {
    return stable_bucket_workspace(scrambled_backend{}, n, nbins);
  }
  friend void stable_bucket(const device_backend&, const resonance::id_type* keys, resonance::index n,
                            resonance::index nbins, resonance::id_type* start, resonance::id_type* perm, void* work) {
    stable_bucket(scrambled_backend{}, keys, n, nbins, start, perm, work);
  }
  friend resonance::index segmented_select_workspace(const device_backend&, resonance::index n, resonance::index nseg) {
    return segmented_select_workspace(scrambled_backend{}, n, nseg);
  }
  friend void segmented_select(const device_backend&, std::uint64_t* keys, const resonance::id_type* offsets,
                               resonance::index nseg, resonance::index k, std::uint64_t* kth, void* work) {
    segmented_select(scrambled_backend{}, keys, offsets, nseg, k, kth, work);
  }
  template <class T>
  friend sim_buffer<T> allocate(const device_backend& be, resonance::index n) {
    if (be.counters != nullptr) ++be.counters->allocations;
    return sim_buffer<T>(n);
  }
  template <class T>
  friend void copy(const device_backend&, T* dst, const T* src, resonance::index n) {
    if (n > 0) std::memcpy(static_cast<void*>(dst), src, static_cast<std::size_t>(n) * sizeof(T));
  }
  template <class T>
  friend void copy_to_host(const device_backend& be, T* dst, const T* src, resonance::index n) {
    if (be.counters != nullptr) ++be.counters->copies_to_host;
    if (n > 0) std::memcpy(static_cast<void*>(dst), src, static_cast<std::size_t>(n) * sizeof(T));
  }
  friend void fence(const device_backend& be) {
    if (be.counters != nullptr) ++be.counters->fences;
  }
  friend bool operator==(const device_backend&, const device_backend&) = default;
};

}  // namespace resonance_test

template <>
struct resonance::space_traits<resonance_test::sim_device_space> {
  static constexpr bool host_accessible = false;
  template <class T>
  using buffer = resonance_test::sim_buffer<T>;
};

static_assert(resonance::execution_backend<resonance_test::device_backend>);
