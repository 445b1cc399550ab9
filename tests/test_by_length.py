"""Steps traced once per batch structure with a symbolic length (flaxpals/train/by_length.py).

The reference is JAX's own per-length trace of the same step (`symbolic_length=False`):
the refined programs must compute the same updates, losses and predictions.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxpals.config_lib import base
from flaxpals.model.adapters import AdapterConfig
from flaxpals.model.bert import tiny_config
from flaxpals.model.multitask import ModelOptions, MultiTaskModel, TaskSpec, dummy_batch
from flaxpals.train import by_length, optim, parallel
from flaxpals.train.steps import Steps, TrainState, task_indices

TASKS = (TaskSpec("sst", "classification", 5), TaskSpec("quora", "pair_classification"),
         TaskSpec("sts", "pair_regression"))
OPTIONS = ModelOptions(AdapterConfig(kind="pal"), pooling="mean", pair_encoding="cross")
PLAIN = ModelOptions(pooling="mean", pair_encoding="cross")  # no adapters: quicker to compile


def _batch(task: TaskSpec, length: int, seed: int) -> dict:
    """8 rows of `length` random ids, the last 3 positions padding, with labels."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    b = dummy_batch(task, OPTIONS.pair_encoding, 8, length)
    b["input_ids"] = jax.random.randint(k1, (8, length), 1000, 2000)
    b["attention_mask"] = jnp.ones((8, length), jnp.int32).at[:, -3:].set(0)
    # float32 for every task, as steps.device_batch gives the trainer's batches
    b["labels"] = (jax.random.uniform(k2, (8,), maxval=5.0) if task.kind == "pair_regression"
                   else jax.random.randint(k2, (8,), 0, 2).astype(jnp.float32))
    b["mask"] = jnp.ones(8)
    return b


def _steps(symbolic: bool, options: ModelOptions, adamw: bool):
    """The trainer's path (a mesh, shardings, the state donated) on a 1-layer model."""
    model = MultiTaskModel(tiny_config(num_hidden_layers=1), TASKS, options)
    batches = {t.name: dummy_batch(t, options.pair_encoding) for t in TASKS}
    params = jax.jit(lambda k: model.init(k, batches, method=MultiTaskModel.init_all))(
        jax.random.key(0))["params"]
    # Plain SGD compiles in a fraction of AdamW's time (the default suite's test).
    tx = optim.make_optimizer(base().train, params, 100) if adamw else optax.sgd(1e-2)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                       jax.random.key_data(jax.random.key(1)))
    mesh = parallel.make_mesh()
    sharding = parallel.state_shardings(state, mesh)
    fns = Steps(model, tx).jitted(mesh, sharding, symbolic_length=symbolic)
    return fns, parallel.put(state, sharding), mesh, task_indices([t.name for t in TASKS], mesh)


def _run(symbolic: bool, schedule, predictions, options=PLAIN, adamw=False):
    """Train steps on (task, length) pairs in order, then predictions on (task, length)
    pairs; (steps, final params, losses, predictions, what each train body traced)."""
    traced = []
    original = Steps.train_step

    def counted(self, state, batch, task):
        traced.append(str(batch["input_ids"].shape[1]))  # "length" when symbolic
        return original(self, state, batch, task)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Steps, "train_step", counted)
        (train, _, predict), state, mesh, index = _steps(symbolic, options, adamw)
        specs = {t.name: t for t in TASKS}
        losses = []
        for i, (task, n) in enumerate(schedule):
            batch = parallel.global_batch(_batch(specs[task], n, i), mesh)
            state, metrics = train(state, batch, index[task])
            losses.append(float(metrics["loss"]))
        outputs = [np.asarray(predict(state.params, parallel.global_batch(
            _batch(specs[task], n, 100 + i), mesh), index[task])) for i, (task, n) in
            enumerate(predictions)]
    return (train, predict), jax.device_get(state.params), losses, outputs, traced


def _compare(schedule, predictions, **kw):
    (train, predict), params, losses, outputs, traced = _run(True, schedule, predictions, **kw)
    _, ref_params, ref_losses, ref_outputs, ref_traced = _run(False, schedule, predictions, **kw)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6, atol=1e-7)
    for out, ref in zip(outputs, ref_outputs, strict=True):
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 params, ref_params)
    return train, predict, traced, ref_traced


def test_symbolic_length_steps_compute_what_per_length_traces_compute():
    """The trainer's steps (SST and cross-encoded Quora pairs trained, Quora predicted at
    two lengths; plain encoder, SGD): the same losses, updates and predictions as
    per-length traces. The task is data, so the train body is traced once for the first
    length (every task) and once more, symbolic, for all further lengths (one here; the
    slow test below runs three lengths with PAL, AdamW and every task kind)."""
    schedule = [("sst", 16), ("quora", 16), ("sst", 24), ("sst", 16), ("quora", 24)]
    predictions = [("quora", 16), ("quora", 24), ("quora", 16)]
    train, predict, traced, ref_traced = _compare(schedule, predictions)
    assert traced == ["16", "length"]
    assert ref_traced == ["16", "24"]
    assert train.jitted._cache_size() == 1  # only the first length went through jit
    assert predict.jitted._cache_size() == 1


@pytest.mark.slow
def test_symbolic_length_steps_every_task_kind():
    schedule = [(t.name, n) for n in (16, 24, 32) for t in TASKS]
    train, predict, traced, _ = _compare(schedule, schedule, options=OPTIONS, adamw=True)
    assert traced == ["16", "length"]
    assert train.jitted._cache_size() == predict.jitted._cache_size() == 1


def test_a_step_that_cannot_be_exported_traces_per_length(caplog):
    def step(x, batch, task):
        if batch["ids"].shape[1] > 20:  # Python control flow on the length: not symbolic
            return x + batch["ids"].sum()
        return x - batch["ids"].sum()

    fn = by_length.ByLength(jax.jit(step))
    x, task = jnp.zeros(()), jnp.int32(0)
    with caplog.at_level(logging.WARNING, logger="flaxpals.train.by_length"):
        got = [float(fn(x, {"ids": jnp.ones((2, n))}, task)) for n in (16, 24, 32, 16)]
    assert got == [-32.0, 48.0, 64.0, -32.0]
    assert fn.jitted._cache_size() == 3  # every length through jit
    warnings = [r for r in caplog.records if "tracing per length" in r.getMessage()]
    assert len(warnings) == 1 and "step for batches of ids" in warnings[0].getMessage()


def test_batches_whose_arrays_disagree_on_the_length_take_the_jitted_path():
    fn = by_length.ByLength(jax.jit(lambda x, b, task: x + b["a"].sum() + b["b"].sum()))
    x = jnp.zeros(())
    for n in (4, 8):
        assert float(fn(x, {"a": jnp.ones((2, n)), "b": jnp.ones((2, 3))}, 0)) == 2 * n + 6
    assert by_length.length_of({"a": jnp.ones((2, 4)), "b": jnp.ones((2, 3))}) is None
    assert by_length.length_of({"a": jnp.ones((2, 4)), "labels": jnp.ones(2)}) == 4
