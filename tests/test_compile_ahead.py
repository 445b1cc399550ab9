"""Compiling ahead: the shapes a run needs, and a later call that compiles nothing."""

import itertools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxpals import batching, build, compilation, compile_ahead, input_pipeline, optim, parallel
from flaxpals.evaluation import EvalSets, eval_record, record_splits, split_limit
from flaxpals.steps import Steps, TrainState, device_batch
from tests.conftest import tiny


def _first_use(plan, start=0):
    """The plan's lengths in first-use order, by walking its batches one by one."""
    seen = []
    for k in range(start, start + plan.batches_per_epoch):
        length = plan.batch(k)[1]
        if length not in seen:
            seen.append(length)
    return seen


def test_train_shapes_are_each_tasks_lengths_in_first_use_order():
    rng = np.random.default_rng(0)
    a = batching.TrainPlan(rng.integers(3, 60, 200), (16, 32, 64), 16, seed=1)
    b = batching.TrainPlan(rng.integers(3, 20, 100), (16, 32, 64), 16, seed=2)
    assert sorted(_first_use(a)) == [16, 32, 64]
    # b's lengths fit 16 and 32 (the 16 bucket's leftover may ride in 32): a subset
    assert set(_first_use(b)) <= {16, 32}
    got = compile_ahead.train_shapes({"a": a, "b": b}, {"a": 0, "b": 0})
    ra, rb = _first_use(a), _first_use(b)
    expected = [(t, n[k]) for k in range(3) for t, n in (("a", ra), ("b", rb)) if k < len(n)]
    assert got == expected
    # Resumed mid-epoch (and epochs later): the order from there on.
    start = 3 * a.batches_per_epoch + 5
    assert compile_ahead.train_shapes({"a": a}, {"a": start}) == [
        ("a", n) for n in _first_use(a, start) + [n for n in _first_use(a) if n not in
                                                   _first_use(a, start)]]


def _setup(method, tasks):
    """What train.py builds before its loop, for a tiny run with two length buckets."""
    config = tiny(arg=f"method={method}", **{"data.buckets": (16, 32), "tasks": tasks,
                                             "data.train_limit": 96})
    mesh = parallel.make_mesh()
    model, params, tokenizer, tasks = build.build_model(config)
    data = build.load_data(config, tasks, tokenizer)
    tx = optim.make_optimizer(config.train, params, 20)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                       jax.random.key_data(jax.random.key(1)))
    sharding = parallel.state_shardings(state, mesh, False)
    state = parallel.put(state, sharding)
    fns = Steps(model, tx).jitted(mesh, sharding)
    names = [t.name for t in tasks]
    plans = {t: batching.TrainPlan(data[t]["train"].lengths(), (16, 32), 8, seed=i)
             for i, t in enumerate(names)}
    return config, mesh, model, state, data, fns, plans, tasks


def _batches_of_every_length(data, plans, mesh):
    """task -> {length: a real training batch at that length} over an epoch's plan."""
    out = {}
    for i, (t, plan) in enumerate(plans.items()):
        it = input_pipeline.train_batches(data[t]["train"], 8, seed=i, buckets=(16, 32))
        out[t] = {}
        for batch in itertools.islice(it, plan.batches_per_epoch):
            out[t].setdefault(batch["input_ids"].shape[1],
                              parallel.global_batch(device_batch(batch), mesh))
        assert set(out[t]) == set(_first_use(plan))
    return out


def _run_everything(config, fns, state, data, mesh, batches, tasks, method):
    """Every train shape once (then the epoch's evaluation); returns the state."""
    train_step, additive_step, predict_step = fns
    if method == "additive":
        for length in (16, 32):
            state, _ = additive_step(state, {t: b.get(length, next(iter(b.values())))
                                             for t, b in batches.items()})
    else:
        for t, by_length in batches.items():
            for batch in by_length.values():
                state, _ = train_step(state, batch, t)
    eval_record(predict_step, state.params, EvalSets(data, config, mesh), tasks, config)
    return state


@pytest.mark.parametrize("method,tasks", [
    ("sequential", ("sst",)),
    pytest.param("additive", ("sst", "sts"), marks=pytest.mark.slow)])
def test_after_compiling_ahead_the_run_compiles_nothing(method, tasks):
    config, mesh, model, state, data, fns, plans, tasks = _setup(method, tasks)
    batches = _batches_of_every_length(data, plans, mesh)

    jax.clear_caches()  # nothing compiled in memory: the worker must do it all
    done = set()
    if method == "additive":  # the first step, as the loop runs it: one batch per task
        first = {t: next(iter(b.items())) for t, b in batches.items()}
        state, _ = fns[1](state, {t: b for t, (_, b) in first.items()})
        done = {(t, n) for t, (n, _) in first.items()}
    eval_sets = EvalSets(data, config, mesh)
    worker = compile_ahead.for_training(
        config, fns, model, state, mesh, data, plans, {t: 0 for t in plans}, eval_sets,
        [(s, split_limit(config, s)) for s, _ in record_splits(config)], done)
    worker.join()
    assert worker.done == len(worker.jobs) > 0
    mark = compilation.STATS.snapshot()
    state = _run_everything(config, fns, state, data, mesh, batches, tasks, method)
    after = compilation.STATS.since(mark)
    # Not even a persistent-cache load: every call found its program in memory.
    assert (after.programs, after.cache_hits) == (0, 0), after

    # Control: once the in-memory programs are gone, the same calls are counted.
    jax.clear_caches()
    mark = compilation.STATS.snapshot()
    _run_everything(config, fns, state, data, mesh, batches, tasks, method)
    control = compilation.STATS.since(mark)
    assert control.programs + control.cache_hits >= len(worker.jobs)


def test_a_failing_job_is_logged_and_the_rest_run(caplog):
    ran = []

    def bad():
        raise ValueError("no such shape\nsecond line")

    worker = compile_ahead.start([("bad", bad), ("good", lambda: ran.append(1))])
    worker.join()
    assert ran == [1] and worker.done == 2
    assert "compiling bad ahead failed (ValueError: no such shape)" in caplog.text


def test_a_step_waits_for_its_shape_only_while_it_compiles():
    started, release, order = threading.Event(), threading.Event(), []

    def job():
        started.set()
        release.wait()
        order.append("compiled")

    worker = compile_ahead.start([(compile_ahead.train_job("sst", 32), job)])
    started.wait()
    worker.wait_if_running(compile_ahead.train_job("sst", 64))  # another shape: no wait
    order.append("other shape ran")
    waiter = threading.Thread(
        target=lambda: (worker.wait_if_running(compile_ahead.train_job("sst", 32)),
                        order.append("same shape ran")))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and order == ["other shape ran"]
    release.set()
    waiter.join()
    worker.join()
    assert order == ["other shape ran", "compiled", "same shape ran"]
    worker.wait_if_running(compile_ahead.train_job("sst", 32))  # done: returns at once
