"""The optimiser: AdamW with a weight-decay mask, a schedule, clipping, frozen parts.

`make_optimizer(config.train, params, num_steps, combiner)` returns

    chain(combiner?, clip_by_global_norm, adamw(schedule, decay mask))

wrapped in `optax.multi_transform` so that frozen parts (the encoder in
`adapters_only` mode, encoder and adapters in `head_only` mode) get zero
updates and no optimiser state. `combiner` (PCGrad or a sum) is given for
the additive method, whose gradients carry a leading task axis.

`select_task` keeps a step for task t from moving any other task's adapter or
head: their params *and* their optimiser state stay as they were, so neither
weight decay nor Adam momentum moves them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
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
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def task_mask(params, task: str, tasks: tuple[str, ...]):
    """True for the leaves a step on `task` may change: shared ones and `task`'s own.

    A leaf belongs to task t when its path is adapters/t/... or heads/t/...
    """
    del tasks

    def owner(path):
        keys = [getattr(k, "key", None) for k in path]
        return keys[1] if keys[0] in ("adapters", "heads") and len(keys) > 1 else None

    return jax.tree_util.tree_map_with_path(
        lambda p, _: owner(p) in (None, task), params)


def shared_mask(params):
    """True for the shared encoder's leaves (what PCGrad projects)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: getattr(p[0], "key", None) == "encoder", params)


def select_task(tx: optax.GradientTransformation, mask, new_params, old_params,
                new_state, old_state) -> tuple[Any, Any]:
    """Keeps old params and old optimiser state wherever `mask` is False.

    The optimiser's non-param fields (step counts, PCGrad's key) take the new value.
    """
    pick: Callable = lambda m, new, old: new if m else old
    params = jax.tree.map(pick, mask, new_params, old_params)
    state_mask = optax.tree_utils.tree_map_params(
        tx, lambda _, m: m, new_state, mask, transform_non_params=lambda _: True,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    state = jax.tree.map(pick, state_mask, new_state, old_state)
    return params, state
