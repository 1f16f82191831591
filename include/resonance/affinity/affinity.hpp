#pragma once

// The affinity axis: input rows (hidden states, or logits already computed by the caller) -> fp32
// T×E router logits.

#include <cmath>
#include <concepts>
#include <string>
#include <vector>

#include "../backend/backend.hpp"
#include "../core/concepts.hpp"
#include "../core/error.hpp"
#include "../core/view.hpp"

namespace resonance {

// An affinity policy says how many experts an input of `cols` columns routes to (experts_for), and
// validates itself against that width. Its compute(backend, x, storage) returns fp32 logits (possibly
// a view of x).
template <class A>
concept affinity_policy = policy_struct<A> && requires(const A& a, index cols) {
  { a.experts_for(cols) } -> std::convertible_to<index>;
  a.validate(cols);
};

// The element types affinity A takes as input: every input_scalar type, and bfloat16 for an affinity
// that declares accepts_bfloat16 (it reads each value as fp32 and sums in double).
template <class T, class A>
concept affinity_input = input_scalar<T> ||
    (std::same_as<std::remove_cv_t<T>, bfloat16>&& requires { requires A::accepts_bfloat16; });

// What a logit is to the capacity schedulers that read logits as cosines (capacity::lower_bound when
// it estimates δ, capacity::adaptive): the factor that turns a logit into cos(x_t, w_e) — 1 for
// grap_cosine, the temperature τ for cosine's cos/τ, 1 for precomputed logits declared as cosines —
// or 0 when the logits are not cosines (linear, grap, undeclared precomputed logits, any affinity
// that does not say). An affinity says it with a member `double cosine_scale() const`; the router
// passes it to the schedulers in capacity_context::cosine_scale.
template <class A>
double cosine_scale_of(const A& a) {
  if constexpr (requires {
                  { a.cosine_scale() } -> std::convertible_to<double>;
                }) {
    return static_cast<double>(a.cosine_scale());
  } else {
    (void)a;
    return 0.0;
  }
}

namespace detail {

// Converts (or views) an input matrix as fp32. A float input is returned as is, without a copy.
template <execution_backend Backend, input_scalar T>
matrix_view<const float> as_float(const Backend& be, matrix_view<const T> x, std::vector<float>& storage) {
  if constexpr (std::is_same_v<std::remove_cv_t<T>, float>) {
    return x;
  } else {
    storage.resize(static_cast<std::size_t>(x.rows * x.cols));
    float* out = storage.data();
    for_each(be, x.rows, [=](index r) {
      for (index c = 0; c < x.cols; ++c) out[r * x.cols + c] = static_cast<float>(x(r, c));
    });
    return {storage.data(), x.rows, x.cols, x.cols};
  }
}

// compute() for an affinity that has forward(be, x, logits) in the input's precision: a float (or
// bfloat16) input is written straight into the fp32 storage, a double one is computed in double, then
// rounded once.
template <class Affinity, execution_backend Backend, hidden_scalar T>
matrix_view<const float> compute_via_forward(const Affinity& a, const Backend& be, matrix_view<const T> x,
                                             std::vector<float>& storage) {
  using S = std::remove_cv_t<T>;
  const index rows = x.rows, E = a.experts_for(x.cols);
  storage.resize(static_cast<std::size_t>(rows * E));
  if constexpr (!std::is_same_v<S, double>) {
    a.forward(be, x, matrix_view<float>{storage.data(), rows, E, E});
  } else {
    std::vector<S> wide(static_cast<std::size_t>(rows * E));
    a.forward(be, x, matrix_view<S>{wide.data(), rows, E, E});
    for (std::size_t i = 0; i < wide.size(); ++i) storage[i] = static_cast<float>(wide[i]);
  }
  return {storage.data(), rows, E, E};
}

}  // namespace detail
}  // namespace resonance
