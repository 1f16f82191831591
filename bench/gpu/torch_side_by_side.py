#!/usr/bin/env python3
"""PyTorch on the same GPU, for bench_gpu's route rows (bench/gpu/bench_gpu.cu).

Two rows per shape (T tokens x E experts, top-k, fp32 logits from torch.randn with a fixed seed), the same
shapes as bench_gpu's route rows:

  torch_topk_softmax  torch.topk over the experts, then a softmax over the k chosen logits (resonance's
                      default token choice: softmax after top-k, renormalised by construction). Device
                      time, as bench_gpu's `select` row.
  torch_route_plan    the same, then the deterministic plan: a stable argsort of the flattened expert ids
                      (torch.sort(stable=True)) and torch.bincount for the per-expert counts. bincount
                      waits for the device (it reads the largest id back), so this row is timed from an
                      idle stream to the end, host work included, as bench_gpu's `route` row.

Timing as bench_gpu's: CUDA events, warm-up runs, then the median and the minimum of the timed runs (100
by default, at least 50 for a figure), L2 flushed before every run unless --no-flush. The rows have
bench_gpu's row keys (name, T, E, k, d, median_us, min_us, items_per_s, gb_per_s, bytes, floor_us,
ratio_to_floor); bench/gpu/report.py puts them side by side.

Without torch, or without a CUDA device for it, one line says so and the JSON reads {"torch": "n/a"};
the exit status is 0 either way.

The JSON goes to --json PATH, or to stdout when no path is given (the table then goes to stderr).
"""

import argparse
import json
import statistics
import sys

FULL_TOKENS = [1, 128, 4096, 8192, 16384, 65536]
QUICK_TOKENS = [1, 128, 4096]
EXPERTS = [64, 256]
TOP_K = [2, 8]
SEED = 1234


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", metavar="PATH", help="write the rows here (default: stdout)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and runs (a smoke test)")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per row (default 100, --quick 10)")
    ap.add_argument("--no-flush", action="store_true", help="keep L2 warm between runs")
    args = ap.parse_args()
    if args.reps is not None and args.reps < 1:
        ap.error("--reps wants a count >= 1")
    return args


def emit(args, doc, message=None):
    """The JSON to --json or stdout; `message` (one line) to whichever stream the JSON leaves free."""
    text = json.dumps(doc, indent=2) + "\n"
    if args.json is None:
        if message:
            print(message, file=sys.stderr)
        sys.stdout.write(text)
    else:
        if message:
            print(message)
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text)


def not_available(args, reason):
    emit(args, {"benchmark": "torch_side_by_side", "torch": "n/a", "reason": reason, "rows": []},
         f"torch_side_by_side: {reason}: no torch figures (torch: n/a)")
    return 0


class Timer:
    """CUDA-event timing of one GPU, bench_gpu's two ways."""

    def __init__(self, torch, warmup, reps, flush):
        self.torch = torch
        self.warmup = warmup
        self.reps = reps
        self.start = torch.cuda.Event(enable_timing=True)
        self.stop = torch.cuda.Event(enable_timing=True)
        self.flush_buf = None
        if flush:
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            l2 = getattr(props, "L2_cache_size", 0) or (64 << 20)
            self.flush_buf = torch.empty(max(4 * l2, 32 << 20), dtype=torch.uint8, device="cuda")

    def _flush(self):
        if self.flush_buf is not None:
            self.flush_buf.fill_(0)

    def _summary(self, us):
        return statistics.median(us), min(us)

    def _time(self, fn, before):
        """Median and min of the events around fn, `before` run after each run's flush."""
        us = []
        for r in range(self.warmup + self.reps):
            self._flush()
            before()
            self.start.record()
            fn()
            self.stop.record()
            self.stop.synchronize()
            if r >= self.warmup:
                us.append(1000.0 * self.start.elapsed_time(self.stop))
        return self._summary(us)

    def device(self, fn):
        """Device time of fn's kernels: the flush and a sleep kernel hold the stream while the host
        enqueues the start event, fn and the stop event."""
        sleep = getattr(self.torch.cuda, "_sleep", None)
        # 100000 cycles: some 50 us.
        return self._time(fn, (lambda: sleep(100_000)) if sleep is not None else (lambda: None))

    def host(self, fn):
        """Time of fn from an idle stream to the end of its work, host work included."""
        return self._time(fn, self.torch.cuda.synchronize)


def row(name, T, E, k, timing):
    median_us, min_us = timing
    logit_bytes = T * E * 4
    return {
        "name": name,
        "T": T,
        "E": E,
        "k": k,
        "d": None,
        "median_us": round(median_us, 4),
        "min_us": round(min_us, 4),
        "items_per_s": T / (median_us * 1e-6),
        "gb_per_s": logit_bytes / (median_us * 1e-6) / 1e9,
        "bytes": logit_bytes,
        "floor_us": None,
        "ratio_to_floor": None,
    }


def main():
    args = parse_args()
    try:
        import torch
    except Exception as e:  # not installed, or an install that fails to load
        return not_available(args, f"torch cannot be imported ({type(e).__name__}: {e})")
    try:
        available = torch.cuda.is_available()
    except Exception:  # a driver that fails to initialise
        available = False
    if not available:
        return not_available(args, f"torch {torch.__version__} sees no CUDA device")

    quick = args.quick
    warmup = 3 if quick else 10
    reps = args.reps or (10 if quick else 100)
    tokens = QUICK_TOKENS if quick else FULL_TOKENS
    timer = Timer(torch, warmup, reps, not args.no_flush)
    table = sys.stdout if args.json is not None else sys.stderr
    device = torch.cuda.get_device_name(torch.cuda.current_device())
    print(f"torch_side_by_side: torch {torch.__version__} (CUDA {torch.version.cuda}) on {device}; "
          f"{warmup} warm-up + {reps} timed runs per row, L2 {'warm' if args.no_flush else 'flushed before each run'}",
          file=table)
    print(f"{'row':<22} {'T':>6} {'E':>4} {'k':>3} {'median_us':>11} {'min_us':>11} {'tokens/s':>12}", file=table)

    rows = []
    generator = torch.Generator(device="cuda")
    with torch.inference_mode():
        for E in EXPERTS:
            generator.manual_seed(SEED + E)
            logits_all = torch.randn(tokens[-1], E, device="cuda", dtype=torch.float32, generator=generator)
            for k in TOP_K:
                for T in tokens:
                    logits = logits_all[:T]

                    def topk_softmax(logits=logits, k=k):
                        values, ids = torch.topk(logits, k, dim=1)
                        return torch.softmax(values, dim=-1), ids

                    def route_plan(topk_softmax=topk_softmax, E=E):
                        weights, ids = topk_softmax()
                        flat = ids.flatten()
                        _, order = torch.sort(flat, stable=True)
                        counts = torch.bincount(flat, minlength=E)
                        return weights, order, counts

                    for name, timing in (("torch_topk_softmax", timer.device(topk_softmax)),
                                         ("torch_route_plan", timer.host(route_plan))):
                        r = row(name, T, E, k, timing)
                        rows.append(r)
                        print(f"{name:<22} {T:>6} {E:>4} {k:>3} {r['median_us']:>11.2f} {r['min_us']:>11.2f} "
                              f"{r['items_per_s']:>12.4g}", file=table, flush=True)

    emit(args, {
        "benchmark": "torch_side_by_side",
        "torch": torch.__version__,
        "device": device,
        "cuda_runtime": torch.version.cuda,
        "quick": quick,
        "warmup": warmup,
        "reps": reps,
        "l2_flush": not args.no_flush,
        "rows": rows,
    }, f"torch_side_by_side: wrote {args.json}" if args.json else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
