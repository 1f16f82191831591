#pragma once

// The model, forward and backward written out (Eigen, fp32, single thread):
//   x (dense tokens, or the concatenated embeddings of c characters)
//   h_0 = x·Pᵀ                                   input projection: the first MoE input, d = E·g channels
//   h_{l+1} = h_l + Σ_i w_i · FFN_{l,e_i}(h_l)    MoE layer l (ReLU FFN d -> hidden -> d), residual
//   z = mean of h_L over a sample's tokens, logits = z·Whᵀ + bh, softmax cross-entropy.
// Routing (route, the router's weights and their backward) is the trainer's; this file only moves rows
// through dispatch / combine and the experts.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include <resonance/resonance.hpp>

#include "data.hpp"

namespace etr {

namespace rs = resonance;
using rmat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using map = Eigen::Map<rmat>;
using cmap = Eigen::Map<const rmat>;
using rvec_map = Eigen::Map<Eigen::RowVectorXf>;
using crvec_map = Eigen::Map<const Eigen::RowVectorXf>;

inline std::size_t sz(long n) { return static_cast<std::size_t>(n); }

struct model_shape {
  long in = 0;       // width of x (d for dense tokens, context·embed for text)
  long vocab = 0;    // 0: dense input; else characters, embedded
  long context = 0;  // characters per prediction (text)
  long embed = 0;    // embedding width (text)
  long width = 0;    // d
  long hidden = 0;   // expert FFN hidden size
  long experts = 0;  // E
  long classes = 0;  // head outputs
  long layers = 1;   // L, MoE layers
};

// One parameter tensor: a rows x cols block of the flat store.
struct tensor {
  std::size_t offset = 0;
  long rows = 0, cols = 0;
  std::size_t size() const { return sz(rows * cols); }
};

// One MoE layer's parameters: its gate (used by the learned linear gates only) and E experts.
struct layer_parameters {
  tensor gate;
  std::vector<tensor> w1, b1, w2, b2;
};

// All parameters in one flat vector (so the optimizer is one loop and views into it never move).
struct parameters {
  model_shape shape;
  tensor emb, proj, head_w, head_b;
  std::vector<layer_parameters> layers;
  std::vector<float> value, grad, m, v;  // Adam moments
  long adam_step = 0;

  map mat(const tensor& t) { return map(value.data() + t.offset, t.rows, t.cols); }
  cmap mat(const tensor& t) const { return cmap(value.data() + t.offset, t.rows, t.cols); }
  map gmat(const tensor& t) { return map(grad.data() + t.offset, t.rows, t.cols); }
  rs::matrix_view<const float> view(const tensor& t) const { return {value.data() + t.offset, t.rows, t.cols}; }
};

inline parameters init_parameters(const model_shape& s, std::uint64_t seed) {
  parameters p;
  p.shape = s;
  std::size_t n = 0;
  const auto take = [&](long r, long c) {
    tensor t{n, r, c};
    n += t.size();
    return t;
  };
  p.emb = take(s.vocab, s.embed);
  p.proj = take(s.width, s.in);
  p.layers.resize(sz(s.layers));
  for (layer_parameters& l : p.layers) {
    l.gate = take(s.experts, s.width);
    for (long e = 0; e < s.experts; ++e) {
      l.w1.push_back(take(s.hidden, s.width));
      l.b1.push_back(take(1, s.hidden));
      l.w2.push_back(take(s.width, s.hidden));
      l.b2.push_back(take(1, s.width));
    }
  }
  p.head_w = take(s.classes, s.width);
  p.head_b = take(1, s.classes);
  p.value.assign(n, 0.0f);
  p.grad.assign(n, 0.0f);
  p.m.assign(n, 0.0f);
  p.v.assign(n, 0.0f);

  // The same seed gives the same initial model in every arm (the gate is drawn even when unused).
  std::mt19937_64 rng(seed);
  const auto fill = [&](const tensor& t, double stddev) {
    std::normal_distribution<float> nd(0.0f, static_cast<float>(stddev));
    for (std::size_t i = 0; i < t.size(); ++i) p.value[t.offset + i] = nd(rng);
  };
  fill(p.emb, 1.0);
  if (s.vocab == 0) {
    // Dense tokens: start at the identity, so a GrAP gate sees the class patterns' channel groups.
    fill(p.proj, 0.02);
    for (long i = 0; i < std::min(s.width, s.in); ++i) p.value[p.proj.offset + sz(i * s.in + i)] += 1.0f;
  } else {
    fill(p.proj, 1.0 / std::sqrt(static_cast<double>(s.in)));
  }
  for (const layer_parameters& l : p.layers) {
    fill(l.gate, 0.01);
    for (long e = 0; e < s.experts; ++e) {
      fill(l.w1[sz(e)], 1.0 / std::sqrt(static_cast<double>(s.width)));
      fill(l.w2[sz(e)], 1.0 / std::sqrt(static_cast<double>(s.hidden)));
    }
  }
  fill(p.head_w, 1.0 / std::sqrt(static_cast<double>(s.width)));
  return p;
}

// Adam with global-norm clipping at 5 (the first steps of the cosine gates can be steep).
inline void adam_step(parameters& p, double lr) {
  double norm2 = 0.0;
  for (float g : p.grad) norm2 += static_cast<double>(g) * static_cast<double>(g);
  const double clip = std::sqrt(norm2) > 5.0 ? 5.0 / std::sqrt(norm2) : 1.0;
  ++p.adam_step;
  const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
  const double c1 = 1.0 - std::pow(b1, static_cast<double>(p.adam_step));
  const double c2 = 1.0 - std::pow(b2, static_cast<double>(p.adam_step));
  for (std::size_t i = 0; i < p.value.size(); ++i) {
    const double g = static_cast<double>(p.grad[i]) * clip;
    const double mi = b1 * static_cast<double>(p.m[i]) + (1.0 - b1) * g;
    const double vi = b2 * static_cast<double>(p.v[i]) + (1.0 - b2) * g * g;
    p.m[i] = static_cast<float>(mi);
    p.v[i] = static_cast<float>(vi);
    p.value[i] -= static_cast<float>(lr * (mi / c1) / (std::sqrt(vi / c2) + eps));
  }
}

// One MoE layer's activations: its input and the expert-major slot rows.
struct layer_activations {
  rmat h;                // T x d, the layer's input
  rmat buf, z1, a, out;  // S x d, S x hidden, S x hidden, S x d
};

// Activations kept for the backward pass.
struct activations {
  rmat x;  // T x in
  std::vector<layer_activations> layer;
  rmat y, pooled, logits;  // T x d (the last layer's output), B x d, B x classes
  double loss = 0.0;       // mean cross-entropy over the samples
  double accuracy = 0.0;

  // The input of layer l; l == L is the last layer's output.
  const rmat& input(std::size_t l) const { return l < layer.size() ? layer[l].h : y; }
};

inline rs::matrix_view<const float> view(const rmat& m) { return {m.data(), m.rows(), m.cols()}; }
inline rs::matrix_view<float> view(rmat& m) { return {m.data(), m.rows(), m.cols()}; }

// x and h_0 = x·Pᵀ.
inline void input_forward(const parameters& p, const batch& b, activations& act) {
  const model_shape& s = p.shape;
  const long T = b.tokens();
  act.layer.resize(p.layers.size());
  if (s.vocab == 0) {
    act.x = cmap(b.x.data(), T, s.in);
  } else {
    act.x.resize(T, s.in);
    const cmap emb = p.mat(p.emb);
    for (long t = 0; t < T; ++t)
      for (long j = 0; j < s.context; ++j)
        act.x.row(t).segment(j * s.embed, s.embed) = emb.row(b.ids[sz(t * s.context + j)]);
  }
  act.layer[0].h.noalias() = act.x * p.mat(p.proj).transpose();
}

// Layer l: dispatch -> experts -> combine -> residual, for a plan routed from its input; writes the
// next layer's input (or y after the last layer).
inline void experts_forward(const parameters& p, std::size_t l, const rs::routing_plan& plan, activations& act) {
  const rs::backend::serial be;
  const model_shape& s = p.shape;
  const layer_parameters& lp = p.layers[l];
  layer_activations& la = act.layer[l];
  const long S = plan.num_slots(), T = la.h.rows();
  la.buf.resize(S, s.width);
  rs::dispatch(be, plan, view(std::as_const(la.h)), view(la.buf));
  la.z1.resize(S, s.hidden);
  la.a.resize(S, s.hidden);
  la.out.resize(S, s.width);
  const auto off = plan.expert_offsets();
  for (long e = 0; e < s.experts; ++e) {
    const long r0 = off[sz(e)], n = off[sz(e + 1)] - r0;
    if (n == 0) continue;
    la.z1.middleRows(r0, n).noalias() = la.buf.middleRows(r0, n) * p.mat(lp.w1[sz(e)]).transpose();
    la.z1.middleRows(r0, n).rowwise() += p.mat(lp.b1[sz(e)]).row(0);
    la.a.middleRows(r0, n) = la.z1.middleRows(r0, n).cwiseMax(0.0f);
    la.out.middleRows(r0, n).noalias() = la.a.middleRows(r0, n) * p.mat(lp.w2[sz(e)]).transpose();
    la.out.middleRows(r0, n).rowwise() += p.mat(lp.b2[sz(e)]).row(0);
  }
  rmat& next = l + 1 < act.layer.size() ? act.layer[l + 1].h : act.y;
  next.resize(T, s.width);
  rs::combine(be, plan, view(std::as_const(la.out)), view(next));
  next += la.h;
}

// Pooling, head and cross-entropy; when `dy` is given, the head's gradients go to p.grad and dL/dy to dy.
inline void head_forward_backward(parameters& p, const batch& b, activations& act, rmat* dy) {
  const long B = b.samples, s = b.tokens_per_sample, C = p.shape.classes;
  act.pooled.resize(B, p.shape.width);
  for (long i = 0; i < B; ++i) act.pooled.row(i) = act.y.middleRows(i * s, s).colwise().mean();
  act.logits.noalias() = act.pooled * p.mat(p.head_w).transpose();
  act.logits.rowwise() += p.mat(p.head_b).row(0);
  rmat dlog(B, C);
  double loss = 0.0;
  long correct = 0;
  for (long i = 0; i < B; ++i) {
    const auto row = act.logits.row(i);
    Eigen::Index arg = 0;
    const float mx = row.maxCoeff(&arg);
    double z = 0.0;
    for (long c = 0; c < C; ++c) z += std::exp(static_cast<double>(row(c) - mx));
    const long y = b.label[sz(i)];
    loss += std::log(z) - static_cast<double>(row(y) - mx);
    correct += arg == y ? 1 : 0;
    for (long c = 0; c < C; ++c)
      dlog(i, c) = static_cast<float>((std::exp(static_cast<double>(row(c) - mx)) / z - (c == y ? 1.0 : 0.0)) /
                                      static_cast<double>(B));
  }
  act.loss = loss / static_cast<double>(B);
  act.accuracy = static_cast<double>(correct) / static_cast<double>(B);
  if (dy == nullptr) return;
  p.gmat(p.head_w).noalias() += dlog.transpose() * act.pooled;
  p.gmat(p.head_b).row(0) += dlog.colwise().sum();
  const rmat dpooled = dlog * p.mat(p.head_w);
  dy->resize(B * s, p.shape.width);
  for (long i = 0; i < B; ++i) dy->middleRows(i * s, s) = dpooled.row(i).replicate(s, 1) / static_cast<float>(s);
}

// Through layer l's combine and experts, given dy = dL/d(its output): dL/dw for every kept assignment
// (plan.token_weight() order) into dweight, the experts' gradients into p.grad, and dL/d(its input)
// (residual + dispatch) into dh.
inline void experts_backward(parameters& p, std::size_t l, const rs::routing_plan& plan, const activations& act,
                             const rmat& dy, std::vector<float>& dweight, rmat& dh) {
  const rs::backend::serial be;
  const model_shape& s = p.shape;
  const layer_parameters& lp = p.layers[l];
  const layer_activations& la = act.layer[l];
  const long S = plan.num_slots(), T = la.h.rows();
  // combine's gradient: w_i·dy_t at each kept slot (zero rows at padding) and <dy_t, out_slot> per
  // assignment (summed in double, rounded once).
  rmat dout(S, s.width);
  dweight.resize(sz(plan.num_assignments()));
  rs::combine_backward(be, plan, view(la.out), view(dy), view(dout),
                       rs::vector_view<float>{dweight.data(), plan.num_assignments()});
  rmat dbuf(S, s.width);
  const auto off = plan.expert_offsets();
  for (long e = 0; e < s.experts; ++e) {
    const long r0 = off[sz(e)], n = off[sz(e + 1)] - r0;
    if (n == 0) continue;
    const auto d_out = dout.middleRows(r0, n);
    p.gmat(lp.w2[sz(e)]).noalias() += d_out.transpose() * la.a.middleRows(r0, n);
    p.gmat(lp.b2[sz(e)]).row(0) += d_out.colwise().sum();
    rmat dz = d_out * p.mat(lp.w2[sz(e)]);
    dz.array() *= (la.z1.middleRows(r0, n).array() > 0.0f).cast<float>();
    p.gmat(lp.w1[sz(e)]).noalias() += dz.transpose() * la.buf.middleRows(r0, n);
    p.gmat(lp.b1[sz(e)]).row(0) += dz.colwise().sum();
    dbuf.middleRows(r0, n).noalias() = dz * p.mat(lp.w1[sz(e)]);
  }
  // dispatch's gradient (each token's slot rows summed in ascending expert order), then the residual.
  dh.resize(T, s.width);
  rs::dispatch_backward(be, plan, view(std::as_const(dbuf)), view(dh));
  dh += dy;
}

// Through the projection (and the embeddings), given dh = dL/dh_0.
inline void input_backward(parameters& p, const batch& b, const activations& act, const rmat& dh) {
  const model_shape& s = p.shape;
  p.gmat(p.proj).noalias() += dh.transpose() * act.x;
  if (s.vocab == 0) return;
  const rmat dx = dh * p.mat(p.proj);
  map demb = p.gmat(p.emb);
  for (long t = 0; t < dx.rows(); ++t)
    for (long j = 0; j < s.context; ++j)
      demb.row(b.ids[sz(t * s.context + j)]) += dx.row(t).segment(j * s.embed, s.embed);
}

}  // namespace etr
