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
// Owned storage of a plan in Space; filled by the plan builder. The counts say how much of each array
// is the plan (a device plan's arrays may be allocated for the worst case before the route).
template <class Space>
struct plan_data {
  index num_tokens = 0;
  index num_experts = 0;
  index capacity = -1;
  index num_slots = 0;
  index num_assignments = 0;
  buffer_t<Space, id_type> expert_offsets;
  buffer_t<Space, id_type> expert_counts;
  buffer_t<Space, id_type> expert_demand;
  buffer_t<Space, id_type> slot_token;
  buffer_t<Space, float> slot_weight;
  buffer_t<Space, id_type> token_offsets;
  buffer_t<Space, id_type> token_expert;
  buffer_t<Space, float> token_weight;
  buffer_t<Space, id_type> token_slot;
};

template <class Buffer>
auto* buffer_data(const Buffer& b) {
  return b.data();
}
}  // namespace detail

// Owning plan in memory space Space. Built by router::route or build_plan; read-only afterwards.
template <class Space = host_space>
class basic_routing_plan {
 public:
  using memory_space = Space;

  basic_routing_plan() {
    if constexpr (std::is_same_v<Space, host_space>) {
      d_.expert_offsets.assign(1, 0);
      d_.token_offsets.assign(1, 0);
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
    using detail::buffer_data;
    return {d_.num_tokens,
            d_.num_experts,
            d_.capacity,
            d_.num_slots,
            d_.num_assignments,
            buffer_data(d_.expert_offsets),
            buffer_data(d_.expert_counts),
            buffer_data(d_.expert_demand),
            buffer_data(d_.slot_token),
            buffer_data(d_.slot_weight),
            buffer_data(d_.token_offsets),
            buffer_data(d_.token_expert),
            buffer_data(d_.token_weight),
            buffer_data(d_.token_slot)};
  }
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

// A host copy of a plan in any memory space (a copy of a host plan).
template <execution_backend Backend, class Space>
routing_plan to_host(const Backend& be, const basic_routing_plan<Space>& plan) {
  if constexpr (std::is_same_v<Space, host_space>) {
    return plan;
  } else {
    const plan_view<Space> v = plan.view();
    detail::plan_data<host_space> d;
    d.num_tokens = v.num_tokens();
    d.num_experts = v.num_experts();
    d.capacity = v.capacity();
    d.num_slots = v.num_slots();
    d.num_assignments = v.num_assignments();
    const auto mirror = [&](auto& dst, const auto* src, index n) {
      dst.resize(static_cast<std::size_t>(n));
      if (n > 0) copy_to_host(be, dst.data(), src, n);
    };
    mirror(d.expert_offsets, v.expert_offsets_, v.num_experts() + 1);
    mirror(d.expert_counts, v.expert_counts_, v.num_experts());
    mirror(d.expert_demand, v.expert_demand_, v.num_experts());
    mirror(d.slot_token, v.slot_token_, v.num_slots());
    mirror(d.slot_weight, v.slot_weight_, v.num_slots());
    mirror(d.token_offsets, v.token_offsets_, v.num_tokens() + 1);
    mirror(d.token_expert, v.token_expert_, v.num_assignments());
    mirror(d.token_weight, v.token_weight_, v.num_assignments());
    mirror(d.token_slot, v.token_slot_, v.num_assignments());
    fence(be);
    return routing_plan(std::move(d));
  }
}

}  // namespace resonance
