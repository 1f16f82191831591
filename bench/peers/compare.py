"""Compare resonance's routing against the PyTorch (Megatron-Core style) peer.

What it measures: for each shape (T tokens, E experts, top-k) with capacity
factor 1.25, the wall time to route precomputed float32 logits (scores, top-k,
capacity drop, dispatch plan) in torch_route.py (median of --repeats runs,
2 threads) and in bench_route's bm_peer/<name>/<backend> benchmarks (serial,
simd, tbb, tbb_simd) on the very same inputs. It also reports how close each
resonance run gets to the bandwidth floor: the T*E*4 bytes of logits must be
read at least once, at the read bandwidth bench_route measures (bm_memory_read).

Run (Debian's torch lives in /usr/bin/python3; torch is optional, numpy is not):
    /usr/bin/python3 bench/peers/compare.py --bench build/dev/bench/bench_route
    /usr/bin/python3 bench/peers/compare.py --bench build/dev/bench/bench_route --quick
    /usr/bin/python3 bench/peers/compare.py --bench NEW/bench_route_avx2 --before OLD/bench_route_avx2
Options: --out DIR keeps the inputs (DIR/*.npy, DIR/cases.txt) and writes
DIR/compare.json; --repeats N sets the torch repetitions. --before PATH also
runs an earlier build of bench_route on the same inputs, alternating with
--bench over --rounds runs each (median per row), and adds its time and the
ratio new/old to every row: a before/after comparison in one run.
Inputs go to DIR as <name>.npy plus a manifest cases.txt, one line per case:
"name T E k cf file.npy" (file relative to DIR), which bench_route reads via
--peer_inputs=DIR.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

FULL_SHAPES = [(16384, 64, 2), (16384, 256, 8), (4096, 64, 2), (65536, 64, 2), (16384, 8, 1)]
QUICK_SHAPES = [(128, 8, 2), (256, 64, 2)]
CAPACITY_FACTOR = 1.25
# The backends bench_route registers (bm_peer/<case>/<backend>), in its order; "tbb" is tbb<>, i.e.
# backend::cpu, the default (threads over backend::native's runtime-dispatched rows).
BACKENDS = ["serial", "simd", "native", "tbb", "tbb_serial", "tbb_simd"]
DEFAULT_BACKEND = "tbb"
# The issue-15 goals: the default backend within this multiple of the read floor.
FLOOR_GOALS = {(16384, 256, 8): 2.0, (16384, 64, 2): 2.5}
SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def fail(message):
    sys.exit(f"compare.py: error: {message}")


def write_inputs(directory, shapes, cf):
    """Write one standard-normal float32 .npy per shape and the cases.txt manifest."""
    rng = np.random.default_rng(12345)
    cases = []
    with open(os.path.join(directory, "cases.txt"), "w") as manifest:
        for tokens, experts, k in shapes:
            name = f"T{tokens}_E{experts}_k{k}"
            logits = rng.standard_normal((tokens, experts), dtype=np.float32)
            np.save(os.path.join(directory, name + ".npy"), logits)
            manifest.write(f"{name} {tokens} {experts} {k} {cf} {name}.npy\n")
            cases.append({"name": name, "T": tokens, "E": experts, "k": k, "cf": cf, "logits": logits})
    return cases


def run_torch(cases, repeats):
    """Time torch_route on every case; None per case if torch is unavailable."""
    try:
        import torch
        import torch_route
    except ImportError as error:
        print(f"note: torch not available ({error}); skipping the torch peer", file=sys.stderr)
        return {}
    results = {}
    for case in cases:
        tokens, experts, k, cf = case["T"], case["E"], case["k"], case["cf"]
        logits = case["logits"]
        # Sanity: every expert keeps min(demand, C) tokens, demand from a numpy top-k.
        _, _, _, counts = torch_route.route(torch.from_numpy(logits), k, cf, return_counts=True)
        top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
        demand = np.bincount(top.ravel(), minlength=experts)
        expected = np.minimum(demand, torch_route.capacity(tokens, experts, k, cf))
        if not np.array_equal(counts.numpy(), expected):
            fail(f"torch kept counts differ from min(demand, C) for {case['name']}")
        median, best = torch_route.time_case(logits, k, cf, repeats)
        results[case["name"]] = {"median_s": median, "min_s": best}
        print(f"torch {case['name']}: median {median * 1e3:.3f} ms, min {best * 1e3:.3f} ms", file=sys.stderr)
    return results


def run_bench(bench, directory, min_time):
    """Run bench_route; return ({(name, backend): s}, read B/s, memcpy B/s, JSON context)."""
    command = [bench, f"--peer_inputs={directory}", "--benchmark_format=json",
               "--benchmark_filter=bm_peer|bm_memory|bm_memcpy", f"--benchmark_min_time={min_time}"]
    print("running: " + " ".join(command), file=sys.stderr)
    try:
        proc = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
        fail(f"cannot run {bench}: {error}")
    if proc.returncode != 0:
        fail(f"{bench} exited with {proc.returncode}:\n{proc.stderr}")
    try:
        report = json.loads(proc.stdout)
        entries, context = report["benchmarks"], report.get("context", {})
    except (ValueError, KeyError) as error:
        fail(f"cannot parse the JSON of {bench}: {error}")
    times, bandwidth = {}, {}
    for entry in entries:
        if entry.get("run_type") == "aggregate":
            continue
        if entry.get("error_occurred"):
            fail(f"{entry['name']} failed: {entry.get('error_message', '?')}")
        parts = entry["name"].split("/")
        if parts[0] == "bm_peer" and len(parts) >= 3:
            times[(parts[1], parts[2])] = entry["real_time"] * SECONDS[entry.get("time_unit", "ns")]
        elif parts[0] in ("bm_memory_read", "bm_memcpy") and "bytes_per_second" in entry:
            # Several sizes may be measured: keep the best, the strictest floor.
            bandwidth[parts[0]] = max(bandwidth.get(parts[0], 0.0), entry["bytes_per_second"])
    for key in ("bm_memory_read", "bm_memcpy"):
        if key not in bandwidth:
            fail(f"{key} (with bytes_per_second) missing from the JSON of {bench}")
    return times, bandwidth["bm_memory_read"], bandwidth["bm_memcpy"], context


def median_times(runs):
    """Per (case, backend): the median of the runs' times."""
    out = {}
    for key in runs[0]:
        values = sorted(run[key] for run in runs if key in run)
        middle = len(values) // 2
        out[key] = values[middle] if len(values) % 2 else 0.5 * (values[middle - 1] + values[middle])
    return out


def machine():
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"nproc": threads, "cpu": cpu}


def fmt(value, digits=3):
    return "n/a" if value is None else f"{value:.{digits}f}"


def main():
    parser = argparse.ArgumentParser(description="Compare resonance with the PyTorch peer.")
    parser.add_argument("--bench", required=True, help="path to the bench_route binary")
    parser.add_argument("--quick", action="store_true", help="two tiny shapes, short runs")
    parser.add_argument("--out", help="keep the inputs here and write compare.json")
    parser.add_argument("--repeats", type=int, help="torch repetitions (default 10, quick 3)")
    parser.add_argument("--before", help="an earlier bench_route build to compare with, on the same inputs")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each binary with --before (default 2)")
    args = parser.parse_args()
    if args.rounds < 1:
        fail("--rounds: expected a value >= 1")
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    repeats = args.repeats or (3 if args.quick else 10)

    temp = None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        directory = args.out
    else:
        temp = tempfile.TemporaryDirectory(prefix="resonance_peers_")
        directory = temp.name
    cases = write_inputs(directory, shapes, CAPACITY_FACTOR)
    torch_times = run_torch(cases, repeats)
    min_time = 0.01 if args.quick else 0.2
    if args.before:
        # Alternate the two builds (new, old; then old, new; ...) so that drifting machine load hits both.
        runs = {"new": [], "old": []}
        for r in range(args.rounds):
            order = [("new", args.bench), ("old", args.before)]
            for label, path in order if r % 2 == 0 else reversed(order):
                runs[label].append(run_bench(os.path.abspath(path), os.path.abspath(directory), min_time))
        times = median_times([run[0] for run in runs["new"]])
        before_times = median_times([run[0] for run in runs["old"]])
        _, read_bw, memcpy_bw, context = runs["new"][-1]
    else:
        times, read_bw, memcpy_bw, context = run_bench(os.path.abspath(args.bench), os.path.abspath(directory),
                                                       min_time)
        before_times = {}

    rows = []
    for case in cases:
        floor_s = case["T"] * case["E"] * 4 / read_bw
        torch_s = torch_times.get(case["name"], {}).get("median_s")
        torch_min = torch_times.get(case["name"], {}).get("min_s")
        for backend in BACKENDS:
            if (case["name"], backend) not in times:
                if backend in ("serial", DEFAULT_BACKEND):
                    fail(f"bm_peer/{case['name']}/{backend} missing from the bench_route JSON")
                continue  # a backend this build lacks (simd, tbb_simd without xsimd)
            ours = times[(case["name"], backend)]
            # An earlier build may lack a backend added since (native, tbb_serial): its columns read n/a.
            before = before_times.get((case["name"], backend))
            rows.append({"case": case["name"], "backend": backend,
                         "before_ms": None if before is None else before * 1e3,
                         "after_over_before": None if before is None else ours / before,
                         "torch_ms": None if torch_s is None else torch_s * 1e3,
                         "torch_min_ms": None if torch_min is None else torch_min * 1e3,
                         "resonance_ms": ours * 1e3,
                         "ratio": None if torch_s is None else torch_s / ours,
                         "floor_fraction": floor_s / ours})

    info = machine()
    print(f"\nmachine: {info['cpu']}, nproc {info['nproc']}; torch {'on' if torch_times else 'off'}"
          f" ({repeats} repeats, 2 threads), cf {CAPACITY_FACTOR}")
    print(f"bench_route: backends {context.get('resonance_backends', '?')}, tbb threads"
          f" {context.get('resonance_tbb_threads', '?')}, simd {context.get('resonance_simd_arch', '?')}")
    print(f"read bandwidth {read_bw / 1e9:.2f} GB/s, memcpy bandwidth {memcpy_bw / 1e9:.2f} GB/s"
          " (one thread; memcpy counts bytes read + written)\n")
    if args.before:
        print("| shape | backend | torch ms (median) | before ms | resonance ms | after / before | torch / resonance"
              " | fraction of bandwidth floor |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for row in rows:
            print(f"| {row['case']} | {row['backend']} | {fmt(row['torch_ms'])} | {fmt(row['before_ms'])}"
                  f" | {fmt(row['resonance_ms'])} | {fmt(row['after_over_before'], 3)} | {fmt(row['ratio'], 2)}"
                  f" | {fmt(row['floor_fraction'], 3)} |")
    else:
        print("| shape | backend | torch ms (median) | resonance ms | torch / resonance | fraction of bandwidth floor |")
        print("|---|---|---:|---:|---:|---:|")
        for row in rows:
            print(f"| {row['case']} | {row['backend']} | {fmt(row['torch_ms'])} | {fmt(row['resonance_ms'])}"
                  f" | {fmt(row['ratio'], 2)} | {fmt(row['floor_fraction'], 3)} |")
    print(f"\nThe default backend ({DEFAULT_BACKEND}<> = backend::cpu) against the read floor"
          " (T*E*4 bytes at the one-thread read bandwidth):\n")
    print("| shape | default ms | floor ms | default / floor | goal | met |")
    print("|---|---:|---:|---:|---:|---|")
    for case in cases:
        row = next(r for r in rows if r["case"] == case["name"] and r["backend"] == DEFAULT_BACKEND)
        floor_ms = case["T"] * case["E"] * 4 / read_bw * 1e3
        multiple = row["resonance_ms"] / floor_ms
        goal = FLOOR_GOALS.get((case["T"], case["E"], case["k"]))
        print(f"| {case['name']} | {fmt(row['resonance_ms'])} | {fmt(floor_ms)} | {fmt(multiple, 2)}x"
              f" | {'n/a' if goal is None else f'{goal:g}x'} | {'' if goal is None else ('yes' if multiple <= goal else 'no')} |")
    if args.out:
        report = {"machine": info, "bench_context": context,
                  "read_bandwidth_Bps": read_bw, "memcpy_bandwidth_Bps": memcpy_bw,
                  "capacity_factor": CAPACITY_FACTOR, "torch_repeats": repeats, "rows": rows}
        with open(os.path.join(args.out, "compare.json"), "w") as out:
            json.dump(report, out, indent=2)
    if temp:
        temp.cleanup()


if __name__ == "__main__":
    main()
