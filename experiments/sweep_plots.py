"""The sweep's figures, drawn from the rows `sweep_report.collect` gathered.

    from experiments import sweep_plots, sweep_report
    sweep_plots.plot(sweep_report.collect(Path("results")), Path("results"))  # -> PNG paths

dev_per_epoch.png: the Table 1 rows, the separate models and the PyTorch references,
dev per epoch. dev_per_epoch_best.png: the best-recipe rows on their own scale, against
the PyTorch reference. methods.png: each gradient combiner and loss weighting
against PAL + proportional sampling with the recipe's seed spread, and PAL +
PCGrad. train_vs_dev.png: train sample against dev, a panel per row. With several seeds
a curve is their mean, with a band of one standard deviation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from experiments.sweep_common import (
    METHOD_BASELINES,
    METHOD_SLUGS,
    SPREAD_ROW,
    TASK_LABELS,
    TASK_ORDER,
    difference_std,
    mean_std,
    pytorch_reference,
)


def row_styles(n: int) -> list[dict[str, Any]]:
    """n distinct (colour, line style, marker) for matplotlib: 20 colours (tab20), each
    with a different style once they repeat."""
    from matplotlib import colormaps

    colors = colormaps["tab20"].colors
    linestyles = ("-", "--", "-.", ":")
    markers = ("o", "s", "^", "D", "v", "P", "X", "*")
    return [{"color": colors[(i * 2) % 20 + (i // 10) % 2], "linestyle": linestyles[i % 4],
             "marker": markers[i % 8]} for i in range(n)]


def epoch_curve(r: dict, key: str) -> list[tuple[int, float, float | None]]:
    """(epoch, mean over the row's seeds, std or None) of a metric, epoch by epoch."""
    by_epoch: dict[int, list[float]] = {}
    for run in (r.get("seeds") or {0: r}).values():
        for x in run["records"]:
            if key in x:
                by_epoch.setdefault(int(x["epoch"]), []).append(float(x[key]))
    return [(e, *mean_std(v)) for e, v in sorted(by_epoch.items())]


def _band(ax, x, mean, std, color) -> None:
    """The seed spread of an epoch_curve as a band of ± one std (none for one seed)."""
    if any(sd is not None for sd in std):
        ax.fill_between(x, [m - (sd or 0) for m, sd in zip(mean, std, strict=True)],
                        [m + (sd or 0) for m, sd in zip(mean, std, strict=True)],
                        color=color, alpha=0.15, linewidth=0)


SINGLE_TASK = ("separate", "torch")  # groups of one-task rows: no dev average of their own


def _dev_figure(rows: list[dict], ran: list[dict], path: Path, title: str,
                references: dict[str, float] | None = None) -> Path:
    """One dev-per-epoch figure of `ran` (a panel per task and the average): each row its
    own colour, line style and marker, the seed spread as a band, an ensemble (from
    `rows`) as a star; `references` (task -> score) as grey horizontal lines."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = list(TASK_ORDER) + ["average"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    styles = dict(zip((r["slug"] for r in ran), row_styles(len(ran)), strict=True))
    for ax, key in zip(axes[0], panels, strict=True):
        drawn = 0
        for r in ran:
            if key == "average" and r["group"] in SINGLE_TASK:
                continue
            curve = epoch_curve(r, f"dev/{key}")
            if curve:
                x, mean, std = zip(*curve, strict=True)
                ax.plot(x, mean, label=r["name"], **styles[r["slug"]])
                _band(ax, x, mean, std, styles[r["slug"]]["color"])
                drawn += 1
        # An ensemble is one figure: a star at its row's last epoch, in the row's colour
        # (not on the average panel for a single-task row, as that row's own line).
        for r in rows:
            base = next((b for b in ran if b["slug"] == r.get("of")), None)
            value = r["best"].get(f"dev/{key}") if r["group"] == "ensemble" else None
            if value is None or base is None or (key == "average"
                                                 and base["group"] in SINGLE_TASK):
                continue
            last = max(int(x["epoch"]) for run in base["seeds"].values()
                       for x in run["records"])
            ax.scatter([last], [value], marker="*", s=160, zorder=3,
                       color=styles[base["slug"]]["color"], edgecolors="black",
                       label=r["name"])
            drawn += 1
        if references and key in references and drawn:
            ax.axhline(references[key], color="grey", linewidth=1, linestyle=(0, (1, 1)),
                       label="PyTorch reference, single-task (mean over its seeds)")
        if not drawn:
            ax.text(0.5, 0.5, "no row with all three tasks yet" if key == "average"
                    else "no row yet", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        ax.set_title(f"dev {TASK_LABELS.get(key, 'average (seed)')}")
        ax.set_xlabel("epoch")
    legend = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, h)
    handles, labels = list(legend.values()), list(legend)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(title)
    # Room below the panels for the legend: about 0.036 of the height per line of 3.
    fig.tight_layout(rect=(0, 0.05 + 0.036 * -(-len(labels) // 3), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(rows: list[dict], results: Path) -> list[Path]:
    """The figures the module docstring lists (methods.png once a method row has run):
    their paths, in the order the report shows them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ran = [r for r in rows if r["records"]]
    # The method rows but PCGrad's get methods.png: one line each would crowd this one.
    best = [r for r in ran if r["group"] == "best"
            and (r["slug"] not in METHOD_SLUGS or r["slug"] in METHOD_BASELINES)]
    written = [_dev_figure(rows, [r for r in ran if r["group"] != "best"],
                           results / "dev_per_epoch.png",
                           "Table 1 rows, separate models and PyTorch references")]
    if best:
        reference = {t: v for t, (v, _, _) in pytorch_reference(rows).items()}
        reference["average"] = sum(reference[t] for t in TASK_ORDER) / len(
            TASK_ORDER)
        written.append(_dev_figure(rows, best, results / "dev_per_epoch_best.png",
                                   "Best-recipe rows (PAL, cross pairs, mean pooling, "
                                   "warm-up 5e-5)", reference))
    if any(r["slug"] in METHOD_SLUGS and r["best"] for r in rows):
        written.append(methods_figure(rows, results / "methods.png"))

    ncols = min(4, max(len(ran), 1))
    nrows = max(1, -(-len(ran) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.6 * nrows), squeeze=False)
    colors = {"sst": "C0", "quora": "C1", "sts": "C2"}
    for i, ax in enumerate(axes.flat):
        if i >= len(ran):
            ax.axis("off")
            continue
        r = ran[i]
        for t in TASK_ORDER:
            for split, style in (("train", "--"), ("dev", "-")):
                curve = epoch_curve(r, f"{split}/{t}")
                if not curve:
                    continue
                x, mean, std = zip(*curve, strict=True)
                ax.plot(x, mean, style, marker="o", color=colors[t],
                        label=f"{TASK_LABELS[t]} {split}")
                _band(ax, x, mean, std, colors[t])
        n_seeds = len(r.get("seeds") or {0: r})
        ax.set_title(r["name"] + (f" ({n_seeds} seeds)" if n_seeds > 1 else ""), fontsize=8)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("train sample (dashed) against dev (solid) per epoch; with several seeds, "
                 "their mean and a band of ± one standard deviation")
    fig.tight_layout()
    written.append(results / "train_vs_dev.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def _method_label(slug: str, row: dict | None) -> str:
    name = slug.removeprefix("best-")
    if not row or not row["best"]:
        return f"{name} (not run)"
    return name if row.get("done") else f"{name} (unfinished)"


def methods_figure(rows: list[dict], path: Path) -> Path:
    """methods.png: a panel per task and the average; a line per combiner or loss
    weighting (`METHOD_SLUGS`), its dev score at its best epoch as a dot (with a bar
    of ± one std over its seeds where several), against PAL + proportional sampling (a
    solid line, shaded ± twice the standard deviation of a one-seed row's difference
    from it, `difference_std` of the recipe's seed spread,
    `SPREAD_ROW`: a one-seed dot outside the shading counts) and PAL + PCGrad
    (dashed). A method not run yet keeps its line, empty; an unfinished one says so,
    its dot hollow."""
    import matplotlib.pyplot as plt

    by_slug = {r["slug"]: r for r in rows}
    methods = [s for s in METHOD_SLUGS if s not in METHOD_BASELINES]
    spread = by_slug.get(SPREAD_ROW, {}).get("std", {})
    panels = list(TASK_ORDER) + ["average"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.42 * len(methods)
                                                      + 2.2), sharey=True, squeeze=False)
    y = list(range(len(methods)))[::-1]  # the first method on top
    for ax, key in zip(axes[0], panels, strict=True):
        metric = f"dev/{key}"
        prop = (by_slug.get("best-proportional", {}).get("best") or {}).get(metric)
        if prop is not None:
            ax.axvline(prop, color="C0", linewidth=1.2, label="PAL + proportional sampling")
            if metric in spread:
                half = 2 * difference_std(
                    spread[metric], 1, by_slug["best-proportional"]["n_seeds"])
                ax.axvspan(prop - half, prop + half, color="C0", alpha=0.12, linewidth=0,
                           label="± 2 std of a one-seed row's difference "
                                 f"(seeds of {SPREAD_ROW})")
        pcgrad = (by_slug.get("best-pcgrad", {}).get("best") or {}).get(metric)
        if pcgrad is not None:
            ax.axvline(pcgrad, color="C3", linewidth=1.2, linestyle="--", label="PAL + PCGrad")
        for yi, slug in zip(y, methods, strict=True):
            r = by_slug.get(slug)
            value = r["best"].get(metric) if r and r["best"] else None
            if value is not None:
                std = r["std"].get(metric)
                done = r.get("done")
                ax.errorbar([value], [yi], xerr=None if std is None else [std], fmt="o",
                            color="black", mfc="black" if done else "white", capsize=3,
                            label="method (its best epoch)" if done
                            else "unfinished method (its best epoch so far)")
        ax.set_yticks(y)
        ax.set_yticklabels([_method_label(s, by_slug.get(s)) for s in methods])
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.08)  # a dot at the edge of the range stays whole
        ax.set_ylim(-0.6, len(methods) - 0.4)
        ax.set_title(f"dev {TASK_LABELS.get(key, 'average')}")
    legend = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, h)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=4, fontsize=8)
    fig.suptitle("Combiners and loss weightings on the best recipe (PAL, additive, "
                 "cross pairs, mean pooling, 3 epochs)")
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
