#pragma once

// Independent references for the routing tests: a brute-force restatement of Megatron-Core's
// topk_routing_with_score_function in double (std::stable_sort, no shared code with the library), a
// generator of tie-free logits, and a checker of the routing-plan invariants of DESIGN.md section 4.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/resonance.hpp>

namespace resonance_test {

namespace rs = resonance;

inline std::size_t sz(rs::index n) { return static_cast<std::size_t>(n); }

// One token's reference selection: experts ascending, their weights, and the smallest gap met by any
// ranking decision (between the last kept and the first rejected key or group score), relative to the
// magnitude of the summands of a key. A margin near zero means fp32 rounding could legitimately flip
// the choice, so the generator redraws such rows.
struct ref_choice {
  std::vector<rs::index> expert;
  std::vector<double> weight;
  double margin = std::numeric_limits<double>::infinity();
};

inline double ref_elementwise(rs::score fn, double z) {
  switch (fn) {
    case rs::score::sigmoid:
      return 1.0 / (1.0 + std::exp(-z));
    case rs::score::sqrt_softplus:
      return std::sqrt(z > 20.0 ? z : std::log1p(std::exp(z)));
    default:
      return z;  // identity
  }
}

// (key, id) ranked by key descending, ties to the lower id: std::stable_sort over ascending ids.
inline std::vector<rs::index> ref_rank(const std::vector<double>& key, std::vector<rs::index> ids) {
  std::stable_sort(ids.begin(), ids.end(), [&](rs::index a, rs::index b) { return key[sz(a)] > key[sz(b)]; });
  return ids;
}

// Megatron-Core's topk_routing_with_score_function for one row of E logits.
inline ref_choice ref_token_choice(const rs::routing::token_choice& p, const float* logits, rs::index E) {
  namespace rt = rs::routing;
  ref_choice out;
  const rs::index k = p.top_k;
  std::vector<double> z(sz(E));
  for (rs::index e = 0; e < E; ++e) z[sz(e)] = static_cast<double>(logits[e]) / static_cast<double>(p.temperature);

  const bool post_softmax = p.score == rs::score::softmax && !p.pre_softmax;
  std::vector<double> s(sz(E));  // unbiased scores over all E (unused for softmax after top-k)
  if (p.score == rs::score::softmax) {
    const double m = *std::max_element(z.begin(), z.end());
    double sum = 0.0;
    for (rs::index e = 0; e < E; ++e) sum += std::exp(z[sz(e)] - m);
    for (rs::index e = 0; e < E; ++e) s[sz(e)] = std::exp(z[sz(e)] - m) / sum;
  } else {
    for (rs::index e = 0; e < E; ++e) s[sz(e)] = ref_elementwise(p.score, z[sz(e)]);
  }

  // Selection key: logits (softmax after top-k) or scores, plus the selection-only bias.
  std::vector<double> key(sz(E));
  double magnitude = 1e-30;  // largest |base| + |bias|: the scale of fp32 rounding in a key
  for (rs::index e = 0; e < E; ++e) {
    const double base = post_softmax ? z[sz(e)] : s[sz(e)];
    const double bias = p.expert_bias.empty() ? 0.0 : static_cast<double>(p.expert_bias[e]);
    key[sz(e)] = base + bias;
    magnitude = std::max(magnitude, std::fabs(base) + std::fabs(bias));
  }

  std::vector<rs::index> pool;  // experts eligible for the final top-k
  if (p.num_groups > 1) {
    const rs::index G = p.num_groups, size = E / G, M = p.group_topk;
    rs::index m = 1;
    if (p.group_scoring == rt::group_score::top_m_sum) m = k / M;
    if (p.group_scoring == rt::group_score::top2_sum) m = 2;
    m = std::min(m, size);
    std::vector<double> gscore(sz(G));
    for (rs::index g = 0; g < G; ++g) {
      std::vector<double> member(key.begin() + g * size, key.begin() + (g + 1) * size);
      std::sort(member.begin(), member.end(), std::greater<>());
      gscore[sz(g)] = std::accumulate(member.begin(), member.begin() + m, 0.0);
    }
    std::vector<rs::index> gid(sz(G));
    std::iota(gid.begin(), gid.end(), rs::index{0});
    gid = ref_rank(gscore, gid);
    if (M < G)
      out.margin = (gscore[sz(gid[sz(M - 1)])] - gscore[sz(gid[sz(M)])]) / (magnitude * static_cast<double>(m));
    gid.resize(sz(M));
    std::sort(gid.begin(), gid.end());
    for (rs::index g : gid)
      for (rs::index e = g * size; e < (g + 1) * size; ++e) pool.push_back(e);
  } else {
    pool.resize(sz(E));
    std::iota(pool.begin(), pool.end(), rs::index{0});
  }
  std::vector<rs::index> ranked = ref_rank(key, pool);
  if (sz(k) < ranked.size())
    out.margin = std::min(out.margin, (key[sz(ranked[sz(k - 1)])] - key[sz(ranked[sz(k)])]) / magnitude);
  ranked.resize(sz(k));
  std::sort(ranked.begin(), ranked.end());
  out.expert = ranked;

  // Weights from the unbiased values.
  if (post_softmax) {
    double m = -std::numeric_limits<double>::infinity();
    for (rs::index e : out.expert) m = std::max(m, z[sz(e)]);
    double sum = 0.0;
    for (rs::index e : out.expert) sum += std::exp(z[sz(e)] - m);
    for (rs::index e : out.expert) out.weight.push_back(std::exp(z[sz(e)] - m) / sum);
  } else {
    for (rs::index e : out.expert) out.weight.push_back(s[sz(e)]);
    const bool elementwise = p.score == rs::score::sigmoid || p.score == rs::score::sqrt_softplus;
    const bool renorm =
        p.renorm == rt::renormalize::always || (p.renorm == rt::renormalize::automatic && elementwise && k > 1);
    if (renorm) {
      const double sum = std::accumulate(out.weight.begin(), out.weight.end(), 0.0);
      for (double& w : out.weight) w /= sum + static_cast<double>(p.renorm_epsilon);
    }
  }
  for (double& w : out.weight) w *= static_cast<double>(p.scaling_factor);
  return out;
}

// T×E logits, each row E distinct values of the grid (spread / 2E)·[-2E, 2E). A row whose reference
// selection sits within a relative `min_margin` of a tie (a bias or group sums can make one) is redrawn.
inline std::vector<float> tie_free_logits(std::mt19937_64& rng, rs::index T, rs::index E,
                                          const rs::routing::token_choice& p, double spread = 3.0,
                                          double min_margin = 1e-5) {
  std::vector<float> x(sz(T * E));
  std::vector<int> grid(sz(4 * E));
  std::iota(grid.begin(), grid.end(), static_cast<int>(-2 * E));
  const double step = spread / static_cast<double>(2 * E);
  for (rs::index t = 0; t < T; ++t) {
    float* row = x.data() + t * E;
    for (int attempt = 0;; ++attempt) {
      REQUIRE(attempt < 200);  // the options leave no tie-free row: a test bug
      std::shuffle(grid.begin(), grid.end(), rng);
      for (rs::index e = 0; e < E; ++e) row[e] = static_cast<float>(grid[sz(e)] * step);
      if (ref_token_choice(p, row, E).margin >= min_margin) break;
    }
  }
  return x;
}

// What a plan's shape should be, beyond the invariants every plan has.
struct plan_expectation {
  rs::index capacity = -1;  // the plan's capacity(); -1 dropless
  bool pad_to_capacity = false;
  rs::index align = 1;
  rs::index per_token = -1;  // exact assignments per token when >= 0 (dropless token choice: k)
};

// Every invariant of DESIGN.md section 4; returns the first violation, or "" when there is none.
inline std::string plan_violation(const rs::routing_plan& plan, const plan_expectation& x) {
  std::ostringstream why;
  const rs::index T = plan.num_tokens(), E = plan.num_experts(), S = plan.num_slots();
  const auto off = plan.expert_offsets();
  const auto cnt = plan.expert_counts();
  const auto dem = plan.expert_demand();
  const auto st = plan.slot_token();
  const auto sw = plan.slot_weight();
  const auto toff = plan.token_offsets();
  const auto tex = plan.token_expert();
  const auto tw = plan.token_weight();
  const auto ts = plan.token_slot();
  auto fail = [&](const auto&... parts) {
    (why << ... << parts);
    return why.str();
  };
  if (plan.capacity() != x.capacity) return fail("capacity ", plan.capacity(), " != ", x.capacity);
  if (off.size() != sz(E + 1) || cnt.size() != sz(E) || dem.size() != sz(E)) return fail("per-expert sizes");
  if (toff.size() != sz(T + 1)) return fail("token_offsets size ", toff.size(), " for T = ", T);
  if (st.size() != sz(S) || sw.size() != sz(S)) return fail("slot array sizes");
  if (off[0] != 0 || off[sz(E)] != S) return fail("expert_offsets ends ", off[0], " / ", off[sz(E)], " vs ", S);
  const rs::index nnz = plan.num_assignments();
  if (tex.size() != sz(nnz) || tw.size() != sz(nnz) || ts.size() != sz(nnz)) return fail("assignment sizes");
  if (toff[0] != 0 || toff[sz(T)] != nnz) return fail("token_offsets ends");

  rs::index kept = 0, demanded = 0;
  for (rs::index e = 0; e < E; ++e) {
    const rs::index b = off[sz(e)], n = off[sz(e + 1)] - b, c = cnt[sz(e)], d = dem[sz(e)];
    kept += c;
    demanded += d;
    if (n < 0) return fail("expert_offsets decrease at expert ", e);
    const rs::index want_kept = x.capacity >= 0 ? std::min(d, x.capacity) : d;
    if (c != want_kept) return fail("expert ", e, " keeps ", c, " of demand ", d, ", capacity ", x.capacity);
    rs::index want_slots = x.pad_to_capacity && x.capacity >= 0 ? x.capacity : c;
    want_slots = (want_slots + x.align - 1) / x.align * x.align;
    if (n != want_slots) return fail("expert ", e, " has ", n, " slots, expected ", want_slots);
    for (rs::index j = 0; j < n; ++j) {
      const rs::id_type tok = st[sz(b + j)];
      if (j < c) {
        if (tok < 0 || tok >= T) return fail("slot ", b + j, " holds token ", tok);
        if (j > 0 && tok <= st[sz(b + j - 1)]) return fail("tokens not strictly ascending in expert ", e);
      } else if (tok != -1 || sw[sz(b + j)] != 0.0f) {
        return fail("padding slot ", b + j, " holds token ", tok, " weight ", sw[sz(b + j)]);
      }
    }
  }
  if (kept != nnz) return fail("sum(expert_counts) ", kept, " != num_assignments ", nnz);
  if (demanded != plan.num_demanded() || plan.num_dropped() != demanded - kept) return fail("demand totals");

  std::vector<int> refs(sz(S), 0);
  for (rs::index t = 0; t < T; ++t) {
    const rs::index b = toff[sz(t)], n = toff[sz(t + 1)] - b;
    if (n < 0) return fail("token_offsets decrease at token ", t);
    if (x.per_token >= 0 && n != x.per_token) return fail("token ", t, " has ", n, " assignments");
    for (rs::index i = b; i < b + n; ++i) {
      const rs::id_type e = tex[sz(i)], slot = ts[sz(i)];
      if (e < 0 || e >= E) return fail("token ", t, " expert id ", e);
      if (i > b && e <= tex[sz(i - 1)]) return fail("token ", t, " experts not strictly ascending");
      if (slot < off[sz(e)] || slot >= off[sz(e)] + cnt[sz(e)]) return fail("token ", t, " slot outside expert ", e);
      if (st[sz(slot)] != t) return fail("slot ", slot, " holds ", st[sz(slot)], " not token ", t);
      if (sw[sz(slot)] != tw[sz(i)]) return fail("slot ", slot, " weight differs from token_weight");
      ++refs[sz(slot)];
    }
  }
  for (rs::index s = 0; s < S; ++s)
    if (refs[sz(s)] != (st[sz(s)] >= 0 ? 1 : 0)) return fail("slot ", s, " referenced ", refs[sz(s)], " times");
  return {};
}

// |a - b| <= rel * max(|a|, |b|) (plus a denormal-sized floor); never true for Inf or NaN.
inline bool close_rel(double a, double b, double rel = 1e-5) {
  if (!std::isfinite(a) || !std::isfinite(b)) return false;
  return std::fabs(a - b) <= rel * std::max(std::fabs(a), std::fabs(b)) + 1e-30;
}

}  // namespace resonance_test
