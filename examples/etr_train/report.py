#!/usr/bin/env python3
"""Summarises the runs etr_train wrote: means over seeds and the paper's claims.

usage: report.py RESULTS_DIR [OUT.md]

Reads RESULTS_DIR/summary.csv (one row per task, arm and seed) and prints, per task, one table of every
arm's held-out measures as mean ± sample standard deviation over the seeds, then the tests of the
paper's claims against the Switch (cf 1.1) arm, seed by seed. Writes the same text to OUT.md when
given (scripts/etr.sh writes RESULTS_DIR/report.md).

Claim 1 (about 40 % fewer tokens per expert than Switch cf 1.1, at equal quality) is tested on the
FFN rows per expert, padding included (what drop-and-pad computes), averaged over training (the
verdict: at least 35 % fewer) and at the end; quality is the held-out accuracy (synthetic: not worse
than Switch's by more than 1 point) or perplexity (text: not worse by more than 2 %), at the trained
capacity; the gap at C = inf is reported beside it.
"""
import csv
import math
import os
import statistics
import sys

ACC_TOLERANCE = 1.0  # accuracy points
PPL_TOLERANCE = 2.0  # percent of Switch's perplexity
CLAIM_REDUCTION = 40.0  # percent fewer FFN rows per expert, the paper's figure


def read_summary(results):
    path = os.path.join(results, "summary.csv")
    if not os.path.exists(path):
        raise SystemExit(f"report.py: no {path}")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def mean_sd(values):
    m = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return m, sd


def cell(values, fmt="{:.2f}", scale=1.0):
    vs = [v * scale for v in values]
    m, sd = mean_sd(vs)
    return (fmt + " ± " + fmt).format(m, sd) if len(vs) > 1 else fmt.format(m)


def by_arm(rows, task):
    arms = {}
    for r in rows:
        if r["task"] == task:
            arms.setdefault(r["arm"], {})[int(r["seed"])] = r
    return arms


def column(runs, name):
    return [float(runs[s][name]) for s in sorted(runs)]


def layer_means(runs):
    """C of each layer, mean over the seeds: "64.0 / 256.0"."""
    per_seed = [[float(v) for v in runs[s]["layer_capacity"].split(";") if v] for s in sorted(runs)]
    return " / ".join(f"{statistics.fmean(layer):.1f}" for layer in zip(*per_seed))


def arm_table(task, arms, out):
    text = task == "text"
    quality = "perplexity" if text else "accuracy %"
    head = [
        "arm", "loss", quality, "C", "C per layer", "FFN rows/expert", "train FFN rows/expert", "kept/expert", "drop %",
        "padding %", "load CV", "local %", "CH",
    ]
    if not text:
        head.append("success %")
    head += [f"{quality} at C=inf", "max load at C=inf"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for arm, runs in arms.items():
        q = column(runs, "ppl") if text else column(runs, "acc")
        qi = column(runs, "inf_ppl") if text else column(runs, "inf_acc")
        scale = 1.0 if text else 100.0
        row = [
            arm,
            cell(column(runs, "loss"), "{:.4f}"),
            cell(q, "{:.2f}", scale),
            cell(column(runs, "capacity"), "{:.1f}"),
            layer_means(runs),
            cell(column(runs, "slots_per_expert"), "{:.1f}"),
            cell(column(runs, "train_slots_per_expert"), "{:.1f}"),
            cell(column(runs, "tokens_per_expert"), "{:.1f}"),
            cell(column(runs, "drop_rate"), "{:.1f}", 100.0),
            cell(column(runs, "padding"), "{:.1f}", 100.0),
            cell(column(runs, "load_cv"), "{:.3f}"),
            cell(column(runs, "local"), "{:.1f}", 100.0),
            cell(column(runs, "ch"), "{:.2f}"),
        ]
        if not text:
            row.append(cell(column(runs, "success"), "{:.1f}", 100.0))
        row += [cell(qi, "{:.2f}", scale), cell(column(runs, "inf_capacity"), "{:.1f}")]
        out.append("| " + " | ".join(row) + " |")


def quality_gap(task, arm, base, inf=False):
    """ETR minus Switch, per seed: accuracy points, or perplexity in % of Switch's (lower is better)."""
    if task == "text":
        key = "inf_ppl" if inf else "ppl"
        return [100.0 * (float(arm[s][key]) / float(base[s][key]) - 1.0) for s in sorted(base) if s in arm]
    key = "inf_acc" if inf else "acc"
    return [100.0 * (float(arm[s][key]) - float(base[s][key])) for s in sorted(base) if s in arm]


def equal_quality(task, gaps):
    m = statistics.fmean(gaps)
    # Equal: not worse than Switch by more than the tolerance (better counts as equal or better).
    return m >= -ACC_TOLERANCE if task != "text" else m <= PPL_TOLERANCE


def claims(task, arms, out, name="etr"):
    base, etr = arms.get("switch"), arms.get(name)
    if base is None or etr is None:
        return
    seeds = [s for s in sorted(base) if s in etr]
    unit = "points of accuracy" if task != "text" else "% perplexity (lower is better)"
    # Change in FFN rows per expert against Switch's, in %: -40 is the paper's claim.
    red_train = [100.0 * (float(etr[s]["train_slots_per_expert"]) / float(base[s]["train_slots_per_expert"]) - 1)
                 for s in seeds]
    red_final = [100.0 * (float(etr[s]["slots_per_expert"]) / float(base[s]["slots_per_expert"]) - 1) for s in seeds]
    gap = quality_gap(task, etr, base)
    gap_inf = quality_gap(task, etr, base, inf=True)
    out.append(f"- `{name}` against `switch` on {task}, seeds {', '.join(map(str, seeds))}:")
    out.append("  - FFN rows per expert against Switch's, training mean: "
               + ", ".join(f"{v:+.1f} %" for v in red_train) + f" (mean {statistics.fmean(red_train):+.1f} %)")
    out.append("  - FFN rows per expert against Switch's, trained C on the held-out set: "
               + ", ".join(f"{v:+.1f} %" for v in red_final) + f" (mean {statistics.fmean(red_final):+.1f} %)")
    out.append(f"  - quality gap ({unit}), trained C: " + ", ".join(f"{v:+.2f}" for v in gap)
               + f" (mean {statistics.fmean(gap):+.2f}); at C = inf: " + ", ".join(f"{v:+.2f}" for v in gap_inf)
               + f" (mean {statistics.fmean(gap_inf):+.2f})")
    fewer = statistics.fmean(red_train) <= -(CLAIM_REDUCTION - 5.0)
    same = equal_quality(task, gap)
    verdict = "holds" if fewer and same else "does not hold"
    why = []
    if not fewer:
        why.append(f"the change is {statistics.fmean(red_train):+.1f} %, not about -{CLAIM_REDUCTION:.0f} %")
    if not same:
        tol = f"{ACC_TOLERANCE} point" if task != "text" else f"{PPL_TOLERANCE} %"
        why.append(f"quality is worse than Switch's by more than {tol}")
    out.append(f"  - claim 1 (about {CLAIM_REDUCTION:.0f} % fewer tokens per expert at equal quality): **{verdict}**"
               + (" (" + "; ".join(why) + ")" if why else ""))


def ablation(task, arms, out):
    on, off = arms.get("etr"), arms.get("etr_noloc")
    if on is None or off is None:
        return
    seeds = [s for s in sorted(on) if s in off]
    q = "ppl" if task == "text" else "acc"
    scale = 1.0 if task == "text" else 100.0

    def pair(name, s=1.0, fmt="{:.2f}"):
        return cell([float(on[k][name]) for k in seeds], fmt, s) + " vs " + cell([float(off[k][name]) for k in seeds],
                                                                                fmt, s)

    out.append(f"- locality loss on `etr` (with vs without, {task}): local assignments % "
               + pair("local", 100.0, "{:.1f}") + f"; {q} " + pair(q, scale) + "; load CV "
               + pair("load_cv", 1.0, "{:.3f}") + "; train FFN rows/expert " + pair("train_slots_per_expert", 1.0,
                                                                                    "{:.1f}"))


def main(argv):
    if len(argv) not in (2, 3):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    rows = read_summary(argv[1])
    tasks = []
    for r in rows:
        if r["task"] not in tasks:
            tasks.append(r["task"])
    out = []
    for task in tasks:
        arms = by_arm(rows, task)
        seeds = sorted({int(r["seed"]) for r in rows if r["task"] == task})
        layers = rows[0]["layers"]
        out.append(f"### {task}: {len(seeds)} seeds ({', '.join(map(str, seeds))}), {layers} MoE layers, mean ± sd")
        out.append("")
        arm_table(task, arms, out)
        out.append("")
        claims(task, arms, out)
        claims(task, arms, out, "etr_noloc")
        ablation(task, arms, out)
        out.append("")
    text = "\n".join(out)
    print(text)
    if len(argv) == 3:
        with open(argv[2], "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
