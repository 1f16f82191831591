#pragma once

// The routing plan: the one representation every stage after selection reads. Slots are expert-major:
// expert e owns slots [expert_offsets[e], expert_offsets[e+1]); within an expert, kept tokens come in
// ascending token order, then padding slots (token -1, weight 0). The token-major CSR lists each token's
// kept assignments ordered by expert id.

#include <span>
#include <utility>
#include <vector>

#include "../core/config.hpp"

namespace resonance {

// Non-owning view of a plan in any memory space (host pointers from routing_plan::view(), or device
// pointers filled by a device backend). Trivially copyable; the raw members are usable in kernels.
struct plan_view {
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

  std::span<const id_type> expert_offsets() const { return {expert_offsets_, size(num_experts_ + 1)}; }
  std::span<const id_type> expert_counts() const { return {expert_counts_, size(num_experts_)}; }
  std::span<const id_type> expert_demand() const { return {expert_demand_, size(num_experts_)}; }
  std::span<const id_type> slot_token() const { return {slot_token_, size(num_slots_)}; }
  std::span<const float> slot_weight() const { return {slot_weight_, size(num_slots_)}; }
  std::span<const id_type> token_offsets() const { return {token_offsets_, size(num_tokens_ + 1)}; }
  std::span<const id_type> token_expert() const { return {token_expert_, size(num_assignments_)}; }
  std::span<const float> token_weight() const { return {token_weight_, size(num_assignments_)}; }
  std::span<const id_type> token_slot() const { return {token_slot_, size(num_assignments_)}; }

 private:
  static constexpr std::size_t size(index n) { return static_cast<std::size_t>(n); }
};

namespace detail {
// Owned storage of a plan; filled by the plan builder.
struct plan_data {
  index num_tokens = 0;
  index num_experts = 0;
  index capacity = -1;
  std::vector<id_type> expert_offsets{0};
  std::vector<id_type> expert_counts;
  std::vector<id_type> expert_demand;
  std::vector<id_type> slot_token;
  std::vector<float> slot_weight;
  std::vector<id_type> token_offsets{0};
  std::vector<id_type> token_expert;
  std::vector<float> token_weight;
  std::vector<id_type> token_slot;
};
}  // namespace detail

// Owning host plan. Built by router::route or build_plan; read-only afterwards.
class routing_plan {
 public:
  routing_plan() = default;
  explicit routing_plan(detail::plan_data data) : d_(std::move(data)) {}

  index num_tokens() const { return d_.num_tokens; }
  index num_experts() const { return d_.num_experts; }
  // Slots per expert before alignment; -1 when dropless.
  index capacity() const { return d_.capacity; }
  index num_slots() const { return static_cast<index>(d_.slot_token.size()); }
  // Kept (token, expert) assignments.
  index num_assignments() const { return static_cast<index>(d_.token_expert.size()); }
  // (token, expert) candidates before capacity.
  index num_demanded() const {
    index s = 0;
    for (id_type c : d_.expert_demand) s += c;
    return s;
  }
  index num_dropped() const { return num_demanded() - num_assignments(); }

  std::span<const id_type> expert_offsets() const { return d_.expert_offsets; }
  std::span<const id_type> expert_counts() const { return d_.expert_counts; }
  std::span<const id_type> expert_demand() const { return d_.expert_demand; }
  std::span<const id_type> slot_token() const { return d_.slot_token; }
  std::span<const float> slot_weight() const { return d_.slot_weight; }
  std::span<const id_type> token_offsets() const { return d_.token_offsets; }
  std::span<const id_type> token_expert() const { return d_.token_expert; }
  std::span<const float> token_weight() const { return d_.token_weight; }
  std::span<const id_type> token_slot() const { return d_.token_slot; }

  plan_view view() const {
    return {d_.num_tokens,
            d_.num_experts,
            d_.capacity,
            num_slots(),
            num_assignments(),
            d_.expert_offsets.data(),
            d_.expert_counts.data(),
            d_.expert_demand.data(),
            d_.slot_token.data(),
            d_.slot_weight.data(),
            d_.token_offsets.data(),
            d_.token_expert.data(),
            d_.token_weight.data(),
            d_.token_slot.data()};
  }
  operator plan_view() const { return view(); }

  // Bitwise equality of every array (weights compared exactly): the determinism tests use it.
  friend bool operator==(const routing_plan& a, const routing_plan& b) {
    const auto& x = a.d_;
    const auto& y = b.d_;
    return x.num_tokens == y.num_tokens && x.num_experts == y.num_experts && x.capacity == y.capacity &&
           x.expert_offsets == y.expert_offsets && x.expert_counts == y.expert_counts &&
           x.expert_demand == y.expert_demand && x.slot_token == y.slot_token && x.slot_weight == y.slot_weight &&
           x.token_offsets == y.token_offsets && x.token_expert == y.token_expert && x.token_weight == y.token_weight &&
           x.token_slot == y.token_slot;
  }

 private:
  detail::plan_data d_;
};

}  // namespace resonance
