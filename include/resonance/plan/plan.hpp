#pragma once

// The routing plan: the one representation every stage after selection reads. Slots are expert-major:
// expert e owns slots [expert_offsets[e], expert_offsets[e+1]); within an expert, kept tokens come in
// ascending token order, then padding slots (token -1, weight 0). The token-major CSR lists each token's
// kept assignments ordered by expert id.
//
// A plan lives in a memory space (basic_routing_plan<Space>, plan_view<Space>): routing_plan is the host
// plan, and a device backend's route returns a plan in its own space, which to_host mirrors. Spans of a
// plan's arrays exist only where the host can read them, so host code cannot read device memory by
// mistake: it fails to compile.

#include <cstddef>
#include <cstring>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "../backend/execution.hpp"
#include "../core/config.hpp"

namespace resonance {

// Non-owning view of a plan in memory space Space (host pointers from routing_plan::view(), or device
// pointers of a device backend's plan). Trivially copyable; the raw members are usable in kernels.
template <class Space = host_space>
struct plan_view {
  using memory_space = Space;

  index num_tokens_ = 0;
  index num_experts_ = 0;
  index capacity_ = -1;
  index num_slots_ = 0;
  index num_assignments_ = 0;
  const id_type* expert_offsets_ = nullptr;  // E+1
  const id_type* expert_counts_ = nullptr;   // E
  const id_type* expert_demand_ = nullptr;   // E
  const id_type* slot_token_ = nullptr;      // S
  const float* slot_weight_ = nullptr;       // S
  const id_type* token_offsets_ = nullptr;   // T+1
  const id_type* token_expert_ = nullptr;    // nnz
  const float* token_weight_ = nullptr;      // nnz
  const id_type* token_slot_ = nullptr;      // nnz

  RESONANCE_HOST_DEVICE constexpr index num_tokens() const { return num_tokens_; }
  RESONANCE_HOST_DEVICE constexpr index num_experts() const { return num_experts_; }
  RESONANCE_HOST_DEVICE constexpr index capacity() const { return capacity_; }
  RESONANCE_HOST_DEVICE constexpr index num_slots() const { return num_slots_; }
  RESONANCE_HOST_DEVICE constexpr index num_assignments() const { return num_assignments_; }

  // Spans, for memory the host can read.
  std::span<const id_type> expert_offsets() const requires host_accessible_v<Space> {
    return span(expert_offsets_, num_experts_ + 1);
  }
  std::span<const id_type> expert_counts() const requires host_accessible_v<Space> {
    return span(expert_counts_, num_experts_);
  }
  std::span<const id_type> expert_demand() const requires host_accessible_v<Space> {
    return span(expert_demand_, num_experts_);
  }
  std::span<const id_type> slot_token() const requires host_accessible_v<Space> {
    return span(slot_token_, num_slots_);
  }
  std::span<const float> slot_weight() const requires host_accessible_v<Space> {
    return span(slot_weight_, num_slots_);
  }
  std::span<const id_type> token_offsets() const requires host_accessible_v<Space> {
    return span(token_offsets_, num_tokens_ + 1);
  }
  std::span<const id_type> token_expert() const requires host_accessible_v<Space> {
    return span(token_expert_, num_assignments_);
  }
  std::span<const float> token_weight() const requires host_accessible_v<Space> {
    return span(token_weight_, num_assignments_);
  }
  std::span<const id_type> token_slot() const requires host_accessible_v<Space> {
    return span(token_slot_, num_assignments_);
  }

 private:
  // A default (empty) view has null arrays: its spans are empty.
  template <class T>
  static std::span<const T> span(const T* p, index n) {
    return p == nullptr ? std::span<const T>{} : std::span<const T>{p, static_cast<std::size_t>(n)};
  }
};

namespace detail {
// A stage's temporaries, or a plan's arrays, carved from one allocation: each array at an offset
// aligned for any scalar.
class workspace_layout {
 public:
  // Reserves n objects of T; returns their byte offset.
  template <class T>
  index reserve(index n) {
    const index at = bytes_;
    bytes_ += (n * static_cast<index>(sizeof(T)) + 15) / 16 * 16;
    return at;
  }
  index bytes() const { return bytes_; }

 private:
  index bytes_ = 0;
};

template <class T>
RESONANCE_INLINE_FUNCTION T* at_offset(void* base, index offset) {
  return reinterpret_cast<T*>(static_cast<unsigned char*>(base) + offset);
}
template <class T>
RESONANCE_INLINE_FUNCTION const T* at_offset(const void* base, index offset) {
  return reinterpret_cast<const T*>(static_cast<const unsigned char*>(base) + offset);
}

// Where a plan's arrays lie in its one allocation, for T tokens, E experts and room for `slots` slots
// and `assignments` kept assignments (a route allocates the worst case before it runs).
struct plan_layout {
  index expert_offsets, expert_counts, expert_demand, slot_token, slot_weight, token_offsets, token_expert,
      token_weight, token_slot, bytes;

  plan_layout(index T, index E, index slots, index assignments) {
    workspace_layout l;
    expert_offsets = l.reserve<id_type>(E + 1);
    expert_counts = l.reserve<id_type>(E);
    expert_demand = l.reserve<id_type>(E);
    slot_token = l.reserve<id_type>(slots);
    slot_weight = l.reserve<float>(slots);
    token_offsets = l.reserve<id_type>(T + 1);
    token_expert = l.reserve<id_type>(assignments);
    token_weight = l.reserve<float>(assignments);
    token_slot = l.reserve<id_type>(assignments);
    bytes = l.bytes();
  }
};

// Owned storage of a plan in Space: its arrays in one allocation of the space (so a device plan is one
// allocation and mirrors to the host in one copy), laid out by plan_layout for the room it was
// allocated with. The counts say how much of each array is the plan.
template <class Space>
struct plan_data {
  index num_tokens = 0;
  index num_experts = 0;
  index capacity = -1;
  index num_slots = 0;
  index num_assignments = 0;
  index slot_room = 0;        // slots the storage has room for
  index assignment_room = 0;  // assignments the storage has room for
  buffer_t<Space, unsigned char> storage;

  plan_layout layout() const { return {num_tokens, num_experts, slot_room, assignment_room}; }
};

template <class Buffer>
auto* buffer_data(const Buffer& b) {
  return b.data();
}

// The host arrays of a plan, each at its exact size: what a reference implementation fills by hand
// (tests) before host_plan() packs it into a routing_plan.
struct plan_arrays {
  std::vector<id_type> expert_offsets, expert_counts, expert_demand, slot_token;
  std::vector<float> slot_weight;
  std::vector<id_type> token_offsets, token_expert;
  std::vector<float> token_weight;
  std::vector<id_type> token_slot;
};
}  // namespace detail

// Owning plan in memory space Space. Built by router::route or build_plan; read-only afterwards.
template <class Space = host_space>
class basic_routing_plan {
 public:
  using memory_space = Space;

  // The empty host plan: no tokens, no experts, offsets {0}.
  basic_routing_plan() {
    if constexpr (std::is_same_v<Space, host_space>) {
      d_.storage.resize(static_cast<std::size_t>(d_.layout().bytes));
      const detail::plan_layout l = d_.layout();
      *detail::at_offset<id_type>(d_.storage.data(), l.expert_offsets) = 0;
      *detail::at_offset<id_type>(d_.storage.data(), l.token_offsets) = 0;
    }
  }
  explicit basic_routing_plan(detail::plan_data<Space> data) : d_(std::move(data)) {}

  index num_tokens() const { return d_.num_tokens; }
  index num_experts() const { return d_.num_experts; }
  // Slots per expert before alignment; -1 when dropless.
  index capacity() const { return d_.capacity; }
  index num_slots() const { return d_.num_slots; }
  // Kept (token, expert) assignments.
  index num_assignments() const { return d_.num_assignments; }
  // (token, expert) candidates before capacity.
  index num_demanded() const requires host_accessible_v<Space> {
    index s = 0;
    for (id_type c : expert_demand()) s += c;
    return s;
  }
  index num_dropped() const requires host_accessible_v<Space> { return num_demanded() - num_assignments(); }

  std::span<const id_type> expert_offsets() const requires host_accessible_v<Space> { return view().expert_offsets(); }
  std::span<const id_type> expert_counts() const requires host_accessible_v<Space> { return view().expert_counts(); }
  std::span<const id_type> expert_demand() const requires host_accessible_v<Space> { return view().expert_demand(); }
  std::span<const id_type> slot_token() const requires host_accessible_v<Space> { return view().slot_token(); }
  std::span<const float> slot_weight() const requires host_accessible_v<Space> { return view().slot_weight(); }
  std::span<const id_type> token_offsets() const requires host_accessible_v<Space> { return view().token_offsets(); }
  std::span<const id_type> token_expert() const requires host_accessible_v<Space> { return view().token_expert(); }
  std::span<const float> token_weight() const requires host_accessible_v<Space> { return view().token_weight(); }
  std::span<const id_type> token_slot() const requires host_accessible_v<Space> { return view().token_slot(); }

  plan_view<Space> view() const {
    using detail::at_offset;
    const detail::plan_layout l = d_.layout();
    const void* base = d_.storage.data();
    if (base == nullptr) return {d_.num_tokens, d_.num_experts, d_.capacity, d_.num_slots, d_.num_assignments};
    return {d_.num_tokens,
            d_.num_experts,
            d_.capacity,
            d_.num_slots,
            d_.num_assignments,
            at_offset<id_type>(base, l.expert_offsets),
            at_offset<id_type>(base, l.expert_counts),
            at_offset<id_type>(base, l.expert_demand),
            at_offset<id_type>(base, l.slot_token),
            at_offset<float>(base, l.slot_weight),
            at_offset<id_type>(base, l.token_offsets),
            at_offset<id_type>(base, l.token_expert),
            at_offset<float>(base, l.token_weight),
            at_offset<id_type>(base, l.token_slot)};
  }

  // Bytes of the plan's one allocation.
  index storage_bytes() const { return static_cast<index>(d_.storage.size()); }

  operator plan_view<Space>() const { return view(); }

  // Bitwise equality of every array (weights compared exactly): the determinism tests use it.
  friend bool operator==(const basic_routing_plan& a, const basic_routing_plan& b) requires host_accessible_v<Space> {
    const auto same = [](auto x, auto y) { return x.size() == y.size() && std::equal(x.begin(), x.end(), y.begin()); };
    return a.num_tokens() == b.num_tokens() && a.num_experts() == b.num_experts() && a.capacity() == b.capacity() &&
           same(a.expert_offsets(), b.expert_offsets()) && same(a.expert_counts(), b.expert_counts()) &&
           same(a.expert_demand(), b.expert_demand()) && same(a.slot_token(), b.slot_token()) &&
           same(a.slot_weight(), b.slot_weight()) && same(a.token_offsets(), b.token_offsets()) &&
           same(a.token_expert(), b.token_expert()) && same(a.token_weight(), b.token_weight()) &&
           same(a.token_slot(), b.token_slot());
  }

  // The owned storage: the counts and the one allocation (to_host copies it whole).
  const detail::plan_data<Space>& raw() const { return d_; }
  // The same, for a route that writes into an existing plan's storage (router::route_into).
  detail::plan_data<Space>& raw() { return d_; }

 private:
  detail::plan_data<Space> d_;
};

// The host plan (DESIGN §4).
using routing_plan = basic_routing_plan<host_space>;

template <class Space>
plan_view(const basic_routing_plan<Space>&) -> plan_view<Space>;

namespace detail {
template <class Space>
constexpr plan_view<Space> as_plan_view(const plan_view<Space>& v) {
  return v;
}
template <class Space>
plan_view<Space> as_plan_view(const basic_routing_plan<Space>& p) {
  return p.view();
}
}  // namespace detail

// A plan or a view of one, in any memory space: what every function that reads a plan accepts (a
// template argument deduces neither conversion, so they take a plan_source and view it).
template <class P>
concept plan_source = requires(const P& p) {
  detail::as_plan_view(p);
};

template <plan_source P>
using plan_space_t = typename decltype(detail::as_plan_view(std::declval<const P&>()))::memory_space;

namespace detail {
// A host plan from arrays filled by hand, each at its exact size.
inline routing_plan host_plan(index T, index E, index capacity, const plan_arrays& a) {
  plan_data<host_space> d;
  d.num_tokens = T;
  d.num_experts = E;
  d.capacity = capacity;
  d.num_slots = d.slot_room = static_cast<index>(a.slot_token.size());
  d.num_assignments = d.assignment_room = static_cast<index>(a.token_expert.size());
  const plan_layout l = d.layout();
  d.storage.resize(static_cast<std::size_t>(l.bytes));
  void* base = d.storage.data();
  const auto put = [base](index at, const auto& v) {
    if (!v.empty()) std::memcpy(static_cast<unsigned char*>(base) + at, v.data(), v.size() * sizeof(v[0]));
  };
  put(l.expert_offsets, a.expert_offsets);
  put(l.expert_counts, a.expert_counts);
  put(l.expert_demand, a.expert_demand);
  put(l.slot_token, a.slot_token);
  put(l.slot_weight, a.slot_weight);
  put(l.token_offsets, a.token_offsets);
  put(l.token_expert, a.token_expert);
  put(l.token_weight, a.token_weight);
  put(l.token_slot, a.token_slot);
  return routing_plan(std::move(d));
}
}  // namespace detail

// A host copy of a plan in any memory space (a copy of a host plan).
template <execution_backend Backend, class Space>
routing_plan to_host(const Backend& be, const basic_routing_plan<Space>& plan) {
  if constexpr (std::is_same_v<Space, host_space>) {
    return plan;
  } else {
    // The same layout on the host: one copy of the whole allocation.
    const auto& src = plan.raw();
    detail::plan_data<host_space> d;
    d.num_tokens = src.num_tokens;
    d.num_experts = src.num_experts;
    d.capacity = src.capacity;
    d.num_slots = src.num_slots;
    d.num_assignments = src.num_assignments;
    d.slot_room = src.slot_room;
    d.assignment_room = src.assignment_room;
    d.storage.resize(src.storage.size());
    copy_to_host(be, d.storage.data(), src.storage.data(), static_cast<index>(src.storage.size()));
    fence(be);
    return routing_plan(std::move(d));
  }
}

}  // namespace resonance
