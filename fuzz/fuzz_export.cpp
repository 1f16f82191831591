// fuzz_export: the plan exports (include/resonance/plan/export.hpp) on plans made from fuzzed inputs.
//
// The plan comes from the router (token choice with a factor or dropless capacity, or expert choice,
// on fuzzed logits), from build_plan on a fuzzed candidate set (valid or not, on every host backend:
// the same error or bitwise the same plan as serial, and the brute-force plan of tests/conformance.hpp),
// or is the empty plan. Each export then runs on every host backend with fuzzed arguments, good and
// bad, and must give serial's outputs (or serial's error) bit for bit:
//   to_dense          probs and mask views of fuzzed shape, stride and data: a resonance::error exactly
//                     when a view is malformed or not T×E, and then nothing written; otherwise probs(t, e)
//                     is the kept weight and mask(t, e) 1 for the kept pairs, 0 elsewhere, gaps untouched;
//   to_block_aligned  a fuzzed block (0, negative, huge included): an error exactly when block < 1 or the
//                     padded layout overflows 32-bit ids; otherwise each expert's run holds the CSR index
//                     of each of its kept slots in slot order, padded with num_assignments to a multiple
//                     of block, and expert_ids names each block's expert;
//   to_rank_layout    fuzzed placements (rank counts, ranks per node, rank_of_expert of the wrong size or
//                     out of range): an error exactly when the placement is invalid; otherwise
//                     is_token_in_rank and the per-rank, per-node and per-expert counts are those
//                     recomputed from the token CSR.
// Any crash, sanitizer report (ASan sees every write past an output: each is allocated to its exact
// extent), huge allocation or exception other than resonance::error is a finding too.

#define DOCTEST_CONFIG_DISABLE  // the tests' helpers only: no doctest runner in a fuzzer

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include <resonance/resonance.hpp>

#include "conformance.hpp"
#include "fuzz_input.hpp"

namespace {

namespace rs = resonance;
namespace rt = resonance::routing;
namespace ra = resonance::affinity;
namespace cap = resonance::capacity;
namespace conf = resonance_test::conformance;
using resonance_fuzz::byte_source;
using resonance_fuzz::require;
using resonance_test::error_of;
using rs::id_type;
using rs::index;

constexpr index huge = std::numeric_limits<index>::max();
constexpr index id_max = std::numeric_limits<id_type>::max();
// Outputs larger than this (a legitimate request: a block of 2^30) are not exported, to keep the
// fuzzer under its memory limit; their rejection thresholds are still exercised.
constexpr index max_output = index{1} << 16;

void require_resonance_error(const std::string& error, const std::string& what) {
  require(error.rfind("<not a resonance::error>", 0) != 0, what + ": " + error);
}

// With RESONANCE_FUZZ_STATS set, what the inputs exercised is printed at exit.
struct tally {
  long inputs = 0, routed = 0, built = 0, empty = 0;
  long exported[3] = {}, rejected[3] = {}, skipped = 0;  // to_dense, to_block_aligned, to_rank_layout
  ~tally() {
    if (std::getenv("RESONANCE_FUZZ_STATS") == nullptr) return;
    std::fprintf(stderr,
                 "fuzz_export: %ld inputs; plans: %ld routed, %ld built, %ld empty; exported/rejected: dense "
                 "%ld/%ld, block-aligned %ld/%ld (%ld too large, skipped), rank layout %ld/%ld\n",
                 inputs, routed, built, empty, exported[0], rejected[0], exported[1], rejected[1], skipped, exported[2],
                 rejected[2]);
  }
};
tally counts;

void count(int which, bool valid) { ++(valid ? counts.exported : counts.rejected)[which]; }

// Calls make(be) on every host backend: it must throw a resonance::error exactly when !valid, and every
// backend's result must equal (`same`) the first one's (serial's). Returns serial's result, if any.
template <class Result, class Make, class Same>
std::optional<Result> on_every_backend(const std::string& call, bool valid, Make make, Same same) {
  std::optional<Result> want;
  resonance_fuzz::for_each_host_backend([&](const auto& be, const char* name) {
    const std::string what = call + " on " + name;
    std::optional<Result> got;
    const std::string error = error_of([&] { got = make(be); });
    require_resonance_error(error, what);
    require((error == "no throw") == valid, what + ": " + error);
    if (!got) return;
    if (!want) {
      want = std::move(got);
      return;
    }
    require(same(*got, *want), what + ": differs from serial's");
  });
  return want;
}

// ---------------------------------------------------------------------------------------------------
// The plan

// A plan routed on serial from fuzzed logits; nothing when the route throws.
std::optional<rs::routing_plan> routed_plan(byte_source& in) {
  const bool expert_choice = in.one_in(3);
  const bool dropless = !expert_choice && in.one_in(3);
  const index T = in.below(65), E = 1 + in.below(300);
  const index k = 1 + in.below(std::min<index>(E, 8));
  const cap::factor factor{.factor = in.pick<double>({1.0, 0.25, 0.5, 1.25, 2.0}),
                           .drop = static_cast<rs::drop_policy>(in.below(3)),
                           .min_capacity = in.pick<index>({0, 0, 1, 3}),
                           .pad_to_capacity = in.one_in(3),
                           .align = in.pick<index>({1, 1, 2, 4, 8}),
                           .seed = in.u64()};
  const rs::score score = in.pick({rs::score::softmax, rs::score::sigmoid, rs::score::identity});
  std::vector<float> x(static_cast<std::size_t>(std::max<index>(1, T * E)));
  for (float& v : x) v = in.value();
  const rs::matrix_view<const float> logits{x.data(), T, E};
  std::optional<rs::routing_plan> plan;
  const std::string error = error_of([&] {
    if (expert_choice) {
      plan =
          rs::router<ra::precomputed, rt::expert_choice, cap::factor>{{}, {.top_k = k, .score = score}, factor}.route(
              logits);
    } else if (dropless) {
      plan =
          rs::router<ra::precomputed, rt::token_choice, cap::dropless>{
              {}, {.top_k = k, .score = score}, {.align = factor.align}}
              .route(logits);
    } else {
      plan = rs::router<ra::precomputed, rt::token_choice, cap::factor>{{}, {.top_k = k, .score = score}, factor}.route(
          logits);
    }
  });
  require_resonance_error(error, "route");
  return plan;
}

// A plan from build_plan on a fuzzed candidate set, built on every backend and checked; nothing when
// the set (or the limits) are rejected.
std::optional<rs::routing_plan> built_plan(byte_source& in) {
  rs::candidate_set c;
  c.num_tokens = in.below(65);
  c.num_experts = 1 + in.below(300);
  const index T = c.num_tokens, E = c.num_experts;
  const bool priorities = in.one_in(4);
  for (index t = 0; t < T; ++t) {
    const index n = in.below(std::min<index>(E, 8) + 1);
    index e = in.below(E);
    for (index j = 0; j < n && e < E; ++j, e += 1 + in.below(4)) {
      c.expert.push_back(static_cast<id_type>(e));
      c.weight.push_back(in.value());
      if (priorities) c.priority.push_back(in.value());
    }
    c.offsets.push_back(static_cast<id_type>(c.expert.size()));
  }
  if (in.one_in(4)) {
    // A demand of at least the candidates (the others were dropped upstream).
    c.demand.assign(static_cast<std::size_t>(E), 0);
    for (id_type e : c.expert) ++c.demand[static_cast<std::size_t>(e)];
    for (id_type& d : c.demand) d += static_cast<id_type>(in.below(4));
  }
  if (in.one_in(4)) c.forced_drop = static_cast<rs::drop_policy>(in.below(3));
  // Now and then a set build_plan must reject (or, for a demand below the count, report as given).
  switch (c.size() > 0 ? in.below(24) : 0) {
    case 23:
      c.expert[static_cast<std::size_t>(in.below(c.size()))] = static_cast<id_type>(in.pick<index>({-1, E, id_max}));
      break;
    case 22:
      c.offsets[static_cast<std::size_t>(in.below(T + 1))] += static_cast<id_type>(in.pick<index>({-1, 1, 1000}));
      break;
    case 21:
      c.weight.pop_back();
      break;
    case 20:
      c.offsets.pop_back();
      break;
    case 19:
      if (!c.demand.empty())
        c.demand[static_cast<std::size_t>(in.below(E))] = static_cast<id_type>(in.pick<index>({-1, 0}));
      break;
    case 18:
      c.num_experts = in.pick<index>({0, -1, E - 1});
      break;
    case 17:
      c.forced_drop = static_cast<rs::drop_policy>(3);
      break;
    default:
      break;
  }
  const rs::capacity_limits lim{.capacity = in.pick<index>({-1, -1, 0, 1, 2, 3, 5, T / 4 + 1, 40, -2, huge}),
                                .drop = static_cast<rs::drop_policy>(in.below(4)),  // 3: invalid
                                .pad_to_capacity = in.one_in(3),
                                .align = in.pick<index>({1, 1, 1, 2, 3, 4, 8, 0, -1, huge}),
                                .seed = in.u64()};

  std::optional<rs::routing_plan> want;
  std::string want_error;
  resonance_fuzz::for_each_host_backend([&](const auto& be, const char* name) {
    std::optional<rs::routing_plan> got;
    const std::string error = error_of([&] { got = rs::to_host(be, rs::build_plan(be, c, lim)); });
    require_resonance_error(error, std::string("build_plan on ") + name);
    if (std::string(name) == "serial") {
      want = std::move(got);
      want_error = error;
      return;
    }
    require(error == want_error,
            std::string("build_plan on ") + name + " threw \"" + error + "\", serial \"" + want_error + "\"");
    if (got && want) {
      const std::string diff = resonance_test::plan_difference(*want, *got);
      require(diff.empty(), std::string("build_plan on ") + name + ": " + diff + " (serial's first)");
    }
  });
  // The brute force reads the candidate arrays by the offsets: only for a set build_plan accepted.
  if (want) {
    const std::string diff = resonance_test::plan_difference(conf::reference_plan(c, lim), *want);
    require(diff.empty(), "build_plan: brute force: " + diff + " (brute force first)");
  }
  return want;
}

// ---------------------------------------------------------------------------------------------------
// to_dense

struct geometry {
  index rows = 0, cols = 0, stride = 0;
  bool null_data = false;
};

// Usually the T×E shape with some gap columns; sometimes a wrong one.
geometry draw_geometry(byte_source& in, index T, index E) {
  geometry g{T, E, E, false};
  switch (in.below(10)) {
    case 9:
      g.rows = T + in.pick<index>({-1, 1, -T - 1});
      break;
    case 8:
      g.cols = E + in.pick<index>({-1, 1, -E - 1});
      break;
    case 7:
      g.null_data = true;
      break;
    default:
      break;
  }
  g.stride = in.one_in(8) ? g.cols - 1 : g.cols + in.pick<index>({0, 0, 1, 5});
  return g;
}

bool valid_geometry(const geometry& g, index T, index E) {
  return g.rows == T && g.cols == E && g.stride >= g.cols && (!g.null_data || T == 0 || E == 0);
}

// The elements a view of this geometry spans (1 for a malformed one: the export must not write it).
std::size_t extent(const geometry& g) {
  if (g.rows <= 0 || g.cols <= 0 || g.stride < g.cols) return 1;
  return static_cast<std::size_t>((g.rows - 1) * g.stride + g.cols);
}

template <class T>
T sentinel() {
  T v;
  std::memset(&v, 0xA5, sizeof(T));
  return v;
}

template <class T>
bool same_bytes(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

template <class P, class M>
void check_dense(byte_source& in, const rs::routing_plan& plan) {
  const index T = plan.num_tokens(), E = plan.num_experts();
  const geometry gp = draw_geometry(in, T, E), gm = draw_geometry(in, T, E);
  const bool valid = valid_geometry(gp, T, E) && valid_geometry(gm, T, E);
  count(0, valid);

  // What serial must write: zeros over the T×E entries, the kept weights and ones; gaps untouched.
  std::vector<P> want_p(extent(gp), sentinel<P>());
  std::vector<M> want_m(extent(gm), sentinel<M>());
  if (valid) {
    for (index t = 0; t < T; ++t)
      for (index e = 0; e < E; ++e) {
        want_p[static_cast<std::size_t>(t * gp.stride + e)] = P(0);
        want_m[static_cast<std::size_t>(t * gm.stride + e)] = M(0);
      }
    for (index t = 0; t < T; ++t)
      for (id_type i = plan.token_offsets()[t]; i < plan.token_offsets()[t + 1]; ++i) {
        const id_type e = plan.token_expert()[i];
        want_p[static_cast<std::size_t>(t * gp.stride + e)] = static_cast<P>(plan.token_weight()[i]);
        want_m[static_cast<std::size_t>(t * gm.stride + e)] = M(1);
      }
  }
  resonance_fuzz::for_each_host_backend([&](const auto& be, const char* name) {
    std::vector<P> p(extent(gp), sentinel<P>());
    std::vector<M> m(extent(gm), sentinel<M>());
    const rs::matrix_view<P> probs{gp.null_data ? nullptr : p.data(), gp.rows, gp.cols, gp.stride};
    const rs::matrix_view<M> mask{gm.null_data ? nullptr : m.data(), gm.rows, gm.cols, gm.stride};
    const std::string error = error_of([&] { rs::to_dense(be, plan, probs, mask); });
    const std::string what = std::string("to_dense on ") + name;
    require_resonance_error(error, what);
    require((error == "no throw") == valid, what + ": " + error + (valid ? "" : " for a malformed view"));
    require(same_bytes(p, want_p), what + ": probs differ from the plan's weights (or were written on error)");
    require(same_bytes(m, want_m), what + ": mask differs from the plan's pairs (or was written on error)");
  });
}

// ---------------------------------------------------------------------------------------------------
// to_block_aligned

void check_block_aligned(byte_source& in, const rs::routing_plan& plan) {
  const index block = in.pick<index>(
      {1, 1, 2, 3, 4, 8, 16, 64, 128, 0, -1, -huge, index{1} << 20, index{1} << 31, index{1} << 40, huge});
  const index E = plan.num_experts(), A = plan.num_assignments();
  index blocks = 0;
  if (block >= 1)
    for (index e = 0; e < E; ++e) {
      const index n = plan.expert_counts()[e];
      blocks += n == 0 ? 0 : (n - 1) / block + 1;
    }
  const bool valid = block >= 1 && blocks <= id_max / block;
  if (valid && blocks * block > max_output) {
    ++counts.skipped;
    return;
  }
  count(1, valid);

  const std::optional<rs::block_aligned_layout> want = on_every_backend<rs::block_aligned_layout>(
      "to_block_aligned(block " + std::to_string(block) + ")", valid,
      [&](const auto& be) { return rs::to_block_aligned(be, plan, block); },
      [](const rs::block_aligned_layout& a, const rs::block_aligned_layout& b) {
        return a.block == b.block && a.num_tokens_post_pad == b.num_tokens_post_pad &&
               a.sorted_token_ids == b.sorted_token_ids && a.expert_ids == b.expert_ids;
      });
  if (!want) return;

  const rs::block_aligned_layout& out = *want;
  require(out.block == block && out.num_tokens_post_pad == blocks * block &&
              static_cast<index>(out.sorted_token_ids.size()) == blocks * block &&
              static_cast<index>(out.expert_ids.size()) == blocks,
          "to_block_aligned: sizes");
  std::vector<char> seen(static_cast<std::size_t>(A), 0);
  index b = 0;
  for (index e = 0; e < E; ++e) {
    const index n = plan.expert_counts()[e], nb = n == 0 ? 0 : (n - 1) / block + 1;
    for (index j = 0; j < nb; ++j)
      require(out.expert_ids[static_cast<std::size_t>(b + j)] == e,
              "to_block_aligned: expert_ids of expert " + std::to_string(e));
    for (index j = 0; j < nb * block; ++j) {
      const id_type id = out.sorted_token_ids[static_cast<std::size_t>(b * block + j)];
      if (j >= n) {
        require(id == A, "to_block_aligned: padding of expert " + std::to_string(e) + " is " + std::to_string(id));
        continue;
      }
      // The j-th kept slot of e is CSR entry id: same slot, same expert, listed once.
      require(id >= 0 && id < A && plan.token_slot()[id] == plan.expert_offsets()[e] + j &&
                  plan.token_expert()[id] == e && !seen[static_cast<std::size_t>(id)],
              "to_block_aligned: entry " + std::to_string(j) + " of expert " + std::to_string(e) + " is " +
                  std::to_string(id));
      seen[static_cast<std::size_t>(id)] = 1;
    }
    b += nb;
  }
}

// ---------------------------------------------------------------------------------------------------
// to_rank_layout

void check_rank_layout(byte_source& in, const rs::routing_plan& plan) {
  const index T = plan.num_tokens(), E = plan.num_experts();
  rs::dist::expert_placement placement;
  placement.num_ranks = in.pick<index>({1, 1, 2, 3, 4, 8, E, 2 * E + 1, 0, -1, 513});
  placement.ranks_per_node = in.pick<index>({1, 1, 2, 4, 8, 3, 0, -1});
  const index R = placement.num_ranks;
  const index mode = in.below(8);
  const index n = mode == 3 ? E - 1 : mode == 4 ? E + 1 : E;
  const index salt = in.below(256);
  for (index e = 0; e < std::max<index>(n, 0); ++e) {
    // Contiguous blocks, round robin, or scattered by a multiplicative hash.
    index r = 0;
    if (R >= 1) r = mode == 0 ? e * R / std::max<index>(E, 1) : mode == 1 ? e % R : (e * 40503 + salt) % R;
    placement.rank_of_expert.push_back(static_cast<id_type>(r));
  }
  if (mode == 5 && !placement.rank_of_expert.empty())
    placement.rank_of_expert[static_cast<std::size_t>(in.below(n))] = static_cast<id_type>(in.pick<index>({-1, R}));

  bool valid = R >= 1 && placement.ranks_per_node >= 1 && R % placement.ranks_per_node == 0 &&
               static_cast<index>(placement.rank_of_expert.size()) == E;
  for (id_type r : placement.rank_of_expert) valid &= r >= 0 && r < R;
  count(2, valid);

  const std::optional<rs::rank_layout> want = on_every_backend<rs::rank_layout>(
      "to_rank_layout(" + std::to_string(R) + " ranks, " + std::to_string(placement.ranks_per_node) + " per node)",
      valid, [&](const auto& be) { return rs::to_rank_layout(be, plan, placement); },
      [](const rs::rank_layout& a, const rs::rank_layout& b) {
        return a.num_ranks == b.num_ranks && a.num_tokens_per_rank == b.num_tokens_per_rank &&
               a.num_tokens_per_node == b.num_tokens_per_node && a.num_tokens_per_expert == b.num_tokens_per_expert &&
               a.is_token_in_rank == b.is_token_in_rank;
      });
  if (!want) return;

  const rs::rank_layout& out = *want;
  const index per_node = placement.ranks_per_node, N = R / per_node;
  std::vector<std::uint8_t> in_rank(static_cast<std::size_t>(T * R), 0);
  std::vector<id_type> per_rank(static_cast<std::size_t>(R), 0), per_node_count(static_cast<std::size_t>(N), 0);
  for (index t = 0; t < T; ++t) {
    for (id_type i = plan.token_offsets()[t]; i < plan.token_offsets()[t + 1]; ++i)
      in_rank[static_cast<std::size_t>(t * R + placement.rank_of_expert[plan.token_expert()[i]])] = 1;
    for (index r = 0; r < R; ++r) per_rank[static_cast<std::size_t>(r)] += in_rank[static_cast<std::size_t>(t * R + r)];
    for (index node = 0; node < N; ++node) {
      bool hit = false;
      for (index r = node * per_node; r < (node + 1) * per_node; ++r)
        hit |= in_rank[static_cast<std::size_t>(t * R + r)] != 0;
      per_node_count[static_cast<std::size_t>(node)] += hit ? 1 : 0;
    }
  }
  const std::vector<id_type> per_expert(plan.expert_counts().begin(), plan.expert_counts().end());
  require(out.num_ranks == R, "to_rank_layout: num_ranks");
  require(out.is_token_in_rank == in_rank, "to_rank_layout: is_token_in_rank differs from the token CSR's ranks");
  require(out.num_tokens_per_rank == per_rank, "to_rank_layout: num_tokens_per_rank");
  require(out.num_tokens_per_node == per_node_count, "to_rank_layout: num_tokens_per_node");
  require(out.num_tokens_per_expert == per_expert, "to_rank_layout: num_tokens_per_expert");
}

}  // namespace

// The first export_bytes bytes choose the exports' arguments, the rest the plan: a plan's logits can
// take any number of bytes, and the arguments must stay within reach of short inputs.
constexpr std::size_t export_bytes = 16;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::size_t head = std::min(size, export_bytes);
  byte_source args(data, head);
  byte_source in(data + head, size - head);
  std::optional<rs::routing_plan> plan;
  ++counts.inputs;
  switch (in.below(4)) {
    case 0:
    case 1:
      plan = routed_plan(in);
      counts.routed += plan ? 1 : 0;
      break;
    case 2:
      plan = built_plan(in);
      counts.built += plan ? 1 : 0;
      break;
    default:
      plan = rs::routing_plan{};  // no tokens, no experts
      ++counts.empty;
  }
  if (!plan) return 0;
  if (args.one_in(2))
    check_dense<double, float>(args, *plan);
  else
    check_dense<float, std::uint8_t>(args, *plan);
  check_block_aligned(args, *plan);
  check_rank_layout(args, *plan);
  return 0;
}
