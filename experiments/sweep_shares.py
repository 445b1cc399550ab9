"""The report's section on how each combiner split the shared update, from the
statistics the trainer logs (`flaxpals.mtl.core.step_stats`).

    lines = sweep_shares.section(rows)   # markdown lines; [] when no run logged any
    sweep_shares.figure(rows, Path("results/shares.png"))   # None when no run logged shares

A run with a gradient combiner or a loss weighting writes, in each epoch line of
its metrics.jsonl, the means over the epoch's steps of coef/<task> (the
coefficients, a loss weighting's weights) and, for a gradient combiner,
share/<task> (task t's part of the shared update d along d, c_t <g_t, d> /
|d|^2: the shares sum to 1) and sum_share/<task> (the share the plain sum would
give at the same gradients). Runs from before the trainer logged them have none
and are left out. A cell shows the first epoch's mean -> the last one's; the
figure (shares.png) draws every epoch: a panel per task, a line per run, its
share solid and the sum's share at its gradients dashed.
"""

from __future__ import annotations

from pathlib import Path

from experiments.sweep_common import TASK_LABELS, TASK_ORDER
from experiments.sweep_plots import row_styles


def _trend(records: list[dict], key: str) -> str:
    values = [r[key] for r in records if key in r]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{values[0]:.2f} → {values[-1]:.2f}"


def logged_runs(rows: list[dict]) -> list[tuple[str, int, list[dict]]]:
    """(row name, seed, its epoch records) for every run that logged coefficients."""
    out = []
    for r in rows:
        for seed, run in sorted((r.get("seeds") or {}).items()):
            records = [x for x in run["records"]
                       if all(f"coef/{t}" in x for t in TASK_ORDER)]
            if records:
                out.append((r["name"] + ("" if run.get("done") else " (unfinished)"),
                            seed, records))
    return out


def section(rows: list[dict]) -> list[str]:
    runs = logged_runs(rows)
    if not runs:
        return []
    names = {t: label.split()[0] for t, label in TASK_LABELS.items()}  # "SST acc" -> SST
    head = (["Configuration", "seed"]
            + [f"{names[t]} share (the sum's)" for t in TASK_ORDER]
            + [f"{names[t]} coefficient" for t in TASK_ORDER])
    lines = []
    for name, seed, records in runs:
        shares = [f"{_trend(records, f'share/{t}')} ({_trend(records, f'sum_share/{t}')})"
                  if any(f"share/{t}" in x for x in records) else "–"
                  for t in TASK_ORDER]
        coefs = [_trend(records, f"coef/{t}") for t in TASK_ORDER]
        lines.append("| " + " | ".join([name, str(seed)] + shares + coefs) + " |")
    return ["## How the combiners split the shared update", "",
            "Epoch means over each run's steps, first epoch → last. share: the task's part "
            "of the shared update d along d, c_t <g_t, d> / |d|^2 (the three sum to 1); in "
            "brackets the share the plain sum would give at the same gradients, "
            "(G 1)_t / 1ᵀG1. coefficient: the c_t of d = Σ c_t g_t (a loss weighting's "
            "weights; it computes no shares). Only runs trained since the trainer logs these "
            "appear.", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + lines + [""]


def figure(rows: list[dict], path: Path) -> Path | None:
    """shares.png: the gradient-combiner runs' shares per epoch against the sum's."""
    runs = [(name, seed, records) for name, seed, records in logged_runs(rows)
            if all(f"share/{t}" in x for x in records for t in TASK_ORDER)]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator


    tasks = TASK_ORDER
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.8), sharey=True,
                             squeeze=False)
    styles = row_styles(len(runs))
    for ax, t in zip(axes[0], tasks, strict=True):
        for (name, seed, records), style in zip(runs, styles, strict=True):
            epochs = [int(x["epoch"]) for x in records]
            label = f"{name}, seed {seed}"
            ax.plot(epochs, [x[f"share/{t}"] for x in records], "-", marker=style["marker"],
                    color=style["color"], label=label)
            ax.plot(epochs, [x[f"sum_share/{t}"] for x in records], "--",
                    marker=style["marker"], color=style["color"], alpha=0.6,
                    label=f"the sum at its gradients ({label})")
        ax.axhline(1 / len(tasks), color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(f"{TASK_LABELS[t].split()[0]}: share of the shared update")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("c_t <g_t, d> / |d|^2 (epoch mean)")
    axes[0][-1].legend(fontsize=6, loc="best")
    fig.suptitle("Each combiner's task shares (solid) against the plain sum's at the same "
                 "gradients (dashed); dotted: 1/3", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
