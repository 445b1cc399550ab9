"""The task as data: one program with a traced task index computes what a program
traced for that task alone computes (a static task: only its adapters, head and loss
in the program, the other tasks' leaves picked at trace time).

Every task's parameters and AdamW moments are compared after a sequence of steps, with
dropout on (the masks are drawn by module path, the same in both), PAL adapters, and
both batch structures (bi-encoded pairs), for a sampled method and an additive one with a
stateful combiner.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxpals import config_lib
from flaxpals.model import heads
from flaxpals.model.adapters import AdapterConfig
from flaxpals.model.bert import tiny_config
from flaxpals.model.multitask import ModelOptions, MultiTaskModel, TaskSpec, dummy_batch
from flaxpals.mtl import combiners, task_params
from flaxpals.train import optim, parallel
from flaxpals.train.programs import Programs
from flaxpals.train.steps import Steps, TrainState, device_batch
from tests.test_train_units import _random_batch

TASKS = (TaskSpec("sst", "classification", 5), TaskSpec("quora", "pair_classification"),
         TaskSpec("sts", "pair_regression"), TaskSpec("cfimdb", "classification", 2))
NAMES = tuple(t.name for t in TASKS)
TOLERANCE = 1e-6


def _batch(task: TaskSpec, length: int, seed: int) -> dict:
    """4 random rows, as the trainer's batches come (labels float32)."""
    return device_batch(jax.device_get(_random_batch(task, length, seed)))


def _setup(combiner: str = "sum"):
    model = MultiTaskModel(tiny_config(), TASKS, ModelOptions(
        adapter=AdapterConfig("pal"), pair_encoding="bi", similarity="dot"))
    dummies = {t.name: dummy_batch(t, "bi") for t in TASKS}
    params = jax.jit(lambda k: model.init(k, dummies, method=MultiTaskModel.init_all))(
        jax.random.key(0))["params"]
    cfg = config_lib.base().train
    cfg.learning_rate, cfg.warmup_fraction, cfg.method, cfg.combiner = 1e-3, 0.0, "additive", \
        combiner
    comb = combiners.from_config(cfg, task_params.shared_param_mask(params, NAMES),
                                 len(TASKS), 0)
    tx = optim.make_optimizer(cfg, params, 100, comb)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                       jax.random.key_data(jax.random.key(1)))
    return Steps(model, tx, comb is not None), state


def _max_diff(a, b) -> tuple[float, str]:
    """The largest |a - b| over the params and the optimiser's moments; a combiner's
    logged statistics (its coefficients and Gram matrix of squared gradient norms, in the
    hundreds) are held to a relative 1e-5 instead."""
    flat = jax.tree_util.tree_flatten_with_path(a)[0]
    worst = (0.0, "")
    for (p, x), y in zip(flat, jax.tree.leaves(b), strict=True):
        where = jax.tree_util.keystr(p)
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if where.endswith((".gram", ".coefs")):
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6, err_msg=where)
            continue
        worst = max(worst, (float(np.max(np.abs(x - y), initial=0)), where))
    return worst


def test_a_traced_task_trains_as_a_static_one():
    steps, state = _setup()
    mesh = parallel.make_mesh()
    sharding = parallel.state_shardings(state, mesh)
    progs = Programs(steps, mesh, sharding)
    static = jax.jit(steps.train_step, static_argnames="task")
    ref, new = state, parallel.put(state, sharding)
    # Every task, each structure at both lengths, and one task again after the others
    # (its Adam moments must have waited untouched).
    schedule = ["sst", "quora", "sts", "cfimdb", "quora"]
    for i, task in enumerate(schedule):
        batch = _batch(steps.model.task(task), (8, 16)[i % 2], i)
        ref, ref_metrics = static(ref, batch, task)
        new, metrics = progs.train(new, {task: parallel.global_batch(batch, mesh)})
        assert float(metrics[f"loss/{task}"]) == pytest.approx(float(ref_metrics["loss"]),
                                                               rel=1e-6)
    diff, where = _max_diff(jax.device_get((ref.params, ref.opt_state)),
                            jax.device_get((new.params, new.opt_state)))
    assert diff <= TOLERANCE, where
    # One train program per batch structure (one sentence, two) and length, not per task.
    assert progs._train.jitted._cache_size() == 2  # each structure's first length


# In parts: a program per task and length, two minutes to compile here; CI's slow suite.
@pytest.mark.parametrize("fixed", [pytest.param(False, marks=pytest.mark.slow), True])
def test_an_additive_step_with_a_combiner_trains_as_static_tasks(fixed):
    """IMTL-G (its state too); in parts (a traced task per part, bucketed lengths) or as
    one program (one length)."""
    steps, state = _setup("imtl_g")
    mesh = parallel.make_mesh()
    sharding = parallel.state_shardings(state, mesh)
    progs = Programs(steps, mesh, sharding, fixed_shapes=fixed)

    def reference(state, batches):  # today's: each task's gradient traced for that task
        grads = {t: jax.value_and_grad(steps.loss)(
            state.params, batches[t], t, steps._dropout_key(state, t)) for t in NAMES}
        return steps.apply_combined(state, {t: g[0] for t, g in grads.items()},
                                    {t: g[1] for t, g in grads.items()})

    reference = jax.jit(reference)
    ref, new = state, parallel.put(state, sharding)
    for i in range(3):
        lengths = (8, 8, 8, 8) if fixed else (8, 16, 16, 8) if i % 2 else (16, 8, 8, 16)
        batches = {t.name: _batch(t, n, 10 * i + j)
                   for j, (t, n) in enumerate(zip(TASKS, lengths, strict=True))}
        ref, ref_metrics = reference(ref, batches)
        new, metrics = progs.train(new, {t: parallel.global_batch(b, mesh)
                                         for t, b in batches.items()})
        for key, value in jax.device_get(ref_metrics).items():
            np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    diff, where = _max_diff(jax.device_get((ref.params, ref.opt_state)),
                            jax.device_get((new.params, new.opt_state)))
    assert diff <= TOLERANCE, where


def test_predictions_of_a_traced_task_are_its_own_padded():
    steps, state = _setup()
    predict = jax.jit(steps.predict_step)
    for i, t in enumerate(TASKS):
        batch = _batch(t, 8, i)
        own = steps.predict_step(state.params, batch, t.name)
        padded = predict(state.params, batch, jnp.int32(i))
        assert padded.shape == (4, steps.model.output_width) == (4, 5)
        np.testing.assert_allclose(heads.unpad(t.kind, t.num_labels, padded), own,
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(padded[:, heads.width(t.kind, t.num_labels):], 0)
