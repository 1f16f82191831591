// Benchmarks of the expert-parallel exchange's host work (dist/exchange.hpp, dist/traffic.hpp), each
// beside the single-process stage it replaces, so the ratio reads what expert parallelism adds before
// any byte crosses the network. Every rank is simulated in this process: R ranks route T tokens each
// (precomputed logits, token choice top-k, dropless), contiguous placement, 4 ranks per node.
//
//   bm_exchange_plan/T:<T>/E:<E>/k:<k>/R:<R>      make_exchange_plan of rank 0
//   bm_receive_plan/T:<T>/E:<E>/k:<k>/R:<R>       make_receive_plan of rank 0 from every rank's metadata
//   bm_traffic/T:<T>/E:<E>/k:<k>/R:<R>            traffic() of rank 0's plan
//   bm_build_reference/T:<T>/E:<E>/k:<k>          the plan build it follows (route of precomputed logits)
//   bm_pack/<backend>/T:<T>/d:<d>                 pack_rows of rank 0 (one row per (token, rank))
//   bm_unpack/<backend>/T:<T>/d:<d>               unpack_rows of rank 0's receive buffer
//   bm_combine_returns/<backend>/T:<T>/d:<d>      combine_returns of rank 0 (one returned row per assignment)
//   bm_dispatch_reference/<backend>/T:<T>/d:<d>   resonance::dispatch of the same plan (one row per slot)
//   bm_combine_reference/<backend>/T:<T>/d:<d>    resonance::combine of the same plan
//
// Counters: items = tokens (rank 0's; the receive plan's: assignments received); bytes = rows read +
// written (pack, unpack, combine and their references).
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include <resonance/resonance.hpp>

#if defined(RESONANCE_HAS_TBB)
#include <resonance/backend/tbb.hpp>
#endif

namespace {

namespace rs = resonance;
namespace rd = resonance::dist;

constexpr rs::index num_ranks = 8, ranks_per_node = 4;

// R ranks' plans of T tokens each, and rank 0's view of the exchange.
struct exchange_case {
  rs::index T = 0, E = 0, k = 0;
  std::vector<std::vector<float>> logits;
  std::vector<rs::routing_plan> plans;
  rd::expert_placement placement;
  std::vector<rd::exchange_plan> sends;
  std::vector<rs::id_type> row_counts, assignment_counts;  // what rank 0 receives from each rank
  std::vector<rd::routed_assignment> received;

  exchange_case(rs::index T_, rs::index E_, rs::index k_) : T(T_), E(E_), k(k_) {
    placement = rd::expert_placement::contiguous(E, num_ranks, ranks_per_node);
    std::mt19937_64 rng(42);
    std::normal_distribution<float> normal;
    const rs::router<rs::affinity::precomputed, rs::routing::token_choice, rs::capacity::dropless> r{
        {}, {.top_k = k}, {}};
    for (rs::index s = 0; s < num_ranks; ++s) {
      logits.emplace_back(static_cast<std::size_t>(T * E));
      for (float& v : logits.back()) v = normal(rng);
      plans.push_back(r.route(rs::matrix_view<const float>{logits.back().data(), T, E}));
      sends.push_back(rd::make_exchange_plan(plans.back(), placement, s));
      const rd::exchange_plan& x = sends.back();
      row_counts.push_back(static_cast<rs::id_type>(x.rows_to(0)));
      assignment_counts.push_back(static_cast<rs::id_type>(x.returns_from(0)));
      received.insert(received.end(), x.assignments.begin() + x.return_offsets[0],
                      x.assignments.begin() + x.return_offsets[1]);
    }
  }
};

// Cases are built once per shape and shared by the families that read them.
const exchange_case& case_of(rs::index T, rs::index E, rs::index k) {
  static std::vector<std::unique_ptr<exchange_case>> cache;
  for (const auto& c : cache)
    if (c->T == T && c->E == E && c->k == k) return *c;
  cache.push_back(std::make_unique<exchange_case>(T, E, k));
  return *cache.back();
}

std::string shape(rs::index T, rs::index E, rs::index k) {
  return "/T:" + std::to_string(T) + "/E:" + std::to_string(E) + "/k:" + std::to_string(k);
}

void register_plans() {
  for (rs::index T : {1024, 16384})
    for (const auto& [E, k] : {std::pair<rs::index, rs::index>{64, 2}, {256, 8}}) {
      const std::string s = shape(T, E, k), ranks = "/R:" + std::to_string(num_ranks);
      benchmark::RegisterBenchmark(("bm_exchange_plan" + s + ranks).c_str(), [=](benchmark::State& st) {
        const exchange_case& c = case_of(T, E, k);
        for (auto _ : st) benchmark::DoNotOptimize(rd::make_exchange_plan(c.plans[0], c.placement, 0));
        st.SetItemsProcessed(st.iterations() * T);
      });
      benchmark::RegisterBenchmark(("bm_receive_plan" + s + ranks).c_str(), [=](benchmark::State& st) {
        const exchange_case& c = case_of(T, E, k);
        for (auto _ : st)
          benchmark::DoNotOptimize(
              rd::make_receive_plan(c.placement, 0, c.row_counts, c.assignment_counts, c.received));
        st.SetItemsProcessed(st.iterations() * static_cast<std::int64_t>(c.received.size()));
      });
      benchmark::RegisterBenchmark(("bm_traffic" + s + ranks).c_str(), [=](benchmark::State& st) {
        const exchange_case& c = case_of(T, E, k);
        for (auto _ : st) benchmark::DoNotOptimize(rd::traffic(c.plans[0], c.placement, 0, 2048));
        st.SetItemsProcessed(st.iterations() * T);
      });
      benchmark::RegisterBenchmark(("bm_build_reference" + s).c_str(), [=](benchmark::State& st) {
        const exchange_case& c = case_of(T, E, k);
        const rs::router<rs::affinity::precomputed, rs::routing::token_choice, rs::capacity::dropless> r{
            {}, {.top_k = k}, {}};
        for (auto _ : st) benchmark::DoNotOptimize(r.route(rs::matrix_view<const float>{c.logits[0].data(), T, E}));
        st.SetItemsProcessed(st.iterations() * T);
      });
    }
}

template <class Backend>
void register_rows(const Backend& be, const std::string& backend, bool threaded) {
  constexpr rs::index E = 64, k = 2, d = 1024;
  for (rs::index T : {1024, 16384}) {
    const std::string s = "/" + backend + "/T:" + std::to_string(T) + "/d:" + std::to_string(d);
    const auto add = [&](const std::string& name, auto body) {
      auto* b = benchmark::RegisterBenchmark((name + s).c_str(), [=](benchmark::State& st) {
        const exchange_case& c = case_of(T, E, k);
        std::mt19937_64 rng(5);
        std::normal_distribution<float> normal;
        std::vector<float> x(static_cast<std::size_t>(T * d));
        for (float& v : x) v = normal(rng);
        body(st, c, x);
      });
      if (threaded) b->UseRealTime();
    };
    const auto bytes = [&](benchmark::State& st, rs::index rows_read, rs::index rows_written) {
      st.SetBytesProcessed(st.iterations() * (rows_read + rows_written) * d * static_cast<std::int64_t>(sizeof(float)));
      st.SetItemsProcessed(st.iterations() * T);
    };
    add("bm_pack", [=](benchmark::State& st, const exchange_case& c, const std::vector<float>& x) {
      const rd::exchange_plan& xp = c.sends[0];
      std::vector<float> send(static_cast<std::size_t>(xp.num_rows() * d));
      for (auto _ : st) {
        rd::pack_rows(be, xp, rs::matrix_view<const float>{x.data(), T, d},
                      rs::matrix_view<float>{send.data(), xp.num_rows(), d});
        benchmark::ClobberMemory();
      }
      bytes(st, xp.num_rows(), xp.num_rows());
    });
    add("bm_unpack", [=](benchmark::State& st, const exchange_case& c, const std::vector<float>&) {
      const rd::receive_plan rp = rd::make_receive_plan(c.placement, 0, c.row_counts, c.assignment_counts, c.received);
      std::vector<float> received(static_cast<std::size_t>(rp.num_received_rows() * d), 1.0f);
      std::vector<float> in(static_cast<std::size_t>(rp.num_slots() * d));
      for (auto _ : st) {
        rd::unpack_rows(be, rp, rs::matrix_view<const float>{received.data(), rp.num_received_rows(), d},
                        rs::matrix_view<float>{in.data(), rp.num_slots(), d});
        benchmark::ClobberMemory();
      }
      bytes(st, rp.num_slots(), rp.num_slots());
    });
    add("bm_combine_returns", [=](benchmark::State& st, const exchange_case& c, const std::vector<float>&) {
      const rd::exchange_plan& xp = c.sends[0];
      std::vector<float> returned(static_cast<std::size_t>(xp.num_returns() * d), 0.5f);
      std::vector<float> y(static_cast<std::size_t>(T * d));
      for (auto _ : st) {
        rd::combine_returns(be, c.plans[0], xp, rs::matrix_view<const float>{returned.data(), xp.num_returns(), d},
                            rs::matrix_view<float>{y.data(), T, d});
        benchmark::ClobberMemory();
      }
      bytes(st, xp.num_returns(), T);
    });
    add("bm_dispatch_reference", [=](benchmark::State& st, const exchange_case& c, const std::vector<float>& x) {
      const rs::routing_plan& plan = c.plans[0];
      std::vector<float> buffer(static_cast<std::size_t>(plan.num_slots() * d));
      for (auto _ : st) {
        rs::dispatch(be, plan, rs::matrix_view<const float>{x.data(), T, d},
                     rs::matrix_view<float>{buffer.data(), plan.num_slots(), d});
        benchmark::ClobberMemory();
      }
      bytes(st, plan.num_slots(), plan.num_slots());
    });
    add("bm_combine_reference", [=](benchmark::State& st, const exchange_case& c, const std::vector<float>&) {
      const rs::routing_plan& plan = c.plans[0];
      std::vector<float> out(static_cast<std::size_t>(plan.num_slots() * d), 0.5f), y(static_cast<std::size_t>(T * d));
      for (auto _ : st) {
        rs::combine(be, plan, rs::matrix_view<const float>{out.data(), plan.num_slots(), d},
                    rs::matrix_view<float>{y.data(), T, d});
        benchmark::ClobberMemory();
      }
      bytes(st, plan.num_assignments(), T);
    });
  }
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  register_plans();
  register_rows(rs::backend::serial{}, "serial", false);
#if defined(RESONANCE_HAS_TBB)
  register_rows(rs::backend::tbb<>{}, "tbb", true);
#endif
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
