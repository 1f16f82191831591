#pragma once

// The model of the example, its data, and the expert arithmetic.
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
#include <vector>

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

}  // namespace ep
