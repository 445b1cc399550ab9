"""The sweep's report: each row's seeds collected, the table, the references (the
figures: `sweep_plots`).

    from experiments import sweep_report
    sweep_report.report(Path("results"), "cpu")   # RESULTS.md, results.json, the PNGs

`python -m experiments.sweep` calls `report` after its rows (or alone, with
--report-only). Every figure comes from the rows' workdirs: `metrics.jsonl`
(epoch records), `config.json`, `params.json` and the sweep's own `sweep.json`.
A row's seeds are aggregated by `aggregate`: each metric at each seed's best
epoch (by the run's `eval.best_metric`), then the mean and sample standard
deviation over the seeds.
"""

from __future__ import annotations

import datetime
import json
import shlex
from pathlib import Path
from typing import Any

from experiments import sweep_ensemble, sweep_plots, sweep_shares
from experiments.sweep_common import (
    BUDGETS,
    CONFIGS,
    METHOD_BASELINES,
    METHOD_SLUGS,
    ROWS,
    SPREAD_ROW,
    TASK_LABELS,
    TASK_ORDER,
    difference_std,
    is_done,
    mean_std,
    pytorch_reference,
    seed_workdir,
)
from flaxpals import config_lib, workdir_format


def best_record(records: list[dict], key: str = "dev/average") -> dict | None:
    scored = [r for r in records if key in r]
    return max(scored, key=lambda r: r[key]) if scored else None


def _task_metric(name: str) -> str:
    from flaxpals.data import tasks

    return tasks.get_task(name).metric


def _seeds_run(results: Path, slug: str) -> list[int]:
    seeds = [0] if (results / slug).is_dir() else []
    for path in results.glob(f"{slug}-seed*"):
        suffix = path.name[len(slug) + len("-seed"):]
        if suffix.isdigit() and path.is_dir():
            seeds.append(int(suffix))
    return sorted(seeds)


def _one_run(workdir: Path) -> dict:
    """One seed's workdir: its epoch records, the best one, parameters, time, command."""
    records = workdir_format.read_metrics(workdir)
    row_record = json.loads((workdir / "sweep.json").read_text()) \
        if (workdir / "sweep.json").exists() else {}
    params = json.loads((workdir / "params.json").read_text()) \
        if (workdir / "params.json").exists() else None
    config = json.loads((workdir / "config.json").read_text()) \
        if (workdir / "config.json").exists() else {}
    torch = config.get("framework") == "pytorch"  # experiments.torch_finetune's config
    num_epochs = config.get("epochs") if torch else config.get("train", {}).get("num_epochs")
    # The epoch the run itself chose (eval.best_metric: dev, or the validation split).
    key = config.get("eval", {}).get("best_metric", "dev/average")
    if "_ema/" in key:  # the run keeps (and is scored by) its EMA weights' figures
        records = [{**x, **{s.replace("_ema/", "/"): v for s, v in x.items() if "_ema/" in s}}
                   for x in records]
        key = key.replace("_ema/", "/")
    return {"records": records, "best": best_record(records, key), "best_metric": key,
            "params": params,
            "param_ratio": params["ratio_by_key"].get("adapters", 1.0) if params else None,
            "seconds": row_record.get("seconds"), "runs": row_record.get("runs", []),
            "budget": row_record.get("budget"), "command": row_record.get("command"),
            "num_epochs": num_epochs,
            # configs written before the field existed evaluated the file's head
            "train_sample_from": ("random" if torch else
                                  config.get("eval", {}).get("train_sample_from", "head")
                                  if config else None),
            "done": bool(num_epochs) and is_done(workdir, num_epochs)}


def aggregate(seeds: dict[int, dict]) -> dict[str, Any]:
    """A row's figures over its seeds: each metric's mean (`best`) and std (`std`) over
    the seeds' best epochs (train figures over the seeds of one sample kind,
    `train_sample_from`); the time summed; done when every seed is."""
    scored = {s: r for s, r in seeds.items() if r["best"]}
    # A train figure means one thing only over one way of drawing the sample: where seeds
    # differ (seeds added after eval.train_sample_from existed), the random samples count.
    kinds = {r["train_sample_from"] for r in (scored or seeds).values()}
    sample_from = next((k for k in config_lib.TRAIN_SAMPLES if k in kinds), None)
    best, std = None, {}
    if scored:
        keys = set.intersection(*(set(r["best"]) for r in scored.values()))
        best = {}
        for k in sorted(keys):
            values = [r["best"][k] for r in scored.values()
                      if not k.startswith("train/") or r["train_sample_from"] == sample_from]
            # Metrics only: a mean step or epoch names no checkpoint (`best_epochs` lists them).
            if all(isinstance(v, (int, float)) for v in values) and k not in ("step", "epoch"):
                best[k], sd = mean_std([float(v) for v in values])
                if sd is not None:
                    std[k] = sd
    first = seeds[min(seeds)] if seeds else {}
    return {"seeds": seeds, "n_seeds": len(scored), "best": best, "std": std,
            "records": first.get("records", []), "params": first.get("params"),
            "param_ratio": first.get("param_ratio"),
            "seconds": sum(r["seconds"] or 0 for r in seeds.values()) or None,
            "runs": [run for r in seeds.values() for run in r["runs"]],
            "budget": first.get("budget"), "command": first.get("command"),
            "commands": {s: r["command"] for s, r in seeds.items() if r["command"]},
            "num_epochs": first.get("num_epochs"),
            "best_epochs": [int(r["best"]["epoch"]) for r in scored.values()
                            if "epoch" in r["best"]],
            "train_sample_from": sample_from,
            "done": bool(seeds) and all(r["done"] for r in seeds.values())}


def collect(results: Path) -> list[dict]:
    """Everything the report needs, one dict per row of ROWS (run or not), its seeds
    aggregated (`aggregate`)."""
    out = []
    for row in ROWS:
        seeds = {s: _one_run(seed_workdir(results, row.slug, s))
                 for s in _seeds_run(results, row.slug)}
        out.append({"slug": row.slug, "name": row.name, "group": row.group,
                    **aggregate(seeds)})
    # Ensembles of a row's seeds (experiments.sweep --ensemble), after every row.
    out += [e for e in (sweep_ensemble.collect(results, row) for row in ROWS) if e]
    return out


COMBINED_NAMES = {"separate": "Separate models", "torch": "PyTorch reference models"}


def combined_separate(rows: list[dict], group: str = "separate") -> dict | None:
    """A group of single-task rows (flaxpals' separate models, or the PyTorch reference)
    as one row: each task from its own model (best epoch)."""
    from flaxpals.data import metrics

    sep = [r for r in rows if r["group"] == group and r["best"]]
    if not sep:
        return None
    best, std = {}, {}
    for r in sep:
        for k, v in r["best"].items():
            if k.startswith(("dev/", "train/")) and k.split("/")[1] in TASK_ORDER:
                best[k] = v
                if k in r.get("std", {}):
                    std[k] = r["std"][k]
    for split in ("dev", "train"):
        scores = {k.split("/")[1]: v for k, v in best.items() if k.startswith(split + "/")}
        best.update({f"{split}/{k}": v for k, v in metrics.summary(
            scores, {t: _task_metric(t) for t in scores}).items()})
    ratios = [r["param_ratio"] for r in sep if r["param_ratio"] is not None]
    return {"name": f"{COMBINED_NAMES[group]} ({len(sep)} of 3 tasks, each its best epoch)",
            "group": f"{group}-combined",
            "best": best, "std": std, "param_ratio": sum(ratios) if ratios else None,
            "n_seeds": min(r.get("n_seeds", 1) for r in sep),
            "seconds": sum(r["seconds"] or 0 for r in sep), "epoch": "-",
            "done": all(r.get("done") for r in sep),
            # each task's train figure is its own model's: marked only where that one's is
            "head_tasks": [k.split("/")[1] for r in sep if r.get("train_sample_from") == "head"
                           for k in r["best"] if k.startswith("train/")]}


def _fmt(v, digits=3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _hms(seconds) -> str:
    if not seconds:
        return "–"
    m = int(round(seconds / 60))
    return f"{m // 60}:{m % 60:02d}"


HEAD_MARK = "ʰ"  # a train figure from the file's first rows (eval.train_sample_from=head)
HEAD_NOTE = (f"{HEAD_MARK} train = the file's first `eval.train_sample` rows, not a random "
             "sample: the row ran before the sample was drawn at random "
             "(`eval.train_sample_from=head`). SST's train file is sorted by label, its first "
             "1,000 rows 80% classes 3 and 4 against 42% in the whole file, so those SST train "
             "figures (and their dashed lines in train_vs_dev.png) do not stand for the training "
             "set; the Quora and STS heads match their "
             "files' label mix. Dev figures are unaffected.")


def _cell(r: dict, key: str) -> str:
    """A metric at the row's best epoch: the mean over seeds, ± their std when several."""
    v = r["best"].get(key)
    sd = r.get("std", {}).get(key)
    return _fmt(v) if sd is None or v is None else f"{v:.3f} ± {sd:.3f}"


def table(rows: list[dict]) -> str:
    cols = [f"{TASK_LABELS[t]} {s}" for t in TASK_ORDER for s in ("train", "dev")]
    head = (["Configuration"] + cols + ["dev average (seed)", "dev overall (CS224N)",
                                         "params / encoder", "best epoch", "wall h:mm",
                                         "seeds"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = [r for r in rows if r["group"] in ("table1", "separate")]
    order += [c for c in [combined_separate(rows)] if c]
    order += [r for r in rows if r["group"] == "torch"]
    order += [c for c in [combined_separate(rows, "torch")] if c]
    order += [r for r in rows if r["group"] in ("best", "ensemble")]
    for r in order:
        b = r["best"]
        if not b:
            # A workdir without an epoch record: running, or stopped before its first epoch.
            state = "started, no epoch yet" if r.get("seeds") else "not run yet"
            lines.append("| " + " | ".join([r["name"], state] + [""] * (len(head) - 2))
                         + " |")
            continue
        headed = r.get("head_tasks", TASK_ORDER if r.get("train_sample_from") == "head"
                       else ())
        cells = [_cell(r, f"{s}/{t}") + (HEAD_MARK if s == "train" and t in headed
                                         and f"{s}/{t}" in b else "")
                 for t in TASK_ORDER for s in ("train", "dev")]
        # The averages are over the three tasks: left empty for a row with fewer.
        full = all(f"dev/{t}" in b for t in TASK_ORDER)
        chosen = r.get("best_epochs") or [b.get("epoch")]
        epochs = r.get("epoch") or (f"{','.join(str(e) for e in chosen)} of "
                                    f"{r.get('num_epochs')}")
        if not r.get("done"):
            epochs += " (unfinished)"
        ratio = f"{r['param_ratio']:.3f}×" if r["param_ratio"] is not None else "–"
        lines.append("| " + " | ".join(
            [r["name"]] + cells + [_cell(r, "dev/average") if full else "–",
                                   _cell(r, "dev/overall") if full else "–", ratio,
                                   str(epochs), _hms(r["seconds"]),
                                   str(r.get("n_seeds", 1))]) + " |")
    return "\n".join(lines)


def _pm(value: float, std: float | None) -> str:
    return f"{value:.3f}" if std is None else f"{value:.3f} ± {std:.3f}"


def calibration(rows: list[dict]) -> list[str]:
    """The separate models against the same recipe in PyTorch (`pytorch_reference`)."""
    reference = pytorch_reference(rows)
    out = []
    for r in rows:
        if r["group"] != "separate" or not r["best"]:
            continue
        task = r["slug"].split("-", 1)[1]
        ours = r["best"].get(f"dev/{task}")
        if ours is not None and task in reference:
            ref, ref_std, source = reference[task]
            out.append(f"| {TASK_LABELS[task]} | {_cell(r, f'dev/{task}')} | "
                       f"{_pm(ref, ref_std)} ({source}) | {100 * (ours - ref):+.1f} |")
    if not out:
        return []
    return (["## Calibration: separate models against PyTorch", "",
             "The same single-task recipe in PyTorch + transformers on these files, best "
             "epoch of 3: the `torch-*` rows of this sweep where run (mean ± std over their "
             "seeds), else the fixed one-seed figures of docs/experiments.md. Only "
             "meaningful for the `cpu` budget.", "",
             "| task (dev) | flaxpals | PyTorch (source) | difference (points) |",
             "|---|---|---|---|"] + out + [""])


def against_references(rows: list[dict]) -> list[str]:
    """Each three-task row's dev scores against PyTorch and against the separate models.

    The two questions the experiments ask of one encoder: does it reach or beat the
    single-task PyTorch figures on every task, and on how many tasks is it within one
    point (or better) of flaxpals' own separate models.
    """
    combined = combined_separate(rows)
    sep = combined["best"] if combined else {}
    reference = {t: v[0] for t, v in pytorch_reference(rows).items()}
    head = ["Configuration"] + [f"{TASK_LABELS[t]}: dev, vs PyTorch, vs separate"
                                for t in TASK_ORDER] + [
        "reaches PyTorch on", "within 1 pt of separate on"]
    out = []
    for r in rows:
        b = r["best"]
        if (r["group"] in ("separate", "torch") or not b
                or not all(f"dev/{t}" in b for t in TASK_ORDER)):
            continue
        cells, reached, close = [], 0, 0
        for t in TASK_ORDER:
            ours = b[f"dev/{t}"]
            ref, own = reference.get(t), sep.get(f"dev/{t}")
            vs_ref = "–" if ref is None else f"{100 * (ours - ref):+.1f}"
            vs_own = "–" if own is None else f"{100 * (ours - own):+.1f}"
            # Compared at the printed precision: .489 against .489 reaches it.
            reached += ref is not None and round(ours, 3) >= ref
            close += own is not None and round(100 * (ours - own), 1) >= -1.0
            cells.append(f"{ours:.3f}, {vs_ref}, {vs_own}")
        unfinished = "" if r.get("done") else " (unfinished)"
        out.append("| " + " | ".join([r["name"] + unfinished] + cells + [
            f"{reached} of 3", f"{close} of 3" if sep else "–"]) + " |")
    if not out:
        return []
    return (["## Multi-task rows against the references", "",
             "Dev scores at each row's best epoch; differences in points against the "
             "single-task PyTorch reference (as in the calibration above) and against "
             "flaxpals' separate models above (each task's own model).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + out + [""])




def against_baselines(rows: list[dict]) -> list[str]:
    """The `best-<method>` rows against PAL + PCGrad and PAL + proportional sampling."""
    by_slug = {r["slug"]: r for r in rows}
    methods = [r for r in rows if r["slug"] in METHOD_SLUGS and r["best"]
               and all(f"dev/{t}" in r["best"] for t in TASK_ORDER)]
    if not methods:
        return []
    spread_row = by_slug.get(SPREAD_ROW, {})
    spread = spread_row.get("std", {})
    bases = {slug: by_slug[slug] for slug in METHOD_BASELINES
             if slug in by_slug and by_slug[slug]["best"]}
    head = ["Configuration", "seeds"] + [
        f"{TASK_LABELS[t]}: dev, vs {', vs '.join(METHOD_BASELINES.values())}"
        for t in TASK_ORDER] + ["dev average", "beyond 2 std of the difference"]
    out = []
    for r in methods:
        b, cells = r["best"], []
        beyond = {slug: [] for slug in METHOD_BASELINES}
        for t in TASK_ORDER:
            key = f"dev/{t}"
            diffs = []
            for slug in METHOD_BASELINES:
                base = bases.get(slug)
                if slug == r["slug"] or base is None or key not in base["best"]:
                    diffs.append("–")
                    continue
                diff = b[key] - base["best"][key]
                diffs.append(f"{100 * diff:+.1f}")
                if key in spread and abs(diff) > 2 * difference_std(
                        spread[key], r["n_seeds"], base["n_seeds"]):
                    beyond[slug].append(f"{TASK_LABELS[t]} {100 * diff:+.1f}")
            cells.append(", ".join([_pm(b[key], r["std"].get(key))] + diffs))
        unfinished = "" if r.get("done") else " (unfinished)"
        if not spread:
            verdict = "– (no spread yet)"
        elif not r.get("done"):
            verdict = "– (unfinished)"  # a mid-run epoch is no result
        else:
            verdict = "; ".join(f"vs {METHOD_BASELINES[slug]}: {', '.join(found)}"
                                for slug, found in beyond.items() if found) or "none"
        out.append("| " + " | ".join([r["name"] + unfinished, str(r["n_seeds"])] + cells + [
            _pm(b["dev/average"], r["std"].get("dev/average")), verdict]) + " |")
    spread_text = ", ".join(f"{TASK_LABELS[t]} {spread[f'dev/{t}']:.3f}"
                            for t in TASK_ORDER if f"dev/{t}" in spread) or "not run yet"
    if spread and not spread_row.get("done"):
        spread_text += ", unfinished"
    unfinished_bases = [f"`{slug}`" for slug, base in bases.items() if not base.get("done")]
    return (["## Gradient combiners and loss weightings", "",
             "PAL on the best recipe (cross pairs, mean pooling, warm-up 5e-5, 3 epochs, "
             "method=additive: every step one batch of each task) with each combiner or "
             "loss weighting; dev at the row's best epoch, differences in points against "
             "the same recipe with PCGrad (`best-pcgrad`) and with proportional sampling "
             "(`best-proportional`). A difference counts only beyond twice its own standard "
             "deviation: the recipe's seed-to-seed standard deviation s "
             f"(`{SPREAD_ROW}`, sample std over its seeds: {spread_text}) times "
             "sqrt(1/n + 1/m) for rows of n and m seeds, sqrt 2 for two one-seed rows. "
             f"`{SPREAD_ROW}` chooses its epoch on a validation split, these rows on "
             "dev itself, which flatters them a little; with one seed a row shows no more "
             "than that."
             + (f" Unfinished baselines: {', '.join(unfinished_bases)}." if unfinished_bases
                else ""), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + out + [""])


def _shown(path: Path | str) -> str:
    """A path as the report shows it: relative to the working directory when inside it."""
    path = Path(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _shown_arg(arg: str) -> str:
    """A recorded command's argument as the report shows it: workdirs and ensemble
    members relative to the working directory, configs as configs/<file>."""
    if arg.startswith(("--workdir=", "--ensemble=")):
        flag, _, value = arg.partition("=")
        return f"{flag}={','.join(_shown(v) for v in value.split(','))}"
    return arg.replace(str(CONFIGS) + "/", "configs/")


def report(results: Path, budget_name: str) -> Path:
    rows = collect(results)
    plots = sweep_plots.plot(rows, results) if any(r["records"] for r in rows) else []
    machines = {json.dumps(run["machine"], sort_keys=True) for r in rows for run in r["runs"]
                if "machine" in run}
    used = {r["budget"] for r in rows if r["budget"]}
    if len(used) == 1:
        budget_name = used.pop()
    elif used:
        budget_name = "mixed: " + ", ".join(sorted(used))
    about = "; ".join(f"`{b}`: {BUDGETS[b].about}" for b in BUDGETS if b in budget_name)
    lines = [
        "# Results", "",
        f"Written by `python -m experiments.sweep --results={_shown(results)} "
        f"--budget={budget_name}` on "
        f"{datetime.date.today().isoformat()}; every figure comes from the rows' "
        "`metrics.jsonl` in this folder.", "",
        f"Budget {about}.", "",
        "Each row: train-sample and dev metrics at the row's best epoch by its "
        "`eval.best_metric` (dev average unless a validation split chooses; the epoch whose "
        "checkpoint `best/` keeps). With several seeds (`--seeds`, column seeds) a cell is "
        "the mean over seeds ± their sample standard deviation, each seed at its own best "
        "epoch; a difference between rows counts only beyond those spreads. "
        "train = a fixed sample of "
        "`eval.train_sample` training examples. dev average (seed) = mean of SST accuracy, "
        "Quora accuracy and STS Pearson r; dev overall (CS224N) = the same with r mapped to "
        "(r + 1) / 2. params / encoder = (encoder + all task adapters) / encoder, heads "
        "excluded (the PALs paper's figure); the separate models count three encoders. Wall "
        "time = every invocation of the row, evaluation included. An ensemble row (`--ensemble`) "
        "averages the class probabilities or scores of its row's seeds, each at its best "
        "checkpoint (read from the `best-outputs.npz` each seed's training wrote, where it "
        "did): one figure, no spread; its seeds column counts the members.", "",
        "Quora is a stand-in: train and dev are both carved out of the official "
        "`quora-dev.csv` (about 16k / 2k pairs, by a hash of the id), so its accuracies are "
        "not comparable with figures on the official dev set, and the encoder saw Quora "
        "duplicates in its own training.", "",
        table(rows), "",
    ]
    if any(r.get("train_sample_from") == "head" and r["best"] for r in rows):
        lines += [HEAD_NOTE, ""]
    lines += calibration(rows)
    lines += against_references(rows)
    lines += against_baselines(rows)
    shares = sweep_shares.section(rows)
    figure = sweep_shares.figure(rows, results / "shares.png") if shares else None
    lines += shares + ([f"![{figure.stem}]({figure.name})", ""] if figure else [])
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "## Machines", ""]
    lines += [f"- {', '.join(f'{k} {v}' for k, v in json.loads(m).items())}"
              for m in sorted(machines)] or ["- none recorded"]
    lines += ["", "## Commands", "", "Each row alone (the sweep runs exactly these):", ""]
    for r in rows:
        for seed, command_run in sorted(r.get("commands", {}).items()):
            cmd = ["python"] + [_shown_arg(x) for x in command_run[1:]]
            label = r["name"] + (f", seed {seed}" if len(r["commands"]) > 1 else "")
            lines += [f"- {label}: `{shlex.join(cmd)}`"]
    out = results / "RESULTS.md"
    out.write_text("\n".join(lines) + "\n")
    (results / "results.json").write_text(json.dumps(
        [{k: v for k, v in r.items()} for r in rows], indent=2, default=str) + "\n")
    return out
