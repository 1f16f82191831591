// ETR end to end: trains a small MoE (projection -> L MoE layers of ReLU FFN experts with residuals
// -> head) on the CPU under several routers and seeds, and reports what each router does to
// convergence, to the tokens every expert processes (at the trained capacity and at C = ∞), and to
// expert specialisation. docs/etr-reproduction.md has the results; examples/etr_train/README.md the
// usage; report.py the means over seeds.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <Eigen/Core>

#include <resonance/affinity/linear.hpp>
#include <resonance/resonance.hpp>

#include "data.hpp"
#include "metrics.hpp"
#include "model.hpp"
#include "options.hpp"
#include "train.hpp"

#ifndef ETR_TRAIN_DATA_DIR
#define ETR_TRAIN_DATA_DIR "examples/etr_train/data"
#endif

namespace {

namespace rs = resonance;
using etr::arm_context;
using rs::drop_policy;
using rs::router;
namespace aff = rs::affinity;
namespace dir = rs::routing;
namespace cap = rs::capacity;

// One training run: an arm on a task and seed.
struct job {
  std::string label;
  std::function<etr::arm_result()> run;
};

// Every selected arm on one task and seed. Each arm is one line: its router type and options, and the
// losses it adds. All arms share the model, seed, batches and steps; every layer gets its own router.
void add_arms(const etr::options& o, const std::shared_ptr<const etr::task_setup>& tk, std::vector<job>& jobs) {
  const auto add = [&](const std::string& name, const etr::arm_options& losses, auto make_router) {
    if (!o.arms.empty() && std::find(o.arms.begin(), o.arms.end(), name) == o.arms.end()) return;
    jobs.push_back({tk->name + "/" + name + " seed " + std::to_string(tk->seed),
                    [tk, name, losses, make_router] { return etr::run_arm(name, losses, make_router, *tk); }});
  };
  const double mu = o.locality;
  // clang-format off
  add("switch",    {.aux = 0.01},                 [](const arm_context& c) { return router<aff::linear, dir::token_choice, cap::factor>{{.weight = c.gate}, {.top_k = 1, .pre_softmax = true}, {.factor = 1.1, .drop = drop_policy::position, .pad_to_capacity = true}}; });
  add("locmoe",    {.aux = 0.01, .locality = mu}, [](const arm_context& c) { return router<aff::grap, dir::token_choice, cap::lower_bound>{{.num_experts = c.experts}, {.top_k = 1, .pre_softmax = true}, {.delta = c.locmoe_delta, .tokens_per_sample = c.tokens_per_sample, .pad_to_capacity = true}}; });
  add("etr_tcr",   {.aux = 0.01, .locality = mu}, [](const arm_context& c) { return router<aff::grap_cosine, dir::token_choice, cap::dropless>{{.num_experts = c.experts}, {.top_k = 1, .pre_softmax = true, .temperature = c.tau}, {}}; });
  add("etr_ecr",   {.aux = 0.01, .locality = mu}, [](const arm_context& c) { return router<aff::grap_cosine, dir::expert_choice, cap::factor>{{.num_experts = c.experts}, {.top_k = 1, .temperature = c.tau}, {.factor = 1.0, .pad_to_capacity = true}}; });
  add("etr",       {.aux = 0.01, .locality = mu}, [](const arm_context& c) { return router<aff::grap_cosine, dir::bidirectional, cap::adaptive>{{.num_experts = c.experts}, {.top_k = 1, .pre_softmax = true, .temperature = c.tau}, {.pad_to_capacity = true}}; });
  add("etr_noloc", {.aux = 0.01},                 [](const arm_context& c) { return router<aff::grap_cosine, dir::bidirectional, cap::adaptive>{{.num_experts = c.experts}, {.top_k = 1, .pre_softmax = true, .temperature = c.tau}, {.pad_to_capacity = true}}; });
  add("bias",      {.bias_rate = 1e-3},           [](const arm_context& c) { return router<aff::linear, dir::token_choice, cap::factor>{{.weight = c.gate}, {.top_k = 1, .pre_softmax = true, .expert_bias = c.bias}, {.factor = 1.1, .drop = drop_policy::position, .pad_to_capacity = true}}; });
  // clang-format on
}

// Steps (the task's default unless --steps or --quick), log interval, optimiser and seed: the same
// rules for every task.
void set_schedule(const etr::options& o, long default_steps, unsigned long long seed, etr::task_setup& tk) {
  tk.steps = o.steps > 0 ? o.steps : (o.quick ? 60 : default_steps);
  tk.log_every = o.log_every > 0 ? o.log_every : std::max(1L, tk.steps / 60);
  tk.lr = o.lr;
  tk.tau = static_cast<float>(o.tau);
  tk.seed = seed;
  tk.shape.layers = o.layers;
}

// Runs the jobs on `threads` threads (each run is single-threaded and deterministic, so the results do
// not depend on the thread count); the results in job order. The first failure is rethrown.
std::vector<etr::arm_result> run_all(const std::vector<job>& jobs, long threads) {
  std::vector<etr::arm_result> results(jobs.size());
  std::vector<std::exception_ptr> errors(jobs.size());
  std::atomic<std::size_t> next{0};
  std::mutex print;
  std::size_t done = 0;
  const auto worker = [&] {
    for (std::size_t i = next++; i < jobs.size(); i = next++) {
      try {
        results[i] = jobs[i].run();
      } catch (...) {
        errors[i] = std::current_exception();
      }
      const std::lock_guard<std::mutex> lock(print);
      std::fprintf(stderr, "[%zu/%zu] %s%s (%.1f s)\n", ++done, jobs.size(), jobs[i].label.c_str(),
                   errors[i] ? " failed" : "", results[i].summary.seconds);
    }
  };
  std::vector<std::thread> pool;
  for (long t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (std::thread& t : pool) t.join();
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
  return results;
}

void print_summary(const std::vector<etr::run_summary>& rows) {
  std::printf(
      "\n| task | arm | seed | loss | acc | ppl | kept/expert | slots/expert | C | train slots/expert | drop | pad | "
      "load CV | CH | success | loss C=inf | C=inf (max load) | route ms |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const auto& r : rows) {
    const etr::eval_record& e = r.trained;
    std::printf(
        "| %s | %s | %llu | %.4f | %.2f%% | %.3f | %.1f | %.1f | %.1f | %.1f | %.1f%% | %.1f%% | %.3f | %.2f | %s | "
        "%.4f | %.1f | %.3f |\n",
        r.task.c_str(), r.arm.c_str(), r.seed, e.loss, 100.0 * e.accuracy, e.perplexity, e.load.kept_per_expert,
        e.load.slots_per_expert, e.load.capacity, r.train_slots_per_expert, 100.0 * e.load.drop_rate,
        100.0 * e.load.padding, e.load.load_cv, e.ch,
        e.success >= 0.0 ? (std::to_string(static_cast<int>(100.0 * e.success + 0.5)) + "%").c_str() : "-",
        r.unbounded.loss, r.unbounded.load.capacity, r.route_ms);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const etr::options o = etr::parse(argc, argv);
  Eigen::setNbThreads(1);
  std::error_code ec;
  std::filesystem::create_directories(o.out, ec);
  if (ec || !std::filesystem::is_directory(o.out))
    etr::bad_argument("--out", "cannot create directory '" + o.out + "'");
  const long threads = o.jobs > 0 ? o.jobs : std::max(1L, static_cast<long>(std::thread::hardware_concurrency()));

  const auto started = std::chrono::steady_clock::now();
  std::vector<etr::run_summary> summary;
  try {
    std::vector<job> jobs;
    for (long k = 0; k < o.seeds; ++k) {
      const unsigned long long seed = o.seed + static_cast<unsigned long long>(k);
      if (o.run_synthetic) {
        const etr::synthetic_task data(o.experts, o.width, o.seq, o.batch, o.signal);
        auto tk = std::make_shared<etr::task_setup>();
        tk->name = "synthetic";
        tk->shape = {.in = o.width, .width = o.width, .hidden = o.hidden, .experts = o.experts, .classes = o.experts};
        tk->tokens_per_sample = o.seq;
        tk->train_batch = [data](std::mt19937_64& rng) { return data.train_batch(rng); };
        tk->eval = data.eval_set(seed + 1000003, o.quick ? 4 : 32);
        tk->definition2 = true;
        set_schedule(o, 1500, seed, *tk);
        tk->progress = threads == 1;
        if (k == 0)
          std::fprintf(stderr,
                       "synthetic: %ld classes = experts, d = %ld, s = %ld, %ld samples (%ld tokens) per step, "
                       "%ld MoE layers\n",
                       o.experts, o.width, o.seq, o.batch, o.batch * o.seq, o.layers);
        add_arms(o, tk, jobs);
      }
      if (o.run_text) {
        const std::string path = o.text_path.empty() ? std::string(ETR_TRAIN_DATA_DIR) + "/GPL-3.txt" : o.text_path;
        const etr::text_task data(path, o.context, o.text_batch);
        const long embed = 16;
        auto tk = std::make_shared<etr::task_setup>();
        tk->name = "text";
        tk->shape = {.in = o.context * embed,
                     .vocab = data.vocab(),
                     .context = o.context,
                     .embed = embed,
                     .width = o.width,
                     .hidden = 2 * o.hidden,
                     .experts = o.experts,
                     .classes = data.vocab()};
        tk->tokens_per_sample = 1;
        tk->train_batch = [data](std::mt19937_64& rng) { return data.train_batch(rng); };
        tk->eval = data.eval_set(o.quick ? 2 : 1000000);
        tk->perplexity = true;
        // The text is small (31k training characters): held-out perplexity is best near 500 steps and
        // rises after (overfitting), so the text task trains for fewer steps than the synthetic one.
        set_schedule(o, 500, seed, *tk);
        tk->progress = threads == 1;
        if (k == 0)
          std::fprintf(stderr,
                       "text: %s, %ld symbols, %ld training / %ld held-out characters, context %ld, %ld per step\n",
                       path.c_str(), data.vocab(), data.train_chars(), data.heldout_chars(), o.context, o.text_batch);
        add_arms(o, tk, jobs);
      }
    }
    std::fprintf(stderr, "%zu runs (%ld seeds from %llu) on %ld threads\n", jobs.size(), o.seeds, o.seed, threads);
    for (etr::arm_result& r : run_all(jobs, threads)) {
      etr::write_run_csv(
          o.out + "/" + r.summary.task + "_" + r.summary.arm + "_seed" + std::to_string(r.summary.seed) + ".csv",
          r.log);
      summary.push_back(std::move(r.summary));
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "\netr_train: %s\n", e.what());
    return 1;
  }
  // Task, then arm in the order of the list, then seed.
  const auto rank = [](const etr::run_summary& r) {
    const auto& arms = etr::known_arms();
    return std::tuple(r.task == "text", std::find(arms.begin(), arms.end(), r.arm) - arms.begin(), r.seed);
  };
  std::stable_sort(summary.begin(), summary.end(), [&](const auto& a, const auto& b) { return rank(a) < rank(b); });
  etr::write_summary_csv(o.out + "/summary.csv", summary);
  print_summary(summary);
  std::printf("\nwrote %s/summary.csv and one CSV per run; %.1f s in all\n", o.out.c_str(),
              std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
  return 0;
}
