"""The combiners of flaxpals/mtl/combiners.py against NumPy references re-derived from the papers.

Every reference works in float64 on the flattened shared gradients, the rows of
A [k, n], from the paper's definition of the update, not from the coefficient
formulas combiners.py evaluates on the Gram matrix:

- GradVac: Algorithm 1 with literal vector updates; each step size found by
  bisection on its defining condition cos(g_i' + a g_j, g_j) = target.
- CAGrad: the dual solved exactly by enumerating supports (KKT in closed form);
  checked against the primal by strong duality.
- MGDA: a long accelerated projected-gradient run, and the min-norm point's
  characterisation g_i . d >= |d|^2 for every i.
- IMTL-G: the paper's closed form on the vectors, and its defining property
  (equal projections on every unit gradient).
- Aligned-MTL: the SVD of the gradient matrix (Procrustes), not the Gram's eigh.
- Nash-MTL: coordinate-wise positive roots, then a log-parametrised root solve;
  residual of (G alpha) * alpha = 1 below 1e-12.

Tolerances are relative errors of the shared update d. float64 runs (x64 on)
test the algorithms: closed forms to 1e-10, solvers as stated per test. float32
runs test what training sees: the k x k problems are solved from a float32
Gram matrix, so errors scale with its condition number (here up to ~1e3).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

from flaxpals import config_lib
from flaxpals.mtl import combiners as cb
from flaxpals.mtl import core
from flaxpals.mtl import pcgrad as pc

KINDS = ("conflicting", "aligned", "random")
TASKS = (2, 3, 4, 5, 6)

# ---------------------------------------------------------------------------
# Problems: shared leaves of several shapes, one head per task


def make_problem(seed, k, kind, dtype=np.float32):
    """(per-task trees, stacked tree, mask, params, A [k, n] float64 shared rows)."""
    rng = np.random.default_rng(seed)
    shapes = (("enc/w", (4, 6)), ("enc/b", (6,)), ("emb", (7, 3)), ("ln", (5,)))
    n = sum(int(np.prod(shape)) for _, shape in shapes)
    a = rng.normal(size=(k, n))
    if kind == "conflicting":  # cosines around -1/(k-1)
        a = a - 0.7 * a.mean(0, keepdims=True)
    elif kind == "aligned":  # a strong common part: every cosine > 0
        a = 0.4 * a + rng.normal(size=(1, n))
    a = a * rng.uniform(0.3, 3.0, size=(k, 1))  # unequal magnitudes
    a = a.astype(dtype)
    per_task = []
    for i in range(k):
        flat, tree, pos = a[i], {}, 0
        for path, shape in shapes:
            size = int(np.prod(shape))
            node = tree
            *parents, leaf = path.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = flat[pos:pos + size].reshape(shape)
            pos += size
        tree["heads"] = {f"task{j}": {"w": (rng.normal(size=(3, 2)) if j == i
                                            else np.zeros((3, 2))).astype(dtype)}
                         for j in range(k)}
        per_task.append(tree)
    stacked = jax.tree.map(lambda *g: np.stack(g), *per_task)
    mask = jax.tree.map(lambda _: True, per_task[0])
    mask["heads"] = False  # a prefix of the heads' subtree
    params = jax.tree.map(lambda g: np.zeros_like(g), per_task[0])
    shared = core.broadcast_mask(mask, per_task[0])
    rows = np.stack([np.concatenate([np.ravel(x) for x, s in zip(jax.tree.leaves(g), shared,
                                                                   strict=True) if s])
                     for g in per_task]).astype(np.float64)
    return per_task, stacked, mask, params, rows


def shared_update(out, mask):
    """The shared leaves of a combined tree, flattened in leaf order (float64)."""
    shared = core.broadcast_mask(mask, out)
    return np.concatenate([np.ravel(np.asarray(x, np.float64))
                           for x, s in zip(jax.tree.leaves(out), shared, strict=True) if s])


def assert_heads_untouched(out, per_task, mask):
    """Task-specific leaves: exactly the owner's gradient."""
    shared = core.broadcast_mask(mask, out)
    for idx, (x, s) in enumerate(zip(jax.tree.leaves(out), shared, strict=True)):
        if s:
            continue
        owners = [jax.tree.leaves(g)[idx] for g in per_task if np.any(jax.tree.leaves(g)[idx])]
        assert len(owners) == 1
        np.testing.assert_array_equal(np.asarray(x), owners[0])


def rel_err(d, ref):
    return np.linalg.norm(d - ref) / np.linalg.norm(ref)


# ---------------------------------------------------------------------------
# References


def cos(u, v):
    return u @ v / (np.linalg.norm(u) * np.linalg.norm(v))


def gradvac_reference(a, orders, targets, beta):
    """GradVac Algorithm 1 on vectors: (d, new targets)."""
    new = targets.copy()
    out = []
    for i in range(len(a)):
        gi = a[i].copy()
        for j in orders[i]:
            phi, goal = cos(gi, a[j]), targets[i, j]
            if phi < goal:
                lo, hi = 0.0, 1.0
                while cos(gi + hi * a[j], a[j]) < goal:
                    hi *= 2
                for _ in range(80):  # cos(g + s a_j, a_j) increases with s
                    mid = (lo + hi) / 2
                    lo, hi = (mid, hi) if cos(gi + mid * a[j], a[j]) < goal else (lo, mid)
                gi = gi + (lo + hi) / 2 * a[j]
                assert abs(cos(gi, a[j]) - goal) < 1e-12
            new[i, j] = (1 - beta) * goal + beta * phi
        out.append(gi)
    return np.sum(out, 0), new


def cagrad_reference(a, c):
    """CAGrad's d: min over the simplex of g_w.g0 + c|g0||g_w| by support enumeration.

    On a support S the stationarity condition b_S + rho G_SS w_S / |g_w| = lam 1
    with sum w = 1 gives w_S = H (lam 1 - b_S) / sqrt(D), H = G_SS^-1,
    lam = (1'Hb + sqrt(D)) / 1'H1, D = (1'Hb)^2 - 1'H1 (b'Hb - rho^2).
    Every feasible candidate is a point of the simplex; the least objective wins.
    """
    k = len(a)
    g = a @ a.T
    b = g.mean(1)
    g0 = a.mean(0)
    rho = c * np.linalg.norm(g0)
    best, best_w = np.inf, None
    for m in range(1, k + 1):
        for s in itertools.combinations(range(k), m):
            s = list(s)
            h = np.linalg.inv(g[np.ix_(s, s)])
            one = np.ones(m)
            qa, qb, qc = one @ h @ one, one @ h @ b[s], b[s] @ h @ b[s] - rho**2
            disc = qb**2 - qa * qc
            if disc <= 0:
                continue
            lam = (qb + np.sqrt(disc)) / qa
            ws = h @ (lam * one - b[s]) / np.sqrt(disc)
            if np.any(ws < 0):
                continue
            w = np.zeros(k)
            w[s] = ws / ws.sum()
            value = b @ w + rho * np.linalg.norm(w @ a)
            if value < best:
                best, best_w = value, w
    gw = best_w @ a
    d = g0 + rho / np.linalg.norm(gw) * gw
    # Strong duality: d is in the ball and its worst task gets the dual optimum.
    assert np.linalg.norm(d - g0) <= rho * (1 + 1e-9)
    assert abs(np.min(a @ d) - best) <= 1e-9 * np.abs(g).max()
    return d


def project_simplex_np(v):
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1
    r = np.nonzero(u - css / np.arange(1, len(v) + 1) > 0)[0][-1] + 1
    return np.maximum(v - css[r - 1] / r, 0)


def mgda_reference(a, steps=5000):
    """The min-norm point of the hull of the rows: accelerated projected gradient on w'Gw."""
    g = a @ a.T
    step = 1 / (2 * np.linalg.eigvalsh(g)[-1])
    w = prev = np.full(len(a), 1 / len(a))
    for t in range(1, steps + 1):
        y = w + (t - 1) / (t + 2) * (w - prev)
        prev, w = w, project_simplex_np(y - step * 2 * g @ y)
    return w @ a


def imtl_g_reference(a):
    u = a / np.linalg.norm(a, axis=1, keepdims=True)
    d_rows, u_rows = a[0] - a[1:], u[0] - u[1:]
    rest = a[0] @ u_rows.T @ np.linalg.inv(d_rows @ u_rows.T)
    alpha = np.concatenate([[1 - rest.sum()], rest])
    return alpha @ a


def aligned_mtl_reference(a, eps):
    """sigma_min P Q^T 1 for the gradient matrix A^T = P Sigma Q^T (rank-R part)."""
    p, sigma, qt = np.linalg.svd(a.T, full_matrices=False)
    keep = sigma**2 > len(a) * eps * sigma[0] ** 2
    p, sigma, qt = p[:, keep], sigma[keep], qt[keep]
    aligned = sigma[-1] * p @ qt  # columns: the aligned task gradients
    np.testing.assert_allclose(aligned.T @ aligned, sigma[-1] ** 2 * qt.T @ qt, atol=1e-9)
    return aligned.sum(1)


def nash_reference(a):
    """alpha > 0 with alpha_i (G alpha)_i = 1, G = A A' / mean(diag) + ridge I; d = alpha A."""
    k = len(a)
    g = a @ a.T
    scale = np.trace(g) / k
    gn = g / scale + cb.NASH_RIDGE * np.eye(k)
    x = 1 / np.sqrt(np.diag(gn))
    for _ in range(300):  # each alpha_i: the positive root of G_ii x^2 + r x - 1 = 0
        for i in range(k):
            r = gn[i] @ x - gn[i, i] * x[i]
            x[i] = (-r + np.sqrt(r * r + 4 * gn[i, i])) / (2 * gn[i, i])
    sol = scipy.optimize.root(
        lambda z: np.exp(z) * (gn @ np.exp(z)) - 1, np.log(x),
        jac=lambda z: (np.diag(gn @ np.exp(z)) + np.exp(z)[:, None] * gn) * np.exp(z)[None, :],
        method="hybr", tol=1e-15)
    alpha = np.exp(sol.x)
    assert np.abs(alpha * (gn @ alpha) - 1).max() < 1e-12
    return alpha / np.sqrt(scale) @ a


# ---------------------------------------------------------------------------
# Every stateless method against its reference

REFERENCES = {
    "cagrad": lambda a: cagrad_reference(a, 0.4),
    "mgda": mgda_reference,
    "imtl_g": imtl_g_reference,
    "aligned_mtl": lambda a: aligned_mtl_reference(a, np.finfo(core.gram_dtype()).eps),
    "nash_mtl": nash_reference,
}
COEFS = {"cagrad": lambda g: cb.cagrad_coefs(g, 0.4), "mgda": cb.mgda_coefs,
         "imtl_g": cb.imtl_g_coefs, "aligned_mtl": cb.aligned_mtl_coefs,
         "nash_mtl": cb.nash_mtl_coefs}
# (float64, float32) bounds on the relative error of d. Worst errors seen here:
# float32 aligned_mtl 6e-6 (eigh of a Gram matrix with condition number up to ~1e3),
# the others <= 1.5e-6; float64 <= 1e-12. cagrad's bounds allow for harder problems
# (docs/design/combiners.md: up to 5e-5 in float32, 1e-6 in float64 after its 200
# steps, with c up to 0.9 and nearly cancelling gradients).
TOLERANCES = {"cagrad": (1e-5, 5e-4), "mgda": (1e-9, 1e-5), "imtl_g": (1e-10, 1e-5),
              "aligned_mtl": (1e-10, 1e-4), "nash_mtl": (1e-9, 1e-5)}


def run_combiner(name, stacked, mask, params, k, **kwargs):
    """One update of a fresh combiner: (combined tree, new state)."""
    tx = cb.build(name, mask, k, **kwargs)
    return jax.jit(tx.update)(jax.tree.map(jnp.asarray, stacked), tx.init(params), params)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_matches_reference(name, dtype):
    """k = 2..6, conflicting / aligned / random gradients. float64: the algorithms;
    float32: what training sees (the Gram matrix rounded to float32, the reference on
    the same float32 gradients)."""
    worst = 0.0
    with jax.enable_x64(dtype == "float64"):
        for k, kind, seed in itertools.product(TASKS, KINDS, range(2)):
            a = make_problem(seed, k, kind, np.dtype(dtype))[-1]
            coefs = COEFS[name](jnp.asarray(a @ a.T, dtype))
            assert coefs.dtype == dtype
            err = rel_err(np.asarray(coefs, np.float64) @ a, REFERENCES[name](a))
            worst = max(worst, err)
            assert err < TOLERANCES[name][dtype == "float32"], (k, kind, seed, err)
    print(f"{name} {dtype}: worst relative error {worst:.1e}")


@pytest.mark.parametrize("name", config_lib.COMBINERS[2:])
def test_transformation_combines_shared_leaves_by_the_coefficients(name):
    """The transformation on trees: shared leaves (all at once, across leaves) get
    sum_i c_i g_i with c from the Gram of the shared leaves; heads are untouched."""
    for k in (3, 6):
        per_task, stacked, mask, params, a = make_problem(k, k, "conflicting")
        out, _ = run_combiner(name, stacked, mask, params, k)
        assert_heads_untouched(out, per_task, mask)
        if name in REFERENCES:
            assert rel_err(shared_update(out, mask), REFERENCES[name](a)) < 1e-3


# ---------------------------------------------------------------------------
# Properties from the papers


@pytest.mark.parametrize("kind", KINDS)
def test_mgda_is_the_min_norm_point(kind):
    """g_i . d >= |d|^2 for every task, with d in the hull: the min-norm point's
    characterisation, independent of any solver."""
    for k, seed in itertools.product(TASKS, range(3)):
        _, stacked, mask, params, a = make_problem(seed, k, kind)
        w = np.asarray(cb.mgda_coefs(jnp.asarray(a @ a.T, jnp.float32)), np.float64)
        assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-6
        d = w @ a
        assert np.min(a @ d) >= d @ d - 1e-5 * np.abs(a @ a.T).max(), (k, seed)


def test_imtl_g_projects_equally_on_every_task():
    for k, kind, seed in itertools.product(TASKS, KINDS, range(2)):
        a = make_problem(seed, k, kind)[-1]
        d = np.asarray(cb.imtl_g_coefs(jnp.asarray(a @ a.T, jnp.float32)), np.float64) @ a
        proj = a @ d / np.linalg.norm(a, axis=1)
        np.testing.assert_allclose(proj, proj[0], rtol=1e-4, atol=1e-6 * np.abs(proj).max())


def test_nash_mtl_solves_its_bargaining_equation():
    """(G alpha)_i alpha_i = 1 on the solver's own problem (normalised G plus ridge)."""
    for k, kind, seed in itertools.product(TASKS, KINDS, range(2)):
        _, _, _, _, a = make_problem(seed, k, kind)
        g = a @ a.T
        alpha = np.asarray(cb.nash_mtl_coefs(jnp.asarray(g, jnp.float32)), np.float64)
        assert np.all(alpha > 0)
        scale = np.trace(g) / k
        an = alpha * np.sqrt(scale)
        residual = an * ((g / scale + cb.NASH_RIDGE * np.eye(k)) @ an) - 1
        assert np.abs(residual).max() < 1e-3, (k, kind, seed, residual)


def test_cagrad_with_c_zero_is_the_mean_and_grows_the_worst_task():
    for k, seed in itertools.product(TASKS, range(2)):
        a = make_problem(seed, k, "conflicting")[-1]
        gram = jnp.asarray(a @ a.T, jnp.float32)
        np.testing.assert_array_equal(cb.cagrad_coefs(gram, 0.0), np.full(k, 1 / k, np.float32))
        d = np.asarray(cb.cagrad_coefs(gram, 0.5), np.float64) @ a
        assert np.min(a @ d) > np.min(a @ a.mean(0)), "CAGrad must raise the worst task's rate"


def test_aligned_mtl_on_orthogonal_gradients_equalises_their_norms():
    """Orthogonal g_i: the aligned system is sigma_min times the unit gradients."""
    a = np.diag([1.0, 2.0, 4.0]).astype(np.float32)
    coefs = np.asarray(cb.aligned_mtl_coefs(jnp.asarray(a @ a.T)))
    np.testing.assert_allclose(coefs, [1.0, 0.5, 0.25], rtol=1e-6)


def test_aligned_mtl_drops_a_duplicate_task():
    """Rank 2 of 3 (task 2 = task 0): the reference's rank-R pseudo-inverse."""
    _, _, _, _, a = make_problem(0, 3, "random")
    a[2] = a[0]
    got = np.asarray(cb.aligned_mtl_coefs(jnp.asarray(a @ a.T, jnp.float32)), np.float64) @ a
    assert rel_err(got, aligned_mtl_reference(a, np.finfo(np.float32).eps)) < 1e-4


# ---------------------------------------------------------------------------
# GradVac: random orders and EMA targets in the state


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gradvac_matches_algorithm_1_over_steps(dtype):
    """Three steps per problem, the targets carried by both sides; the same orders."""
    tol = 1e-10 if dtype == "float64" else 1e-4
    with jax.enable_x64(dtype == "float64"):
        for k, kind in itertools.product(TASKS, KINDS):
            a = make_problem(k, k, kind, np.dtype(dtype))[-1]
            gram = jnp.asarray(a @ a.T, dtype)
            targets = ref_targets = np.zeros((k, k))
            for step in range(3):
                orders = pc.task_orders(jax.random.fold_in(jax.random.key(k), step), k)
                w, targets = cb.gradvac_weights(gram, orders, jnp.asarray(targets, dtype), 0.3)
                ref, ref_targets = gradvac_reference(a, np.asarray(orders), ref_targets, 0.3)
                err = rel_err(np.asarray(jnp.sum(w, 0), np.float64) @ a, ref)
                assert err < tol, (k, kind, step, err)
                np.testing.assert_allclose(np.asarray(targets), ref_targets, atol=tol)
            assert np.abs(ref_targets).max() > 0.01  # the targets moved, and were checked


def test_gradvac_transformation_draws_orders_and_keeps_targets():
    """The state: orders from fold_in(key(seed), step), targets carried between steps."""
    k = 4
    per_task, stacked, mask, params, a = make_problem(5, k, "conflicting")
    tx = cb.gradvac(mask, k, beta=0.3, seed=9)
    state, update = tx.init(params), jax.jit(tx.update)
    targets = np.zeros((k, k))
    for step in range(3):
        out, state = update(stacked, state, params)
        orders = np.asarray(pc.task_orders(jax.random.fold_in(jax.random.key(9), step), k))
        ref, targets = gradvac_reference(a, orders, targets, 0.3)
        assert rel_err(shared_update(out, mask), ref) < 1e-4
        np.testing.assert_allclose(np.asarray(state.inner.targets), targets, atol=1e-5)
        assert_heads_untouched(out, per_task, mask)
    assert int(state.inner.count) == 3


def test_gradvac_first_step_is_pcgrad():
    """With every target 0 (the start), the GradVac step is PCGrad's projection."""
    _, stacked, mask, params, _ = make_problem(1, 4, "conflicting")
    gv, _ = run_combiner("gradvac", stacked, mask, params, 4, seed=3)
    pcg = pc.pcgrad_combine(jax.tree.map(jnp.asarray, stacked), mask,
                            jax.random.fold_in(jax.random.key(3), 0))
    np.testing.assert_allclose(shared_update(gv, mask), shared_update(pcg, mask),
                               rtol=1e-5, atol=1e-6)


def test_gradvac_state_survives_an_orbax_round_trip(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    _, stacked, mask, params, _ = make_problem(3, 3, "conflicting")
    tx = cb.gradvac(mask, 3, seed=5)
    update = jax.jit(tx.update)
    _, state = update(stacked, tx.init(params), params)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "state", state)
        ckpt.wait_until_finished()
        restored = ckpt.restore(tmp_path / "state", state)
    restored = jax.tree.unflatten(jax.tree.structure(state), jax.tree.leaves(restored))
    assert np.abs(np.asarray(restored.inner.targets)).max() > 0
    a, sa = update(stacked, state, params)
    b, sb = update(stacked, restored, params)
    for x, y in zip(jax.tree.leaves((a, sa)), jax.tree.leaves((b, sb)), strict=True):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------
# All combiners: determinism, shared-only semantics, degenerate inputs

NEW = [n for n in config_lib.COMBINERS if n not in ("sum", "pcgrad")]


@pytest.mark.parametrize("name", NEW)
def test_same_seed_same_updates(name):
    _, stacked, mask, params, _ = make_problem(2, 4, "conflicting")

    def run(seed):
        tx = cb.build(name, mask, 4, seed=seed)
        state, outs = tx.init(params), []
        for _ in range(3):
            out, state = jax.jit(tx.update)(stacked, state, params)
            outs.append(shared_update(out, mask))
        return np.stack(outs)

    first = run(7)
    np.testing.assert_array_equal(first, run(7))
    if name == "gradvac":  # the only random one: other seeds, other orders
        assert not np.array_equal(first, run(8))


@pytest.mark.parametrize("name", NEW)
def test_initial_state_can_be_donated(name):
    """The trainer donates the state: no buffer may appear twice in it."""
    _, stacked, mask, params, _ = make_problem(0, 3, "random")
    tx = cb.build(name, mask, 3)
    jax.jit(tx.update, donate_argnums=1)(stacked, tx.init(params), params)


@pytest.mark.parametrize("name", NEW)
def test_heads_untouched_and_no_shared_leaves(name):
    per_task, stacked, mask, params, _ = make_problem(4, 3, "random")
    out, _ = run_combiner(name, stacked, mask, params, 3)
    assert_heads_untouched(out, per_task, mask)
    # Nothing shared (a frozen encoder): every leaf is its own task's.
    none = jax.tree.map(lambda _: False, mask)
    out, _ = run_combiner(name, stacked, none, params, 3)
    for x, g in zip(jax.tree.leaves(out), jax.tree.leaves(stacked), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.sum(g, 0))


@pytest.mark.parametrize("name", NEW)
def test_degenerate_gradients_give_finite_updates(name):
    """A zero task gradient, two equal tasks, all zero: no NaN or Inf."""
    rng = np.random.default_rng(0)
    g = rng.normal(size=(3, 8)).astype(np.float32)
    cases = [g * np.array([[0.0], [1.0], [1.0]], np.float32), np.stack([g[0], g[0], g[1]]),
             np.zeros_like(g), np.stack([g[0], -g[0], g[1]])]
    for case in cases:
        out, _ = run_combiner(name, {"w": case}, {"w": True}, {"w": np.zeros(8, np.float32)}, 3)
        assert np.all(np.isfinite(out["w"])), (name, case)


def test_callable_mask_and_chain_with_clip_and_adamw():
    _, stacked, mask, params, _ = make_problem(4, 3, "conflicting")

    def mask_fn(tree):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "heads" not in jax.tree_util.keystr(path), tree)

    tx = optax.chain(cb.cagrad(mask_fn, 3), optax.clip_by_global_norm(1.0),
                     optax.adamw(1e-2, weight_decay=0.01))
    updates, _ = jax.jit(tx.update)(stacked, tx.init(params), params)
    tx3 = cb.cagrad(mask, 3)
    combined, _ = tx3.update(stacked, tx3.init(params))
    rest = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.01))
    expected, _ = rest.update(combined, rest.init(params), params)
    for x, y in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-8)


def test_names_and_errors():
    _, stacked, mask, params, _ = make_problem(0, 3, "random")
    for name in config_lib.COMBINERS[1:]:  # every name builds; sum is the trainer's own
        cb.build(name, mask, 3)
    # The factory passes its options through.
    a, _ = run_combiner("cagrad", stacked, mask, params, 3, cagrad_c=0.9)
    tx = cb.cagrad(mask, 3, c=0.9)
    b, _ = jax.jit(tx.update)(stacked, tx.init(params), params)
    np.testing.assert_array_equal(shared_update(a, mask), shared_update(b, mask))
    for name in ("famo", "sum"):
        with pytest.raises(ValueError, match="not one of"):
            cb.build(name, mask, 3)
    with pytest.raises(ValueError, match="beta"):
        cb.gradvac(mask, 3, beta=0.0)
    # cagrad's range and mgda's task limit are the config's to check, naming the key.
    c = config_lib.base()
    c.train.method, c.train.combiner, c.train.cagrad_c = "additive", "cagrad", 1.0
    with pytest.raises(config_lib.ConfigError,
                       match=r"^config\.train\.cagrad_c: must be in \[0, 1\), got 1\.0"):
        config_lib.validate(c)
    c.train.cagrad_c, c.train.combiner = 0.4, "mgda"
    c.tasks = tuple(f"t{i}" for i in range(13))
    with pytest.raises(config_lib.ConfigError,
                       match=r"^config\.train\.combiner: mgda's exact solver takes up to 12 "
                             r"tasks, got 13"):
        config_lib.validate(c)
    with pytest.raises(ValueError, match="built for 4 tasks"):
        cb.imtl_g(mask, 4).update(stacked, cb.imtl_g(mask, 4).init(params))


# ---------------------------------------------------------------------------
# What the state keeps for the trainer's metrics (core.step_stats)


@pytest.mark.parametrize("name,reduction", [(n, {}) for n in config_lib.COMBINERS if n != "sum"]
                         + [("pcgrad", {"reduction": "mean"})])
@pytest.mark.parametrize("k,kind", [(2, "conflicting"), (3, "random"), (5, "aligned")])
def test_step_stats_describe_the_update(name, reduction, k, kind):
    """coef/<t> are the coefficients of the shared update; share/<t> and
    sum_share/<t> recomputed in NumPy from the gradients' rows (c_t <g_t, d> / |d|^2,
    for the method's d and for d = sum_t g_t); task_grad_norm/<t> = |g_t|."""
    _, stacked, mask, params, a = make_problem(1, k, kind)
    out, state = run_combiner(name, stacked, mask, params, k, **reduction)
    names = [f"task{i}" for i in range(k)]
    stats = {key: float(v) for key, v in core.step_stats(state, names).items()}
    assert set(stats) == {f"{p}{t}" for p in core.STAT_PREFIXES for t in names}
    c = np.array([stats[f"coef/{t}"] for t in names])
    d = shared_update(out, mask)
    np.testing.assert_allclose(c @ a, d, rtol=1e-4, atol=1e-5 * np.abs(d).max())
    for coefs, prefix in ((c, "share/"), (np.ones(k), "sum_share/")):
        u = coefs @ a
        np.testing.assert_allclose([stats[prefix + t] for t in names],
                                   coefs * (a @ u) / (u @ u), atol=1e-5)
    np.testing.assert_allclose([stats[f"task_grad_norm/{t}"] for t in names],
                               np.linalg.norm(a, axis=1), rtol=1e-5)


def test_step_stats_match_the_methods_equations():
    """Nash-MTL's alpha_t (G alpha)_t = 1 gives every task the share 1/k; MGDA's
    min-norm point has <g_t, d> = |d|^2 wherever w_t > 0, so its shares are its
    weights."""
    for k, kind, seed in itertools.product((2, 3, 4), KINDS, range(2)):
        _, stacked, mask, params, _ = make_problem(seed, k, kind)
        names = [str(i) for i in range(k)]
        _, state = run_combiner("nash_mtl", stacked, mask, params, k)
        stats = core.step_stats(state, names)
        np.testing.assert_allclose([float(stats[f"share/{t}"]) for t in names], 1 / k,
                                   atol=1e-3)
        _, state = run_combiner("mgda", stacked, mask, params, k)
        stats = core.step_stats(state, names)
        np.testing.assert_allclose([float(stats[f"share/{t}"]) for t in names],
                                   [float(stats[f"coef/{t}"]) for t in names], atol=1e-4)


def test_step_stats_before_any_update_and_without_a_combiner():
    _, stacked, mask, params, _ = make_problem(0, 3, "random")
    names = ["a", "b", "c"]
    stats = core.step_stats(cb.imtl_g(mask, 3).init(params), names)
    assert all(float(v) == 0 for v in stats.values()) and len(stats) == 12  # no NaN
    assert core.step_stats(optax.adamw(1e-3).init(params), names) == {}
    # pcgrad built without num_tasks keeps nothing; with it, it keeps [T] coefficients.
    assert core.step_stats(pc.pcgrad(mask).init(params), names) == {}
    tx = pc.pcgrad(mask, num_tasks=3)
    _, state = tx.update(stacked, tx.init(params), params)
    assert set(core.step_stats(state, names)) >= {"coef/a", "share/c"}
    with pytest.raises(ValueError, match="built for 4 tasks"):
        pc.pcgrad(mask, num_tasks=4).update(stacked, pc.pcgrad(mask, num_tasks=4).init(params),
                                            params)
    with pytest.raises(ValueError, match="given 2 task names"):
        core.step_stats(state, names[:2])
