// The expert-parallel exchange (dist/exchange.hpp) and its traffic report (dist/traffic.hpp), with
// every rank simulated in one process: each rank routes its own tokens, the "transport" concatenates
// the per-peer blocks, and everything is checked against brute force read from the plans' token-major
// CSR. The distributed combine must equal resonance::combine bit for bit whatever the rank count.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/dist/exchange.hpp>
#include <resonance/dist/traffic.hpp>
#include <resonance/resonance.hpp>

#include "backends.hpp"
#include "error_of.hpp"
#include "random_inputs.hpp"

namespace {

namespace rs = resonance;
namespace rd = resonance::dist;
namespace rt = resonance::routing;
using resonance_test::error_of;
using resonance_test::usz;
using rs::id_type;

// A float as a row element (bfloat16 rounds to nearest even; its constructor takes raw bits).
template <class T>
T from_float(float v) {
  if constexpr (std::is_same_v<T, rs::bfloat16>) {
    return rs::bfloat16::from_float(v);
  } else {
    return static_cast<T>(v);
  }
}

// Expert e's output for one row: a rowwise function, so its bits do not depend on which rank or batch
// computes it.
template <class T>
void expert_fn(id_type e, const T* in, T* out, rs::index d) {
  for (rs::index c = 0; c < d; ++c) {
    const float v = static_cast<float>(in[c]);
    out[c] = from_float<T>(v * (1.0f + 0.125f * static_cast<float>(e)) - 0.25f * static_cast<float>(e % 3));
  }
}

// A placement of E experts on R ranks: contiguous, round robin, or uneven (rank 0 owns nothing when
// R > 1, the last rank the most).
rd::expert_placement make_placement(const std::string& kind, rs::index E, rs::index R, rs::index rpn) {
  rd::expert_placement p{R, rpn, std::vector<id_type>(usz(E))};
  for (rs::index e = 0; e < E; ++e) {
    if (kind == "contiguous") p.rank_of_expert[usz(e)] = static_cast<id_type>(e * R / E);
    if (kind == "round robin") p.rank_of_expert[usz(e)] = static_cast<id_type>(e % R);
    if (kind == "uneven") p.rank_of_expert[usz(e)] = static_cast<id_type>(R == 1 ? 0 : 1 + (e * e) % (R - 1));
  }
  p.validate(E);
  return p;
}

struct rank_batch {
  std::vector<float> x;  // T×d rows: value encodes (source rank, token, column)
  rs::routing_plan plan;
};

// Every rank's batch: rank s routes T_s tokens (rank 1 routes none when R > 2), all 21 when padded.
std::vector<rank_batch> route_ranks(rs::index R, rs::index E, rs::index k, rs::index d, bool padded,
                                    std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<rank_batch> out(usz(R));
  for (rs::index s = 0; s < R; ++s) {
    // Padded mode's fixed counts need one capacity, so one batch size, on every rank.
    const rs::index T = padded ? 21 : (R > 2 && s == 1) ? 0 : 5 + 7 * s;
    const std::vector<float> logits = resonance_test::grid_values(rng, T * E, 6, 0.25f);
    out[usz(s)].x.resize(usz(T * d));
    for (rs::index t = 0; t < T; ++t)
      for (rs::index c = 0; c < d; ++c)
        out[usz(s)].x[usz(t * d + c)] =
            static_cast<float>(s) * 1000.0f + static_cast<float>(t) + 0.001f * static_cast<float>(c);
    const rs::matrix_view<const float> l{logits.data(), T, E};
    if (padded) {
      const rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::factor> r{
          {}, {.top_k = k}, {.factor = 0.75, .pad_to_capacity = true}};
      out[usz(s)].plan = r.route(l);
    } else {
      const rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::dropless> r{{}, {.top_k = k}, {}};
      out[usz(s)].plan = r.route(l);
    }
  }
  return out;
}

// One simulated exchange over all ranks: returns y per rank, and checks every stage on the way.
template <class T>
std::vector<std::vector<T>> exchange_all(const std::vector<rank_batch>& batches, const rd::expert_placement& placement,
                                         rs::index d, rd::exchange_mode mode) {
  const rs::index R = placement.num_ranks;
  const auto be = rs::backend::serial{};
  std::vector<std::vector<T>> xs(usz(R));
  std::vector<rd::exchange_plan> xp(usz(R));
  std::vector<std::vector<T>> send(usz(R));
  for (rs::index s = 0; s < R; ++s) {
    const auto& b = batches[usz(s)];
    for (float v : b.x) xs[usz(s)].push_back(from_float<T>(v));
    xp[usz(s)] = rd::make_exchange_plan(b.plan, placement, s, mode);
    send[usz(s)].resize(usz(xp[usz(s)].num_rows() * d));
    rd::pack_rows(be, xp[usz(s)], rs::matrix_view<const T>{xs[usz(s)].data(), b.plan.num_tokens(), d},
                  rs::matrix_view<T>{send[usz(s)].data(), xp[usz(s)].num_rows(), d});
  }

  // Expert side of each rank r.
  std::vector<std::vector<T>> returns(usz(R));
  std::vector<rd::receive_plan> rp(usz(R));
  for (rs::index r = 0; r < R; ++r) {
    std::vector<id_type> rows, counts;
    std::vector<rd::routed_assignment> meta;
    std::vector<T> received;
    for (rs::index s = 0; s < R; ++s) {
      const auto& x = xp[usz(s)];
      rows.push_back(static_cast<id_type>(x.rows_to(r)));
      counts.push_back(static_cast<id_type>(x.returns_from(r)));
      meta.insert(meta.end(), x.assignments.begin() + (x.assignments.empty() ? 0 : x.return_offsets[usz(r)]),
                  x.assignments.begin() + (x.assignments.empty() ? 0 : x.return_offsets[usz(r + 1)]));
      received.insert(received.end(), send[usz(s)].begin() + x.row_offsets[usz(r)] * d,
                      send[usz(s)].begin() + x.row_offsets[usz(r + 1)] * d);
    }
    rp[usz(r)] = mode == rd::exchange_mode::padded ? rd::make_padded_receive_plan(placement, r, xp[0].capacity)
                                                   : rd::make_receive_plan(placement, r, rows, counts, meta);
    const rd::receive_plan& p = rp[usz(r)];
    REQUIRE(p.num_received_rows() * d == static_cast<rs::index>(received.size()));

    // Brute force: local expert j's slots are the (source, token) pairs that kept expert e, ordered by
    // source then token (padded: the C slots of each source's block, padding rows zero).
    const std::vector<id_type> local = rd::local_experts(placement, r);
    CHECK(p.local_experts == local);
    std::vector<T> expert_in(usz(p.num_slots() * d));
    rd::unpack_rows(be, p, rs::matrix_view<const T>{received.data(), p.num_received_rows(), d},
                    rs::matrix_view<T>{expert_in.data(), p.num_slots(), d});
    rs::index slot = 0;
    for (std::size_t j = 0; j < local.size(); ++j) {
      CHECK(p.expert_offsets[j] == slot);
      for (rs::index s = 0; s < R; ++s) {
        const rs::routing_plan& plan = batches[usz(s)].plan;
        std::vector<id_type> tokens;
        if (mode == rd::exchange_mode::padded) {
          const auto st = plan.slot_token();
          for (rs::index c = 0; c < plan.capacity(); ++c) tokens.push_back(st[usz(local[j] * plan.capacity() + c)]);
        } else {
          for (rs::index t = 0; t < plan.num_tokens(); ++t)
            for (id_type i = plan.token_offsets()[usz(t)]; i < plan.token_offsets()[usz(t + 1)]; ++i)
              if (plan.token_expert()[usz(i)] == local[j]) tokens.push_back(static_cast<id_type>(t));
        }
        for (const id_type t : tokens) {
          CHECK(p.slot_source[usz(slot)] == s);
          if (mode == rd::exchange_mode::dropless) CHECK(p.slot_token[usz(slot)] == t);
          for (rs::index c = 0; c < d; ++c) {
            const T want = t >= 0 ? xs[usz(s)][usz(t * d + c)] : T{};
            CHECK(std::memcmp(&expert_in[usz(slot * d + c)], &want, sizeof(T)) == 0);
          }
          ++slot;
        }
      }
    }
    CHECK(slot == p.num_slots());

    std::vector<T> expert_out(expert_in.size());
    for (std::size_t j = 0; j < local.size(); ++j)
      for (id_type i = p.expert_offsets[j]; i < p.expert_offsets[j + 1]; ++i)
        expert_fn(local[j], &expert_in[usz(i * d)], &expert_out[usz(i * d)], d);
    returns[usz(r)].resize(usz(p.num_returns() * d));
    rd::pack_returns(be, p, rs::matrix_view<const T>{expert_out.data(), p.num_slots(), d},
                     rs::matrix_view<T>{returns[usz(r)].data(), p.num_returns(), d});
  }

  // Back on each source: concatenate its block from every rank, in rank order, and combine.
  std::vector<std::vector<T>> ys(usz(R));
  for (rs::index s = 0; s < R; ++s) {
    std::vector<T> back;
    for (rs::index r = 0; r < R; ++r) {
      const auto& p = rp[usz(r)];
      CHECK(p.return_offsets[usz(s + 1)] - p.return_offsets[usz(s)] == xp[usz(s)].returns_from(r));
      back.insert(back.end(), returns[usz(r)].begin() + p.return_offsets[usz(s)] * d,
                  returns[usz(r)].begin() + p.return_offsets[usz(s + 1)] * d);
    }
    const rs::routing_plan& plan = batches[usz(s)].plan;
    ys[usz(s)].resize(usz(plan.num_tokens() * d));
    rd::combine_returns(be, plan, xp[usz(s)], rs::matrix_view<const T>{back.data(), xp[usz(s)].num_returns(), d},
                        rs::matrix_view<T>{ys[usz(s)].data(), plan.num_tokens(), d});
  }
  return ys;
}

// resonance::combine on one rank's plan with its expert outputs computed in one process.
template <class T>
std::vector<T> single_process(const rank_batch& b, rs::index d) {
  const rs::routing_plan& plan = b.plan;
  std::vector<T> x;
  for (float v : b.x) x.push_back(from_float<T>(v));
  std::vector<T> out(usz(plan.num_slots() * d));
  const auto off = plan.expert_offsets();
  for (rs::index e = 0; e < plan.num_experts(); ++e)
    for (id_type s = off[usz(e)]; s < off[usz(e + 1)]; ++s) {
      const id_type t = plan.slot_token()[usz(s)];
      if (t >= 0) expert_fn(static_cast<id_type>(e), &x[usz(t * d)], &out[usz(s * d)], d);
    }
  std::vector<T> y(usz(plan.num_tokens() * d));
  rs::combine(rs::backend::serial{}, plan, rs::matrix_view<const T>{out.data(), plan.num_slots(), d},
              rs::matrix_view<T>{y.data(), plan.num_tokens(), d});
  return y;
}

// The weighted sum in double, read through the token-major CSR: an independent check of the values.
std::vector<double> reference_y(const rank_batch& b, rs::index d) {
  const rs::routing_plan& plan = b.plan;
  std::vector<double> y(usz(plan.num_tokens() * d), 0.0);
  std::vector<float> out(usz(d));
  for (rs::index t = 0; t < plan.num_tokens(); ++t)
    for (id_type i = plan.token_offsets()[usz(t)]; i < plan.token_offsets()[usz(t + 1)]; ++i) {
      expert_fn(plan.token_expert()[usz(i)], &b.x[usz(t * d)], out.data(), d);
      for (rs::index c = 0; c < d; ++c) y[usz(t * d + c)] += plan.token_weight()[usz(i)] * out[usz(c)];
    }
  return y;
}

}  // namespace

TEST_CASE("exchange: dispatch, receive order and combine equal the single-process combine bit for bit") {
  const rs::index E = 12, d = 19;
  for (const rd::exchange_mode mode : {rd::exchange_mode::dropless, rd::exchange_mode::padded})
    for (const rs::index k : {1, 3})
      for (const std::string kind : {"contiguous", "round robin", "uneven"}) {
        // Rank s routes the same batch at every rank count (batch s), so its y is compared with the
        // same single-process combine whether the experts live on 1, 2 or 4 ranks.
        const std::vector<rank_batch> batches = route_ranks(4, E, k, d, mode == rd::exchange_mode::padded, 7 + k);
        for (const auto& [R, rpn] : {std::pair<rs::index, rs::index>{1, 1}, {2, 1}, {4, 2}, {4, 1}}) {
          CAPTURE(static_cast<int>(mode));
          CAPTURE(k);
          CAPTURE(kind);
          CAPTURE(R);
          const rd::expert_placement placement = make_placement(kind, E, R, rpn);
          // R ranks carry the first R batches; the rest are checked at R = 4.
          const std::vector<rank_batch> mine(batches.begin(), batches.begin() + R);
          const auto ys = exchange_all<float>(mine, placement, d, mode);
          const auto ys16 = exchange_all<rs::bfloat16>(mine, placement, d, mode);
          for (rs::index s = 0; s < R; ++s) {
            const auto want = single_process<float>(mine[usz(s)], d);
            REQUIRE(ys[usz(s)].size() == want.size());
            CHECK((want.empty() || std::memcmp(ys[usz(s)].data(), want.data(), want.size() * sizeof(float)) == 0));
            const auto want16 = single_process<rs::bfloat16>(mine[usz(s)], d);
            CHECK((want16.empty() ||
                   std::memcmp(ys16[usz(s)].data(), want16.data(), want16.size() * sizeof(rs::bfloat16)) == 0));
            const auto ref = reference_y(mine[usz(s)], d);
            for (std::size_t i = 0; i < ref.size(); ++i) CHECK(ys[usz(s)][i] == doctest::Approx(ref[i]).epsilon(1e-5));
          }
        }
      }
}

TEST_CASE("exchange: send lists hold each token once per destination rank, in token order") {
  const rs::index E = 12, d = 4, R = 4;
  const auto batches = route_ranks(R, E, 3, d, false, 99);
  const auto placement = make_placement("round robin", E, R, 2);
  for (rs::index s = 0; s < R; ++s) {
    const auto& plan = batches[usz(s)].plan;
    const auto xp = rd::make_exchange_plan(plan, placement, s);
    CHECK(xp.row_offsets.size() == usz(R + 1));
    for (rs::index r = 0; r < R; ++r) {
      std::vector<id_type> tokens;
      std::vector<rd::routed_assignment> meta;
      for (rs::index t = 0; t < plan.num_tokens(); ++t) {
        bool hit = false;
        for (id_type i = plan.token_offsets()[usz(t)]; i < plan.token_offsets()[usz(t + 1)]; ++i)
          if (placement.rank_of_expert[usz(plan.token_expert()[usz(i)])] == r) {
            hit = true;
            meta.push_back({static_cast<id_type>(s), static_cast<id_type>(t), plan.token_expert()[usz(i)],
                            plan.token_weight()[usz(i)]});
          }
        if (hit) tokens.push_back(static_cast<id_type>(t));
      }
      CHECK(std::vector<id_type>(xp.row_token.begin() + xp.row_offsets[usz(r)],
                                 xp.row_token.begin() + xp.row_offsets[usz(r + 1)]) == tokens);
      CHECK(std::vector<rd::routed_assignment>(xp.assignments.begin() + xp.return_offsets[usz(r)],
                                               xp.assignments.begin() + xp.return_offsets[usz(r + 1)]) == meta);
    }
    // return_row is a bijection onto the returned rows, pointing at the assignment's own metadata.
    std::vector<int> seen(usz(xp.num_returns()), 0);
    for (std::size_t i = 0; i < xp.return_row.size(); ++i) {
      const auto& a = xp.assignments[usz(xp.return_row[i])];
      CHECK(a.expert == plan.token_expert()[i]);
      CHECK(a.weight == plan.token_weight()[i]);
      ++seen[usz(xp.return_row[i])];
    }
    CHECK(std::count(seen.begin(), seen.end(), 1) == xp.num_returns());
  }
}

TEST_CASE("traffic: the four accountings equal counts read from the plans") {
  const rs::index E = 12, d = 16, R = 4;
  for (const bool padded : {false, true}) {
    const auto batches = route_ranks(R, E, 3, d, padded, 5);
    for (const std::string kind : {"contiguous", "round robin", "uneven"}) {
      CAPTURE(kind);
      const auto placement = make_placement(kind, E, R, 2);
      rd::traffic_report total = rd::empty_traffic(placement, d * 4), summed = total;
      std::int64_t inter_expert = 0, inter_token = 0, inter_node = 0, self_token = 0, intra_token = 0;
      std::int64_t padding = 0, dropped = 0;
      for (rs::index s = 0; s < R; ++s) {
        const auto& plan = batches[usz(s)].plan;
        const rd::traffic_report one = rd::traffic(plan, placement, s, d * 4);
        const auto xp = rd::make_exchange_plan(plan, placement, s);
        for (rs::index r = 0; r < R; ++r) {
          CHECK(one.token_rows[usz(s * R + r)] == xp.rows_to(r));
          CHECK(one.expert_rows[usz(s * R + r)] == xp.returns_from(r));
        }
        rd::add_traffic(total, plan, placement, s);
        summed += one;
        // Brute force over tokens: distinct ranks and nodes by locality.
        for (rs::index t = 0; t < plan.num_tokens(); ++t) {
          std::vector<int> ranks(usz(R), 0), nodes(usz(R / 2), 0);
          for (id_type i = plan.token_offsets()[usz(t)]; i < plan.token_offsets()[usz(t + 1)]; ++i) {
            const id_type r = placement.rank_of_expert[usz(plan.token_expert()[usz(i)])];
            ranks[usz(r)] = 1;
            nodes[usz(r / 2)] = 1;
            inter_expert += (r / 2 != s / 2);
          }
          for (rs::index r = 0; r < R; ++r) {
            if (!ranks[usz(r)]) continue;
            (r == s ? self_token : r / 2 == s / 2 ? intra_token : inter_token) += 1;
          }
          for (rs::index n = 0; n < R / 2; ++n) inter_node += nodes[usz(n)] && n != s / 2;
        }
        if (padded) {
          for (rs::index e = 0; e < E; ++e) padding += plan.capacity() - plan.expert_counts()[usz(e)];
          for (rs::index e = 0; e < E; ++e) dropped += plan.expert_demand()[usz(e)] - plan.expert_counts()[usz(e)];
        }
      }
      // Adding each rank's plan into one report equals summing the ranks' own reports.
      CHECK(total.token_rows == summed.token_rows);
      CHECK(total.expert_rows == summed.expert_rows);
      CHECK(total.node_rows == summed.node_rows);
      CHECK(total.padding_rows == summed.padding_rows);
      const rd::traffic_split tok = total.split(total.token_rows);
      CHECK(tok.self == self_token);
      CHECK(tok.intra_node == intra_token);
      CHECK(tok.inter_node == inter_token);
      CHECK(total.split(total.expert_rows).inter_node == inter_expert);
      CHECK(total.inter_node_node_rows() == inter_node);
      CHECK(inter_node <= inter_token);
      CHECK(total.padded == padded);
      std::int64_t pad_sum = 0, padded_sum = 0;
      for (std::size_t i = 0; i < total.padding_rows.size(); ++i) {
        pad_sum += total.padding_rows[i];
        padded_sum += total.padded_rows[i];
      }
      CHECK(pad_sum == padding);
      CHECK(total.dropped == dropped);
      std::int64_t slots = 0;
      for (const auto& b : batches) slots += padded ? E * b.plan.capacity() : 0;
      CHECK(padded_sum == slots);
      // Loads: received token rows per rank are the column sums.
      const auto load = total.received(total.expert_rows);
      std::int64_t all = 0;
      for (const auto v : load) all += v;
      std::int64_t assignments = 0;
      for (const auto& b : batches) assignments += b.plan.num_assignments();
      CHECK(all == assignments);
    }
  }
}

TEST_CASE("traffic: load statistics") {
  CHECK(rd::max_over_mean({1, 1, 1, 1}) == doctest::Approx(1.0));
  CHECK(rd::max_over_mean({4, 0, 0, 0}) == doctest::Approx(4.0));
  CHECK(rd::max_over_mean({0, 0}) == doctest::Approx(1.0));
  CHECK(rd::coefficient_of_variation({2, 2, 2}) == doctest::Approx(0.0));
  CHECK(rd::coefficient_of_variation({0, 2}) == doctest::Approx(1.0));  // mean 1, population sd 1
}

TEST_CASE("exchange: bad input is a resonance::error and writes nothing") {
  const rs::index E = 8, d = 3, R = 2;
  const auto batches = route_ranks(R, E, 2, d, false, 3);
  const auto placement = make_placement("contiguous", E, R, 1);
  const auto& plan = batches[0].plan;

  CHECK(error_of([&] { (void)rd::make_exchange_plan(plan, placement, 2); }).find("rank") != std::string::npos);
  CHECK(error_of([&] {
          (void)rd::make_exchange_plan(plan, make_placement("contiguous", 4, 2, 1), 0);
        }).find("placement.rank_of_expert") != std::string::npos);
  CHECK(error_of([&] {
          (void)rd::make_exchange_plan(plan, placement, 0, rd::exchange_mode::padded);
        }).find("plan: expected a plan with a capacity") != std::string::npos);
  {
    // A capacity plan that is not padded.
    const std::vector<float> logits(usz(6 * E), 0.5f);
    const rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::factor> r{
        {}, {.top_k = 2}, {.factor = 1.0}};
    const rs::routing_plan unpadded = r.route(rs::matrix_view<const float>{logits.data(), 6, E});
    CHECK(error_of([&] {
            (void)rd::make_exchange_plan(unpadded, placement, 0, rd::exchange_mode::padded);
          }).find("every expert padded to the capacity") != std::string::npos);
  }

  // A receive side fed what a broken transport would deliver.
  const auto x0 = rd::make_exchange_plan(batches[0].plan, placement, 0);
  const auto x1 = rd::make_exchange_plan(batches[1].plan, placement, 1);
  std::vector<id_type> rows{static_cast<id_type>(x0.rows_to(1)), static_cast<id_type>(x1.rows_to(1))};
  std::vector<id_type> counts{static_cast<id_type>(x0.returns_from(1)), static_cast<id_type>(x1.returns_from(1))};
  std::vector<rd::routed_assignment> meta(x0.assignments.begin() + x0.return_offsets[1], x0.assignments.end());
  meta.insert(meta.end(), x1.assignments.begin() + x1.return_offsets[1], x1.assignments.end());
  REQUIRE(meta.size() >= 2);
  REQUIRE(counts[0] >= 1);
  (void)rd::make_receive_plan(placement, 1, rows, counts, meta);  // as delivered: fine
  const auto broken = [&](auto&& edit) {
    auto r = rows;
    auto c = counts;
    auto m = meta;
    edit(r, c, m);
    return error_of([&] { (void)rd::make_receive_plan(placement, 1, r, c, m); });
  };
  using V = std::vector<id_type>;
  using M = std::vector<rd::routed_assignment>;
  CHECK(broken([](V& r, V&, M&) { r.pop_back(); }).find("row_counts: expected one count per rank") !=
        std::string::npos);
  CHECK(broken([](V&, V& c, M&) { c.push_back(0); }).find("assignment_counts: expected one count per rank") !=
        std::string::npos);
  CHECK(broken([](V&, V&, M& m) { m.pop_back(); }).find("assignments: expected") != std::string::npos);
  CHECK(broken([](V&, V&, M& m) { m[0].source = 1; }).find("the source rank of the block") != std::string::npos);
  CHECK(broken([](V&, V&, M& m) { m[0].expert = 0; }).find("experts owned by rank 1") != std::string::npos);
  CHECK(broken([](V&, V&, M& m) { m[0].expert = 99; }).find("experts owned by rank 1") != std::string::npos);
  CHECK(broken([](V&, V&, M& m) { m[0].token = -1; }).find("token ids >= 0") != std::string::npos);
  CHECK(broken([](V& r, V&, M&) { r[0] -= 1; }).find("row_counts: expected the number of distinct tokens") !=
        std::string::npos);
  CHECK(broken([](V& r, V&, M&) { r[0] = -1; }).find("row_counts: expected counts >= 0") != std::string::npos);
  CHECK(broken([](V& r, V& c, M&) { c[0] = r[0] - 1; }).find("assignment_counts: expected at least one") !=
        std::string::npos);
  if (counts[0] >= 2)
    CHECK(broken([](V&, V&, M& m) { std::swap(m[0], m[1]); }).find("ascending (token, expert)") != std::string::npos);
  CHECK(error_of([&] { (void)rd::make_padded_receive_plan(placement, 0, -1); }).find("capacity") != std::string::npos);
  CHECK(error_of([&] { (void)rd::make_padded_receive_plan(placement, 5, 2); }).find("rank") != std::string::npos);

  // Row movement: wrong shapes are rejected before anything is written.
  const auto be = rs::backend::serial{};
  std::vector<float> x(usz(plan.num_tokens() * d), 1.0f);
  std::vector<float> send(usz(x0.num_rows() * d), -7.0f);
  CHECK(error_of([&] {
          rd::pack_rows(be, x0, rs::matrix_view<const float>{x.data(), plan.num_tokens() - 1, d},
                        rs::matrix_view<float>{send.data(), x0.num_rows(), d});
        }).find("x: expected") != std::string::npos);
  CHECK(error_of([&] {
          rd::pack_rows(be, x0, rs::matrix_view<const float>{x.data(), plan.num_tokens(), d},
                        rs::matrix_view<float>{send.data(), x0.num_rows() - 1, d});
        }).find("send: expected shape") != std::string::npos);
  CHECK(std::all_of(send.begin(), send.end(), [](float v) { return v == -7.0f; }));
  std::vector<float> y(usz(plan.num_tokens() * d), -7.0f);
  std::vector<float> back(usz(x0.num_returns() * d), 0.0f);
  CHECK(error_of([&] {
          rd::combine_returns(be, plan, x1, rs::matrix_view<const float>{back.data(), x0.num_returns(), d},
                              rs::matrix_view<float>{y.data(), plan.num_tokens(), d});
        }).find("exchange: expected the exchange plan made from this routing plan") != std::string::npos);
  CHECK(error_of([&] {
          rd::combine_returns(be, plan, x0, rs::matrix_view<const float>{back.data(), x0.num_returns() - 1, d},
                              rs::matrix_view<float>{y.data(), plan.num_tokens(), d});
        }).find("returned: expected") != std::string::npos);
  CHECK(std::all_of(y.begin(), y.end(), [](float v) { return v == -7.0f; }));
  const rd::receive_plan rp = rd::make_receive_plan(placement, 1, rows, counts, meta);
  std::vector<float> received(usz(rp.num_received_rows() * d), 1.0f), in(usz(rp.num_slots() * d), -7.0f);
  CHECK(error_of([&] {
          rd::unpack_rows(be, rp, rs::matrix_view<const float>{received.data(), rp.num_received_rows() + 1, d},
                          rs::matrix_view<float>{in.data(), rp.num_slots(), d});
        }).find("received: expected") != std::string::npos);
  CHECK(error_of([&] {
          rd::pack_returns(be, rp, rs::matrix_view<const float>{in.data(), rp.num_slots() - 1, d},
                           rs::matrix_view<float>{received.data(), rp.num_returns(), d});
        }).find("expert_out: expected") != std::string::npos);
  CHECK(std::all_of(in.begin(), in.end(), [](float v) { return v == -7.0f; }));

  // Reports of different placements do not add.
  rd::traffic_report a = rd::empty_traffic(placement, 12);
  CHECK(error_of([&] { a += rd::empty_traffic(make_placement("contiguous", E, 1, 1), 12); }).find("traffic_report") !=
        std::string::npos);
  CHECK(error_of([&] { (void)rd::traffic(plan, placement, -1, 12); }).find("rank") != std::string::npos);
  CHECK(error_of([&] { (void)rd::empty_traffic(placement, -1); }).find("row_bytes") != std::string::npos);
  rd::traffic_report other = rd::empty_traffic(make_placement("contiguous", E, 1, 1), 12);
  CHECK(error_of([&] { rd::add_traffic(other, plan, placement, 0); }).find("traffic_report: expected a report of") !=
        std::string::npos);
}

TEST_CASE("traffic: node rows of uniform top-k match the closed form G(1 - C(E-E/G, k)/C(E, k))") {
  // iid logits make each token's top-k a uniform k-subset, so the expected number of distinct nodes a
  // token reaches is G·(1 − C(E − E/G, k)/C(E, k)) (research/ep-anchors.md §3; DeepEP uses the same).
  const rs::index T = 6000, E = 32, k = 4, R = 8, rpn = 2, G = R / rpn;
  std::mt19937_64 rng(11);
  const std::vector<float> logits = resonance_test::normal_values(rng, T * E);
  const rs::router<rs::affinity::precomputed, rt::token_choice, rs::capacity::dropless> r{{}, {.top_k = k}, {}};
  const rs::routing_plan plan = r.route(rs::matrix_view<const float>{logits.data(), T, E});
  const rd::expert_placement placement = rd::expert_placement::contiguous(E, R, rpn);
  const rd::traffic_report rep = rd::traffic(plan, placement, 0, 1);
  std::int64_t node_rows = 0, token_rows = 0;
  for (const auto v : rep.node_rows) node_rows += v;
  for (const auto v : rep.token_rows) token_rows += v;
  const auto choose = [](double n, double m) {
    double c = 1.0;
    for (double i = 0; i < m; ++i) c *= (n - i) / (m - i);
    return c;
  };
  const double nodes = static_cast<double>(G) * (1.0 - choose(E - E / G, k) / choose(E, k));
  const double ranks = static_cast<double>(R) * (1.0 - choose(E - E / R, k) / choose(E, k));
  // Per-token counts vary by < 1 around their mean: 6000 tokens put the mean within ~0.02.
  CHECK(static_cast<double>(node_rows) / T == doctest::Approx(nodes).epsilon(0.02));
  CHECK(static_cast<double>(token_rows) / T == doctest::Approx(ranks).epsilon(0.02));
  // Rank 0 is on node 0: every node row to another node crosses, and the two-level stage counts them.
  CHECK(rep.inter_node_node_rows() == node_rows - rep.node_rows[0]);
}
