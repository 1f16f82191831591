#!/usr/bin/env python3
"""Plots the CSVs etr_train writes.

usage: plot.py RESULTS_DIR PNG_DIR

For each task, every curve the mean over the seeds with their range shaded: training loss per arm
(loss_<task>.png), tokens per expert over training (tokens_<task>.png: buffer slots, i.e. capacity
with padding, and tokens kept), specialisation over training (specialisation_<task>.png:
Calinski-Harabasz index, and for the synthetic task the success rate of ETR's Definition 2), the
held-out quality at the trained capacity and at C = inf (eval_<task>.png), each layer's capacity
over training for Switch and the ETR arms (capacity_<task>.png), and the final expert
loads on the held-out set (load_<task>.png).
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


def band(ax, runs, name, scale=1.0, label=None):
    """The mean over seeds of a per-step column, with the min-max range shaded."""
    steps = column(runs[0], "step")
    n = min(len(r) for r in runs)
    values = [[scale * float(r[i][name]) for r in runs] for i in range(n)]
    mean = [sum(v) / len(v) for v in values]
    line = ax.plot(steps[:n], mean, label=label)[0]
    if len(runs) > 1:
        ax.fill_between(steps[:n], [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                        alpha=0.2, linewidth=0)


def mean_sd(values):
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return m, sd


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
        final = {}  # arm -> summary rows over seeds
        for r in summary:
            if r["task"] == task:
                final.setdefault(r["arm"], []).append(r)
        runs = {}  # arm -> per-step rows of every seed
        for arm, rows in final.items():
            for r in rows:
                path = os.path.join(results, f"{task}_{arm}_seed{r['seed']}.csv")
                if os.path.exists(path):
                    runs.setdefault(arm, []).append(read_csv(path))
        seeds = len(next(iter(final.values())))
        note = f" (mean of {seeds} seeds, range shaded)" if seeds > 1 else ""

        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        for arm, rs in runs.items():
            band(ax[0], rs, "loss", label=arm)
            band(ax[1], rs, "acc", 100.0, label=arm)
        ax[0].set(title=f"{task}: training loss{note}", xlabel="step", ylabel="cross-entropy")
        ax[1].set(title=f"{task}: training accuracy", xlabel="step", ylabel="%")
        ax[0].legend(fontsize=8)
        fig.tight_layout()
        written.append(save(fig, out, f"loss_{task}.png"))

        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        for arm, rs in runs.items():
            band(ax[0], rs, "slots_per_expert", label=arm)
            band(ax[1], rs, "tokens_per_expert", label=arm)
        ax[0].set(title=f"{task}: FFN rows per expert (padding included)", xlabel="step", ylabel="rows")
        ax[1].set(title=f"{task}: tokens kept per expert", xlabel="step", ylabel="tokens")
        ax[0].legend(fontsize=8)
        fig.tight_layout()
        written.append(save(fig, out, f"tokens_{task}.png"))

        # C of each layer over training, for the arms whose capacity moves (and Switch's for reference).
        moving = [a for a in ("switch", "etr", "etr_noloc") if a in runs]
        layers = len(runs[moving[0]][0][0]["layer_capacity"].split(";")) if moving else 0
        if layers:
            fig, ax = plt.subplots(1, layers, figsize=(5 * layers, 3.6), sharey=True, squeeze=False)
            for arm in moving:
                for rs in runs[arm]:
                    for row in rs:
                        for l, v in enumerate(row["layer_capacity"].split(";")):
                            row[f"capacity_l{l}"] = v
                for l in range(layers):
                    band(ax[0][l], runs[arm], f"capacity_l{l}", label=arm)
            for l in range(layers):
                ax[0][l].set(title=f"{task}: C of MoE layer {l + 1}", xlabel="step", ylabel="rows per expert")
            ax[0][0].legend(fontsize=8)
            fig.tight_layout()
            written.append(save(fig, out, f"capacity_{task}.png"))

        has_success = any(float(r["success"]) >= 0 for rs in runs.values() for rows in rs for r in rows)
        fig, ax = plt.subplots(1, 2 if has_success else 1, figsize=(10 if has_success else 5.5, 4))
        ch_ax = ax[0] if has_success else ax
        for arm, rs in runs.items():
            band(ch_ax, rs, "ch", label=arm)
            if has_success:
                band(ax[1], rs, "success", 100.0, label=arm)
        ch_ax.set(title=f"{task}: Calinski-Harabasz of MoE inputs by expert", xlabel="step", ylabel="CH")
        ch_ax.set_yscale("log")
        ch_ax.legend(fontsize=8)
        if has_success:
            ax[1].set(title=f"{task}: success rate (Definition 2)", xlabel="step", ylabel="%")
        fig.tight_layout()
        written.append(save(fig, out, f"specialisation_{task}.png"))

        # Held-out quality at the trained capacity and at C = inf, mean and sd over seeds.
        key = "ppl" if task == "text" else "acc"
        scale = 1.0 if task == "text" else 100.0
        arms = list(final)
        fig, ax = plt.subplots(figsize=(1.3 * len(arms) + 2, 3.5))
        for j, (col, label) in enumerate([(key, "trained C"), ("inf_" + key, "C = inf")]):
            stats = [mean_sd([scale * float(r[col]) for r in final[a]]) for a in arms]
            ax.bar([i + 0.4 * j - 0.2 for i in range(len(arms))], [m for m, _ in stats], 0.4,
                   yerr=[sd for _, sd in stats], label=label, capsize=3)
        ax.set_xticks(range(len(arms)), arms)
        ax.set(title=f"{task}: held-out {'perplexity' if task == 'text' else 'accuracy %'}",
               ylabel="perplexity" if task == "text" else "%")
        lo = min(scale * float(r[c]) for a in arms for r in final[a] for c in (key, "inf_" + key))
        ax.set_ylim(bottom=0.9 * lo)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(save(fig, out, f"eval_{task}.png"))

        # Final expert load, experts sorted by load in each seed (ids are arbitrary for learned gates).
        fig, axes = plt.subplots(1, len(arms), figsize=(2.2 * len(arms) + 1, 3), sharey=True, squeeze=False)
        for a, arm in zip(axes[0], arms):
            per_seed = [sorted((float(v) for v in r["expert_load"].split(";") if v), reverse=True)
                        for r in final[arm]]
            loads = [sum(col) / len(col) for col in zip(*per_seed)]
            a.bar(range(len(loads)), loads, color="tab:blue")
            a.set(title=arm, xlabel="expert, by load")
        axes[0][0].set_ylabel("tokens kept per layer")
        fig.suptitle(f"{task}: final expert load (held-out set)")
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
