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

// The fraction of kept assignments whose expert sits on the token's node, with the locality loss's
// virtual nodes: token t of a batch of `samples` samples is on node (t / s)·nodes / samples, expert e on
// e·nodes / E. 1/nodes when routing ignores the nodes.
inline double local_fraction(const rs::routing_plan& plan, long samples, long nodes) {
  const auto off = plan.token_offsets();
  const auto ex = plan.token_expert();
  const long T = plan.num_tokens(), E = plan.num_experts(), s = T / samples;
  long local = 0, kept = 0;
  for (long t = 0; t < T; ++t)
    for (rs::id_type j = off[static_cast<std::size_t>(t)]; j < off[static_cast<std::size_t>(t + 1)]; ++j) {
      local += (t / s) * nodes / samples == static_cast<long>(ex[static_cast<std::size_t>(j)]) * nodes / E ? 1 : 0;
      ++kept;
    }
  return kept > 0 ? static_cast<double>(local) / static_cast<double>(kept) : 0.0;
}

// The load of one plan.
struct load_record {
  double kept_per_expert = 0.0;   // mean tokens an expert kept (its real work)
  double slots_per_expert = 0.0;  // mean buffer rows an expert ran its FFN on (kept + padding)
  double capacity = 0.0;          // C; for a dropless plan the largest load (what a padded buffer needs)
  double drop_rate = 0.0;
  double padding = 0.0;
  double load_cv = 0.0;
  double local = 0.0;        // local_fraction
  std::vector<double> kept;  // per expert
};

// The load of a plan of a batch of `samples` samples, its locality on `nodes` virtual nodes included.
inline load_record measure_load(const rs::routing_plan& plan, long samples, long nodes) {
  const rs::balance::routing_stats st = rs::balance::compute_stats(plan);
  const double E = static_cast<double>(plan.num_experts());
  load_record r;
  r.kept_per_expert = st.mean_load;
  r.slots_per_expert = static_cast<double>(st.slots) / E;
  r.capacity = st.capacity >= 0 ? static_cast<double>(st.capacity) : st.max_load;
  r.drop_rate = st.drop_rate;
  r.padding = st.padding_fraction;
  r.load_cv = st.load_cv;
  r.local = local_fraction(plan, samples, nodes);
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
    sum.local += r.local;
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
    m.local /= k;
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

// One row of a run's CSV: a log interval's means (the load and CH averaged over the layers too).
struct step_record {
  long step = 0;
  double loss = 0.0, accuracy = 0.0;
  load_record load;
  double ch = 0.0;                        // Calinski-Harabasz of this step's MoE inputs grouped by expert
  double success = -1.0;                  // Definition 2 on this step's batch (-1: not defined for the task)
  double route_ms = 0.0;                  // mean wall time of route() over the interval, all layers
  std::vector<double> capacity_estimate;  // capacity::adaptive's last raw estimate per layer (inf: TCR)
  std::vector<double> layer_capacity;     // C of the interval's last step, per layer
};

inline std::string join(const std::vector<double>& v, const char* format) {
  std::string s;
  char cell[64];
  for (std::size_t i = 0; i < v.size(); ++i) {
    std::snprintf(cell, sizeof cell, format, v[i]);
    s += (i > 0 ? ";" : "") + std::string(cell);
  }
  return s;
}

inline void write_run_csv(const std::string& path, const std::vector<step_record>& rows) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) {
    std::fprintf(stderr, "etr_train: cannot write %s\n", path.c_str());
    return;
  }
  std::fprintf(f,
               "step,loss,acc,tokens_per_expert,slots_per_expert,capacity,drop_rate,padding,load_cv,ch,success,"
               "local,route_ms,capacity_estimate,layer_capacity\n");
  for (const step_record& r : rows)
    std::fprintf(f, "%ld,%.6f,%.6f,%.3f,%.3f,%.3f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%s,%s\n", r.step, r.loss,
                 r.accuracy, r.load.kept_per_expert, r.load.slots_per_expert, r.load.capacity, r.load.drop_rate,
                 r.load.padding, r.load.load_cv, r.ch, r.success, r.load.local, r.route_ms,
                 join(r.capacity_estimate, "%.3f").c_str(), join(r.layer_capacity, "%.1f").c_str());
  std::fclose(f);
}

// A held-out evaluation of the final model under one set of routers.
struct eval_record {
  double loss = 0.0, accuracy = 0.0, perplexity = 0.0;
  load_record load;  // averaged over the routing groups and layers
  double ch = 0.0;
  double success = -1.0, success_matched = -1.0;
  std::vector<double> layer_capacity;  // C per layer, averaged over the routing groups
};

// The final evaluation of one arm on one task and seed.
struct run_summary {
  std::string task, arm;
  unsigned long long seed = 0;
  long layers = 1;
  long steps = 0;
  eval_record trained;                  // routed with the trained capacity (training's routers)
  eval_record unbounded;                // at C = infinity (token choice, every proposal kept)
  double train_slots_per_expert = 0.0;  // mean over all training steps and layers (the work the FFNs did)
  double train_kept_per_expert = 0.0;
  double route_ms = 0.0;  // mean over training steps (all layers)
  double seconds = 0.0;   // wall time of the arm (training + evaluations)
  double tokens_per_step = 0.0;
};

inline void write_summary_csv(const std::string& path, const std::vector<run_summary>& rows) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) {
    std::fprintf(stderr, "etr_train: cannot write %s\n", path.c_str());
    return;
  }
  std::fprintf(f,
               "task,arm,seed,layers,steps,tokens_per_step,loss,acc,ppl,tokens_per_expert,slots_per_expert,capacity,"
               "train_slots_per_expert,train_tokens_per_expert,drop_rate,padding,load_cv,local,ch,success,"
               "success_matched,inf_loss,inf_acc,inf_ppl,inf_capacity,inf_load_cv,inf_local,layer_capacity,"
               "route_ms,seconds,expert_load\n");
  for (const run_summary& r : rows) {
    const eval_record& e = r.trained;
    std::vector<double> loads;
    for (double k : e.load.kept) loads.push_back(static_cast<double>(std::lround(k)));
    std::fprintf(f,
                 "%s,%s,%llu,%ld,%ld,%.0f,%.6f,%.6f,%.6f,%.3f,%.3f,%.3f,%.3f,%.3f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,"
                 "%.6f,%.6f,%.6f,%.6f,%.3f,%.6f,%.6f,%s,%.6f,%.2f,%s\n",
                 r.task.c_str(), r.arm.c_str(), r.seed, r.layers, r.steps, r.tokens_per_step, e.loss, e.accuracy,
                 e.perplexity, e.load.kept_per_expert, e.load.slots_per_expert, e.load.capacity,
                 r.train_slots_per_expert, r.train_kept_per_expert, e.load.drop_rate, e.load.padding, e.load.load_cv,
                 e.load.local, e.ch, e.success, e.success_matched, r.unbounded.loss, r.unbounded.accuracy,
                 r.unbounded.perplexity, r.unbounded.load.capacity, r.unbounded.load.load_cv, r.unbounded.load.local,
                 join(e.layer_capacity, "%.1f").c_str(), r.route_ms, r.seconds, join(loads, "%.0f").c_str());
  }
  std::fclose(f);
}

}  // namespace etr
