"""The one definition of every config field, and its checks.

Config files in `configs/` start from `base()` and change what their
experiment needs; each takes an argument string, e.g.

    --config=configs/pal.py:method=pcgrad,tiny

(comma-separated `key=value` pairs and bare flags: `tiny` for the random-init
test scale, `bert_base` for bert-base-uncased on an accelerator). `validate`
rejects unknown keys and bad values, naming the key, before any compute; the
declared tasks and the model's options are checked where they are built
(`data.tasks.tasks_of_config`, `model.build.model_options`, both raising
ConfigError naming the key), which the trainer's preflight does before it
writes anything.

This module imports no other flaxpals module: it owns the allowed value of each
choice (COMBINERS, LOSS_WEIGHTINGS, ...), which the implementing modules import,
and one function per choice derived from the config (`task_schedule`,
`combiner`, `loss_weighting`, `lr_schedule`, `trainable`, `shape_policy`,
`compute_dtype`) that the rest of the library calls instead of reading the raw
fields. `fields` is the one walk over a config's fields.
"The report" in comments is the CS224N project report whose experiments
flaxpals reimplements: its recipe, where it differs from the defaults.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import ml_collections

# The allowed values of the config's choices, defined here once; the modules that
# implement them import these names (and check at import that their tables match).
# train.method of the task sampler (flaxpals/mtl/sampler.py): the deterministic
# schedules, then the sampled ones.
SAMPLING_METHODS = ("sequential", "round_robin", "additive",
                    "proportional", "sqrt", "uniform", "temperature", "annealed")
# train.method: the sampler's methods, plus pcgrad: the additive schedule with PCGrad
# combining the task gradients.
METHODS = SAMPLING_METHODS + ("pcgrad",)
# train.combiner (flaxpals/mtl/combiners.py). First, sum: the plain sum of the task
# gradients, which needs no transformation (COMBINERS[1:] are the ones built).
COMBINERS = ("sum", "pcgrad", "gradvac", "cagrad", "mgda", "imtl_g", "aligned_mtl",
             "nash_mtl")
# mgda's exact solver solves 2^k - 1 supports of k + 1 unknowns each: k tasks at most.
MGDA_MAX_TASKS = 12
# train.loss_weighting (flaxpals/mtl/loss_weighting.py). First, none: the plain sum
# (LOSS_WEIGHTINGS[1:] are the ones built).
LOSS_WEIGHTINGS = ("none", "uncertainty", "dwa", "famo")
# train.trainable, train.schedule and train.decay_mask (flaxpals/train/optim.py).
TRAINABLE = ("finetune", "adapters_only", "head_only")
LR_SCHEDULES = ("constant", "warmup_linear")
DECAY_MASKS = ("no_bias_norm", "all")
# train.smart_norm and train.smart_projection (flaxpals/train/smart.py): the paper's
# Algorithm 1 (ball) | the authors' code (token).
SMART_NORMS = ("inf", "l2")
SMART_PROJECTIONS = ("ball", "token")
# model.encoder names of random-weight encoders (flaxpals/model/build.py).
RANDOM_ENCODERS = ("tiny", "bert-base-random")
# model.pair_encoding: bi (sentences encoded apart) | cross ([CLS] a [SEP] b [SEP]).
PAIR_ENCODINGS = ("bi", "cross")
# data.shapes: how batches are padded (`shape_policy`).
SHAPE_POLICIES = ("auto", "buckets", "fixed", "packed")
# model.dtype: the compute dtype; auto is the platform's (`compute_dtype`).
DTYPES = ("auto", "float32", "bfloat16")
# eval.train_sample_from's values, the preferred first (a report averaging seeds of
# both kinds takes the first it finds).
TRAIN_SAMPLES = ("random", "head")


class ConfigError(ValueError):
    """A bad config key or value: the message names it."""


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # Seeds init, dropout, shuffling and task sampling.
    c.tasks = ("sst", "quora", "sts")  # Task names, trained and evaluated in this order.
    # Tasks declared by config: name -> fields of flaxpals.data.tasks.task_from_config.
    c.extra_tasks = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    # A directory, 'minilm' (embedded), a hub id, or random weights (RANDOM_ENCODERS):
    # 'tiny' (tests) or 'bert-base-random' (bert-base-uncased's shape, for benchmarks).
    c.model.encoder = "minilm"
    # Compute dtype: auto (bfloat16 on GPU and TPU, float32 on CPU) | float32 | bfloat16;
    # params stay float32 (`compute_dtype`).
    c.model.dtype = "auto"
    c.model.adapter = "none"  # Task-specific layers: none | pal | lowrank.
    c.model.adapter_size = -1  # Adapter width d; -1: the paper's size scaled to the encoder.
    c.model.adapter_heads = 6  # Attention heads inside a PAL.
    c.model.placement = "output"  # Where adapters enter a layer: output | parallel.
    c.model.zero_init_decoder = False  # Zero V^D so training starts from the plain encoder.
    # Sentence vector: mean (over real tokens; MiniLM's own) | cls (tanh pooler, the report's).
    c.model.pooling = "mean"
    # Pairs: cross ([CLS] a [SEP] b [SEP]) | bi (encoded apart, the report's).
    c.model.pair_encoding = "cross"
    # Bi-encoder STS head: cosine (scaled to 0..5) | dot (the report's).
    c.model.similarity = "cosine"
    c.model.head_dropout = 0.1  # Dropout before each head.
    c.model.hidden_dropout = -1.0  # Encoder dropout; -1: the checkpoint's own.

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = ""  # CS224N files; "": $FLAXPALS_DATA_DIR or shared/data/cs224n.
    c.data.cache_dir = ""  # Token-id cache; "": $FLAXPALS_CACHE_DIR, else $XDG_CACHE_HOME/flaxpals.
    c.data.strict = False  # Raise on a defective row instead of skipping and counting it.
    c.data.max_length = 128  # Truncation length in tokens (specials included).
    # How batches are padded (`shape_policy`): buckets (to the smallest of data.buckets that
    # fits: few padded tokens, a program per length used) | fixed (all to data.max_length:
    # one program per step) | packed (several sentences per row of data.max_length, as few
    # rows as every batch of the run needs: one program, few padded tokens; evaluation
    # as fixed) | auto (buckets on CPU, fixed on GPU and TPU).
    c.data.shapes = "auto"
    # Padded lengths of shapes=buckets: one compilation per bucket used (and per batch
    # structure). A step costs about its padded length, so finer buckets pad less (the
    # CS224N train sets pad to 14-16% fewer tokens than with 16/32/64/128).
    c.data.buckets = (16, 24, 32, 48, 64, 96, 128)
    c.data.train_limit = -1  # Use only the first N training examples per task; -1: all.
    c.data.eval_limit = -1  # Evaluate on the first N dev examples per task; -1: all.
    # Share of each task's train rows (after train_limit) held out as the `val` split, never
    # trained on, for best-epoch selection (eval.best_metric: val/... or val_ema/...); 0: off.
    c.data.validation_fraction = 0.0
    c.data.validation_seed = 0  # Draws the held-out rows: the same rows whatever `seed` is.

    c.train = ml_collections.ConfigDict()
    c.train.method = "annealed"  # One of config_lib.METHODS (pcgrad = additive + PCGrad).
    # Task gradients of method=additive, one of COMBINERS: sum | pcgrad |
    # gradvac | cagrad | mgda | imtl_g | aligned_mtl | nash_mtl (flaxpals/mtl/combiners.py).
    c.train.combiner = "sum"
    c.train.pcgrad_reduction = "sum"  # PCGrad: sum (the paper) | mean.
    c.train.gradvac_beta = 0.01  # GradVac: EMA rate of the cosine targets (the paper's 1e-2).
    c.train.cagrad_c = 0.4  # CAGrad: radius c of the ball around the mean gradient, [0, 1).
    # Additive method, combiner sum: none | uncertainty | dwa | famo, a learned or
    # scheduled weighted sum of the task losses (flaxpals/mtl/loss_weighting.py).
    c.train.loss_weighting = "none"
    c.train.uncertainty_lr = 1e-3  # Uncertainty weighting: Adam step size of the log-variances.
    c.train.dwa_temperature = 2.0  # DWA: softmax temperature T (the paper's 2).
    c.train.dwa_window = 100  # DWA: steps per loss average (the paper averages epochs).
    c.train.famo_lr = 0.025  # FAMO: Adam step size of the weight logits (the paper's 0.025).
    c.train.famo_decay = 1e-3  # FAMO: decay gamma of the logits (the paper's 1e-3).
    c.train.batch_size = 32  # Global batch size per task and step.
    c.train.num_epochs = 3  # Epochs; an epoch is steps_per_epoch steps.
    c.train.steps_per_epoch = -1  # -1: the sampler's default for the method.
    c.train.temperature = 2.0  # Sampling temperature T (alpha = 1/T) for method=temperature.
    # What trains: finetune (all) | adapters_only (encoder frozen) | head_only (heads alone).
    c.train.trainable = "finetune"
    c.train.learning_rate = 5e-5  # Peak learning rate (the report's: a constant 1e-5).
    c.train.schedule = "warmup_linear"  # warmup_linear | constant (the report's).
    c.train.warmup_fraction = 0.1  # Warm-up share of all steps for warmup_linear.
    c.train.weight_decay = 0.01  # AdamW decoupled weight decay (the report's: 0).
    c.train.decay_mask = "no_bias_norm"  # no_bias_norm (all but biases, LayerNorms) | all.
    c.train.grad_clip = 1.0  # Clip by global norm; 0: no clipping.
    c.train.adam_b1 = 0.9  # Adam beta1.
    c.train.adam_b2 = 0.999  # Adam beta2.
    c.train.adam_eps = 1e-8  # Adam epsilon.
    # Layer-wise lr decay: encoder layer i (of L) gets lr x decay^(L - i), the embeddings
    # decay^(L + 1), pooler, adapters and heads the full lr (optim.py); 1: off.
    c.train.layer_decay = 1.0
    # Weight averaging: an EMA of the params, decay d per step, in the optimiser state; 0: off.
    c.train.ema_decay = 0.0
    # SMART (Jiang et al. 2020; flaxpals/train/smart.py): weight of the adversarial smoothness
    # term, a divergence between outputs at the embeddings and at a perturbed copy; 0: off.
    c.train.smart_weight = 0.0
    c.train.smart_steps = 1  # Power-iteration (ascent) steps that find the perturbation.
    # Radius: of each example's ball (projection ball), or each token's norm (token; the
    # authors' code uses 1). At 1e-5 the ball's term is lost in float32 (smart.py).
    c.train.smart_eps = 1e-5
    c.train.smart_step_size = 1e-3  # Ascent step along the (ball: normalised) gradient.
    c.train.smart_noise = 1e-5  # Std of the Gaussian noise the perturbation starts from.
    c.train.smart_norm = "inf"  # Norm of the normalisation and the ball: inf (the paper) | l2.
    # ball: the paper's Algorithm 1, projected onto each example's eps-ball | token: the
    # authors' code, each token's perturbation rescaled to norm eps after every step.
    c.train.smart_projection = "ball"
    # Bregman proximal point term: the divergence from the outputs of the EMA params
    # (needs train.ema_decay > 0, which is the paper's momentum beta); 0: off.
    c.train.smart_bregman_weight = 0.0
    # Wall-clock limit "HH:MM" ("H:MM:SS" too, for short runs); "": none. Before it runs
    # out the run stops with a checkpoint, exit code 75; rerun to resume (preemption.py).
    c.train.time_budget = ""

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 128  # Global eval batch size.
    # Train examples per task scored each epoch, to watch overfitting; 0: none. 500 costs
    # under any CS224N dev set (SST 1,101, STS 863); its accuracy's standard error is
    # about 2 points.
    c.eval.train_sample = 500
    # Which: "random", drawn with `seed`, the same every epoch; or "head", the file's first
    # rows (files can be sorted by label: SST's head is 80% classes 3 and 4).
    c.eval.train_sample_from = "random"
    # Score that selects the best checkpoint: dev/..., val/... (data.validation_fraction > 0),
    # dev_ema/... or val_ema/... (eval.use_ema; the best checkpoint's params are then the EMA).
    c.eval.best_metric = "dev/average"
    # Also evaluate the EMA params (train.ema_decay > 0) each epoch, as dev_ema/... (and
    # val_ema/...); the raw params' figures stay dev/....
    c.eval.use_ema = False

    c.parallel = ml_collections.ConfigDict()
    # Data parallelism over every device (flaxpals/train/parallel.py); batch sizes above are
    # global and must divide by the device count. fsdp: split params and optimiser
    # state across devices instead of replicating them (for encoders too big to copy).
    c.parallel.fsdp = False

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500  # Save the latest state every N steps (and each epoch).
    c.checkpoint.keep = 2  # Latest checkpoints kept (the best is kept apart).

    c.log_every_steps = 50  # Train loss to TensorBoard every N steps (metrics.jsonl: per epoch).
    # Keep compiled XLA programs in <data.cache_dir>/jax (flaxpals/train/compilation.py), so a
    # rerun of the same config compiles nothing; False: compile every run afresh.
    c.compilation_cache = True
    # After the first step, compile the run's other train and predict shapes on a background
    # thread while it trains (flaxpals/train/programs.py); False: each when first needed.
    c.compile_ahead = True
    # Trace each step once per batch structure, its padded length symbolic (jax.export), and
    # fix the length per bucket (flaxpals/train/by_length.py); False: trace it again per length.
    c.symbolic_length = True
    return c


def load_file(path, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file, as `--config=path:arg` loads it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"{path.stem}_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def parse_arg(arg: str | None) -> dict[str, str | bool]:
    """'method=pcgrad,tiny' -> {'method': 'pcgrad', 'tiny': True}."""
    out: dict[str, str | bool] = {}
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        out[key.strip()] = value.strip() if sep else True
    return out


def apply_arg(c: ml_collections.ConfigDict, arg: str | None,
              allowed: tuple[str, ...] = ("method", "tiny", "bert_base")
              ) -> ml_collections.ConfigDict:
    """Applies a config file's argument: method=..., and a scale flag."""
    args = parse_arg(arg)
    unknown = set(args) - set(allowed)
    if unknown:
        raise ConfigError(f"unknown config argument(s) {sorted(unknown)}; allowed: {allowed}")
    if "method" in args:
        set_method(c, str(args["method"]))
    if args.get("tiny"):
        tiny(c)
    if args.get("bert_base"):
        c.model.encoder = "bert-base-uncased"
        c.eval.batch_size = 256
    return c


def set_method(c: ml_collections.ConfigDict, method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not one of {METHODS}")
    c.train.method = method


def task_schedule(train_cfg) -> str:
    """The sampler's method (one of SAMPLING_METHODS): pcgrad trains on the additive
    schedule."""
    return "additive" if train_cfg.method == "pcgrad" else train_cfg.method


def combiner(train_cfg) -> str:
    """The combiner of the task gradients (one of COMBINERS): method=pcgrad is the
    additive schedule with PCGrad; sum for the other methods, whose steps each take one
    task."""
    return "pcgrad" if train_cfg.method == "pcgrad" else train_cfg.combiner


def loss_weighting(train_cfg) -> str:
    """The weighting of the task losses (one of LOSS_WEIGHTINGS); none: their plain sum."""
    return train_cfg.loss_weighting


def trainable(train_cfg) -> str:
    """What trains (one of TRAINABLE): finetune, adapters_only or head_only."""
    return train_cfg.trainable


def lr_schedule(train_cfg) -> str:
    """The learning-rate schedule (one of LR_SCHEDULES)."""
    return train_cfg.schedule


_BUDGET_FORMAT = re.compile(r"(\d+):([0-5]\d)(?::([0-5]\d))?")


def parse_budget(text: str) -> float | None:
    """train.time_budget: 'HH:MM' or 'H:MM:SS' -> seconds; '' -> None. Raises ValueError
    (one line)."""
    text = text.strip()
    if not text:
        return None
    match = _BUDGET_FORMAT.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not HH:MM (or H:MM:SS), e.g. '23:30'; '' for none")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    total = 3600 * hours + 60 * minutes + seconds
    if total <= 0:
        raise ValueError(f"{text!r} leaves no time; '' for no budget")
    return float(total)


def shape_policy(data_cfg, platform: str | None = None) -> str:
    """The shape policy in force: data.shapes, or for auto the platform's (default: JAX's
    backend): buckets on CPU, where a step costs about its padded length and a program
    compiles in seconds; fixed on GPU and TPU, where a step at the full length costs
    little more and each program takes tens of seconds to compile."""
    if data_cfg.shapes != "auto":
        return data_cfg.shapes
    if platform is None:
        import jax

        platform = jax.default_backend()
    return "buckets" if platform == "cpu" else "fixed"


def padded_lengths(data_cfg, platform: str | None = None) -> tuple[int, ...]:
    """The lengths batches are padded to under `shape_policy`: data.buckets, or
    (data.max_length,) for fixed and packed (the row length)."""
    if shape_policy(data_cfg, platform) in ("fixed", "packed"):
        return (int(data_cfg.max_length),)
    return tuple(data_cfg.buckets)


def compute_dtype(model_cfg, platform: str | None = None) -> str:
    """model.dtype, or for auto the platform's: bfloat16 on GPU and TPU (twice the float32
    matmul rate; params stay float32), float32 on CPU (XLA:CPU computes bfloat16 dots
    in float32 anyway, after converting)."""
    if model_cfg.dtype != "auto":
        return model_cfg.dtype
    if platform is None:
        import jax

        platform = jax.default_backend()
    return "float32" if platform == "cpu" else "bfloat16"


def tiny(c: ml_collections.ConfigDict) -> None:
    """The test scale: random-init tiny encoder, little data, a few steps."""
    c.model.encoder = "tiny"
    c.data.buckets = (32,)
    c.data.max_length = 32
    c.data.train_limit = 64
    c.data.eval_limit = 48
    c.train.batch_size = 8
    c.train.num_epochs = 2
    c.train.steps_per_epoch = 6
    c.train.learning_rate = 1e-3
    c.eval.batch_size = 16
    c.eval.train_sample = 16
    c.checkpoint.every_steps = 4
    c.log_every_steps = 2


def _check(key: str, ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key}: {message}")


def validate(c: ml_collections.ConfigDict) -> None:
    """Rejects unknown keys and bad values, naming the key."""
    for name in fields(c):
        check_key(name)
    t = c.train
    _check("train.method", t.method in METHODS, f"{t.method!r} is not one of {METHODS}")
    _check("train.combiner", t.combiner in COMBINERS, f"{t.combiner!r} is not one of {COMBINERS}")
    _check("train.combiner", t.combiner == "sum" or t.method == "additive",
           f"{t.combiner} needs train.method=additive (it combines one gradient per task)")
    _check("train.combiner", combiner(t) != "mgda" or len(c.tasks) <= MGDA_MAX_TASKS,
           f"mgda's exact solver takes up to {MGDA_MAX_TASKS} tasks, got {len(c.tasks)}")
    _check("train.pcgrad_reduction", t.pcgrad_reduction in ("sum", "mean"),
           f"{t.pcgrad_reduction!r} is not sum|mean")
    _check("train.gradvac_beta", 0 < t.gradvac_beta <= 1,
           f"must be in (0, 1], got {t.gradvac_beta}")
    _check("train.cagrad_c", 0 <= t.cagrad_c < 1, f"must be in [0, 1), got {t.cagrad_c}")
    _check("train.loss_weighting", t.loss_weighting in LOSS_WEIGHTINGS,
           f"{t.loss_weighting!r} is not one of {LOSS_WEIGHTINGS}")
    _check("train.loss_weighting", t.loss_weighting == "none" or t.method == "additive",
           f"{t.loss_weighting} needs train.method=additive (it weighs every task's loss)")
    _check("train.loss_weighting", t.loss_weighting == "none" or t.combiner == "sum",
           f"{t.loss_weighting} weights the summed gradient; it needs train.combiner=sum, "
           f"got {t.combiner}")
    _check("train.uncertainty_lr", t.uncertainty_lr > 0,
           f"must be positive, got {t.uncertainty_lr}")
    _check("train.dwa_temperature", t.dwa_temperature > 0,
           f"must be positive, got {t.dwa_temperature}")
    _check("train.dwa_window", t.dwa_window >= 1, f"must be >= 1, got {t.dwa_window}")
    _check("train.famo_lr", t.famo_lr > 0, f"must be positive, got {t.famo_lr}")
    _check("train.famo_decay", t.famo_decay >= 0, f"must be >= 0, got {t.famo_decay}")
    _check("train.batch_size", t.batch_size > 0, f"must be positive, got {t.batch_size}")
    _check("train.num_epochs", t.num_epochs > 0, f"must be positive, got {t.num_epochs}")
    _check("train.learning_rate", t.learning_rate > 0, f"must be positive, got {t.learning_rate}")
    _check("train.weight_decay", t.weight_decay >= 0, f"must be >= 0, got {t.weight_decay}")
    _check("train.warmup_fraction", 0 <= t.warmup_fraction < 1,
           f"must be in [0, 1), got {t.warmup_fraction}")
    _check("train.temperature", t.temperature > 0, f"must be positive, got {t.temperature}")
    _check("train.steps_per_epoch", isinstance(t.steps_per_epoch, int)
           and (t.steps_per_epoch == -1 or t.steps_per_epoch >= 1),
           f"must be an integer >= 1, or -1 for the method's default, got {t.steps_per_epoch!r}")
    for key, kinds in (("trainable", TRAINABLE), ("schedule", LR_SCHEDULES),
                       ("decay_mask", DECAY_MASKS)):
        _check(f"train.{key}", t[key] in kinds, f"{t[key]!r} is not {'|'.join(kinds)}")
    _check("train.grad_clip", t.grad_clip >= 0, f"must be >= 0 (0: off), got {t.grad_clip}")
    for key in ("adam_b1", "adam_b2"):
        _check(f"train.{key}", 0 <= t[key] < 1, f"must be in [0, 1), got {t[key]}")
    _check("train.adam_eps", t.adam_eps > 0, f"must be positive, got {t.adam_eps}")
    try:
        parse_budget(str(t.time_budget))
    except ValueError as e:
        raise ConfigError(f"config.train.time_budget: {e}") from None
    _check("tasks", len(c.tasks) > 0 and len(set(c.tasks)) == len(c.tasks),
           f"must be non-empty and without repeats, got {tuple(c.tasks)}")
    _check("data.shapes", c.data.shapes in SHAPE_POLICIES,
           f"{c.data.shapes!r} is not {'|'.join(SHAPE_POLICIES)}")
    _check("model.dtype", c.model.dtype in DTYPES, f"{c.model.dtype!r} is not {'|'.join(DTYPES)}")
    _check("data.shapes", c.data.shapes != "packed" or not (t.smart_weight or
                                                           t.smart_bregman_weight),
           "packed rows do not take SMART's perturbations (they are per example): use "
           "fixed or buckets")
    _check("data.buckets", list(c.data.buckets) == sorted(set(c.data.buckets))
           and all(b > 2 for b in c.data.buckets), f"must be increasing lengths > 2, got "
           f"{tuple(c.data.buckets)}")
    _check("data.max_length", isinstance(c.data.max_length, int) and c.data.max_length >= 2,
           f"must be an integer >= 2 ([CLS] and [SEP]), got {c.data.max_length!r}")
    _check("seed", isinstance(c.seed, int) and c.seed >= 0,
           f"must be an integer >= 0, got {c.seed!r}")
    _check("data.max_length", c.data.max_length <= max(c.data.buckets),
           f"{c.data.max_length} exceeds the largest bucket {max(c.data.buckets)}")
    _check("train.layer_decay", 0 < t.layer_decay <= 1,
           f"must be in (0, 1] (1: off), got {t.layer_decay}")
    _check("train.ema_decay", 0 <= t.ema_decay < 1,
           f"must be in [0, 1) (0: off), got {t.ema_decay}")
    _check("train.smart_weight", t.smart_weight >= 0, f"must be >= 0, got {t.smart_weight}")
    _check("train.smart_bregman_weight", t.smart_bregman_weight >= 0,
           f"must be >= 0, got {t.smart_bregman_weight}")
    _check("train.smart_bregman_weight", t.smart_bregman_weight == 0 or t.ema_decay > 0,
           "needs train.ema_decay > 0 (the EMA params are the proximal point)")
    _check("train.smart_steps", isinstance(t.smart_steps, int) and t.smart_steps >= 1,
           f"must be an integer >= 1, got {t.smart_steps!r}")
    for key in ("smart_eps", "smart_step_size", "smart_noise"):
        _check(f"train.{key}", t[key] > 0, f"must be positive, got {t[key]}")
    _check("train.smart_norm", t.smart_norm in SMART_NORMS,
           f"{t.smart_norm!r} is not {'|'.join(SMART_NORMS)}")
    _check("train.smart_projection", t.smart_projection in SMART_PROJECTIONS,
           f"{t.smart_projection!r} is not {'|'.join(SMART_PROJECTIONS)}")
    v = c.data.validation_fraction
    _check("data.validation_fraction", 0 <= v < 1, f"must be in [0, 1) (0: off), got {v}")
    _check("eval.use_ema", not c.eval.use_ema or t.ema_decay > 0,
           "needs train.ema_decay > 0 (there are no EMA params to evaluate)")
    metric = c.eval.best_metric
    _check("eval.best_metric", v > 0 or not metric.startswith(("val/", "val_ema/")),
           f"{metric!r} needs data.validation_fraction > 0")
    _check("eval.best_metric", v == 0 or metric.startswith(("val/", "val_ema/")),
           f"with data.validation_fraction > 0 the held-out rows select the best epoch: name a "
           f"val/ or val_ema/ metric (e.g. val/average), got {metric!r}")
    _check("eval.best_metric", c.eval.use_ema or "_ema/" not in metric,
           f"{metric!r} needs eval.use_ema")
    # The keys an epoch's record holds (evaluation.record_splits, with "_ema" copies).
    prefixes = ["dev"] + ["val"] * (v > 0) + ["train"] * (c.eval.train_sample > 0)
    prefixes += [f"{p}_ema" for p in prefixes if p != "train"] if c.eval.use_ema else []
    names = [*c.tasks, "average", "overall"]
    prefix, _, name = metric.partition("/")
    _check("eval.best_metric", prefix in prefixes and name in names,
           f"{metric!r} is not in an epoch's record: name <{'|'.join(prefixes)}>/"
           f"<{'|'.join(names)}>")
    _check("eval.batch_size", c.eval.batch_size > 0, f"must be positive, got {c.eval.batch_size}")
    _check("eval.train_sample", c.eval.train_sample >= 0,
           f"must be >= 0 (0: no train sample), got {c.eval.train_sample}")
    _check("eval.train_sample_from", c.eval.train_sample_from in TRAIN_SAMPLES,
           f"{c.eval.train_sample_from!r} is not {'|'.join(TRAIN_SAMPLES)}")
    _check("checkpoint.every_steps", c.checkpoint.every_steps > 0, "must be positive")
    _check("checkpoint.keep", c.checkpoint.keep > 0, "must be positive")
    _check("log_every_steps", c.log_every_steps > 0, "must be positive")


def unknown_key_message(name: str, section: ml_collections.ConfigDict) -> str:
    """'config.train.lerning_rate: unknown key; config.train has: ...' (one line)."""
    parent = name.rpartition(".")[0]
    where = f"config.{parent}" if parent else "config"
    return f"config.{name}: unknown key; {where} has: {', '.join(sorted(section.keys()))}"


def fields(node, prefix: str = "") -> dict[str, Any]:
    """Every field of a config (a ConfigDict, or its `to_dict()`) by dotted name, its
    sections descended into; a task declared in extra_tasks is one field,
    `extra_tasks.<name>` (declarations are free-form)."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        name = prefix + key
        if isinstance(value, ml_collections.ConfigDict | dict) and prefix != "extra_tasks.":
            out.update(fields(value, name + "."))
        else:
            out[name] = value
    return out


def check_key(name: str) -> None:
    """Raises ConfigError for a dotted key (a --config.<name> override, a field of a given
    or saved config) that names no field of base()."""
    node, parts = base(), name.split(".")
    for i, key in enumerate(parts):
        if i == 1 and parts[0] == "extra_tasks":
            return  # declared tasks are free-form
        if not isinstance(node, ml_collections.ConfigDict) or key not in node:
            raise ConfigError(unknown_key_message(".".join(parts[:i + 1]), node))
        node = node[key]


def from_dict(values) -> ml_collections.ConfigDict:
    """A config from its `to_dict()` (a run's config.json), checked and validated.

    Fields the dict lacks (written before they existed) take `LEGACY_DEFAULTS`,
    else their default.
    """
    c = base()
    given = fields(_renamed(values))
    for name, value in {**LEGACY_DEFAULTS, **given}.items():
        check_key(name)
        section, _, key = name.rpartition(".")
        node = c
        for part in filter(None, section.split(".")):
            node = node[part]
        try:
            node[key] = tuple(value) if isinstance(node.get(key), tuple) else value
        except TypeError as e:
            raise ConfigError(f"config.{name}: {e}") from None
    validate(c)
    return c


# The value that reproduces a run saved before the field existed.
LEGACY_DEFAULTS = {"eval.train_sample_from": "head"}
# Fields saved under an earlier name: old name -> name.
RENAMED = {"model.checkpoint": "model.encoder", "train.mode": "train.trainable"}


def _renamed(values):
    """A copy of a saved config dict with RENAMED keys under their current names."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for old, new in RENAMED.items():
        (section, key), (_, new_key) = old.split("."), new.split(".")
        node = out.get(section)
        if isinstance(node, dict) and key in node and new_key not in node:
            node[new_key] = node.pop(key)
    return out
