"""The core shared by the multi-task gradient combiners (pcgrad.py, combiners.py,
loss_weighting.py).

Every combiner is an optax transformation over per-task gradients stacked on a
leading task axis (every leaf [T, *param_shape]) that returns one
parameter-shaped update. A `shared` mask (a tree, or a prefix of one, of bools;
or a function params -> that tree) tells the leaves shared by all tasks from
the task-specific ones (heads, adapters):

- shared leaves get sum_t c[t] g[t] for coefficients c [T] that the method
  computes from the T x T Gram matrix of the shared gradients (and its state,
  and for loss weightings the per-task losses);
- task-specific leaves get the sum over the task axis, i.e. their own task's
  gradient untouched (the other tasks' gradients are zero there).

Everything a method needs is k x k (k = T), so it costs next to nothing beside
the T(T+1)/2 reductions of the Gram matrix, which is accumulated in float32
(float64 when `jax_enable_x64` is on) whatever the gradients' dtype.
`coefficient_transform` builds such a transformation from a method's
`coefs_fn(gram, state, losses) -> (coefs, new_state)`.

Every such transformation (and pcgrad built with `num_tasks`) keeps the last
step's coefficients, and Gram matrix when it computes one, in its state
(`CombinerState`);
`step_stats(opt_state, task_names)` turns them into the step's metrics:
coef/<task> = c[t]; and with a Gram matrix, task_grad_norm/<task> = |g_t|,
share/<task> = c[t] (G c)[t] / c^T G c, task t's part of the shared update d
along d (the shares sum to 1), and sum_share/<task>, the share the plain sum
(c = 1) would give at the same gradients, for comparison. The trainer logs
them to TensorBoard and their epoch means to metrics.jsonl.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
PyTree = Any
Mask = PyTree | Callable[[PyTree], PyTree]
# coefs_fn(gram [T, T] or None, state, losses [T] or None) -> (coefs [T], new state)
CoefsFn = Callable[[Array | None, Any, Array | None], tuple[Array, Any]]
STAT_PREFIXES = ("coef/", "share/", "sum_share/", "task_grad_norm/")  # step_stats' metric names


class CombinerState(NamedTuple):
    """A combiner's state: the method's own, and what its last update used.

    inner: the method's state. coefs: [T], the last update's coefficients (0
    before the first), or () when not kept (`pcgrad` without num_tasks). gram:
    [T, T], the last Gram matrix of the shared gradients, or () for a method
    that computes none (the loss weightings).
    """

    inner: Any
    coefs: Array | tuple
    gram: Array | tuple

    def after(self, inner: Any, coefs: Array, gram: Array | None) -> CombinerState:
        """The next state: `inner`, and the update's coefficients and Gram matrix where
        this state keeps them (in its dtypes, so the state's shapes and types stay put)."""
        def kept(old, new):
            return () if isinstance(old, tuple) or new is None else new.astype(old.dtype)

        return CombinerState(inner, kept(self.coefs, coefs), kept(self.gram, gram))


def combiner_state(inner: Any, num_tasks: int, with_gram: bool = True) -> CombinerState:
    """The state before the first update: coefficients and Gram matrix all zero."""
    t, dtype = int(num_tasks), gram_dtype()
    return CombinerState(inner, jnp.zeros((t,), dtype),
                         jnp.zeros((t, t), dtype) if with_gram else ())


def step_stats(opt_state: PyTree, task_names: Sequence[str]) -> dict[str, Array]:
    """The metrics of the last update's combination (module docstring); {} without one."""
    found = [x for x in jax.tree.leaves(opt_state,
                                        is_leaf=lambda x: isinstance(x, CombinerState))
             if isinstance(x, CombinerState)]
    if not found:
        return {}
    if len(found) > 1:
        raise ValueError(f"the optimiser state holds {len(found)} combiners; one at most")
    (state,) = found
    if isinstance(state.coefs, tuple):  # built without num_tasks: nothing kept
        return {}
    if state.coefs.shape != (len(task_names),):
        raise ValueError(f"combiner state for {state.coefs.shape[0]} tasks, "
                         f"given {len(task_names)} task names")
    out = {f"coef/{t}": state.coefs[i] for i, t in enumerate(task_names)}
    if isinstance(state.gram, tuple):
        return out
    gram = state.gram
    share, sum_share = (_shares(gram, c) for c in (state.coefs.astype(gram.dtype),
                                                   jnp.ones(gram.shape[0], gram.dtype)))
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0))
    for i, t in enumerate(task_names):
        out[f"share/{t}"] = share[i]
        out[f"sum_share/{t}"] = sum_share[i]
        out[f"task_grad_norm/{t}"] = norms[i]
    return out


def _shares(gram: Array, coefs: Array) -> Array:
    """c_t <g_t, d> / |d|^2 for d = sum_t c_t g_t: [T], summing to 1."""
    along = coefs * (gram @ coefs)
    total = jnp.sum(along)
    # Before the first update (or with zero gradients) d = 0: shares 0, not NaN.
    return jnp.where(total > 0, along / jnp.where(total > 0, total, 1), 0)


def gram_dtype():
    """float32, or float64 when x64 is on: the dtype of the Gram matrix and the k x k math."""
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


@functools.partial(jax.jit, static_argnums=1)
def gram_matrix(leaves: list[Array], num_tasks: int) -> Array:
    """G[j, k] = <g_j, g_k> over the concatenation of `leaves` (each [T, *shape]). [T, T].

    One fused reduction of g[j] * g[k] per pair j <= k and leaf, accumulated in
    `gram_dtype()`. Slicing (rather than one [T, n] x [n, T] product) lets XLA
    read the per-task gradients where they are when the caller built the
    stacked leaves with `jnp.stack` inside the same jit: the slice of a
    concatenation simplifies to its operand, so the stack is never written.
    """
    dtype = gram_dtype()
    t = num_tasks
    entries = {}
    for j in range(t):
        for k in range(j, t):
            entries[j, k] = functools.reduce(
                lambda a, b: a + b,
                [jnp.sum(g[j].astype(dtype) * g[k].astype(dtype)) for g in leaves],
                jnp.zeros((), dtype))
    return jnp.stack([jnp.stack([entries[min(j, k), max(j, k)] for k in range(t)])
                      for j in range(t)])


def broadcast_mask(mask: PyTree, updates: PyTree) -> list[bool]:
    """The flat list of booleans, one per leaf of `updates` (mask may be a tree prefix)."""
    try:
        full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: bool(m), sub), mask, updates)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "the shared mask must have the parameters' tree structure (or a prefix "
            f"of it) with bool leaves: {e}") from e
    return jax.tree.leaves(full)


def num_tasks_of(leaves: list[Array]) -> int:
    """T, the leading axis every leaf must share."""
    if not leaves:
        raise ValueError("the updates tree has no leaves")
    sizes = {g.shape[0] if g.ndim else None for g in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "every update leaf needs the same leading task axis T, got leading "
            f"sizes {sorted(s for s in sizes if s is not None)}"
            f"{' and scalar leaves' if None in sizes else ''}")
    return sizes.pop()


def task_sum(terms) -> Array:
    """The sum of per-task gradient leaves, as the left fold terms[0] + terms[1] + ...

    The one definition of the additive combination: `combine_leaf` (stacked
    leaves) and `Steps.apply_combined` (unstacked ones, with no [T, ...] copy)
    both sum through it, so the two give the same bits.
    """
    return functools.reduce(lambda a, b: a + b, terms)


def combine_leaf(g: Array, coefs: Array | None, divide: int = 1) -> Array:
    """sum_t coefs[t] g[t] (plain sum when coefs is None), divided by `divide` if > 1.

    Written as an unrolled left fold g[0] c[0] + g[1] c[1] + ...: on XLA:CPU
    (jax 0.10) `jnp.sum(c[:, None] * g, axis=0)` on the [3, 30522, 384] word
    embedding gradient took 88 s and `jnp.sum(g, axis=0)` 0.6 s, the fold
    0.04 s. A weight of exactly 1 multiplies exactly, so with W = I the result
    is bit for bit the plain fold g[0] + g[1] + ..., which is `sum_combine`.
    """
    terms = [g[t] if coefs is None else g[t] * coefs[t].astype(g.dtype)
             for t in range(g.shape[0])]
    out = task_sum(terms)
    return out / divide if divide > 1 else out


def resolve_mask(mask: Mask | None, params: PyTree | None, updates: PyTree) -> PyTree | None:
    if callable(mask):
        # Called on the parameters when given, else on the (stacked) updates: a mask
        # function should depend only on the tree's paths.
        return mask(params if params is not None else updates)
    return mask


def seed_key(seed: int | Array) -> tuple[Callable[[], Array], str]:
    """(a function making the seed's uint32 key data, the PRNG implementation's name)."""
    if isinstance(seed, int | np.integer):
        impl = jax.config.jax_default_prng_impl
        return (lambda: jax.random.key_data(jax.random.key(int(seed), impl=impl))), impl
    if isinstance(seed, jax.Array) and jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
        if seed.shape:
            raise ValueError(f"seed must be a single key, got shape {seed.shape}")
        data = jax.random.key_data(seed)
        return (lambda: data), str(jax.random.key_impl(seed))
    data = jnp.asarray(seed)
    if data.dtype != jnp.uint32:
        raise ValueError(f"seed must be an int, a typed key or uint32 key data, "
                         f"got dtype {data.dtype}")
    impl = jax.config.jax_default_prng_impl
    jax.random.wrap_key_data(data, impl=impl)  # raises on a wrong shape
    return (lambda: data), impl


def coefficient_transform(who: str, shared: Mask, num_tasks: int,
                          init_fn: Callable[[], Any], coefs_fn: CoefsFn, *,
                          needs_gram: bool = True, needs_losses: bool = False
                          ) -> optax.GradientTransformationExtraArgs:
    """A combiner from a method's coefficient function (see the module docstring).

    who: the method's name, for errors. init_fn(): the state (arrays only, so
    orbax saves it; `num_tasks` fixes its shapes). needs_gram: compute the Gram
    matrix (the loss weightings do not). needs_losses: `update` must be given
    `losses=` (stacked [T], the per-task losses of the step), which optax.chain
    forwards to transformations that accept extra arguments.
    """
    t = int(num_tasks)
    if t < 1:
        raise ValueError(f"{who}: num_tasks must be >= 1, got {t}")

    def update_fn(updates, state, params=None, *, losses=None, **extra_args):
        del extra_args
        mask = resolve_mask(shared, params, updates)
        leaves, treedef = jax.tree.flatten(updates)
        flags = broadcast_mask(mask, updates)
        if num_tasks_of(leaves) != t:
            raise ValueError(f"{who}: built for {t} tasks, got updates with leading axis "
                             f"{num_tasks_of(leaves)}")
        if needs_losses:
            if losses is None:
                raise ValueError(f"{who} needs the per-task losses: tx.update(..., losses=[T])")
            losses = jnp.asarray(losses, gram_dtype())
            if losses.shape != (t,):
                raise ValueError(f"{who}: losses must have shape ({t},), got {losses.shape}")
        gram = (gram_matrix([g for g, s in zip(leaves, flags, strict=True) if s], t)
                if needs_gram else None)
        coefs, inner = coefs_fn(gram, state.inner, losses if needs_losses else None)
        out = [combine_leaf(g, coefs if s else None) for g, s in zip(leaves, flags, strict=True)]
        return jax.tree.unflatten(treedef, out), state.after(inner, coefs, gram)

    return optax.GradientTransformationExtraArgs(
        lambda params: combiner_state(init_fn(), t, needs_gram), update_fn)
