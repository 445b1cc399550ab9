"""PCGrad gradient surgery (Yu et al. 2020) as an optax gradient transformation.

The transformation takes per-task gradients stacked on a leading task axis and
returns one combined, parameter-shaped update, so it is chained before
clipping and the optimiser:

    tx = optax.chain(pcgrad(shared_mask), optax.clip_by_global_norm(1.0), optax.adamw(lr))
    stacked = jax.tree.map(lambda *g: jnp.stack(g), *per_task_grads)   # leaves [T, *shape]
    updates, state = tx.update(stacked, state, params)

Algorithm 1 of the paper ("Gradient Surgery for Multi-Task Learning"), what we do:

    for each task i:                       g_i^PC = g_i
        for each j != i, in a random order drawn afresh for this i and this step:
            if g_i^PC . g_j < 0:           # against the ORIGINAL g_j
                g_i^PC -= (g_i^PC . g_j) / (||g_j||^2 + eps) * g_j
    update = sum_i g_i^PC                  # `reduction="mean"` divides by T

- Dot products and norms are taken over all *shared* parameters at once (the
  concatenation of every shared leaf), not tensor by tensor.
- Task-specific leaves (heads, adapters; `shared` is False) are not projected:
  each gets its own task's gradient, i.e. the sum over the task axis (the other
  tasks' gradients are zero there), whatever the reduction.
- The orders come from a key held in the state: at step s the key is
  `fold_in(key, s)`, and task i's order is a permutation drawn from
  `fold_in(that, i)` (see `task_orders`). Same seed, same results; different
  steps, different orders.

How it is computed (a T x T coefficient matrix over the Gram matrix of the
task gradients) and how it departs from popular implementations, and why:
docs/design/pcgrad.md. The Gram matrix, the shared mask and the combination by
coefficients are core.py's, shared with the other combiners (combiners.py,
loss_weighting.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from flaxpals.mtl import core
from flaxpals.mtl.core import Array, Mask, PyTree, gram_matrix

REDUCTIONS = ("sum", "mean")


class PCGradState(NamedTuple):
    """PCGrad's own state (the `inner` of its core.CombinerState): arrays, for orbax.

    key: uint32 key data (`jax.random.key_data` of the seed's key).
    count: int32 scalar, the number of updates done so far.
    """

    key: Array
    count: Array


# ---------------------------------------------------------------------------
# Pure functions


@functools.partial(jax.jit, static_argnums=1)
def task_orders(key: Array, num_tasks: int) -> Array:
    """The visiting orders of one step: int32 [T, T-1], row i a permutation of the j != i.

    `key` is the step's key (a typed key; `update` uses `fold_in(state key, count)`).
    Row i is drawn from `fold_in(key, i)`, so rows are independent draws.
    """
    t = int(num_tasks)
    if t < 1:
        raise ValueError(f"num_tasks must be >= 1, got {t}")
    if t == 1:
        return jnp.zeros((1, 0), jnp.int32)

    def row(i):
        perm = jax.random.permutation(jax.random.fold_in(key, i), t - 1)
        # A permutation of 0..T-2 mapped onto {0..T-1} \ {i}: skip i.
        return (perm + (perm >= i)).astype(jnp.int32)

    return jax.vmap(row)(jnp.arange(t))


@jax.jit
def projection_weights(gram: Array, orders: Array, eps: float) -> Array:
    """Algorithm 1 in coefficient space: W [T, T] with g_i^PC = sum_j W[i, j] g_j.

    gram: [T, T] Gram matrix of the original gradients; orders: [T, T-1] from
    `task_orders`. Row i starts at e_i; for each j of orders[i] in turn, if
    W[i] @ gram[:, j] < 0, subtract that over (gram[j, j] + eps) from W[i, j].
    """
    t = gram.shape[0]
    sq_norms = jnp.diagonal(gram)

    def row(i, order):
        def visit(w, j):
            dot = w @ gram[:, j]
            coef = jnp.where(dot < 0, dot / (sq_norms[j] + eps), 0)
            return w.at[j].add(-coef), None

        w0 = jax.nn.one_hot(i, t, dtype=gram.dtype)
        w, _ = jax.lax.scan(visit, w0, order)
        return w

    return jax.vmap(row)(jnp.arange(t), orders)


def _check_reduction(reduction: str):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r} is not one of {REDUCTIONS}")


def pcgrad_combine(grads_stacked: PyTree, shared_mask: PyTree, key: Array,
                   reduction: str = "sum", eps: float = 1e-12) -> PyTree:
    """PCGrad of one step: stacked per-task gradients -> one parameter-shaped gradient.

    grads_stacked: pytree, every leaf [T, *param_shape]. shared_mask: same tree
    (or a prefix) of bools, True for shared leaves. key: the step's typed key
    (orders are `task_orders(key, T)`). Shared leaves: sum (or mean) of the
    projected gradients; task-specific leaves: sum over the task axis.
    """
    return _combine(grads_stacked, shared_mask, key, reduction, eps)[0]


def _combine(grads_stacked, shared_mask, key, reduction, eps):
    """pcgrad_combine's result, the coefficients c [T] of its shared update
    sum_j c[j] g_j (divided by T for "mean"), and the Gram matrix [T, T]."""
    _check_reduction(reduction)
    leaves, treedef = jax.tree.flatten(grads_stacked)
    shared = core.broadcast_mask(shared_mask, grads_stacked)
    t = core.num_tasks_of(leaves)
    shared_leaves = [g for g, s in zip(leaves, shared, strict=True) if s]
    gram = gram_matrix(shared_leaves, t)
    weights = projection_weights(gram, task_orders(key, t), eps)
    coefs = jnp.sum(weights, axis=0)  # the update is sum_j coefs[j] g_j
    divide = t if reduction == "mean" else 1
    out = [core.combine_leaf(g, coefs, divide) if s else core.combine_leaf(g, None, 1)
           for g, s in zip(leaves, shared, strict=True)]
    return jax.tree.unflatten(treedef, out), coefs / divide, gram


def sum_combine(grads_stacked: PyTree, shared_mask: PyTree | None = None,
                reduction: str = "sum") -> PyTree:
    """The additive combination: sum over the task axis (shared leaves averaged for "mean")."""
    _check_reduction(reduction)
    leaves, treedef = jax.tree.flatten(grads_stacked)
    t = core.num_tasks_of(leaves)
    shared = ([True] * len(leaves) if shared_mask is None
              else core.broadcast_mask(shared_mask, grads_stacked))
    divide = t if reduction == "mean" else 1
    out = [core.combine_leaf(g, None, divide if s else 1)
           for g, s in zip(leaves, shared, strict=True)]
    return jax.tree.unflatten(treedef, out)


# ---------------------------------------------------------------------------
# Transformations


def pcgrad(shared: Mask, *, seed: int | Array = 0, reduction: str = "sum",
           eps: float = 1e-12, num_tasks: int | None = None) -> optax.GradientTransformation:
    """PCGrad as an optax transformation (see the module docstring).

    shared: pytree of bools (the parameters' structure or a prefix of it),
      True for the leaves shared by all tasks, or a function params -> that tree.
    seed: int, typed key (`jax.random.key`) or its uint32 key data.
    reduction: "sum" (the paper) or "mean" (divides the shared update by T).
    eps: added to ||g_j||^2 in the projection's denominator.
    num_tasks: T, to keep the last update's coefficients and Gram matrix in the
      state (`core.CombinerState`, for `core.step_stats`); None keeps none.

    `update(updates, state, params=None)`: every leaf of `updates` is
    [T, *param_shape]; returns parameter-shaped updates and the next state.
    """
    _check_reduction(reduction)
    make_key, impl = core.seed_key(seed)

    def init_fn(params):
        del params
        inner = PCGradState(key=make_key(), count=jnp.zeros((), jnp.int32))
        if num_tasks is None:
            return core.CombinerState(inner, (), ())
        return core.combiner_state(inner, num_tasks)

    def update_fn(updates, state, params=None):
        mask = core.resolve_mask(shared, params, updates)
        inner = state.inner
        key = jax.random.fold_in(jax.random.wrap_key_data(inner.key, impl=impl), inner.count)
        out, coefs, gram = _combine(updates, mask, key, reduction, eps)
        if num_tasks is not None and coefs.shape[0] != num_tasks:
            raise ValueError(f"pcgrad: built for {num_tasks} tasks, got updates with "
                             f"leading axis {coefs.shape[0]}")
        inner = PCGradState(key=inner.key, count=optax.safe_increment(inner.count))
        return out, state.after(inner, coefs, gram)

    return optax.GradientTransformation(init_fn, update_fn)
