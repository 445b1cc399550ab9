"""The optimiser: AdamW with a weight-decay mask, a schedule, clipping, frozen parts.

`make_optimizer(config.train, params, num_steps, combiner)` returns

    chain(combiner?, clip_by_global_norm, adamw(schedule, decay mask))

wrapped in `optax.multi_transform` so that frozen parts (the encoder in
`adapters_only` mode, encoder and adapters in `head_only` mode) get zero
updates and no optimiser state. `combiner` (PCGrad or a sum) is given for
the additive method, whose gradients carry a leading task axis.

Isolating tasks (a step on task t moves no other task's adapter or head, not
even through weight decay or Adam momentum) is `task_params.keep_other_tasks`.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

TRAIN_MODES = ("finetune", "adapters_only", "head_only")
SCHEDULES = ("constant", "warmup_linear")
DECAY_MASKS = ("no_bias_norm", "all")

# Params whose name says they are a bias or a LayerNorm, as in the Hugging Face recipe.
_NO_DECAY = re.compile(r"(^|/)(bias|scale)$|LayerNorm")


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def decay_mask(params, kind: str = "no_bias_norm"):
    """True where weight decay applies: every param but biases and LayerNorms (or all)."""
    if kind not in DECAY_MASKS:
        raise ValueError(f"train.decay_mask={kind!r} is not one of {DECAY_MASKS}")
    return jax.tree_util.tree_map_with_path(
        lambda p, _: kind == "all" or not _NO_DECAY.search(path_str(p)), params)


def trainable_labels(params, mode: str):
    """'train' or 'freeze' per param leaf for a training mode."""
    if mode not in TRAIN_MODES:
        raise ValueError(f"train.mode={mode!r} is not one of {TRAIN_MODES}")
    frozen = {"finetune": (), "adapters_only": ("encoder",),
              "head_only": ("encoder", "adapters")}[mode]
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "freeze" if getattr(p[0], "key", None) in frozen else "train", params)


def schedule(cfg, num_steps: int) -> optax.Schedule:
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.learning_rate)
    if cfg.schedule == "warmup_linear":
        warmup = int(round(cfg.warmup_fraction * num_steps))
        return optax.join_schedules([
            optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1)),
            optax.linear_schedule(cfg.learning_rate, 0.0, max(num_steps - warmup, 1)),
        ], [warmup])
    raise ValueError(f"train.schedule={cfg.schedule!r} is not one of {SCHEDULES}")


def make_optimizer(cfg, params, num_steps: int,
                   combiner: optax.GradientTransformation | None = None
                   ) -> optax.GradientTransformation:
    """cfg: the `train` config (learning_rate, schedule, warmup_fraction, weight_decay,
    decay_mask, grad_clip, mode, adam_b1, adam_b2, adam_eps)."""
    parts = [] if combiner is None else [combiner]
    if cfg.grad_clip:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(schedule(cfg, num_steps), b1=cfg.adam_b1, b2=cfg.adam_b2,
                             eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask(params, cfg.decay_mask)))
    tx = optax.chain(*parts)
    labels = trainable_labels(params, cfg.mode)
    if all(label == "train" for label in jax.tree_util.tree_leaves(labels)):
        return tx
    return optax.multi_transform({"train": tx, "freeze": _zero_like_params()}, labels)


def _zero_like_params() -> optax.GradientTransformation:
    """set_to_zero with the parameters' shapes: a combiner's gradients of frozen leaves
    arrive stacked [tasks, ...], and their (zero) updates must still fit the params."""
    def update_fn(updates, state, params=None):
        return jax.tree.map(jnp.zeros_like, updates if params is None else params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
