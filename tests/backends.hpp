#pragma once

// Shared by the tests that compare backends: every backend of the build, and a bitwise plan diff.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

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

namespace resonance_test {

// A test backend whose primitives run in reverse order, with reference implementations of its own (a
// std::stable_sort for the counting sort, a full sort for the selection): a result that depended on
// the order of the work, or on how serial's primitives are written, would differ from serial.
struct scrambled_backend {
  static constexpr const char* name = "scrambled";
  using memory_space = resonance::host_space;
  template <class T>
  using buffer = resonance::host_buffer<T>;
  using group = resonance::backend::host_group<resonance::detail::scalar_rows>;

  template <class F>
  friend void for_each(const scrambled_backend&, resonance::index n, const F& f, resonance::index = 0) {
    for (resonance::index i = n - 1; i >= 0; --i) f(i);
  }
  template <class F>
  friend resonance::index for_each_group(const scrambled_backend&, resonance::index n, resonance::index bytes,
                                         const F& f, resonance::index = 0) {
    resonance::index bad = n;
    for (resonance::index i = n - 1; i >= 0; --i) {
      resonance::backend::host_scratch scratch(bytes);
      if constexpr (std::is_void_v<decltype(f(group{}, i))>) {
        f(group{scratch.get()}, i);
      } else if (f(group{scratch.get()}, i)) {
        bad = i;
      }
    }
    return bad;
  }
  template <class F>
  friend resonance::index reduce_min(const scrambled_backend&, resonance::index n, const F& f, resonance::index = 0) {
    resonance::index m = resonance::no_index;
    for (resonance::index i = n - 1; i >= 0; --i) m = std::min(m, static_cast<resonance::index>(f(i)));
    return m;
  }
  template <class F>
  friend void reduce_min_into(const scrambled_backend& be, resonance::index n, const F& f, resonance::index* result,
                              resonance::index grain = 0) {
    *result = reduce_min(be, n, f, grain);
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
  friend resonance::host_buffer<T> allocate(const scrambled_backend&, resonance::index n) {
    return resonance::host_buffer<T>(static_cast<std::size_t>(n));
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

// Where two plans first differ, or "": the field, and for an array the first index with both values
// ("slot_token[17]: 3 vs 5"). Every array is compared bit for bit, except that a weight_tolerance > 0
// lets weights differ by that much relative to the larger magnitude (DESIGN §3: 1e-6 for a backend
// that is not bitwise). Plans in any host-readable memory space (a host plan, a Kokkos host plan).
template <class SpaceA, class SpaceB>
requires(resonance::host_accessible_v<SpaceA>&& resonance::host_accessible_v<SpaceB>) std::string
    plan_difference(const resonance::basic_routing_plan<SpaceA>& a, const resonance::basic_routing_plan<SpaceB>& b,
                    double weight_tolerance = 0.0) {
  const auto scalar = [](const char* field, resonance::index x, resonance::index y) {
    return x == y ? std::string{} : std::string(field) + ": " + std::to_string(x) + " vs " + std::to_string(y);
  };
  // Bitwise (weights too unless a tolerance is given): the first index whose entries differ.
  const auto array = [weight_tolerance](const char* field, auto x, auto y) -> std::string {
    using T = typename decltype(x)::value_type;
    if (x.size() != y.size())
      return std::string(field) + ": " + std::to_string(x.size()) + " vs " + std::to_string(y.size()) + " entries";
    for (std::size_t i = 0; i < x.size(); ++i) {
      bool same = std::memcmp(&x[i], &y[i], sizeof(T)) == 0;
      if constexpr (std::is_floating_point_v<T>) {
        if (!same && weight_tolerance > 0.0) {
          const double u = x[i], v = y[i];
          same = std::fabs(u - v) <= weight_tolerance * std::max(std::fabs(u), std::fabs(v));
        }
      }
      if (!same) {
        std::ostringstream os;
        os.precision(9);
        os << field << "[" << i << "]: " << x[i] << " vs " << y[i];
        return os.str();
      }
    }
    return {};
  };
  for (const std::string& d :
       {scalar("num_tokens", a.num_tokens(), b.num_tokens()), scalar("num_experts", a.num_experts(), b.num_experts()),
        scalar("capacity", a.capacity(), b.capacity()), scalar("num_slots", a.num_slots(), b.num_slots()),
        scalar("num_assignments", a.num_assignments(), b.num_assignments()),
        array("expert_offsets", a.expert_offsets(), b.expert_offsets()),
        array("expert_counts", a.expert_counts(), b.expert_counts()),
        array("expert_demand", a.expert_demand(), b.expert_demand()),
        array("slot_token", a.slot_token(), b.slot_token()), array("slot_weight", a.slot_weight(), b.slot_weight()),
        array("token_offsets", a.token_offsets(), b.token_offsets()),
        array("token_expert", a.token_expert(), b.token_expert()),
        array("token_weight", a.token_weight(), b.token_weight()), array("token_slot", a.token_slot(), b.token_slot())})
    if (!d.empty()) return d;
  return {};
}

#if RESONANCE_HAS_NATIVE
// Restores backend::native's instruction set when a test leaves the scope that changed it.
class native_isa_guard {
 public:
  native_isa_guard() : saved_(resonance::native_isa()) {}
  ~native_isa_guard() { resonance::set_native_isa(saved_); }
  native_isa_guard(const native_isa_guard&) = delete;
  native_isa_guard& operator=(const native_isa_guard&) = delete;

 private:
  std::string saved_;
};
#endif

// Calls f(backend, name) on every backend but serial: simd<>, native on every instruction set this
// build and CPU have, then tbb<> (native rows, the CPU's best), tbb<serial> and tbb<simd<>> inside task
// arenas of 1, 2 and 3 threads (1 to RESONANCE_TEST_THREADS where a build sets it: the tsan tests run 1
// to 4). The global limit is raised to the largest arena so that it really runs that many threads on a
// 2-core machine.
#ifndef RESONANCE_TEST_THREADS
#define RESONANCE_TEST_THREADS 3
#endif
// tbb<serial> and tbb<simd<>> (0 in the asan-ubsan build: their code is tbb<>'s driver over serial's or
// simd<>'s rows, each tested there, and two more backends in every test would not fit CI's time).
#ifndef RESONANCE_TEST_LAYERED_TBB
#define RESONANCE_TEST_LAYERED_TBB 1
#endif
template <class F>
void for_each_parallel_backend([[maybe_unused]] F&& f) {
#if RESONANCE_HAS_SIMD
  f(resonance::backend::simd<>{}, std::string("simd<>"));
#endif
#if RESONANCE_HAS_NATIVE
  {
    const native_isa_guard guard;
    for (const std::string& isa : resonance::native_isas()) {
      resonance::set_native_isa(isa);
      f(resonance::backend::native{}, "native on " + isa);
    }
  }
#endif
#if RESONANCE_HAS_TBB
  const tbb::global_control allow(tbb::global_control::max_allowed_parallelism, RESONANCE_TEST_THREADS);
  for (int threads = 1; threads <= RESONANCE_TEST_THREADS; ++threads) {
    tbb::task_arena arena(threads);
    arena.execute([&] {
      f(resonance::backend::tbb<>{},
        "tbb<> (native on " + resonance::native_isa() + ") in an arena of " + std::to_string(threads));
#if RESONANCE_TEST_LAYERED_TBB
      f(resonance::backend::tbb<resonance::backend::serial>{}, "tbb<serial> in an arena of " + std::to_string(threads));
#if RESONANCE_HAS_SIMD
      f(resonance::backend::tbb<resonance::backend::simd<>>{}, "tbb<simd<>> in an arena of " + std::to_string(threads));
#endif
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

// Every host backend of the build (serial first), then scrambled_backend.
template <class F>
void for_each_backend_and_scrambled(F&& f) {
  for_each_backend(f);
  f(scrambled_backend{}, std::string("scrambled"));
}

}  // namespace resonance_test
