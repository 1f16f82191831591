// Routes one realistic synthetic batch (16384 tokens, 64 experts, top-2) under several policies and
// prints what each policy does to the load: capacity, drop rate, padding, load CV, max/mean and time.
//
// The logits mimic a trained router: a few popular experts (a Zipf-like per-expert offset), tokens
// drawn from topics that each prefer a handful of experts, and Gaussian noise.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <resonance/backend/native.hpp>
#include <resonance/resonance.hpp>
#if RESONANCE_HAS_TBB
#include <resonance/backend/tbb.hpp>
#endif

namespace rs = resonance;
using tc = rs::routing::token_choice;

namespace {

struct batch {
  rs::index tokens = 16384;
  rs::index experts = 64;
  std::vector<float> logits;
  std::vector<float> popularity;  // the per-expert offset that skews the load
};

batch make_batch(rs::index tokens, rs::index experts, unsigned seed) {
  batch b{tokens, experts, std::vector<float>(static_cast<std::size_t>(tokens * experts)),
          std::vector<float>(static_cast<std::size_t>(experts))};
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> noise(0.0f, 1.0f);
  const rs::index topics = 16;
  std::uniform_int_distribution<rs::index> pick_topic(0, topics - 1), pick_expert(0, experts - 1);
  for (rs::index e = 0; e < experts; ++e)
    b.popularity[static_cast<std::size_t>(e)] = -0.35f * std::log(static_cast<float>(e + 1));
  std::vector<rs::index> topic_experts(static_cast<std::size_t>(topics * 3));
  for (auto& e : topic_experts) e = pick_expert(rng);
  for (rs::index t = 0; t < tokens; ++t) {
    const rs::index topic = pick_topic(rng);
    float* row = b.logits.data() + t * experts;
    for (rs::index e = 0; e < experts; ++e) row[e] = b.popularity[static_cast<std::size_t>(e)] + noise(rng);
    for (rs::index j = 0; j < 3; ++j) row[topic_experts[static_cast<std::size_t>(topic * 3 + j)]] += 1.5f;
  }
  return b;
}

// The fastest CPU backend this build has: threads over rows vectorised for this CPU (backend::cpu), or
// those rows on one thread when oneTBB is missing. Either gives the plan backend::serial gives.
#if RESONANCE_HAS_TBB
using demo_backend = rs::backend::cpu;
constexpr const char* demo_backend_name = "cpu (tbb threads, native rows)";
#else
using demo_backend = rs::backend::native;
constexpr const char* demo_backend_name = "native (one thread)";
#endif

template <class Router>
void report(const char* name, const Router& r, const batch& b) {
  const rs::matrix_view<const float> logits{b.logits.data(), b.tokens, b.experts};
  std::vector<double> ms;
  rs::routing_plan plan;
  for (int rep = 0; rep < 7; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    plan = r.route(demo_backend{}, logits);
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  const rs::balance::routing_stats s = rs::balance::compute_stats(plan);
  const std::string cap = s.capacity < 0 ? std::string("-") : std::to_string(s.capacity);
  std::printf("| %-38s | %8s | %8.2f%% | %8.2f%% | %7.3f | %8.2f | %8.2f |\n", name, cap.c_str(), 100.0 * s.drop_rate,
              100.0 * s.padding_fraction, s.load_cv, s.max_over_mean, ms[ms.size() / 2]);
}

}  // namespace

int main(int argc, char** argv) {
  const rs::index tokens = argc > 1 ? std::atol(argv[1]) : 16384;
  const batch b = make_batch(tokens > 0 ? tokens : 16384, 64, 2024);
  const rs::index k = 2;

  std::printf("resonance %d.%d.%d route demo: %td tokens, %td experts, top-%td, skewed logits, backend %s, isa %s\n\n",
              RESONANCE_VERSION_MAJOR, RESONANCE_VERSION_MINOR, RESONANCE_VERSION_PATCH, b.tokens, b.experts, k,
              demo_backend_name, rs::native_isa().c_str());
  std::printf("| %-38s | %8s | %9s | %9s | %7s | %8s | %8s |\n", "policy", "capacity", "drop", "padding", "load CV",
              "max/mean", "ms");
  std::printf("|%s|%s|%s|%s|%s|%s|%s|\n", std::string(40, '-').c_str(), std::string(10, '-').c_str(),
              std::string(11, '-').c_str(), std::string(11, '-').c_str(), std::string(9, '-').c_str(),
              std::string(10, '-').c_str(), std::string(10, '-').c_str());

  using rs::affinity::precomputed;
  using rs::capacity::dropless;
  using rs::capacity::factor;
  const tc top2{.top_k = k};
  report("dropless", rs::router<precomputed, tc, dropless>{{}, top2, {}}, b);
  report("dropless, slots aligned to 16", rs::router<precomputed, tc, dropless>{{}, top2, {.align = 16}}, b);
  report("cf 1.0, drop score", rs::router<precomputed, tc, factor>{{}, top2, {.factor = 1.0}}, b);
  report("cf 1.25, drop score", rs::router<precomputed, tc, factor>{{}, top2, {.factor = 1.25}}, b);
  report("cf 1.25, drop position",
         rs::router<precomputed, tc, factor>{{}, top2, {.factor = 1.25, .drop = rs::drop_policy::position}}, b);
  report("cf 1.25, drop random (seed 7)",
         rs::router<precomputed, tc, factor>{{}, top2, {.factor = 1.25, .drop = rs::drop_policy::random, .seed = 7}},
         b);
  report("cf 1.25, drop score, pad to C",
         rs::router<precomputed, tc, factor>{{}, top2, {.factor = 1.25, .pad_to_capacity = true}}, b);
  report("cf 2.0, drop score", rs::router<precomputed, tc, factor>{{}, top2, {.factor = 2.0}}, b);
  report("pre-softmax, cf 1.25",
         rs::router<precomputed, tc, factor>{{}, {.top_k = k, .pre_softmax = true}, {.factor = 1.25}}, b);
  report("sigmoid, 8 groups, keep 4, cf 1.25",
         rs::router<precomputed, tc, factor>{{},
                                             {.top_k = k,
                                              .score = rs::score::sigmoid,
                                              .num_groups = 8,
                                              .group_topk = 4,
                                              .group_scoring = rs::routing::group_score::top2_sum},
                                             {.factor = 1.25}},
         b);

  // Selection-only bias that cancels the popularity skew (what an aux-loss-free balancer converges to).
  std::vector<float> bias(b.popularity.size());
  std::transform(b.popularity.begin(), b.popularity.end(), bias.begin(), std::negate<>());
  const tc biased{.top_k = k, .expert_bias = {bias.data(), static_cast<rs::index>(bias.size())}};
  report("selection bias = -skew, dropless", rs::router<precomputed, tc, dropless>{{}, biased, {}}, b);
  report("selection bias = -skew, cf 1.25", rs::router<precomputed, tc, factor>{{}, biased, {.factor = 1.25}}, b);

  // The other directions on the same logits.
  report("expert choice, cf 1.25",
         rs::router<precomputed, rs::routing::expert_choice, factor>{{}, {.top_k = k}, {.factor = 1.25}}, b);
  report("bidirectional (rank by score), cf 1.25",
         rs::router<precomputed, rs::routing::bidirectional, factor>{
             {}, {.top_k = k, .rank = rs::routing::rank_by::score}, {.factor = 1.25}},
         b);
  report("sinkhorn, dropless", rs::router<precomputed, rs::routing::sinkhorn, dropless>{{}, {.top_k = k}, {}}, b);
  report("sinkhorn, cf 1.25",
         rs::router<precomputed, rs::routing::sinkhorn, factor>{{}, {.top_k = k}, {.factor = 1.25}}, b);

  std::printf(
      "\ncapacity: slots per expert (- = dropless). drop: assignments dropped / demanded (for expert\n"
      "choice every token is a candidate of every expert). padding: empty slots / all slots. load CV:\n"
      "std/mean of kept tokens per expert. ms: median of 7 routes (score, select, capacity and plan).\n");
}
