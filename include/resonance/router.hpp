#pragma once

// router<Affinity, Direction, Capacity>: one routing step composed from three policies. The backend
// is passed first to every call; the overload without it runs on backend::serial.
//
// Fused routing: when the affinity computes the logits from hidden states, the direction can select
// one block of rows at a time and checks finiteness in that pass (token choice), and the capacity
// policy does not read the logits, route() never forms the T×E logits: each block of
// fused_block_tokens tokens has its logits computed into a thread-local buffer and selected while it
// is still in cache. The plan and the errors are those of the two-step path, bit for bit.

#include <algorithm>
#include <cmath>
#include <concepts>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "affinity/affinity.hpp"
#include "affinity/precomputed.hpp"
#include "backend/serial.hpp"
#include "capacity/capacity.hpp"
#include "core/view.hpp"
#include "plan/build.hpp"
#include "routing/routing.hpp"

namespace resonance {

namespace detail {
// The device route's kernels on its status (router::route_on_device). Named functors, not lambdas: nvcc
// allows no extended lambda in a private member function.
//   status[0]: the lowest row with a non-finite logit; [1]: with a non-finite weight; [2]: the route's.
template <class Space>
struct nonfinite_rows {
  matrix_view<const float, Space> l;
  RESONANCE_HOST_DEVICE index operator()(index t) const {
    bool ok = true;
    for (index e = 0; e < l.cols; ++e) ok &= (l(t, e) - l(t, e)) == 0.0f;
    return ok ? no_index : t;
  }
};
struct clear_status {
  index* st;
  RESONANCE_HOST_DEVICE void operator()(index) const { st[0] = no_index; }
};
// The route's failure: a logit row, else T + a weight row.
struct merge_status {
  index* st;
  index T;
  RESONANCE_HOST_DEVICE void operator()(index) const {
    st[2] = st[0] != no_index ? st[0] : st[1] != no_index ? T + st[1] : no_index;
  }
};
// A weight row as T + row, in place.
struct weight_status {
  index* st;
  index T;
  RESONANCE_HOST_DEVICE void operator()(index) const { st[0] = st[0] != no_index ? T + st[0] : no_index; }
};

// The one policy array a direction's kernels read (token choice's and bidirectional's expert_bias,
// expert choice's thresholds): host data, validated on the host. A route on a device copies it into
// device memory and selects with a direction that reads the copy.
template <class D>
vector_view<const float> policy_array(const D& d) {
  if constexpr (requires { d.expert_bias; }) {
    return d.expert_bias;
  } else if constexpr (requires { d.thresholds; }) {
    return d.thresholds;
  } else {
    return {};
  }
}
template <class D>
D with_policy_array(D d, const float* copy) {
  if constexpr (requires { d.expert_bias; }) {
    if (!d.expert_bias.empty()) d.expert_bias.data = copy;
  } else if constexpr (requires { d.thresholds; }) {
    if (!d.thresholds.empty()) d.thresholds.data = copy;
  }
  return d;
}

// The one id array a direction's kernels read (token choice's and bidirectional's expert_group: the
// group of each expert), host data travelling as the policy array does. A second function pair rather
// than a wider policy_array: the float array keeps its name and type everywhere it is used.
template <class D>
vector_view<const id_type> policy_ids(const D& d) {
  if constexpr (requires { d.expert_group; }) {
    return d.expert_group;
  } else {
    return {};
  }
}
template <class D>
D with_policy_ids(D d, const id_type* copy) {
  if constexpr (requires { d.expert_group; }) {
    if (!d.expert_group.empty()) d.expert_group.data = copy;
  }
  return d;
}

template <class D>
inline constexpr bool has_selects_with_capacity_v = requires(const D& d) {
  d.selects_with_capacity();
};

// A direction the router can drive one block of rows at a time: begin_selection, select_rows and
// fail_selection found by ADL (see routing/token_choice.hpp), finiteness checked inside that pass,
// and a selection that never needs the capacity first.
template <class D, class Backend>
concept selects_row_blocks =
    checks_finite_v<D> && !has_selects_with_capacity_v<D> &&
    requires(const D& d, const Backend& be, matrix_view<const float> l, candidate_set& c, const float* row) {
  begin_selection(d, index{}, index{}, c);
  { select_rows(be, d, l, index{}, c) } -> std::same_as<index>;
  fail_selection(d, row, index{}, index{}, c);
};

// An affinity whose logits may be computed block by block: every one but precomputed (whose logits
// exist already). A block's rows must equal the same rows of the whole computation, which holds for
// the per-token affinities and for linear (its GEMM runs in fixed 256-token blocks, and the router's
// blocks are multiples of 256). An affinity for which it does not declares
// `static constexpr bool token_blocks = false`.
template <class A>
inline constexpr bool opts_out_of_token_blocks_v = requires {
  requires !A::token_blocks;
};
template <class A>
inline constexpr bool token_block_affinity_v =
    !std::is_same_v<A, affinity::precomputed> && !opts_out_of_token_blocks_v<A>;

// The backend that runs work inside one block of B: a threaded wrapper's inner backend (tbb<Inner> ->
// Inner, which has the same row primitives), so nested work does not spawn threads; B itself otherwise.
template <class B>
struct block_backend {
  using type = B;
};
template <class B>
requires requires { typename B::inner_type; }
struct block_backend<B> {
  using type = typename block_backend<typename B::inner_type>::type;
};
template <class B>
using block_backend_t = typename block_backend<B>::type;

template <class B>
block_backend_t<B> block_backend_of(const B& be) {
  if constexpr (requires { typename B::inner_type; }) {
    return block_backend_t<B>{};  // the wrappers hold no inner instance
  } else {
    return be;
  }
}

// route()'s temporaries on the host (the candidates and the plan builder's, O(T·k) bytes), kept per
// thread from one route to the next: a loop of route() calls would otherwise allocate them afresh each
// time, and fresh large blocks are page-faulted on first touch (glibc maps them anew, or trims them off
// the heap's top once freed), which costs more than the route itself in a process whose allocator
// nothing has warmed. Busy while a route uses it: a route that starts on the same thread meanwhile (a
// task stolen while a threaded route waits) allocates its own.
struct host_route_cache {
  basic_candidate_set<host_space> candidates;
  host_buffer<unsigned char> work;
  bool busy = false;

  static host_route_cache& of_this_thread() {
    thread_local host_route_cache cache;
    return cache;
  }
  class claim {
   public:
    explicit claim(host_route_cache& c) : c_(c) { c_.busy = true; }
    ~claim() { c_.busy = false; }
    claim(const claim&) = delete;
    claim& operator=(const claim&) = delete;

   private:
    host_route_cache& c_;
  };
};

// One fused block's logits. Thread-local, so each thread reuses the buffer its previous block left in
// cache instead of allocating (a block's body never yields to the scheduler, so no other block can
// interleave on the same thread).
inline std::vector<float>& fused_block_storage() {
  thread_local std::vector<float> storage;
  return storage;
}
}  // namespace detail

// The reusable memory of a route into an existing plan (router::route_into): the route's workspace in
// the backend's memory (status, candidates, the builder's temporaries, the policy arrays), grown when a
// route needs more and reused otherwise, and the host-readable memory of its one copy back (pinned on
// CUDA, so that a CUDA graph can capture the copy). It also remembers the route that finish() has yet
// to check. One route at a time: route_into on a workspace whose route was not finished is an error.
template <execution_backend Backend>
class route_workspace {
 public:
  using memory_space = memory_space_t<Backend>;

  // Bytes of the workspace in the backend's memory.
  index bytes() const { return static_cast<index>(device_.size()); }
  // Whether a route was enqueued and not yet finished.
  bool pending() const { return pending_; }

 private:
  template <affinity_policy, routing_policy, capacity_policy>
  friend struct router;

  buffer_t<memory_space, unsigned char> device_;
  host_readable_t<Backend, index> readback_;       // the plan's two sizes and the route's status
  host_readable_t<Backend, float> staging_;        // the direction's policy array on its way to the device
  host_readable_t<Backend, id_type> staging_ids_;  // and its id array (detail::policy_ids)
  bool pending_ = false;
  matrix_view<const float, memory_space> logits_;  // the pending route's, for finish()'s error
  candidate_span<memory_space> candidates_;
  // A host route's candidates and, on the two-step path of a computing affinity, its T×E logits: kept
  // with their capacity from one route to the next.
  basic_candidate_set<memory_space> host_candidates_;
  std::vector<float> host_logits_;
};

template <affinity_policy Affinity, routing_policy Direction, capacity_policy Capacity>
struct router {
  using affinity_type = Affinity;
  using direction_type = Direction;
  using capacity_type = Capacity;

  Affinity affinity{};
  Direction direction{};
  Capacity capacity{};

  // Tokens per block of the fused path: a multiple of affinity::linear's 256-token GEMM blocks, so
  // that both paths run the same GEMMs. 256 keeps a block's logits (256·E floats) in L2.
  static constexpr index fused_block_tokens = 256;

  // Whether route() on Backend takes the fused path (see the top of this file).
  template <class Backend>
  static constexpr bool fuses_on =
      std::is_same_v<memory_space_t<Backend>, host_space>&& detail::token_block_affinity_v<Affinity> &&
      !reads_logits_v<Capacity> && detail::selects_row_blocks<Direction, detail::block_backend_t<Backend>>;

  // Validates the policies against an input of `cols` columns; returns the number of experts.
  index validate(index cols) const {
    affinity.validate(cols);
    const index E = affinity.experts_for(cols);
    direction.validate(E);
    capacity.validate();
    return E;
  }

  // The fp32 router logits for x (a view of x itself for precomputed float logits).
  template <execution_backend Backend, affinity_input<Affinity> T>
  matrix_view<const float> logits(const Backend& be, matrix_view<const T> x, std::vector<float>& storage) const {
    detail::check_matrix(x, "input");
    validate(x.cols);
    const matrix_view<const float> l = affinity.compute(be, x, storage);
    detail::check_finite(l, "logits");
    return l;
  }

  // One routing step with a stateless capacity policy. x may be in any memory space the backend reads.
  template <execution_backend Backend, affinity_input<Affinity> T, class XSpace>
  requires stateless_capacity_policy<Capacity> && accessible_from_v<XSpace, memory_space_t<Backend>>
      basic_routing_plan<memory_space_t<Backend>> route(const Backend& be, matrix_view<const T, XSpace> x)
  const {
    return route_impl(be, x, [&](const capacity_context& ctx) {
      return capacity.limits(ctx.num_tokens, ctx.num_experts, ctx.top_k);
    });
  }

  // One routing step with a stateful scheduler: `state` (owned by the caller) is read and advanced,
  // and left untouched when the call throws.
  template <execution_backend Backend, affinity_input<Affinity> T>
  requires stateful_capacity_policy<Capacity> basic_routing_plan<memory_space_t<Backend>> route(
      const Backend& be, matrix_view<const T> x, capacity_state_t<Capacity>& state)
  const {
    capacity_state_t<Capacity> next = state;
    auto plan = route_impl(be, x, [&](const capacity_context& ctx) { return capacity.limits(ctx, next); });
    state = next;
    return plan;
  }

  template <execution_backend Backend, affinity_input<Affinity> T>
  requires stateful_capacity_policy<Capacity> basic_routing_plan<memory_space_t<Backend>> route(
      const Backend& be, matrix_view<T> x, capacity_state_t<Capacity>& state)
  const { return route(be, matrix_view<const T>(x), state); }

  template <execution_backend Backend, affinity_input<Affinity> T, class XSpace>
  requires stateless_capacity_policy<Capacity> && accessible_from_v<XSpace, memory_space_t<Backend>>
      basic_routing_plan<memory_space_t<Backend>> route(const Backend& be, matrix_view<T, XSpace> x)
  const { return route(be, matrix_view<const T, XSpace>(x)); }

  template <class T>
  requires stateless_capacity_policy<Capacity> routing_plan route(matrix_view<T> x)
  const { return route(backend::serial{}, matrix_view<const T>(x)); }

  // A route into an existing plan, with a caller-owned workspace, in two steps. route_into validates on
  // the host (its errors are thrown at once), then on a backend whose memory the host cannot read it
  // enqueues the whole route on the backend and waits for nothing: no allocation once `ws` and `plan`
  // have the room (both grow when a route needs more), the plan's arrays written into plan's storage
  // (copies of plan share it), and one copy back of the sizes and the status. So it can be captured in
  // a CUDA graph; each replay is then followed by finish(). finish() waits for the backend, gives the
  // plan its sizes and throws the error route() would have thrown for the same input, leaving the plan
  // empty. The device path needs an affinity that computes on the device (precomputed fp32 logits, or
  // grap_cosine's hidden states), a stateless capacity policy and a direction with a fixed number of
  // candidates per token (token choice, bidirectional). A graph replays the policy as captured: its
  // expert_bias and expert_group values are those of the capture. On a host backend route_into runs
  // the whole route at once (every direction; errors thrown at once, the plan then left as it was) and
  // finish() does nothing; the candidates, the builder's temporaries and the plan's arrays reuse the
  // memory of the previous route on ws and plan, so a steady loop of routes of one shape allocates
  // nothing (route() allocates all of them afresh, and a fresh large allocation is page-faulted on
  // first touch: most of a route's time in a process whose allocator nothing has warmed).
  template <execution_backend Backend, affinity_input<Affinity> T, class XSpace>
  requires stateless_capacity_policy<Capacity> && accessible_from_v<XSpace, memory_space_t<Backend>>
  void route_into(const Backend& be, matrix_view<const T, XSpace> x, route_workspace<Backend>& ws,
                  basic_routing_plan<memory_space_t<Backend>>& plan) const {
    using space = memory_space_t<Backend>;
    detail::require(!ws.pending_, "workspace", "a workspace whose previous route was finished (router::finish)");
    if constexpr (host_accessible_v<space>) {
      static_assert(host_accessible_v<XSpace>, "the input must be in memory the host can read");
      const index E = check_route_input(x);
      const auto limits_of = [&](const capacity_context& ctx) {
        return capacity.limits(ctx.num_tokens, ctx.num_experts, ctx.top_k);
      };
      route_on_host(be, matrix_view<const T>{x.data, x.rows, x.cols, x.stride}, E, direction.candidates_per_token(E),
                    limits_of, ws.host_candidates_, ws.host_logits_, plan, &ws.device_);
    } else {
      check_device_affinity<Backend, T, XSpace>();
      static_assert(std::is_same_v<XSpace, space>, "the input must be in the backend's memory");
      static_assert(
          requires(candidate_span<space> & c, capacity_limits lim) {
            select_unchecked(be, direction, matrix_view<const float, space>{}, lim, c);
          },
          "route_into on a device needs a direction with a fixed number of candidates per token");
      const index E = check_route_input(x);
      const index T_ = x.rows, k = direction.candidates_per_token(E);
      const capacity_limits lim = capacity.limits(T_, E, k);
      detail::check_limits(lim);
      detail::check_slot_budget(E, T_ * k, lim);
      const vector_view<const float> host_array = detail::policy_array(direction);
      const vector_view<const id_type> host_ids = detail::policy_ids(direction);
      const device_route_layout layout(be, T_, E, k, lim, host_array.size, host_ids.size, computed_logits(T_, E),
                                       affinity_bytes(x.cols));
      // Grow what is too small; nothing else allocates.
      if (ws.bytes() < layout.bytes) ws.device_ = allocate<unsigned char>(be, layout.bytes);
      if (ws.readback_.data() == nullptr) ws.readback_ = allocate_host_readable<index>(be, 3);
      if (static_cast<index>(ws.staging_.size()) < host_array.size)
        ws.staging_ = allocate_host_readable<float>(be, host_array.size);
      if (static_cast<index>(ws.staging_ids_.size()) < host_ids.size)
        ws.staging_ids_ = allocate_host_readable<id_type>(be, host_ids.size);
      detail::plan_data<space>& d = plan.raw();
      detail::size_plan(be, d, candidate_view<space>{T_, E, T_ * k}, lim);  // its sizes come with finish()
      for (index i = 0; i < host_array.size; ++i) ws.staging_.data()[i] = host_array[i];
      for (index i = 0; i < host_ids.size; ++i) ws.staging_ids_.data()[i] = host_ids[i];
      const matrix_view<const float, space> l =
          device_logits(be, x, E, detail::at_offset<float>(ws.device_.data(), layout.logits),
                        detail::at_offset<void>(ws.device_.data(), layout.affinity_work));
      ws.candidates_ = enqueue_on_device(be, l, lim, layout, ws.device_.data(), ws.staging_.data(),
                                         ws.staging_ids_.data(), d, ws.readback_.data());
      ws.logits_ = l;
    }
    ws.pending_ = !host_accessible_v<space>;
  }

  template <execution_backend Backend, affinity_input<Affinity> T, class XSpace>
  requires stateless_capacity_policy<Capacity> && accessible_from_v<XSpace, memory_space_t<Backend>>
  void route_into(const Backend& be, matrix_view<T, XSpace> x, route_workspace<Backend>& ws,
                  basic_routing_plan<memory_space_t<Backend>>& plan) const {
    route_into(be, matrix_view<const T, XSpace>(x), ws, plan);
  }

  // Completes the route last enqueued (or replayed) on ws: see route_into.
  template <execution_backend Backend>
  void finish(const Backend& be, route_workspace<Backend>& ws,
              basic_routing_plan<memory_space_t<Backend>>& plan) const {
    using space = memory_space_t<Backend>;
    if constexpr (!host_accessible_v<space>) {
      detail::require(ws.readback_.data() != nullptr, "workspace", "a workspace a route was enqueued on");
      fence(be);
      ws.pending_ = false;
      const index* rb = ws.readback_.data();
      const index failed = rb[2];
      if (failed == no_index) {
        plan.raw().num_slots = rb[0];
        plan.raw().num_assignments = rb[1];
        return;
      }
      plan = basic_routing_plan<space>{};
      fail_route(be, ws.logits_, failed, view_of(ws.candidates_));
    } else {
      (void)be, (void)plan;
      ws.pending_ = false;
    }
  }

  friend constexpr bool operator==(const router&, const router&) = default;

 private:
  // The input's shape and the policies against it; returns the number of experts.
  template <class T, class XSpace>
  index check_route_input(matrix_view<const T, XSpace> x) const {
    detail::check_matrix(x, "input");
    const index E = validate(x.cols);
    const index k = direction.candidates_per_token(E);
    detail::require(
        static_cast<double>(x.rows) * static_cast<double>(k) < static_cast<double>(std::numeric_limits<id_type>::max()),
        "input", "num_tokens * top_k < 2^31", x.rows, " tokens x ", k);
    return E;
  }

  template <execution_backend Backend, affinity_input<Affinity> T, class XSpace, class LimitsFn>
  basic_routing_plan<memory_space_t<Backend>> route_impl(const Backend& be, matrix_view<const T, XSpace> x,
                                                         LimitsFn&& limits_of) const {
    using space = memory_space_t<Backend>;
    static_assert(accessible_from_v<XSpace, space>, "the input must be in memory the backend can read");
    const index E = check_route_input(x);
    const index k = direction.candidates_per_token(E);
    if constexpr (!host_accessible_v<space>) {
      return route_on_device(be, x, E, k, limits_of);
    } else {
      static_assert(host_accessible_v<XSpace>, "the input must be in memory the host can read");
      basic_routing_plan<space> plan;
      std::vector<float> logits;  // a computing affinity's T×E logits on the two-step path: not kept
      const matrix_view<const T> xv{x.data, x.rows, x.cols, x.stride};
      if constexpr (std::is_same_v<space, host_space>) {
        detail::host_route_cache& cache = detail::host_route_cache::of_this_thread();
        if (!cache.busy) {
          const detail::host_route_cache::claim hold(cache);
          route_on_host(be, xv, E, k, limits_of, cache.candidates, logits, plan, &cache.work);
          return plan;
        }
      }
      basic_candidate_set<space> cands;
      route_on_host(be, xv, E, k, limits_of, cands, logits, plan, nullptr);
      return plan;
    }
  }

  // A route whose data the host can read, into `plan`: a failing stage throws at once, before the plan
  // is touched. `cands` and `logits` hold the candidates and the two-step path's logits (their capacity
  // reused); `work`, when given, the builder's temporaries (grown when too small).
  template <execution_backend Backend, affinity_input<Affinity> T, class LimitsFn, class Space>
  void route_on_host(const Backend& be, matrix_view<const T> x, index E, index k, LimitsFn& limits_of,
                     basic_candidate_set<Space>& cands, std::vector<float>& logits,
                     basic_routing_plan<memory_space_t<Backend>>& plan,
                     buffer_t<memory_space_t<Backend>, unsigned char>* work) const {
    const index T_ = x.rows;
    capacity_limits lim;
    if constexpr (fuses_on<Backend>) {
      select_fused(be, x, E, cands);
      const candidate_view<host_space> proposals = detail::host_view(cands);
      const capacity_context ctx{T_, E, k, x.cols, {}, &proposals, cosine_scale_of(affinity)};
      lim = limits_of(ctx);
      detail::check_limits(lim);
    } else {
      unfused_select(be, x, E, k, limits_of, lim, cands, logits);
    }
    detail::check_slot_budget(E, cands.size(), lim);
    const candidate_view<Space> c = view_of(cands);
    void* room = nullptr;
    if (work != nullptr) {
      const index bytes = detail::build_workspace(be, c.size, E, lim.capacity > 0).bytes;
      if (static_cast<index>(work->size()) < bytes) *work = allocate<unsigned char>(be, bytes);
      room = work->data();
    }
    detail::build_plan_into(be, c, lim, plan.raw(), room);
  }

  // The two-step path: the T×E logits, then the selection over them.
  template <execution_backend Backend, affinity_input<Affinity> T, class LimitsFn, class Space>
  void unfused_select(const Backend& be, matrix_view<const T> x, index E, index k, LimitsFn& limits_of,
                      capacity_limits& lim, basic_candidate_set<Space>& cands, std::vector<float>& storage) const {
    const index T_ = x.rows;
    const matrix_view<const float> l = affinity.compute(be, x, storage);
    // A direction that checks finiteness inside its selection pass saves two passes here.
    constexpr bool self_checked = detail::checks_finite_v<Direction>;
    if constexpr (!self_checked) detail::check_finite(l, "logits");
    capacity_context ctx{T_, E, k, x.cols, l, nullptr, cosine_scale_of(affinity)};
    if (detail::selects_with_capacity(direction)) {
      lim = limits_of(ctx);
      detail::check_limits(lim);
      select(be, direction, l, lim, cands);
    } else {
      // Propose first; the capacity policy may read the proposals (a scheduler's statistics).
      select(be, direction, l, capacity_limits{}, cands);
      const candidate_view<host_space> proposals = detail::host_view(cands);
      ctx.candidates = &proposals;
      lim = limits_of(ctx);
      detail::check_limits(lim);
    }
    // Finite logits can still overflow fp32 once divided by a tiny temperature or scaled by a huge
    // scaling factor: a NaN or Inf weight must not reach the plan.
    if constexpr (!self_checked) {
      const index bad = reduce_min(be, cands.num_tokens, detail::nonfinite_candidates{view_of(cands)});
      if (bad < cands.num_tokens) fail_weights(be, view_of(cands), bad);
    }
  }

  // Token t's weights and ranking priorities, read back to the host (an error path).
  template <execution_backend Backend, class Space>
  static std::pair<std::vector<float>, std::vector<float>> host_weights(const Backend& be,
                                                                        const candidate_view<Space>& c, index t) {
    id_type range[2] = {0, 0};
    copy_to_host(be, range, c.offsets + t, 2);
    fence(be);
    const index n = range[1] - range[0];
    std::vector<float> w(static_cast<std::size_t>(n)), r(static_cast<std::size_t>(n));
    copy_to_host(be, w.data(), c.weight + range[0], n);
    copy_to_host(be, r.data(), (c.priority != nullptr ? c.priority : c.weight) + range[0], n);
    fence(be);
    return {std::move(w), std::move(r)};
  }

  // The error of token t's non-finite weight or priority (its first one).
  template <execution_backend Backend, class Space>
  [[noreturn]] static void fail_weights(const Backend& be, const candidate_view<Space>& c, index t) {
    const auto [w, r] = host_weights(be, c, t);
    for (std::size_t i = 0; i < w.size(); ++i)
      detail::require(std::isfinite(w[i]) && std::isfinite(r[i]), "routing weight",
                      "a finite fp32 value (logits / temperature or weight * scaling_factor overflowed)", w[i],
                      " for token ", t);
    detail::fail("routing weight", "finite values", "token ", t);  // unreachable: the row had a non-finite one
  }

  // A route on a backend whose memory the host cannot read. With a direction that proposes a fixed
  // number of candidates per token (select_unchecked: token choice, bidirectional) no stage waits for the
  // device and the route makes two allocations, both sized on the host before the first kernel: the
  // route's workspace (status, candidates, the builder's temporaries) and the plan's storage. The stages
  // that can fail write their lowest failing row into the status (the logits' finiteness unless the
  // direction checks it while selecting, then the candidates' weights, which a failed token leaves NaN),
  // and the status comes back with the plan's sizes in the route's one device-to-host copy; the error is
  // then the host path's, for the same row. The other directions allocate their candidates and wait
  // inside their selection (expert choice reads back its number of pairs).
  template <execution_backend Backend, affinity_input<Affinity> T, class XSpace, class LimitsFn>
  basic_routing_plan<memory_space_t<Backend>> route_on_device(const Backend& be, matrix_view<const T, XSpace> x,
                                                              index E, index k, LimitsFn& limits_of) const {
    using space = memory_space_t<Backend>;
    check_device_affinity<Backend, T, XSpace>();
    static_assert(stateless_capacity_policy<Capacity>,
                  "on a backend whose memory the host cannot read, the capacity policy must be stateless (a "
                  "scheduler reads the logits and the proposals on the host)");
    const index T_ = x.rows;
    // A stateless policy reads the shape only.
    const capacity_context ctx{T_, E, k, x.cols, {}, nullptr, cosine_scale_of(affinity)};
    const capacity_limits lim = limits_of(ctx);
    detail::check_limits(lim);
    constexpr bool self_checked = detail::checks_finite_v<Direction>;
    const vector_view<const float> host_array = detail::policy_array(direction);
    const vector_view<const id_type> host_ids = detail::policy_ids(direction);
    index failed = no_index;
    if constexpr (requires(candidate_span<space> & c, matrix_view<const float, XSpace> l) {
                    select_unchecked(be, direction, l, lim, c);
                  }) {
      detail::check_slot_budget(E, T_ * k, lim);
      const device_route_layout layout(be, T_, E, k, lim, host_array.size, host_ids.size, computed_logits(T_, E),
                                       affinity_bytes(x.cols));
      auto work = allocate<unsigned char>(be, layout.bytes);
      const matrix_view<const float, XSpace> l =
          device_logits(be, x, E, detail::at_offset<float>(work.data(), layout.logits),
                        detail::at_offset<void>(work.data(), layout.affinity_work));
      detail::plan_data<space> d;
      detail::size_plan(be, d, candidate_view<space>{T_, E, T_ * k}, lim);
      index readback[3] = {0, 0, no_index};
      const candidate_span<space> cands =
          enqueue_on_device(be, l, lim, layout, work.data(), host_array.data, host_ids.data, d, readback);
      fence(be);
      failed = readback[2];
      d.num_slots = readback[0];
      d.num_assignments = readback[1];
      if (failed == no_index) return basic_routing_plan<space>(std::move(d));
      fail_route(be, l, failed, view_of(cands));
    } else {
      buffer_t<space, float> room;
      if (computed_logits(T_, E) > 0) room = allocate<float>(be, computed_logits(T_, E));
      const matrix_view<const float, XSpace> l = device_logits(be, x, E, room.data(), nullptr);
      if constexpr (!self_checked) {
        if (const index t = reduce_min(be, T_, detail::nonfinite_rows<XSpace>{l}); t < T_) fail_logits(be, l, t);
      }
      buffer_t<space, float> array;
      if (host_array.size > 0) {
        array = allocate<float>(be, host_array.size);
        copy(be, array.data(), host_array.data, host_array.size);
      }
      buffer_t<space, id_type> ids;
      if (host_ids.size > 0) {
        ids = allocate<id_type>(be, host_ids.size);
        copy(be, ids.data(), host_ids.data, host_ids.size);
      }
      basic_candidate_set<space> cands;
      select(be, detail::with_policy_ids(detail::with_policy_array(direction, array.data()), ids.data()), l, lim,
             cands);
      auto status = allocate<index>(be, 1);
      reduce_min_into(be, T_, detail::nonfinite_candidates{view_of(cands)}, status.data());
      index* const st = status.data();
      for_each(be, 1, detail::weight_status{st, T_});
      detail::check_slot_budget(E, cands.size(), lim);
      auto plan = detail::build_plan_unchecked(be, view_of(cands), lim, st, &failed);
      if (failed == no_index) return plan;
      fail_route(be, l, failed, view_of(cands));
    }
  }

  // An affinity a device route can run: precomputed fp32 logits, or one whose forward() computes the
  // logits on the device (grap_cosine).
  template <class Backend, class T, class XSpace>
  static constexpr void check_device_affinity() {
    if constexpr (std::is_same_v<Affinity, affinity::precomputed>) {
      static_assert(std::is_same_v<std::remove_cv_t<T>, float>,
                    "on a backend whose memory the host cannot read, precomputed logits must be fp32");
    } else {
      static_assert(
          requires(const Affinity& a, const Backend& be, matrix_view<const T, XSpace> x, matrix_view<float, XSpace> l) {
            a.forward(be, x, l);
          },
          "on a backend whose memory the host cannot read, the affinity must be precomputed (fp32) or "
          "compute its logits there (grap_cosine)");
    }
  }

  // Floats of logits a device route computes (none for precomputed logits).
  static constexpr index computed_logits(index T, index E) {
    return std::is_same_v<Affinity, affinity::precomputed> ? 0 : T * E;
  }
  // Bytes of backend memory the affinity's forward needs on a device (cosine's unit embeddings).
  index affinity_bytes(index cols) const {
    if constexpr (requires { affinity.device_workspace_bytes(cols); }) {
      return affinity.device_workspace_bytes(cols);
    } else {
      return 0;
    }
  }

  // The route's fp32 logits: the input itself when precomputed, else computed into `room` (T×E floats in
  // the backend's memory) by the affinity's forward, enqueued without a wait.
  template <execution_backend Backend, class T, class XSpace>
  matrix_view<const float, XSpace> device_logits(const Backend& be, matrix_view<const T, XSpace> x, index E,
                                                 float* room, void* work) const {
    if constexpr (std::is_same_v<Affinity, affinity::precomputed>) {
      (void)be, (void)E, (void)room, (void)work;
      return x;
    } else {
      const matrix_view<float, XSpace> out{room, x.rows, E, E};
      if constexpr (requires { affinity.forward(be, x, out, work); }) {
        affinity.forward(be, x, out, work);
      } else {
        affinity.forward(be, x, out);
      }
      return out;
    }
  }

  // A device route's workspace: status[0] the lowest row with a non-finite logit, [1] with a
  // non-finite weight, [2] the route's (row for a logit, T + row for a weight); the candidates; the
  // builder's temporaries; the direction's policy array and id array.
  struct device_route_layout {
    index status, offsets, expert, weight, priority, build, array, ids, logits, affinity_work, bytes;
    template <class Backend>
    device_route_layout(const Backend& be, index T, index E, index k, const capacity_limits& lim, index array_size,
                        index ids_size, index logits_size, index affinity_bytes) {
      const index nnz = T * k;
      detail::workspace_layout l;
      status = l.reserve<index>(3);
      offsets = l.reserve<id_type>(T + 1);
      expert = l.reserve<id_type>(nnz);
      weight = l.reserve<float>(nnz);
      priority = l.reserve<float>(nnz);
      build = l.reserve<unsigned char>(detail::build_workspace(be, nnz, E, lim.capacity > 0).bytes);
      array = l.reserve<float>(array_size);
      ids = l.reserve<id_type>(ids_size);
      logits = l.reserve<float>(logits_size);
      affinity_work = l.reserve<unsigned char>(affinity_bytes);
      bytes = l.bytes();
    }
  };

  // The device route of a direction with a fixed number of candidates per token, enqueued whole: the
  // policy array and id array copied from `policy` and `policy_id` (host memory) into the workspace,
  // the selection, the finiteness checks into the status, and the plan built into d (whose storage has
  // the room), ending with the copy of the sizes and the status into `readback`. Allocates nothing and
  // waits for nothing.
  template <execution_backend Backend, class XSpace>
  candidate_span<memory_space_t<Backend>> enqueue_on_device(const Backend& be, matrix_view<const float, XSpace> l,
                                                            const capacity_limits& lim,
                                                            const device_route_layout& layout, void* base,
                                                            const float* policy, const id_type* policy_id,
                                                            detail::plan_data<memory_space_t<Backend>>& d,
                                                            index* readback) const {
    using space = memory_space_t<Backend>;
    const index T_ = l.rows;
    constexpr bool self_checked = detail::checks_finite_v<Direction>;
    float* const array = detail::at_offset<float>(base, layout.array);
    id_type* const ids = detail::at_offset<id_type>(base, layout.ids);
    const vector_view<const float> host_array = detail::policy_array(direction);
    const vector_view<const id_type> host_ids = detail::policy_ids(direction);
    copy(be, array, policy, host_array.size);
    copy(be, ids, policy_id, host_ids.size);
    const Direction dir = detail::with_policy_ids(detail::with_policy_array(direction, array), ids);
    index* const st = detail::at_offset<index>(base, layout.status);
    candidate_span<space> cands;
    cands.offsets = detail::at_offset<id_type>(base, layout.offsets);
    cands.expert = detail::at_offset<id_type>(base, layout.expert);
    cands.weight = detail::at_offset<float>(base, layout.weight);
    cands.priority = detail::at_offset<float>(base, layout.priority);
    if constexpr (self_checked) {
      for_each(be, 1, detail::clear_status{st});
    } else {
      reduce_min_into(be, T_, detail::nonfinite_rows<XSpace>{l}, st);
    }
    select_unchecked(be, dir, l, lim, cands);
    reduce_min_into(be, T_, detail::nonfinite_candidates{view_of(cands)}, st + 1);
    for_each(be, 1, detail::merge_status{st, T_});
    detail::enqueue_build(be, view_of(cands), lim, d, st + 2, readback, detail::at_offset<void>(base, layout.build));
    return cands;
  }

  // The error of a device route's status: row `failed` had a non-finite logit, or row failed - T a
  // non-finite weight.
  template <execution_backend Backend, class XSpace, class Space>
  [[noreturn]] void fail_route(const Backend& be, matrix_view<const float, XSpace> l, index failed,
                               const candidate_view<Space>& cands) const {
    if (failed < l.rows) fail_logits(be, l, failed);
    const index t = failed - l.rows;
    // A direction that reports its own selection's failures (token choice, bidirectional's proposal)
    // gives the message its select() would have thrown: a failed selection leaves NaN weights, while a
    // non-finite ranking priority (bidirectional's) is the router's check, as on the host.
    if constexpr (requires(const float* row) { fail_selection(direction, row, l.cols, t, cands); }) {
      const std::vector<float> w = host_weights(be, cands, t).first;
      if (!std::all_of(w.begin(), w.end(), [](float v) { return std::isfinite(v); }))
        fail_selection(direction, detail::host_row(be, l, t).data(), l.cols, t, cands);
    }
    fail_weights(be, cands, t);
  }

  // The error of row t's first non-finite logit, as the host path's check_finite reports it.
  template <execution_backend Backend, class XSpace>
  [[noreturn]] static void fail_logits(const Backend& be, matrix_view<const float, XSpace> l, index t) {
    const std::vector<float> row = detail::host_row(be, l, t);
    detail::check_finite(matrix_view<const float>{row.data(), 1, l.cols, l.cols}, "logits", t);
    detail::fail("logits", "finite values", "row ", t);  // unreachable: the row had a non-finite entry
  }

  // The fused path: blocks of fused_block_tokens tokens, each one's logits computed on the calling
  // thread (Backend's inner backend: the same row primitives, no nested threads) and selected at once.
  template <execution_backend Backend, affinity_input<Affinity> T>
  void select_fused(const Backend& be, matrix_view<const T> x, index E, candidate_set& cands) const {
    const auto inner = detail::block_backend_of(be);
    const index T_ = x.rows, B = fused_block_tokens;
    const auto block_logits = [&](index begin, index end, std::vector<float>& storage) {
      return affinity.compute(inner, matrix_view<const T>{x.row(begin), end - begin, x.cols, x.stride}, storage);
    };
    begin_selection(direction, T_, E, cands);
    // One block per item; the lowest offending token of a block, and the lowest over blocks.
    const index bad = reduce_min(
        be, (T_ + B - 1) / B,
        [&](index b) {
          const index begin = b * B, end = std::min(T_, begin + B);
          const matrix_view<const float> l = block_logits(begin, end, detail::fused_block_storage());
          const index t = select_rows(inner, direction, l, begin, cands);
          return t < end ? t : T_;
        },
        index{1});
    if (const index t = bad; t < T_) {
      // The offending token's block again (the same block, hence the same logits) for the message.
      const index begin = t / B * B;
      std::vector<float> storage;
      const matrix_view<const float> l = block_logits(begin, std::min(T_, begin + B), storage);
      fail_selection(direction, l.row(t - begin), E, t, cands);
    }
  }
};

}  // namespace resonance
