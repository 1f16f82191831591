#pragma once

#include "execution.hpp"

namespace resonance::backend {

// The reference backend: one thread, ascending order. Every other backend must produce the same plan.
struct serial {
  static constexpr const char* name = "serial";
  using memory_space = host_space;
  template <class T>
  using buffer = buffer_t<host_space, T>;
  using group = host_group<detail::scalar_rows>;

  friend constexpr bool operator==(const serial&, const serial&) = default;
};

// One thread in ascending order: serial, and simd<Arch> (the same execution with vectorised rows).
template <class B>
inline constexpr bool sequential_host_v = std::is_same_v<B, serial>;

template <class B>
concept sequential_host_backend = sequential_host_v<B>;

template <sequential_host_backend B, class F>
void for_each(const B&, index n, const F& f, index /*grain*/ = 0) {
  host::for_each(0, n, f);
}

template <sequential_host_backend B, class F>
index for_each_group(const B&, index n, index scratch_bytes, const F& f, index /*grain*/ = 0) {
  return host::for_each_group<typename B::group::rows>(0, n, scratch_bytes, f);
}

template <sequential_host_backend B, class F>
index reduce_min(const B&, index n, const F& f, index /*grain*/ = 0) {
  return host::reduce_min(0, n, no_index, f);
}

template <sequential_host_backend B>
void exclusive_scan(const B&, const id_type* in, id_type* out, index n) {
  host::exclusive_scan(in, out, n);
}

template <sequential_host_backend B>
index stable_bucket_workspace(const B&, index n, index nbins) {
  return detail::bucket_workspace(n, nbins);
}

template <sequential_host_backend B>
void stable_bucket(const B&, const id_type* keys, index n, index nbins, id_type* start, id_type* perm, void* work) {
  host::stable_bucket(keys, n, nbins, start, perm, work, [](index blocks, const auto& body) {
    for (index b = 0; b < blocks; ++b) body(b);
  });
}

template <sequential_host_backend B>
index segmented_select_workspace(const B&, index, index) {
  return 0;
}

template <sequential_host_backend B>
void segmented_select(const B&, std::uint64_t* keys, const id_type* offsets, index nseg, index k, std::uint64_t* kth,
                      void*) {
  for (index s = 0; s < nseg; ++s) host::select_segment(keys, offsets, s, k, kth);
}

static_assert(execution_backend<serial>);

}  // namespace resonance::backend
