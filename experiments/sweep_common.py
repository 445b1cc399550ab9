"""What the sweep's modules share: its rows and budgets, the task labels, where a row's
seeds run and whether a run finished, and the seed statistics that the report and its
figures both use.

    from experiments import sweep_common
    sweep_common.ROWS, sweep_common.BUDGETS["cpu"], sweep_common.seed_workdir(results, slug, 1)

experiments/sweep.py runs the rows, sweep_report.py writes their report (figures:
sweep_plots.py, sweep_shares.py; ensembles: sweep_ensemble.py); each of them imports
this module, and it imports none of them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from flaxpals import workdir_format
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
# The plain sum is a row too, the control: the additive schedule without a combiner,
# which tells a combiner's own effect from the schedule's.
COMBINER_ROWS = tuple(COMBINERS)
WEIGHTING_ROWS = tuple(w for w in LOSS_WEIGHTINGS if w != "none")
METHOD_SLUGS = tuple(f"best-{m}" for m in COMBINER_ROWS + WEIGHTING_ROWS)

# The methods' comparison: each combiner or loss weighting on the best recipe against the
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
    # Proportional sampling for 3 epochs gives Quora (the task where the annealed
    # candidate trails its separate model) as many steps as its separate model has
    # (1,518): the three separate models' total examples, with one encoder.
    Row("best-proportional", "Best candidate 2: PAL + proportional, cross pairs, mean "
        "pooling, warm-up 5e-5, 3 epochs", "pal.py", "method=proportional", "best", epochs=3),
    # The validation rows (docs/results/PLAN.md): the recipe above with 10% of each
    # train file held out to choose the epoch (so dev stays a test), then one technique
    # each on top of it.
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
    # The method rows: the best recipe with each way of combining the task gradients
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


# ---------------------------------------------------------------- runs and seeds


def seed_workdir(results: Path, slug: str, seed: int) -> Path:
    """Seed 0 runs in `<results>/<slug>`, seed s in `<results>/<slug>-seed<s>`."""
    return results / slug if seed == 0 else results / f"{slug}-seed{seed}"


def is_done(workdir: Path, num_epochs: int) -> bool:
    return any(r.get("epoch") == num_epochs for r in workdir_format.read_metrics(workdir))


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def difference_std(std: float, n_a: int, n_b: int) -> float:
    """The standard deviation of the difference between two rows' means over n_a and
    n_b seeds, each seed's figure spread by `std`: std * sqrt(1/n_a + 1/n_b) (sqrt 2
    times std for two one-seed rows)."""
    return std * (1 / n_a + 1 / n_b) ** 0.5


def pytorch_reference(rows: list[dict]) -> dict[str, tuple[float, float | None, str]]:
    """task -> (dev score, std over seeds or None, source): the sweep's own PyTorch rows
    (torch-<task>, mean over their seeds) where run, else `PYTORCH_REFERENCE`
    (one seed, measured before the sweep ran PyTorch rows)."""
    out = {t: (v, None, "fixed") for t, v in PYTORCH_REFERENCE.items()}
    for r in rows:
        if r["group"] == "torch" and r["best"]:
            task = r["slug"].split("-", 1)[1]
            if f"dev/{task}" in r["best"]:
                out[task] = (r["best"][f"dev/{task}"], r.get("std", {}).get(f"dev/{task}"),
                             f"{r.get('n_seeds', 1)} seed(s)")
    return out
