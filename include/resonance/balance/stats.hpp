#pragma once

// Statistics of one routing step: load statistics of a plan (compute_stats), the entropy of the mean
// routing distribution (routing_entropy) and the Calinski-Harabasz index of token features grouped by
// assigned expert (calinski_harabasz). Every sum is accumulated in double in a fixed order, so results
// do not depend on the backend that built the plan.

#include <algorithm>
#include <cmath>
#include <concepts>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/config.hpp"
#include "../core/error.hpp"
#include "../core/view.hpp"
#include "../plan/plan.hpp"

namespace resonance::balance {

struct routing_stats {
  index capacity = -1;                 // -1 when dropless
  index demanded = 0;                  // candidate (token, expert) pairs before capacity
  index kept = 0;                      // assignments in the plan
  index dropped = 0;                   // demanded - kept
  index slots = 0;                     // buffer rows, padding included
  double drop_rate = 0.0;              // dropped / demanded
  double padding_fraction = 0.0;       // (slots - kept) / slots
  double mean_load = 0.0;              // mean kept tokens per expert
  double max_load = 0.0;               // largest kept count
  double load_cv = 0.0;                // population standard deviation / mean of kept counts
  double max_over_mean = 0.0;          // max_load / mean_load
  std::vector<id_type> expert_demand;  // per expert: choices before capacity (a copy of the plan's)
  std::vector<id_type> expert_kept;    // per expert: kept assignments (a copy of plan.expert_counts())
};

inline routing_stats compute_stats(const plan_view<>& plan) {
  routing_stats s;
  s.capacity = plan.capacity();
  for (id_type d : plan.expert_demand()) s.demanded += d;
  s.kept = plan.num_assignments();
  s.dropped = s.demanded - s.kept;
  s.slots = plan.num_slots();
  s.drop_rate = s.demanded > 0 ? static_cast<double>(s.dropped) / static_cast<double>(s.demanded) : 0.0;
  s.padding_fraction = s.slots > 0 ? static_cast<double>(s.slots - s.kept) / static_cast<double>(s.slots) : 0.0;
  const auto counts = plan.expert_counts();
  s.expert_demand.assign(plan.expert_demand().begin(), plan.expert_demand().end());
  s.expert_kept.assign(counts.begin(), counts.end());
  const double E = static_cast<double>(counts.size());
  if (E > 0) {
    double sum = 0.0, mx = 0.0;
    for (id_type c : counts) {
      sum += c;
      mx = std::max(mx, static_cast<double>(c));
    }
    s.mean_load = sum / E;
    s.max_load = mx;
    double var = 0.0;
    for (id_type c : counts) var += (c - s.mean_load) * (c - s.mean_load);
    var /= E;
    s.load_cv = s.mean_load > 0.0 ? std::sqrt(var) / s.mean_load : 0.0;
    s.max_over_mean = s.mean_load > 0.0 ? mx / s.mean_load : 0.0;
  }
  return s;
}

inline routing_stats compute_stats(const routing_plan& plan) { return compute_stats(plan.view()); }

// ---------------------------------------------------------------------------------------------------
// Entropy of the mean routing distribution.
//
// From scores: `scores` is the T x E matrix of each token's full score row (softmax probabilities, or
// sigmoid / sqrt_softplus scores, all E experts, before top-k and without the expert bias). Each row is
// normalised to sum 1 (s'_{t,e} = s_{t,e} / sum_j s_{t,j}, DeepSeek-V3's normalisation; a no-op for
// softmax rows), the rows are averaged, p_e = (1/T) sum_t s'_{t,e}, and the result is
// H = -sum_e p_e log p_e (natural log, 0 log 0 = 0). Scores must be finite, >= 0, with every row sum > 0.
//
// From a plan: p_e is expert e's share of the kept combine weight, p_e = (sum of kept weights to e) /
// (sum of all kept weights): the distribution the layer actually routes with, after top-k and capacity.
// Weights must be >= 0 (a negative weight is an error).
//
// normalised = true divides by log E, so that 1 is uniform and 0 is one expert taking everything; with
// E == 1 the entropy is 0 either way. No tokens (or zero total weight): 0.

namespace detail {

inline double entropy_of_mass(const std::vector<double>& mass, bool normalised) {
  double total = 0.0;
  for (double m : mass) total += m;
  if (!(total > 0.0)) return 0.0;
  double h = 0.0;
  for (double m : mass)
    if (m > 0.0) {
      const double p = m / total;
      h -= p * std::log(p);
    }
  h = std::max(h, 0.0);
  if (!normalised) return h;
  const double log_e = std::log(static_cast<double>(mass.size()));
  return log_e > 0.0 ? std::min(h / log_e, 1.0) : 0.0;
}

}  // namespace detail

template <class T>
requires std::same_as < std::remove_cv_t<T>,
float > ||
    std::same_as<std::remove_cv_t<T>, double> double routing_entropy(matrix_view<T> scores, bool normalised = false) {
  resonance::detail::check_matrix(scores, "scores");
  const index n = scores.rows, E = scores.cols;
  std::vector<double> mass(static_cast<std::size_t>(E), 0.0);
  std::vector<double> row(static_cast<std::size_t>(E));
  // Validate everything before computing (nothing to write, but a clear error beats a NaN).
  for (index t = 0; t < n; ++t) {
    double sum = 0.0;
    for (index e = 0; e < E; ++e) {
      const double v = static_cast<double>(scores(t, e));
      resonance::detail::require(std::isfinite(v) && v >= 0.0, "scores", "finite values >= 0", "scores(", t, ", ", e,
                                 ") = ", v);
      sum += v;
    }
    resonance::detail::require(sum > 0.0 && std::isfinite(sum), "scores", "rows with a finite positive sum", "row ", t,
                               " sums to ", sum);
  }
  for (index t = 0; t < n; ++t) {
    double sum = 0.0;
    for (index e = 0; e < E; ++e) sum += static_cast<double>(scores(t, e));
    for (index e = 0; e < E; ++e) mass[static_cast<std::size_t>(e)] += static_cast<double>(scores(t, e)) / sum;
  }
  return detail::entropy_of_mass(mass, normalised);
}

inline double routing_entropy(const plan_view<>& plan, bool normalised = false) {
  const index E = plan.num_experts();
  const auto offsets = plan.expert_offsets();
  const auto token = plan.slot_token();
  const auto weight = plan.slot_weight();
  std::vector<double> mass(static_cast<std::size_t>(E), 0.0);
  for (index e = 0; e < E; ++e)
    for (id_type s = offsets[static_cast<std::size_t>(e)]; s < offsets[static_cast<std::size_t>(e + 1)]; ++s) {
      const auto i = static_cast<std::size_t>(s);
      if (token[i] < 0) continue;  // padding
      const double w = static_cast<double>(weight[i]);
      resonance::detail::require(std::isfinite(w) && w >= 0.0, "plan", "finite kept weights >= 0", "slot ", s,
                                 " has weight ", w);
      mass[static_cast<std::size_t>(e)] += w;
    }
  return detail::entropy_of_mass(mass, normalised);
}

inline double routing_entropy(const routing_plan& plan, bool normalised = false) {
  return routing_entropy(plan.view(), normalised);
}

// ---------------------------------------------------------------------------------------------------
// Calinski-Harabasz index of token features grouped by assigned expert (ETR's specialisation measure,
// research/etr-spec.md §3.9).
//
// Clusters: C_e = the tokens kept by expert e (padding excluded). A token kept by several experts
// (top-k > 1) is a member of each of its clusters, i.e. each kept assignment is one point; tokens kept
// by none are excluded. N = number of points (= kept assignments), K = number of non-empty clusters,
// c_e = mean of C_e, c = mean of all N points (so that total = between + within holds exactly).
//   between B = sum_e n_e ||c_e - c||^2,  within W = sum_e sum_{x in C_e} ||x - c_e||^2.
//   ch_form::standard (default, Calinski & Harabasz 1974, sklearn): CH = (B / (K - 1)) / (W / (N - K)).
//   ch_form::paper (the ETR paper's formula, without the degrees-of-freedom factors): CH = B / W.
// Degenerate cases never give NaN: K < 2 -> 0; W == 0 (this includes N == K) -> +inf when B > 0, and 0
// when B == 0 (every point identical). (sklearn returns 1 when W == 0.)
// Features: T x d (float or double, finite), T == plan.num_tokens().

enum class ch_form : unsigned char {
  standard,  // with (N - K) / (K - 1)
  paper,     // B / W
};

template <class T>
requires std::same_as < std::remove_cv_t<T>,
float > ||
    std::same_as<std::remove_cv_t<T>, double> double calinski_harabasz(matrix_view<T> features, const plan_view<>& plan,
                                                                       ch_form form = ch_form::standard) {
  resonance::detail::check_matrix(features, "features");
  resonance::detail::require(features.rows == plan.num_tokens(), "features",
                             std::to_string(plan.num_tokens()) + " rows (one per token of the plan)", features.rows);
  resonance::detail::require(form == ch_form::standard || form == ch_form::paper, "form", "standard or paper",
                             static_cast<int>(form));
  const index d = features.cols, E = plan.num_experts();
  for (index t = 0; t < features.rows; ++t)
    for (index j = 0; j < d; ++j)
      resonance::detail::require(std::isfinite(static_cast<double>(features(t, j))), "features", "finite values",
                                 "features(", t, ", ", j, ") = ", static_cast<double>(features(t, j)));
  const auto offsets = plan.expert_offsets();
  const auto token = plan.slot_token();
  const auto sz = [](index i) { return static_cast<std::size_t>(i); };

  // Cluster sums and sizes, in expert-major slot order (tokens ascending within an expert).
  std::vector<double> centroid(sz(E * d), 0.0);
  std::vector<double> count(sz(E), 0.0);
  for (index e = 0; e < E; ++e)
    for (id_type s = offsets[sz(e)]; s < offsets[sz(e + 1)]; ++s) {
      const id_type t = token[static_cast<std::size_t>(s)];
      if (t < 0) continue;
      count[sz(e)] += 1.0;
      for (index j = 0; j < d; ++j) centroid[sz(e * d + j)] += static_cast<double>(features(t, j));
    }
  double n_points = 0.0;
  index k_clusters = 0;
  std::vector<double> grand(sz(d), 0.0);
  for (index e = 0; e < E; ++e) {
    if (count[sz(e)] == 0.0) continue;
    ++k_clusters;
    n_points += count[sz(e)];
    for (index j = 0; j < d; ++j) grand[sz(j)] += centroid[sz(e * d + j)];
  }
  if (k_clusters < 2) return 0.0;
  for (index j = 0; j < d; ++j) grand[sz(j)] /= n_points;
  double between = 0.0;
  for (index e = 0; e < E; ++e) {
    if (count[sz(e)] == 0.0) continue;
    double dist2 = 0.0;
    for (index j = 0; j < d; ++j) {
      double& c = centroid[sz(e * d + j)];
      c /= count[sz(e)];
      dist2 += (c - grand[sz(j)]) * (c - grand[sz(j)]);
    }
    between += count[sz(e)] * dist2;
  }
  double within = 0.0;
  for (index e = 0; e < E; ++e)
    for (id_type s = offsets[sz(e)]; s < offsets[sz(e + 1)]; ++s) {
      const id_type t = token[static_cast<std::size_t>(s)];
      if (t < 0) continue;
      for (index j = 0; j < d; ++j) {
        const double diff = static_cast<double>(features(t, j)) - centroid[sz(e * d + j)];
        within += diff * diff;
      }
    }
  if (!(within > 0.0)) return between > 0.0 ? std::numeric_limits<double>::infinity() : 0.0;
  if (form == ch_form::paper) return between / within;
  const double K = static_cast<double>(k_clusters);
  return (between / (K - 1.0)) / (within / (n_points - K));
}

template <class T>
requires std::same_as < std::remove_cv_t<T>,
float > || std::same_as<std::remove_cv_t<T>, double> double calinski_harabasz(matrix_view<T> features,
                                                                              const routing_plan& plan,
                                                                              ch_form form = ch_form::standard) {
  return calinski_harabasz(features, plan.view(), form);
}

}  // namespace resonance::balance
