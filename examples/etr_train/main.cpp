// ETR end to end: trains a small MoE (projection -> one MoE layer of ReLU FFN experts with a residual
// -> head) on the CPU under several routers and reports what each router does to convergence, to the
// tokens every expert processes, and to expert specialisation. docs/etr-reproduction.md has the
// results; examples/etr_train/README.md the usage.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <string>
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

// Runs every selected arm on one task. Each arm is one line: its router type and options, and the
// losses it adds. All arms share the model, seed, batches and steps.
void run_arms(const etr::options& o, const etr::task_setup& tk, std::vector<etr::run_summary>& summary) {
  const auto run = [&](const std::string& name, const etr::arm_options& losses, auto&& make_router) {
    if (!o.arms.empty() && std::find(o.arms.begin(), o.arms.end(), name) == o.arms.end()) return;
    const etr::arm_result r = etr::run_arm(name, losses, make_router, tk);
    etr::write_run_csv(o.out + "/" + tk.name + "_" + name + ".csv", r.log);
    summary.push_back(r.summary);
  };
  // clang-format off
  run("switch",  {.aux = 0.01},                   [](const arm_context& c) { return router<aff::linear, dir::token_choice, cap::factor>{{.weight = c.gate}, {.top_k = 1, .pre_softmax = true}, {.factor = 1.1, .drop = drop_policy::position, .pad_to_capacity = true}}; });
  run("locmoe",  {.aux = 0.01, .locality = 0.01}, [](const arm_context& c) { return router<aff::grap, dir::token_choice, cap::lower_bound>{{.num_experts = c.experts}, {.top_k = 1, .pre_softmax = true}, {.delta = c.locmoe_delta, .tokens_per_sample = c.tokens_per_sample, .pad_to_capacity = true}}; });
  run("etr_tcr", {.aux = 0.01},                   [](const arm_context& c) { return router<aff::grap_cosine, dir::token_choice, cap::dropless>{{.num_experts = c.experts}, {.top_k = 1, .pre_softmax = true, .temperature = c.tau}, {}}; });
  run("etr_ecr", {.aux = 0.01},                   [](const arm_context& c) { return router<aff::grap_cosine, dir::expert_choice, cap::factor>{{.num_experts = c.experts}, {.top_k = 1, .temperature = c.tau}, {.factor = 1.0, .pad_to_capacity = true}}; });
  run("etr",     {.aux = 0.01},                   [](const arm_context& c) { return router<aff::grap_cosine, dir::bidirectional, cap::adaptive>{{.num_experts = c.experts}, {.top_k = 1, .pre_softmax = true, .temperature = c.tau}, {.pad_to_capacity = true}}; });
  run("bias",    {.bias_rate = 1e-3},             [](const arm_context& c) { return router<aff::linear, dir::token_choice, cap::factor>{{.weight = c.gate}, {.top_k = 1, .pre_softmax = true, .expert_bias = c.bias}, {.factor = 1.1, .drop = drop_policy::position, .pad_to_capacity = true}}; });
  // clang-format on
}

// Steps (the task's default unless --steps or --quick), log interval, optimiser and seed: the same
// rules for every task.
void set_schedule(const etr::options& o, long default_steps, etr::task_setup& tk) {
  tk.steps = o.steps > 0 ? o.steps : (o.quick ? 60 : default_steps);
  tk.log_every = o.log_every > 0 ? o.log_every : std::max(1L, tk.steps / 60);
  tk.lr = o.lr;
  tk.tau = static_cast<float>(o.tau);
  tk.seed = o.seed;
}

void print_summary(const std::vector<etr::run_summary>& rows) {
  std::printf(
      "\n| task | arm | loss | acc | ppl | kept/expert | slots/expert | C | train slots/expert | drop | pad | "
      "load CV | CH | success | route ms |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const auto& r : rows)
    std::printf(
        "| %s | %s | %.4f | %.2f%% | %.3f | %.1f | %.1f | %.1f | %.1f | %.1f%% | %.1f%% | %.3f | %.2f | %s | %.3f |\n",
        r.task.c_str(), r.arm.c_str(), r.loss, 100.0 * r.accuracy, r.perplexity, r.load.kept_per_expert,
        r.load.slots_per_expert, r.load.capacity, r.train_slots_per_expert, 100.0 * r.load.drop_rate,
        100.0 * r.load.padding, r.load.load_cv, r.ch,
        r.success >= 0.0 ? (std::to_string(static_cast<int>(100.0 * r.success + 0.5)) + "%").c_str() : "-", r.route_ms);
}

}  // namespace

int main(int argc, char** argv) {
  const etr::options o = etr::parse(argc, argv);
  Eigen::setNbThreads(1);
  std::error_code ec;
  std::filesystem::create_directories(o.out, ec);
  if (ec || !std::filesystem::is_directory(o.out))
    etr::bad_argument("--out", "cannot create directory '" + o.out + "'");

  const auto started = std::chrono::steady_clock::now();
  std::vector<etr::run_summary> summary;
  try {
    if (o.run_synthetic) {
      const etr::synthetic_task data(o.experts, o.width, o.seq, o.batch, o.signal);
      etr::task_setup tk;
      tk.name = "synthetic";
      tk.shape = {.in = o.width, .width = o.width, .hidden = o.hidden, .experts = o.experts, .classes = o.experts};
      tk.tokens_per_sample = o.seq;
      tk.train_batch = [data](std::mt19937_64& rng) { return data.train_batch(rng); };
      tk.eval = data.eval_set(o.seed + 1000003, o.quick ? 4 : 32);
      tk.definition2 = true;
      set_schedule(o, 1500, tk);
      std::fprintf(stderr, "synthetic: %ld classes = experts, d = %ld, s = %ld, %ld samples (%ld tokens) per step\n",
                   o.experts, o.width, o.seq, o.batch, o.batch * o.seq);
      run_arms(o, tk, summary);
    }
    if (o.run_text) {
      const std::string path = o.text_path.empty() ? std::string(ETR_TRAIN_DATA_DIR) + "/GPL-3.txt" : o.text_path;
      const etr::text_task data(path, o.context, o.text_batch);
      const long embed = 16;
      etr::task_setup tk;
      tk.name = "text";
      tk.shape = {.in = o.context * embed,
                  .vocab = data.vocab(),
                  .context = o.context,
                  .embed = embed,
                  .width = o.width,
                  .hidden = 2 * o.hidden,
                  .experts = o.experts,
                  .classes = data.vocab()};
      tk.tokens_per_sample = 1;
      tk.train_batch = [data](std::mt19937_64& rng) { return data.train_batch(rng); };
      tk.eval = data.eval_set(o.quick ? 2 : 1000000);
      tk.perplexity = true;
      // The text is small (31k training characters): held-out perplexity is best near 500 steps and
      // rises after (overfitting), so the text task trains for fewer steps than the synthetic one.
      set_schedule(o, 500, tk);
      std::fprintf(stderr, "text: %s, %ld symbols, %ld training / %ld held-out characters, context %ld, %ld per step\n",
                   path.c_str(), data.vocab(), data.train_chars(), data.heldout_chars(), o.context, o.text_batch);
      run_arms(o, tk, summary);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "\netr_train: %s\n", e.what());
    return 1;
  }
  etr::write_summary_csv(o.out + "/summary.csv", summary);
  print_summary(summary);
  std::printf("\nwrote %s/summary.csv and one CSV per run; %.1f s in all\n", o.out.c_str(),
              std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
  return 0;
}
