"""PCGrad against an independent NumPy implementation of Algorithm 1 (Yu et al. 2020).

The reference below does the literal vector projections on the flattened shared
gradients, in float64; `flaxpals.mtl.pcgrad` works in coefficient space on a Gram
matrix. Only the visiting orders are taken from `task_orders`, so both sides
see the same permutations.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxpals.mtl import combiners as cb
from flaxpals.mtl import core
from flaxpals.mtl import pcgrad as pc

# ---------------------------------------------------------------------------
# The independent reference


def reference_pcgrad(grads, shared, orders, reduction="sum", eps=1e-12):
    """Algorithm 1 with literal projections, float64.

    grads: list over tasks of lists of leaves (np arrays, param-shaped);
    shared: list of bools per leaf; orders: [T, T-1] visiting orders.
    Returns (list of combined leaves, smallest |g_i^PC . g_j| / (|g_i^PC| |g_j|)
    met at a visit: how far every conflict decision is from the boundary).
    Task-specific leaves: the owner's gradient, found as the only nonzero task.
    """
    t = len(grads)
    idx = [k for k, s in enumerate(shared) if s]
    flat = np.stack([np.concatenate([np.ravel(np.asarray(g[k], np.float64)) for k in idx])
                     if idx else np.zeros(0) for g in grads])
    proj = flat.copy()
    margin = np.inf
    for i in range(t):
        for j in orders[i]:
            d = proj[i] @ flat[j]
            denom = np.linalg.norm(proj[i]) * np.linalg.norm(flat[j])
            if denom > 0:
                margin = min(margin, abs(d) / denom)
            if d < 0:
                proj[i] = proj[i] - d / (flat[j] @ flat[j] + eps) * flat[j]
    total = proj.sum(0) / (t if reduction == "mean" else 1)
    out, pos = [], 0
    for k, s in enumerate(shared):
        shape = np.shape(grads[0][k])
        if s:
            n = int(np.prod(shape))
            out.append(total[pos:pos + n].reshape(shape))
            pos += n
        else:
            owners = [g[k] for g in grads if np.any(np.asarray(g[k]) != 0)]
            assert len(owners) <= 1, "a task-specific leaf must have one owner"
            out.append(np.asarray(owners[0] if owners else grads[0][k], np.float64))
    return out, margin


# ---------------------------------------------------------------------------
# Test data: a small model with shared leaves of several shapes and one head per task


def make_problem(seed, t, dtype=np.float32):
    """(per-task gradient trees, stacked tree, mask tree, params) with conflicts."""
    rng = np.random.default_rng(seed)
    shapes = {"enc": {"w": (3, 4), "b": (4,)}, "emb": (5, 2), "ln": (6,)}
    scales = {"enc": {"w": 1.0, "b": 0.3}, "emb": 2.0, "ln": 0.5}
    per_task = []
    shared_draws = jax.tree.map(
        lambda shp, sc: sc * rng.normal(size=(t, *shp)), shapes, scales,
        is_leaf=lambda x: isinstance(x, tuple))
    # Pull every task away from the mean: cosines around -1/(T-1), many conflicts.
    shared_draws = jax.tree.map(lambda a: a - 0.7 * a.mean(0, keepdims=True), shared_draws)
    for i in range(t):
        tree = jax.tree.map(lambda a, i=i: a[i].astype(dtype), shared_draws)
        tree["heads"] = {f"task{k}": {"w": (rng.normal(size=(4, 2)) if k == i
                                            else np.zeros((4, 2))).astype(dtype)}
                         for k in range(t)}
        per_task.append(tree)
    stacked = jax.tree.map(lambda *g: np.stack(g), *per_task)
    mask = jax.tree.map(lambda _: True, per_task[0])
    mask["heads"] = False  # a prefix of the heads' subtree
    params = jax.tree.map(lambda g: np.ones_like(g), per_task[0])
    return per_task, stacked, mask, params


def flat_mask(mask, tree):
    return core.broadcast_mask(mask, tree)


def check_against_reference(stacked, per_task, mask, key, reduction, atol, rtol):
    t = len(per_task)
    out = pc.pcgrad_combine(jax.tree.map(jnp.asarray, stacked), mask, key, reduction)
    orders = np.asarray(pc.task_orders(key, t))
    shared = flat_mask(mask, per_task[0])
    ref, margin = reference_pcgrad([jax.tree.leaves(g) for g in per_task], shared, orders,
                                   reduction)
    # Every conflict decision is far from the boundary, so float32 takes the same branches.
    assert margin > 1e-3, margin
    got = jax.tree.leaves(out)
    for g, r, s in zip(got, ref, shared, strict=True):
        assert g.shape == r.shape
        if s:
            np.testing.assert_allclose(np.asarray(g, np.float64), r, atol=atol, rtol=rtol)
        else:  # task-specific: exactly the owner's gradient
            np.testing.assert_array_equal(np.asarray(g), r.astype(g.dtype))
    return out, orders, ref


# ---------------------------------------------------------------------------
# Algorithm 1


@pytest.mark.parametrize("t", [2, 3, 4, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_numpy_reference_float64(t, seed):
    """The algorithm itself: float64 on both sides, agreement to 1e-10."""
    with jax.enable_x64(True):
        per_task, stacked, mask, _ = make_problem(seed, t, np.float64)
        key = jax.random.key(100 + seed)
        out, orders, _ = check_against_reference(stacked, per_task, mask, key, "sum",
                                                 atol=1e-10, rtol=0)
        assert jax.tree.leaves(out)[0].dtype == jnp.float64


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("t", [2, 3, 5])
@pytest.mark.parametrize("seed", [0, 3])
def test_matches_numpy_reference_float32(t, seed, reduction):
    """float32 gradients of order 1 (what training sees): agreement to 1e-6 + 1e-5 relative.

    The float32 result carries rounding of order 1e-7 relative per operation on
    values up to ~5, so 1e-6 absolute alone is too tight for the largest entries.
    """
    per_task, stacked, mask, _ = make_problem(seed, t)
    check_against_reference(stacked, per_task, mask, jax.random.key(seed), reduction,
                            atol=1e-6, rtol=1e-5)


def test_reference_is_sensitive_to_order_and_to_per_tensor_projection():
    """The data are such that a wrong order or per-tensor dot products would be caught."""
    per_task, stacked, mask, _ = make_problem(0, 4, np.float64)
    grads = [jax.tree.leaves(g) for g in per_task]
    shared = flat_mask(mask, per_task[0])
    orders = np.asarray(pc.task_orders(jax.random.key(0), 4))
    ref, _ = reference_pcgrad(grads, shared, orders)
    other, _ = reference_pcgrad(grads, shared, orders[:, ::-1])
    assert max(np.abs(a - b).max() for a, b in zip(ref, other, strict=True)) > 1e-3
    # Per-tensor PCGrad: each shared leaf projected on its own.
    k = shared.index(True)
    alone = [[g[k]] for g in grads]
    per_leaf, _ = reference_pcgrad(alone, [True], orders)
    assert np.abs(per_leaf[0] - ref[k]).max() > 1e-3


def test_two_task_picture_by_hand():
    """g1 = (1, 0), g2 = (-1, 1): g1.g2 = -1 < 0, so each goes onto the other's normal plane.

    g1^PC = g1 - (g1.g2 / |g2|^2) g2 = (1, 0) + 1/2 (-1, 1) = (0.5, 0.5)   [. g2 = 0]
    g2^PC = g2 - (g2.g1 / |g1|^2) g1 = (-1, 1) + 1 (1, 0)   = (0, 1)       [. g1 = 0]
    sum = (0.5, 1.5); mean = (0.25, 0.75).
    """
    key = jax.random.key(0)
    g = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
    out = pc.pcgrad_combine({"w": g}, {"w": True}, key, eps=0.0)
    np.testing.assert_array_equal(out["w"], [0.5, 1.5])
    out = pc.pcgrad_combine({"w": g}, {"w": True}, key, "mean", eps=0.0)
    np.testing.assert_array_equal(out["w"], [0.25, 0.75])
    # The same vectors split over two leaves: dot products span both leaves.
    split = {"a": g[:, :1], "b": g[:, 1:]}
    out = pc.pcgrad_combine(split, {"a": True, "b": True}, key, eps=0.0)
    np.testing.assert_array_equal(out["a"], [0.5])
    np.testing.assert_array_equal(out["b"], [1.5])
    # With the default eps the denominators move by 1e-12 only.
    out = pc.pcgrad_combine({"w": g}, {"w": True}, key)
    np.testing.assert_allclose(out["w"], [0.5, 1.5], atol=1e-7)
    # The individual projected gradients, from the coefficient matrix.
    gram = pc.gram_matrix([g], 2)
    w = pc.projection_weights(gram, pc.task_orders(key, 2), 0.0)
    np.testing.assert_array_equal(w @ g, [[0.5, 0.5], [0.0, 1.0]])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_no_conflict_is_exactly_the_plain_sum(reduction):
    rng = np.random.default_rng(5)
    stacked = {"a": np.abs(rng.normal(size=(4, 7, 3))).astype(np.float32),
               "b": np.abs(rng.normal(size=(4, 5))).astype(np.float32)}
    mask = {"a": True, "b": True}
    tx = pc.pcgrad(mask, seed=1, reduction=reduction)
    state = tx.init(None)
    for update in (tx.update, jax.jit(tx.update)):
        out, _ = update(stacked, state)
        for k, g in stacked.items():
            plain = jnp.sum(jnp.asarray(g), 0)
            plain = plain / 4 if reduction == "mean" else plain
            np.testing.assert_array_equal(out[k], plain)
            np.testing.assert_array_equal(
                out[k], pc.sum_combine(stacked, None, reduction)[k])


def test_zero_gradient_task_gives_no_nan():
    g = jnp.array([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [-1.0, 1.0, 0.0]])
    out = pc.pcgrad_combine({"w": g}, {"w": True}, jax.random.key(0))
    assert np.all(np.isfinite(out["w"]))
    ref, _ = reference_pcgrad([[np.asarray(x)] for x in g], [True],
                              np.asarray(pc.task_orders(jax.random.key(0), 3)))
    np.testing.assert_allclose(out["w"], ref[0], atol=1e-6)


# ---------------------------------------------------------------------------
# Orders, keys, the transformation


def test_task_orders_are_permutations_of_the_others_and_change_with_the_step():
    key = jax.random.key(3)
    t = 4
    seen = [set() for _ in range(t)]
    for s in range(20):
        orders = np.asarray(pc.task_orders(jax.random.fold_in(key, s), t))
        assert orders.shape == (t, t - 1)
        for i in range(t):
            assert sorted(orders[i]) == [j for j in range(t) if j != i]
            seen[i].add(tuple(orders[i]))
    assert all(len(x) > 3 for x in seen), seen  # 6 possible orders per task
    assert pc.task_orders(key, 1).shape == (1, 0)


def test_update_uses_a_fresh_order_each_step_and_matches_reference():
    per_task, stacked, mask, params = make_problem(1, 5)
    tx = pc.pcgrad(mask, seed=11)
    state = tx.init(params)
    outs, orders = [], []
    for step in range(3):
        key = jax.random.fold_in(jax.random.key(11), step)
        orders.append(np.asarray(pc.task_orders(key, 5)))
        out, state = tx.update(stacked, state, params)
        ref, _ = reference_pcgrad([jax.tree.leaves(g) for g in per_task],
                                  flat_mask(mask, per_task[0]), orders[-1])
        for g, r in zip(jax.tree.leaves(out), ref, strict=True):
            np.testing.assert_allclose(g, r, atol=1e-6, rtol=1e-5)
        outs.append(out)
    assert int(state.inner.count) == 3
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[1], orders[2])
    assert not np.allclose(outs[0]["enc"]["w"], outs[1]["enc"]["w"])


def test_same_key_same_result_other_key_other_result():
    _, stacked, mask, params = make_problem(2, 4)

    def run(seed):
        tx = pc.pcgrad(mask, seed=seed)
        state = tx.init(params)
        outs = []
        for _ in range(3):
            out, state = tx.update(stacked, state, params)
            outs.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(out)]))
        return np.stack(outs)

    a = run(7)
    np.testing.assert_array_equal(a, run(7))
    np.testing.assert_array_equal(a, run(jax.random.key(7)))
    np.testing.assert_array_equal(a, run(jax.random.key_data(jax.random.key(7))))
    assert not np.array_equal(a, run(8))


def test_jit_compiles_once_and_matches_eager():
    _, stacked, mask, params = make_problem(0, 3)
    tx = pc.pcgrad(mask, seed=0)
    traces = []

    def update(g, s, p):
        traces.append(1)
        return tx.update(g, s, p)

    jitted = jax.jit(update)
    s_eager = s_jit = tx.init(params)
    for _ in range(3):
        eager, s_eager = tx.update(stacked, s_eager, params)
        out, s_jit = jitted(stacked, s_jit, params)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(eager), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert len(traces) == 1


def test_callable_mask_and_chain_with_clip_and_adamw():
    _, stacked, mask, params = make_problem(4, 3)

    def mask_fn(tree):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "heads" not in jax.tree_util.keystr(path), tree)

    tx = optax.chain(pc.pcgrad(mask_fn, seed=2), optax.clip_by_global_norm(1.0),
                     optax.adamw(1e-2, weight_decay=0.01))
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(stacked, state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        assert u.shape == p.shape and u.dtype == p.dtype
    new_params = optax.apply_updates(params, updates)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(new_params))
    # The same as combining with the static mask, then clip + AdamW on their own.
    combined, _ = pc.pcgrad(mask, seed=2).update(stacked, pc.pcgrad(mask, seed=2).init(params))
    rest = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.01))
    expected, _ = rest.update(combined, rest.init(params), params)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    assert int(state[0].inner.count) == 1


def test_state_survives_an_orbax_round_trip(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    _, stacked, mask, params = make_problem(3, 3)
    tx = pc.pcgrad(mask, seed=5)
    state = tx.init(params)
    _, state = tx.update(stacked, state, params)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "state", state)
        ckpt.wait_until_finished()
        restored = ckpt.restore(tmp_path / "state", state)
    restored = jax.tree.unflatten(jax.tree.structure(state), jax.tree.leaves(restored))
    a, _ = tx.update(stacked, state, params)
    b, _ = tx.update(stacked, restored, params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_the_trainer_builds_pcgrad_by_name():
    """combiners.build("pcgrad") (what the trainer uses) is pcgrad.pcgrad; the plain sum
    has no transformation (the trainer sums the gradients itself)."""
    _, stacked, mask, params = make_problem(0, 3)
    tx = cb.build("pcgrad", mask, 3, seed=4)
    a, _ = tx.update(stacked, tx.init(params))
    ref = pc.pcgrad(mask, seed=4)
    b, _ = ref.update(stacked, ref.init(params))
    np.testing.assert_array_equal(a["emb"], b["emb"])
    with pytest.raises(ValueError, match="not one of"):
        cb.build("sum", mask, 3)
    with pytest.raises(ValueError, match="reduction"):
        pc.pcgrad(mask, reduction="max")
    with pytest.raises(ValueError, match="leading task axis"):
        pc.pcgrad_combine({"a": jnp.ones((3, 2)), "b": jnp.ones((2, 2))},
                          {"a": True, "b": True}, jax.random.key(0))
    with pytest.raises(ValueError, match="shared mask"):
        pc.pcgrad_combine({"a": jnp.ones((3, 2))}, {"z": True}, jax.random.key(0))


# ---------------------------------------------------------------------------
# A sharded mesh: 4 fake CPU devices, in a subprocess so this process keeps 1 device

SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from flaxpals.mtl import pcgrad as pc

    devs = jax.devices()
    assert len(devs) == 4, devs
    mesh = Mesh(np.array(devs), ("x",))
    t, rng = 3, np.random.default_rng(0)
    grads = {"w": rng.normal(size=(t, 8, 16)).astype(np.float32),
             "b": rng.normal(size=(t, 16)).astype(np.float32),
             "head": np.stack([rng.normal(size=(16, 2)) * (k == 1)
                               for k in range(t)]).astype(np.float32)}
    grads["w"] -= 0.7 * grads["w"].mean(0)
    mask = {"w": True, "b": True, "head": False}
    params = jax.tree.map(lambda g: np.zeros(g.shape[1:], np.float32), grads)
    tx = pc.pcgrad(mask, seed=3)

    repl = NamedSharding(mesh, P())
    g_sh = {"w": jax.device_put(grads["w"], NamedSharding(mesh, P(None, None, "x"))),
            "b": jax.device_put(grads["b"], NamedSharding(mesh, P(None, "x"))),
            "head": jax.device_put(grads["head"], repl)}
    assert g_sh["w"].addressable_shards[0].data.shape == (t, 8, 4)
    p_sh = jax.device_put(params, repl)
    state = jax.device_put(tx.init(params), repl)
    update = jax.jit(tx.update)
    out_sh, state_sh = update(g_sh, state, p_sh)
    out_sh2, _ = update(g_sh, state_sh, p_sh)

    one = devs[0]
    s1 = jax.device_put(tx.init(params), one)
    out_1, s1 = update(jax.device_put(grads, one), s1, jax.device_put(params, one))
    out_12, _ = update(jax.device_put(grads, one), s1, jax.device_put(params, one))
    for a, b in zip(jax.tree.leaves((out_sh, out_sh2)), jax.tree.leaves((out_1, out_12))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out_sh["head"]), grads["head"][1])
    assert not np.allclose(np.asarray(out_sh["w"]), grads["w"].sum(0))  # conflicts projected
    print("OK", out_sh["w"].sharding)
""")


def test_sharded_mesh_matches_one_device():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OK"), proc.stdout
