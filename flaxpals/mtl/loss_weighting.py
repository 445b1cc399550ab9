"""Loss weightings: the gradient of sum_i w_i L_i, as optax transformations.

In the additive step every task's gradient g_i = grad L_i is at hand, so the
gradient of a weighted sum of losses is sum_i w_i g_i: these transformations
take the per-task gradients stacked on a leading task axis, like the
combiners (core.py), plus the step's per-task losses, stacked [T], as the
extra argument `losses` (`tx.update(grads, state, params, losses=losses)`;
optax.chain forwards it to the transformations that take extra arguments and
not to the others). The weights w are computed inside the transformation and
kept, with what they learn from, in its state (so orbax checkpoints them with
the optimiser state).

uncertainty  Kendall, Gal & Cipolla 2018, "Multi-Task Learning Using Uncertainty to
             Weigh Losses": learned s_i = log sigma_i^2 and the loss
             sum_i exp(-s_i) L_i + s_i, so w_i = exp(-s_i) and
             dLoss/ds_i = 1 - exp(-s_i) L_i; s (0 at first: the plain sum) takes an
             Adam step of its own (`lr`) on that gradient each update, with the
             model's step. One form for every task: the paper's regression
             (1/(2 sigma^2) L + log sigma) and classification (1/sigma^2 L +
             log sigma) losses are this one times 1/2, after the shift
             s -> s - log 2 for classification; this form settles at
             w_i = 1 / L_i (the paper's, being half of it, at 1 / (2 L_i)): the
             same relative weights.
dwa          Dynamic Weight Average, Liu, Johns & Davison 2019, "End-to-End
             Multi-Task Learning with Attention":
             w_i = K softmax_i(r / T), r_i = L_i(n-1) / L_i(n-2), where L_i(n) is
             task i's mean loss over window n; w = 1 for the first two windows.
             The paper's windows are epochs; ours are `window` steps (our runs
             have 3 epochs, which would leave DWA one epoch of effect).
famo         FAMO, Liu et al. 2023, "Fast Adaptive Multitask Optimization":
             z = softmax(xi), w_i = c z_i / (L_i + eps), c = 1 / sum_j z_j / (L_j + eps)
             (d = sum_i c z_i grad log L_i, a convex combination). The logits xi
             (0 at first) move after each step: with
             Delta_i = log(L_i + eps) before - after the step,
             delta = J_z(xi)^T Delta = z * (Delta - z . Delta), xi takes an Adam step
             (`lr`) on delta + gamma xi (`decay`), the authors' practical form of the
             paper's xi <- xi - beta (delta + gamma xi). Departure: the paper measures
             the loss after the step on the same batch, with an extra forward pass;
             we take the next step's losses (the next batches), which every step
             computes anyway, so xi moves at the start of the next update. Batch
             noise mostly cancels over consecutive Deltas (each batch's loss enters
             once with each sign). The authors' code's optional offset of the
             losses (`min_losses`, 0 by default) is left out: our losses are >= 0.

Only the shared leaves are weighted: task-specific leaves (heads, adapters) get
their own task's gradient untouched, as with every combiner. A weight on a
head's own gradient would only rescale that head's step, which AdamW undoes;
what these methods balance is the tasks' pull on the shared encoder.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flaxpals import config_lib
from flaxpals.mtl import core
from flaxpals.mtl.core import Array, Mask

FAMO_EPS = 1e-8


class UncertaintyState(NamedTuple):
    """log_vars: s [T]; adam: the Adam state of s."""

    log_vars: Array
    adam: Any


class DWAState(NamedTuple):
    """count: int32 updates done; window_sum: [T] losses summed over the current window;
    last, before: [T] mean losses of the last two complete windows; windows: int32
    complete windows so far."""

    count: Array
    window_sum: Array
    last: Array
    before: Array
    windows: Array


class FAMOState(NamedTuple):
    """logits: xi [T]; adam: the Adam state of xi; prev_log_losses: [T] log(L + eps) of
    the last update; count: int32 updates done."""

    logits: Array
    adam: Any
    prev_log_losses: Array
    count: Array


# ---------------------------------------------------------------------------
# The weights (pure)


def dwa_weights(last: Array, before: Array, windows: Array, temperature: float) -> Array:
    """K softmax(last / before / T) once two windows are complete, else ones."""
    k = last.shape[0]
    ratio = last / jnp.where(before > 0, before, 1)
    return jnp.where(windows >= 2, k * jax.nn.softmax(ratio / temperature), 1)


def famo_weights(logits: Array, losses: Array) -> Array:
    """c z_i / (L_i + eps), summing to 1."""
    w = jax.nn.softmax(logits) / (losses + FAMO_EPS)
    return w / jnp.sum(w)


def famo_logit_grad(logits: Array, prev_log_losses: Array, log_losses: Array) -> Array:
    """J_z^T Delta, Delta = the decrease of each log loss: z * (Delta - z . Delta)."""
    z = jax.nn.softmax(logits)
    delta = prev_log_losses - log_losses
    return z * (delta - z @ delta)


# ---------------------------------------------------------------------------
# Transformations


def _weighting(who, shared, num_tasks, init, coefs_fn):
    return core.coefficient_transform(who, shared, num_tasks, init, coefs_fn,
                                         needs_gram=False, needs_losses=True)


def uncertainty(shared: Mask, num_tasks: int, *, lr: float = 1e-3
                ) -> optax.GradientTransformationExtraArgs:
    adam = optax.adam(lr)

    def init():
        s = jnp.zeros((num_tasks,), core.gram_dtype())
        return UncertaintyState(s, adam.init(s))

    def coefs_fn(_, state, losses):
        w = jnp.exp(-state.log_vars)
        step, opt = adam.update(1 - w * losses, state.adam)
        return w, UncertaintyState(state.log_vars + step, opt)

    return _weighting("uncertainty", shared, num_tasks, init, coefs_fn)


def dwa(shared: Mask, num_tasks: int, *, temperature: float = 2.0, window: int = 100
        ) -> optax.GradientTransformationExtraArgs:
    if temperature <= 0 or window < 1:
        raise ValueError(f"dwa: needs temperature > 0 and window >= 1, got {temperature}, "
                         f"{window}")

    def init():  # distinct arrays: a donated state must not hold one buffer twice
        zeros = lambda: jnp.zeros((num_tasks,), core.gram_dtype())
        return DWAState(jnp.zeros((), jnp.int32), zeros(), zeros(), zeros(),
                        jnp.zeros((), jnp.int32))

    def coefs_fn(_, state, losses):
        w = dwa_weights(state.last, state.before, state.windows, temperature)
        total = state.window_sum + losses
        count = state.count + 1
        done = count % window == 0
        return w, DWAState(count, jnp.where(done, 0, total),
                           jnp.where(done, total / window, state.last),
                           jnp.where(done, state.last, state.before),
                           state.windows + done.astype(jnp.int32))

    return _weighting("dwa", shared, num_tasks, init, coefs_fn)


def famo(shared: Mask, num_tasks: int, *, lr: float = 0.025, decay: float = 1e-3
         ) -> optax.GradientTransformationExtraArgs:
    adam = optax.adam(lr)

    def init():
        xi = jnp.zeros((num_tasks,), core.gram_dtype())
        return FAMOState(xi, adam.init(xi), jnp.zeros_like(xi), jnp.zeros((), jnp.int32))

    def coefs_fn(_, state, losses):
        log_losses = jnp.log(losses + FAMO_EPS)
        grad = (famo_logit_grad(state.logits, state.prev_log_losses, log_losses)
                + decay * state.logits)
        step, opt = adam.update(grad, state.adam)
        first = state.count == 0  # no earlier loss to compare with
        logits = jnp.where(first, state.logits, state.logits + step)
        opt = jax.tree.map(lambda new, old: jnp.where(first, old, new), opt, state.adam)
        return famo_weights(logits, losses), FAMOState(logits, opt, log_losses,
                                                       state.count + 1)

    return _weighting("famo", shared, num_tasks, init, coefs_fn)


# The weightings by config_lib.LOSS_WEIGHTINGS name, from the `train` config; none has
# none: the trainer sums the losses.
_FROM_CONFIG = {
    "uncertainty": lambda t, shared, k: uncertainty(shared, k, lr=t.uncertainty_lr),
    "dwa": lambda t, shared, k: dwa(shared, k, temperature=t.dwa_temperature,
                                    window=t.dwa_window),
    "famo": lambda t, shared, k: famo(shared, k, lr=t.famo_lr, decay=t.famo_decay),
}
assert ("none", *_FROM_CONFIG) == config_lib.LOSS_WEIGHTINGS


def from_config(train_cfg, shared: Mask, num_tasks: int) -> optax.GradientTransformation:
    """The weighting `config_lib.loss_weighting(train_cfg)` names (not "none")."""
    name = config_lib.loss_weighting(train_cfg)
    if name not in _FROM_CONFIG:
        raise ValueError(f"loss weighting {name!r} is not one of "
                         f"{config_lib.LOSS_WEIGHTINGS[1:]}")
    return _FROM_CONFIG[name](train_cfg, shared, num_tasks)
