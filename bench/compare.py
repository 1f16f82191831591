"""Compare two builds of a Google Benchmark binary (e.g. bench_route) before and after a change.

Both binaries run in the same invocation, interleaved round by round (before, after; then after, before; ...)
so that machine noise affects both alike. For every benchmark present in both, the median real_time over
the rounds is reported with the ratio after/before; rows slower by more than --threshold are flagged
REGRESSION. Output: a Markdown table on stdout (for docs/performance.md), a one-line summary at the end, and
with --json OUT the same data as JSON. Progress goes to stderr.

Example:
    /usr/bin/python3 bench/compare.py --before /tmp/base/build/dev/bench/bench_route_avx2 \\
        --after build/dev/bench/bench_route_avx2 --filter '^bm_route/.*/T:4096/' --rounds 3 \\
        --json /tmp/compare.json -- --memory_mib=64
Arguments after "--" are passed to both binaries unchanged.
Exit status: 0, or 1 with --fail-on-regression when a row regressed; 2 when a binary is missing, a run fails
or no benchmark ran.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile

MICROSECONDS = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}
DEFAULT_MIN_TIME = 0.2
DEFAULT_ROUNDS = 3
DEFAULT_THRESHOLD = 0.10
SIDES = ("before", "after")


class CompareError(Exception):
    """A failure that ends the comparison with exit status 2."""


def parse_args(argv):
    """Parse the command line; everything after the first "--" is returned as extra benchmark flags."""
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1:]
    else:
        extra = []
    parser = argparse.ArgumentParser(
        prog="compare.py",
        usage="%(prog)s --before PATH --after PATH [options] [-- BENCHMARK_FLAGS...]",
        description="Compare two builds of the same Google Benchmark binary, interleaved in one run.")
    parser.add_argument("--before", required=True, metavar="PATH", help="benchmark executable, baseline build")
    parser.add_argument("--after", required=True, metavar="PATH", help="benchmark executable, new build")
    parser.add_argument("--filter", metavar="REGEX", help="passed as --benchmark_filter")
    parser.add_argument("--min-time", type=float, default=DEFAULT_MIN_TIME, metavar="SECONDS",
                        help=f"passed as --benchmark_min_time (default {DEFAULT_MIN_TIME})")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, metavar="N",
                        help=f"runs of each binary, order alternating per round (default {DEFAULT_ROUNDS})")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, metavar="FRACTION",
                        help=f"flag rows with after/before > 1 + FRACTION (default {DEFAULT_THRESHOLD})")
    parser.add_argument("--json", metavar="OUT", help="also write the comparison as JSON to OUT")
    parser.add_argument("--fail-on-regression", action="store_true",
                        help="exit with status 1 when any row is flagged REGRESSION")
    args = parser.parse_args(argv)
    if args.min_time <= 0:
        parser.error("--min-time must be positive")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.threshold < 0:
        parser.error("--threshold must not be negative")
    args.extra = extra
    return args


def check_executable(path):
    """Raise CompareError unless path is an executable file."""
    if not os.path.isfile(path):
        raise CompareError(f"benchmark binary not found: {path}")
    if not os.access(path, os.X_OK):
        raise CompareError(f"benchmark binary is not executable: {path}")


def run_once(path, args, out_file):
    """Run one binary once; return its parsed JSON output."""
    command = [os.path.abspath(path), f"--benchmark_min_time={args.min_time:g}", "--benchmark_format=json",
               f"--benchmark_out={out_file}", "--benchmark_out_format=json"]
    if args.filter is not None:
        command.append(f"--benchmark_filter={args.filter}")
    command += args.extra
    try:
        result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    except OSError as error:
        raise CompareError(f"cannot run {path}: {error}") from error
    stderr = result.stderr.strip().splitlines()
    last = stderr[-1] if stderr else "no message"
    if result.returncode != 0:
        raise CompareError(f"{path} failed with status {result.returncode}: {last}")
    try:
        with open(out_file) as handle:
            text = handle.read()
    except OSError as error:
        raise CompareError(f"{path} wrote no JSON output: {error}") from error
    if not text.strip():  # Google Benchmark exits 0 with an empty file when the filter matches nothing
        raise CompareError(f"{path} ran no benchmarks ({last})")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise CompareError(f"{path} wrote invalid JSON: {error}") from error


def iteration_times(report):
    """Map benchmark name -> list of real_time in µs for the iteration rows; also return errored names."""
    times, errors = {}, {}
    for row in report.get("benchmarks", []):
        if row.get("run_type", "iteration") != "iteration":
            continue  # aggregates (_mean, _median, _stddev, _cv) of --benchmark_repetitions
        name = row["name"]
        if row.get("error_occurred"):
            errors[name] = row.get("error_message", "error")
            continue
        unit = row.get("time_unit", "ns")
        if unit not in MICROSECONDS:
            raise CompareError(f"unknown time_unit '{unit}' for {name}")
        times.setdefault(name, []).append(float(row["real_time"]) * MICROSECONDS[unit])
    return times, errors


def collect(args):
    """Run all rounds; return per side: {name: [per-round median µs]}, errors {name: message}, context."""
    samples = {side: {} for side in SIDES}
    errors = {side: {} for side in SIDES}
    contexts = {}
    paths = {"before": args.before, "after": args.after}
    with tempfile.TemporaryDirectory(prefix="compare-") as directory:
        for round_index in range(args.rounds):
            order = SIDES if round_index % 2 == 0 else SIDES[::-1]
            for side in order:
                print(f"round {round_index + 1}/{args.rounds}: {side} ({paths[side]})", file=sys.stderr, flush=True)
                out_file = os.path.join(directory, f"{side}-{round_index}.json")
                report = run_once(paths[side], args, out_file)
                contexts.setdefault(side, report.get("context", {}))
                times, errored = iteration_times(report)
                errors[side].update(errored)
                for name, values in times.items():
                    samples[side].setdefault(name, []).append(statistics.median(values))
    return samples, errors, contexts


def compare(samples, threshold):
    """Build the comparison rows (in the order of the before binary) and the names found on one side only."""
    before, after = samples["before"], samples["after"]
    rows = []
    for name in before:
        if name not in after:
            continue
        before_us, after_us = statistics.median(before[name]), statistics.median(after[name])
        ratio = after_us / before_us if before_us > 0 else None
        rows.append({"name": name, "before_us": before_us, "after_us": after_us, "ratio": ratio,
                     "regression": ratio is not None and ratio > 1 + threshold,
                     "before_rounds_us": before[name], "after_rounds_us": after[name]})
    only_before = [name for name in before if name not in after]
    only_after = [name for name in after if name not in before]
    return rows, only_before, only_after


def summarise(rows, threshold):
    """Row count, geometric-mean ratio, worst ratio and its row, rows over the threshold."""
    ratios = [row for row in rows if row["ratio"] is not None]
    geomean = math.exp(statistics.fmean(math.log(row["ratio"]) for row in ratios)) if ratios else None
    worst = max(ratios, key=lambda row: row["ratio"]) if ratios else None
    return {"rows": len(rows), "geomean_ratio": geomean, "worst_ratio": worst["ratio"] if worst else None,
            "worst_name": worst["name"] if worst else None, "threshold": threshold,
            "regressions": sum(row["regression"] for row in rows)}


def cell(name):
    """A benchmark name as a Markdown table cell (pipes escaped, code span)."""
    return "`" + name.replace("|", "\\|") + "`"


def format_ratio(ratio):
    return "n/a" if ratio is None else f"{ratio:.3f}"


def markdown(rows, only_before, only_after, errors, summary):
    """The Markdown report: table, one-sided rows, errored rows and the summary line."""
    percent = f"{summary['threshold'] * 100:g}"
    lines = ["| benchmark | before (µs) | after (µs) | after/before | flag |", "|---|---:|---:|---:|---|"]
    for row in rows:
        flag = "REGRESSION" if row["regression"] else ""
        lines.append(f"| {cell(row['name'])} | {row['before_us']:.3f} | {row['after_us']:.3f} | "
                     f"{format_ratio(row['ratio'])} | {flag} |")
    for title, names in (("Only in before", only_before), ("Only in after", only_after)):
        if names:
            lines += ["", f"{title} ({len(names)}):", ""] + [f"- {cell(name)}" for name in names]
    for side in SIDES:
        if errors[side]:
            lines += ["", f"Errored in {side} ({len(errors[side])}):", ""]
            lines += [f"- {cell(name)}: {message}" for name, message in errors[side].items()]
    worst = (f"worst {format_ratio(summary['worst_ratio'])} ({summary['worst_name']})"
             if summary["worst_name"] else "worst n/a")
    lines += ["", f"Summary: {summary['rows']} rows, geomean ratio {format_ratio(summary['geomean_ratio'])}, "
                  f"{worst}, {summary['regressions']} over +{percent} %"]
    return "\n".join(lines)


def context_differences(contexts):
    """Custom context keys (resonance_*, memory_mib, ...) whose values differ between the two binaries."""
    before, after = contexts.get("before", {}), contexts.get("after", {})
    keys = [key for key in sorted(set(before) | set(after))
            if key.startswith("resonance_") or key in ("memory_mib", "library_build_type")]
    return {key: [before.get(key), after.get(key)] for key in keys if before.get(key) != after.get(key)}


def main(argv):
    args = parse_args(argv)
    try:
        check_executable(args.before)
        check_executable(args.after)
        samples, errors, contexts = collect(args)
    except CompareError as error:
        print(f"compare.py: error: {error}", file=sys.stderr)
        return 2
    rows, only_before, only_after = compare(samples, args.threshold)
    summary = summarise(rows, args.threshold)
    differences = context_differences(contexts)
    for key, (before, after) in differences.items():
        print(f"compare.py: note: context {key} differs: before {before!r}, after {after!r}", file=sys.stderr)
    print(markdown(rows, only_before, only_after, errors, summary))
    if args.json:
        data = {"before": args.before, "after": args.after, "filter": args.filter, "min_time": args.min_time,
                "rounds": args.rounds, "extra_flags": args.extra, "rows": rows, "only_before": only_before,
                "only_after": only_after, "errors": errors, "context_differences": differences,
                "summary": summary}
        try:
            with open(args.json, "w") as handle:
                json.dump(data, handle, indent=2)
                handle.write("\n")
        except OSError as error:
            print(f"compare.py: error: cannot write {args.json}: {error}", file=sys.stderr)
            return 2
    return 1 if args.fail_on_regression and summary["regressions"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
