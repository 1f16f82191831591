#!/usr/bin/env python3
"""Plots the CSVs etr_train writes.

usage: plot.py RESULTS_DIR PNG_DIR

For each task: training loss per arm (loss_<task>.png), tokens per expert over training
(tokens_<task>.png: buffer slots, i.e. capacity with padding, and tokens kept), specialisation over
training (specialisation_<task>.png: Calinski-Harabasz index, and for the synthetic task the success
rate of ETR's Definition 2), and the final expert-load histograms on the held-out set
(load_<task>.png).
"""
import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DPI = 80


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def column(rows, name):
    return [float(r[name]) for r in rows]


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    results, out = argv[1], argv[2]
    summary_path = os.path.join(results, "summary.csv")
    if not os.path.exists(summary_path):
        print(f"plot.py: no {summary_path}", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    summary = read_csv(summary_path)
    tasks = []
    for r in summary:
        if r["task"] not in tasks:
            tasks.append(r["task"])
    written = []
    for task in tasks:
        arms = [r for r in summary if r["task"] == task]
        runs = {}
        for r in arms:
            path = os.path.join(results, f"{task}_{r['arm']}.csv")
            if os.path.exists(path):
                runs[r["arm"]] = read_csv(path)

        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        for arm, rows in runs.items():
            ax[0].plot(column(rows, "step"), column(rows, "loss"), label=arm)
            ax[1].plot(column(rows, "step"), [100 * a for a in column(rows, "acc")], label=arm)
        ax[0].set(title=f"{task}: training loss", xlabel="step", ylabel="cross-entropy")
        ax[1].set(title=f"{task}: training accuracy", xlabel="step", ylabel="%")
        ax[0].legend(fontsize=8)
        fig.tight_layout()
        written.append(save(fig, out, f"loss_{task}.png"))

        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        for arm, rows in runs.items():
            ax[0].plot(column(rows, "step"), column(rows, "slots_per_expert"), label=arm)
            ax[1].plot(column(rows, "step"), column(rows, "tokens_per_expert"), label=arm)
        ax[0].set(title=f"{task}: FFN rows per expert (slots, padding included)", xlabel="step", ylabel="rows")
        ax[1].set(title=f"{task}: tokens kept per expert", xlabel="step", ylabel="tokens")
        ax[0].legend(fontsize=8)
        fig.tight_layout()
        written.append(save(fig, out, f"tokens_{task}.png"))

        has_success = any(float(r["success"]) >= 0 for rows in runs.values() for r in rows)
        fig, ax = plt.subplots(1, 2 if has_success else 1, figsize=(10 if has_success else 5.5, 4))
        ch_ax = ax[0] if has_success else ax
        for arm, rows in runs.items():
            ch_ax.plot(column(rows, "step"), column(rows, "ch"), label=arm)
            if has_success:
                ax[1].plot(column(rows, "step"), [100 * s for s in column(rows, "success")], label=arm)
        ch_ax.set(title=f"{task}: Calinski-Harabasz of MoE inputs by expert", xlabel="step", ylabel="CH")
        ch_ax.set_yscale("log")
        ch_ax.legend(fontsize=8)
        if has_success:
            ax[1].set(title=f"{task}: success rate (Definition 2)", xlabel="step", ylabel="%")
        fig.tight_layout()
        written.append(save(fig, out, f"specialisation_{task}.png"))

        fig, axes = plt.subplots(1, len(arms), figsize=(2.2 * len(arms) + 1, 3), sharey=True, squeeze=False)
        for a, r in zip(axes[0], arms):
            loads = [float(v) for v in r["expert_load"].split(";") if v]
            a.bar(range(len(loads)), loads, color="tab:blue")
            a.set(title=r["arm"], xlabel="expert")
        axes[0][0].set_ylabel("tokens kept (held-out set)")
        fig.suptitle(f"{task}: final expert load")
        fig.tight_layout()
        written.append(save(fig, out, f"load_{task}.png"))
    for w in written:
        print(w)
    return 0


def save(fig, out, name):
    path = os.path.join(out, name)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main(sys.argv))
