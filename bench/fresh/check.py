#!/usr/bin/python3
"""The benchmark must tell a user's truth: bench_route's bm_route on the default backend and a fresh
stand-alone program (fresh_route: route() and route_into() in a new process whose allocator nothing
has warmed) must agree on the time of one route, within a factor TOLERANCE either way. A route that
page-faulted fresh temporaries on every call (issue 15: 16.6 ms stand-alone against 3.7 ms in a
benchmark process whose earlier large frees had raised glibc's mmap threshold) fails this check.

usage: check.py BENCH_ROUTE FRESH_ROUTE [T E k]     (default 16384 256 8; standard library only)
"""

import json
import subprocess
import sys

TOLERANCE = 1.5


def run(command):
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"check.py: {' '.join(command)} exited with {proc.returncode}:\n{proc.stderr}")
    return proc.stdout


def main():
    if len(sys.argv) not in (3, 6):
        sys.exit(__doc__)
    bench, fresh = sys.argv[1], sys.argv[2]
    T, E, k = sys.argv[3:6] if len(sys.argv) == 6 else ("16384", "256", "8")
    # Two fresh processes (the lower median counts: a neighbour's burst inflates, nothing deflates).
    fresh_runs = [json.loads(run([fresh, T, E, k, "20"])) for _ in range(2)]
    backend = fresh_runs[0]["backend"]
    name = f"bm_route/{backend}/T:{T}/E:{E}/k:{k}"
    report = json.loads(run([bench, f"--benchmark_filter=^{name}(/|$)", "--benchmark_format=json",
                             "--benchmark_min_time=0.3", "--memory_mib=1"]))
    entries = [b for b in report["benchmarks"] if b.get("run_type") != "aggregate"]
    if len(entries) != 1:
        sys.exit(f"check.py: expected one benchmark named {name}, got {[b['name'] for b in entries]}")
    scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[entries[0].get("time_unit", "ns")]
    bench_ms = entries[0]["real_time"] * scale
    failures = []
    for mode in ("route", "route_into"):
        fresh_ms = min(r[f"{mode}_median_ms"] for r in fresh_runs)
        ratio = fresh_ms / bench_ms
        print(f"{mode}: fresh process {fresh_ms:.3f} ms (median of 20), bench_route {bench_ms:.3f} ms"
              f" ({name}, isa {fresh_runs[0]['isa']}): fresh / bench = {ratio:.2f}")
        if not 1 / TOLERANCE <= ratio <= TOLERANCE:
            failures.append(f"{mode}: {ratio:.2f} is outside [{1 / TOLERANCE:.2f}, {TOLERANCE:.2f}]")
    if failures:
        sys.exit("check.py: the benchmark and a fresh process disagree: " + "; ".join(failures))


if __name__ == "__main__":
    main()
