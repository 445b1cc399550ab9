"""Gradient combiners beside PCGrad, as optax transformations on stacked per-task gradients.

Same interface as `pcgrad.pcgrad` (core.py has the conventions): leaves
[T, *param_shape] in, one parameter-shaped update out; shared leaves get
d = sum_i c_i g_i with coefficients c computed from the k x k Gram matrix
G[i, j] = <g_i, g_j> of the shared gradients (k = T); task-specific leaves get
their own task's gradient untouched (the papers apply their rules to shared
parameters only, or say nothing about heads). `build(name, ...)` builds one by
its name (config_lib.COMBINERS but sum); `from_config` builds what the trainer
needs from the `train` config: the combiner `config_lib.combiner` names, or the
loss weighting `config_lib.loss_weighting` names, or None for the plain sum.
The options' ranges (cagrad's c, mgda's task count) are config_lib.validate's
to check.

gradvac      GradVac, Wang et al. 2021, "Gradient Vaccine", Algorithm 1. For each
             task i, the other tasks j in a fresh random order: phi = cos(g_i', g_j);
             if phi < phi_hat[i, j]:
               g_i' += |g_i'| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
                       / (|g_j| sqrt(1 - phi_hat^2)) g_j     (so that cos(g_i', g_j) = phi_hat)
             then phi_hat[i, j] <- (1 - beta) phi_hat[i, j] + beta phi; d = sum_i g_i'.
             The targets phi_hat [T, T] (0 at first) live in the state. Cosines span
             all shared parameters at once (the paper also studies per-layer ones).
cagrad       CAGrad, Liu et al. 2021, "Conflict-Averse Gradient Descent": the primal
             max_d min_i g_i . d s.t. |d - g0| <= c |g0|, through its dual:
             g0 = mean_i g_i, phi = c^2 |g0|^2,
               w* = argmin_{w in simplex} g_w . g0 + sqrt(phi) |g_w|,  g_w = sum_i w_i g_i,
               d = g0 + sqrt(phi) / |g_w*| g_w*.
             The dual is solved by `CAGRAD_STEPS` accelerated projected-gradient steps
             on the simplex (a step chosen each time among `CAGRAD_LADDER` sizes),
             instead of the authors' scipy solver. c = 0 gives the mean gradient.
mgda         MGDA, Sener & Koltun 2018, "Multi-Task Learning as Multi-Objective
             Optimization": d = the min-norm point of the convex hull of the g_i,
             w* = argmin_{w in simplex} w^T G w, solved exactly (every support's KKT
             system at once, for up to config_lib.MGDA_MAX_TASKS tasks) instead of
             Frank-Wolfe.
             On parameter gradients, not the paper's MGDA-UB feature-gradient bound.
imtl_g       IMTL-G, Liu et al. 2021, "Towards Impartial Multi-task Learning", closed
             form: d = sum_i a_i g_i with sum_i a_i = 1 and d . u_1 = d . u_i for all i
             (u_i = g_i / |g_i|): with rows D_i = g_1 - g_i, U_i = u_1 - u_i (i >= 2),
             a_{2..k} = g_1 U^T (D U^T)^-1, a_1 = 1 - sum a_{2..k}. Parameter
             gradients, not the paper's shared-feature gradients; IMTL-L not included.
aligned_mtl  Aligned-MTL, Senushkin et al. 2023, "Independent Component Alignment for
             Multi-Task Learning", Algorithm 1: G = V diag(lambda) V^T, keep the R
             eigenvalues > k eps lambda_max,
               B = sqrt(lambda_R) V diag(lambda^-1/2) V^T,  d = sum_i (B w)_i g_i,
             with equal task weights w = 1 (the aligned gradients summed).
nash_mtl     Nash-MTL, Navon et al. 2022, "Multi-Task Learning as a Bargaining Game":
             alpha > 0 with (G alpha)_i = 1 / alpha_i, d = sum_i alpha_i g_i. Solved
             exactly (not by the paper's sequence of cvxpy problems, nor every few
             steps only) as the minimiser of the strictly convex
             1/2 a^T G a - sum_i log a_i: `NASH_STEPS` damped Newton steps (Nesterov's
             1 / (1 + decrement) until the decrement is < 1/4, then full steps), on
             G / mean(diag G) + `NASH_RIDGE` I (the ridge gives a solution when the
             gradients are linearly dependent, which the paper assumes away). No
             max-norm clip of d (the chain clips by global norm after).

Scales are the papers': pcgrad, gradvac and aligned_mtl sum over tasks; cagrad,
mgda and imtl_g return a convex (mean-like) combination; nash_mtl's scale is
set by its equation. Under AdamW only the clipping threshold sees the scale.
Tolerances of the iterative solvers (tests/test_combiners.py) and the
reasoning behind these choices: docs/design/combiners.md.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxpals import config_lib
from flaxpals.mtl import core, loss_weighting, pcgrad
from flaxpals.mtl.core import Array, Mask

CAGRAD_STEPS = 200
CAGRAD_LADDER = (10, 3.0)  # step sizes eta * 3^j, j = -5..4, around the last accepted eta
NASH_STEPS = 30
NASH_RIDGE = 1e-6


class GradVacState(NamedTuple):
    """key: uint32 key data of the visiting orders; count: int32 updates done;
    targets: [T, T] EMA of the cosines phi_hat[i, j] (diagonal unused)."""

    key: Array
    count: Array
    targets: Array


# ---------------------------------------------------------------------------
# Coefficients from the Gram matrix (pure, jit-able)


@jax.jit
def gradvac_weights(gram: Array, orders: Array, targets: Array, beta: float
                    ) -> tuple[Array, Array]:
    """GradVac in coefficient space: (W [T, T] with g_i' = sum_j W[i, j] g_j, new targets).

    orders: [T, T-1] visiting orders (`pcgrad.task_orders`). A cosine with a zero
    vector counts as 0 and changes nothing; a target of +-1 (never reached by an
    EMA of cosines from 0) would need an infinite step and is skipped.
    """
    t = gram.shape[0]
    sq = jnp.diagonal(gram)

    def row(i, order, target_row):
        def visit(carry, j):
            w, tgt = carry
            n_i = jnp.sqrt(jnp.maximum(w @ gram @ w, 0))
            n_j = jnp.sqrt(jnp.maximum(sq[j], 0))
            ok = (n_i > 0) & (n_j > 0)
            phi = jnp.clip(jnp.where(ok, (w @ gram[:, j]) / jnp.where(ok, n_i * n_j, 1), 0),
                           -1, 1)
            goal = tgt[j]
            root_goal = jnp.sqrt(jnp.maximum(1 - goal * goal, 0))
            apply = ok & (phi < goal) & (root_goal > 0)
            step = (n_i * (goal * jnp.sqrt(jnp.maximum(1 - phi * phi, 0)) - phi * root_goal)
                    / jnp.where(apply, n_j * root_goal, 1))
            w = w.at[j].add(jnp.where(apply, step, 0))
            return (w, tgt.at[j].set((1 - beta) * goal + beta * phi)), None

        (w, tgt), _ = jax.lax.scan(visit, (jax.nn.one_hot(i, t, dtype=gram.dtype), target_row),
                                   order)
        return w, tgt

    return jax.vmap(row)(jnp.arange(t), orders, targets.astype(gram.dtype))


def project_simplex(v: Array) -> Array:
    """Euclidean projection of v [k] onto {w >= 0, sum w = 1} (sort-based, exact)."""
    k = v.shape[-1]
    u = jnp.sort(v)[::-1]
    css = jnp.cumsum(u) - 1
    # The condition holds exactly for the first r sorted entries.
    r = jnp.sum(u - css / jnp.arange(1, k + 1, dtype=v.dtype) > 0)
    return jnp.maximum(v - css[r - 1] / r, 0)


@functools.partial(jax.jit, static_argnames="steps")
def cagrad_coefs(gram: Array, c: float, steps: int = CAGRAD_STEPS) -> Array:
    """CAGrad's d = sum_i coefs_i g_i (module docstring): the dual by projected gradient.

    Solved on G / mean(diag G) with the objective divided by sqrt(phi) (the
    minimiser is unchanged): b.w + |g_w| with b = G 1 / (k sqrt(phi)). Each
    step: Nesterov extrapolation, a gradient step of each size in the ladder,
    the best one kept if it lowers the objective (else the momentum restarts).
    Decreases are computed without cancellation,
    F(v) - F(w) = b.(v - w) + (v - w)^T G (v + w) / (|g_v| + |g_w|),
    so float32 keeps improving where F itself no longer changes.
    """
    k = gram.shape[0]
    dtype = gram.dtype
    mean = jnp.full((k,), 1 / k, dtype)
    scale = jnp.trace(gram) / k
    g = gram / jnp.where(scale > 0, scale, 1)
    rho = c * jnp.sqrt(jnp.maximum(jnp.sum(g) / k**2, 0))  # c |g0|, normalised
    degenerate = ~(rho > 1e-12)  # c = 0 or g0 = 0: the ball is the point g0
    b = g @ mean / jnp.where(degenerate, 1, rho)
    norm = lambda w: jnp.sqrt(jnp.maximum(w @ g @ w, 1e-30))

    def decrease(w, v):  # F(v) - F(w), both rescaled to sum 1 (F is 1-homogeneous)
        dv = v - w
        return (b @ dv + dv @ g @ (v + w) / (norm(v) + norm(w))
                - (b @ v + norm(v)) * jnp.sum(dv))

    size, base = CAGRAD_LADDER
    factors = jnp.asarray(base, dtype) ** (jnp.arange(size) - size // 2).astype(dtype)

    def step(_, carry):
        w, w_prev, t, eta = carry
        t_next = (1 + jnp.sqrt(1 + 4 * t * t)) / 2
        y = project_simplex(w + (t - 1) / t_next * (w - w_prev))
        grad = b + g @ y / norm(y)
        # Centred on y's support (the projection ignores a shift along 1): near the
        # optimum the gradient is nearly constant there, so even a large step keeps
        # y - eta grad near y on the face where the solution lies, and float32 keeps
        # its digits (an uncentred step at eta ~ 1e4 left w off by 1e-3).
        support = (y > 0).astype(dtype)
        grad = grad - (grad @ support) / jnp.sum(support)
        candidates = jax.vmap(lambda e: project_simplex(y - e * grad))(eta * factors)
        gains = jax.vmap(lambda v: decrease(w, v))(candidates)
        best = jnp.argmin(gains)
        better = gains[best] < 0
        # eta shrinks at most 3x a step: momentum alone can make the smallest step the
        # best many times running, and eta must not collapse to 0 meanwhile.
        eta = jnp.where(better, jnp.maximum(eta * factors[best], eta / base), eta)
        return jnp.where(better, candidates[best], w), w, jnp.where(better, t_next, 1), eta

    one = jnp.ones((), dtype)
    w, *_ = jax.lax.fori_loop(0, steps, step, (mean, mean, one, one))
    return jnp.where(degenerate, mean, mean + rho / norm(w) * w)


@functools.cache
def _supports(k: int) -> np.ndarray:
    """Every non-empty subset of range(k) as a bool row: [2^k - 1, k]."""
    return np.array([[bool(m >> i & 1) for i in range(k)] for m in range(1, 2**k)])


@jax.jit
def mgda_coefs(gram: Array) -> Array:
    """argmin over the simplex of w^T G w, exactly.

    For every support S, the KKT system of min w^T G w s.t. sum w = 1, w = 0
    off S: [[G_SS, 1], [1^T, 0]] [w_S; nu] = [0; 1] (rows off S pinned to
    w_i = 0), all solved as one batch. Each finite solution, clipped to w >= 0
    and renormalised, is a point of the simplex; the one of least w^T G w is
    the optimum (its support's system is among them, and no point of the
    simplex is lower). Singular systems (duplicate gradients) drop out, and
    the singletons always solve.
    """
    k = gram.shape[0]
    dtype = gram.dtype
    scale = jnp.trace(gram) / k
    g = gram / jnp.where(scale > 0, scale, 1)  # conditioning only
    s = jnp.asarray(_supports(k))
    n = s.shape[0]
    inside = s[:, :, None] & s[:, None, :]
    eye = jnp.eye(k, dtype=dtype)
    top = jnp.where(inside, g, eye * (~s)[:, :, None])
    ones = s.astype(dtype)
    kkt = jnp.concatenate([
        jnp.concatenate([top, ones[:, :, None]], axis=2),
        jnp.concatenate([ones[:, None, :], jnp.zeros((n, 1, 1), dtype)], axis=2)], axis=1)
    rhs = jnp.zeros((n, k + 1), dtype).at[:, k].set(1)
    w = jnp.linalg.solve(kkt, rhs[..., None])[:, :k, 0]
    w = jnp.maximum(jnp.where(jnp.isfinite(w), w, -1), 0)
    total = jnp.sum(w, axis=1)
    valid = jnp.all(jnp.isfinite(w), axis=1) & (total > 0)
    w = w / jnp.where(valid, total, 1)[:, None]
    value = jnp.where(valid, jnp.einsum("ni,ij,nj->n", w, g, w), jnp.inf)
    return w[jnp.argmin(value)]


@jax.jit
def imtl_g_coefs(gram: Array) -> Array:
    """IMTL-G's closed form (module docstring) from G: with gn[i, j] = u_i . g_j,
    (U D^T)[i, j] = gn[0, 0] - gn[0, j] - gn[i, 0] + gn[i, j] and
    (U g_1)[i] = gn[0, 0] - gn[i, 0], i, j >= 1. If that system is singular
    (linearly dependent gradients), the mean (a = 1/k) instead."""
    k = gram.shape[0]
    mean = jnp.full((k,), 1 / k, gram.dtype)
    if k == 1:
        return mean
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0))
    gn = gram / jnp.where(norms > 0, norms, 1)[:, None]
    m = gn[0, 0] - gn[0, 1:][None, :] - gn[1:, 0][:, None] + gn[1:, 1:]
    rest = jnp.linalg.solve(m, gn[0, 0] - gn[1:, 0])
    coefs = jnp.concatenate([1 - jnp.sum(rest, keepdims=True), rest])
    return jnp.where(jnp.all(jnp.isfinite(coefs)), coefs, mean)


@jax.jit
def aligned_mtl_coefs(gram: Array) -> Array:
    """Aligned-MTL's B 1 (module docstring); zeros if every gradient is zero."""
    k = gram.shape[0]
    lam, v = jnp.linalg.eigh(gram)
    keep = lam > k * jnp.finfo(gram.dtype).eps * jnp.max(lam)
    lam_min = jnp.min(jnp.where(keep, lam, jnp.inf))
    gain = jnp.where(keep, jnp.sqrt(lam_min / jnp.where(keep, lam, 1)), 0)
    return v @ (gain * jnp.sum(v, axis=0))  # V diag(gain) V^T 1


@functools.partial(jax.jit, static_argnames="steps")
def nash_mtl_coefs(gram: Array, steps: int = NASH_STEPS) -> Array:
    """Nash-MTL's alpha (module docstring) by damped Newton; zeros if G = 0.

    Starts from a_i = 1 / sqrt(G_ii), rescaled to the best multiple
    (t^2 = k / a^T G a minimises the objective along the ray).
    """
    k = gram.shape[0]
    dtype = gram.dtype
    scale = jnp.trace(gram) / k
    g = gram / jnp.where(scale > 0, scale, 1) + NASH_RIDGE * jnp.eye(k, dtype=dtype)
    a = 1 / jnp.sqrt(jnp.diagonal(g))
    a = a * jnp.sqrt(k / (a @ g @ a))

    def newton(_, a):
        grad = g @ a - 1 / a
        delta = jnp.linalg.solve(g + jnp.diag(1 / (a * a)), grad)
        decrement = jnp.sqrt(jnp.maximum(delta @ grad, 0))
        size = jnp.where(decrement < 0.25, 1, 1 / (1 + decrement))
        return jnp.maximum(a - size * delta, jnp.finfo(dtype).tiny)

    a = jax.lax.fori_loop(0, steps, newton, a)
    return jnp.where(scale > 0, a / jnp.sqrt(jnp.where(scale > 0, scale, 1)), 0)


# ---------------------------------------------------------------------------
# Transformations


def _stateless(who: str, shared: Mask, num_tasks: int, coefs_of
               ) -> optax.GradientTransformationExtraArgs:
    return core.coefficient_transform(
        who, shared, num_tasks, optax.EmptyState, lambda gram, state, _: (coefs_of(gram), state))


def gradvac(shared: Mask, num_tasks: int, *, beta: float = 0.01, seed: int | Array = 0
            ) -> optax.GradientTransformationExtraArgs:
    """GradVac (module docstring); `seed` draws the visiting orders as in `pcgrad.pcgrad`."""
    if not 0 < beta <= 1:
        raise ValueError(f"gradvac: beta must be in (0, 1], got {beta}")
    make_key, impl = core.seed_key(seed)

    def init():
        return GradVacState(make_key(), jnp.zeros((), jnp.int32),
                            jnp.zeros((num_tasks, num_tasks), core.gram_dtype()))

    def coefs_fn(gram, state, _):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key, impl=impl), state.count)
        w, targets = gradvac_weights(gram, pcgrad.task_orders(key, num_tasks), state.targets,
                                     beta)
        return (jnp.sum(w, axis=0),
                GradVacState(state.key, optax.safe_increment(state.count),
                             targets.astype(state.targets.dtype)))

    return core.coefficient_transform("gradvac", shared, num_tasks, init, coefs_fn)


def cagrad(shared: Mask, num_tasks: int, *, c: float = 0.4
           ) -> optax.GradientTransformationExtraArgs:
    """CAGrad with radius c in [0, 1), the paper's convergence range."""
    return _stateless("cagrad", shared, num_tasks, lambda gram: cagrad_coefs(gram, c))


def mgda(shared: Mask, num_tasks: int) -> optax.GradientTransformationExtraArgs:
    """MGDA over up to config_lib.MGDA_MAX_TASKS tasks."""
    return _stateless("mgda", shared, num_tasks, mgda_coefs)


def imtl_g(shared: Mask, num_tasks: int) -> optax.GradientTransformationExtraArgs:
    return _stateless("imtl_g", shared, num_tasks, imtl_g_coefs)


def aligned_mtl(shared: Mask, num_tasks: int) -> optax.GradientTransformationExtraArgs:
    return _stateless("aligned_mtl", shared, num_tasks, aligned_mtl_coefs)


def nash_mtl(shared: Mask, num_tasks: int) -> optax.GradientTransformationExtraArgs:
    return _stateless("nash_mtl", shared, num_tasks, nash_mtl_coefs)


# The builders by config_lib.COMBINERS name; sum has none: the trainer sums the gradients
# itself.
_BUILDERS = {"mgda": mgda, "imtl_g": imtl_g, "aligned_mtl": aligned_mtl, "nash_mtl": nash_mtl}
assert {"sum", "pcgrad", "gradvac", "cagrad", *_BUILDERS} == set(config_lib.COMBINERS)


def build(name: str, shared: Mask, num_tasks: int, *, seed: int | Array = 0,
          reduction: str = "sum", cagrad_c: float = 0.4, gradvac_beta: float = 0.01
          ) -> optax.GradientTransformation:
    """The combiner named `name` (one of config_lib.COMBINERS but sum) over `num_tasks`
    tasks; `num_tasks` also sizes the statistics its state keeps (core.step_stats)."""
    if name == "pcgrad":
        return pcgrad.pcgrad(shared, seed=seed, reduction=reduction, num_tasks=num_tasks)
    if name == "gradvac":
        return gradvac(shared, num_tasks, beta=gradvac_beta, seed=seed)
    if name == "cagrad":
        return cagrad(shared, num_tasks, c=cagrad_c)
    if name not in _BUILDERS:
        raise ValueError(f"combiner {name!r} is not one of {config_lib.COMBINERS[1:]}")
    return _BUILDERS[name](shared, num_tasks)


def from_config(train_cfg, shared: Mask, num_tasks: int, seed: int
                ) -> optax.GradientTransformation | None:
    """What the `train` config combines the task gradients with: its loss weighting
    (`config_lib.loss_weighting`), else its combiner (`config_lib.combiner`); None for
    the plain sum (the additive step then sums the gradients itself). The trainer's
    steps take the gradients stacked exactly when this is not None."""
    if config_lib.loss_weighting(train_cfg) != "none":
        return loss_weighting.from_config(train_cfg, shared, num_tasks)
    name = config_lib.combiner(train_cfg)
    if name == "sum":
        return None
    return build(name, shared, num_tasks, seed=seed, reduction=train_cfg.pcgrad_reduction,
                 cagrad_c=train_cfg.cagrad_c, gradvac_beta=train_cfg.gradvac_beta)
