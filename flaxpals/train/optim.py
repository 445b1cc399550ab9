"""The optimiser: AdamW with a weight-decay mask, a schedule, clipping, frozen parts.

`make_optimizer(config.train, params, num_steps, combiner)` returns

    chain(multi_transform(chain(combiner?, clip_by_global_norm,
                                adamw(schedule, decay mask),
                                scale_by_layer_decay?)),
          ema_params_transform?)

The `multi_transform` (present only when something is frozen) gives frozen
parts (the encoder in `adapters_only` mode, encoder and adapters in
`head_only` mode) zero updates and no optimiser state. `combiner` (a gradient
combiner or loss weighting, `combiners.from_config`; None for the plain sum) is
given for the additive method, whose gradients then carry a leading task axis.
The two optional parts are absent at their defaults, so the optimiser state and
every update are then exactly those of the plain chain:

- `scale_by_layer_decay` (train.layer_decay < 1): layer-wise learning-rate
  decay. AdamW's final update of a parameter at depth k is multiplied by
  decay ** (L + 1 - k), L the encoder's layer count, with depths
      encoder/embeddings/...        0
      encoder/layer_{i}/...         i + 1
      everything else               L + 1   (pooler, adapters, heads: the full rate)
  Scaling the final update scales the learning rate of that depth, weight
  decay included, as per-group learning rates would.
- `ema_params_transform` (train.ema_decay > 0): weight averaging. Its state holds an
  exponential moving average of the params after each update,
      ema <- d * ema + (1 - d) * (params + updates),   ema = params at init,
  so it lives in the optimiser state and is checkpointed with it;
  `ema_params(opt_state)` reads it, `eval_weights` and `scored_weights` say
  which weights the trainer evaluates and keeps as the best checkpoint's. It is
  last in the chain, so `updates` are the final ones and frozen parts (zero
  updates) average to themselves.

Isolating tasks (a step on task t moves no other task's adapter or head, not
even through weight decay or Adam momentum) is `task_params.keep_other_tasks`.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flaxpals import config_lib

# The top-level param groups each train.trainable value freezes.
_FROZEN = {"finetune": (), "adapters_only": ("encoder",), "head_only": ("encoder", "adapters")}
assert tuple(_FROZEN) == config_lib.TRAINABLE

# Params whose name says they are a bias or a LayerNorm, as in the Hugging Face recipe.
_NO_DECAY = re.compile(r"(^|/)(bias|scale)$|LayerNorm")
# The encoder's layers (adapters have layer_{i} keys too, under adapters/<task>/).
_ENCODER_LAYER = re.compile(r"^encoder/layer_(\d+)/")


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def decay_mask(params, kind: str = "no_bias_norm"):
    """True where weight decay applies: every param but biases and LayerNorms (or all)."""
    if kind not in config_lib.DECAY_MASKS:
        raise ValueError(f"train.decay_mask={kind!r} is not one of {config_lib.DECAY_MASKS}")
    return jax.tree_util.tree_map_with_path(
        lambda p, _: kind == "all" or not _NO_DECAY.search(path_str(p)), params)


def trainable_labels(params, cfg):
    """'train' or 'freeze' per param leaf for the `train` config's trainable set
    (`config_lib.trainable`)."""
    frozen = _FROZEN[config_lib.trainable(cfg)]
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "freeze" if getattr(p[0], "key", None) in frozen else "train", params)


def schedule(cfg, num_steps: int) -> optax.Schedule:
    """The learning rate per step of the `train` config's schedule
    (`config_lib.lr_schedule`)."""
    kind = config_lib.lr_schedule(cfg)
    if kind == "constant":
        return optax.constant_schedule(cfg.learning_rate)
    if kind == "warmup_linear":
        warmup = int(round(cfg.warmup_fraction * num_steps))
        return optax.join_schedules([
            optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1)),
            optax.linear_schedule(cfg.learning_rate, 0.0, max(num_steps - warmup, 1)),
        ], [warmup])
    raise ValueError(f"train.schedule={kind!r} is not one of {config_lib.LR_SCHEDULES}")


def encoder_layers(params) -> int:
    """L: how many encoder/layer_{i} the param tree holds."""
    found = {int(m.group(1)) for p, _ in jax.tree_util.tree_leaves_with_path(params)
             if (m := _ENCODER_LAYER.match(path_str(p)))}
    if found != set(range(len(found))):
        raise ValueError(f"encoder layers {sorted(found)} are not numbered 0..L-1")
    return len(found)


def layer_depth(path: str, num_layers: int) -> int:
    """The depth of the param at `path` for layer-wise decay (module docstring)."""
    if path.startswith("encoder/embeddings/"):
        return 0
    m = _ENCODER_LAYER.match(path)
    return int(m.group(1)) + 1 if m else num_layers + 1


def scale_by_layer_decay(decay: float, num_layers: int) -> optax.GradientTransformation:
    """Multiplies the update of each param by decay ** (num_layers + 1 - its depth).

    Stateless; reads the depth off each leaf's path, so it also works on the
    masked trees `optax.multi_transform` hands its inner transformations.
    """
    def scale(path, u):
        power = num_layers + 1 - layer_depth(path_str(path), num_layers)
        return u if power == 0 else u * jnp.asarray(decay ** power, u.dtype)

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class EmaParamsState(NamedTuple):
    ema: Any  # the params' exponential moving average (the params' tree)


def ema_params_transform(decay: float) -> optax.GradientTransformation:
    """Keeps ema <- decay * ema + (1 - decay) * (params + updates); updates pass unchanged.

    Put it last in a chain: `params + updates` is then the new params.
    """
    if not 0.0 < decay < 1.0:
        raise ValueError(f"train.ema_decay={decay} is not in (0, 1)")

    def init(params):
        # A copy: a donated TrainState must not hold one buffer in two places.
        return EmaParamsState(ema=jax.tree.map(lambda p: jnp.array(p, copy=True), params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("ema_params_transform needs the params")
        ema = jax.tree.map(lambda e, p, u: decay * e + (1.0 - decay) * (p + u),
                           state.ema, params, updates)
        return updates, EmaParamsState(ema=ema)

    return optax.GradientTransformation(init, update)


def ema_state(opt_state) -> EmaParamsState | None:
    """The EmaParamsState inside an optimiser state (or the state itself), or None."""
    found = [x for x in jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda x: isinstance(x, EmaParamsState))
        if isinstance(x, EmaParamsState)]
    if len(found) > 1:
        raise ValueError(f"{len(found)} EmaParamsState in one optimiser state")
    return found[0] if found else None


def ema_params(opt_state):
    """The EMA of the params an optimiser state holds (train.ema_decay > 0), or None."""
    state = ema_state(opt_state)
    return None if state is None else state.ema


def eval_weights(params, opt_state, use_ema: bool) -> dict[str, Any]:
    """The weights to evaluate, by record tag: {"": params}, and with `use_ema`
    (eval.use_ema) also {"_ema": the EMA weights} (`dev_ema/...` figures)."""
    out = {"": params}
    if use_ema:
        ema = ema_params(opt_state)
        if ema is None:
            raise ValueError("eval.use_ema needs train.ema_decay > 0 (no EMA in the "
                             "optimiser state)")
        out["_ema"] = ema
    return out


def scored_weights(params, opt_state, best_metric: str):
    """The weights `best_metric` (eval.best_metric) scores: the EMA weights for a
    dev_ema/... or val_ema/... metric, else the params. The best checkpoint holds
    these as its params, so --mode=eval|predict read what was selected."""
    tag = scored_tag(best_metric)
    return eval_weights(params, opt_state, use_ema=bool(tag))[tag]


def scored_tag(best_metric: str) -> str:
    """The record tag (`eval_weights`' key) of the weights `best_metric` scores."""
    return "_ema" if best_metric.split("/", 1)[0].endswith("_ema") else ""


def make_optimizer(cfg, params, num_steps: int,
                   combiner: optax.GradientTransformation | None = None
                   ) -> optax.GradientTransformation:
    """cfg: the `train` config (learning_rate, schedule, warmup_fraction, weight_decay,
    decay_mask, grad_clip, trainable, adam_b1, adam_b2, adam_eps, layer_decay, ema_decay)."""
    parts = [] if combiner is None else [combiner]
    if cfg.grad_clip:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(schedule(cfg, num_steps), b1=cfg.adam_b1, b2=cfg.adam_b2,
                             eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask(params, cfg.decay_mask)))
    if cfg.layer_decay != 1.0:  # its range is config_lib.validate's to check
        parts.append(scale_by_layer_decay(cfg.layer_decay, encoder_layers(params)))
    tx = optax.chain(*parts)
    labels = trainable_labels(params, cfg)
    if not all(label == "train" for label in jax.tree_util.tree_leaves(labels)):
        tx = optax.multi_transform({"train": tx, "freeze": _zero_like_params()}, labels)
    if cfg.ema_decay > 0:
        tx = optax.chain(tx, ema_params_transform(cfg.ema_decay))
    return tx


def _zero_like_params() -> optax.GradientTransformation:
    """set_to_zero with the parameters' shapes: a combiner's gradients of frozen leaves
    arrive stacked [tasks, ...], and their (zero) updates must still fit the params."""
    def update_fn(updates, state, params=None):
        return jax.tree.map(jnp.zeros_like, updates if params is None else params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
