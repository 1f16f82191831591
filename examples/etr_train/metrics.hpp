#pragma once

// What is measured per step and per run: the load a plan puts on the experts, the Calinski-Harabasz
// index of the MoE-input features grouped by assigned expert, and the training success rate of ETR's
// Definition 2 (the class-discriminative token dispatched to, and kept by, its expert).

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

#include <resonance/resonance.hpp>

#include "data.hpp"

namespace etr {

namespace rs = resonance;

// The load of one plan.
struct load_record {
  double kept_per_expert = 0.0;   // mean tokens an expert kept (its real work)
  double slots_per_expert = 0.0;  // mean buffer rows an expert ran its FFN on (kept + padding)
  double capacity = 0.0;          // C; for a dropless plan the largest load (what a padded buffer needs)
  double drop_rate = 0.0;
  double padding = 0.0;
  double load_cv = 0.0;
  std::vector<double> kept;  // per expert
};

inline load_record measure_load(const rs::routing_plan& plan) {
  const rs::balance::routing_stats st = rs::balance::compute_stats(plan);
  const double E = static_cast<double>(plan.num_experts());
  load_record r;
  r.kept_per_expert = st.mean_load;
  r.slots_per_expert = static_cast<double>(st.slots) / E;
  r.capacity = st.capacity >= 0 ? static_cast<double>(st.capacity) : st.max_load;
  r.drop_rate = st.drop_rate;
  r.padding = st.padding_fraction;
  r.load_cv = st.load_cv;
  r.kept.assign(st.expert_kept.begin(), st.expert_kept.end());
  return r;
}

// Running means of load records (the kept vector is summed, not averaged).
struct load_sum {
  load_record sum;
  long n = 0;
  void add(const load_record& r) {
    sum.kept_per_expert += r.kept_per_expert;
    sum.slots_per_expert += r.slots_per_expert;
    sum.capacity += r.capacity;
    sum.drop_rate += r.drop_rate;
    sum.padding += r.padding;
    sum.load_cv += r.load_cv;
    if (sum.kept.size() < r.kept.size()) sum.kept.resize(r.kept.size(), 0.0);
    for (std::size_t e = 0; e < r.kept.size(); ++e) sum.kept[e] += r.kept[e];
    ++n;
  }
  load_record mean() const {
    load_record m = sum;
    const double k = n > 0 ? static_cast<double>(n) : 1.0;
    m.kept_per_expert /= k;
    m.slots_per_expert /= k;
    m.capacity /= k;
    m.drop_rate /= k;
    m.padding /= k;
    m.load_cv /= k;
    return m;
  }
};

// Definition 2: counts of class-y discriminative tokens kept by expert e.
struct success_counts {
  long classes = 0, experts = 0;
  std::vector<long> hits;  // classes x experts
  long total = 0;

  success_counts(long n, long E) : classes(n), experts(E), hits(static_cast<std::size_t>(n * E), 0) {}

  void add(const rs::routing_plan& plan, const batch& b) {
    const auto off = plan.token_offsets();
    const auto ex = plan.token_expert();
    for (std::size_t i = 0; i < b.disc_token.size(); ++i) {
      const long t = b.disc_token[i], y = b.label[i];
      ++total;
      for (rs::id_type j = off[static_cast<std::size_t>(t)]; j < off[static_cast<std::size_t>(t + 1)]; ++j)
        ++hits[static_cast<std::size_t>(y * experts + ex[static_cast<std::size_t>(j)])];
    }
  }

  // Class i <-> expert i (GrAP gates: o_i lies on expert i's channel group).
  double identity() const {
    long h = 0;
    for (long i = 0; i < std::min(classes, experts); ++i) h += hits[static_cast<std::size_t>(i * experts + i)];
    return total > 0 ? static_cast<double>(h) / static_cast<double>(total) : 0.0;
  }

  // The one-to-one class -> expert matching that maximises the hits (learned gates, whose expert ids are
  // arbitrary); brute force over the permutations, E <= 8.
  double matched() const {
    std::vector<long> perm(static_cast<std::size_t>(experts));
    std::iota(perm.begin(), perm.end(), 0L);
    long best = 0;
    do {
      long h = 0;
      for (long i = 0; i < std::min(classes, experts); ++i)
        h += hits[static_cast<std::size_t>(i * experts + perm[static_cast<std::size_t>(i)])];
      best = std::max(best, h);
    } while (std::next_permutation(perm.begin(), perm.end()));
    return total > 0 ? static_cast<double>(best) / static_cast<double>(total) : 0.0;
  }
};

// One row of a run's CSV: a log interval's means.
struct step_record {
  long step = 0;
  double loss = 0.0, accuracy = 0.0;
  load_record load;
  double ch = 0.0;                  // Calinski-Harabasz of this step's MoE inputs grouped by expert
  double success = -1.0;            // Definition 2 on this step's batch (-1: not defined for the task)
  double route_ms = 0.0;            // mean wall time of route() over the interval
  double capacity_estimate = -1.0;  // capacity::adaptive's last raw estimate of C (inf: TCR regime); -1: none
};

inline void write_run_csv(const std::string& path, const std::vector<step_record>& rows) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) {
    std::fprintf(stderr, "etr_train: cannot write %s\n", path.c_str());
    return;
  }
  std::fprintf(f,
               "step,loss,acc,tokens_per_expert,slots_per_expert,capacity,drop_rate,padding,load_cv,ch,success,"
               "route_ms,capacity_estimate\n");
  for (const step_record& r : rows)
    std::fprintf(f, "%ld,%.6f,%.6f,%.3f,%.3f,%.3f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.3f\n", r.step, r.loss, r.accuracy,
                 r.load.kept_per_expert, r.load.slots_per_expert, r.load.capacity, r.load.drop_rate, r.load.padding,
                 r.load.load_cv, r.ch, r.success, r.route_ms, r.capacity_estimate);
  std::fclose(f);
}

// The final evaluation of one arm on one task.
struct run_summary {
  std::string task, arm;
  long steps = 0;
  double loss = 0.0, accuracy = 0.0, perplexity = 0.0;
  load_record load;                     // held-out set, routed with the final model and capacity
  double train_slots_per_expert = 0.0;  // mean over all training steps (the work the FFNs did)
  double train_kept_per_expert = 0.0;
  double ch = 0.0;
  double success = -1.0, success_matched = -1.0;
  double route_ms = 0.0;  // mean over training steps
  double seconds = 0.0;   // wall time of the arm (training + evaluation)
  double tokens_per_step = 0.0;
};

inline void write_summary_csv(const std::string& path, const std::vector<run_summary>& rows) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) {
    std::fprintf(stderr, "etr_train: cannot write %s\n", path.c_str());
    return;
  }
  std::fprintf(f,
               "task,arm,steps,tokens_per_step,loss,acc,ppl,tokens_per_expert,slots_per_expert,capacity,"
               "train_slots_per_expert,train_tokens_per_expert,drop_rate,padding,load_cv,ch,success,success_matched,"
               "route_ms,seconds,expert_load\n");
  for (const run_summary& r : rows) {
    std::string loads;
    for (std::size_t e = 0; e < r.load.kept.size(); ++e) {
      if (e > 0) loads += ';';
      loads += std::to_string(std::lround(r.load.kept[e]));
    }
    std::fprintf(f,
                 "%s,%s,%ld,%.0f,%.6f,%.6f,%.6f,%.3f,%.3f,%.3f,%.3f,%.3f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.2f,%s\n",
                 r.task.c_str(), r.arm.c_str(), r.steps, r.tokens_per_step, r.loss, r.accuracy, r.perplexity,
                 r.load.kept_per_expert, r.load.slots_per_expert, r.load.capacity, r.train_slots_per_expert,
                 r.train_kept_per_expert, r.load.drop_rate, r.load.padding, r.load.load_cv, r.ch, r.success,
                 r.success_matched, r.route_ms, r.seconds, loads.c_str());
  }
  std::fclose(f);
}

}  // namespace etr
