#!/usr/bin/env python3
"""Plots the CSV expert_parallel writes (--out): the bytes each policy's dispatch sent across nodes.

usage: plot.py CSV [PNG]    (PNG defaults to docs/images/expert-parallel-bytes.png)

One pair of bars per policy, flat and two-level topology, each the mean over the training steps of
the bytes all ranks handed to MPI for other nodes: token rows (padding drawn apart, hatched) and the
16-byte assignment metadata of a dropless dispatch.
"""
import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_PNG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "images",
                           "expert-parallel-bytes.png")


def main(argv):
    if len(argv) not in (2, 3):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    path = argv[1]
    png = os.path.normpath(argv[2] if len(argv) == 3 else DEFAULT_PNG)
    if not os.path.exists(path):
        print(f"plot.py: no {path}", file=sys.stderr)
        return 2
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        print(f"plot.py: {path} has no rows", file=sys.stderr)
        return 2

    kib = 1024.0
    labels = [r["label"].replace(" (", "\n(").replace(", ", ",\n", 1) for r in rows]
    padding = [float(r["padding_inter_mean"]) / kib for r in rows]
    metadata = [float(r["metadata_inter_mean"]) / kib for r in rows]
    x = range(len(rows))
    width = 0.38
    fig, ax = plt.subplots(figsize=(11, 5.2), dpi=100)
    for shift, topology, colour in ((-width / 2, "flat", "tab:blue"), (width / 2, "two_level", "tab:orange")):
        total = [float(r[f"{topology}_rows_inter_mean"]) / kib for r in rows]
        # A padded dispatch sends the same C rows per expert with either topology, so the padding
        # share is the same in both bars.
        data = [t - p for t, p in zip(total, padding)]
        xs = [i + shift for i in x]
        name = "flat" if topology == "flat" else "two-level"
        ax.bar(xs, data, width, color=colour, label=f"token rows, {name}")
        ax.bar(xs, padding, width, bottom=data, color="white", edgecolor=colour, hatch="///",
               label=f"padding rows, {name}")
        ax.bar(xs, metadata, width, bottom=total, color=colour, alpha=0.35, label=f"metadata, {name}")
        for xi, top in zip(xs, (t + m for t, m in zip(total, metadata))):
            ax.text(xi, top + 1.5, f"{top:.0f}", ha="center", va="bottom", fontsize=8)
    r0 = rows[0]
    ax.set_title(
        f"Dispatch bytes crossing nodes per step (mean of {r0['steps']} training steps), measured at MPI\n"
        f"{r0['ranks']} ranks = {int(r0['ranks']) // int(r0['ranks_per_node'])} nodes x {r0['ranks_per_node']}, "
        f"{r0['experts']} experts, top-2, {r0['tokens_per_rank']} tokens per rank, {r0['row_bytes']}-byte rows",
        fontsize=10)
    ax.set_ylabel("KiB per step, all ranks")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=8)
    ax.legend(fontsize=8, ncol=2, loc="upper right")
    ax.set_ylim(0, max(float(r["flat_rows_inter_mean"]) / kib + m for r, m in zip(rows, metadata)) * 1.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(png), exist_ok=True)
    fig.savefig(png)
    print(f"plot.py: wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
