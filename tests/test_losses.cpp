// Training losses with gradients: each against an independent double restatement written here, and
// its analytic gradient against a central finite difference of the library's own value; every value
// and gradient bitwise the same on every backend.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/resonance.hpp>

#include "backends.hpp"
#include "error_of.hpp"
#include "random_inputs.hpp"

namespace {

namespace rs = resonance;
namespace rl = resonance::loss;
using idx = rs::index;
using mask_t = std::vector<std::uint8_t>;

std::size_t z(idx n) { return static_cast<std::size_t>(n); }

// Tie-free logits: a random permutation of ranks spaced by 0.7 plus noise within ±0.1, so the top-k of
// every token has a margin of at least 0.5 in logit space and no FD step changes the counts.
std::vector<double> make_logits(std::mt19937_64& rng, idx T, idx E) {
  std::vector<double> v(z(T * E));
  std::uniform_real_distribution<double> noise(-0.1, 0.1);
  std::vector<int> perm(z(E));
  for (idx t = 0; t < T; ++t) {
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (idx e = 0; e < E; ++e) v[z(t * E + e)] = 0.7 * static_cast<double>(perm[z(e)] - E / 2) + noise(rng);
  }
  return v;
}

mask_t make_mask(idx T) {
  mask_t m(z(T), 1);
  for (idx t = 0; t < T; t += 3) m[z(t)] = 0;
  return m;
}

bool ok(const mask_t& m, idx t) { return m.empty() || m[z(t)] != 0; }

// Reference scores of one row (Megatron's compute_routing_scores_for_aux_loss), in double.
std::vector<double> ref_scores(const double* l, idx E, rs::score fn) {
  std::vector<double> s(z(E));
  double sum = 0.0;
  if (fn == rs::score::softmax) {
    const double m = *std::max_element(l, l + E);
    for (idx e = 0; e < E; ++e) sum += s[z(e)] = std::exp(l[e] - m);
    for (double& v : s) v /= sum;
  } else {
    for (idx e = 0; e < E; ++e) {
      const double x = l[e];
      s[z(e)] = fn == rs::score::sigmoid ? 1.0 / (1.0 + std::exp(-x)) : std::sqrt(std::log1p(std::exp(x)));
      sum += s[z(e)];
    }
    for (double& v : s) v /= sum + 1e-20;
  }
  return s;
}

// Top-k ids of a score row (stable: ties to the lower index).
std::vector<idx> ref_topk(const std::vector<double>& s, idx k) {
  std::vector<idx> ids(s.size());
  std::iota(ids.begin(), ids.end(), idx{0});
  std::stable_sort(ids.begin(), ids.end(), [&](idx a, idx b) { return s[z(a)] > s[z(b)]; });
  ids.resize(z(k));
  return ids;
}

// Counts and score sums of tokens [b, e) that are valid.
struct ref_stats {
  std::vector<double> c, p;
  double n = 0.0;
};
ref_stats ref_range(const std::vector<double>& l, idx E, idx b, idx e_end, rs::score fn, idx k, const mask_t& m) {
  ref_stats r{std::vector<double>(z(E), 0.0), std::vector<double>(z(E), 0.0), 0.0};
  for (idx t = b; t < e_end; ++t) {
    if (!ok(m, t)) continue;
    r.n += 1.0;
    const auto s = ref_scores(l.data() + t * E, E, fn);
    for (idx id : ref_topk(s, k)) r.c[z(id)] += 1.0;
    for (idx e = 0; e < E; ++e) r.p[z(e)] += s[z(e)];
  }
  return r;
}

double ref_switch(const std::vector<double>& l, idx T, idx E, rs::score fn, idx k, double coeff, const mask_t& m) {
  const ref_stats r = ref_range(l, E, 0, T, fn, k, m);
  if (r.n == 0.0) return 0.0;
  double sum = 0.0;
  for (idx e = 0; e < E; ++e) sum += r.c[z(e)] / (r.n * static_cast<double>(k)) * (r.p[z(e)] / r.n);
  return coeff * static_cast<double>(E) * sum;
}

rs::matrix_view<const double> cview(const std::vector<double>& l, idx T, idx E) { return {l.data(), T, E}; }
rs::vector_view<const std::uint8_t> mview(const mask_t& m) { return {m.data(), static_cast<idx>(m.size())}; }

// Analytic gradient vs a central FD of value(l): max |a − fd| <= 1e-6 · max |fd|; masked rows exactly 0.
void check_grad(std::vector<double> l, idx T, idx E, const mask_t& m,
                const std::function<double(const std::vector<double>&, std::vector<double>*)>& value) {
  std::vector<double> g(z(T * E), 123.0);
  value(l, &g);
  double worst = 0.0, scale = 0.0;
  const double h = 1e-5;
  for (idx i = 0; i < T * E; ++i) {
    const double keep = l[z(i)];
    l[z(i)] = keep + h;
    const double up = value(l, nullptr);
    l[z(i)] = keep - h;
    const double down = value(l, nullptr);
    l[z(i)] = keep;
    const double fd = (up - down) / (2.0 * h);
    worst = std::max(worst, std::fabs(fd - g[z(i)]));
    scale = std::max(scale, std::fabs(fd));
    if (!ok(m, i / E)) CHECK(g[z(i)] == 0.0);
  }
  CHECK(scale > 0.0);
  CHECK(worst <= 1e-6 * scale);
}

rs::matrix_view<double> gview(std::vector<double>* g, idx T, idx E) {
  return g ? rs::matrix_view<double>{g->data(), T, E} : rs::matrix_view<double>{};
}

const rs::backend::serial be{};
const rs::score kScores[] = {rs::score::softmax, rs::score::sigmoid, rs::score::sqrt_softplus};

}  // namespace

TEST_CASE("test_losses: switch loss value and gradient") {
  std::mt19937_64 rng(11);
  const idx T = 14, E = 6;
  const auto l = make_logits(rng, T, E);
  for (const bool masked : {false, true}) {
    const mask_t m = masked ? make_mask(T) : mask_t{};
    for (rs::score fn : kScores)
      for (idx k : {1, 2, 4}) {
        CAPTURE(k);
        const rl::switch_options o{k, fn, 0.3};
        const auto f = [&](const std::vector<double>& x, std::vector<double>* g) {
          return rl::switch_loss(be, cview(x, T, E), o, gview(g, T, E), mview(m));
        };
        const double want = ref_switch(l, T, E, fn, k, 0.3, m);
        CHECK(std::fabs(f(l, nullptr) - want) <= 1e-12 * want);
        check_grad(l, T, E, m, f);
        // float logits give the same value to fp32 precision.
        std::vector<float> lf(l.begin(), l.end()), gf(z(T * E));
        const float vf = rl::switch_loss(be, rs::matrix_view<const float>{lf.data(), T, E}, o,
                                         rs::matrix_view<float>{gf.data(), T, E}, mview(m));
        CHECK(std::fabs(vf - want) <= 1e-5 * want);
      }
  }
  // The forward-only wrapper equals the new implementation (coefficient 1, no mask).
  std::vector<float> lf(l.begin(), l.end());
  CHECK(std::fabs(rl::switch_aux_loss(be, rs::matrix_view<const float>{lf.data(), T, E}, rs::score::softmax, 2) -
                  ref_switch(l, T, E, rs::score::softmax, 2, 1.0, {})) <= 1e-6);
}

TEST_CASE("test_losses: sequence-level aux loss over several sequences") {
  std::mt19937_64 rng(12);
  const idx T = 15, E = 5, L = 5;
  const auto l = make_logits(rng, T, E);
  for (const bool masked : {false, true}) {
    mask_t m = masked ? make_mask(T) : mask_t{};
    if (masked)
      for (idx t = 5; t < 10; ++t) m[z(t)] = 0;  // a sequence with no valid token is left out of the mean
    for (rs::score fn : kScores)
      for (idx k : {1, 3}) {
        const rl::seq_aux_options o{k, fn, 0.5, L};
        const auto f = [&](const std::vector<double>& x, std::vector<double>* g) {
          return rl::seq_aux_loss(be, cview(x, T, E), o, gview(g, T, E), mview(m));
        };
        double want = 0.0, used = 0.0;
        for (idx j = 0; j < T / L; ++j) {
          const ref_stats r = ref_range(l, E, j * L, (j + 1) * L, fn, k, m);
          if (r.n == 0.0) continue;
          used += 1.0;
          double s = 0.0;
          for (idx e = 0; e < E; ++e) s += r.c[z(e)] / (r.n * static_cast<double>(k)) * (r.p[z(e)] / r.n);
          want += 0.5 * static_cast<double>(E) * s;
        }
        want /= used;
        CHECK(std::fabs(f(l, nullptr) - want) <= 1e-12 * want);
        check_grad(l, T, E, m, f);
      }
  }
  // seq_len == T is the switch loss.
  const rl::seq_aux_options whole{2, rs::score::softmax, 1.0, T};
  CHECK(std::fabs(rl::seq_aux_loss(be, cview(l, T, E), whole, rs::matrix_view<double>{}) -
                  ref_switch(l, T, E, rs::score::softmax, 2, 1.0, {})) <= 1e-12);
}

TEST_CASE("test_losses: global-batch aux loss over 3 micro-batches") {
  std::mt19937_64 rng(13);
  const idx E = 6, k = 2;
  const idx sizes[3] = {8, 5, 9};
  for (const bool masked : {false, true})
    for (rs::score fn : kScores) {
      rl::global_aux_accumulator acc;
      std::vector<double> total_c(z(E), 0.0);
      double total_n = 0.0;
      for (idx mb = 0; mb < 3; ++mb) {
        const idx T = sizes[mb];
        const auto l = make_logits(rng, T, E);
        const mask_t m = masked ? make_mask(T) : mask_t{};
        const rl::switch_options o{k, fn, 0.7};
        std::vector<double> g(z(T * E));
        const double got =
            rl::global_aux_loss(be, cview(l, T, E), o, acc, rs::matrix_view<double>{g.data(), T, E}, mview(m));
        // Brute force: counts of every micro-batch so far, concatenated.
        const ref_stats r = ref_range(l, E, 0, T, fn, k, m);
        for (idx e = 0; e < E; ++e) total_c[z(e)] += r.c[z(e)];
        total_n += r.n;
        double want = 0.0;
        for (idx e = 0; e < E; ++e) want += total_c[z(e)] / (total_n * static_cast<double>(k)) * (r.p[z(e)] / r.n);
        want *= 0.7 * static_cast<double>(E);
        CHECK(std::fabs(got - want) <= 1e-12 * want);
        CHECK(acc.tokens == static_cast<std::int64_t>(total_n));
        for (idx e = 0; e < E; ++e) CHECK(static_cast<double>(acc.counts[z(e)]) == total_c[z(e)]);
        // Gradient: FD with the counts frozen at the accumulated state (a copy taken before this call).
        rl::global_aux_accumulator before = acc;
        for (idx e = 0; e < E; ++e) before.counts[z(e)] -= static_cast<std::int64_t>(r.c[z(e)]);
        before.tokens -= static_cast<std::int64_t>(r.n);
        check_grad(l, T, E, m, [&](const std::vector<double>& x, std::vector<double>* gg) {
          rl::global_aux_accumulator a = before;
          return rl::global_aux_loss(be, cview(x, T, E), o, a, gview(gg, T, E), mview(m));
        });
      }
      acc.reset();
      CHECK(acc.counts.empty());
      CHECK(acc.tokens == 0);
    }
}

TEST_CASE("test_losses: z-loss value, gradient and closed form") {
  std::mt19937_64 rng(14);
  const idx T = 9, E = 7;
  std::vector<double> l(z(T * E));
  std::normal_distribution<double> nd(0.0, 2.0);
  for (double& v : l) v = nd(rng);
  for (const bool masked : {false, true}) {
    const mask_t m = masked ? make_mask(T) : mask_t{};
    const rl::z_loss_options o{0.25};
    const auto f = [&](const std::vector<double>& x, std::vector<double>* g) {
      return rl::z_loss(be, cview(x, T, E), o, gview(g, T, E), mview(m));
    };
    double want = 0.0, n = 0.0;
    for (idx t = 0; t < T; ++t) {
      if (!ok(m, t)) continue;
      double s = 0.0;
      for (idx e = 0; e < E; ++e) s += std::exp(l[z(t * E + e)]);
      want += std::log(s) * std::log(s);
      n += 1.0;
    }
    want *= 0.25 / n;
    CHECK(std::fabs(f(l, nullptr) - want) <= 1e-12 * want);
    check_grad(l, T, E, m, f);
  }
  const std::vector<double> zeros(z(T * E), 0.0);
  std::vector<double> g(z(T * E));
  const double v = rl::z_loss(be, cview(zeros, T, E), rl::z_loss_options{}, rs::matrix_view<double>{g.data(), T, E});
  CHECK(std::fabs(v - std::log(7.0) * std::log(7.0)) <= 1e-12);
  for (double x : g) CHECK(std::fabs(x - 2.0 / T * std::log(7.0) / 7.0) <= 1e-14);
  std::vector<float> zf(z(T * E), 0.0f);
  CHECK(std::fabs(rl::z_loss(be, rs::matrix_view<const float>{zf.data(), T, E}) - std::log(7.0) * std::log(7.0)) <=
        1e-6);
}

TEST_CASE("test_losses: locality loss both forms") {
  std::mt19937_64 rng(15);
  const idx T = 10, E = 8;
  std::vector<double> l(z(T * E));
  std::normal_distribution<double> nd(0.0, 1.0);
  for (double& v : l) v = nd(rng);
  const std::vector<rs::id_type> node = {0, 0, 1, 1, 2, 2, 3, 3};
  const rs::vector_view<const rs::id_type> nv{node.data(), E};
  for (const bool masked : {false, true}) {
    const mask_t m = masked ? make_mask(T) : mask_t{};
    // D_c by brute force.
    std::vector<double> dc(z(E), 0.0);
    double n = 0.0;
    for (idx t = 0; t < T; ++t) {
      if (!ok(m, t)) continue;
      n += 1.0;
      const auto s = ref_scores(l.data() + t * E, E, rs::score::softmax);
      for (idx e = 0; e < E; ++e) dc[z(e)] += s[z(e)];
    }
    for (double& v : dc) v /= n;
    for (const auto form : {rl::locality_form::smoothed, rl::locality_form::reversed}) {
      const rl::locality_options o{nv, 4, 2, form, 0.05, 0.4};
      const auto f = [&](const std::vector<double>& x, std::vector<double>* g) {
        return rl::locality_loss(be, cview(x, T, E), o, gview(g, T, E), mview(m));
      };
      double want = 0.0;
      for (idx e = 0; e < E; ++e) {
        const double dl = node[z(e)] == 2 ? 0.5 : 0.0;
        if (form == rl::locality_form::smoothed)
          want += dc[z(e)] * std::log(dc[z(e)] / (0.95 * dl + 0.05 / 8.0));
        else if (dl > 0.0)
          want += dl * std::log(dl / dc[z(e)]);
      }
      want *= 0.4;
      const double got = f(l, nullptr);
      CHECK(std::isfinite(got));
      CHECK(std::fabs(got - want) <= 1e-12 * std::fabs(want));
      check_grad(l, T, E, m, f);
    }
  }
  // The smoothed form is 0 with a zero gradient at D_c = D̃_l, and positive elsewhere.
  std::vector<double> target(z(T * E));
  for (idx t = 0; t < T; ++t)
    for (idx e = 0; e < E; ++e) target[z(t * E + e)] = std::log(0.99 * (node[z(e)] == 1 ? 0.5 : 0.0) + 0.01 / 8.0);
  const rl::locality_options o{nv, 4, 1};
  std::vector<double> g(z(T * E));
  const double at_min = rl::locality_loss(be, cview(target, T, E), o, rs::matrix_view<double>{g.data(), T, E});
  CHECK(std::fabs(at_min) <= 1e-14);
  for (double x : g) CHECK(std::fabs(x) <= 1e-14);
  CHECK(rl::locality_loss(be, cview(l, T, E), o, rs::matrix_view<double>{}) > 0.01);
  // The reversed form is 0 when D_c = D_l up to exp underflow: logits −1000 off the local node.
  std::vector<double> local(z(T * E));
  for (idx t = 0; t < T; ++t)
    for (idx e = 0; e < E; ++e) local[z(t * E + e)] = node[z(e)] == 1 ? 0.0 : -1000.0;
  const rl::locality_options rev{nv, 4, 1, rl::locality_form::reversed};
  CHECK(std::fabs(rl::locality_loss(be, cview(local, T, E), rev, rs::matrix_view<double>{g.data(), T, E})) <= 1e-14);
  for (double x : g) CHECK(std::isfinite(x));
}

TEST_CASE("test_losses: empty batch and fully masked batch give zero") {
  std::mt19937_64 rng(16);
  const idx T = 4, E = 4;
  const auto l = make_logits(rng, T, E);
  const mask_t none(z(T), 0);
  std::vector<double> g(z(T * E), 5.0);
  const rs::matrix_view<double> gv{g.data(), T, E};
  CHECK(rl::switch_loss(be, cview(l, T, E), rl::switch_options{}, gv, mview(none)) == 0.0);
  for (double x : g) CHECK(x == 0.0);
  CHECK(rl::z_loss(be, cview(l, 0, E), rl::z_loss_options{}, rs::matrix_view<double>{nullptr, 0, E}) == 0.0);
  rl::global_aux_accumulator acc;
  CHECK(rl::global_aux_loss(be, cview(l, T, E), rl::switch_options{}, acc, gv, mview(none)) == 0.0);
  CHECK(acc.tokens == 0);
}

TEST_CASE("test_losses: every error names its argument and writes nothing") {
  std::mt19937_64 rng(17);
  const idx T = 6, E = 4;
  const auto l = make_logits(rng, T, E);
  const auto lv = cview(l, T, E);
  std::vector<double> g(z(T * E), 42.0);
  const rs::matrix_view<double> gv{g.data(), T, E};
  const std::vector<rs::id_type> node = {0, 0, 1, 1};
  const rs::vector_view<const rs::id_type> nv{node.data(), E};
  const mask_t short_mask(z(T - 1), 1);
  const auto expect = [&](const std::string& arg, const std::function<void()>& f) {
    const std::string msg = resonance_test::error_of(f);
    CAPTURE(msg);
    CHECK(msg.find("resonance: " + arg + ":") == 0);
    for (double x : g) CHECK(x == 42.0);
  };
  const rs::matrix_view<double> wrong{g.data(), T - 1, E};
  expect("dlogits", [&] { rl::switch_loss(be, lv, rl::switch_options{}, wrong); });
  expect("dlogits", [&] { rl::seq_aux_loss(be, lv, rl::seq_aux_options{}, wrong); });
  expect("dlogits", [&] { rl::z_loss(be, lv, rl::z_loss_options{}, wrong); });
  expect("dlogits", [&] { rl::locality_loss(be, lv, rl::locality_options{nv, 2, 0}, wrong); });
  expect("logits", [&] {
    rl::switch_loss(be, rs::matrix_view<const double>{l.data(), T, E, 2}, rl::switch_options{}, gv);
  });
  expect("logits", [&] { rl::z_loss(be, rs::matrix_view<const double>{nullptr, T, E}, rl::z_loss_options{}, gv); });
  std::vector<double> bad = l;
  bad[3] = std::nan("");
  expect("logits", [&] { rl::switch_loss(be, cview(bad, T, E), rl::switch_options{}, gv); });
  expect("valid", [&] { rl::switch_loss(be, lv, rl::switch_options{}, gv, mview(short_mask)); });
  expect("valid", [&] { rl::z_loss(be, lv, rl::z_loss_options{}, gv, mview(short_mask)); });
  expect("valid", [&] { rl::locality_loss(be, lv, rl::locality_options{nv, 2, 0}, gv, mview(short_mask)); });
  for (idx k : {0, 5}) {
    expect("top_k", [&] { rl::switch_loss(be, lv, rl::switch_options{k}, gv); });
    expect("top_k", [&] { rl::seq_aux_loss(be, lv, rl::seq_aux_options{k}, gv); });
    rl::global_aux_accumulator acc;
    expect("top_k", [&] { rl::global_aux_loss(be, lv, rl::switch_options{k}, acc, gv); });
    CHECK(acc.counts.empty());
  }
  for (idx L : {0, 4, 7})
    expect("seq_len", [&] { rl::seq_aux_loss(be, lv, rl::seq_aux_options{1, rs::score::softmax, 1.0, L}, gv); });
  {
    rl::global_aux_accumulator acc;
    acc.counts.assign(3, 1);
    expect("accumulator", [&] { rl::global_aux_loss(be, lv, rl::switch_options{}, acc, gv); });
    acc.counts.assign(z(E), 1);
    acc.top_k = 2;
    acc.tokens = 2;
    expect("accumulator", [&] { rl::global_aux_loss(be, lv, rl::switch_options{1}, acc, gv); });
    CHECK(acc.tokens == 2);
    CHECK(acc.counts == std::vector<std::int64_t>(z(E), 1));
  }
  const std::vector<rs::id_type> out_of_range = {0, 0, 1, 2};
  const std::vector<rs::id_type> negative = {0, -1, 1, 1};
  expect("expert_node", [&] { rl::locality_loss(be, lv, rl::locality_options{{out_of_range.data(), E}, 2, 0}, gv); });
  expect("expert_node", [&] { rl::locality_loss(be, lv, rl::locality_options{{negative.data(), E}, 2, 0}, gv); });
  expect("expert_node", [&] { rl::locality_loss(be, lv, rl::locality_options{{node.data(), E - 1}, 2, 0}, gv); });
  expect("num_nodes", [&] { rl::locality_loss(be, lv, rl::locality_options{nv, 0, 0}, gv); });
  expect("local_node", [&] { rl::locality_loss(be, lv, rl::locality_options{nv, 2, 2}, gv); });
  expect("local_node", [&] { rl::locality_loss(be, lv, rl::locality_options{nv, 3, 2}, gv); });  // holds no expert
  for (double eps : {0.0, 1.0, -0.5, 2.0})
    expect("eps", [&] {
      rl::locality_loss(be, lv, rl::locality_options{nv, 2, 0, rl::locality_form::smoothed, eps}, gv);
    });
}

// ---------------------------------------------------------------------------------------------------
// Determinism: every token sum runs over fixed chunks of 1024 tokens in token order, then the chunks in
// order, so each value and gradient has the same bits on every backend (tbb in arenas of 1, 2 and 3
// threads, and scrambled_backend, whose primitives run in reverse order).

namespace {

// The outputs of every loss on one backend: each value (as a one-entry array) and its gradient, and
// the global-batch accumulators' states.
template <class S>
struct loss_outputs {
  std::vector<std::vector<S>> arrays;
  std::vector<std::int64_t> accumulators;
};

template <class S, class Backend>
loss_outputs<S> all_losses(const Backend& b, const std::vector<S>& l, idx T, idx E, idx stride, const mask_t& m) {
  loss_outputs<S> out;
  const rs::matrix_view<const S> lv{l.data(), T, E, stride};
  std::vector<S> g(z(T * E), S(7));
  const rs::matrix_view<S> gv{g.data(), T, E};
  const auto keep = [&](S value) {
    out.arrays.push_back({value});
    out.arrays.push_back(g);
    std::fill(g.begin(), g.end(), S(7));
  };
  for (rs::score fn : kScores) {
    keep(rl::switch_loss(b, lv, rl::switch_options{3, fn, 0.3}, gv, mview(m)));
    keep(rl::seq_aux_loss(b, lv, rl::seq_aux_options{2, fn, 0.5, T / 2}, gv, mview(m)));  // 2 chunks a sequence
    keep(rl::seq_aux_loss(b, lv, rl::seq_aux_options{3, fn, 0.5, 13}, gv, mview(m)));     // 200 sequences
    rl::global_aux_accumulator acc;
    for (int mb = 0; mb < 2; ++mb) keep(rl::global_aux_loss(b, lv, rl::switch_options{2, fn, 0.7}, acc, gv, mview(m)));
    out.accumulators.insert(out.accumulators.end(), acc.counts.begin(), acc.counts.end());
    out.accumulators.push_back(acc.tokens);
  }
  keep(rl::z_loss(b, lv, rl::z_loss_options{0.25}, gv, mview(m)));
  std::vector<rs::id_type> node(z(E));
  for (idx e = 0; e < E; ++e) node[z(e)] = static_cast<rs::id_type>(e % 4);
  const rs::vector_view<const rs::id_type> nv{node.data(), E};
  keep(rl::locality_loss(b, lv, rl::locality_options{nv, 4, 1, rl::locality_form::smoothed, 0.05, 0.4}, gv, mview(m)));
  keep(rl::locality_loss(b, lv, rl::locality_options{nv, 4, 1, rl::locality_form::reversed, 0.05, 0.4}, gv, mview(m)));
  if constexpr (std::is_same_v<S, float>) {
    out.arrays.push_back({static_cast<float>(rl::switch_aux_loss(b, lv, rs::score::softmax, 2))});
    out.arrays.push_back({static_cast<float>(rl::z_loss(b, lv))});
  }
  return out;
}

template <class S>
void check_losses_backend_independent(std::mt19937_64& rng) {
  const idx T = 2600, E = 12, stride = 13;  // 3 chunks; T / 2 and 13 divide T
  // Grid logits: exact ties, so the lowest-index rule decides many counts.
  const std::vector<float> grid = resonance_test::grid_values(rng, T * stride, 6, 0.25f);
  std::vector<S> l(grid.begin(), grid.end());
  if constexpr (std::is_same_v<S, double>) {
    const std::vector<double> noise = resonance_test::normal_values<double>(rng, T * stride, 1e-3);
    for (std::size_t i = 0; i < l.size(); i += 2) l[i] += noise[i];  // ties in half the entries only
  }
  for (const bool masked : {false, true}) {
    CAPTURE(masked);
    const mask_t m = masked ? make_mask(T) : mask_t{};
    const loss_outputs<S> want = all_losses(be, l, T, E, stride, m);
    resonance_test::for_each_backend_and_scrambled([&](const auto& backend, const std::string& name) {
      CAPTURE(name);
      const loss_outputs<S> got = all_losses(backend, l, T, E, stride, m);
      CHECK(got.accumulators == want.accumulators);
      REQUIRE(got.arrays.size() == want.arrays.size());
      for (std::size_t i = 0; i < want.arrays.size(); ++i) {
        CAPTURE(i);
        REQUIRE(got.arrays[i].size() == want.arrays[i].size());
        CHECK(std::memcmp(got.arrays[i].data(), want.arrays[i].data(), want.arrays[i].size() * sizeof(S)) == 0);
      }
    });
  }
}

}  // namespace

TEST_CASE("test_losses: every value and gradient is bitwise the same on every backend") {
  std::mt19937_64 rng(18);
  check_losses_backend_independent<float>(rng);
  check_losses_backend_independent<double>(rng);
}

TEST_CASE("test_losses: a non-finite logit is reported at its first position on every backend") {
  std::mt19937_64 rng(19);
  const idx T = 3000, E = 5;
  std::vector<double> l = resonance_test::normal_values<double>(rng, T * E, 1.0);
  l[z(2500 * E + 1)] = std::nan("");                              // the third chunk
  l[z(1500 * E + 3)] = -std::numeric_limits<double>::infinity();  // the second chunk: the first offending entry
  l[z(1700 * E + 0)] = std::numeric_limits<double>::infinity();
  const auto lv = cview(l, T, E);
  std::vector<rs::id_type> node = {0, 0, 1, 1, 1};
  const rs::vector_view<const rs::id_type> nv{node.data(), E};
  resonance_test::for_each_backend_and_scrambled([&](const auto& b, const std::string& name) {
    CAPTURE(name);
    std::vector<double> g(z(T * E), 42.0);
    const rs::matrix_view<double> gv{g.data(), T, E};
    const auto expect = [&](const std::function<void()>& f) {
      const std::string msg = resonance_test::error_of(f);
      CAPTURE(msg);
      CHECK(msg.find("resonance: logits:") == 0);
      CHECK(msg.find("at row 1500, column 3") != std::string::npos);
      CHECK(std::all_of(g.begin(), g.end(), [](double x) { return x == 42.0; }));
    };
    expect([&] { rl::switch_loss(b, lv, rl::switch_options{2}, gv); });
    expect([&] { rl::seq_aux_loss(b, lv, rl::seq_aux_options{2, rs::score::sigmoid, 1.0, 5}, gv); });
    expect([&] { rl::seq_aux_loss(b, lv, rl::seq_aux_options{2, rs::score::softmax, 1.0, T}, gv); });
    rl::global_aux_accumulator acc;
    expect([&] { rl::global_aux_loss(b, lv, rl::switch_options{2}, acc, gv); });
    CHECK(acc.counts.empty());
    CHECK(acc.tokens == 0);
    expect([&] { rl::z_loss(b, lv, rl::z_loss_options{}, gv); });
    expect([&] { rl::locality_loss(b, lv, rl::locality_options{nv, 2, 1}, gv); });
  });
}
