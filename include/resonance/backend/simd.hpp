#pragma once

// backend::simd<Arch>: one thread, with the row primitives vectorised by xsimd. Arch defaults to the
// best architecture the translation unit is compiled for (sse2 without flags, avx2 with -mavx2, ...);
// backend::dispatch_simd picks one at run time among architectures compiled in other translation units.
// Every primitive returns bitwise what detail::scalar_rows returns, so plans do not change:
//   - top-k: a first pass keeps m·W lane maxima (about 2k of them, at least k); they are distinct
//     entries, so their k-th largest, τ, bounds the k-th largest key from below. A second pass
//     gathers the entries >= τ in ascending index order through a bit map and ranks them without
//     branches (value desc, index asc), which is exactly the scalar scan's result;
//   - scores: exp_portable and the 16-lane row sum evaluated lane by lane;
//   - finiteness: x - x accumulated (NaN as soon as one entry is NaN or infinite);
//   - GrAP group sums: the 16 double partials of detail::lane_group_sums as 16/W accumulators.
// This header is the only one that includes xsimd (with its compatibility shim).

#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

#include "../core/error.hpp"
#include "detail/xsimd_compat.hpp"
#include "rows.hpp"
#include "serial.hpp"

namespace resonance {
namespace detail {

template <class Arch>
struct simd_rows {
  using batch = xsimd::batch<float, Arch>;
  using ibatch = xsimd::batch<std::int32_t, Arch>;
  static constexpr index width = static_cast<index>(batch::size);
  static_assert(row_sum_lanes % width == 0, "the fixed 16-lane row sum needs a width that divides 16");
  static constexpr index max_k = 16;       // beyond it the scalar scan is as fast
  static constexpr index max_maxima = 32;  // lane maxima that bound the k-th key
  static_assert(2 * max_k <= max_maxima && max_maxima % width == 0, "ceil(2k/W) accumulators must fit");
  static constexpr index max_candidates = 64;  // entries above the bound ranked without branches
  static constexpr index row_words = 8;        // bit-map words per chunk (512 entries)

  static bool all_finite(const float* x, index n) {
    batch acc(0.0f);  // OR of the bits of x - x: +0 while finite (see lane_bound)
    index i = 0;
    for (; i + width <= n; i += width) {
      const batch v = batch::load_unaligned(x + i);
      acc = acc | (v - v);
    }
    bool ok = xsimd::all(acc == batch(0.0f));
    for (; i < n; ++i) ok &= (x[i] - x[i]) == 0.0f;
    return ok;
  }

  // exp_portable, lane by lane (same operations, same order).
  static batch exp(const batch& x) {
    using c = exp_constants;
    const batch magic(c::round_magic);
    const batch n = (x * batch(c::log2e) + magic) - magic;
    batch r = x - n * batch(c::ln2_hi);
    r = r - n * batch(c::ln2_lo);
    batch p(c::p0);
    p = p * r + batch(c::p1);
    p = p * r + batch(c::p2);
    p = p * r + batch(c::p3);
    p = p * r + batch(c::p4);
    p = p * r + batch(c::p5);
    p = p * (r * r) + r;
    p = p + batch(1.0f);
    const batch safe_n = xsimd::select(x == x, n, batch(0.0f));  // keep the integer conversion defined
    const ibatch ni = xsimd::batch_cast<std::int32_t>(xsimd::min(xsimd::max(safe_n, batch(-200.0f)), batch(200.0f)));
    const ibatch h = ni >> 1;
    const batch s1 = xsimd::bitwise_cast<batch>((h + ibatch(127)) << 23);
    const batch s2 = xsimd::bitwise_cast<batch>((ni - h + ibatch(127)) << 23);
    batch y = (p * s1) * s2;
    y = xsimd::select(x < batch(c::lo), batch(0.0f), y);
    y = xsimd::select(x > batch(c::hi), batch(std::numeric_limits<float>::infinity()), y);
    return xsimd::select(x == x, y, x);
  }

  static void softmax(const float* in, float* out, index n, float scale) {
    const batch sc(scale);
    float m = in[0] * scale;
    index i = 0;
    if (n >= width) {
      batch mv = batch::load_unaligned(in) * sc;
      for (i = width; i + width <= n; i += width) mv = xsimd::max(mv, batch::load_unaligned(in + i) * sc);
      m = xsimd_compat::reduce_max(mv);
    }
    for (; i < n; ++i) m = in[i] * scale > m ? in[i] * scale : m;
    // exp and the 16 partial sums: vector v covers entries [v·W, v·W + W), i.e. partials
    // (v mod L)·W ... + W - 1 with L = 16 / W accumulators.
    constexpr index L = row_sum_lanes / width;
    batch acc[L];
    for (index a = 0; a < L; ++a) acc[a] = batch(0.0f);
    const batch mb(m);
    index v = 0;
    for (i = 0; i + width <= n; i += width, ++v) {
      const batch e = exp(batch::load_unaligned(in + i) * sc - mb);
      e.store_unaligned(out + i);
      acc[v % L] += e;
    }
    alignas(64) float partial[row_sum_lanes];
    for (index a = 0; a < L; ++a) acc[a].store_unaligned(partial + a * width);
    for (; i < n; ++i) {
      out[i] = exp_portable(in[i] * scale - m);
      partial[i % row_sum_lanes] += out[i];
    }
    const float inv = 1.0f / combine_lane_sums(partial);
    const batch ib(inv);
    for (i = 0; i + width <= n; i += width) (batch::load_unaligned(out + i) * ib).store_unaligned(out + i);
    for (; i < n; ++i) out[i] *= inv;
  }

  static void sigmoid(const float* in, float* out, index n, float scale) {
    const batch sc(scale), one(1.0f);
    index i = 0;
    for (; i + width <= n; i += width)
      (one / (one + exp(-(batch::load_unaligned(in + i) * sc)))).store_unaligned(out + i);
    for (; i < n; ++i) out[i] = detail::sigmoid(in[i] * scale);
  }

  static void score(resonance::score fn, const float* in, float* out, index n, float scale) {
    if (fn == resonance::score::softmax) {
      softmax(in, out, n, scale);
    } else if (fn == resonance::score::sigmoid) {
      sigmoid(in, out, n, scale);
    } else {
      scalar_rows::score(fn, in, out, n, scale);  // sqrt_softplus needs log1p; identity is a copy
    }
  }

  // out[i] = exp_portable(in[i]) for n entries; a tail shorter than W goes through one padded vector
  // (indices clamped to n - 1, so no copy loop and no read past the input).
  static void exp_n(const float* in, float* out, index n) {
    index i = 0;
    for (; i + width <= n; i += width) exp(batch::load_unaligned(in + i)).store_unaligned(out + i);
    if (i == n) return;
    alignas(64) float buf[width];
    for (index l = 0; l < width; ++l) buf[l] = in[i + l < n ? i + l : n - 1];
    exp(batch::load_aligned(buf)).store_aligned(buf);
    for (index l = 0; l < width; ++l)
      if (i + l < n) out[i + l] = buf[l];
  }

  static bool topk(const float* x, index n, index k, float scale, const float* bias, float* vals, id_type* ids) {
    const index nv = n / width;
    const index m = (k + width - 1) / width;
    // Short rows: the two passes and the ranking cost more than the scalar scan saves.
    if (k > max_k || nv < m || n < 4 * width) return scalar_rows::topk(x, n, k, scale, bias, vals, ids);
    if (bias == nullptr) {
      if (scale == 1.0f) return filtered_topk(x, n, k, vals, ids, plain_key{});
      return filtered_topk(x, n, k, vals, ids, scaled_key{scale});
    }
    return filtered_topk(x, n, k, vals, ids, biased_key{scale, bias});
  }

  // GrAP's group sums (see detail::lane_group_sums): float rows whose groups are whole multiples of
  // 16 entries run vectorised, the rest (and double rows) take the scalar reference.
  template <class T>
  static void group_sums(const T* row, index E, index g, double* s) {
    if constexpr (vector_group_sums_ok<T>) {
      if (g % group_sum_lanes == 0) {
        vector_group_sums<false>(row, E, g, s);
        return;
      }
    }
    scalar_rows::group_sums(row, E, g, s);
  }
  template <class T>
  static double group_sums_squares(const T* row, index E, index g, double* s) {
    if constexpr (vector_group_sums_ok<T>) {
      if (g % group_sum_lanes == 0) return vector_group_sums<true>(row, E, g, s);
    }
    return scalar_rows::group_sums_squares(row, E, g, s);
  }

 private:
  // Double lanes the architecture offers, as many as divide the 16 partials.
  template <class T>
  static constexpr bool vector_group_sums_ok = [] {
    if constexpr (std::is_same_v<T, float> && xsimd::types::has_simd_register<double, Arch>::value) {
      return group_sum_lanes % static_cast<index>(xsimd::batch<double, Arch>::size) == 0;
    } else {
      return false;
    }
  }();

  // Partial p of the reference is lane p mod W of accumulator p / W (W doubles per vector), so each
  // accumulator takes W consecutive entries: the same additions, in the same order, lane by lane.
  template <bool Squares>
  static double vector_group_sums(const float* row, index E, index g, double* s) {
    using dbatch = xsimd::batch<double, Arch>;
    constexpr index W = static_cast<index>(dbatch::size), L = group_sum_lanes / W;
    dbatch sq[L];
    RESONANCE_IMPL_UNROLL_LANES
    for (index a = 0; a < L; ++a) sq[a] = dbatch(0.0);
    for (index e = 0; e < E; ++e) {
      const float* x = row + e * g;
      dbatch p[L];
      RESONANCE_IMPL_UNROLL_LANES
      for (index a = 0; a < L; ++a) p[a] = dbatch(0.0);
      for (index i = 0; i < g; i += group_sum_lanes) {
        RESONANCE_IMPL_UNROLL_LANES
        for (index a = 0; a < L; ++a) {
          const dbatch v = xsimd_compat::load_widened<Arch>(x + i + a * W);
          p[a] += v;
          if constexpr (Squares) {
            const dbatch q = v * v;
            sq[a] += q;
          }
        }
      }
      s[e] = combine_group_vectors(p);
    }
    return Squares ? combine_group_vectors(sq) : 0.0;
  }

  // combine_group_lanes on L vectors: its levels w >= W add accumulator a + w/W into a; the last
  // log2(W) levels run on the lanes of the one vector left.
  template <class DBatch, index L>
  static double combine_group_vectors(DBatch (&acc)[L]) {
    constexpr index W = static_cast<index>(DBatch::size);
    if constexpr (L >= 8) {
      RESONANCE_IMPL_UNROLL_LANES
      for (index a = 0; a < 4; ++a) acc[a] = acc[a] + acc[a + 4];
    }
    if constexpr (L >= 4) {
      acc[0] = acc[0] + acc[2];
      acc[1] = acc[1] + acc[3];
    }
    if constexpr (L >= 2) acc[0] = acc[0] + acc[1];
    double lanes[W];
    acc[0].store_unaligned(lanes);
    if constexpr (W >= 8) {
      RESONANCE_IMPL_UNROLL_LANES
      for (index j = 0; j < 4; ++j) lanes[j] = lanes[j] + lanes[j + 4];
    }
    if constexpr (W >= 4) {
      lanes[0] = lanes[0] + lanes[2];
      lanes[1] = lanes[1] + lanes[3];
    }
    return W >= 2 ? lanes[0] + lanes[1] : lanes[0];
  }

  // The selection keys of entries [i, i + W) from their x values v, and of one entry; the same
  // operations as scalar_rows::topk.
  struct plain_key {
    batch operator()(const batch& v, index) const { return v; }
    float scalar(const float* x, index i) const { return x[i]; }
  };
  struct scaled_key {
    float scale;
    batch operator()(const batch& v, index) const { return v * batch(scale); }
    float scalar(const float* x, index i) const { return x[i] * scale; }
  };
  struct biased_key {
    float scale;
    const float* bias;
    batch operator()(const batch& v, index i) const { return v * batch(scale) + batch::load_unaligned(bias + i); }
    float scalar(const float* x, index i) const { return x[i] * scale + bias[i]; }
  };

  // Counts true lanes over several masks: popcount where the target has it, otherwise per-lane float
  // counts summed once (a software popcount per mask would cost more than the comparisons).
  struct lane_counter {
#if defined(__POPCNT__)
    index n = 0;
    void add(const xsimd::batch_bool<float, Arch>& b) { n += __builtin_popcountll(xsimd_compat::to_mask(b)); }
    index total() const { return n; }
#else
    batch n = batch(0.0f);
    void add(const xsimd::batch_bool<float, Arch>& b) { n += xsimd::select(b, batch(1.0f), batch(0.0f)); }
    index total() const { return static_cast<index>(xsimd_compat::reduce_add(n)); }
#endif
  };

  // Ranks of the c candidates (value desc, then position asc: positions are in ascending index order,
  // so this is the scalar scan's order), counted W at a time; the k best land in rank order. cval is
  // padded with -Inf up to a multiple of W (a padded lane is never above or equal-and-before a value).
  static void rank_select(const float* cval, const id_type* cidx, index c, index k, float* vals, id_type* ids) {
    float dump_val;  // ranks >= k are written here: a select instead of a branch or a copy loop
    id_type dump_idx;
    alignas(64) float lane_index[width];
    for (index l = 0; l < width; ++l) lane_index[l] = static_cast<float>(l);
    const batch iota = batch::load_aligned(lane_index);
    for (index i = 0; i < c; ++i) {
      const batch vi(cval[i]);
      lane_counter count;
      for (index j = 0; j < c; j += width) {
        const batch vj = batch::load_aligned(cval + j);
        const auto before = (iota + batch(static_cast<float>(j))) < batch(static_cast<float>(i));
        count.add((vj > vi) || ((vj == vi) && before));
      }
      const index r = count.total();  // < c: every candidate gets a distinct rank, no branch
      const bool kept = r < k;
      *(kept ? vals + r : &dump_val) = cval[i];
      *(kept ? ids + r : &dump_idx) = cidx[i];
    }
  }

  // Pass 1 with M accumulators of W lanes (a compile-time count, so they live in registers and the
  // loops unroll): returns tau, the k-th largest of the M·W lane maxima, and sets `finite` to whether
  // every x is finite (tau is unspecified when not). The maxima are M·W >= k distinct entries, so tau is at most the
  // row's k-th largest key: tau = min{ m_i : #{j : m_j > m_i} < k }.
  template <index M, class Key>
  static float lane_bound(const float* x, index n, index k, const Key& key, bool& finite) {
    const index nv = n / width;
    batch acc[M];
    // x - x is +0 for a finite x and NaN otherwise; OR-ing the bits keeps the check off the critical path.
    batch bad(0.0f);
    for (index j = 0; j < M; ++j) {
      const batch v = batch::load_unaligned(x + j * width);
      bad = bad | (v - v);
      acc[j] = key(v, j * width);
    }
    index v = M;
    for (; v + M <= nv; v += M) {
      for (index j = 0; j < M; ++j) {
        const batch xv = batch::load_unaligned(x + (v + j) * width);
        bad = bad | (xv - xv);
        acc[j] = xsimd::max(acc[j], key(xv, (v + j) * width));
      }
    }
    for (index j = 0; v < nv; ++v, ++j) {
      const batch xv = batch::load_unaligned(x + v * width);
      bad = bad | (xv - xv);
      acc[j] = xsimd::max(acc[j], key(xv, v * width));
    }
    finite = xsimd::all(bad == batch(0.0f));
    for (index i = nv * width; i < n; ++i) finite &= (x[i] - x[i]) == 0.0f;
    alignas(64) float maxima[M * width];
    for (index j = 0; j < M; ++j) acc[j].store_aligned(maxima + j * width);
    float tau = std::numeric_limits<float>::infinity();
    for (index i = 0; i < M * width; ++i) {
      const batch mi(maxima[i]);
      lane_counter above;
      for (index j = 0; j < M; ++j) above.add(acc[j] > mi);
      tau = above.total() < k && maxima[i] < tau ? maxima[i] : tau;
    }
    return tau;
  }

  // lane_bound<m> for a run-time m in [1, max_maxima / W].
  template <index M = 1, class Key>
  static float lane_bound_for(index m, const float* x, index n, index k, const Key& key, bool& finite) {
    if constexpr (M < max_maxima / width) {
      if (m > M) return lane_bound_for<M + 1>(m, x, n, k, key, finite);
    }
    return lane_bound<M>(x, n, k, key, finite);
  }

  template <class Key>
  static bool filtered_topk(const float* x, index n, index k, float* vals, id_type* ids, const Key& key) {
    const index nv = n / width;
    // About 2k lane maxima (at least k, at most 32): ceil(2k/W) >= ceil(k/W) accumulators, at most
    // 32/W since k <= 16; topk() checked nv >= ceil(k/W).
    index m = (2 * k + width - 1) / width;
    m = m > nv ? nv : m;
    bool finite = true;
    const float tau = lane_bound_for(m, x, n, k, key, finite);
    if (!finite) return false;
    // Pass 2: the entries >= tau, in ascending index order, gathered 64 at a time through a bit map
    // (no branch per vector). Entries below tau cannot be among the top k.
    constexpr index group = 64 / width;
    alignas(64) float cval[max_candidates];
    id_type cidx[max_candidates];
    index c = 0, filled = 0;
    bool spilled = false;  // more candidates than the buffer: insert them the scalar way
    const auto take = [&](float value, index i) {
      if (c == max_candidates) {
        for (index j = 0; j < c; ++j) topk_insert(cval[j], cidx[j], vals, ids, filled, k);
        c = 0;
        spilled = true;
      }
      cval[c] = value;
      cidx[c] = static_cast<id_type>(i);
      ++c;
    };
    const batch tb(tau);
    // The bit map of up to row_words·64 entries is built first and walked once, so the walk's exit is
    // the only hard-to-predict branch per row; longer rows go chunk by chunk.
    alignas(64) float keys[row_words * 64];
    std::uint64_t words[row_words];
    for (index chunk = 0; chunk < nv; chunk += row_words * group) {
      const index chunk_vectors = nv - chunk < row_words * group ? nv - chunk : row_words * group;
      const index nwords = (chunk_vectors + group - 1) / group;
      for (index w = 0; w < nwords; ++w) {
        std::uint64_t bits = 0;
        const index g = chunk_vectors - w * group < group ? chunk_vectors - w * group : group;
        for (index j = 0; j < g; ++j) {
          const index vec = chunk + w * group + j;
          const batch kv = key(batch::load_unaligned(x + vec * width), vec * width);
          kv.store_aligned(keys + (w * group + j) * width);
          bits |= xsimd_compat::to_mask(kv >= tb) << (j * width);
        }
        words[w] = bits;
      }
      for (index w = 0; w < nwords; ++w) {
        for (std::uint64_t bits = words[w]; bits != 0; bits &= bits - 1) {
          const index l = w * 64 + __builtin_ctzll(bits);
          take(keys[l], chunk * width + l);
        }
      }
    }
    for (index i = nv * width; i < n; ++i) {
      const float kv = key.scalar(x, i);
      if (kv >= tau) take(kv, i);
    }
    if (spilled) {
      for (index j = 0; j < c; ++j) topk_insert(cval[j], cidx[j], vals, ids, filled, k);
    } else {
      for (index j = c; j < (c + width - 1) / width * width; ++j) cval[j] = -std::numeric_limits<float>::infinity();
      rank_select(cval, cidx, c, k, vals, ids);
    }
    return true;
  }
};

}  // namespace detail

namespace backend {

// One thread; row primitives vectorised for Arch. Its execution primitives are serial's.
template <class Arch = xsimd::default_arch>
struct simd {
  using arch_type = Arch;
  static constexpr const char* name = "simd";
  using memory_space = host_space;
  template <class T>
  using buffer = buffer_t<host_space, T>;
  using group = host_group<detail::simd_rows<Arch>>;

  friend constexpr bool operator==(const simd&, const simd&) = default;
};

template <class Arch>
inline constexpr bool sequential_host_v<simd<Arch>> = true;

static_assert(execution_backend<simd<>>);

namespace simd_detail {
template <class First, class... Rest, class F, class... Args>
decltype(auto) walk(unsigned best, F& f, Args&&... args) {
  if (First::version() <= best) return f(simd<First>{}, std::forward<Args>(args)...);
  if constexpr (sizeof...(Rest) > 0) {
    return walk<Rest...>(best, f, std::forward<Args>(args)...);
  } else {
    detail::fail("dispatch_simd", "a list with an architecture this CPU supports", First::name());
  }
}
}  // namespace simd_detail

// Runtime dispatch for one binary that runs on several CPUs: calls f(backend::simd<A>{}, args...) for
// the first A of Archs (list them best first) that this CPU supports. Compile each f(simd<A>, ...) in a
// translation unit built with A's flags (-mavx2 for xsimd::avx2, ...) and declare it extern elsewhere;
// the dispatching code needs no flags. Unlike xsimd::dispatch (noexcept) it lets resonance::error through.
template <class... Archs, class F, class... Args>
decltype(auto) dispatch_simd(xsimd::arch_list<Archs...>, F&& f, Args&&... args) {
  static_assert(sizeof...(Archs) > 0, "dispatch_simd needs at least one architecture");
  return simd_detail::walk<Archs...>(xsimd::available_architectures().best, f, std::forward<Args>(args)...);
}

}  // namespace backend
}  // namespace resonance
