#pragma once

// Shared by the tests that compare backends: every backend of the build, and a bitwise plan diff.

#include <algorithm>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include <resonance/resonance.hpp>

#if RESONANCE_HAS_SIMD
#include <resonance/backend/simd.hpp>
#endif
#if RESONANCE_HAS_TBB
#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/task_arena.h>

#include <resonance/backend/tbb.hpp>
#endif

namespace resonance_test {

// A test backend whose primitives run in reverse order, with reference implementations of its own (a
// std::stable_sort for the counting sort, a full sort for the selection): a result that depended on
// the order of the work, or on how serial's primitives are written, would differ from serial.
struct scrambled_backend {
  static constexpr const char* name = "scrambled";
  using memory_space = resonance::host_space;
  template <class T>
  using buffer = std::vector<T>;
  using group = resonance::backend::host_group<resonance::detail::scalar_rows>;

  template <class F>
  friend void for_each(const scrambled_backend&, resonance::index n, const F& f, resonance::index = 0) {
    for (resonance::index i = n - 1; i >= 0; --i) f(i);
  }
  template <class F>
  friend resonance::index for_each_group(const scrambled_backend&, resonance::index n, resonance::index bytes,
                                         const F& f) {
    resonance::index bad = n;
    for (resonance::index i = n - 1; i >= 0; --i) {
      resonance::backend::host_scratch scratch(bytes);
      if (f(group{scratch.get()}, i)) bad = i;
    }
    return bad;
  }
  template <class F>
  friend resonance::index reduce_min(const scrambled_backend&, resonance::index n, const F& f, resonance::index = 0) {
    resonance::index m = resonance::no_index;
    for (resonance::index i = n - 1; i >= 0; --i) m = std::min(m, static_cast<resonance::index>(f(i)));
    return m;
  }
  friend void exclusive_scan(const scrambled_backend&, const resonance::id_type* in, resonance::id_type* out,
                             resonance::index n) {
    std::vector<resonance::id_type> v(in, in + n);
    resonance::id_type s = 0;
    for (resonance::index i = 0; i < n; ++i) {
      out[i] = s;
      s += v[static_cast<std::size_t>(i)];
    }
    out[n] = s;
  }
  friend resonance::index stable_bucket_workspace(const scrambled_backend&, resonance::index, resonance::index) {
    return 0;
  }
  friend void stable_bucket(const scrambled_backend&, const resonance::id_type* keys, resonance::index n,
                            resonance::index nbins, resonance::id_type* start, resonance::id_type* perm, void*) {
    std::vector<resonance::id_type> order(static_cast<std::size_t>(n));
    for (resonance::index i = 0; i < n; ++i) order[static_cast<std::size_t>(i)] = static_cast<resonance::id_type>(i);
    std::stable_sort(order.begin(), order.end(), [&](auto a, auto b) { return keys[a] < keys[b]; });
    std::copy(order.begin(), order.end(), perm);
    for (resonance::index b = 0; b <= nbins; ++b)
      start[b] = static_cast<resonance::id_type>(
          std::lower_bound(order.begin(), order.end(), b, [&](auto i, resonance::index key) { return keys[i] < key; }) -
          order.begin());
  }
  friend resonance::index segmented_select_workspace(const scrambled_backend&, resonance::index, resonance::index) {
    return 0;
  }
  friend void segmented_select(const scrambled_backend&, std::uint64_t* keys, const resonance::id_type* offsets,
                               resonance::index nseg, resonance::index k, std::uint64_t* kth, void*) {
    for (resonance::index s = nseg - 1; s >= 0; --s) {
      if (k < 1 || offsets[s + 1] - offsets[s] <= k) continue;
      std::sort(keys + offsets[s], keys + offsets[s + 1], std::greater<>{});
      kth[s] = keys[offsets[s] + k - 1];
    }
  }
  template <class T>
  friend std::vector<T> allocate(const scrambled_backend&, resonance::index n) {
    return std::vector<T>(static_cast<std::size_t>(n));
  }
  template <class T>
  friend void copy(const scrambled_backend&, T* dst, const T* src, resonance::index n) {
    std::copy(src, src + n, dst);
  }
  template <class T>
  friend void copy_to_host(const scrambled_backend&, T* dst, const T* src, resonance::index n) {
    std::copy(src, src + n, dst);
  }
  friend void fence(const scrambled_backend&) {}
  friend bool operator==(const scrambled_backend&, const scrambled_backend&) = default;
};
static_assert(resonance::execution_backend<scrambled_backend>);

// The first field in which two plans differ (every span compared bit for bit), or "".
inline std::string plan_difference(const resonance::routing_plan& a, const resonance::routing_plan& b) {
  const auto same = [](auto x, auto y) {
    return x.size() == y.size() && (x.empty() || std::memcmp(x.data(), y.data(), x.size_bytes()) == 0);
  };
  if (a.num_tokens() != b.num_tokens()) return "num_tokens";
  if (a.num_experts() != b.num_experts()) return "num_experts";
  if (a.capacity() != b.capacity()) return "capacity";
  if (a.num_slots() != b.num_slots()) return "num_slots";
  if (!same(a.expert_offsets(), b.expert_offsets())) return "expert_offsets";
  if (!same(a.expert_counts(), b.expert_counts())) return "expert_counts";
  if (!same(a.expert_demand(), b.expert_demand())) return "expert_demand";
  if (!same(a.slot_token(), b.slot_token())) return "slot_token";
  if (!same(a.slot_weight(), b.slot_weight())) return "slot_weight";
  if (!same(a.token_offsets(), b.token_offsets())) return "token_offsets";
  if (!same(a.token_expert(), b.token_expert())) return "token_expert";
  if (!same(a.token_weight(), b.token_weight())) return "token_weight";
  if (!same(a.token_slot(), b.token_slot())) return "token_slot";
  return {};
}

// Calls f(backend, name) on every backend but serial: simd<>, then tbb<> and tbb<simd<>> inside task
// arenas of 1, 2 and 3 threads. The global limit is raised to 3 so that the 3-thread arena really
// runs 3 threads on a 2-core machine.
template <class F>
void for_each_parallel_backend([[maybe_unused]] F&& f) {
#if RESONANCE_HAS_SIMD
  f(resonance::backend::simd<>{}, std::string("simd<>"));
#endif
#if RESONANCE_HAS_TBB
  const tbb::global_control allow(tbb::global_control::max_allowed_parallelism, 3);
  for (int threads : {1, 2, 3}) {
    tbb::task_arena arena(threads);
    arena.execute([&] {
      f(resonance::backend::tbb<>{}, "tbb<> in an arena of " + std::to_string(threads));
#if RESONANCE_HAS_SIMD
      f(resonance::backend::tbb<resonance::backend::simd<>>{}, "tbb<simd<>> in an arena of " + std::to_string(threads));
#endif
    });
  }
#endif
}

// The same, serial first.
template <class F>
void for_each_backend(F&& f) {
  f(resonance::backend::serial{}, std::string("serial"));
  for_each_parallel_backend(f);
}

}  // namespace resonance_test
