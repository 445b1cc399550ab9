"""The loss weightings of flaxpals/mtl/loss_weighting.py against NumPy references from the papers.

Each reference runs the paper's rule step by step in float64 on a sequence of
per-task losses, with its own Adam (Kingma & Ba's equations, optax's defaults
b1 = 0.9, b2 = 0.999, eps = 1e-8) where the method learns its weights, and the
uncertainty weighting's gradient taken by finite differences of its loss. The
transformations must give sum_i w_i g_i on shared leaves with those weights,
and each task's own gradient on its head.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxpals import config_lib
from flaxpals.mtl import core, pcgrad
from flaxpals.mtl import loss_weighting as wt
from flaxpals.train import optim
from tests.test_combiners import assert_heads_untouched, make_problem, rel_err, shared_update

STEPS = 12


def loss_sequence(seed, k, steps=STEPS):
    """Positive per-task losses that fall at different rates, with noise."""
    rng = np.random.default_rng(seed)
    start = rng.uniform(0.5, 3.0, size=k)
    rate = rng.uniform(0.0, 0.15, size=k)
    t = np.arange(steps)[:, None]
    return (start * np.exp(-rate * t) * rng.uniform(0.8, 1.2, size=(steps, k))).astype(np.float32)


class Adam:
    """Kingma & Ba, Algorithm 1 (bias-corrected), descending."""

    def __init__(self, lr, size, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.m, self.v, self.t = np.zeros(size), np.zeros(size), 0

    def step(self, x, grad):
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * grad
        self.v = self.b2 * self.v + (1 - self.b2) * grad**2
        m_hat = self.m / (1 - self.b1**self.t)
        v_hat = self.v / (1 - self.b2**self.t)
        return x - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def uncertainty_reference(losses, lr):
    """Weights of each step: w = exp(-s); s descends sum_i exp(-s_i) L_i + s_i."""
    k = losses.shape[1]
    s, adam, out = np.zeros(k), Adam(lr, k), []
    for ell in losses.astype(np.float64):
        out.append(np.exp(-s))
        objective = lambda x, ell=ell: np.sum(np.exp(-x) * ell + x)
        h = 1e-6
        grad = np.array([(objective(s + h * e) - objective(s - h * e)) / (2 * h)
                         for e in np.eye(k)])
        s = adam.step(s, grad)
    return np.array(out)


def dwa_reference(losses, temperature, window):
    """Liu et al.'s DWA with windows of `window` steps for epochs."""
    k = losses.shape[1]
    means, out = [], []
    for step, _ in enumerate(losses):
        n = step // window  # this step's window
        if n < 2:
            out.append(np.ones(k))
        else:
            r = means[n - 1] / means[n - 2]
            e = np.exp(r / temperature)
            out.append(k * e / e.sum())
        if (step + 1) % window == 0:
            means.append(losses[step + 1 - window:step + 1].astype(np.float64).mean(0))
    return np.array(out)


def famo_reference(losses, lr, decay, eps=1e-8):
    """FAMO: z = softmax(xi), w = c z / L; after each step xi takes an Adam step on
    J^T (log L_before - log L_after) + decay xi, J = dz/dxi = diag(z) - z z^T."""
    k = losses.shape[1]
    xi, adam, out = np.zeros(k), Adam(lr, k), []
    prev = None
    for ell in losses.astype(np.float64):
        if prev is not None:
            z = np.exp(xi) / np.exp(xi).sum()
            jac = np.diag(z) - np.outer(z, z)
            delta = jac.T @ (np.log(prev + eps) - np.log(ell + eps))
            xi = adam.step(xi, delta + decay * xi)
        z = np.exp(xi) / np.exp(xi).sum()
        w = z / (ell + eps)
        out.append(w / w.sum())
        prev = ell
    return np.array(out)


BUILD = {"uncertainty": lambda mask, k: wt.uncertainty(mask, k, lr=0.05),
         "dwa": lambda mask, k: wt.dwa(mask, k, temperature=2.0, window=3),
         "famo": lambda mask, k: wt.famo(mask, k, lr=0.025, decay=1e-3)}
REFERENCE = {"uncertainty": lambda losses: uncertainty_reference(losses, 0.05),
             "dwa": lambda losses: dwa_reference(losses, 2.0, 3),
             "famo": lambda losses: famo_reference(losses, 0.025, 1e-3)}


def run_weighting(name, k, losses, seed=0, tx=None):
    """(the shared update of every step [steps, n], the rows A, final state, per-task trees,
    last combined tree, mask)."""
    per_task, stacked, mask, params, a = make_problem(seed, k, "random")
    tx = tx or BUILD[name](mask, k)
    state, update, outs = tx.init(params), jax.jit(tx.update), []
    for ell in losses:
        out, state = update(stacked, state, params, losses=jnp.asarray(ell))
        outs.append(shared_update(out, mask))
    return np.array(outs), a, state, per_task, out, mask


@pytest.mark.parametrize("name", sorted(BUILD))
def test_matches_reference_over_steps(name):
    """k = 2..6: every step's update is sum_i w_i g_i with the reference's weights,
    to 1e-5 relative (float32 losses and gradients; the weights drift by Adam's
    float32 rounding over the steps)."""
    worst = 0.0
    for k, seed in itertools.product((2, 3, 4, 5, 6), range(2)):
        losses = loss_sequence(seed, k)
        outs, a, _, per_task, out, mask = run_weighting(name, k, losses, seed)
        weights = REFERENCE[name](losses)
        for step, (got, w) in enumerate(zip(outs, weights, strict=True)):
            err = rel_err(got, w @ a)
            worst = max(worst, err)
            assert err < 1e-5, (name, k, seed, step, err)
        assert_heads_untouched(out, per_task, mask)
        if name != "dwa":  # (the first two windows of DWA weigh 1)
            assert np.ptp(weights[-1]) > 1e-3, "the weights must have moved"
    print(f"{name}: worst relative error {worst:.1e}")


def test_dwa_weights_move_after_two_windows():
    losses = np.array([[1.0, 1.0]] * 3 + [[0.5, 1.0]] * 3 + [[0.5, 1.0]] * 3, np.float32)
    w = dwa_reference(losses, 2.0, 3)
    np.testing.assert_array_equal(w[:6], 1.0)
    # Window 2: ratios (0.5, 1): the task that fell gets the smaller weight.
    e = np.exp(np.array([0.5, 1.0]) / 2)
    np.testing.assert_allclose(w[6], 2 * e / e.sum())
    outs, a, state, *_ = run_weighting("dwa", 2, losses)
    np.testing.assert_allclose(outs[6], w[6] @ a, rtol=1e-6)
    assert int(state.inner.windows) == 3
    # The state keeps the last step's weights for the metrics, and no Gram matrix.
    stats = core.step_stats(state, ["x", "y"])
    assert sorted(stats) == ["coef/x", "coef/y"]
    np.testing.assert_allclose([float(stats["coef/x"]), float(stats["coef/y"])], w[-1],
                               rtol=1e-6)


def test_uncertainty_settles_at_inverse_losses():
    """Constant losses: s -> log L, so w_i = exp(-s_i) -> 1 / L_i (Kendall et al.)."""
    losses = np.tile(np.array([[0.5, 2.0, 4.0]], np.float32), (1500, 1))
    _, _, state, *_ = run_weighting("uncertainty", 3, losses)
    np.testing.assert_allclose(np.exp(-np.asarray(state.inner.log_vars)), 1 / losses[0], rtol=2e-2)


def test_famo_favours_the_task_that_improves_least():
    """Task 0's loss falls 10x faster: its logit, and its weight relative to 1/L, drop."""
    steps = np.arange(30)[:, None]
    losses = np.exp(-np.array([[0.1, 0.01, 0.01]]) * steps).astype(np.float32)
    _, _, state, *_ = run_weighting("famo", 3, losses)
    xi = np.asarray(state.inner.logits)
    assert xi[0] < xi[1] - 0.1 and abs(xi[1] - xi[2]) < 1e-3, xi
    assert np.asarray(wt.famo_weights(state.inner.logits, jnp.ones(3)))[0] < 1 / 3


@pytest.mark.parametrize("name", sorted(BUILD))
def test_same_inputs_same_updates_and_state_round_trip(name, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    losses = loss_sequence(3, 3, 8)
    first, _, state, *_ = run_weighting(name, 3, losses)
    again, _, state2, *_ = run_weighting(name, 3, losses)
    np.testing.assert_array_equal(first, again)
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(state2), strict=True):
        np.testing.assert_array_equal(x, y)
    # Save after 4 steps, restore, continue: the same as running straight through.
    _, stacked, mask, params, _ = make_problem(0, 3, "random")
    tx = BUILD[name](mask, 3)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for ell in losses[:4]:
        _, state = update(stacked, state, params, losses=ell)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "state", state)
        ckpt.wait_until_finished()
        restored = ckpt.restore(tmp_path / "state", state)
    state = jax.tree.unflatten(jax.tree.structure(state), jax.tree.leaves(restored))
    for step, ell in enumerate(losses[4:], start=4):
        out, state = update(stacked, state, params, losses=ell)
        np.testing.assert_array_equal(shared_update(out, mask), first[step])


@pytest.mark.parametrize("name", sorted(BUILD))
def test_initial_state_can_be_donated(name):
    """The trainer donates the state: no buffer may appear twice in it."""
    _, stacked, mask, params, _ = make_problem(0, 3, "random")
    tx = BUILD[name](mask, 3)
    jax.jit(tx.update, donate_argnums=1)(stacked, tx.init(params), params, losses=jnp.ones(3))


def test_losses_are_required_and_shaped():
    _, stacked, mask, params, _ = make_problem(0, 3, "random")
    tx = wt.famo(mask, 3)
    with pytest.raises(ValueError, match="needs the per-task losses"):
        tx.update(stacked, tx.init(params), params)
    with pytest.raises(ValueError, match=r"losses must have shape \(3,\)"):
        tx.update(stacked, tx.init(params), params, losses=jnp.ones(2))


@pytest.mark.parametrize("mode", ["finetune", "head_only"])
def test_the_trainers_optimiser_forwards_losses(mode):
    """make_optimizer's chain (and multi_transform when a part is frozen) hands `losses`
    to the weighting, and the plain transformations in the chain ignore it; frozen
    leaves get parameter-shaped zeros although their gradients come stacked."""
    _, stacked, mask, params, a = make_problem(1, 3, "random")
    params = {"encoder": {k: v for k, v in params.items() if k != "heads"},
              "heads": params["heads"]}
    stacked = {"encoder": {k: v for k, v in stacked.items() if k != "heads"},
               "heads": stacked["heads"]}
    mask = {"encoder": True, "heads": False}
    cfg = config_lib.base().train
    cfg.trainable, cfg.grad_clip, cfg.weight_decay = mode, 0.0, 0.0
    cfg.schedule = "constant"
    losses = jnp.array([1.0, 2.0, 4.0])
    tx = optim.make_optimizer(cfg, params, 10, wt.uncertainty(mask, 3, lr=0.1))
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(stacked, state, params, losses=losses)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        assert u.shape == p.shape
    (log_vars,) = [x.log_vars for x in jax.tree.leaves(
        state, is_leaf=lambda x: isinstance(x, wt.UncertaintyState))
        if isinstance(x, wt.UncertaintyState)]
    # The losses arrived: s took Adam's first step, -0.1 sign(1 - L).
    np.testing.assert_allclose(np.asarray(log_vars), [0.0, 0.1, 0.1], atol=1e-6)
    if mode == "head_only":
        assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates["encoder"]))
    # A plain transformation in the chain (pcgrad's) is handed no extra argument.
    tx = optim.make_optimizer(cfg, params, 10, pcgrad.pcgrad(mask))
    with_losses, _ = tx.update(stacked, tx.init(params), params, losses=losses)
    without, _ = tx.update(stacked, tx.init(params), params)
    for x, y in zip(jax.tree.leaves(with_losses), jax.tree.leaves(without), strict=True):
        np.testing.assert_array_equal(x, y)


def test_from_config_builds_each_weighting():
    _, _, mask, _, _ = make_problem(0, 3, "random")
    cfg = config_lib.base().train
    for name in config_lib.LOSS_WEIGHTINGS[1:]:
        cfg.loss_weighting = name
        state = wt.from_config(cfg, mask, 3).init(None)
        assert type(state.inner).__name__.lower().startswith(name[:3]), state
    cfg.loss_weighting = "gradnorm"
    with pytest.raises(ValueError, match="not one of"):
        wt.from_config(cfg, mask, 3)
