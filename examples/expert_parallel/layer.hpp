#pragma once

// The model of the example, its data, and the per-assignment transfers a backward pass needs.
//
//   x (d_in)  --A-->  h = x·A (d)  --router-->  y = Σ_i w_i · W_{e_i} h   (one MoE layer, linear experts)
//   task loss 0.5·mean ‖y − M_c x‖² over every token of every rank (M_c: the teacher of x's cluster)
//
// A and the gate are replicated (data parallel: their gradients are summed over ranks); expert e's
// W_e lives on the rank that owns e, and every rank keeps a replica of all of them (copied from the
// owners after every update) only to recompute its tokens in one process as the reference.

#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include <mpi.h>

#include <resonance/dist/mpi.hpp>
#include <resonance/resonance.hpp>

namespace ep {

namespace rs = resonance;
using rs::index;

inline std::size_t sz(index n) { return static_cast<std::size_t>(n); }

struct shape {
  index ranks = 4;
  index ranks_per_node = 2;
  index experts = 8;  // 2 per rank
  index d_in = 32;
  index d = 32;            // 4 channels per expert: GrAP-cosine needs d to be a multiple of E
  index tokens = 256;      // per rank and step
  index clusters = 8;      // 2 per rank
  double own_share = 0.8;  // of a rank's tokens drawn from its own 2 clusters
  std::uint64_t seed = 2024;

  index num_nodes() const { return ranks / ranks_per_node; }
  index row_bytes() const { return d * static_cast<index>(sizeof(float)); }
};

// The task: cluster centres and one teacher per cluster, the same on every rank (one seed).
struct task {
  std::vector<float> centre;   // clusters × d_in
  std::vector<float> teacher;  // clusters × (d × d_in)
};

inline task make_task(const shape& s) {
  std::mt19937_64 rng(s.seed);
  std::normal_distribution<float> normal;
  task t;
  t.centre.resize(sz(s.clusters * s.d_in));
  t.teacher.resize(sz(s.clusters * s.d * s.d_in));
  for (float& v : t.centre) v = normal(rng);
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.d_in));
  for (float& v : t.teacher) v = scale * normal(rng);
  return t;
}

struct batch {
  std::vector<float> x, target;  // tokens × d_in, tokens × d
};

// Rank r's tokens of one step: clustered, the cluster mostly one of r's own two, so that where a token
// comes from says something about what it is (and so a router can learn to keep it on its node).
inline batch make_batch(const shape& s, const task& tk, index rank, index step) {
  std::mt19937_64 rng(s.seed + 7919 * static_cast<std::uint64_t>(rank) + 104729 * static_cast<std::uint64_t>(step));
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<double> unit;
  const index own = s.clusters / s.ranks;
  std::uniform_int_distribution<index> any(0, s.clusters - 1), mine(0, own - 1);
  batch b;
  b.x.resize(sz(s.tokens * s.d_in));
  b.target.resize(sz(s.tokens * s.d));
  for (index t = 0; t < s.tokens; ++t) {
    const index c = unit(rng) < s.own_share ? rank * own + mine(rng) : any(rng);
    float* x = &b.x[sz(t * s.d_in)];
    for (index j = 0; j < s.d_in; ++j) x[j] = tk.centre[sz(c * s.d_in + j)] + 0.3f * normal(rng);
    const float* m = &tk.teacher[sz(c * s.d * s.d_in)];
    for (index i = 0; i < s.d; ++i) {
      float acc = 0.0f;
      for (index j = 0; j < s.d_in; ++j) acc += m[i * s.d_in + j] * x[j];
      b.target[sz(t * s.d + i)] = acc;
    }
  }
  return b;
}

struct parameters {
  std::vector<float> A;     // d_in × d
  std::vector<float> gate;  // E × d (the linear gate; unused by GrAP-cosine)
  std::vector<float> W;     // E × (d × d): expert e's matrix at e·d·d
};

// The same initial parameters on every rank (one seed), for every policy.
inline parameters init_parameters(const shape& s) {
  std::mt19937_64 rng(s.seed + 1);
  std::normal_distribution<float> normal;
  parameters p;
  p.A.resize(sz(s.d_in * s.d));
  p.gate.resize(sz(s.experts * s.d));
  p.W.resize(sz(s.experts * s.d * s.d));
  for (float& v : p.A) v = normal(rng) / std::sqrt(static_cast<float>(s.d_in));
  for (float& v : p.gate) v = 0.1f * normal(rng);
  for (float& v : p.W) v = normal(rng) / std::sqrt(static_cast<float>(s.d));
  return p;
}

// The expert arithmetic, one row at a time and in one fixed order, so that the same row gives the same
// bits whichever process computes it.
inline void expert_forward(const float* W, const float* h, float* out, index d) {  // out = W·h
  for (index i = 0; i < d; ++i) {
    float acc = 0.0f;
    for (index j = 0; j < d; ++j) acc += W[i * d + j] * h[j];
    out[i] = acc;
  }
}
inline void expert_input_grad(const float* W, const float* dy, float* dh, index d) {  // dh = Wᵀ·dy
  for (index j = 0; j < d; ++j) dh[j] = 0.0f;
  for (index i = 0; i < d; ++i)
    for (index j = 0; j < d; ++j) dh[j] += W[i * d + j] * dy[i];
}
inline float dot(const float* a, const float* b, index d) {
  float acc = 0.0f;
  for (index c = 0; c < d; ++c) acc += a[c] * b[c];
  return acc;
}

// One value per kept assignment, moved between the source rank and the expert's rank along the
// exchange's return layout (the combine's way back, without its weighted sum): d.send() numbers the
// source's assignments (return_row), d.receive() the expert side's slots (return_slot), per peer in
// blocks of return_offsets. mpi_exchange::combine always sums a token's rows, so the per-assignment
// scalars of the backward pass (dweight, and the weights a padded dispatch does not carry) travel here.
namespace detail {
inline std::vector<int> block_counts(const std::vector<rs::id_type>& offsets) {
  std::vector<int> c(offsets.size() - 1);
  for (std::size_t r = 0; r + 1 < offsets.size(); ++r) c[r] = offsets[r + 1] - offsets[r];
  return c;
}
inline std::vector<int> block_starts(const std::vector<rs::id_type>& offsets) {
  return {offsets.begin(), offsets.end() - 1};
}
inline void alltoallv_floats(MPI_Comm comm, const std::vector<float>& send, const std::vector<rs::id_type>& send_off,
                             std::vector<float>& recv, const std::vector<rs::id_type>& recv_off) {
  recv.assign(sz(recv_off.back()), 0.0f);
  const std::vector<int> sc = block_counts(send_off), sd = block_starts(send_off);
  const std::vector<int> rc = block_counts(recv_off), rd = block_starts(recv_off);
  float no_send = 0.0f, no_recv = 0.0f;  // MPI wants real (and distinct) addresses even for empty buffers
  MPI_Alltoallv(send.empty() ? &no_send : send.data(), sc.data(), sd.data(), MPI_FLOAT,
                recv.empty() ? &no_recv : recv.data(), rc.data(), rd.data(), MPI_FLOAT, comm);
}
}  // namespace detail

// Per assignment of this rank's plan (token-major) -> per slot of d.expert_in() on the experts' rank
// (0 in padding slots).
inline std::vector<float> to_expert_slots(MPI_Comm comm, const rs::dist::dispatched<float>& d,
                                          std::span<const float> per_assignment) {
  const rs::dist::exchange_plan& xp = d.send();
  const rs::dist::receive_plan& rp = d.receive();
  std::vector<float> send(sz(xp.num_returns()), 0.0f), recv;
  for (std::size_t i = 0; i < per_assignment.size(); ++i) send[sz(xp.return_row[i])] = per_assignment[i];
  detail::alltoallv_floats(comm, send, xp.return_offsets, recv, rp.return_offsets);
  std::vector<float> per_slot(sz(rp.num_slots()), 0.0f);
  for (std::size_t k = 0; k < recv.size(); ++k) per_slot[sz(rp.return_slot[k])] = recv[k];
  return per_slot;
}

// Per slot of d.expert_in() -> per assignment of the source's plan (token-major).
inline std::vector<float> to_source_assignments(MPI_Comm comm, const rs::dist::dispatched<float>& d,
                                                std::span<const float> per_slot) {
  const rs::dist::exchange_plan& xp = d.send();
  const rs::dist::receive_plan& rp = d.receive();
  std::vector<float> send(sz(rp.num_returns())), recv;
  for (std::size_t k = 0; k < send.size(); ++k) send[k] = per_slot[sz(rp.return_slot[k])];
  detail::alltoallv_floats(comm, send, rp.return_offsets, recv, xp.return_offsets);
  std::vector<float> per_assignment(xp.return_row.size());
  for (std::size_t i = 0; i < per_assignment.size(); ++i) per_assignment[i] = recv[sz(xp.return_row[i])];
  return per_assignment;
}

}  // namespace ep
