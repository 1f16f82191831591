#pragma once

// Statistics of one routing step: load statistics of a plan (compute_stats), the entropy of the mean
// routing distribution (routing_entropy) and the Calinski-Harabasz index of token features grouped by
// assigned expert (calinski_harabasz). Every sum is accumulated in double in a fixed order, so results
// do not depend on the backend that built the plan, nor on the backend that computes them.
//
// Each statistic is written once on the execution primitives (backend/execution.hpp) and takes a
// backend first; the overloads without one run on backend::serial. The plan may be in any memory space
// the backend can read (its raw arrays are read in the functors); score and feature matrices are host
// views, so those statistics need a backend that can read host memory. Results are host values: the
// per-expert sums are copied to the host, which finishes the O(E) arithmetic.

#include <algorithm>
#include <cmath>
#include <concepts>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../backend/backend.hpp"
#include "../backend/serial.hpp"
#include "../core/concepts.hpp"
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

// Load statistics of a plan in any memory space: its per-expert demand and kept counts are copied to
// the host (they are returned), and the rest is O(E) host arithmetic on them, in expert order.
template <execution_backend Backend, plan_source Plan>
routing_stats compute_stats(const Backend& be, const Plan& source) {
  using Space = plan_space_t<Plan>;
  const plan_view<Space> plan = detail::as_plan_view(source);
  static_assert(accessible_from_v<Space, memory_space_t<Backend>>, "the plan must be in memory the backend can read");
  routing_stats s;
  const index E = plan.num_experts();
  s.expert_demand.resize(static_cast<std::size_t>(E));
  s.expert_kept.resize(static_cast<std::size_t>(E));
  if (E > 0) {
    copy_to_host(be, s.expert_demand.data(), plan.expert_demand_, E);
    copy_to_host(be, s.expert_kept.data(), plan.expert_counts_, E);
    fence(be);
  }
  s.capacity = plan.capacity();
  for (id_type d : s.expert_demand) s.demanded += d;
  s.kept = plan.num_assignments();
  s.dropped = s.demanded - s.kept;
  s.slots = plan.num_slots();
  s.drop_rate = s.demanded > 0 ? static_cast<double>(s.dropped) / static_cast<double>(s.demanded) : 0.0;
  s.padding_fraction = s.slots > 0 ? static_cast<double>(s.slots - s.kept) / static_cast<double>(s.slots) : 0.0;
  const std::vector<id_type>& counts = s.expert_kept;
  if (E > 0) {
    const double En = static_cast<double>(E);
    double sum = 0.0, mx = 0.0;
    for (id_type c : counts) {
      sum += c;
      mx = std::max(mx, static_cast<double>(c));
    }
    s.mean_load = sum / En;
    s.max_load = mx;
    double var = 0.0;
    for (id_type c : counts) var += (c - s.mean_load) * (c - s.mean_load);
    var /= En;
    s.load_cv = s.mean_load > 0.0 ? std::sqrt(var) / s.mean_load : 0.0;
    s.max_over_mean = s.mean_load > 0.0 ? mx / s.mean_load : 0.0;
  }
  return s;
}

inline routing_stats compute_stats(const plan_view<>& plan) { return compute_stats(backend::serial{}, plan); }

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

// From scores, the rows are summed per fixed chunk of stats_block tokens in token order (one group per
// chunk, which also validates its rows), then the chunks in order; from a plan, each expert sums its
// kept slots in slot order (one item per expert). The validation errors are those of a check of every
// row (or slot) in order: the lowest failing chunk (or slot) is found on the backend, and the message
// built on the host.

}  // namespace resonance::balance

namespace resonance::detail {

// Tokens per chunk of the token sums of the statistics (fixed: it is the summation order).
inline constexpr index stats_block = 1024;

template <class Backend>
constexpr void check_stats_host_matrix() {
  static_assert(accessible_from_v<host_space, memory_space_t<Backend>>,
                "this statistic reads a host matrix (matrix_view is a host view): it needs a backend that can "
                "read host memory");
}

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

// The validation of score rows [begin, end), in order: throws at the first offending entry or row.
template <class T>
void check_score_rows(matrix_view<T> scores, index begin, index end) {
  for (index t = begin; t < end; ++t) {
    double sum = 0.0;
    for (index e = 0; e < scores.cols; ++e) {
      const double v = static_cast<double>(scores(t, e));
      require(std::isfinite(v) && v >= 0.0, "scores", "finite values >= 0", "scores(", t, ", ", e, ") = ", v);
      sum += v;
    }
    require(sum > 0.0 && std::isfinite(sum), "scores", "rows with a finite positive sum", "row ", t, " sums to ", sum);
  }
}

}  // namespace resonance::detail

namespace resonance::balance {

template <execution_backend Backend, input_scalar T>
double routing_entropy(const Backend& be, matrix_view<T> scores, bool normalised = false) {
  detail::check_stats_host_matrix<Backend>();
  detail::check_matrix(scores, "scores");
  const index n = scores.rows, E = scores.cols, B = detail::stats_block;
  const index chunks = (n + B - 1) / B;
  auto work = allocate<double>(be, chunks * E + E);  // per-chunk masses, then the total
  double* const part = work.data();
  double* const mass = part + chunks * E;
  const index bad = for_each_group(
      be, chunks, 0,
      [=](const auto&, index c) {
        double* acc = part + c * E;
        for (index e = 0; e < E; ++e) acc[e] = 0.0;
        const index end = (c + 1) * B < n ? (c + 1) * B : n;
        for (index t = c * B; t < end; ++t) {
          const auto* row = scores.row(t);
          double sum = 0.0;
          for (index e = 0; e < E; ++e) {
            const double v = static_cast<double>(row[e]);
            if (!((v - v) == 0.0 && v >= 0.0)) return true;
            sum += v;
          }
          if (!(sum > 0.0 && (sum - sum) == 0.0)) return true;
          for (index e = 0; e < E; ++e) acc[e] += static_cast<double>(row[e]) / sum;
        }
        return false;
      },
      index{1});
  if (bad < chunks) detail::check_score_rows(scores, bad * B, std::min(n, (bad + 1) * B));
  for_each(be, E, [=](index e) {
    double m = 0.0;
    for (index c = 0; c < chunks; ++c) m += part[c * E + e];
    mass[e] = m;
  });
  std::vector<double> host(static_cast<std::size_t>(E));
  if (E > 0) copy_to_host(be, host.data(), mass, E);
  fence(be);
  return detail::entropy_of_mass(host, normalised);
}

template <input_scalar T>
double routing_entropy(matrix_view<T> scores, bool normalised = false) {
  return routing_entropy(backend::serial{}, scores, normalised);
}

template <execution_backend Backend, plan_source Plan>
double routing_entropy(const Backend& be, const Plan& source, bool normalised = false) {
  using Space = plan_space_t<Plan>;
  const plan_view<Space> plan = detail::as_plan_view(source);
  static_assert(accessible_from_v<Space, memory_space_t<Backend>>, "the plan must be in memory the backend can read");
  const index E = plan.num_experts();
  auto mass_buf = allocate<double>(be, E);
  auto bad_buf = allocate<index>(be, E);
  double* const mass = mass_buf.data();
  index* const first_bad = bad_buf.data();
  const id_type* const offsets = plan.expert_offsets_;
  const id_type* const token = plan.slot_token_;
  const float* const weight = plan.slot_weight_;
  // Each expert's kept weight in slot order, and its first kept slot whose weight is not finite and >= 0.
  for_each(
      be, E,
      [=](index e) {
        double m = 0.0;
        index bad = no_index;
        for (id_type s = offsets[e]; s < offsets[e + 1]; ++s) {
          if (token[s] < 0) continue;  // padding
          const double w = static_cast<double>(weight[s]);
          if (!((w - w) == 0.0 && w >= 0.0)) {
            if (bad == no_index) bad = s;
            continue;
          }
          m += w;
        }
        mass[e] = m;
        first_bad[e] = bad;
      },
      index{1});
  const index bad = reduce_min(be, E, [=](index e) { return first_bad[e]; });
  if (bad != no_index) {
    float w = 0.0f;
    copy_to_host(be, &w, weight + bad, 1);
    fence(be);
    detail::fail("plan", "finite kept weights >= 0", "slot ", static_cast<id_type>(bad), " has weight ",
                 static_cast<double>(w));
  }
  std::vector<double> host(static_cast<std::size_t>(E));
  if (E > 0) copy_to_host(be, host.data(), mass, E);
  fence(be);
  return detail::entropy_of_mass(host, normalised);
}

inline double routing_entropy(const plan_view<>& plan, bool normalised = false) {
  return routing_entropy(backend::serial{}, plan, normalised);
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

// On the primitives: one item per expert sums its cluster (its kept slots in slot order), the grand
// mean runs per feature over the experts in order, and one item per expert then forms its centroid,
// its between-cluster term and its within-cluster sum (its slots in order); the E terms are added in
// expert order on one item. The host reads back N, K, B and W.
template <execution_backend Backend, input_scalar T, plan_source Plan>
double calinski_harabasz(const Backend& be, matrix_view<T> features, const Plan& source,
                         ch_form form = ch_form::standard) {
  using Space = plan_space_t<Plan>;
  const plan_view<Space> plan = detail::as_plan_view(source);
  detail::check_stats_host_matrix<Backend>();
  static_assert(accessible_from_v<Space, memory_space_t<Backend>>, "the plan must be in memory the backend can read");
  detail::check_matrix(features, "features");
  detail::require(features.rows == plan.num_tokens(), "features",
                  std::to_string(plan.num_tokens()) + " rows (one per token of the plan)", features.rows);
  detail::require(form == ch_form::standard || form == ch_form::paper, "form", "standard or paper",
                  static_cast<int>(form));
  const index d = features.cols, E = plan.num_experts(), Tn = features.rows;
  const index bad_row = reduce_min(be, Tn, [=](index t) {
    const auto* row = features.row(t);
    bool ok = true;
    for (index j = 0; j < d; ++j) ok &= (static_cast<double>(row[j]) - static_cast<double>(row[j])) == 0.0;
    return ok ? no_index : t;
  });
  if (bad_row != no_index)
    for (index j = 0; j < d; ++j)
      detail::require(std::isfinite(static_cast<double>(features(bad_row, j))), "features", "finite values",
                      "features(", bad_row, ", ", j, ") = ", static_cast<double>(features(bad_row, j)));
  const id_type* const offsets = plan.expert_offsets_;
  const id_type* const token = plan.slot_token_;

  auto work = allocate<double>(be, E * d + d + 4 * E + 4);
  double* const centroid = work.data();  // E×d: cluster sums, then means
  double* const grand = centroid + E * d;
  double* const count = grand + d;
  double* const between_e = count + E;
  double* const within_e = between_e + E;
  double* const res = within_e + E;  // N, K, B, W

  // Cluster sums and sizes, in expert-major slot order (tokens ascending within an expert).
  for_each(
      be, E,
      [=](index e) {
        double* c = centroid + e * d;
        for (index j = 0; j < d; ++j) c[j] = 0.0;
        double n = 0.0;
        for (id_type s = offsets[e]; s < offsets[e + 1]; ++s) {
          const id_type t = token[s];
          if (t < 0) continue;
          n += 1.0;
          const auto* x = features.row(t);
          for (index j = 0; j < d; ++j) c[j] += static_cast<double>(x[j]);
        }
        count[e] = n;
      },
      index{1});
  // N and K (exact: sums of integers).
  for_each(be, 1, [=](index) {
    double n_points = 0.0, k_clusters = 0.0;
    for (index e = 0; e < E; ++e) {
      if (count[e] == 0.0) continue;
      k_clusters += 1.0;
      n_points += count[e];
    }
    res[0] = n_points;
    res[1] = k_clusters;
  });
  // The grand mean per feature, over the non-empty clusters in expert order.
  for_each(be, d, [=](index j) {
    double g = 0.0;
    for (index e = 0; e < E; ++e)
      if (count[e] != 0.0) g += centroid[e * d + j];
    grand[j] = res[0] > 0.0 ? g / res[0] : 0.0;
  });
  // Per cluster: its mean, n_e·||c_e − c||² and Σ_{x in C_e} ||x − c_e||².
  for_each(
      be, E,
      [=](index e) {
        between_e[e] = 0.0;
        within_e[e] = 0.0;
        if (count[e] == 0.0) return;
        double* c = centroid + e * d;
        double dist2 = 0.0;
        for (index j = 0; j < d; ++j) {
          c[j] /= count[e];
          dist2 += (c[j] - grand[j]) * (c[j] - grand[j]);
        }
        between_e[e] = count[e] * dist2;
        double w = 0.0;
        for (id_type s = offsets[e]; s < offsets[e + 1]; ++s) {
          const id_type t = token[s];
          if (t < 0) continue;
          const auto* x = features.row(t);
          for (index j = 0; j < d; ++j) {
            const double diff = static_cast<double>(x[j]) - c[j];
            w += diff * diff;
          }
        }
        within_e[e] = w;
      },
      index{1});
  for_each(be, 1, [=](index) {
    double between = 0.0, within = 0.0;
    for (index e = 0; e < E; ++e) {
      if (count[e] == 0.0) continue;
      between += between_e[e];
      within += within_e[e];
    }
    res[2] = between;
    res[3] = within;
  });
  double r[4] = {0.0, 0.0, 0.0, 0.0};
  copy_to_host(be, r, res, 4);
  fence(be);
  const double n_points = r[0], K = r[1], between = r[2], within = r[3];
  if (K < 2.0) return 0.0;
  if (!(within > 0.0)) return between > 0.0 ? std::numeric_limits<double>::infinity() : 0.0;
  if (form == ch_form::paper) return between / within;
  return (between / (K - 1.0)) / (within / (n_points - K));
}

template <input_scalar T>
double calinski_harabasz(matrix_view<T> features, const plan_view<>& plan, ch_form form = ch_form::standard) {
  return calinski_harabasz(backend::serial{}, features, plan, form);
}

}  // namespace resonance::balance
