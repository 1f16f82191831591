"""PyTorch peer for bench_route: top-k routing with capacity, done the Megatron-Core way.

What it measures: the routing work of a Megatron-Core MoE layer with its default
token-choice router, on precomputed logits (T tokens x E experts, float32):

  1. scores      top-k over experts per token, softmax over the k chosen logits
                 (moe_router_pre_softmax=False), scattered into a T x E `probs`
                 tensor and a bool T x E `routing_map`;
  2. capacity    C = ceil(T * k / E * cf) (get_capacity); drop policy "probs":
                 per expert keep the C tokens with the largest probs
                 (topk over dim 0, unsorted), routing_map &= capacity mask,
                 probs *= routing_map;
  3. permutation moe_utils.permute without drop-and-pad: per expert the
                 ascending ids of its kept tokens (masked_select on the
                 transposed map) plus the per-expert counts.

Hidden states are not gathered: only routing and the dispatch plan are compared.

Run with Debian's torch (`/usr/bin/python3`, python3-torch 1.13):
    /usr/bin/python3 bench/peers/torch_route.py --self-test
checks `route` against a brute-force numpy reference on small tie-free inputs
(routing_map, sorted_indices and counts exactly; probs to 4 ulp, since torch's
vectorised exp and numpy's differ in the last bit).
compare.py imports this module and calls `time_case`.
"""

import argparse
import math
import statistics
import sys
import time

import numpy as np
import torch

torch.set_num_threads(2)


def capacity(tokens, experts, k, cf):
    """Megatron's get_capacity for T*k assignments over E experts, at most T."""
    return min(tokens, math.ceil(tokens * k / experts * cf))


def route(logits, k, cf, return_counts=False):
    """Route a T x E float32 tensor; returns (probs, routing_map, sorted_indices).

    With return_counts=True the per-expert kept counts are appended.
    """
    with torch.inference_mode():
        tokens, experts = logits.shape
        # Scores: softmax after top-k.
        top_logits, top_idx = torch.topk(logits, k, dim=1)
        top_probs = torch.softmax(top_logits, dim=-1, dtype=torch.float32)
        probs = torch.zeros_like(logits).scatter(1, top_idx, top_probs)
        routing_map = torch.zeros_like(logits, dtype=torch.int32).scatter(1, top_idx, 1).bool()
        # Capacity with drop policy "probs".
        cap = capacity(tokens, experts, k, cf)
        _, keep_idx = torch.topk(probs, k=cap, dim=0, sorted=False)
        capacity_mask = torch.zeros_like(logits).scatter(0, keep_idx, 1).bool()
        routing_map = torch.logical_and(routing_map, capacity_mask)
        probs = probs * routing_map
        # Permutation: per expert, ascending ids of its kept tokens.
        map_t = routing_map.T.contiguous()
        token_ids = torch.arange(tokens, device=logits.device).unsqueeze(0).expand(experts, -1)
        sorted_indices = token_ids.masked_select(map_t)
        counts = routing_map.sum(dim=0)
    if return_counts:
        return probs, routing_map, sorted_indices, counts
    return probs, routing_map, sorted_indices


def time_case(logits_np, k, cf, repeats):
    """Median and min wall time (s) of `route` over `repeats` runs after 2 warm-ups."""
    logits = torch.from_numpy(np.ascontiguousarray(logits_np, dtype=np.float32))
    for _ in range(2):
        route(logits, k, cf, return_counts=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        route(logits, k, cf, return_counts=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def reference(logits, k, cf):
    """Brute-force numpy reference of `route` (loops, no ties assumed)."""
    tokens, experts = logits.shape
    probs = np.zeros_like(logits)
    chosen = np.zeros(logits.shape, dtype=bool)
    for t in range(tokens):
        top = sorted(range(experts), key=lambda e: -logits[t, e])[:k]
        vals = logits[t, top]
        ex = np.exp(vals - vals.max())
        probs[t, top] = ex / ex.sum()
        chosen[t, top] = True
    cap = capacity(tokens, experts, k, cf)
    kept = np.zeros_like(chosen)
    for e in range(experts):
        best = sorted(range(tokens), key=lambda t: -probs[t, e])[:cap]
        kept[best, e] = chosen[best, e]
    probs = probs * kept
    sorted_indices = np.concatenate([np.flatnonzero(kept[:, e]) for e in range(experts)])
    return probs, kept, sorted_indices


def self_test():
    rng = np.random.default_rng(2024)
    # k=1 gives every token prob 1.0, a tie for the "probs" drop: use it only where C >= T.
    for tokens, experts, k, cf in [(16, 4, 1, 4.0), (32, 8, 2, 1.25), (64, 8, 3, 0.5),
                                   (40, 16, 4, 1.25), (50, 6, 6, 2.0), (200, 64, 8, 1.0)]:
        logits = rng.standard_normal((tokens, experts)).astype(np.float32)
        assert all(len(np.unique(row)) == experts for row in logits), "inputs must be tie-free"
        probs, kept, order, counts = route(torch.from_numpy(logits), k, cf, return_counts=True)
        ref_probs, ref_kept, ref_order = reference(logits, k, cf)
        case = f"T={tokens} E={experts} k={k} cf={cf}"
        assert np.array_equal(kept.numpy(), ref_kept), f"{case}: routing_map differs"
        assert np.array_equal(order.numpy(), ref_order), f"{case}: sorted_indices differ"
        assert np.array_equal(counts.numpy(), ref_kept.sum(axis=0)), f"{case}: counts differ"
        # torch's vectorised exp is not correctly rounded: allow a few ulp, zeros exact.
        assert np.array_equal(probs.numpy() == 0, ref_probs == 0), f"{case}: probs support differs"
        np.testing.assert_array_max_ulp(probs.numpy(), ref_probs, maxulp=4)
        print(f"ok  {case}: kept {int(kept.sum())} of {tokens * k}")
    print("self-test passed")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--self-test", action="store_true", help="check route() against numpy")
    args = parser.parse_args()
    if not args.self_test:
        parser.print_help()
        sys.exit(0)
    self_test()
