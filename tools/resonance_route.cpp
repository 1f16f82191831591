// resonance-route: routes logits saved with numpy.save and writes the routing plan, its statistics and
// the auxiliary losses (DESIGN.md section 6 is the contract). Bad input exits with status 2, prints one
// line on stderr, and leaves no output directory behind: everything is written into a temporary
// directory next to --out and renamed into place only when complete.

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <new>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <sys/stat.h>
#include <system_error>
#include <type_traits>
#include <unistd.h>
#include <utility>
#include <vector>

#include <resonance/backend/native.hpp>
#include <resonance/resonance.hpp>
#if RESONANCE_HAS_SIMD
#include <resonance/backend/simd.hpp>
#endif
#if RESONANCE_HAS_TBB
#include <oneapi/tbb/task_arena.h>

#include <resonance/backend/tbb.hpp>
#endif
#if RESONANCE_HAS_KOKKOS
#include <Kokkos_Core.hpp>

#include <resonance/backend/kokkos.hpp>
#endif

#include "npy.hpp"

namespace rs = resonance;
namespace fs = std::filesystem;
namespace npy = resonance::tools::npy;

namespace {

// The backends this build has (xsimd, oneTBB and Kokkos are optional; native is always there; tbb
// runs native's rows on threads; kokkos runs on Kokkos' default host execution space). auto, the
// default, is the fastest: tbb when the build has it, else native.
constexpr std::string_view available_backends =
    "auto, serial, native"
#if RESONANCE_HAS_SIMD
    ", simd"
#endif
#if RESONANCE_HAS_TBB
    ", tbb"
#endif
#if RESONANCE_HAS_KOKKOS
    ", kokkos"
#endif
    ;

bool backend_available(std::string_view name) {
  if (name == "auto" || name == "serial" || name == "native") return true;
#if RESONANCE_HAS_SIMD
  if (name == "simd") return true;
#endif
#if RESONANCE_HAS_TBB
  if (name == "tbb") return true;
#endif
#if RESONANCE_HAS_KOKKOS
  if (name == "kokkos") return true;
#endif
  return false;
}

// The backend --backend auto picks.
std::string_view auto_backend() {
#if RESONANCE_HAS_TBB
  return "tbb";
#else
  return "native";
#endif
}

constexpr const char* usage_text =
    "usage: resonance-route --logits L.npy --out DIR [options]\n"
    "\n"
    "Routes T x E router logits (float32 or float64, C order, saved with numpy.save) and writes\n"
    "DIR/probs.npy, routing_map.npy, expert_counts.npy, expert_demand.npy, expert_offsets.npy,\n"
    "slot_token.npy and stats.json; the same JSON is printed on stdout.\n"
    "\n"
    "options:\n"
    "  --logits L.npy              T x E logits (required)\n"
    "  --out DIR                   output directory (required; its parent must exist)\n"
    "  --direction D               token (default), expert, bidirectional or sinkhorn\n"
    "  --causal                    expert/bidirectional: a token's fate depends only on earlier tokens\n"
    "                              (each expert keeps its earliest candidates)\n"
    "  --sinkhorn-iterations N     sinkhorn: at most N iterations (default 100; N <= 10^6)\n"
    "  --sinkhorn-tolerance F      sinkhorn: stop when mean |d1 - d1_old| < F (default 1e-4)\n"
    "  --top-k K                   experts per token (default 1; at most the number of experts)\n"
    "  --score F                   softmax (default), sigmoid or sqrt_softplus\n"
    "  --pre-softmax               softmax over all experts before the top-k (softmax only)\n"
    "  --scaling-factor F          multiplies the routing weights (default 1)\n"
    "  --num-groups G              group-limited top-k: G groups of experts (G divides E) ...\n"
    "  --group-topk M              ... of which each token uses the best M (M <= G)\n"
    "  --expert-bias B.npy         E selection-only biases (float32 or float64, 1-D)\n"
    "  --capacity-factor F         C = max(ceil(T*K/E*F), min-capacity) slots per expert; omitted: dropless\n"
    "  --capacity S                instead of --capacity-factor, a scheduler's first step:\n"
    "                              lower-bound (LocMoE Eq. 9) or adaptive (ETR); both read cosine logits\n"
    "  --hidden-size D             d of the bounds (default: the number of experts; D < 2^31)\n"
    "  --tokens-per-sample S       samples = ceil(T / S) in the bounds (default: one sample; S < 2^31)\n"
    "  --delta F                   lower-bound: the cosine threshold (default: median TCR affinity)\n"
    "  --estimate E                adaptive: resonance (default), etr_bound or locmoe_bound\n"
    "  --capacity-floor F          adaptive: C >= F*T*K/E (default 0.5)\n"
    "  --capacity-ceiling F        adaptive: C <= F*T*K/E (default 2)\n"
    "  --drop P                    score (default), position or random: who stays when an expert is full\n"
    "  --seed S                    seed of --drop random (default 0; any 64-bit unsigned integer)\n"
    "  --pad-to-capacity           every expert gets exactly C slots (padding: token -1)\n"
    "  --min-capacity N            lower bound on C (default 0; N < 2^31)\n"
    "  --align N                   round every expert's slot count up to a multiple of N (default 1;\n"
    "                              N <= 2^20); the total slot count must stay below 2^31\n"
    "  --backend B                 auto (default: tbb when this build has it, else native), serial,\n"
    "                              native, simd, tbb or kokkos when this build has them; every backend\n"
    "                              gives the same plan; stats.json names the choice, its instruction\n"
    "                              set and its threads (the environment variable RESONANCE_ISA caps\n"
    "                              native's instruction set: avx512bw, avx2, sse2 or scalar)\n"
    "  --group-score S             how a group (or node) is scored: top-m-sum (default: the sum of its\n"
    "                              top K/M experts), top2-sum or max\n"
    "expert parallelism (adds \"traffic\" to stats.json):\n"
    "  --ranks R                   experts on R ranks (R <= 512); the T tokens are R shards of T/R,\n"
    "                              each routed as its rank would route it (capacity per rank), and the\n"
    "                              All-to-All traffic of the shards is reported\n"
    "  --ranks-per-node N          N ranks per node (default 1): what crosses nodes\n"
    "  --placement P               contiguous (default: E/R experts per rank) or round-robin\n"
    "  --row-bytes B               bytes of one token row (default 14336: d = 7168 in bf16; B <= 2^30)\n"
    "  --node-limit M              node-limited routing: each token's experts on at most M nodes,\n"
    "                              nodes scored by --group-score (token and bidirectional only)\n"
    "  --help                      this text\n"
    "  --version                   the library version\n"
    "\n"
    "Integer options not bounded above are at most 2^31 - 1. Inputs must be regular files.\n"
    "Bad input (or an output that cannot be written in full): exit status 2, one line on stderr,\n"
    "and DIR is not created.\n";

// Every user-facing failure: the message becomes the single stderr line.
struct usage_error : std::runtime_error {
  explicit usage_error(const std::string& what) : std::runtime_error(what) {}
};

[[noreturn]] void fail(const std::string& what) { throw usage_error(what); }

// ---- strict number parsing ------------------------------------------------------------------------

template <class Int>
Int parse_int(std::string_view option, std::string_view text) {
  Int v{};
  const char* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, v);
  if (text.empty() || ec == std::errc::invalid_argument || ptr != end)
    fail(std::string(option) + (std::is_signed_v<Int> ? ": expected an integer" : ": expected a non-negative integer") +
         ", got '" + std::string(text) + "'");
  if (ec == std::errc::result_out_of_range)
    fail(std::string(option) + ": integer out of range: '" + std::string(text) + "'");
  return v;
}

// The largest value of the integer options without a tighter bound: ids and slot offsets are 32-bit.
constexpr rs::index max_int32 = std::numeric_limits<std::int32_t>::max();
constexpr rs::index max_sinkhorn_iterations = 1'000'000;
constexpr rs::index max_align = rs::index{1} << 20;
// The traffic report holds R x R matrices, one more per shard routed: R^3 work in all.
constexpr rs::index max_ranks = 512;

// An integer in [lo, hi], or a message naming the option and the range.
rs::index parse_index(std::string_view option, std::string_view text, rs::index lo, rs::index hi) {
  const auto v = parse_int<rs::index>(option, text);
  if (v < lo || v > hi)
    fail(std::string(option) + ": expected a value in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " +
         std::to_string(v));
  return v;
}

double parse_double(std::string_view option, std::string_view text) {
  double v = 0.0;
  const char* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, v);
  if (text.empty() || ec == std::errc::invalid_argument || ptr != end)
    fail(std::string(option) + ": expected a number, got '" + std::string(text) + "'");
  if (ec == std::errc::result_out_of_range || !std::isfinite(v))
    fail(std::string(option) + ": expected a finite number, got '" + std::string(text) + "'");
  return v;
}

// ---- command line ---------------------------------------------------------------------------------

struct options {
  std::string logits;
  std::string out;
  std::string direction = "token";
  rs::index top_k = 1;
  rs::score score = rs::score::softmax;
  std::string score_name = "softmax";
  bool pre_softmax = false;
  double scaling_factor = 1.0;
  rs::index num_groups = 0;
  rs::index group_topk = 0;
  std::string expert_bias;
  std::optional<double> capacity_factor;
  rs::drop_policy drop = rs::drop_policy::score;
  std::uint64_t seed = 0;
  bool pad_to_capacity = false;
  rs::index min_capacity = 0;
  rs::index align = 1;
  std::string backend = "auto";            // the backend that routes: auto resolved after parsing
  std::string backend_requested = "auto";  // what --backend said
  bool causal = false;
  rs::index sinkhorn_iterations = 100;
  double sinkhorn_tolerance = 1e-4;
  std::string scheduler;  // "", "lower-bound" or "adaptive"
  rs::index hidden_size = 0;
  rs::index tokens_per_sample = 0;
  double delta = 0.0;
  rs::capacity::capacity_estimate estimate = rs::capacity::capacity_estimate::resonance;
  double capacity_floor = 0.5;
  double capacity_ceiling = 2.0;
  rs::routing::group_score group_scoring = rs::routing::group_score::top_m_sum;
  rs::index ranks = 0;  // 0: no traffic report
  rs::index ranks_per_node = 1;
  std::string placement = "contiguous";
  rs::index row_bytes = 14336;
  rs::index node_limit = 0;
  std::vector<std::string> ranks_only;  // need --ranks
  // Options given that only some configurations use, for the checks after parsing.
  std::vector<std::string> capacity_only;  // need a capacity (factor or scheduler)
  std::vector<std::string> factor_only;    // need --capacity-factor
  std::vector<std::string> proposal_only;  // token choice / bidirectional proposal options
  std::vector<std::string> sinkhorn_only;
  std::vector<std::string> scheduler_only;  // need --capacity lower-bound|adaptive
  std::vector<std::string> adaptive_only;
  std::vector<std::string> lower_bound_only;
  std::vector<std::string> drop_given;  // --drop / --seed: token choice and Sinkhorn only
};

enum class action { route, help, version };

action parse_args(int argc, char** argv, options& o) {
  const std::vector<std::string_view> args(argv + 1, argv + argc);
  // --help and --version win over everything else, wherever they appear.
  for (std::string_view a : args) {
    if (a == "--help" || a == "-h") return action::help;
    if (a == "--version") return action::version;
  }
  std::map<std::string, bool> seen;
  for (std::size_t i = 0; i < args.size(); ++i) {
    std::string_view arg = args[i];
    if (arg.size() < 3 || arg.substr(0, 2) != "--") fail("unexpected argument '" + std::string(arg) + "'");
    std::string name(arg);
    std::optional<std::string_view> inline_value;
    if (const auto eq = arg.find('='); eq != std::string_view::npos) {
      name = std::string(arg.substr(0, eq));
      inline_value = arg.substr(eq + 1);
    }
    if (seen[name]) fail(name + ": given more than once");
    seen[name] = true;

    auto flag = [&](bool& target) {
      if (inline_value) fail(name + ": takes no value");
      target = true;
    };
    auto value = [&]() -> std::string_view {
      if (inline_value) return *inline_value;
      if (i + 1 >= args.size()) fail(name + ": missing value");
      return args[++i];
    };

    if (name == "--logits") {
      o.logits = value();
      if (o.logits.empty()) fail("--logits: expected a file name");
    } else if (name == "--out") {
      o.out = value();
      if (o.out.empty()) fail("--out: expected a directory name");
    } else if (name == "--direction") {
      const std::string_view v = value();
      if (v != "token" && v != "expert" && v != "bidirectional" && v != "sinkhorn")
        fail("--direction: expected token, expert, bidirectional or sinkhorn, got '" + std::string(v) + "'");
      o.direction = v;
    } else if (name == "--causal") {
      flag(o.causal);
    } else if (name == "--sinkhorn-iterations") {
      o.sinkhorn_iterations = parse_index(name, value(), 1, max_sinkhorn_iterations);
      o.sinkhorn_only.push_back(name);
    } else if (name == "--sinkhorn-tolerance") {
      o.sinkhorn_tolerance = parse_double(name, value());
      o.sinkhorn_only.push_back(name);
    } else if (name == "--capacity") {
      const std::string_view v = value();
      if (v != "lower-bound" && v != "adaptive")
        fail("--capacity: expected lower-bound or adaptive, got '" + std::string(v) + "'");
      o.scheduler = v;
    } else if (name == "--hidden-size") {
      o.hidden_size = parse_index(name, value(), 1, max_int32);
      o.scheduler_only.push_back(name);
    } else if (name == "--tokens-per-sample") {
      o.tokens_per_sample = parse_index(name, value(), 0, max_int32);
      o.scheduler_only.push_back(name);
    } else if (name == "--delta") {
      o.delta = parse_double(name, value());
      o.lower_bound_only.push_back(name);
    } else if (name == "--estimate") {
      const std::string_view v = value();
      if (v == "resonance") {
        o.estimate = rs::capacity::capacity_estimate::resonance;
      } else if (v == "etr_bound") {
        o.estimate = rs::capacity::capacity_estimate::etr_bound;
      } else if (v == "locmoe_bound") {
        o.estimate = rs::capacity::capacity_estimate::locmoe_bound;
      } else {
        fail("--estimate: expected resonance, etr_bound or locmoe_bound, got '" + std::string(v) + "'");
      }
      o.adaptive_only.push_back(name);
    } else if (name == "--capacity-floor") {
      o.capacity_floor = parse_double(name, value());
      o.adaptive_only.push_back(name);
    } else if (name == "--capacity-ceiling") {
      o.capacity_ceiling = parse_double(name, value());
      o.adaptive_only.push_back(name);
    } else if (name == "--top-k") {
      o.top_k = parse_index(name, value(), 1, max_int32);
    } else if (name == "--score") {
      const std::string_view v = value();
      if (v == "softmax") {
        o.score = rs::score::softmax;
      } else if (v == "sigmoid") {
        o.score = rs::score::sigmoid;
      } else if (v == "sqrt_softplus") {
        o.score = rs::score::sqrt_softplus;
      } else {
        fail("--score: expected softmax, sigmoid or sqrt_softplus, got '" + std::string(v) + "'");
      }
      o.score_name = v;
    } else if (name == "--pre-softmax") {
      flag(o.pre_softmax);
      o.proposal_only.push_back(name);
    } else if (name == "--scaling-factor") {
      o.scaling_factor = parse_double(name, value());
      o.proposal_only.push_back(name);
    } else if (name == "--num-groups") {
      o.num_groups = parse_index(name, value(), 0, max_int32);
      o.proposal_only.push_back(name);
    } else if (name == "--group-topk") {
      o.group_topk = parse_index(name, value(), 0, max_int32);
      o.proposal_only.push_back(name);
    } else if (name == "--group-score") {
      const std::string_view v = value();
      if (v == "top-m-sum") {
        o.group_scoring = rs::routing::group_score::top_m_sum;
      } else if (v == "top2-sum") {
        o.group_scoring = rs::routing::group_score::top2_sum;
      } else if (v == "max") {
        o.group_scoring = rs::routing::group_score::max;
      } else {
        fail("--group-score: expected top-m-sum, top2-sum or max, got '" + std::string(v) + "'");
      }
      o.proposal_only.push_back(name);
    } else if (name == "--ranks") {
      o.ranks = parse_index(name, value(), 1, max_ranks);
    } else if (name == "--ranks-per-node") {
      o.ranks_per_node = parse_index(name, value(), 1, max_ranks);
      o.ranks_only.push_back(name);
    } else if (name == "--placement") {
      o.placement = value();
      if (o.placement != "contiguous" && o.placement != "round-robin")
        fail("--placement: expected contiguous or round-robin, got '" + o.placement + "'");
      o.ranks_only.push_back(name);
    } else if (name == "--row-bytes") {
      o.row_bytes = parse_index(name, value(), 1, rs::index{1} << 30);
      o.ranks_only.push_back(name);
    } else if (name == "--node-limit") {
      o.node_limit = parse_index(name, value(), 1, max_ranks);
      o.ranks_only.push_back(name);
      o.proposal_only.push_back(name);
    } else if (name == "--expert-bias") {
      o.expert_bias = value();
      if (o.expert_bias.empty()) fail("--expert-bias: expected a file name");
      o.proposal_only.push_back(name);
    } else if (name == "--capacity-factor") {
      const std::string_view v = value();
      o.capacity_factor = parse_double(name, v);
      // Megatron reads a negative factor as dropless and Tutel as adaptive: make the user say which.
      if (!(*o.capacity_factor > 0.0))
        fail("--capacity-factor: expected a value > 0 (omit the option for dropless routing), got " + std::string(v));
    } else if (name == "--drop") {
      const std::string_view v = value();
      if (v == "score") {
        o.drop = rs::drop_policy::score;
      } else if (v == "position") {
        o.drop = rs::drop_policy::position;
      } else if (v == "random") {
        o.drop = rs::drop_policy::random;
      } else {
        fail("--drop: expected score, position or random, got '" + std::string(v) + "'");
      }
      o.capacity_only.push_back(name);
      o.drop_given.push_back(name);
    } else if (name == "--seed") {
      o.seed = parse_int<std::uint64_t>(name, value());
      o.capacity_only.push_back(name);
      o.drop_given.push_back(name);
    } else if (name == "--pad-to-capacity") {
      flag(o.pad_to_capacity);
      o.capacity_only.push_back(name);
    } else if (name == "--min-capacity") {
      o.min_capacity = parse_index(name, value(), 0, max_int32);
      o.factor_only.push_back(name);
    } else if (name == "--align") {
      o.align = parse_index(name, value(), 1, max_align);
    } else if (name == "--backend") {
      const std::string_view v = value();
      if (v != "auto" && v != "serial" && v != "native" && v != "simd" && v != "tbb" && v != "cuda" && v != "kokkos")
        fail("--backend: expected auto, serial, native, simd, tbb, kokkos or cuda, got '" + std::string(v) + "'");
      if (!backend_available(v))
        fail("--backend " + std::string(v) + ": not available in this build (" + std::string(available_backends) + ")");
      o.backend = o.backend_requested = v;
    } else {
      fail("unknown option '" + name + "' (see --help)");
    }
  }
  if (o.backend == "auto") o.backend = auto_backend();
  if (o.logits.empty()) fail("--logits is required (see --help)");
  if (o.out.empty()) fail("--out is required (see --help)");
  const bool scheduled = !o.scheduler.empty();
  if (o.capacity_factor && scheduled) fail("--capacity: give either --capacity-factor or --capacity, not both");
  if (!o.capacity_factor && !scheduled && !o.capacity_only.empty())
    fail(o.capacity_only.front() + ": needs --capacity-factor (dropless routing has no capacity)");
  if (!o.capacity_factor && !o.factor_only.empty()) fail(o.factor_only.front() + ": needs --capacity-factor");
  if (!scheduled && !o.scheduler_only.empty())
    fail(o.scheduler_only.front() + ": needs --capacity lower-bound or --capacity adaptive");
  if (o.scheduler != "adaptive" && !o.adaptive_only.empty())
    fail(o.adaptive_only.front() + ": needs --capacity adaptive");
  if (o.scheduler != "lower-bound" && !o.lower_bound_only.empty())
    fail(o.lower_bound_only.front() + ": needs --capacity lower-bound");
  if (o.direction != "sinkhorn" && !o.sinkhorn_only.empty())
    fail(o.sinkhorn_only.front() + ": needs --direction sinkhorn");
  if ((o.direction == "expert" || o.direction == "sinkhorn") && !o.proposal_only.empty())
    fail(o.proposal_only.front() + ": not used by --direction " + o.direction + " (token and bidirectional only)");
  // Expert choice and bidirectional routing define who stays (their own ranking, or position when
  // causal): a drop policy would be silently ignored.
  if ((o.direction == "expert" || o.direction == "bidirectional") && !o.drop_given.empty())
    fail(o.drop_given.front() + ": not used by --direction " + o.direction +
         " (its experts rank their candidates themselves; position priority when --causal)");
  if (o.ranks == 0 && !o.ranks_only.empty()) fail(o.ranks_only.front() + ": needs --ranks");
  if (o.ranks > 0 && o.ranks % o.ranks_per_node != 0)
    fail("--ranks-per-node: expected a divisor of --ranks (" + std::to_string(o.ranks) + "), got " +
         std::to_string(o.ranks_per_node));
  if (o.node_limit > 0 && (o.num_groups > 0 || o.group_topk > 0))
    fail("--node-limit: give either --node-limit or --num-groups/--group-topk, not both (nodes are the groups)");
  if (o.node_limit > o.ranks / std::max<rs::index>(o.ranks_per_node, 1) && o.node_limit > 0)
    fail("--node-limit: expected at most the number of nodes (" + std::to_string(o.ranks / o.ranks_per_node) +
         "), got " + std::to_string(o.node_limit));
  if (o.causal && o.direction != "expert" && o.direction != "bidirectional")
    fail("--causal: needs --direction expert or bidirectional");
  if (o.direction == "sinkhorn" && o.score != rs::score::softmax)
    fail("--score: not used by --direction sinkhorn (its weights are sigmoid for k = 1, softmax otherwise)");
  if (o.direction == "expert" && !o.capacity_factor && !scheduled)
    fail("--direction expert: needs a capacity (--capacity-factor or --capacity): each expert takes its top-C tokens");
  return action::route;
}

// ---- library errors -------------------------------------------------------------------------------

// The library's errors read "resonance: <argument>: expected ..."; name the command-line option instead
// of the library's parameter where there is one.
std::string cli_message(const std::string& what) {
  static const std::map<std::string, std::string, std::less<>> option_of = {
      {"top_k", "--top-k"},
      {"num_groups", "--num-groups"},
      {"group_topk", "--group-topk"},
      {"expert_group", "--node-limit"},
      {"group_scoring", "--group-score"},
      {"expert_bias", "--expert-bias"},
      {"scaling_factor", "--scaling-factor"},
      {"pre_softmax", "--pre-softmax"},
      {"capacity factor", "--capacity-factor"},
      {"min_capacity", "--min-capacity"},
      {"align", "--align"},
      {"logits", "--logits"},
      {"input", "--logits"},
      {"max_iterations", "--sinkhorn-iterations"},
      {"tolerance", "--sinkhorn-tolerance"},
      {"lower_bound.delta", "--delta"},
      {"lower_bound.tokens_per_sample", "--tokens-per-sample"},
      {"lower_bound.hidden_size", "--hidden-size"},
      {"lower_bound (estimated delta)", "--capacity lower-bound (estimated delta)"},
      {"adaptive.tokens_per_sample", "--tokens-per-sample"},
      {"adaptive.hidden_size", "--hidden-size"},
      {"adaptive.floor", "--capacity-floor"},
      {"adaptive.ceiling", "--capacity-ceiling"},
      {"adaptive (estimated delta)", "--capacity adaptive (estimated delta)"},
      {"adaptive (largest TCR affinity)", "--capacity adaptive (largest TCR affinity)"},
  };
  std::string_view m = what;
  if (m.substr(0, 11) == "resonance: ") m.remove_prefix(11);
  const auto colon = m.find(": ");
  if (colon != std::string_view::npos) {
    const auto it = option_of.find(m.substr(0, colon));
    if (it != option_of.end()) return it->second + std::string(m.substr(colon));
  }
  return std::string(m);
}

// ---- input ----------------------------------------------------------------------------------------

npy::array load_input(const std::string& option, const std::string& path, std::size_t ndim,
                      std::string_view shape_text) {
  try {
    npy::array a = npy::load(path);
    npy::require_float(a, ndim, shape_text);
    return a;
  } catch (const npy::error& e) {
    fail(option + " '" + path + "': " + e.what());
  }
}

rs::index extent(std::size_t n, const std::string& option) {
  if (n > static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()))
    fail(option + ": dimension " + std::to_string(n) + " does not fit in 32-bit ids");
  return static_cast<rs::index>(n);
}

// ---- output ---------------------------------------------------------------------------------------

std::string short_number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

struct results {
  rs::routing_plan plan;
  std::vector<float> probs;
  std::vector<std::uint8_t> map;
  double aux_loss = 0.0;
  double z_loss = 0.0;
  std::optional<rs::dist::traffic_report> traffic;  // with --ranks
};

// The traffic report's fields, flat ("traffic_" keys), in bytes where a row size applies.
void traffic_json(const options& o, const rs::dist::traffic_report& t,
                  const std::function<void(const char*, const std::string&)>& field) {
  const rs::dist::traffic_split tok = t.split(t.token_rows), ex = t.split(t.expert_rows);
  const auto bytes = [&](std::int64_t rows) { return std::to_string(rows * t.row_bytes); };
  // Metadata: one routed_assignment (16 bytes) per (token, expert) sent to another rank.
  const std::int64_t meta = ex.network() * static_cast<std::int64_t>(sizeof(rs::dist::routed_assignment));
  std::int64_t padded = 0, padding = 0;
  for (std::size_t i = 0; i < t.padded_rows.size(); ++i) {
    padded += t.padded_rows[i];
    padding += t.padding_rows[i];
  }
  const std::vector<std::int64_t> rows_in = t.received(t.token_rows), load = t.received(t.expert_rows);
  field("traffic_ranks", std::to_string(t.num_ranks));
  field("traffic_ranks_per_node", std::to_string(t.ranks_per_node));
  field("traffic_nodes", std::to_string(t.num_nodes()));
  field("traffic_placement", "\"" + o.placement + "\"");
  field("traffic_row_bytes", std::to_string(t.row_bytes));
  field("traffic_token_rows_self", std::to_string(tok.self));
  field("traffic_token_rows_intra_node", std::to_string(tok.intra_node));
  field("traffic_token_rows_inter_node", std::to_string(tok.inter_node));
  field("traffic_dispatch_bytes_intra_node", bytes(tok.intra_node));
  field("traffic_dispatch_bytes_inter_node", bytes(tok.inter_node));
  field("traffic_metadata_bytes", std::to_string(meta));
  field("traffic_expert_rows_intra_node", std::to_string(ex.intra_node));
  field("traffic_expert_rows_inter_node", std::to_string(ex.inter_node));
  field("traffic_combine_bytes_inter_node", bytes(ex.inter_node));
  field("traffic_two_level_bytes_inter_node", bytes(t.inter_node_node_rows()));
  field("traffic_padded_bytes", t.padded ? bytes(padded) : "null");
  field("traffic_padding_bytes", t.padded ? bytes(padding) : "null");
  field("traffic_max_rows_per_rank", std::to_string(*std::max_element(rows_in.begin(), rows_in.end())));
  field("traffic_mean_rows_per_rank", json_number(static_cast<double>(tok.total()) / static_cast<double>(t.num_ranks)));
  field("traffic_rank_max_over_mean", json_number(rs::dist::max_over_mean(load)));
  field("traffic_rank_load_cv", json_number(rs::dist::coefficient_of_variation(load)));
  field("traffic_dropped", std::to_string(t.dropped));
}

// The instruction set of a backend's row primitives.
std::string backend_isa(std::string_view name) {
  if (name == "native" || name == "tbb") return rs::native_isa();
#if RESONANCE_HAS_SIMD
  if (name == "simd") return xsimd::default_arch::name();
#endif
  return "scalar";  // serial, and kokkos (its rows are the scalar reference)
}

// Threads a backend routes on: the calling task arena's for tbb; one otherwise (Debian's Kokkos has
// the Serial space only, and kokkos is initialised only for the route).
int backend_threads(std::string_view name) {
#if RESONANCE_HAS_TBB
  if (name == "tbb") return oneapi::tbb::this_task_arena::max_concurrency();
#endif
  (void)name;
  return 1;
}

std::string stats_json(const options& o, const results& r) {
  const rs::balance::routing_stats s = rs::balance::compute_stats(r.plan);
  std::string j = "{\n";
  auto field = [&](const char* key, const std::string& value, bool last = false) {
    j += "  \"";
    j += key;
    j += "\": ";
    j += value;
    j += last ? "\n" : ",\n";
  };
  auto quoted = [](const std::string& v) { return "\"" + v + "\""; };
  field("num_tokens", std::to_string(r.plan.num_tokens()));
  field("num_experts", std::to_string(r.plan.num_experts()));
  field("top_k", std::to_string(o.top_k));
  field("direction", quoted(o.direction));
  field("score", quoted(o.score_name));
  field("pre_softmax", o.pre_softmax ? "true" : "false");
  field("backend", quoted(o.backend));
  field("backend_requested", quoted(o.backend_requested));
  field("isa", quoted(backend_isa(o.backend)));
  field("threads", std::to_string(backend_threads(o.backend)));
  field("capacity", std::to_string(s.capacity));
  field("num_slots", std::to_string(s.slots));
  field("demanded", std::to_string(s.demanded));
  field("kept", std::to_string(s.kept));
  field("dropped", std::to_string(s.dropped));
  field("drop_rate", json_number(s.drop_rate));
  field("padding_fraction", json_number(s.padding_fraction));
  field("mean_load", json_number(s.mean_load));
  field("max_load", json_number(s.max_load));
  field("load_cv", json_number(s.load_cv));
  field("max_over_mean", json_number(s.max_over_mean));
  field("routing_entropy", json_number(rs::balance::routing_entropy(r.plan)));
  field("aux_loss", json_number(r.aux_loss));
  field("z_loss", json_number(r.z_loss), !r.traffic);
  if (r.traffic) {
    std::vector<std::pair<std::string, std::string>> kv;
    traffic_json(o, *r.traffic, [&](const char* k, const std::string& v) { kv.emplace_back(k, v); });
    for (std::size_t i = 0; i < kv.size(); ++i) field(kv[i].first.c_str(), kv[i].second, i + 1 == kv.size());
  }
  j += "}\n";
  return j;
}

template <class T>
void save_npy(const fs::path& dir, const char* name, std::span<const T> values, std::vector<std::size_t> shape) {
  npy::save(std::string(dir / name), values, std::span<const std::size_t>(shape));
}

void write_outputs(const fs::path& dir, const results& r, const std::string& json) {
  const auto T = static_cast<std::size_t>(r.plan.num_tokens());
  const auto E = static_cast<std::size_t>(r.plan.num_experts());
  const auto S = static_cast<std::size_t>(r.plan.num_slots());
  save_npy<float>(dir, "probs.npy", r.probs, {T, E});
  save_npy<std::uint8_t>(dir, "routing_map.npy", r.map, {T, E});
  save_npy<std::int32_t>(dir, "expert_counts.npy", r.plan.expert_counts(), {E});
  save_npy<std::int32_t>(dir, "expert_demand.npy", r.plan.expert_demand(), {E});
  save_npy<std::int32_t>(dir, "expert_offsets.npy", r.plan.expert_offsets(), {E + 1});
  save_npy<std::int32_t>(dir, "slot_token.npy", r.plan.slot_token(), {S});
  npy::write_file(std::string(dir / "stats.json"), json);
}

constexpr const char* output_names[] = {"probs.npy",         "routing_map.npy",    "expert_counts.npy",
                                        "expert_demand.npy", "expert_offsets.npy", "slot_token.npy",
                                        "stats.json"};

// The directory that holds `out` ("." for a bare name).
fs::path parent_of(const fs::path& out) {
  const fs::path parent = out.parent_path();
  return parent.empty() ? fs::path(".") : parent;
}

// fsyncs a directory, so that the entries created or renamed in it are on disk; false on failure.
bool sync_directory(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool synced = ::fsync(fd) == 0 || errno == EINVAL || errno == EROFS;
  return ::close(fd) == 0 && synced;
}

// The temporary directory next to --out; removed unless release()d, so an error leaves nothing behind.
// Its name is short and fixed-length (not derived from --out), so that an --out whose last component
// is as long as the file system allows still gets a temporary sibling.
class temp_dir {
 public:
  explicit temp_dir(const fs::path& target) {
    std::string pattern = (parent_of(target) / ".resonance-tmp-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr)
      fail("--out '" + target.string() + "': cannot create a directory next to it: " + std::strerror(errno));
    path_ = pattern;
    // mkdtemp makes it 0700; give the final directory the permissions mkdir would have.
    const mode_t mask = ::umask(0);
    ::umask(mask);
    ::chmod(path_.c_str(), 0777 & ~mask);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  ~temp_dir() {
    if (!path_.empty()) {
      std::error_code ec;
      fs::remove_all(path_, ec);
    }
  }
  const fs::path& path() const { return path_; }
  void release() { path_.clear(); }

 private:
  fs::path path_;
};

// Writes every output into a fresh temporary directory, then moves it to `out`: by a rename of the
// whole directory when `out` does not exist, file by file when it is an existing directory.
// Every file is written and fsynced (npy::write_file checks each write, the fsync and the close), and
// the temporary directory is fsynced before the rename: a full disk or an I/O error fails here, while
// the temporary directory is still removed on the way out.
void publish(const fs::path& out, const results& r, const std::string& json) {
  temp_dir tmp(out);
  try {
    write_outputs(tmp.path(), r, json);
  } catch (const npy::error& e) {
    fail("--out '" + out.string() + "': " + e.what());
  }
  if (!sync_directory(tmp.path()))
    fail("--out '" + out.string() + "': cannot sync the temporary directory: " + std::strerror(errno));
  std::error_code ec;
  const fs::file_status st = fs::status(out, ec);
  if (!fs::exists(st)) {
    fs::rename(tmp.path(), out, ec);
    if (ec) fail("--out '" + out.string() + "': cannot rename the temporary directory: " + ec.message());
    tmp.release();
    // Best effort: the outputs are complete and in place; a failed fsync of the parent cannot undo that.
    (void)sync_directory(parent_of(out));
    return;
  }
  if (!fs::is_directory(st)) fail("--out '" + out.string() + "': exists and is not a directory");
  for (const char* name : output_names)
    if (fs::is_directory(out / name, ec))
      fail("--out '" + out.string() + "': " + name + " exists there and is a directory");
  for (const char* name : output_names) {
    fs::rename(tmp.path() / name, out / name, ec);
    if (ec) fail("--out '" + out.string() + "': cannot move " + name + " into it: " + ec.message());
  }
  (void)sync_directory(out);
}

// ---- routing --------------------------------------------------------------------------------------

// Routes once with any direction and capacity policy; a stateful scheduler runs its first step.
template <class Backend, class Direction, class Capacity, class Scalar>
results route_on(const Backend& be, const Direction& dir, const Capacity& cap, const options& o,
                 const std::vector<Scalar>& logits, rs::index T, rs::index E);

// Calls f(backend) with the backend named by --backend (checked by backend_available when parsed).
template <class F>
results with_backend(std::string_view name, F&& f) {
  if (name == "native") return f(rs::backend::native{});
#if RESONANCE_HAS_SIMD
  if (name == "simd") return f(rs::backend::simd<>{});
#endif
#if RESONANCE_HAS_TBB
  if (name == "tbb") return f(rs::backend::tbb<>{});
#endif
#if RESONANCE_HAS_KOKKOS
  if (name == "kokkos") {
    // Kokkos is initialised only when this backend is asked for, and finalised once the routed plan has
    // been mirrored to the host (route_on returns host data only, so no View outlives the guard).
    const Kokkos::ScopeGuard kokkos;
    return f(rs::backend::kokkos<Kokkos::DefaultHostExecutionSpace>{});
  }
#endif
  (void)name;
  return f(rs::backend::serial{});
}

template <class Direction, class Capacity, class Scalar>
results route_with(const Direction& dir, const Capacity& cap, const options& o, const std::vector<Scalar>& logits,
                   rs::index T, rs::index E) {
  return with_backend(o.backend, [&](const auto& be) { return route_on(be, dir, cap, o, logits, T, E); });
}

// The routed plan on the host: a host backend's as it is, another's mirrored (kokkos).
template <class Backend, class Space>
rs::routing_plan host_plan(const Backend& be, rs::basic_routing_plan<Space>&& plan) {
  if constexpr (std::is_same_v<Space, rs::host_space>) {
    return std::move(plan);
  } else {
    return rs::to_host(be, plan);
  }
}

template <class Backend, class Direction, class Capacity, class Scalar>
results route_on(const Backend& be, const Direction& dir, const Capacity& cap, const options& o,
                 const std::vector<Scalar>& logits, rs::index T, rs::index E) {
  // --capacity lower-bound|adaptive read the logits as cosines (--help says so): choosing them states it.
  const rs::router<rs::affinity::precomputed, Direction, Capacity> r{
      {.cosines = rs::stateful_capacity_policy<Capacity>}, dir, cap};
  const rs::matrix_view<const Scalar> x{logits.data(), T, E};
  // fp32 logits (validated, finite): routed, and the losses are computed on the same values.
  std::vector<float> storage;
  const rs::matrix_view<const float> l = r.logits(be, x, storage);
  results out;
  if constexpr (rs::stateful_capacity_policy<Capacity>) {
    // One batch is a scheduler's first step (its state starts fresh). The bounds read d, the width of
    // the hidden states behind the logits: --hidden-size, else the number of experts.
    rs::capacity_state_t<Capacity> state{};
    out.plan = host_plan(be, r.route(be, l, state));
  } else {
    out.plan = host_plan(be, r.route(be, l));
  }
  out.aux_loss = rs::loss::switch_aux_loss(be, l, o.score, o.top_k);
  out.z_loss = rs::loss::z_loss(be, l);
  out.probs.resize(static_cast<std::size_t>(T * E));
  out.map.resize(static_cast<std::size_t>(T * E));
  rs::to_dense(out.plan, rs::matrix_view<float>{out.probs.data(), T, E},
               rs::matrix_view<std::uint8_t>{out.map.data(), T, E});
  return out;
}

template <class Direction, class Scalar>
results route_capacity(const Direction& dir, const options& o, const std::vector<Scalar>& logits, rs::index T,
                       rs::index E) {
  if (o.capacity_factor) {
    const rs::capacity::factor cap{.factor = *o.capacity_factor,
                                   .drop = o.drop,
                                   .min_capacity = o.min_capacity,
                                   .pad_to_capacity = o.pad_to_capacity,
                                   .align = o.align,
                                   .seed = o.seed};
    return route_with(dir, cap, o, logits, T, E);
  }
  if (o.scheduler == "lower-bound") {
    const rs::capacity::lower_bound cap{.delta = o.delta,
                                        .tokens_per_sample = o.tokens_per_sample,
                                        .hidden_size = o.hidden_size,
                                        .drop = o.drop,
                                        .pad_to_capacity = o.pad_to_capacity,
                                        .align = o.align,
                                        .seed = o.seed};
    return route_with(dir, cap, o, logits, T, E);
  }
  if (o.scheduler == "adaptive") {
    const rs::capacity::adaptive cap{.estimate = o.estimate,
                                     .tokens_per_sample = o.tokens_per_sample,
                                     .hidden_size = o.hidden_size,
                                     .floor = o.capacity_floor,
                                     .ceiling = o.capacity_ceiling,
                                     .warmup = 0,  // one batch is the whole stream: no warm-up
                                     .drop = o.drop,
                                     .pad_to_capacity = o.pad_to_capacity,
                                     .align = o.align,
                                     .seed = o.seed};
    return route_with(dir, cap, o, logits, T, E);
  }
  return route_with(dir, rs::capacity::dropless{.align = o.align}, o, logits, T, E);
}

template <class Scalar>
results route_all(const options& o, const rs::routing::token_choice& tc, const std::vector<Scalar>& logits, rs::index T,
                  rs::index E) {
  if (o.direction == "expert") {
    const rs::routing::expert_choice ec{.top_k = o.top_k, .score = o.score, .causal = o.causal};
    return route_capacity(ec, o, logits, T, E);
  }
  if (o.direction == "sinkhorn") {
    const rs::routing::sinkhorn sk{
        .top_k = o.top_k, .max_iterations = o.sinkhorn_iterations, .tolerance = o.sinkhorn_tolerance};
    return route_capacity(sk, o, logits, T, E);
  }
  if (o.direction == "bidirectional") {
    // DESIGN §6: each expert keeps the top-C of its candidates by score.
    const rs::routing::bidirectional bd{.top_k = tc.top_k,
                                        .score = tc.score,
                                        .pre_softmax = tc.pre_softmax,
                                        .scaling_factor = tc.scaling_factor,
                                        .expert_bias = tc.expert_bias,
                                        .num_groups = tc.num_groups,
                                        .group_topk = tc.group_topk,
                                        .group_scoring = tc.group_scoring,
                                        .expert_group = tc.expert_group,
                                        .rank = rs::routing::rank_by::score,
                                        .causal = o.causal};
    return route_capacity(bd, o, logits, T, E);
  }
  return route_capacity(tc, o, logits, T, E);
}

int run(const options& o) {
  const fs::path out = [&] {
    std::string s = o.out;
    while (s.size() > 1 && s.back() == '/') s.pop_back();
    return fs::path(s);
  }();
  {
    std::error_code ec;
    const fs::file_status st = fs::status(out, ec);
    // A name too long for the file system (ENAMETOOLONG), or a parent that cannot be searched, fails
    // here, before any input is read.
    if (st.type() == fs::file_type::none) fail("--out '" + o.out + "': " + ec.message());
    if (fs::exists(st) && !fs::is_directory(st)) fail("--out '" + o.out + "': exists and is not a directory");
  }

  const npy::array logits = load_input("--logits", o.logits, 2, "a 2-D array (tokens x experts)");
  const rs::index T = extent(logits.shape[0], "--logits");
  const rs::index E = extent(logits.shape[1], "--logits");

  std::vector<float> bias;
  if (!o.expert_bias.empty()) {
    const npy::array b = load_input("--expert-bias", o.expert_bias, 1, "a 1-D array (one bias per expert)");
    if (b.type == npy::dtype::float32) {
      bias = b.values<float>();
    } else {
      for (double v : b.values<double>()) bias.push_back(static_cast<float>(v));
    }
    // An empty view means "no bias" to the library; an empty file is a wrong length, not no bias.
    if (bias.empty()) fail("--expert-bias '" + o.expert_bias + "': expected " + std::to_string(E) + " entries, got 0");
  }

  if (o.scaling_factor > static_cast<double>(std::numeric_limits<float>::max()))
    fail("--scaling-factor: expected a finite value > 0 that fits in float, got " + short_number(o.scaling_factor));
  std::optional<rs::dist::expert_placement> placement;
  std::vector<rs::id_type> node_of_expert;
  if (o.ranks > 0) {
    if (o.placement == "contiguous" && E % o.ranks != 0)
      fail("--ranks: the contiguous placement needs the number of experts (" + std::to_string(E) +
           ") to be a multiple of --ranks, got " + std::to_string(o.ranks) + " (or use --placement round-robin)");
    if (o.placement == "contiguous") {
      placement = rs::dist::expert_placement::contiguous(E, o.ranks, o.ranks_per_node);
    } else {
      placement =
          rs::dist::expert_placement{o.ranks, o.ranks_per_node, std::vector<rs::id_type>(static_cast<std::size_t>(E))};
      for (rs::index e = 0; e < E; ++e)
        placement->rank_of_expert[static_cast<std::size_t>(e)] = static_cast<rs::id_type>(e % o.ranks);
    }
    node_of_expert = placement->node_of_expert();
  }
  rs::routing::token_choice tc{.top_k = o.top_k,
                               .score = o.score,
                               .pre_softmax = o.pre_softmax,
                               .scaling_factor = static_cast<float>(o.scaling_factor),
                               .expert_bias = {bias.data(), static_cast<rs::index>(bias.size())},
                               .num_groups = o.num_groups,
                               .group_topk = o.group_topk,
                               .group_scoring = o.group_scoring};
  if (o.node_limit > 0 && o.group_scoring == rs::routing::group_score::top_m_sum && o.top_k < o.node_limit)
    fail("--node-limit: expected at most --top-k (" + std::to_string(o.top_k) +
         ") with --group-score top-m-sum (each node is scored by its top K/M experts), got " +
         std::to_string(o.node_limit));
  if (o.node_limit > 0) {
    // Node-limited routing: the nodes are the groups, through the placement's node map.
    tc.num_groups = placement->num_nodes();
    tc.group_topk = o.node_limit;
    tc.expert_group = {node_of_expert.data(), E};
  }

  const auto route_values = [&](const auto& values) {
    results r = route_all(o, tc, values, T, E);
    if (placement) {
      // Each rank routes its own shard, as it would in expert parallelism (its capacity is its own).
      r.traffic = rs::dist::empty_traffic(*placement, o.row_bytes);
      for (rs::index s = 0; s < o.ranks; ++s) {
        const rs::index first = s * T / o.ranks, last = (s + 1) * T / o.ranks;
        using value_type = typename std::decay_t<decltype(values)>::value_type;
        const std::vector<value_type> shard(values.begin() + first * E, values.begin() + last * E);
        const results part = route_all(o, tc, shard, last - first, E);
        rs::dist::add_traffic(*r.traffic, part.plan, *placement, s);
      }
    }
    return r;
  };
  const results r =
      logits.type == npy::dtype::float32 ? route_values(logits.values<float>()) : route_values(logits.values<double>());
  const std::string json = stats_json(o, r);
  publish(out, r, json);
  std::fputs(json.c_str(), stdout);
  std::fflush(stdout);
  return 0;
}

// One line, whatever the message holds.
void report(const std::string& what) {
  std::string line = what;
  std::replace(line.begin(), line.end(), '\n', ' ');
  std::fprintf(stderr, "resonance-route: %s\n", line.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  try {
    options o;
    switch (parse_args(argc, argv, o)) {
      case action::help:
        std::fputs(usage_text, stdout);
        return 0;
      case action::version:
        std::printf("resonance-route %d.%d.%d\n", RESONANCE_VERSION_MAJOR, RESONANCE_VERSION_MINOR,
                    RESONANCE_VERSION_PATCH);
        return 0;
      case action::route:
        return run(o);
    }
  } catch (const usage_error& e) {
    report(e.what());
  } catch (const rs::error& e) {
    report(cli_message(e.what()));
  } catch (const std::bad_alloc&) {
    report("out of memory");
  } catch (const std::exception& e) {
    report(std::string("unexpected error: ") + e.what());
  } catch (...) {
    report("unexpected error");
  }
  return 2;
}
