// expert_parallel: what routing policies cost in bytes across nodes, measured on a real MPI exchange.
//
//   mpirun -np 4 --oversubscribe build/dev/examples/expert_parallel [--steps N] [--out FILE.csv]
//
// 4 ranks are 2 simulated nodes of 2 ranks; 8 experts, 2 per rank. One small MoE layer (h = x·A, a
// router, linear experts) is trained for N steps under each policy below, from the same initial
// parameters on the same batches. Each step's dispatch runs with both topologies (flat and two-level)
// and the bytes handed to MPI are counted per destination (meter.hpp); the table shows what crossed
// nodes. Every step is also recomputed in one process per rank and compared bit for bit; the program
// exits with status 1 if any comparison fails, 2 on a bad argument. README.md shows a run.

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include <mpi.h>

#include <resonance/affinity/linear.hpp>
#include <resonance/dist/mpi.hpp>
#include <resonance/resonance.hpp>

#include "layer.hpp"
#include "train.hpp"

namespace {

namespace rs = resonance;
using ep::index;

struct options {
  index steps = 40;
  std::string out;  // CSV, one row per policy; empty: none
};

constexpr const char* usage = "usage: mpirun -np 4 expert_parallel [--steps N] [--out FILE.csv]";

// Returns "" or the one-line complaint about the arguments.
std::string parse(int argc, char** argv, options& o, bool& help) {
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--help" || a == "-h") {
      help = true;
      continue;
    }
    if (a != "--steps" && a != "--out") return "unknown argument '" + std::string(a) + "' (" + usage + ")";
    if (i + 1 >= argc) return std::string(a) + ": missing value";
    const std::string v = argv[++i];
    if (a == "--out") {
      if (v.empty()) return "--out: empty file name";
      o.out = v;
      continue;
    }
    char* end = nullptr;
    const long n = std::strtol(v.c_str(), &end, 10);
    if (v.empty() || *end != '\0' || n < 1 || n > 100000)
      return "--steps: expected an integer in [1, 100000], got '" + v + "'";
    o.steps = n;
  }
  return {};
}

// The numbers of one policy's run that the table and the CSV show.
struct summary {
  std::int64_t flat_rows = 0, two_rows = 0, padding = 0, metadata = 0;  // bytes across nodes, last step
  double flat_rows_mean = 0, two_rows_mean = 0, padding_mean = 0, metadata_mean = 0;
  std::int64_t flat_counts = 0, two_counts = 0, flat_intra = 0, two_intra = 0;  // last step
  double remote = 0, remote_mean = 0;  // share of kept (token, expert) pairs on another node
  double drop = 0, drop_mean = 0, cv = 0, cv_mean = 0;
  double loss_first = 0, loss_last = 0, loss_mean = 0, locality_last = 0;
  index capacity = -1;
};

summary summarise(const ep::policy& pol, const ep::shape& s, const ep::run_result& r) {
  summary m;
  const bool padded = pol.mode == rs::dist::exchange_mode::padded;
  const double n = static_cast<double>(r.steps.size());
  for (std::size_t i = 0; i < r.steps.size(); ++i) {
    const ep::step_record& st = r.steps[i];
    const auto& tr = st.traffic;
    const std::int64_t kept = tr.split(tr.expert_rows).total();
    const std::int64_t padding = padded ? s.row_bytes() * tr.split(tr.padding_rows).inter_node : 0;
    const double remote = static_cast<double>(tr.split(tr.expert_rows).inter_node) / static_cast<double>(kept);
    const double drop = static_cast<double>(tr.dropped) / static_cast<double>(kept + tr.dropped);
    const double cv = rs::dist::coefficient_of_variation(tr.received(tr.expert_rows));
    m.flat_rows_mean += static_cast<double>(st.flat.rows.inter) / n;
    m.two_rows_mean += static_cast<double>(st.two_level.rows.inter) / n;
    m.padding_mean += static_cast<double>(padding) / n;
    m.metadata_mean += static_cast<double>(st.flat.metadata.inter) / n;
    m.remote_mean += remote / n;
    m.drop_mean += drop / n;
    m.cv_mean += cv / n;
    m.loss_mean += st.task_loss / n;
    if (i == 0) m.loss_first = st.task_loss;
    if (i + 1 == r.steps.size()) {
      m.flat_rows = st.flat.rows.inter;
      m.two_rows = st.two_level.rows.inter;
      m.padding = padding;
      m.metadata = st.flat.metadata.inter;
      m.flat_counts = st.flat.counts.inter;
      m.two_counts = st.two_level.counts.inter;
      m.flat_intra = st.flat.rows.intra;
      m.two_intra = st.two_level.rows.intra;
      m.remote = remote;
      m.drop = drop;
      m.cv = cv;
      m.loss_last = st.task_loss;
      m.locality_last = st.locality_loss;
      m.capacity = st.capacity;
    }
  }
  return m;
}

std::string kib(double bytes) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f", bytes / 1024.0);
  return b;
}
std::string last_mean(double last, double mean, const char* fmt) {
  char b[64];
  std::snprintf(b, sizeof b, fmt, last, mean);
  return b;
}

std::string failed_checks(unsigned failed) {
  std::string s;
  for (unsigned bit = 1; bit != 0 && bit <= failed; bit <<= 1)
    if (failed & bit) s += std::string(s.empty() ? "" : ", ") + ep::check_name(bit);
  return s;
}

int run(int argc, char** argv, int rank, int ranks) {
  options o;
  bool help = false;
  const std::string bad = parse(argc, argv, o, help);
  if (!bad.empty()) {
    if (rank == 0) std::fprintf(stderr, "expert_parallel: %s\n", bad.c_str());
    return 2;
  }
  if (help) {
    if (rank == 0) std::printf("%s\n", usage);
    return 0;
  }
  if (ranks < 4 || ranks % 2 != 0) {
    if (rank == 0)
      std::fprintf(stderr, "expert_parallel: needs an even number of ranks >= 4 (2 per simulated node), got %d\n",
                   ranks);
    return 2;
  }

  ep::setup su;
  ep::shape& s = su.s;
  s.ranks = ranks;
  s.experts = s.clusters = 2 * s.ranks;  // 2 experts per rank; 2 clusters of tokens native to each rank
  s.d = 4 * s.experts;                   // 4 channels per expert (GrAP-cosine's groups)
  su.tk = ep::make_task(s);
  su.placement = rs::dist::expert_placement::contiguous(s.experts, s.ranks, s.ranks_per_node);
  su.expert_node = su.placement.node_of_expert();
  su.rank = rank;
  const index E = s.experts, d = s.d;

  using rs::dist::exchange_mode;
  using linear = rs::affinity::linear;
  using rs::routing::token_choice;
  const auto gate = [&](const ep::parameters& p) { return rs::matrix_view<const float>{p.gate.data(), E, d}; };
  const auto dropless_top2 = [&](const ep::parameters& p) {
    return rs::router<linear, token_choice, rs::capacity::dropless>{{.weight = gate(p)}, {.top_k = 2}, {}};
  };
  const auto etr = [&](const ep::parameters&) {
    // GrAP-cosine δ are cosines: a temperature of 0.1 makes the weights (and the losses) decisive.
    return rs::router<rs::affinity::grap_cosine, rs::routing::bidirectional, rs::capacity::adaptive>{
        {.num_experts = E}, {.top_k = 2, .temperature = 0.1f}, {}};
  };
  const double mu = 1.0;  // locality loss coefficient

  struct entry {
    ep::policy pol;
    ep::run_result result;
  };
  std::vector<entry> runs;
  const auto add = [&](ep::policy pol, auto&& make_router) {
    ep::run_result r = ep::run_policy(su, pol, o.steps, make_router);
    runs.push_back({std::move(pol), std::move(r)});
  };
  add({.key = "switch_cf1.25", .label = "Switch top-2, cf 1.25, drop-and-pad", .mode = exchange_mode::padded},
      [&](const ep::parameters& p) {
        return rs::router<linear, token_choice, rs::capacity::factor>{
            {.weight = gate(p)}, {.top_k = 2}, {.factor = 1.25, .pad_to_capacity = true}};
      });
  add({.key = "dropless", .label = "top-2 dropless (baseline)"}, dropless_top2);
  add({.key = "node_limited_m1", .label = "top-2, node-limited M = 1"}, [&](const ep::parameters& p) {
    return rs::router<linear, token_choice, rs::capacity::dropless>{{.weight = gate(p)},
                                                                    {.top_k = 2,
                                                                     .num_groups = su.placement.num_nodes(),
                                                                     .group_topk = 1,
                                                                     .expert_group = {su.expert_node.data(), E}},
                                                                    {}};
  });
  add({.key = "dropless_locality", .label = "top-2 dropless + locality loss", .locality = mu}, dropless_top2);
  add({.key = "etr", .label = "ETR (GrAP-cosine, bidirectional, adaptive C)", .loss_scale = 10.0f}, etr);
  add({.key = "etr_locality", .label = "ETR + locality loss", .locality = mu, .loss_scale = 10.0f}, etr);

  unsigned failed = 0;
  double seconds = 0.0;
  for (const entry& e : runs) {
    failed |= e.result.failed;
    seconds += e.result.seconds;
  }
  if (rank == 0) {
    std::printf(
        "expert_parallel: %d ranks = %lld nodes x %lld, %lld experts (%lld per rank), d = %lld (%lld-byte rows), "
        "%lld tokens per rank, %lld steps, %.1f s\n\n",
        ranks, static_cast<long long>(s.num_nodes()), static_cast<long long>(s.ranks_per_node),
        static_cast<long long>(E), static_cast<long long>(E / s.ranks), static_cast<long long>(d),
        static_cast<long long>(s.row_bytes()), static_cast<long long>(s.tokens), static_cast<long long>(o.steps),
        seconds);
    std::printf(
        "Bytes of the forward dispatch that crossed nodes, all ranks, measured at MPI: last step (mean over "
        "steps), KiB.\n\n");
    std::printf(
        "| policy | token rows, flat | token rows, two-level | of which padding | metadata | remote experts | "
        "drop | rank load CV | task loss first -> last | matches 1 process |\n");
    std::printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|\n");
    for (const entry& e : runs) {
      const summary m = summarise(e.pol, s, e.result);
      std::printf("| %s | %s (%s) | %s (%s) | %s (%s) | %s (%s) | %s | %s | %s | %.3f -> %.3f | %s |\n",
                  e.pol.label.c_str(), kib(static_cast<double>(m.flat_rows)).c_str(), kib(m.flat_rows_mean).c_str(),
                  kib(static_cast<double>(m.two_rows)).c_str(), kib(m.two_rows_mean).c_str(),
                  kib(static_cast<double>(m.padding)).c_str(), kib(m.padding_mean).c_str(),
                  kib(static_cast<double>(m.metadata)).c_str(), kib(m.metadata_mean).c_str(),
                  last_mean(100.0 * m.remote, 100.0 * m.remote_mean, "%.0f%% (%.0f%%)").c_str(),
                  last_mean(100.0 * m.drop, 100.0 * m.drop_mean, "%.1f%% (%.1f%%)").c_str(),
                  last_mean(m.cv, m.cv_mean, "%.3f (%.3f)").c_str(), m.loss_first, m.loss_last,
                  e.result.failed == 0 ? "yes" : "NO");
    }
    std::printf("\n");
    if (failed != 0) std::printf("FAILED: %s\n", failed_checks(failed).c_str());
    if (!o.out.empty()) {
      std::ofstream csv(o.out);
      csv << "policy,label,mode,steps,ranks,ranks_per_node,experts,d,row_bytes,tokens_per_rank,"
             "flat_rows_inter,flat_rows_inter_mean,two_level_rows_inter,two_level_rows_inter_mean,"
             "padding_inter,padding_inter_mean,metadata_inter,metadata_inter_mean,flat_counts_inter,"
             "two_level_counts_inter,flat_rows_intra,two_level_rows_intra,remote_share,remote_share_mean,"
             "drop_rate,drop_rate_mean,load_cv,load_cv_mean,task_loss_first,task_loss_last,task_loss_mean,"
             "locality_loss_last,capacity_last,seconds,matches\n";
      for (const entry& e : runs) {
        const summary m = summarise(e.pol, s, e.result);
        csv << e.pol.key << ",\"" << e.pol.label << "\","
            << (e.pol.mode == exchange_mode::padded ? "padded" : "dropless") << ',' << o.steps << ',' << ranks << ','
            << s.ranks_per_node << ',' << E << ',' << d << ',' << s.row_bytes() << ',' << s.tokens << ',' << m.flat_rows
            << ',' << m.flat_rows_mean << ',' << m.two_rows << ',' << m.two_rows_mean << ',' << m.padding << ','
            << m.padding_mean << ',' << m.metadata << ',' << m.metadata_mean << ',' << m.flat_counts << ','
            << m.two_counts << ',' << m.flat_intra << ',' << m.two_intra << ',' << m.remote << ',' << m.remote_mean
            << ',' << m.drop << ',' << m.drop_mean << ',' << m.cv << ',' << m.cv_mean << ',' << m.loss_first << ','
            << m.loss_last << ',' << m.loss_mean << ',' << m.locality_last << ',' << m.capacity << ','
            << e.result.seconds << ',' << (e.result.failed == 0 ? "yes" : "NO") << '\n';
      }
      if (!csv) {
        std::fprintf(stderr, "expert_parallel: cannot write %s\n", o.out.c_str());
        failed |= 1u << 31;
      }
    }
  }
  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_UNSIGNED, MPI_BOR, MPI_COMM_WORLD);
  return failed == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, ranks = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  int status = 0;
  try {
    status = run(argc, argv, rank, ranks);
  } catch (const std::exception& e) {
    // A failure on one rank would leave the others waiting in a collective: stop them all.
    std::fprintf(stderr, "expert_parallel: rank %d: %s\n", rank, e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return status;
}
