#!/usr/bin/env python3
"""Markdown tables from bench_gpu's JSON and, optionally, torch_side_by_side.py's.

    python3 bench/gpu/report.py build/gpu/bench_gpu.json [--torch build/gpu/torch.json]

Tables (every time in microseconds, the median of the timed runs):
  selection      resonance `select` (device time) against torch topk + softmax (device time)
  route + plan   resonance `route` (router::route, host-synchronous) against torch topk + softmax + stable
                 sort + bincount (host-synchronous: bincount waits for the device)
  device time    resonance `route_graph` (route_into replayed as a CUDA graph)
  other rows     plan_build, plan_graph, dispatch, combine, read_floor, memcpy_d2d
and the issue's targets, each PASS or FAIL (or "not measured" when its row is missing). The HBM floor is
bench_gpu's `read_floor` row for the same T and E: one read of the T x E fp32 logits.
"""

import argparse
import json
import sys

# (label, bench_gpu row, shapes (T, E, k) whose worst median counts, target in us)
TARGETS = [
    ("fused route (selection), T=16384 E=256 k=8", "select", [(16384, 256, 8)], 8.0),
    ("route + plan, T=8192 E=256 k=8 (CUDA graph)", "route_graph", [(8192, 256, 8)], 15.0),
    ("decode, T <= 128 E=256 k=8 (selection)", "select", [(1, 256, 8), (128, 256, 8)], 3.0),
]


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def index_rows(doc):
    """{(name, T, E, k): row} of a bench_gpu or torch JSON (dispatch rows keyed with their d too)."""
    out = {}
    for r in doc.get("rows", []):
        key = (r["name"], r["T"], r["E"], r.get("k"))
        if r.get("d") is not None:
            key += (r["d"],)
        out[key] = r
    return out


def us(v):
    return "n/a" if v is None else f"{v:.2f}"


def ratio(a, b):
    return "n/a" if a is None or b is None or b <= 0 else f"{a / b:.2f}"


def median_of(rows, name, T, E, k):
    r = rows.get((name, T, E, k))
    return None if r is None else r["median_us"]


def table(headers, lines):
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return "\n".join(out)


def shapes_of(rows, name):
    return sorted({(k[2], k[3], k[1]) for k in rows if k[0] == name})  # by E, k, then T


def comparison(rows, torch_rows, ours, theirs):
    lines = []
    for E, k, T in shapes_of(rows, ours):
        mine = median_of(rows, ours, T, E, k)
        other = median_of(torch_rows, theirs, T, E, k)
        floor = median_of(rows, "read_floor", T, E, None)
        lines.append([f"T={T} E={E} k={k}", us(mine), us(other), ratio(other, mine), us(floor), ratio(mine, floor)])
    return table(["shape", "resonance median µs", "torch median µs", "torch/resonance", "HBM floor µs",
                  "resonance/floor"], lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bench_json", help="bench_gpu --json output")
    ap.add_argument("--torch", metavar="PATH", help="torch_side_by_side.py --json output")
    args = ap.parse_args()

    bench = load(args.bench_json)
    rows = index_rows(bench)
    torch_doc = load(args.torch) if args.torch else {"torch": "n/a", "rows": []}
    torch_rows = index_rows(torch_doc)
    torch_version = torch_doc.get("torch", "n/a")

    flush = "L2 flushed before each run" if bench.get("l2_flush", True) else "L2 warm"
    print(f"## GPU (backend::cuda): {bench.get('device', 'unknown device')}\n")
    print(f"resonance {bench.get('resonance_version', '?')}, CUDA runtime {bench.get('cuda_runtime', '?')} "
          f"(driver {bench.get('cuda_driver', '?')}), torch {torch_version}"
          + (f" on {torch_doc['device']}" if torch_doc.get("device") else "")
          + f"; median of {bench.get('reps', '?')} timed runs after {bench.get('warmup', '?')} warm-up runs, "
          f"{flush}." + (" Quick run (--quick)." if bench.get("quick") else ""))
    if torch_doc.get("device") and bench.get("device") and torch_doc["device"] != bench["device"]:
        print(f"\n**Warning:** torch ran on {torch_doc['device']}, bench_gpu on {bench['device']}.")

    print("\n### Selection: resonance `select` vs torch topk + softmax (device time)\n")
    print(comparison(rows, torch_rows, "select", "torch_topk_softmax"))

    print("\n### Route + plan: resonance `route` vs torch topk + softmax + stable sort + bincount "
          "(host-synchronous, end to end)\n")
    print(comparison(rows, torch_rows, "route", "torch_route_plan"))

    print("\n### Route + plan as a CUDA graph: resonance `route_graph` (device time)\n")
    lines = []
    for E, k, T in shapes_of(rows, "route_graph"):
        graph = median_of(rows, "route_graph", T, E, k)
        floor = median_of(rows, "read_floor", T, E, None)
        lines.append([f"T={T} E={E} k={k}", us(graph), us(median_of(rows, "route", T, E, k)), us(floor),
                      ratio(graph, floor)])
    print(table(["shape", "route_graph median µs", "route median µs", "HBM floor µs", "route_graph/floor"], lines))

    print("\n### Other rows\n")
    lines = []
    for r in bench.get("rows", []):
        if r["name"] in ("route", "route_graph", "select"):
            continue
        shape = f"T={r['T']} E={r['E']}" + (f" k={r['k']}" if r.get("k") is not None else "")
        if r.get("d") is not None:
            shape += f" d={r['d']} bf16"
        lines.append([r["name"], shape, us(r["median_us"]), us(r["min_us"]), f"{r['gb_per_s']:.1f}"])
    print(table(["row", "shape", "median µs", "min µs", "GB/s"], lines))

    print("\n### Targets (issue 13)\n")
    lines = []
    for label, name, shapes, target in TARGETS:
        found = [median_of(rows, name, T, E, k) for T, E, k in shapes]
        if any(v is None for v in found):
            measured, result = None, "not measured"
        else:
            measured = max(found)
            result = "PASS" if measured <= target else "FAIL"
        lines.append([label, f"`{name}`", us(measured), f"≤ {target:g}", result])
    print(table(["target", "row", "measured µs", "target µs", "result"], lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
