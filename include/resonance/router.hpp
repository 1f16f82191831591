#pragma once

// router<Affinity, Direction, Capacity>: one routing step composed from three policies. The backend
// is passed first to every call; the overload without it runs on backend::serial.

#include <cmath>
#include <limits>
#include <vector>

#include "affinity/affinity.hpp"
#include "backend/serial.hpp"
#include "capacity/capacity.hpp"
#include "core/view.hpp"
#include "plan/build.hpp"
#include "routing/routing.hpp"

namespace resonance {

template <affinity_policy Affinity, routing_policy Direction, capacity_policy Capacity>
struct router {
  using affinity_type = Affinity;
  using direction_type = Direction;
  using capacity_type = Capacity;

  Affinity affinity{};
  Direction direction{};
  Capacity capacity{};

  // Validates the policies against an input of `cols` columns; returns the number of experts.
  index validate(index cols) const {
    affinity.validate(cols);
    const index E = affinity.experts_for(cols);
    direction.validate(E);
    capacity.validate();
    return E;
  }

  // The fp32 router logits for x (a view of x itself for precomputed float logits).
  template <execution_backend Backend, input_scalar T>
  matrix_view<const float> logits(const Backend& be, matrix_view<const T> x, std::vector<float>& storage) const {
    detail::check_matrix(x, "input");
    validate(x.cols);
    const matrix_view<const float> l = affinity.compute(be, x, storage);
    detail::check_finite(l, "logits");
    return l;
  }

  // One routing step with a stateless capacity policy.
  template <execution_backend Backend, input_scalar T>
  requires stateless_capacity_policy<Capacity> routing_plan route(const Backend& be, matrix_view<const T> x)
  const {
    return route_impl(be, x, [&](const capacity_context& ctx) {
      return capacity.limits(ctx.num_tokens, ctx.num_experts, ctx.top_k);
    });
  }

  // One routing step with a stateful scheduler: `state` (owned by the caller) is read and advanced,
  // and left untouched when the call throws.
  template <execution_backend Backend, input_scalar T>
  requires stateful_capacity_policy<Capacity> routing_plan route(const Backend& be, matrix_view<const T> x,
                                                                 capacity_state_t<Capacity>& state)
  const {
    capacity_state_t<Capacity> next = state;
    routing_plan plan = route_impl(be, x, [&](const capacity_context& ctx) { return capacity.limits(ctx, next); });
    state = next;
    return plan;
  }

  template <execution_backend Backend, input_scalar T>
  requires stateful_capacity_policy<Capacity> routing_plan route(const Backend& be, matrix_view<T> x,
                                                                 capacity_state_t<Capacity>& state)
  const { return route(be, matrix_view<const T>(x), state); }

  template <execution_backend Backend, input_scalar T>
  requires stateless_capacity_policy<Capacity> routing_plan route(const Backend& be, matrix_view<T> x)
  const { return route(be, matrix_view<const T>(x)); }

  template <class T>
  requires stateless_capacity_policy<Capacity> routing_plan route(matrix_view<T> x)
  const { return route(backend::serial{}, matrix_view<const T>(x)); }

  friend constexpr bool operator==(const router&, const router&) = default;

 private:
  template <execution_backend Backend, input_scalar T, class LimitsFn>
  routing_plan route_impl(const Backend& be, matrix_view<const T> x, LimitsFn&& limits_of) const {
    detail::check_matrix(x, "input");
    const index E = validate(x.cols);
    const index T_ = x.rows;
    const index k = direction.candidates_per_token(E);
    detail::require(
        static_cast<double>(T_) * static_cast<double>(k) < static_cast<double>(std::numeric_limits<id_type>::max()),
        "input", "num_tokens * top_k < 2^31", T_, " tokens x ", k);
    std::vector<float> storage;
    const matrix_view<const float> l = affinity.compute(be, x, storage);
    // A direction that checks finiteness inside its selection pass saves two passes here.
    constexpr bool self_checked = detail::checks_finite_v<Direction>;
    if constexpr (!self_checked) detail::check_finite(l, "logits");
    capacity_context ctx{T_, E, k, x.cols, l, nullptr};
    capacity_limits lim;
    candidate_set cands;
    if (detail::selects_with_capacity(direction)) {
      lim = limits_of(ctx);
      detail::check_limits(lim);
      select(be, direction, l, lim, cands);
    } else {
      // Propose first; the capacity policy may read the proposals (a scheduler's statistics).
      select(be, direction, l, capacity_limits{}, cands);
      ctx.candidates = &cands;
      lim = limits_of(ctx);
      detail::check_limits(lim);
    }
    // Finite logits can still overflow fp32 once divided by a tiny temperature or scaled by a huge
    // scaling factor: a NaN or Inf weight must not reach the plan.
    if constexpr (!self_checked) {
      const auto sz = [](index n) { return static_cast<std::size_t>(n); };
      for (index t = 0; t < cands.num_tokens; ++t)
        for (index i = cands.offsets[sz(t)]; i < cands.offsets[sz(t + 1)]; ++i)
          detail::require(std::isfinite(cands.weight[sz(i)]) && std::isfinite(cands.ranking()[sz(i)]), "routing weight",
                          "a finite fp32 value (logits / temperature or weight * scaling_factor overflowed)",
                          cands.weight[sz(i)], " for token ", t);
    }
    detail::check_slot_budget(E, cands.size(), lim);
    return detail::build_plan_unchecked(be, cands, lim);
  }
};

}  // namespace resonance
