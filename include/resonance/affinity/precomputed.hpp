#pragma once

#include "affinity.hpp"

namespace resonance::affinity {

// The caller's gate logits (T×E) are routed as given; a double input is converted to fp32 first.
struct precomputed {
  // Opt-in: the caller states that the logits are cosines in [-1, 1] (GrAP-cosine or cosine-gate
  // affinities computed elsewhere, at temperature 1). Nothing in the values can tell, so the capacity
  // schedulers that read logits as cosines (capacity::lower_bound estimating δ, capacity::adaptive)
  // refuse precomputed logits unless this is set. Routing itself does not depend on it.
  bool cosines = false;

  double cosine_scale() const { return cosines ? 1.0 : 0.0; }
  index experts_for(index cols) const { return cols; }
  void validate(index cols) const { detail::require(cols >= 1, "logits", "at least 1 column (expert)", cols); }

  template <execution_backend Backend, input_scalar T>
  matrix_view<const float> compute(const Backend& be, matrix_view<const T> x, std::vector<float>& storage) const {
    return detail::as_float(be, x, storage);
  }

  // The logits in the input's precision: a copy of x (the interface every affinity shares).
  template <execution_backend Backend, input_scalar T>
  void forward(const Backend& be, matrix_view<const T> x, matrix_view<T> logits) const {
    detail::check_matrix(x, "input");
    validate(x.cols);
    detail::check_matrix(logits, "logits", x.rows, x.cols);
    copy_rows(be, x, logits);
  }

  // The gradient of Σ dlogits ∘ logits with respect to x: dx = dlogits.
  template <execution_backend Backend, input_scalar T>
  void backward(const Backend& be, matrix_view<const T> x, matrix_view<const T> dlogits, matrix_view<T> dx) const {
    detail::check_matrix(x, "input");
    validate(x.cols);
    detail::check_matrix(dlogits, "dlogits", x.rows, x.cols);
    detail::check_matrix(dx, "dx", x.rows, x.cols);
    copy_rows(be, dlogits, dx);
  }

  friend constexpr bool operator==(const precomputed&, const precomputed&) = default;

 private:
  template <execution_backend Backend, input_scalar T>
  static void copy_rows(const Backend& be, matrix_view<const T> from, matrix_view<T> to) {
    for_each(be, from.rows, [=](index r) {
      for (index c = 0; c < from.cols; ++c) to(r, c) = from(r, c);
    });
  }
};

static_assert(affinity_policy<precomputed>);

}  // namespace resonance::affinity
