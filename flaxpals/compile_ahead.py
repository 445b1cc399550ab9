"""Compiling the train step's other bucket shapes on a background thread.

    worker = compile_ahead.for_training(config, fns, model, state, mesh, data, plans,
                                        start_batches, eval_sets, eval_splits, done)
    ...                                   # the training loop, from its second step
    worker.wait_if_running(compile_ahead.train_job(task, length))  # before that step
    worker.cancel(); worker.join()

    compile_ahead.train_shapes(plans, start_batches)   # [(task, length), ...] in first-use order
    compile_ahead.start([(name, fn), ...])             # any lower-and-compile jobs, in order

Every (task, bucket length) pair the run will train on is its own program (one
per shape; `data.buckets`). Compiled on demand, each stalls the loop the first
time its shape comes up (seconds to compile, or to trace and load from the
persistent cache). `start` runs `fn.lower(*abstract_args).compile()` for each on
a daemon thread instead, in the order the shapes first come up, while the main
thread trains on the shapes it has: `jax.jit` keeps what the thread compiled,
and the later call compiles nothing. A step whose shape is the one compiling
waits for it (`wait_if_running`) rather than trace the same program beside it.
A job that fails is logged and left to the call, which then compiles (and
raises) as it would have. However the loop ends (done, stopped by a signal or
the time budget, an error), it waits for the compile in flight: one cannot be
interrupted, and a process that exits during one aborts.

Batch shapes come from the batch plans (`batching.TrainPlan`): the set of
lengths an epoch uses depends only on the bucket counts, so one epoch's plan
gives every shape the run needs.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from flaxpals import batching, config_lib, parallel
from flaxpals.by_length import abstract
from flaxpals.models import dummy_batch
from flaxpals.steps import for_gradients

log = logging.getLogger(__name__)


def train_shapes(plans: Mapping[str, batching.TrainPlan],
                 start_batches: Mapping[str, int]) -> list[tuple[str, int]]:
    """Every (task, padded length) the plans train on, in first-use order.

    Tasks interleave: each task's lengths in the order its plan first uses them
    from `start_batches[task]` on, then round-robin over the tasks (the sampler's
    order is not known ahead).
    """
    per_task = {}
    for task, plan in plans.items():
        first = start_batches.get(task, 0)
        epoch = first // plan.batches_per_epoch
        _, lengths = plan.epoch(epoch)
        # From the start batch to the epoch's end, then the epoch's start (the next
        # epoch uses the same set of lengths, in another order).
        at = first - epoch * plan.batches_per_epoch
        ordered = np.concatenate([lengths[at:], lengths[:at]])
        _, index = np.unique(ordered, return_index=True)
        per_task[task] = [int(ordered[i]) for i in sorted(index)]
    shapes = []
    for k in range(max((len(v) for v in per_task.values()), default=0)):
        shapes += [(task, lengths[k]) for task, lengths in per_task.items() if k < len(lengths)]
    return shapes


def batch_spec(task, pair_encoding: str, rows: int, length: int, sharding,
               labels_dtype=None) -> dict[str, jax.ShapeDtypeStruct]:
    """The abstract batch of `task` (a models.TaskSpec) a step gets: the model inputs
    int32 [rows, length]; with `labels_dtype`, labels [rows] and mask float32 [rows]
    too (a train batch, `steps.device_batch`)."""
    spec = {k: jax.ShapeDtypeStruct((rows, length), v.dtype, sharding=sharding)
            for k, v in dummy_batch(task, pair_encoding, 1, 1).items()}
    if labels_dtype is not None:
        spec["labels"] = jax.ShapeDtypeStruct((rows,), labels_dtype, sharding=sharding)
        spec["mask"] = jax.ShapeDtypeStruct((rows,), np.float32, sharding=sharding)
    return spec


def for_training(config, fns, model, state, mesh, data, plans, start_batches, eval_sets,
                 eval_splits, done) -> Worker:
    """Starts compiling every train and predict shape of a run that `done` lacks.

    fns: (train_step, additive_step, predict_step) of `Steps.jitted`; state: the
    TrainState (only its shapes and shardings are read); data: task -> split ->
    input_pipeline.Split; plans: task -> its batching.TrainPlan; eval_splits:
    (split, limit) pairs each epoch evaluates; done: (task, length) pairs already
    compiled. The additive schedule compiles its per-task gradient part.
    """
    train_step, additive_step, predict_step = fns
    sharding = parallel.batch_sharding(mesh)
    pairs = config.model.pair_encoding
    state = abstract(state)
    if config_lib.schedule(config.train) == "additive":
        grads, _ = additive_step.parts
        step, step_state = grads, for_gradients(state)
    else:
        step, step_state = train_step, state
    jobs = []
    for task, length in train_shapes(plans, start_batches):
        if (task, length) in done:
            continue
        batch = batch_spec(model.task(task), pairs, config.train.batch_size, length, sharding,
                           data[task]["train"].labels.dtype)
        jobs.append((train_job(task, length),
                     functools.partial(_compile, step, step_state, batch, task)))
    for task in data:
        lengths = {n for split, limit in eval_splits for n in eval_sets.lengths(task, split, limit)}
        for length in sorted(lengths):
            batch = batch_spec(model.task(task), pairs, config.eval.batch_size, length, sharding)
            jobs.append((f"predict {task} L{length}",
                         functools.partial(_compile, predict_step, state.params, batch, task)))
    return start(jobs)


def train_job(task: str, length: int) -> str:
    """The name of the job compiling `task`'s train program at `length`."""
    return f"train {task} L{length}"


def _compile(fn, *args) -> None:
    fn.lower(*args).compile()


class Worker:
    """The background thread: runs jobs in order until done or cancelled."""

    def __init__(self, jobs: Sequence[tuple[str, Callable[[], Any]]]):
        self.jobs = list(jobs)
        self.done = 0  # jobs finished (failed ones included)
        self._cancel = threading.Event()
        self._running: str | None = None  # the job compiling now
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="flaxpals-compile-ahead",
                                        daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        for name, job in self.jobs:
            if self._cancel.is_set():
                return
            with self._changed:
                self._running = name
            try:
                job()
            except Exception as e:  # noqa: BLE001 -- the call itself will raise it
                first = (str(e).splitlines() or [""])[0][:200]
                log.warning("compiling %s ahead failed (%s: %s); it compiles when first "
                            "called", name, type(e).__name__, first)
            finally:
                with self._changed:
                    self._running = None
                    self._changed.notify_all()
            self.done += 1
        log.info("compiled %d program shape(s) ahead in %.1f s", len(self.jobs),
                 time.perf_counter() - t0)

    def wait_if_running(self, name: str) -> None:
        """Returns once the job `name` is not the one compiling. A caller about to run
        that program would otherwise trace and lower it a second time beside the worker,
        both threads taking turns at the GIL; waiting costs at most what is left of it."""
        with self._changed:
            self._changed.wait_for(lambda: self._running != name)

    def cancel(self) -> None:
        """No job starts after this; the one running finishes."""
        self._cancel.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


def start(jobs: Sequence[tuple[str, Callable[[], Any]]]) -> Worker:
    """Runs each job (name, a function that lowers and compiles one program) in order
    on a daemon thread; returns its started Worker."""
    worker = Worker(jobs)
    worker._thread.start()
    return worker
