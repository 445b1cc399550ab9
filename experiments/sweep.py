"""The experiment sweep: Table 1 rows, separate models, PyTorch references, best-recipe rows.

    python -m experiments.sweep --results=results                # every row, the CPU budget
    python -m experiments.sweep --results=results --only=pal-pcgrad,separate-sts
    python -m experiments.sweep --results=results --only=best-proportional --seeds=0,1,2
    python -m experiments.sweep --results=results --report-only  # table and plots only
    python -m experiments.sweep --results=/tmp/smoke --budget=smoke   # tiny config, seconds a row
    python -m experiments.sweep --dry-run                         # print each row's command

Each row is one `python -m flaxpals.main --config=... --workdir=<results>/<slug>`
subprocess (the trainer's own CLI, so every row's command is printed and can
be rerun alone), its output appended to `<results>/<slug>/train.log`.

Seeds: `--seeds=0,1,2` runs each row once per seed (`config.seed`: init,
dropout, shuffling, task sampling), seed 0 in `<results>/<slug>` and seed s in
`<results>/<slug>-seed<s>`; the report gives each figure as the mean over the
seeds run ± their standard deviation, and the plots the spread as a band.

Resuming: a row whose metrics.jsonl already holds its last epoch is skipped;
any other row is started again in the same workdir, where the trainer resumes
from its latest checkpoint (a `torch-<task>` row: after its last finished epoch,
`experiments.torch_finetune`'s resume.pt). `<results>/<slug>/sweep.json` records the row's
command and the wall time of every invocation (a heartbeat every 30 s, so an
interrupted invocation still counts); a row whose recorded command differs
from the current one is refused (another budget or --set in the same folder),
naming both.

After the rows (or with --report-only) `experiments/sweep_report.py` writes
`<results>/RESULTS.md`: the table
(train and dev metric per task at the best epoch by the run's
`eval.best_metric`, mean ± std over the seeds run, both average
formulas, the parameter ratio, the wall time), `results.json` the same data,
and, through `experiments/sweep_plots.py`, plots: `dev_per_epoch.png` (dev metric
per epoch per row, a panel per task), `dev_per_epoch_best.png` (the same for the
best-recipe rows, on their own scale, with the PyTorch reference as a line),
`methods.png` (each combiner and loss weighting against PCGrad and proportional
sampling, with the recipe's seed spread) and `train_vs_dev.png` (train-sample
against dev per epoch, a panel per row, as the seed's Figure 4).

Recipes. Table 1 rows use the seed's recipe (`SEED_RECIPE`: [CLS] tanh pooler,
bi-encoded pairs with a dot-product head, constant learning rate 1e-5, no
weight decay); the weight-decay row differs only by decay 0.01. The separate
single-task models use the standard fine-tuning recipe of the PyTorch
reference measured on this project's machines (`REFERENCE_RECIPE`, see
docs/experiments.md: cross-encoded pairs, [CLS] head, AdamW 5e-5 with 10% warm-up and linear decay,
decay 0.01, 3 epochs), so that they calibrate the trainer against it; the
`torch-<task>` rows run that reference itself (`experiments.torch_finetune`,
its own seeds), and where they have run the report compares against them
instead of the fixed figures in `PYTORCH_REFERENCE`. The
"best" rows are candidates (PAL with cross-encoded pairs, mean pooling and the
warm-up schedule; annealed sampling for 2 epochs, and proportional sampling for
3); change `ROWS` when the sweep finds better. Then the best recipe with one
technique each (`best-val*`, issue #20) and with each gradient combiner or loss
weighting (`best-<method>`, issue #19). The report's last table sets each
three-task row against the PyTorch figures and against the separate models.

Cost of `--budget=cpu` on 2 cores: 35 min to 1 h 30 min a row for the first
twelve flaxpals rows (about 10 hours and 6 GB of checkpoints; measured:
docs/experiments.md), about 1 h 30 min for each 3-epoch best-recipe row (an
estimate from best-proportional), 40 to 50 min for each PyTorch row; each
further seed as much again.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flaxpals import config_lib, workdir_format
from flaxpals.config_lib import COMBINERS, LOSS_WEIGHTINGS

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
TASK_ORDER = ("sst", "quora", "sts")
TASK_LABELS = {"sst": "SST acc", "quora": "Quora acc", "sts": "STS r"}

SEED_RECIPE = {"model.pooling": "cls", "model.pair_encoding": "bi", "model.similarity": "dot",
               "train.schedule": "constant", "train.learning_rate": 1e-5,
               "train.weight_decay": 0.0}
REFERENCE_RECIPE = {"model.pooling": "cls", "model.pair_encoding": "cross",
                    "train.schedule": "warmup_linear", "train.warmup_fraction": 0.1,
                    "train.learning_rate": 5e-5, "train.weight_decay": 0.01}
BEST_RECIPE = {"model.pooling": "mean", "model.pair_encoding": "cross",
               "train.schedule": "warmup_linear", "train.learning_rate": 5e-5,
               "train.weight_decay": 0.01}
RECIPES = {"table1": SEED_RECIPE, "separate": REFERENCE_RECIPE, "best": BEST_RECIPE}

# Best-epoch dev scores of the same single-task recipe in PyTorch + transformers on
# these files and this encoder, measured once on this project's 2-core machines
# (docs/experiments.md): the separate models' calibration target.
PYTORCH_REFERENCE = {"sst": 0.489, "quora": 0.856, "sts": 0.855}


# Every gradient combiner and every loss weighting, as a row (flaxpals.mtl.combiners,
# flaxpals.mtl.loss_weighting); pcgrad runs as combiner here, so that all share method=additive.
# The plain sum is a row too, as the control, added after best-pcgrad and best-gradvac
# came out level with each other and below proportional sampling: the additive schedule
# without a combiner, which tells a combiner's own effect from the schedule's.
COMBINER_ROWS = tuple(COMBINERS)
WEIGHTING_ROWS = tuple(w for w in LOSS_WEIGHTINGS if w != "none")
METHOD_SLUGS = tuple(f"best-{m}" for m in COMBINER_ROWS + WEIGHTING_ROWS)

# Issue #19's comparison: each combiner or loss weighting on the best recipe against the
# same recipe with PCGrad and with proportional sampling; the yardstick of a win is the
# seed spread of that recipe (best-val: 3 seeds, the same recipe with a validation split).
METHOD_BASELINES = {"best-pcgrad": "PCGrad", "best-proportional": "proportional"}
SPREAD_ROW = "best-val"


@dataclasses.dataclass(frozen=True)
class Row:
    slug: str  # the workdir's name
    name: str  # the table's label
    config: str  # a file in configs/
    arg: str  # its argument (method=...)
    group: str  # table1 | separate | best: chooses the recipe
    overrides: tuple[tuple[str, Any], ...] = ()
    epochs: int | None = None  # its own epoch count, where the budget allows (row_epochs)


VAL_SPLIT = (("data.validation_fraction", 0.1), ("eval.best_metric", "val/average"))


def _separate(task: str) -> Row:
    # 3 epochs, as the PyTorch reference they calibrate against.
    return Row(f"separate-{task}", f"Separate model: {task}", "baseline.py", "method=sequential",
               "separate", (("tasks", (task,)),), epochs=3)


def _torch(task: str) -> Row:
    # experiments.torch_finetune: the separate models' recipe in PyTorch + transformers,
    # run by the sweep so that its seeds and spread are measured like flaxpals' rows.
    return Row(f"torch-{task}", f"PyTorch reference: {task}", "", "", "torch",
               (("task", task),), epochs=3)


ROWS: tuple[Row, ...] = (
    Row("bert-sequential", "BERT + sequential", "baseline.py", "method=sequential", "table1"),
    Row("bert-additive", "BERT + additive", "baseline.py", "method=additive", "table1"),
    Row("pal-sequential", "PAL + sequential", "pal.py", "method=sequential", "table1"),
    Row("pal-pcgrad", "PAL + PCGrad", "pal.py", "method=pcgrad", "table1"),
    Row("lowrank-sequential", "Low-rank + sequential", "lowrank.py", "method=sequential",
        "table1"),
    Row("lowrank-sequential-wd", "Low-rank + sequential + weight decay 0.01", "lowrank.py",
        "method=sequential", "table1", (("train.weight_decay", 0.01),)),
    Row("pal-annealed", "PAL + annealed", "pal.py", "method=annealed", "table1"),
    _separate("sst"), _separate("quora"), _separate("sts"),
    _torch("sst"), _torch("quora"), _torch("sts"),
    Row("best", "Best candidate: PAL + annealed, cross pairs, mean pooling, warm-up 5e-5",
        "pal.py", "method=annealed", "best"),
    # The annealed candidate above fell short on Quora only (.850 against .856), and the
    # separate Quora model was still climbing at its 3rd epoch: proportional sampling
    # for 3 epochs gives Quora as many steps as its separate model had (1,518), the
    # three separate models' total examples, with one encoder.
    Row("best-proportional", "Best candidate 2: PAL + proportional, cross pairs, mean "
        "pooling, warm-up 5e-5, 3 epochs", "pal.py", "method=proportional", "best", epochs=3),
    # Issue #20's rows (docs/results/PLAN.md), added before any of them ran: the recipe
    # above with 10% of each train file held out to choose the epoch (so dev stays a
    # test), then one technique each on top of it.
    Row("best-val", "Best recipe, epoch chosen on a validation split", "pal.py",
        "method=proportional", "best", VAL_SPLIT, epochs=3),
    Row("best-val-ema", "Best recipe, val split, + weight EMA 0.999 (scored as EMA)", "pal.py",
        "method=proportional", "best", VAL_SPLIT + (
            ("train.ema_decay", 0.999), ("eval.use_ema", True),
            ("eval.best_metric", "val_ema/average")), epochs=3),
    Row("best-val-lld", "Best recipe, val split, + layer-wise lr decay 0.9", "pal.py",
        "method=proportional", "best", VAL_SPLIT + (("train.layer_decay", 0.9),), epochs=3),
    # SMART as the authors' code runs it: each token's perturbation rescaled to inf-norm 1.
    # (The paper's eps-ball of 1e-5 changed no epoch-1 figure beyond 7 digits: PLAN.md.)
    Row("best-val-smart-token", "Best recipe, val split, + SMART (weight 1, token-normed, "
        "eps 1)", "pal.py", "method=proportional", "best", VAL_SPLIT + (
            ("train.smart_weight", 1.0), ("train.smart_projection", "token"),
            ("train.smart_eps", 1.0)), epochs=3),
    # Issue #19's rows: the best recipe with each way of combining the task gradients
    # (method=additive: every step one batch of every task) or weighting the task losses;
    # best-pcgrad (PAL + PCGrad on this recipe) and best-proportional are their baselines.
    *(Row(f"best-{name}", f"Best recipe, additive + {name}", "pal.py", "method=additive",
          "best", ((key, name),), epochs=3) for key, name in (
              [("train.combiner", c) for c in COMBINER_ROWS]
              + [("train.loss_weighting", w) for w in WEIGHTING_ROWS])),
)


@dataclasses.dataclass(frozen=True)
class Budget:
    scale: str  # "" (the config's encoder: MiniLM) or "tiny"
    overrides: dict[str, Any]
    about: str
    row_epochs: bool = False  # whether a row's own `epochs` replaces the budget's
    torch_args: tuple[tuple[str, Any], ...] = ()  # experiments.torch_finetune flags


BUDGETS = {
    "cpu": Budget("", {"train.num_epochs": 2, "checkpoint.keep": 1},
                  "embedded all-MiniLM-L6-v2, all training data, 2 epochs (separate models: "
                  "3, as the PyTorch reference; a row may set its own), batch 32, the "
                  "config's length buckets (each row's config.json records them)",
                  row_epochs=True,
                  torch_args=(("train_sample", 500),)),
    "smoke": Budget("tiny", {"train.num_epochs": 2, "train.steps_per_epoch": 4,
                             "data.train_limit": 32, "data.eval_limit": 32,
                             "eval.train_sample": 16, "checkpoint.every_steps": 1000,
                             "checkpoint.keep": 1},
                    "tiny random-init encoder, 32 examples a task, 2 epochs of 4 steps "
                    "(PyTorch rows: MiniLM, 32 examples, 2 epochs): "
                    "tests the machinery, the numbers mean nothing",
                    torch_args=(("epochs", 2), ("train_limit", 32), ("eval_limit", 32),
                                ("train_sample", 16))),
}


# ---------------------------------------------------------------- configs and commands


def row_overrides(row: Row, budget: Budget, extra: dict[str, Any]) -> dict[str, Any]:
    """Every `--config.KEY=VALUE` of a row, in the order they apply."""
    out = dict(RECIPES[row.group])
    out.update(row.overrides)
    out.update(budget.overrides)
    if row.epochs and budget.row_epochs:
        out["train.num_epochs"] = row.epochs
    out.update(extra)
    return out


def config_spec(row: Row, budget: Budget) -> str:
    arg = ",".join(filter(None, [row.arg, budget.scale]))
    return f"{row.config}:{arg}" if arg else row.config


def build_config(row: Row, budget: Budget, extra: dict[str, Any]):
    """The row's config exactly as `flaxpals.main` will build it, validated."""
    c = config_lib.load_file(CONFIGS / row.config,
                             config_spec(row, budget).partition(":")[2] or None)
    for key, value in row_overrides(row, budget, extra).items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise ValueError(f"row {row.slug}: config has no key {key!r}")
        node[leaf] = type(node[leaf])(value) if isinstance(node[leaf], float) else value
    config_lib.validate(c)
    return c


def _flag_value(v: Any) -> str:
    return repr(tuple(v)) if isinstance(v, (tuple, list)) else repr(v) if isinstance(v, float) \
        else str(v)


def torch_args(row: Row, budget: Budget, extra: dict[str, Any]) -> dict[str, Any]:
    """A PyTorch row's `experiments.torch_finetune` flags: its task, epochs, seed and the
    separate models' recipe (REFERENCE_RECIPE); --set's flaxpals config keys do not apply
    to it, except the seed."""
    recipe = REFERENCE_RECIPE  # the separate models' recipe, so that they calibrate
    assert recipe["train.schedule"] == "warmup_linear" and recipe["model.pair_encoding"] == \
        "cross", "torch_finetune trains with warm-up + linear decay on cross-encoded pairs"
    args = {"task": dict(row.overrides)["task"], "epochs": row.epochs or 3,
            "pooling": recipe["model.pooling"], "learning_rate": recipe["train.learning_rate"],
            "weight_decay": recipe["train.weight_decay"],
            "warmup_fraction": recipe["train.warmup_fraction"]}
    args.update(budget.torch_args)
    if "seed" in extra:
        args["seed"] = extra["seed"]
    return args


def num_epochs(row: Row, budget: Budget, extra: dict[str, Any]) -> int:
    """The row's epochs, its config validated (flaxpals rows) before anything runs."""
    if row.group == "torch":
        return int(torch_args(row, budget, extra)["epochs"])
    return build_config(row, budget, extra).train.num_epochs


def command(row: Row, budget: Budget, extra: dict[str, Any], workdir: Path,
            python: str = sys.executable, display: bool = False) -> list[str]:
    """The row's `flaxpals.main` (or `experiments.torch_finetune`) command (display:
    relative config path, `python`)."""
    if row.group == "torch":
        return ([("python" if display else python), "-m", "experiments.torch_finetune",
                 f"--workdir={workdir}"]
                + [f"--{k}={v}" for k, v in torch_args(row, budget, extra).items()])
    config = (Path("configs") if display else CONFIGS) / config_spec(row, budget)
    return ([("python" if display else python), "-m", "flaxpals.main", f"--config={config}",
             f"--workdir={workdir}"]
            + [f"--config.{k}={_flag_value(v)}" for k, v in row_overrides(row, budget,
                                                                            extra).items()])


def parse_set(items: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE (VALUE read as a Python literal when it is one) -> {KEY: VALUE}."""
    import ast

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. train.num_epochs=3")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


# ---------------------------------------------------------------- running rows


def seed_workdir(results: Path, slug: str, seed: int) -> Path:
    """Seed 0 runs in `<results>/<slug>` (the rows run before seeds were), seed s in
    `<results>/<slug>-seed<s>`."""
    return results / slug if seed == 0 else results / f"{slug}-seed{seed}"


def is_done(workdir: Path, num_epochs: int) -> bool:
    return any(r.get("epoch") == num_epochs for r in workdir_format.read_metrics(workdir))


def machine() -> dict[str, Any]:
    """The host a row ran on, its vector extensions included (step times depend on them:
    AVX2 against AVX-512)."""
    from benchmarks.bench_e2e import cpu  # the one definition of what a figure records

    host = cpu()
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "python":
            platform.python_version(), "cpu": host["model"], "cpu_flags": " ".join(host["flags"])}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def comparable(cmd: list[str]) -> list[str]:
    """What makes two runs of a row the same: config and overrides (not the program that
    runs them, not paths)."""
    return [x.replace(str(CONFIGS) + "/", "configs/") for x in cmd
            if x.startswith("--") and not x.startswith("--workdir=")]


class RowRecord:
    """<workdir>/sweep.json: the row's command and the wall time of each invocation."""

    def __init__(self, workdir: Path, row: Row, budget_name: str, cmd: list[str]):
        self.path = workdir / "sweep.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}
        recorded = self.data.get("command")
        if recorded is not None and comparable(recorded) != comparable(cmd):
            raise SystemExit(
                f"{self.path}: row {row.slug} was run with\n  {shlex.join(recorded)}\nnot\n  "
                f"{shlex.join(cmd)}\n(another budget or --set?). Use another --results "
                "folder, or delete this row's folder to start it again.")
        self.data.update(row=row.name, slug=row.slug, budget=budget_name, command=cmd)
        self.data.setdefault("runs", [])
        for run in self.data["runs"]:  # the sweep itself was killed during this one
            if run["status"] == "running":
                run["status"] = "interrupted (time counted up to the last heartbeat)"

    def save(self) -> None:
        self.data["seconds"] = sum(r["seconds"] for r in self.data["runs"])
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)


def run_row(row: Row, cmd: list[str], record: RowRecord, workdir: Path,
            heartbeat_s: float = 30.0) -> str:
    """Runs the row's command to its end; returns its status (done, failed, ...)."""
    run = {"start": datetime.datetime.now().isoformat(timespec="seconds"), "seconds": 0.0,
           "status": "running", "machine": machine()}
    record.data["runs"].append(run)
    record.save()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x))
    t0 = time.perf_counter()
    with open(workdir / "train.log", "a") as log:
        log.write(f"\n=== {run['start']} {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            while True:
                try:
                    code = proc.wait(timeout=heartbeat_s)
                    break
                except subprocess.TimeoutExpired:
                    run["seconds"] = time.perf_counter() - t0
                    record.save()
        except BaseException:
            run["status"] = "interrupted"
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        finally:
            run["seconds"] = time.perf_counter() - t0
            record.save()
    run["returncode"] = code
    run["status"] = "finished" if code == 0 else f"failed (exit code {code})"
    record.save()
    return run["status"]


# ---------------------------------------------------------------- CLI


def select(only: str | None) -> list[Row]:
    if not only:
        return list(ROWS)
    wanted = [x.strip() for x in only.split(",") if x.strip()]
    known = {r.slug: r for r in ROWS}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"--only: unknown row(s) {unknown}; rows: {list(known)}")
    return [known[w] for w in wanted]


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(
            f"--seeds={text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise SystemExit(f"--seeds={text!r}: expected distinct integers >= 0, e.g. 0,1,2")
    return seeds


def exit_on_sigterm() -> None:
    """SIGTERM (`kill`, a job scheduler) exits like Ctrl-C: the running row's record says
    "interrupted" and its trainer is terminated too, instead of left running orphaned."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.sweep",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--results", default="results", help="folder of the rows and the report")
    ap.add_argument("--budget", choices=tuple(BUDGETS), default="cpu")
    ap.add_argument("--only", default=None, help="comma-separated row slugs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every row, e.g. data.train_limit=8000")
    ap.add_argument("--seeds", default="0",
                    help="comma-separated seeds, each row run once per seed (config.seed); "
                         "seed 0 in <results>/<slug>, seed s in <results>/<slug>-seed<s>")
    ap.add_argument("--ensemble", action="store_true",
                    help="after the rows, average each row's --seeds (all finished) as one "
                         "model: row <slug>-ensemble (flaxpals rows, 2 seeds or more)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    results = Path(args.results).absolute()
    budget = BUDGETS[args.budget]
    extra = parse_set(args.set)
    rows = select(args.only)
    seeds = parse_seeds(args.seeds)
    if "seed" in extra:
        raise SystemExit("--set seed=...: use --seeds, which gives each seed its own workdir")
    failed = []
    if not args.report_only:
        plans = []
        # Every config built and validated before the first run; all rows' seed 0 first,
        # so that a sweep stopped early has one run of each row rather than three of one.
        for seed in seeds:
            seeded = {**extra, "seed": seed} if seed else extra  # seed 0: the config's
            for row in rows:
                workdir = seed_workdir(results, row.slug, seed)
                plans.append((row, seed, seeded, workdir, num_epochs(row, budget, seeded),
                              command(row, budget, seeded, workdir)))
        for row, seed, seeded, workdir, epochs, cmd in plans:
            name = workdir.name
            if args.dry_run:
                print(shlex.join(command(row, budget, seeded,
                                         seed_workdir(Path(args.results), row.slug, seed),
                                         display=True)))
                continue
            workdir.mkdir(parents=True, exist_ok=True)
            record = RowRecord(workdir, row, args.budget, cmd)
            if is_done(workdir, epochs):
                print(f"[{name}] done ({epochs} epochs in metrics.jsonl): skipped")
                continue
            print(f"[{name}] running {row.name}, seed {seed} (log: {workdir / 'train.log'})",
                  flush=True)
            status = run_row(row, cmd, record, workdir)
            if status == "finished" and not is_done(workdir, epochs):
                status = (f"incomplete: the trainer exited 0 but metrics.jsonl has no epoch "
                          f"{epochs} record (killed during the last evaluation?)")
            print(f"[{name}] {status}, {record.data['runs'][-1]['seconds']:.0f} s",
                  flush=True)
            if status != "finished":
                failed.append(name)
        if args.ensemble:
            from experiments import sweep_ensemble  # imports this module

            sweep_ensemble.run_ensembles(rows, seeds, results, {p[0].slug: p[4] for p in plans},
                                         failed, dry_run=args.dry_run)
    if args.dry_run:
        return 0
    if results.exists():
        from experiments import sweep_report  # imports this module

        path = sweep_report.report(results, args.budget)
        print(f"wrote {path}")
    if failed:
        print(f"rows not finished: {failed}; run the same command again to resume them "
              "(see each row's train.log)")
        return 1
    return 0


if __name__ == "__main__":
    exit_on_sigterm()  # here, not in main(): a caller (a test) keeps its own handler
    sys.exit(main())
