#pragma once

// One policy's training run over MPI: every step routes each rank's tokens, dispatches them with both
// topologies (flat and two-level, each metered at MPI), runs the experts where they live, combines,
// and back-propagates through the experts, the combine weights, the balancing losses and the router
// into A; then SGD. Each step also recomputes every rank's tokens in one process and compares bits.

#include <chrono>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include <mpi.h>

#include <resonance/dist/mpi.hpp>
#include <resonance/resonance.hpp>

#include "layer.hpp"
#include "meter.hpp"

namespace ep {

struct policy {
  std::string key;    // the CSV's name
  std::string label;  // the table's
  rs::dist::exchange_mode mode = rs::dist::exchange_mode::dropless;
  index top_k = 2;
  double aux = 0.01;        // Switch load-balancing loss coefficient
  double locality = 0.0;    // locality loss coefficient (each rank's node is its local one)
  float loss_scale = 1.0f;  // the losses see logits · loss_scale (1/τ: GrAP-cosine's δ are cosines)
};

// What every rank and the placement share.
struct setup {
  shape s;
  task tk;
  rs::dist::expert_placement placement;
  std::vector<rs::id_type> expert_node;  // placement.node_of_expert()
  MPI_Comm comm = MPI_COMM_WORLD;
  int rank = 0;
  float lr = 0.05f;
};

// The checks, as bits of run_result::failed.
enum check : unsigned {
  y_single = 1u << 0,        // y of the MPI layer == y of resonance::dispatch / experts / combine in one process
  y_topology = 1u << 1,      // two-level expert inputs and y == flat ones
  dweight_single = 1u << 2,  // the per-assignment combine-weight gradients == one process's
  dh_single = 1u << 3,       // the gradient through the experts into h == one process's
  same_slots = 1u << 4,      // the dy dispatch delivered its rows in the h dispatch's slots
  weights_moved = 1u << 5,   // the weights moved to the experts == those a dropless dispatch carried
  bytes_model = 1u << 6,     // bytes measured at MPI == dist::traffic's count
};
inline const char* check_name(unsigned bit) {
  switch (bit) {
    case y_single:
      return "y vs one process";
    case y_topology:
      return "two-level vs flat";
    case dweight_single:
      return "dweight vs one process";
    case dh_single:
      return "dh vs one process";
    case same_slots:
      return "dy slots";
    case weights_moved:
      return "weights moved";
    case bytes_model:
      return "measured bytes vs dist::traffic";
    default:
      return "?";
  }
}

// One step, summed over ranks.
struct step_record {
  meter::tally flat, two_level;  // what the forward dispatch handed to MPI
  rs::dist::traffic_report traffic;
  double task_loss = 0.0, aux_loss = 0.0, locality_loss = 0.0;
  index capacity = -1;  // the largest C of any rank (-1: dropless)
};

struct run_result {
  std::vector<step_record> steps;
  unsigned failed = 0;  // checks failed on any rank at any step
  double seconds = 0.0;
};

namespace detail {

inline void sum_over_ranks(MPI_Comm comm, std::vector<std::int64_t>& v) {
  MPI_Allreduce(MPI_IN_PLACE, v.data(), static_cast<int>(v.size()), MPI_INT64_T, MPI_SUM, comm);
}
inline void sum_over_ranks(MPI_Comm comm, meter::tally& t) {
  std::vector<std::int64_t> v;
  for (meter::bytes* b : {&t.rows, &t.metadata, &t.counts}) v.insert(v.end(), {b->self, b->intra, b->inter});
  sum_over_ranks(comm, v);
  std::size_t i = 0;
  for (meter::bytes* b : {&t.rows, &t.metadata, &t.counts}) {
    b->self = v[i++];
    b->intra = v[i++];
    b->inter = v[i++];
  }
}
// dist::traffic reports add up over ranks: one allreduce per matrix.
inline void sum_over_ranks(MPI_Comm comm, rs::dist::traffic_report& r) {
  for (auto* m : {&r.token_rows, &r.expert_rows, &r.node_rows, &r.padded_rows, &r.padding_rows})
    sum_over_ranks(comm, *m);
  std::vector<std::int64_t> scalars{r.tokens, r.dropped};
  sum_over_ranks(comm, scalars);
  r.tokens = scalars[0];
  r.dropped = scalars[1];
  int padded = r.padded ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &padded, 1, MPI_INT, MPI_MIN, comm);
  r.padded = padded != 0;
}

// The gradient of the replicated parameters summed over ranks in rank order (an allgather, then a
// local sum), so that every rank adds the same numbers in the same order and A and the gate stay
// bitwise equal on every rank.
inline void sum_in_rank_order(MPI_Comm comm, std::vector<float>& g) {
  int ranks = 0;
  MPI_Comm_size(comm, &ranks);
  std::vector<float> all(g.size() * static_cast<std::size_t>(ranks));
  MPI_Allgather(g.data(), static_cast<int>(g.size()), MPI_FLOAT, all.data(), static_cast<int>(g.size()), MPI_FLOAT,
                comm);
  for (std::size_t i = 0; i < g.size(); ++i) {
    float acc = 0.0f;
    for (int r = 0; r < ranks; ++r) acc += all[static_cast<std::size_t>(r) * g.size() + i];
    g[i] = acc;
  }
}

inline bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}
inline bool same_rows(rs::matrix_view<const float> a, rs::matrix_view<const float> b) {
  return a.rows == b.rows && a.cols == b.cols && std::memcmp(a.data, b.data, sz(a.rows * a.cols) * sizeof(float)) == 0;
}

// The experts this rank owns on what it received: out row k = W_{e(k)} · in row k.
inline std::vector<float> run_experts(const setup& su, const parameters& p, const rs::dist::dispatched<float>& d) {
  const index dd = su.s.d;
  std::vector<float> out(sz(d.receive().num_slots() * dd));
  const auto in = d.expert_in();
  for (index j = 0; j < d.num_local_experts(); ++j) {
    const float* W = &p.W[sz(d.local_experts()[sz(j)] * dd * dd)];
    for (rs::id_type k = d.expert_offsets()[sz(j)]; k < d.expert_offsets()[sz(j + 1)]; ++k)
      expert_forward(W, in.row(k), &out[sz(k * dd)], dd);
  }
  return out;
}

}  // namespace detail

// Trains the layer under one policy from the shared initial parameters; make_router(parameters&)
// builds the router (its gate, if any, a view of the parameters, so SGD updates it in place).
template <class MakeRouter>
run_result run_policy(const setup& su, const policy& pol, index steps, MakeRouter&& make_router) {
  using namespace rs::dist;
  using cmat = rs::matrix_view<const float>;
  using mat = rs::matrix_view<float>;
  const shape& s = su.s;
  const index T = s.tokens, d = s.d, E = s.experts, R = s.ranks, k = pol.top_k;
  const rs::backend::serial be;
  const auto started = std::chrono::steady_clock::now();

  parameters p = init_parameters(s);
  const auto router = make_router(p);
  using router_type = std::remove_const_t<decltype(router)>;
  using capacity_type = typename router_type::capacity_type;
  rs::capacity_state_t<capacity_type> state{};
  mpi_exchange ex(su.comm);
  const std::vector<rs::id_type> owned = local_experts(su.placement, su.rank);

  run_result result;
  for (index step = 0; step < steps; ++step) {
    unsigned failed = 0;
    const batch b = make_batch(s, su.tk, su.rank, step);

    // ---- forward: h = x·A, route, dispatch (both topologies), experts, combine ----------------------
    std::vector<float> h(sz(T * d), 0.0f);
    for (index t = 0; t < T; ++t)
      for (index j = 0; j < s.d_in; ++j) {
        const float xv = b.x[sz(t * s.d_in + j)];
        for (index i = 0; i < d; ++i) h[sz(t * d + i)] += xv * p.A[sz(j * d + i)];
      }
    const cmat hv{h.data(), T, d};
    const rs::routing_plan plan = [&] {
      if constexpr (rs::stateful_capacity_policy<capacity_type>)
        return router.route(be, hv, state);
      else
        return router.route(be, hv);
    }();

    step_record rec;
    meter::start(rec.flat, s.row_bytes(), static_cast<int>(s.ranks_per_node));
    dispatched<float> h_in = ex.dispatch(be, plan.view(), su.placement, hv, pol.mode, exchange_topology::flat);
    meter::stop();
    meter::start(rec.two_level, s.row_bytes(), static_cast<int>(s.ranks_per_node));
    dispatched<float> h_in2 = ex.dispatch(be, plan.view(), su.placement, hv, pol.mode, exchange_topology::two_level);
    meter::stop();

    const std::vector<float> out = detail::run_experts(su, p, h_in);
    const std::vector<float> out2 = detail::run_experts(su, p, h_in2);
    std::vector<float> y(sz(T * d)), y2(sz(T * d));
    ex.combine(be, h_in, cmat{out.data(), h_in.receive().num_slots(), d}, mat{y.data(), T, d});
    ex.combine(be, h_in2, cmat{out2.data(), h_in2.receive().num_slots(), d}, mat{y2.data(), T, d});
    if (!detail::same_rows(h_in.expert_in(), h_in2.expert_in()) || !detail::same_bits(y, y2)) failed |= y_topology;

    // ---- task loss: 0.5·mean over all R·T tokens of ‖y − target‖² ----------------------------------
    const float inv_n = 1.0f / static_cast<float>(T * R);
    std::vector<float> dy(sz(T * d));
    double task_loss = 0.0;
    for (std::size_t i = 0; i < dy.size(); ++i) {
      const float r = y[i] - b.target[i];
      dy[i] = r * inv_n;
      task_loss += 0.5 * static_cast<double>(r) * static_cast<double>(r) / static_cast<double>(T * R);
    }

    // ---- backward through the experts, where they live -------------------------------------------
    // dy goes the way h went (a second dispatch: the same plan gives the same slots); the combine
    // weights follow by send_rows, one per kept assignment (a padded dispatch carries none).
    const dispatched<float> dy_in = ex.dispatch(be, plan.view(), su.placement, cmat{dy.data(), T, d}, pol.mode);
    {
      const receive_plan &a = h_in.receive(), &c = dy_in.receive();
      if (a.expert_offsets != c.expert_offsets || a.slot_source != c.slot_source || a.slot_token != c.slot_token ||
          a.return_slot != c.return_slot)
        failed |= same_slots;
    }
    const index S = dy_in.receive().num_slots(), A = plan.num_assignments();
    std::vector<float> w_slot(sz(S));
    ex.send_rows(be, dy_in, cmat{plan.token_weight().data(), A, 1}, mat{w_slot.data(), S, 1});
    if (pol.mode == exchange_mode::dropless && !detail::same_bits(w_slot, dy_in.receive().slot_weight))
      failed |= weights_moved;
    std::vector<float> dw_slot(sz(S)), dh_slot(sz(S * d));
    std::vector<float> dW(sz(static_cast<index>(owned.size()) * d * d), 0.0f);
    const auto hin = h_in.expert_in();
    const auto dyin = dy_in.expert_in();
    for (index j = 0; j < dy_in.num_local_experts(); ++j) {
      const float* W = &p.W[sz(owned[sz(j)] * d * d)];
      float* g = &dW[sz(j * d * d)];
      // Summed over the slots in their expert-major order (source rank, then token): deterministic.
      for (rs::id_type q = dy_in.expert_offsets()[sz(j)]; q < dy_in.expert_offsets()[sz(j + 1)]; ++q) {
        dw_slot[sz(q)] = dot(dyin.row(q), &out[sz(q * d)], d);  // ∂L/∂w = <dy_t, expert output>
        expert_input_grad(W, dyin.row(q), &dh_slot[sz(q * d)], d);
        for (index i = 0; i < d; ++i) {
          const float wdy = w_slot[sz(q)] * dyin.row(q)[i];  // y_t = Σ w·W h  ->  ∂L/∂W = w·dy·hᵀ
          for (index c = 0; c < d; ++c) g[i * d + c] += wdy * hin.row(q)[c];
        }
      }
    }
    // dweight back to each assignment's source, un-summed (combine would add a token's rows).
    std::vector<float> dweight(sz(A));
    ex.return_rows(be, dy_in, cmat{dw_slot.data(), S, 1}, mat{dweight.data(), A, 1});
    // Σ_i w_i·W_iᵀ dy_t is a combine of the rows Wᵀ·dy: the gradient of h through the experts.
    std::vector<float> dh(sz(T * d));
    ex.combine(be, dy_in, cmat{dh_slot.data(), S, d}, mat{dh.data(), T, d});

    // ---- the same in one process, on this rank's plan, with the replicas of every expert -----------
    {
      const index slots = plan.num_slots();
      std::vector<float> buf(sz(slots * d)), ref_out(sz(slots * d)), ref_y(sz(T * d));
      std::vector<float> dybuf(sz(slots * d)), ref_dh_slot(sz(slots * d)), ref_dh(sz(T * d));
      rs::dispatch(be, plan, hv, mat{buf.data(), slots, d});
      rs::dispatch(be, plan, cmat{dy.data(), T, d}, mat{dybuf.data(), slots, d});
      for (index e = 0; e < E; ++e)
        for (rs::id_type q = plan.expert_offsets()[sz(e)]; q < plan.expert_offsets()[sz(e + 1)]; ++q) {
          expert_forward(&p.W[sz(e * d * d)], &buf[sz(q * d)], &ref_out[sz(q * d)], d);
          expert_input_grad(&p.W[sz(e * d * d)], &dybuf[sz(q * d)], &ref_dh_slot[sz(q * d)], d);
        }
      rs::combine(be, plan, cmat{ref_out.data(), slots, d}, mat{ref_y.data(), T, d});
      rs::combine(be, plan, cmat{ref_dh_slot.data(), slots, d}, mat{ref_dh.data(), T, d});
      std::vector<float> ref_dweight(sz(plan.num_assignments()));
      for (index t = 0; t < T; ++t)
        for (rs::id_type i = plan.token_offsets()[sz(t)]; i < plan.token_offsets()[sz(t + 1)]; ++i)
          ref_dweight[sz(i)] = dot(&dy[sz(t * d)], &ref_out[sz(plan.token_slot()[sz(i)] * d)], d);
      if (!detail::same_bits(y, ref_y)) failed |= y_single;
      if (!detail::same_bits(dweight, ref_dweight)) failed |= dweight_single;
      if (!detail::same_bits(dh, ref_dh)) failed |= dh_single;
    }

    // ---- backward through the router: combine weights, balancing losses, affinity ------------------
    std::vector<float> logits(sz(T * E)), dl(sz(T * E)), z(sz(T * E)), dz(sz(T * E));
    router.affinity.forward(be, hv, mat{logits.data(), T, E});
    rs::routing::weight_backward(be, router.direction, cmat{logits.data(), T, E}, plan,
                                 rs::vector_view<const float>{dweight.data(), plan.num_assignments()},
                                 mat{dl.data(), T, E});
    for (std::size_t i = 0; i < z.size(); ++i) z[i] = logits[i] * pol.loss_scale;
    // Each rank's losses are 1/R of the global ones, whose gradients the allgather below sums.
    double aux_loss = 0.0, locality_loss = 0.0;
    const auto add_dz = [&] {
      for (std::size_t i = 0; i < dl.size(); ++i) dl[i] += dz[i] * pol.loss_scale;
    };
    if (pol.aux > 0.0) {
      aux_loss = static_cast<double>(rs::loss::switch_loss(
          be, cmat{z.data(), T, E}, {.top_k = k, .coeff = pol.aux / static_cast<double>(R)}, mat{dz.data(), T, E}));
      add_dz();
    }
    if (pol.locality > 0.0) {
      const rs::loss::locality_options lo{.expert_node = {su.expert_node.data(), E},
                                          .num_nodes = s.num_nodes(),
                                          .local_node = static_cast<rs::id_type>(su.rank / s.ranks_per_node),
                                          .coeff = pol.locality / static_cast<double>(R)};
      locality_loss = static_cast<double>(rs::loss::locality_loss(be, cmat{z.data(), T, E}, lo, mat{dz.data(), T, E}));
      add_dz();
    }
    std::vector<float> dh_router(sz(T * d));
    std::vector<float> grads(sz(s.d_in * d + E * d), 0.0f);  // dA, then the gate's
    if constexpr (std::is_same_v<typename router_type::affinity_type, rs::affinity::linear>) {
      router.affinity.backward(be, hv, cmat{dl.data(), T, E}, mat{dh_router.data(), T, d},
                               mat{grads.data() + s.d_in * d, E, d}, rs::vector_view<float>{});
    } else {
      router.affinity.backward(be, hv, cmat{dl.data(), T, E}, mat{dh_router.data(), T, d});
    }
    for (std::size_t i = 0; i < dh.size(); ++i) dh[i] += dh_router[i];
    for (index t = 0; t < T; ++t)  // dA = xᵀ·dh
      for (index j = 0; j < s.d_in; ++j) {
        const float xv = b.x[sz(t * s.d_in + j)];
        for (index i = 0; i < d; ++i) grads[sz(j * d + i)] += xv * dh[sz(t * d + i)];
      }

    // ---- SGD: replicated parameters on the summed gradient, each expert on its owner ----------------
    detail::sum_in_rank_order(su.comm, grads);
    for (std::size_t i = 0; i < p.A.size(); ++i) p.A[i] -= su.lr * grads[i];
    for (std::size_t i = 0; i < p.gate.size(); ++i) p.gate[i] -= su.lr * grads[p.A.size() + i];
    const std::size_t block = sz(static_cast<index>(owned.size()) * d * d);
    float* mine = &p.W[sz(owned.front() * d * d)];  // contiguous placement: the owned experts are adjacent
    for (std::size_t i = 0; i < block; ++i) mine[i] -= su.lr * dW[i];
    // The replicas follow the owners (only the one-process reference reads them).
    MPI_Allgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, p.W.data(), static_cast<int>(block), MPI_FLOAT, su.comm);

    // ---- what the step cost, summed over ranks -----------------------------------------------------
    rec.traffic = rs::dist::traffic(plan.view(), su.placement, su.rank, s.row_bytes());
    detail::sum_over_ranks(su.comm, rec.traffic);
    detail::sum_over_ranks(su.comm, rec.flat);
    detail::sum_over_ranks(su.comm, rec.two_level);
    double losses[3] = {task_loss, aux_loss, locality_loss};
    MPI_Allreduce(MPI_IN_PLACE, losses, 3, MPI_DOUBLE, MPI_SUM, su.comm);
    rec.task_loss = losses[0];
    rec.aux_loss = losses[1];
    rec.locality_loss = losses[2];
    long long capacity = plan.capacity();
    MPI_Allreduce(MPI_IN_PLACE, &capacity, 1, MPI_LONG_LONG, MPI_MAX, su.comm);
    rec.capacity = static_cast<index>(capacity);

    // The transport moved exactly what dist::traffic counts: rows per (token, rank) flat, per (token,
    // node) two-level, or C per expert padded; 16 bytes of metadata per (token, expert) either way.
    const auto& tr = rec.traffic;
    const std::int64_t rb = s.row_bytes();
    const std::int64_t meta =
        static_cast<std::int64_t>(sizeof(routed_assignment)) * tr.split(tr.expert_rows).inter_node;
    const bool padded = pol.mode == exchange_mode::padded;
    const std::int64_t want_flat = rb * tr.split(padded ? tr.padded_rows : tr.token_rows).inter_node;
    const std::int64_t want_two = padded ? want_flat : rb * tr.inter_node_node_rows();
    if (rec.flat.rows.inter != want_flat || rec.two_level.rows.inter != want_two ||
        rec.flat.metadata.inter != (padded ? 0 : meta) || rec.two_level.metadata.inter != (padded ? 0 : meta))
      failed |= bytes_model;

    MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_UNSIGNED, MPI_BOR, su.comm);
    result.failed |= failed;
    result.steps.push_back(std::move(rec));
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  return result;
}

}  // namespace ep
