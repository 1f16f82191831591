#pragma once

// The routing-direction axis: turns a T×E score matrix into candidate (token, expert, weight) triples.

#include <algorithm>
#include <cmath>
#include <concepts>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "../backend/backend.hpp"
#include "../capacity/capacity.hpp"
#include "../core/concepts.hpp"
#include "../core/error.hpp"
#include "../core/view.hpp"
#include "../score/score.hpp"

namespace resonance {

namespace detail {
// A candidate set's arrays: std::vector on the host (callers build candidate sets for build_plan by
// hand), the space's owning buffer elsewhere.
template <class Space, class T>
using candidate_array = std::conditional_t<std::is_same_v<Space, host_space>, std::vector<T>, buffer_t<Space, T>>;
}  // namespace detail

// Candidate assignments before capacity in memory space Space, token-major CSR: token t's candidates
// are [offsets[t], offsets[t+1]), with strictly ascending expert ids. `priority` ranks candidates for
// drop_policy::score (higher is kept first); when empty, the weight is the priority. `demand`, when
// not empty, overrides the per-expert demand the plan reports (expert choice selects inside the
// direction: its candidates are already the kept pairs, while every token was a candidate).
// A direction sizes the arrays through its backend (detail::resize_array), so a device route keeps its
// candidates on the device.
template <class Space = host_space>
struct basic_candidate_set {
  using memory_space = Space;
  template <class T>
  using array = detail::candidate_array<Space, T>;

  index num_tokens = 0;
  index num_experts = 0;
  array<id_type> offsets = initial_offsets();
  array<id_type> expert;
  array<float> weight;
  array<float> priority;
  array<id_type> demand;
  // The drop policy the direction's definition implies (bidirectional ranks by priority, causal
  // variants keep position priority); it overrides the capacity policy's. Empty: the capacity's.
  std::optional<drop_policy> forced_drop;

  index size() const { return static_cast<index>(expert.size()); }
  const array<float>& ranking() const requires host_accessible_v<Space> {
    return priority.size() == 0 ? weight : priority;
  }

 private:
  static array<id_type> initial_offsets() {
    if constexpr (std::is_same_v<Space, host_space>) {
      return {0};
    } else {
      return {};
    }
  }
};

// The host candidate set (what build_plan takes from a caller).
using candidate_set = basic_candidate_set<host_space>;

namespace detail {
// Makes `a` hold n entries (their values unspecified), through the backend's allocation.
template <class Backend, class Array>
void resize_array(const Backend& be, Array& a, index n) {
  if constexpr (requires { a.resize(std::size_t{}); }) {
    a.resize(static_cast<std::size_t>(n));
  } else if (static_cast<index>(a.size()) != n) {
    a = allocate<typename std::remove_cvref_t<decltype(*a.data())>>(be, n);
  }
}

// Sizes `out` for k candidates per token of T tokens over E experts (no priority, counted demand, the
// capacity policy's drop): what a direction with a fixed number of candidates per token writes into.
template <class Backend, class Space>
void fixed_candidates(const Backend& be, basic_candidate_set<Space>& out, index T, index E, index k) {
  out.num_tokens = T;
  out.num_experts = E;
  resize_array(be, out.offsets, T + 1);
  resize_array(be, out.expert, T * k);
  resize_array(be, out.weight, T * k);
  resize_array(be, out.priority, 0);
  resize_array(be, out.demand, 0);
  out.forced_drop.reset();
}
}  // namespace detail

// Non-owning candidates in memory space Space, as the plan builder and the capacity schedulers read
// them: token-major CSR with strictly ascending expert ids per token. priority null: the weight ranks;
// demand null: counted.
template <class Space = host_space>
struct candidate_view {
  index num_tokens = 0;
  index num_experts = 0;
  index size = 0;
  const id_type* offsets = nullptr;  // T+1
  const id_type* expert = nullptr;
  const float* weight = nullptr;
  const float* priority = nullptr;
  const id_type* demand = nullptr;
  bool has_forced_drop = false;
  drop_policy forced_drop = drop_policy::score;
};

template <class Space>
candidate_view<Space> view_of(const basic_candidate_set<Space>& c) {
  return {c.num_tokens,
          c.num_experts,
          c.size(),
          c.offsets.data(),
          c.expert.data(),
          c.weight.data(),
          c.priority.size() == 0 ? nullptr : c.priority.data(),
          c.demand.size() == 0 ? nullptr : c.demand.data(),
          c.forced_drop.has_value(),
          c.forced_drop.value_or(drop_policy::score)};
}

// Candidate arrays in memory the caller provides, for a direction that proposes a fixed number of
// candidates per token (select_unchecked): a device route carves them from its one workspace instead
// of allocating them in the middle of the route. `priority` has room for one priority per candidate;
// the direction says whether it ranks by it.
template <class Space = host_space>
struct candidate_span {
  index num_tokens = 0;
  index num_experts = 0;
  index size = 0;
  id_type* offsets = nullptr;  // T+1
  id_type* expert = nullptr;
  float* weight = nullptr;
  float* priority = nullptr;
  bool ranks_by_priority = false;
  std::optional<drop_policy> forced_drop;
};

template <class Space>
candidate_view<Space> view_of(const candidate_span<Space>& c) {
  return {c.num_tokens,
          c.num_experts,
          c.size,
          c.offsets,
          c.expert,
          c.weight,
          c.ranks_by_priority ? c.priority : nullptr,
          nullptr,
          c.forced_drop.has_value(),
          c.forced_drop.value_or(drop_policy::score)};
}

namespace detail {
// The same candidates seen as host data, for a space the host can read (a Kokkos host space).
template <class Space>
candidate_view<host_space> host_view(const basic_candidate_set<Space>& c) {
  static_assert(host_accessible_v<Space>, "host code reads these candidates: they must be in host-readable memory");
  const candidate_view<Space> v = view_of(c);
  return {v.num_tokens, v.num_experts, v.size,   v.offsets,         v.expert,
          v.weight,     v.priority,    v.demand, v.has_forced_drop, v.forced_drop};
}

// Row r of a matrix in any space, on the host (an error path: the offending row for the message).
template <execution_backend Backend, class Space>
std::vector<float> host_row(const Backend& be, matrix_view<const float, Space> m, index r) {
  std::vector<float> row(static_cast<std::size_t>(m.cols));
  if (m.cols > 0) {
    if constexpr (host_accessible_v<Space>) {
      std::copy(m.row(r), m.row(r) + m.cols, row.begin());
    } else {
      copy_to_host(be, row.data(), m.row(r), m.cols);
      fence(be);
    }
  }
  return row;
}
// reduce_min's functor over tokens: t when one of its candidates has a non-finite weight or priority.
template <class Space>
struct nonfinite_candidates {
  candidate_view<Space> c;
  RESONANCE_HOST_DEVICE index operator()(index t) const {
    const float* rank = c.priority != nullptr ? c.priority : c.weight;
    bool ok = true;
    for (id_type i = c.offsets[t]; i < c.offsets[t + 1]; ++i)
      ok &= (c.weight[i] - c.weight[i]) == 0.0f && (rank[i] - rank[i]) == 0.0f;
    return ok ? no_index : t;
  }
};
template <class Space>
nonfinite_candidates(candidate_view<Space>) -> nonfinite_candidates<Space>;
}  // namespace detail

// A routing direction validates itself against E, says how many candidates a token proposes (the k
// of the capacity formula), and selects candidates from fp32 logits on a backend through an
// overload `select(backend, direction, logits, limits, candidates)` found by ADL. A direction whose
// selection needs the capacity (non-causal expert choice) says so with selects_with_capacity(); the
// others propose first, and the capacity policy may then read their proposals.
template <class D>
concept routing_policy = policy_struct<D> && requires(const D& d, index experts) {
  d.validate(experts);
  { d.candidates_per_token(experts) } -> std::convertible_to<index>;
};

namespace detail {
// The checks every direction shares: at least one expert, and 1 <= top_k <= E.
inline void check_top_k(index top_k, index num_experts) {
  require(num_experts >= 1, "num_experts", "at least 1 expert", num_experts);
  require(top_k >= 1 && top_k <= num_experts, "top_k",
          "1 <= top_k <= num_experts (" + std::to_string(num_experts) + ")", top_k);
}

// Logits are multiplied by 1 / temperature: a subnormal temperature would make that +Inf (and a zero
// logit NaN), so the reciprocal must be finite too.
inline void check_temperature(float temperature) {
  require(std::isfinite(temperature) && temperature > 0.0f && std::isfinite(1.0f / temperature), "temperature",
          "a finite value > 0 whose reciprocal is finite (at least about 2.94e-39)", temperature);
}

inline void check_score(resonance::score fn) {
  require(fn == resonance::score::softmax || fn == resonance::score::sigmoid || fn == resonance::score::sqrt_softplus ||
              fn == resonance::score::identity,
          "score", "softmax, sigmoid, sqrt_softplus or identity", static_cast<int>(fn));
}

// Whether a direction needs the capacity to select (then the router computes it first).
template <class D>
bool selects_with_capacity(const D& d) {
  if constexpr (requires { d.selects_with_capacity(); }) {
    return d.selects_with_capacity();
  } else {
    return false;
  }
}

// Whether a direction's select() rejects non-finite logits and weights itself (in its own pass over
// each row), so the router need not scan them separately.
template <class D>
inline constexpr bool checks_finite_v = requires {
  requires D::checks_finite;
};
}  // namespace detail

}  // namespace resonance
