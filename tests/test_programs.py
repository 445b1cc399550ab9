"""The run's programs: how many a run compiles, compiling ahead, and a later call that
compiles nothing."""

import itertools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxpals import workdir_format
from flaxpals.data import batching, input_pipeline
from flaxpals.model import build
from flaxpals.train import compilation, loop, optim, parallel, programs
from flaxpals.train.evaluate import EvalSets, eval_record, record_splits, split_limit
from flaxpals.train.programs import Programs
from flaxpals.train.steps import Steps, TrainState, device_batch
from tests.conftest import tiny

REAL_BUCKETS = (16, 24, 32, 48, 64, 96, 128)


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
    got = programs.train_shapes({"a": a, "b": b}, {"a": 0, "b": 0})
    ra, rb = _first_use(a), _first_use(b)
    expected = [(t, n[k]) for k in range(3) for t, n in (("a", ra), ("b", rb)) if k < len(n)]
    assert got == expected
    # Resumed mid-epoch (and epochs later): the order from there on.
    start = 3 * a.batches_per_epoch + 5
    assert programs.train_shapes({"a": a}, {"a": start}) == [
        ("a", n) for n in _first_use(a, start) + [n for n in _first_use(a) if n not in
                                                   _first_use(a, start)]]


# ---------------------------------------------------------------- programs per run


def _programs_of_a_run(tmp_path, shapes: str, method: str = "annealed",
                       pairs: str = "cross", history: list | None = None) -> dict[str, int]:
    """{jitted function: programs the run needed} of a 3-task tiny run over the real buckets
    and lengths: nothing compiled in memory before it, so each program it runs is compiled
    or loaded from the persistent cache (which JAX may keep using in a process that used
    it before, whatever config.compilation_cache says), and counted either way."""
    config = tiny(arg=f"method={method}", **{
        "data.shapes": shapes, "data.buckets": REAL_BUCKETS, "data.max_length": 128,
        "data.train_limit": 192, "data.eval_limit": 96, "train.batch_size": 16,
        "train.num_epochs": 1, "train.steps_per_epoch": 12, "eval.batch_size": 32,
        "eval.train_sample": 32, "checkpoint.every_steps": 100, "compilation_cache": False,
        "model.pair_encoding": pairs})
    jax.clear_caches()
    mark = compilation.STATS.by_function()
    workdir = tmp_path / f"{shapes}-{method}-{pairs}"
    loop.train_and_evaluate(config, workdir)
    if history is not None:
        history += workdir_format.read_metrics(workdir)
    counts = {}
    for name, total in compilation.STATS.by_function().items():
        d = total - mark.get(name, compilation.Compiled())
        if d.programs + d.cache_hits:
            counts[name] = d.programs + d.cache_hits
    return counts


def _steps_of(counts: dict[str, int]) -> tuple[int, int]:
    """(train programs, predict programs): the step functions' compilations."""
    trained = sum(n for k, n in counts.items()
                  if any(s in k for s in ("train_step", "additive_step", "task_grads",
                                          "apply_combined")))
    return trained, sum(n for k, n in counts.items() if "predict_step" in k)


@pytest.mark.parametrize("method,pairs", [
    ("annealed", "cross"),
    pytest.param("additive", "cross", marks=pytest.mark.slow),
    pytest.param("annealed", "bi", marks=pytest.mark.slow)])
def test_the_accelerator_policy_compiles_a_program_per_step_kind(tmp_path, method, pairs):
    """Three tasks over lengths 16..128: under `fixed` one train and one predict program
    per batch structure (the task is data), whatever lengths the examples have."""
    fixed = _steps_of(_programs_of_a_run(tmp_path, "fixed", method, pairs))
    structures = 2 if pairs == "bi" else 1  # bi-encoded pairs: two sentences per example
    assert fixed[0] <= (1 if method == "additive" else structures), fixed
    assert fixed[1] <= structures, fixed
    assert fixed[0] >= 1 and fixed[1] >= 1  # counted at all
    print(f"{method}, {pairs}: fixed compiled (train, predict) = {fixed}")


def test_packed_rows_train_in_one_program(tmp_path):
    """`packed`: one train program (the rows every batch needs), evaluation as `fixed`."""
    history = []
    packed = _steps_of(_programs_of_a_run(tmp_path, "packed", history=history))
    assert packed == (1, 1)
    (record,) = history
    assert all(np.isfinite(v) for k, v in record.items() if k.startswith(("loss/", "dev/")))
    assert {"loss/sst", "loss/quora", "loss/sts"} <= set(record)


@pytest.mark.slow
def test_the_cpu_policy_compiles_a_program_per_length_used(tmp_path):
    """The CPU's `buckets` on the same run: a train and a predict program per length used,
    still shared by the tasks (printed beside the accelerator policy's)."""
    buckets = _steps_of(_programs_of_a_run(tmp_path, "buckets"))
    print(f"buckets compiled (train, predict) = {buckets}; fixed: (1, 1)")
    assert buckets[0] > 1 and buckets[1] > 1
    assert buckets[0] <= len(REAL_BUCKETS) and buckets[1] <= len(REAL_BUCKETS)


# ---------------------------------------------------------------- compiling ahead


def _setup(method, tasks):
    """What loop.py builds before its loop, for a tiny run with two length buckets."""
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
    progs = Programs(Steps(model, tx), mesh, sharding)
    names = [t.name for t in tasks]
    plans = {t: batching.TrainPlan(data[t]["train"].lengths(), (16, 32), 8, seed=i)
             for i, t in enumerate(names)}
    return config, mesh, state, data, progs, plans, tasks


def _batches_of_every_length(data, plans, mesh):
    """task -> {length: a real training batch at that length} over an epoch's plan."""
    out = {}
    for t, plan in plans.items():
        it = input_pipeline.planned_batches(data[t]["train"], plan)
        out[t] = {}
        for batch in itertools.islice(it, plan.batches_per_epoch):
            out[t].setdefault(batch["input_ids"].shape[1],
                              parallel.global_batch(device_batch(batch), mesh))
        assert set(out[t]) == set(_first_use(plan))
    return out


def _run_everything(config, progs, state, data, mesh, batches, tasks, method):
    """Every train shape once (then the epoch's evaluation); returns the state."""
    if method == "additive":
        for length in (16, 32):
            state, _ = progs.train(state, {t: b.get(length, next(iter(b.values())))
                                           for t, b in batches.items()})
    else:
        for t, by_length in batches.items():
            for batch in by_length.values():
                state, _ = progs.train(state, {t: batch})
    eval_record(progs.predict, state.params, EvalSets(data, config, mesh), tasks, config)
    return state


@pytest.mark.parametrize("method,tasks", [
    ("sequential", ("sst",)),
    pytest.param("additive", ("sst", "sts"), marks=pytest.mark.slow)])
def test_after_compiling_ahead_the_run_compiles_nothing(method, tasks):
    config, mesh, state, data, progs, plans, tasks = _setup(method, tasks)
    batches = _batches_of_every_length(data, plans, mesh)

    jax.clear_caches()  # nothing compiled in memory: the worker must do it all
    if method == "additive":  # the first step, as the loop runs it: one batch per task
        state, _ = progs.train(state, {t: next(iter(b.values())) for t, b in batches.items()})
    eval_sets = EvalSets(data, config, mesh)
    predict = [(t.name, n) for t in tasks for s, _ in record_splits(config)
               for n in eval_sets.lengths(t.name, s, split_limit(config, s))]
    progs.compile_ahead(state, programs.train_shapes(plans, {t: 0 for t in plans}), 8,
                        predict, config.eval.batch_size, additive=method == "additive")
    progs._worker.join()
    assert progs._worker.done == len(progs._worker.jobs) > 0
    mark = compilation.STATS.snapshot()
    state = _run_everything(config, progs, state, data, mesh, batches, tasks, method)
    after = compilation.STATS.since(mark)
    # Not even a persistent-cache load: every call found its program in memory.
    assert (after.programs, after.cache_hits) == (0, 0), after

    # Control: once the in-memory programs are gone, the same calls are counted.
    jax.clear_caches()
    mark = compilation.STATS.snapshot()
    _run_everything(config, progs, state, data, mesh, batches, tasks, method)
    control = compilation.STATS.since(mark)
    assert control.programs + control.cache_hits >= len(progs._worker.jobs)


def test_a_failing_job_is_logged_and_the_rest_run(caplog):
    ran = []

    def bad():
        raise ValueError("no such shape\nsecond line")

    worker = programs.start([("bad", bad), ("good", lambda: ran.append(1))])
    worker.join()
    assert ran == [1] and worker.done == 2
    assert "compiling bad ahead failed (ValueError: no such shape)" in caplog.text


def test_a_step_waits_for_its_shape_only_while_it_compiles():
    started, release, order = threading.Event(), threading.Event(), []

    def job():
        started.set()
        release.wait()
        order.append("compiled")

    worker = programs.start([("train single L32", job)])
    started.wait()
    worker.wait_if_running("train single L64")  # another shape: no wait
    order.append("other shape ran")
    waiter = threading.Thread(
        target=lambda: (worker.wait_if_running("train single L32"),
                        order.append("same shape ran")))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and order == ["other shape ran"]
    release.set()
    waiter.join()
    worker.join()
    assert order == ["other shape ran", "compiled", "same shape ran"]
    worker.wait_if_running("train single L32")  # done: returns at once
