#pragma once

// Load statistics of one routing plan.

#include <algorithm>
#include <cmath>

#include "../plan/plan.hpp"

namespace resonance::balance {

struct routing_stats {
  index capacity = -1;            // -1 when dropless
  index demanded = 0;             // candidate (token, expert) pairs before capacity
  index kept = 0;                 // assignments in the plan
  index dropped = 0;              // demanded - kept
  index slots = 0;                // buffer rows, padding included
  double drop_rate = 0.0;         // dropped / demanded
  double padding_fraction = 0.0;  // (slots - kept) / slots
  double mean_load = 0.0;         // mean kept tokens per expert
  double max_load = 0.0;          // largest kept count
  double load_cv = 0.0;           // population standard deviation / mean of kept counts
  double max_over_mean = 0.0;     // max_load / mean_load
};

inline routing_stats compute_stats(const plan_view& plan) {
  routing_stats s;
  s.capacity = plan.capacity();
  for (id_type d : plan.expert_demand()) s.demanded += d;
  s.kept = plan.num_assignments();
  s.dropped = s.demanded - s.kept;
  s.slots = plan.num_slots();
  s.drop_rate = s.demanded > 0 ? static_cast<double>(s.dropped) / static_cast<double>(s.demanded) : 0.0;
  s.padding_fraction = s.slots > 0 ? static_cast<double>(s.slots - s.kept) / static_cast<double>(s.slots) : 0.0;
  const auto counts = plan.expert_counts();
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

}  // namespace resonance::balance
