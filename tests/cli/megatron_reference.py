#!/usr/bin/python3
"""Checks resonance-route against independent NumPy statements of Megatron-Core's routing and DESIGN.md section 6.

usage: megatron_reference.py <path-to-resonance-route> <scratch-dir>

The reference below is written from the formulas (DESIGN.md sections 3 and 6, research/peers.md 2.1),
not from Megatron's code, and needs NumPy only:

  topk_routing_with_score_function   softmax after top-k (default) or before it (pre_softmax);
                                     sigmoid / sqrt_softplus scored over all experts, renormalised over
                                     the k when k > 1 (s / (sum + 1e-20)); the expert bias is added to the
                                     selection key only; group-limited top-k with group score = sum of the
                                     top (k / group_topk) keys of a group; the scaling factor multiplies
                                     the final weights.
  apply_router_token_dropping        C = ceil((T*k/E) * cf), raised to min_capacity; drop "score" keeps
                                     an expert's top-C weights (Megatron's "probs"), "position" its
                                     earliest C tokens.
  switch_load_balancing_loss_func    E * sum_e f_e * P_e on the scores of
  (+ compute_routing_scores_for_aux_loss)  softmax over all E, or sigmoid / sqrt_softplus divided by
                                     their per-token sum; f_e from a plain top-k of those scores.
  z_loss_func                        mean over tokens of logsumexp(logits)^2.

  sinkhorn_load_balancing            --direction sinkhorn (Megatron-Core's training-time Sinkhorn routing):
  (+ moe_utils.sinkhorn)             cost = exp(logits - row max) (the row scaling is absorbed by d0);
                                     d0 = d1 = 1; repeat d0 = (1/T) / (sum_e d1*cost + 1e-8),
                                     d1 = (1/E) / (sum_t d0*cost + 1e-8), error = mean|d1 - d1_old|, while
                                     error > tolerance (and, unlike Megatron, at most max-iterations times);
                                     selection = top-k of each row of d1*cost*d0; weights = sigmoid(logit)
                                     for k = 1, softmax over all E for k > 1, gathered at the selection,
                                     not renormalised; capacity and drops as above (drop "score" ranks by
                                     those weights).

The other directions of DESIGN.md section 6, from their formulas (no Megatron counterpart):

  --direction expert                 S = softmax over all E; C as above (k from --top-k); expert e keeps
                                     its top-C tokens by S[:, e] (ties to the lower token) with weight
                                     S[t, e]; every token is a candidate of every expert (demand = T), so
                                     drop_rate = (T*E - kept)/(T*E) and every expert keeps min(C, T).
  --direction bidirectional          candidates = token choice's top-k with token choice's weights; an
                                     expert with more than C candidates keeps the top-C by the full
                                     score S[t, e] (softmax over all E, or the plain sigmoid / sqrt_softplus);
                                     demand = the candidate counts. With C >= the largest demand nothing is
                                     dropped and the output is the token route's, byte for byte.
  --causal                           position priority instead: each expert keeps its earliest C
                                     candidates; causal expert choice's candidates are each token's top-k
                                     by S, with weight S[t, e].

Where Megatron leaves something undefined or differs on purpose, the reference states resonance's
definition (DESIGN.md): ties go to the lower token; the routing map and probs hold kept pairs only,
even with pad-to-capacity (Megatron's padded map would include zero-weight padding pairs); the plan is
expert-major with kept tokens in ascending order, then padding slots holding token -1.

The logits are random, and every draw is checked to be free of near-ties at each decision the
reference takes (a top-k boundary, a group choice, a capacity cut), so that fp32 rounding inside the
tool cannot legitimately flip a decision: a draw with a near-tie is replaced by the next seed.
"""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np

RTOL = 1e-5
ATOL = 1e-7
TIE_MARGIN = 1e-5  # relative gap a decision needs to be considered tie-free


class NearTie(Exception):
    """A draw whose decisions fp32 rounding could flip; the caller draws again."""


def softmax(x):
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def score_all(l, fn):
    if fn == "softmax":
        return softmax(l)
    if fn == "sigmoid":
        return 1.0 / (1.0 + np.exp(-l))
    if fn == "sqrt_softplus":
        return np.sqrt(np.logaddexp(0.0, l))
    raise ValueError(fn)


def check_gap(a, b, what):
    """a >= b are two values on either side of a decision; they must be clearly apart."""
    if a - b <= TIE_MARGIN * max(1.0, abs(a), abs(b)):
        raise NearTie(what)


def topk(key, k, what):
    """Indices of the k largest keys (ties to the lower index), checked tie-free at the boundary."""
    order = np.argsort(-key, kind="stable")
    if k < len(key) and np.isfinite(key[order[k]]):
        check_gap(key[order[k - 1]], key[order[k]], what)
    return order[:k]


def group_limited_topk(key, k, num_groups, group_topk):
    E = len(key)
    size = E // num_groups
    m = k // group_topk
    groups = key.reshape(num_groups, size)
    group_score = np.array([np.sort(g)[::-1][:m].sum() for g in groups])
    kept_groups = topk(group_score, group_topk, "group choice")
    masked = np.full(E, -np.inf)
    for g in kept_groups:
        masked[g * size:(g + 1) * size] = key[g * size:(g + 1) * size]
    return topk(masked, k, "grouped top-k")


def route_tokens(l, c):
    """topk_routing_with_score_function: dense probs [T, E] and routing map [T, E]."""
    T, E = l.shape
    k = c["top_k"]
    fn = c.get("score", "softmax")
    pre = c.get("pre_softmax", False)
    bias = c.get("bias")
    probs = np.zeros((T, E))
    rmap = np.zeros((T, E), dtype=bool)
    scores = None if (fn == "softmax" and not pre) else score_all(l, fn)
    for t in range(T):
        key = l[t].copy() if scores is None else scores[t].copy()
        if bias is not None:
            key = key + bias
        if c.get("num_groups", 0) > 1:
            sel = group_limited_topk(key, k, c["num_groups"], c["group_topk"])
        else:
            sel = topk(key, k, "top-k")
        if scores is None:  # softmax over the k selected logits
            w = softmax(l[t, sel])
        else:
            w = scores[t, sel]
            if fn != "softmax" and k > 1:
                w = w / (w.sum() + 1e-20)
        w = w * c.get("scaling_factor", 1.0)
        probs[t, sel] = w
        rmap[t, sel] = True
    return probs, rmap


def sinkhorn_select(l, c):
    """sinkhorn_load_balancing: dense weights [T, E], selection map [T, E] and the iterations run."""
    T, E = l.shape
    k = c["top_k"]
    max_iterations = c.get("sinkhorn_iterations", 100)
    tolerance = c.get("sinkhorn_tolerance", 1e-4)
    eps = 1e-8
    cost = np.exp(l - l.max(axis=1, keepdims=True))
    d0 = np.ones(T)
    d1 = np.ones(E)
    d1_old = d1
    error = math.inf
    iterations = 0
    while iterations < max_iterations and error > tolerance:
        d0 = (1.0 / T) / ((d1[None, :] * cost).sum(axis=1) + eps)
        d1 = (1.0 / E) / ((d0[:, None] * cost).sum(axis=0) + eps)
        error = float(np.mean(np.abs(d1 - d1_old)))
        if abs(error - tolerance) <= 1e-6 * tolerance:  # the stopping test is a decision too
            raise NearTie("sinkhorn stopping test")
        d1_old = d1
        iterations += 1
    p = d1[None, :] * cost * d0[:, None]
    full = softmax(l)
    probs = np.zeros((T, E))
    rmap = np.zeros((T, E), dtype=bool)
    for t in range(T):
        sel = topk(p[t] / p[t].max(), k, "sinkhorn top-k")  # a row's scale does not move its top-k
        probs[t, sel] = 1.0 / (1.0 + np.exp(-l[t, sel])) if k == 1 else full[t, sel]
        rmap[t, sel] = True
    return probs, rmap, iterations


def propose(l, c, facts):
    """The direction's candidates before capacity: weights [T, E], map [T, E], the priority by which
    drop "score" ranks an expert's candidates, and the drop policy the direction imposes (None: --drop's)."""
    T, E = l.shape
    k = c["top_k"]
    direction = c.get("direction", "token")
    if direction == "token":
        probs, rmap = route_tokens(l, c)
        return probs, rmap, probs, None
    if direction == "sinkhorn":
        probs, rmap, facts["sinkhorn_iterations"] = sinkhorn_select(l, c)
        plain = np.zeros((T, E), dtype=bool)
        for t in range(T):
            plain[t, np.argsort(-l[t], kind="stable")[:k]] = True
        facts["sinkhorn_differs_from_topk"] = not np.array_equal(rmap, plain)
        if "sinkhorn_iterations" in c or "sinkhorn_tolerance" in c:
            defaults = {key: v for key, v in c.items() if not key.startswith("sinkhorn_")}
            facts["sinkhorn_options_matter"] = not np.array_equal(rmap, sinkhorn_select(l, defaults)[1])
        return probs, rmap, probs, None
    full = score_all(l, c.get("score", "softmax"))  # S, the full score distribution
    if direction == "bidirectional":
        probs, rmap = route_tokens(l, c)
        return probs, rmap, full, "position" if c.get("causal") else "score"
    assert direction == "expert", direction
    if c.get("causal"):  # candidates: each token's top-k by S; position priority
        rmap = np.zeros((T, E), dtype=bool)
        for t in range(T):
            rmap[t, topk(full[t], k, "causal expert top-k")] = True
        return np.where(rmap, full, 0.0), rmap, full, "position"
    # Every token is a candidate of every expert; each keeps its top-C by S.
    return full.copy(), np.ones((T, E), dtype=bool), full, "score"


def capacity_of(T, E, c):
    cap = math.ceil((T * c["top_k"] / E) * c["capacity_factor"])
    return max(cap, c.get("min_capacity", 0))


def drop_tokens(priority, rmap, c, drop=None, check=True):
    """apply_router_token_dropping: the kept map (kept pairs only) and the capacity. Drop "score" keeps
    an expert's top-C candidates by `priority` (the weights for token choice and Sinkhorn); `drop`
    overrides the option when the direction decides it (causal: position; expert choice: score)."""
    T, E = priority.shape
    cap = capacity_of(T, E, c)
    drop = drop or c.get("drop", "score")
    kept = rmap.copy()
    for e in range(E):
        tokens = np.flatnonzero(rmap[:, e])  # ascending token order
        if len(tokens) <= cap:
            continue
        if drop == "position":
            keep = tokens[:cap]
        else:
            w = priority[tokens, e]
            order = np.argsort(-w, kind="stable")  # equal priorities: the lower token first
            a, b = (w[order[cap - 1]], w[order[cap]]) if cap > 0 else (None, None)
            if check and a is not None and a != b:  # an exact tie is decided by token order, as defined
                check_gap(a, b, "capacity cut")
            keep = tokens[order[:cap]]
        kept[:, e] = False
        kept[keep, e] = True
    return kept, cap


def plan_layout(kept, cap, c):
    """Expert-major slots: kept tokens ascending, then padding (-1) up to capacity and alignment."""
    T, E = kept.shape
    align = c.get("align", 1)
    counts = kept.sum(axis=0).astype(np.int64)
    offsets = [0]
    slots = []
    for e in range(E):
        tokens = list(np.flatnonzero(kept[:, e]))
        n = cap if (c.get("pad_to_capacity") and cap >= 0) else len(tokens)
        n = (n + align - 1) // align * align
        slots += tokens + [-1] * (n - len(tokens))
        offsets.append(offsets[-1] + n)
    return counts, np.array(offsets), np.array(slots, dtype=np.int64)


def aux_loss(l, c):
    """switch_load_balancing_loss_func on compute_routing_scores_for_aux_loss's scores, coefficient 1."""
    T, E = l.shape
    k = c["top_k"]
    fn = c.get("score", "softmax")
    s = score_all(l, fn)
    if fn != "softmax":
        s = s / (s.sum(axis=-1, keepdims=True) + 1e-20)
    counts = np.zeros(E)
    for t in range(T):
        counts[topk(s[t], k, "aux-loss top-k")] += 1
    return float((s.sum(axis=0) * counts).sum() * E / (k * T * T))


def z_loss(l):
    m = l.max(axis=-1)
    lse = m + np.log(np.exp(l - m[:, None]).sum(axis=-1))
    return float(np.mean(lse**2))


def reference(logits, c):
    l = logits.astype(np.float32).astype(np.float64)  # the tool scores in fp32
    T, E = l.shape
    facts = {}
    probs, rmap, priority, forced_drop = propose(l, c, facts)
    if "capacity_factor" in c:
        kept, cap = drop_tokens(priority, rmap, c, forced_drop)
        if c.get("direction") == "bidirectional" and not c.get("causal"):
            by_weight, _ = drop_tokens(probs, rmap, c, "score", check=False)
            facts["ranking_by_score_matters"] = not np.array_equal(kept, by_weight)
    else:
        kept, cap = rmap, -1
    facts["capacity"] = cap
    facts["max_demand"] = int(rmap.sum(axis=0).max()) if T > 0 else 0
    facts["dropped"] = int(rmap.sum() - kept.sum())
    counts, offsets, slots = plan_layout(kept, cap, c)
    demanded = int(rmap.sum())
    n_kept = int(kept.sum())
    S = int(offsets[-1])
    mean = counts.mean()
    stats = {
        "capacity": cap,
        "num_tokens": T,
        "num_experts": E,
        "top_k": c["top_k"],
        "num_slots": S,
        "demanded": demanded,
        "kept": n_kept,
        "dropped": demanded - n_kept,
        "drop_rate": (demanded - n_kept) / demanded if demanded > 0 else 0.0,
        "padding_fraction": (S - n_kept) / S if S > 0 else 0.0,
        "mean_load": mean,
        "max_load": float(counts.max()),
        "load_cv": float(counts.std() / mean) if mean > 0 else 0.0,
        "aux_loss": aux_loss(l, c),
        "z_loss": z_loss(l),
    }
    return {
        "probs": np.where(kept, probs, 0.0),
        "routing_map": kept.astype(np.uint8),
        "expert_counts": counts,
        "expert_demand": rmap.sum(axis=0),
        "expert_offsets": offsets,
        "slot_token": slots,
        "stats": stats,
        "facts": facts,
    }


CASES = [
    # name, T, E, input dtype, options
    ("softmax_post_k2_dropless", 256, 16, np.float32, {"top_k": 2}),
    ("softmax_pre_k2_cf1_score", 256, 16, np.float64,
     {"top_k": 2, "pre_softmax": True, "capacity_factor": 1.0, "drop": "score"}),
    ("sigmoid_k4_bias_groups_scaled_position", 200, 16, np.float32,
     {"top_k": 4, "score": "sigmoid", "bias": "f4", "num_groups": 4, "group_topk": 2, "scaling_factor": 2.5,
      "capacity_factor": 1.25, "drop": "position"}),
    ("sqrt_softplus_k3_bias_pad_align", 192, 12, np.float64,
     {"top_k": 3, "score": "sqrt_softplus", "bias": "f8", "capacity_factor": 0.8, "drop": "score",
      "pad_to_capacity": True, "align": 8}),
    ("softmax_k1_min_capacity_score_ties", 64, 8, np.float32,
     {"top_k": 1, "capacity_factor": 1.1, "min_capacity": 12, "drop": "score"}),
    ("softmax_k2_groups_scaled_align_dropless", 128, 8, np.float32,
     {"top_k": 2, "num_groups": 4, "group_topk": 2, "scaling_factor": 1.5, "align": 4}),
    ("sigmoid_k1_cf2_position", 100, 10, np.float64,
     {"top_k": 1, "score": "sigmoid", "capacity_factor": 2.0, "drop": "position"}),
    ("sqrt_softplus_k2_groups_pad_min_capacity", 150, 12, np.float32,
     {"top_k": 2, "score": "sqrt_softplus", "num_groups": 3, "group_topk": 1, "capacity_factor": 0.5,
      "drop": "score", "pad_to_capacity": True, "min_capacity": 20}),
    ("softmax_pre_k3_cf_fraction_position_pad", 97, 7, np.float64,
     {"top_k": 3, "pre_softmax": True, "capacity_factor": 1.1, "drop": "position", "pad_to_capacity": True}),
    # --direction sinkhorn: Megatron's training-time Sinkhorn routing
    ("sinkhorn_k1_dropless", 256, 16, np.float32, {"direction": "sinkhorn", "top_k": 1}),
    ("sinkhorn_k2_loose_tolerance_dropless", 192, 12, np.float64,
     {"direction": "sinkhorn", "top_k": 2, "sinkhorn_tolerance": 0.03}),
    ("sinkhorn_k1_three_iterations_cf_score", 200, 8, np.float32,
     {"direction": "sinkhorn", "top_k": 1, "sinkhorn_iterations": 3, "capacity_factor": 1.0, "drop": "score"}),
    ("sinkhorn_k2_cf1_score", 256, 16, np.float64,
     {"direction": "sinkhorn", "top_k": 2, "capacity_factor": 1.0, "drop": "score"}),
    # --direction expert: every expert takes its top-C tokens by the softmax over all experts
    ("expert_k1_cf1", 128, 8, np.float32, {"direction": "expert", "top_k": 1, "capacity_factor": 1.0}),
    ("expert_k2_cf_fraction_pad_align", 100, 12, np.float64,
     {"direction": "expert", "top_k": 2, "capacity_factor": 0.8, "pad_to_capacity": True, "align": 4}),
    ("expert_k1_min_capacity_above_tokens_pad", 40, 8, np.float32,
     {"direction": "expert", "top_k": 1, "capacity_factor": 1.0, "min_capacity": 50, "pad_to_capacity": True}),
    ("expert_causal_k2_cf_fraction", 128, 8, np.float64,
     {"direction": "expert", "causal": True, "top_k": 2, "capacity_factor": 0.9}),
    # --direction bidirectional: token proposals, each expert keeps its top-C candidates by score
    ("bidirectional_k2_cf1", 256, 16, np.float32, {"direction": "bidirectional", "top_k": 2, "capacity_factor": 1.0}),
    ("bidirectional_k1_bias_cf_fraction", 160, 8, np.float64,
     {"direction": "bidirectional", "top_k": 1, "bias": "f4", "capacity_factor": 0.9}),
    ("bidirectional_sigmoid_k2_cf_fraction", 128, 8, np.float32,
     {"direction": "bidirectional", "top_k": 2, "score": "sigmoid", "capacity_factor": 1.1}),
    ("bidirectional_k2_capacity_is_max_demand", 192, 12, np.float32,
     {"direction": "bidirectional", "top_k": 2, "capacity_factor": 0.05, "min_capacity": "max_demand",
      "same_as_token": True}),
    ("bidirectional_causal_k2_cf_fraction", 128, 8, np.float32,
     {"direction": "bidirectional", "causal": True, "top_k": 2, "capacity_factor": 0.8}),
]

# What makes a case informative, checked on the reference itself (a failure here means the case no
# longer tests what its name says, e.g. after a change of the random draw).
EXPECT = {
    "sinkhorn_k1_dropless": [("the Sinkhorn selection differs from a plain top-k",
                              lambda f: f["sinkhorn_differs_from_topk"])],
    "sinkhorn_k2_loose_tolerance_dropless": [("the loose tolerance stops the iteration early",
                                              lambda f: 1 <= f["sinkhorn_iterations"] < 10),
                                             ("the selection differs from the default tolerance's",
                                              lambda f: f["sinkhorn_options_matter"]),
                                             ("the Sinkhorn selection differs from a plain top-k",
                                              lambda f: f["sinkhorn_differs_from_topk"])],
    "sinkhorn_k1_three_iterations_cf_score": [("--sinkhorn-iterations ends the iteration",
                                               lambda f: f["sinkhorn_iterations"] == 3),
                                              ("the selection differs from the converged one",
                                               lambda f: f["sinkhorn_options_matter"]),
                                              ("some expert overflows", lambda f: f["dropped"] > 0)],
    "sinkhorn_k2_cf1_score": [("some expert overflows", lambda f: f["dropped"] > 0),
                              ("converged before 100 iterations", lambda f: f["sinkhorn_iterations"] < 100)],
    "expert_k1_cf1": [("C < T", lambda f: 0 < f["capacity"] < 128)],
    "expert_k2_cf_fraction_pad_align": [("C < T", lambda f: 0 < f["capacity"] < 100)],
    "expert_k1_min_capacity_above_tokens_pad": [("C > T", lambda f: f["capacity"] == 50)],
    "expert_causal_k2_cf_fraction": [("some expert overflows", lambda f: f["dropped"] > 0)],
    "bidirectional_k2_cf1": [("some expert overflows", lambda f: f["dropped"] > 0),
                             ("ranking by score differs from ranking by weight",
                              lambda f: f["ranking_by_score_matters"])],
    "bidirectional_k1_bias_cf_fraction": [("ranking by score differs from ranking by weight",
                                           lambda f: f["ranking_by_score_matters"])],
    "bidirectional_sigmoid_k2_cf_fraction": [("ranking by score differs from ranking by weight",
                                              lambda f: f["ranking_by_score_matters"])],
    "bidirectional_k2_capacity_is_max_demand": [("C is the largest demand",
                                                 lambda f: f["capacity"] == f["max_demand"]),
                                                ("nothing is dropped", lambda f: f["dropped"] == 0)],
    "bidirectional_causal_k2_cf_fraction": [("some expert overflows", lambda f: f["dropped"] > 0)],
}


def cli_args(c, logits_path, bias_path, out):
    a = ["--logits", logits_path, "--out", out, "--top-k", str(c["top_k"])]
    if "direction" in c:
        a += ["--direction", c["direction"]]
    if c.get("causal"):
        a += ["--causal"]
    if "sinkhorn_iterations" in c:
        a += ["--sinkhorn-iterations", str(c["sinkhorn_iterations"])]
    if "sinkhorn_tolerance" in c:
        a += ["--sinkhorn-tolerance", repr(c["sinkhorn_tolerance"])]
    if "score" in c:
        a += ["--score", c["score"]]
    if c.get("pre_softmax"):
        a += ["--pre-softmax"]
    if "scaling_factor" in c:
        a += ["--scaling-factor", repr(c["scaling_factor"])]
    if c.get("num_groups", 0) > 1:
        a += ["--num-groups", str(c["num_groups"]), "--group-topk", str(c["group_topk"])]
    if bias_path:
        a += ["--expert-bias", bias_path]
    if "capacity_factor" in c:
        a += ["--capacity-factor", repr(c["capacity_factor"])]
    if "drop" in c:
        a += ["--drop", c["drop"]]
    if c.get("pad_to_capacity"):
        a += ["--pad-to-capacity"]
    if "min_capacity" in c:
        a += ["--min-capacity", str(c["min_capacity"])]
    if "align" in c:
        a += ["--align", str(c["align"])]
    return a


def draw(T, E, dtype, opts, seed):
    """Random logits (and bias) whose reference decisions are tie-free; returns them and the reference."""
    for attempt in range(50):
        rng = np.random.default_rng([seed, attempt])
        logits = (rng.standard_normal((T, E)) * 1.5 + rng.standard_normal(E) * 0.5).astype(dtype)
        c = dict(opts)
        if "bias" in opts:
            c["bias_array"] = (rng.standard_normal(E) * 0.1).astype(np.float32 if opts["bias"] == "f4" else np.float64)
            c["bias"] = c["bias_array"].astype(np.float32).astype(np.float64)  # the tool keeps fp32 biases
        try:
            if c.get("min_capacity") == "max_demand":  # C = exactly the largest demand of this draw
                _, rmap, _, _ = propose(logits.astype(np.float32).astype(np.float64), c, {})
                c["min_capacity"] = int(rmap.sum(axis=0).max())
            return logits, c, reference(logits, c)
        except NearTie:
            continue
    raise RuntimeError("no tie-free draw found")


def compare(name, what, got, want, failures, exact=True):
    want = np.asarray(want)
    if got.shape != want.shape:
        failures.append(f"{name}: {what}: shape {got.shape}, expected {want.shape}")
        return
    if exact:
        if not np.array_equal(got, want):
            bad = np.argwhere(got != want)[:5].tolist()
            failures.append(f"{name}: {what}: differs at {bad}")
    elif not np.allclose(got, want, rtol=RTOL, atol=ATOL):
        i = np.unravel_index(np.argmax(np.abs(got - want) - RTOL * np.abs(want)), got.shape)
        failures.append(f"{name}: {what}: {got[i]!r} vs reference {want[i]!r} at {tuple(int(x) for x in i)}")


def run_case(exe, scratch, index, name, T, E, dtype, opts):
    failures = []
    logits, c, ref = draw(T, E, dtype, opts, 1000 + index)
    case_dir = os.path.join(scratch, name)
    shutil.rmtree(case_dir, ignore_errors=True)
    os.makedirs(case_dir)
    logits_path = os.path.join(case_dir, "logits.npy")
    np.save(logits_path, logits)
    bias_path = None
    if "bias_array" in c:
        bias_path = os.path.join(case_dir, "bias.npy")
        np.save(bias_path, c["bias_array"])
    out = os.path.join(case_dir, "out")
    proc = subprocess.run([exe] + cli_args(c, logits_path, bias_path, out), capture_output=True, text=True)
    if proc.returncode != 0:
        return [f"{name}: exit status {proc.returncode}: {proc.stderr.strip()}"]
    if proc.stderr:
        failures.append(f"{name}: unexpected stderr: {proc.stderr.strip()}")

    def load(f, dt):
        a = np.load(os.path.join(out, f + ".npy"))
        if a.dtype != np.dtype(dt):
            failures.append(f"{name}: {f}.npy has dtype {a.dtype}, expected {np.dtype(dt)}")
        return a

    compare(name, "probs", load("probs", np.float32).astype(np.float64), ref["probs"], failures, exact=False)
    compare(name, "routing_map", load("routing_map", np.uint8), ref["routing_map"], failures)
    for f in ("expert_counts", "expert_demand", "expert_offsets", "slot_token"):
        compare(name, f, load(f, np.int32).astype(np.int64), np.asarray(ref[f], dtype=np.int64), failures)

    with open(os.path.join(out, "stats.json")) as fh:
        text = fh.read()
    if proc.stdout != text:
        failures.append(f"{name}: stdout differs from stats.json")
    stats = json.loads(text)
    for key, want in ref["stats"].items():
        if key not in stats:
            failures.append(f"{name}: stats.json lacks '{key}'")
        elif isinstance(want, int) and not isinstance(want, bool):
            if stats[key] != want:
                failures.append(f"{name}: stats {key} = {stats[key]}, expected {want}")
        elif not math.isclose(stats[key], want, rel_tol=RTOL, abs_tol=1e-9):
            failures.append(f"{name}: stats {key} = {stats[key]!r}, expected {want!r}")
    for key, want in (("direction", opts.get("direction", "token")), ("backend_requested", "auto"),
                      ("score", opts.get("score", "softmax"))):
        if stats.get(key) != want:
            failures.append(f"{name}: stats {key} = {stats.get(key)!r}, expected {want!r}")
    for what, holds in EXPECT.get(name, []):
        if not holds(ref["facts"]):
            failures.append(f"{name}: the case is no longer informative: expected {what} ({ref['facts']})")
    if opts.get("same_as_token"):
        failures += same_as_token(exe, name, c, logits_path, bias_path, out, stats, case_dir)
    return failures


def same_as_token(exe, name, c, logits_path, bias_path, out, stats, case_dir):
    """The run with --direction token and otherwise the same options must give the same files."""
    token_out = os.path.join(case_dir, "token")
    proc = subprocess.run([exe] + cli_args(dict(c, direction="token"), logits_path, bias_path, token_out),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return [f"{name}: --direction token: exit status {proc.returncode}: {proc.stderr.strip()}"]
    failures = []
    for f in ("probs", "routing_map", "expert_counts", "expert_demand", "expert_offsets", "slot_token"):
        with open(os.path.join(out, f + ".npy"), "rb") as a, open(os.path.join(token_out, f + ".npy"), "rb") as b:
            if a.read() != b.read():
                failures.append(f"{name}: {f}.npy differs from the token route's")
    with open(os.path.join(token_out, "stats.json")) as fh:
        token_stats = json.load(fh)
    for key in sorted(set(stats) | set(token_stats)):
        if key != "direction" and stats.get(key) != token_stats.get(key):
            failures.append(f"{name}: stats {key} = {stats.get(key)!r}, the token route's {token_stats.get(key)!r}")
    return failures


def main():
    if len(sys.argv) != 3:
        print(__doc__.splitlines()[2], file=sys.stderr)
        return 2
    exe, scratch = sys.argv[1], sys.argv[2]
    os.makedirs(scratch, exist_ok=True)
    passed = failed = 0
    for i, (name, T, E, dtype, opts) in enumerate(CASES):
        failures = run_case(exe, scratch, i, name, T, E, dtype, opts)
        if failures:
            failed += 1
            print(f"FAIL {name}")
            for f in failures:
                print(f"  {f}")
        else:
            passed += 1
            print(f"ok   {name}")
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
