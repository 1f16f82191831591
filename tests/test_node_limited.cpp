// Node-limited routing (DeepSeek-V3): token choice whose groups come from an expert -> group map
// (token_choice::expert_group, e.g. a placement's node_of_expert()), checked against a brute-force
// reference written here: the selection keys in fp32 as token choice forms them, each group scored by
// sorting its keys (the top m summed largest first), the groups ranked by a full sort (ties to the
// lowest group), then a full sort of the kept groups' experts (ties to the lowest expert). The weights
// are checked bit for bit against ungrouped token choice on the same row with the experts of the
// other groups masked by a large negative bias (the weights never read the bias).

#include <algorithm>
#include <bit>
#include <cstdint>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/resonance.hpp>

#include "backends.hpp"
#include "error_of.hpp"

namespace {

namespace rs = resonance;
namespace rt = resonance::routing;
using resonance_test::error_of;
using resonance_test::plan_difference;

std::size_t sz(rs::index n) { return static_cast<std::size_t>(n); }

using dropless_router = rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::dropless>;

rs::routing_plan route(const rt::token_choice& p, const std::vector<float>& x, rs::index T, rs::index E) {
  return dropless_router{{}, p, {}}.route(rs::backend::serial{}, rs::matrix_view<const float>{x.data(), T, E});
}

// ---- The reference.

// The fp32 key token choice ranks expert e by: the logit / temperature (softmax after the top-k) or
// the score, plus the selection-only bias.
std::vector<float> selection_keys(const rt::token_choice& p, const float* row, rs::index E) {
  const float inv_t = 1.0f / p.temperature;
  std::vector<float> base(row, row + E);
  float scale = inv_t;
  if (p.score != rs::score::softmax || p.pre_softmax) {
    rs::detail::score_row(p.score, row, base.data(), E, inv_t);  // the scores themselves are not under test
    scale = 1.0f;
  }
  std::vector<float> key(sz(E));
  for (rs::index e = 0; e < E; ++e)
    key[sz(e)] = base[sz(e)] * scale + (p.expert_bias.empty() ? 0.0f : p.expert_bias[e]);
  return key;
}

// Ids ranked by key descending, ties to the lower id (a full sort).
std::vector<rs::index> ranked(const std::vector<float>& key, std::vector<rs::index> ids) {
  std::sort(ids.begin(), ids.end(),
            [&](rs::index a, rs::index b) { return key[sz(a)] != key[sz(b)] ? key[sz(a)] > key[sz(b)] : a < b; });
  return ids;
}

// The experts token choice keeps for one row (ascending), and the groups it keeps.
struct reference_row {
  std::vector<rs::index> expert;
  std::vector<rs::index> kept_groups;
};

reference_row reference(const rt::token_choice& p, const float* row, rs::index E) {
  const std::vector<float> key = selection_keys(p, row, E);
  const rs::index G = p.num_groups, M = p.group_topk, k = p.top_k;
  const rs::index m = p.group_scoring == rt::group_score::top_m_sum  ? k / M
                      : p.group_scoring == rt::group_score::top2_sum ? 2
                                                                     : 1;
  std::vector<float> score(sz(G));
  for (rs::index g = 0; g < G; ++g) {
    std::vector<float> member;
    for (rs::index e = 0; e < E; ++e)
      if (p.expert_group[e] == g) member.push_back(key[sz(e)]);
    std::sort(member.begin(), member.end(), std::greater<>());
    float s = 0.0f;  // largest first, in fp32
    for (std::size_t j = 0; j < member.size() && j < sz(m); ++j) s += member[j];
    score[sz(g)] = s;
  }
  std::vector<rs::index> groups(sz(G));
  std::iota(groups.begin(), groups.end(), rs::index{0});
  groups = ranked(score, groups);
  groups.resize(sz(M));
  std::vector<rs::index> pool;
  for (rs::index e = 0; e < E; ++e)
    if (std::find(groups.begin(), groups.end(), p.expert_group[e]) != groups.end()) pool.push_back(e);
  std::vector<rs::index> chosen = ranked(key, pool);
  chosen.resize(sz(k));
  std::sort(chosen.begin(), chosen.end());
  std::sort(groups.begin(), groups.end());
  return {chosen, groups};
}

// Ungrouped token choice on row alone, with the experts outside `allowed` masked off by the bias: the
// node-limited selection's weights, from a path that knows nothing of groups.
rs::routing_plan masked_route(const rt::token_choice& p, const float* row, rs::index E,
                              const std::vector<rs::index>& kept_groups) {
  std::vector<float> bias(sz(E));
  for (rs::index e = 0; e < E; ++e) {
    const bool allowed = std::find(kept_groups.begin(), kept_groups.end(), p.expert_group[e]) != kept_groups.end();
    bias[sz(e)] = allowed ? (p.expert_bias.empty() ? 0.0f : p.expert_bias[e]) : -1.0e30f;
  }
  rt::token_choice flat = p;
  flat.num_groups = 0;
  flat.group_topk = 0;
  flat.expert_group = {};
  flat.expert_bias = {bias.data(), E};
  const std::vector<float> x(row, row + E);
  return route(flat, x, 1, E);
}

// ---- Random cases.

enum class map_kind { round_robin, uneven_blocks, random, placement };

// A map of E experts onto G groups, every group non-empty.
std::vector<rs::id_type> make_map(map_kind kind, rs::index E, rs::index G, std::mt19937_64& rng) {
  std::vector<rs::id_type> map(sz(E));
  switch (kind) {
    case map_kind::round_robin:
      for (rs::index e = 0; e < E; ++e) map[sz(e)] = static_cast<rs::id_type>(e % G);
      break;
    case map_kind::uneven_blocks:  // contiguous, sizes differing by one when G does not divide E
      for (rs::index e = 0; e < E; ++e) map[sz(e)] = static_cast<rs::id_type>(e * G / E);
      break;
    case map_kind::random: {
      for (rs::index e = 0; e < E; ++e)
        map[sz(e)] = static_cast<rs::id_type>(e < G ? e : std::uniform_int_distribution<rs::index>(0, G - 1)(rng));
      std::shuffle(map.begin(), map.end(), rng);
      break;
    }
    case map_kind::placement: {  // a round-robin placement over 2 ranks per node
      rs::dist::expert_placement pl{2 * G, 2, std::vector<rs::id_type>(sz(E))};
      for (rs::index e = 0; e < E; ++e) pl.rank_of_expert[sz(e)] = static_cast<rs::id_type>(e % (2 * G));
      pl.validate(E);
      map = pl.node_of_expert();
      break;
    }
  }
  return map;
}

std::vector<rs::index> group_sizes(const std::vector<rs::id_type>& map, rs::index G) {
  std::vector<rs::index> s(sz(G), 0);
  for (rs::id_type g : map) ++s[static_cast<std::size_t>(g)];
  return s;
}

// Logits on a coarse grid (many exact ties), or spread ones.
std::vector<float> make_logits(std::mt19937_64& rng, rs::index T, rs::index E, bool ties) {
  std::vector<float> x(sz(T * E));
  std::uniform_int_distribution<int> grid(-4, 4);
  std::normal_distribution<float> normal(0.0f, 1.5f);
  for (float& v : x) v = ties ? 0.5f * static_cast<float>(grid(rng)) : normal(rng);
  return x;
}

// One random node-limited case: the policy views `map` and `bias`, which the case owns.
struct random_case {
  rs::index T = 0, E = 0;
  map_kind kind = map_kind::round_robin;
  std::vector<rs::id_type> map;
  std::vector<float> bias;
  std::vector<float> x;
  rt::token_choice p;
  std::string text;
};

random_case draw_case(std::mt19937_64& rng, rs::index T) {
  static const rs::index experts[] = {3, 5, 6, 7, 9, 10, 12, 13, 16, 20, 33};
  const auto pick = [&](rs::index lo, rs::index hi) { return std::uniform_int_distribution<rs::index>(lo, hi)(rng); };
  for (;;) {
    random_case c;
    c.T = T;
    c.E = experts[pick(0, static_cast<rs::index>(std::size(experts)) - 1)];
    const rs::index G = pick(2, std::min<rs::index>(c.E, 6));
    c.kind = static_cast<map_kind>(pick(0, 3));
    if (c.kind == map_kind::placement && c.E < 2 * G - 1) c.kind = map_kind::round_robin;  // nodes non-empty
    c.map = make_map(c.kind, c.E, G, rng);
    std::vector<rs::index> sizes = group_sizes(c.map, G);
    std::sort(sizes.begin(), sizes.end());
    const rs::index M = pick(1, G);
    const rs::index most = std::accumulate(sizes.begin(), sizes.begin() + M, rs::index{0});
    const auto kind = static_cast<rt::group_score>(pick(0, 2));
    const rs::index least = kind == rt::group_score::top_m_sum ? M : 1;
    if (least > most) continue;
    rt::token_choice& p = c.p;
    p.top_k = pick(least, std::min<rs::index>(most, 8));
    switch (pick(0, 3)) {
      case 0:
        p.score = rs::score::softmax;
        break;
      case 1:
        p.score = rs::score::softmax;
        p.pre_softmax = true;
        break;
      case 2:
        p.score = rs::score::sigmoid;
        break;
      default:
        p.score = rs::score::sqrt_softplus;
        break;
    }
    p.temperature = pick(0, 2) == 0 ? 0.75f : 1.0f;
    p.scaling_factor = pick(0, 3) == 0 ? 2.5f : 1.0f;
    p.num_groups = G;
    p.group_topk = M;
    p.group_scoring = kind;
    if (pick(0, 1) == 1) {
      std::uniform_int_distribution<int> b(-2, 2);
      c.bias.resize(sz(c.E));
      for (float& v : c.bias) v = 0.25f * static_cast<float>(b(rng));  // ties too
    }
    c.x = make_logits(rng, T, c.E, pick(0, 2) != 0);
    c.text = "E=" + std::to_string(c.E) + " G=" + std::to_string(G) + " M=" + std::to_string(M) +
             " k=" + std::to_string(p.top_k) + " map=" + std::to_string(static_cast<int>(c.kind)) +
             " group_score=" + std::to_string(static_cast<int>(kind)) +
             " score=" + std::to_string(static_cast<int>(p.score)) + (p.pre_softmax ? " pre" : "") +
             (c.bias.empty() ? "" : " bias");
    return c;
  }
}

// The policy of c viewing c's arrays (re-taken after a copy of the case).
rt::token_choice policy_of(const random_case& c) {
  rt::token_choice p = c.p;
  p.expert_group = {c.map.data(), c.E};
  if (!c.bias.empty()) p.expert_bias = {c.bias.data(), c.E};
  return p;
}

}  // namespace

TEST_CASE("node_limited: token choice over an expert -> group map matches the brute-force reference") {
  std::mt19937_64 rng(20240611);
  int cases = 0, limited = 0, non_contiguous = 0, uneven = 0;
  int kinds[3] = {0, 0, 0}, maps[4] = {0, 0, 0, 0};
  for (int i = 0; i < 400; ++i) {
    const random_case c = draw_case(rng, 12);
    const rt::token_choice p = policy_of(c);
    CAPTURE(c.text);
    REQUIRE_NOTHROW(p.validate(c.E));
    const rs::routing_plan plan = route(p, c.x, c.T, c.E);
    const auto off = plan.token_offsets();
    const auto ex = plan.token_expert();
    const auto w = plan.token_weight();
    for (rs::index t = 0; t < c.T; ++t) {
      CAPTURE(t);
      const float* row = c.x.data() + t * c.E;
      const reference_row want = reference(p, row, c.E);
      std::vector<rs::index> got(ex.begin() + off[sz(t)], ex.begin() + off[sz(t + 1)]);
      REQUIRE(got == want.expert);
      // At most group_topk groups (nodes) per token.
      std::set<rs::id_type> spanned;
      for (rs::index e : got) spanned.insert(c.map[sz(e)]);
      CHECK(static_cast<rs::index>(spanned.size()) <= p.group_topk);
      // The weights, bit for bit, from ungrouped token choice over the kept groups' experts.
      const rs::routing_plan flat = masked_route(p, row, c.E, want.kept_groups);
      REQUIRE(std::equal(flat.token_expert().begin(), flat.token_expert().end(), got.begin(), got.end()));
      for (std::size_t j = 0; j < got.size(); ++j)
        CHECK(std::bit_cast<std::uint32_t>(w[sz(off[sz(t)]) + j]) ==
              std::bit_cast<std::uint32_t>(flat.token_weight()[j]));
      // Whether the limit mattered: the token's plain top-k would have spanned more groups.
      rt::token_choice plain = p;
      plain.num_groups = 0;
      plain.group_topk = 0;
      plain.expert_group = {};
      const std::vector<float> one(row, row + c.E);
      const rs::routing_plan plain_plan = route(plain, one, 1, c.E);
      std::set<rs::id_type> plain_groups;
      for (rs::id_type e : plain_plan.token_expert()) plain_groups.insert(c.map[sz(e)]);
      limited += static_cast<rs::index>(plain_groups.size()) > p.group_topk ? 1 : 0;
    }
    ++cases;
    ++kinds[static_cast<int>(p.group_scoring)];
    ++maps[static_cast<int>(c.kind)];
    non_contiguous += std::is_sorted(c.map.begin(), c.map.end()) ? 0 : 1;
    uneven += c.E % p.num_groups != 0 ? 1 : 0;
  }
  // The draws reach every kind of case.
  CHECK(cases == 400);
  CHECK(limited >= 200);
  CHECK(non_contiguous >= 150);
  CHECK(uneven >= 100);
  for (int n : kinds) CHECK(n >= 80);
  for (int n : maps) CHECK(n >= 60);
}

TEST_CASE("node_limited: a contiguous map gives the contiguous-group path's plan, bit for bit") {
  std::mt19937_64 rng(7);
  int compared = 0;
  for (int i = 0; i < 300; ++i) {
    random_case c = draw_case(rng, 40);
    const rs::index G = c.p.num_groups;
    if (c.E % G != 0) continue;
    for (rs::index e = 0; e < c.E; ++e) c.map[sz(e)] = static_cast<rs::id_type>(e / (c.E / G));
    if (c.p.top_k > c.p.group_topk * (c.E / G)) continue;
    const rt::token_choice mapped = policy_of(c);
    rt::token_choice contiguous = mapped;
    contiguous.expert_group = {};
    CAPTURE(c.text);
    const std::string diff = plan_difference(route(contiguous, c.x, c.T, c.E), route(mapped, c.x, c.T, c.E));
    CHECK_MESSAGE(diff.empty(), diff);
    ++compared;
  }
  CHECK(compared >= 60);
}

TEST_CASE("node_limited: every host backend, and the scrambled one, gives serial's plan") {
  std::mt19937_64 rng(99);
  for (int i = 0; i < 24; ++i) {
    const random_case c = draw_case(rng, i % 3 == 0 ? 700 : 37);  // several blocks on the threaded backends
    const rt::token_choice p = policy_of(c);
    const rs::matrix_view<const float> x{c.x.data(), c.T, c.E};
    const dropless_router dropless{{}, p, {}};
    const rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::factor> capped{{}, p, {.factor = 0.75}};
    const rs::routing_plan want = dropless.route(rs::backend::serial{}, x);
    const rs::routing_plan want_capped = capped.route(rs::backend::serial{}, x);
    resonance_test::for_each_backend_and_scrambled([&](const auto& be, const std::string& name) {
      CAPTURE(name);
      CAPTURE(c.text);
      const std::string diff = plan_difference(want, dropless.route(be, x));
      CHECK_MESSAGE(diff.empty(), diff);
      const std::string diff_capped = plan_difference(want_capped, capped.route(be, x));
      CHECK_MESSAGE(diff_capped.empty(), diff_capped);
    });
  }
}

TEST_CASE("node_limited: placement.node_of_expert is the group map of a round-robin placement") {
  // 12 experts round-robin over 6 ranks, 2 ranks per node: 3 nodes, none of them a range of ids.
  const rs::index E = 12;
  rs::dist::expert_placement placement{6, 2, {}};
  for (rs::index e = 0; e < E; ++e) placement.rank_of_expert.push_back(static_cast<rs::id_type>(e % 6));
  REQUIRE_NOTHROW(placement.validate(E));
  const std::vector<rs::id_type> nodes = placement.node_of_expert();
  CHECK(nodes == std::vector<rs::id_type>{0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2});
  CHECK(placement.num_nodes() == 3);
  CHECK_NOTHROW(placement.validate(E));  // node_of_expert leaves the placement as it was

  const rt::token_choice p{.top_k = 4,
                           .score = rs::score::sigmoid,
                           .num_groups = placement.num_nodes(),
                           .group_topk = 2,
                           .group_scoring = rt::group_score::top2_sum,
                           .expert_group = {nodes.data(), E}};
  CHECK_NOTHROW(p.validate(E));
  std::mt19937_64 rng(3);
  const std::vector<float> x = make_logits(rng, 64, E, false);
  const rs::routing_plan plan = route(p, x, 64, E);
  const auto off = plan.token_offsets();
  const auto ex = plan.token_expert();
  for (rs::index t = 0; t < 64; ++t) {
    std::set<rs::index> on;
    for (rs::id_type i = off[sz(t)]; i < off[sz(t + 1)]; ++i)
      on.insert(placement.rank_of_expert[sz(ex[sz(i)])] / placement.ranks_per_node);
    CHECK(on.size() <= 2);
    CHECK(off[sz(t + 1)] - off[sz(t)] == 4);
  }

  // A contiguous placement's nodes are contiguous blocks: the map equals the contiguous groups.
  const auto blocks = rs::dist::expert_placement::contiguous(E, 4, 2);
  CHECK(blocks.node_of_expert() == std::vector<rs::id_type>{0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1});
  const std::vector<rs::id_type> block_nodes = blocks.node_of_expert();
  rt::token_choice q = p;
  q.num_groups = blocks.num_nodes();
  q.group_topk = 1;
  q.expert_group = {block_nodes.data(), E};
  rt::token_choice q_contiguous = q;
  q_contiguous.expert_group = {};
  CHECK(route(q, x, 64, E) == route(q_contiguous, x, 64, E));

  // A placement with ranks_per_node 0 has no nodes.
  rs::dist::expert_placement bad{2, 0, {0, 1}};
  CHECK(error_of([&] { (void)bad.node_of_expert(); }) ==
        "resonance: placement.ranks_per_node: expected ranks_per_node >= 1, got 0");
}

TEST_CASE("node_limited: bidirectional forwards expert_group to its proposal") {
  const rs::index E = 10, T = 50;
  const std::vector<rs::id_type> map{0, 1, 2, 0, 1, 2, 0, 1, 2, 0};
  const rt::bidirectional bi{.top_k = 3,
                             .num_groups = 3,
                             .group_topk = 2,
                             .group_scoring = rt::group_score::max,
                             .expert_group = {map.data(), E}};
  CHECK(bi.proposal().expert_group == bi.expert_group);
  std::mt19937_64 rng(11);
  const std::vector<float> x = make_logits(rng, T, E, true);
  const rs::matrix_view<const float> xv{x.data(), T, E};
  const rs::routing_plan tc = route(bi.proposal(), x, T, E);
  // A capacity no expert reaches: every proposal is kept, so the plan's pairs are token choice's.
  const rs::routing_plan both = rs::router<rs::affinity::precomputed, rt::bidirectional, rs::capacity::factor>{
      {}, bi, {.factor = 100.0}}.route(rs::backend::serial{}, xv);
  CHECK(std::ranges::equal(both.token_offsets(), tc.token_offsets()));
  CHECK(std::ranges::equal(both.token_expert(), tc.token_expert()));
  CHECK(std::ranges::equal(both.token_weight(), tc.token_weight()));
  // Its validation is token choice's.
  rt::bidirectional bad = bi;
  bad.expert_group.size = E - 1;
  CHECK(error_of([&] { bad.validate(E); }) == "resonance: expert_group: expected 10 entries (one per expert), got 9");
}

TEST_CASE("node_limited: weight_backward re-selects over the map") {
  const rs::index E = 9, T = 40;
  const std::vector<rs::id_type> map{0, 1, 2, 0, 1, 2, 0, 1, 2};  // not contiguous, E % 3 == 0
  const rt::token_choice p{.top_k = 3,
                           .score = rs::score::sigmoid,
                           .num_groups = 3,
                           .group_topk = 1,
                           .group_scoring = rt::group_score::top2_sum,
                           .expert_group = {map.data(), E}};
  rt::token_choice contiguous = p;
  contiguous.expert_group = {};
  std::mt19937_64 rng(5);
  const std::vector<float> x = make_logits(rng, T, E, false);
  const rs::routing_plan plan = route(p, x, T, E);
  REQUIRE(plan != route(contiguous, x, T, E));  // the map matters for these logits
  const std::vector<float> dw(sz(plan.num_assignments()), 1.0f);
  std::vector<float> dl(sz(T * E), 0.0f);
  const auto backward = [&](const rt::token_choice& q) {
    weight_backward(rs::backend::serial{}, q, rs::matrix_view<const float>{x.data(), T, E}, plan.view(),
                    rs::vector_view<const float>{dw.data(), plan.num_assignments()},
                    rs::matrix_view<float>{dl.data(), T, E});
  };
  CHECK(error_of([&] { backward(p); }) == "no throw");
  // The contiguous groups select other experts for some token: the plan is not theirs.
  const std::vector<float> before = dl;
  CHECK(error_of([&] { backward(contiguous); }).find("resonance: plan:") == 0);
  CHECK(dl == before);  // nothing written
}

TEST_CASE("node_limited: scratch and the warp path") {
  const std::vector<rs::id_type> map{0, 1, 2, 0, 1, 2, 0};
  rt::token_choice p{.top_k = 4, .num_groups = 3, .group_topk = 2, .expert_group = {map.data(), 7}};
  // A top-m list per group (m = k / group_topk = 2), the kept groups and a flag per group.
  CHECK(p.scratch_size(7) == 7 + 4 + 3 * 2 + 2 * 3);
  p.group_scoring = rt::group_score::max;
  CHECK(p.scratch_size(7) == 7 + 4 + 3 * 1 + 2 * 3);
  // The lanes' selection has no group limit: a grouped policy keeps the per-row path, mapped or not.
  CHECK(!rt::kernel::warp_selectable(p, 7));
  p.num_groups = 1;
  p.group_topk = 1;
  std::vector<rs::id_type> one(7, 0);
  p.expert_group = {one.data(), 7};
  CHECK(rt::kernel::warp_selectable(p, 7));  // a single group limits nothing
}

TEST_CASE("node_limited: every invalid expert_group is an error naming it, and nothing is written") {
  const rs::index E = 6;
  std::vector<float> x(sz(4 * E));
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 7) * 0.5f;
  const rs::matrix_view<const float> xv{x.data(), 4, E};
  const std::vector<rs::id_type> good{0, 1, 2, 0, 1, 2};
  const rt::token_choice base{.top_k = 2, .num_groups = 3, .group_topk = 2, .expert_group = {good.data(), E}};
  const rs::routing_plan before = dropless_router{{}, base, {}}.route(rs::backend::serial{}, xv);
  // The error route_into throws into an existing plan, which then keeps its contents; validate's is the same.
  const auto error = [&](const rt::token_choice& p) {
    rs::route_workspace<rs::backend::serial> ws;
    rs::routing_plan plan = before;
    const std::string e = error_of([&] { dropless_router{{}, p, {}}.route_into(rs::backend::serial{}, xv, ws, plan); });
    if (e != "no throw") CHECK(plan == before);
    CHECK(error_of([&] { p.validate(E); }) == e);
    return e;
  };
  const auto with_map = [&](const std::vector<rs::id_type>& map, rs::index groups = 3, rs::index kept = 2,
                            rs::index k = 2) {
    rt::token_choice p = base;
    p.expert_group = {map.data(), static_cast<rs::index>(map.size())};
    p.num_groups = groups;
    p.group_topk = kept;
    p.top_k = k;
    return p;
  };

  const std::vector<rs::id_type> short_map{0, 1, 2, 0, 1};
  CHECK(error(with_map(short_map)) == "resonance: expert_group: expected 6 entries (one per expert), got 5");
  rt::token_choice null_data = base;
  null_data.expert_group.data = nullptr;
  CHECK(error(null_data) == "resonance: expert_group: expected non-null data");
  const std::vector<rs::id_type> zeros(sz(E), 0);
  CHECK(error(with_map(zeros, 0, 0)) ==
        "resonance: expert_group: expected num_groups >= 1 (the number of groups its entries name), got "
        "num_groups = 0");
  const std::vector<rs::id_type> too_big{0, 1, 3, 0, 1, 2};
  CHECK(error(with_map(too_big)) ==
        "resonance: expert_group: expected groups in [0, num_groups), got expert_group[2] = 3 with num_groups = 3");
  const std::vector<rs::id_type> negative{0, 1, 2, -1, 1, 2};
  CHECK(error(with_map(negative)) ==
        "resonance: expert_group: expected groups in [0, num_groups), got expert_group[3] = -1 with num_groups = 3");
  const std::vector<rs::id_type> gap{0, 1, 3, 0, 1, 3};
  CHECK(error(with_map(gap, 4, 2)) ==
        "resonance: expert_group: expected every group in [0, num_groups) non-empty, got no expert in group 2");
  CHECK(error(with_map(good, 7, 2)) ==
        "resonance: expert_group: expected every group in [0, num_groups) non-empty, got num_groups = 7 > "
        "num_experts = 6");
  // Groups of 1, 1 and 4 experts: two kept groups may hold only 2 experts.
  const std::vector<rs::id_type> lopsided{0, 1, 2, 2, 2, 2};
  CHECK(error(with_map(lopsided, 3, 2, 3)) ==
        "resonance: top_k: expected at most the experts of the group_topk smallest groups of expert_group (2), got 3");
  CHECK(error(with_map(lopsided, 3, 3, 3)) == "no throw");  // all three groups kept: 6 experts
  CHECK(error_of([&] { with_map(lopsided, 3, 2, 2).validate(E); }) == "no throw");
  // The group options' own checks still apply with a map.
  CHECK(error(with_map(good, 3, 0)).find("resonance: group_topk:") == 0);
  CHECK(error(with_map(good, 3, 4)).find("resonance: group_topk:") == 0);
  CHECK(error(with_map(good, 3, 3, 2)).find("resonance: group_topk: expected group_topk <= top_k") == 0);
  // With a map the number of experts need not be a multiple of the groups (6 experts, 4 groups).
  const std::vector<rs::id_type> four{0, 1, 2, 3, 0, 1};
  CHECK(error(with_map(four, 4, 2)) == "no throw");
  // A single group limits nothing, and its map may only name group 0.
  CHECK(error(with_map(zeros, 1, 1)) == "no throw");
  CHECK(error(with_map(good, 1, 1)).find("resonance: expert_group: expected groups in [0, num_groups)") == 0);
}
