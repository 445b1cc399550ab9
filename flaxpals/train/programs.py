"""A run's compiled programs behind one object: the loop asks for a step and gets one.

    programs = Programs(steps, mesh, state_sharding, fixed_shapes=False)
    state, metrics = programs.train(state, batches)   # task -> global batch: one task's
                                                      # step, or the additive step (all tasks)
    outputs = programs.predict(params, batch, "sst")  # [rows, model.output_width], on device
    programs.compile_ahead(state, train_shapes(plans, positions), train_rows,
                           [(task, length), ...], predict_rows, additive=False)
    programs.close()                                  # waits for a compile in flight
    predict = Programs.inference(model, mesh, params_sharding).predict   # a restored run

The task is data (steps.py): one train program per batch structure (one sentence
per example, or a bi-encoded pair) and padded length serves every task, and so
does one predict program. How many lengths a run pads to is the shape policy
(`config_lib.shape_policy`: `fixed` pads every batch to data.max_length, so a
run compiles one train and one predict program per structure, and the additive
step is one program; `buckets` pads to the smallest of data.buckets, a program
per length used). Metrics come back as the step left them, on the device; the
loop fetches them when it logs.

Compiling ahead: compiled on demand, each new shape stalls the loop the first
time it comes up (seconds to compile, or to trace and load from the persistent
cache). `compile_ahead` runs `fn.lower(*abstract_args).compile()` for every shape
the run will need on a daemon thread instead, in the order they first come up,
while the main thread trains on the shapes it has: `jax.jit` keeps what the thread
compiled, and the later call compiles nothing. A step whose shape is the one
compiling waits for it rather than trace the same program beside it. A job that
fails is logged and left to the call, which then compiles (and raises) as it
would have. `close` waits for the compile in flight: one cannot be interrupted,
and a process that exits during one aborts.

The shapes come from the batch plans (`batching.TrainPlan`): the set of lengths
an epoch uses depends only on the bucket counts, so one epoch's plan gives every
shape the run needs (`train_shapes`).
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

from flaxpals.data import batching
from flaxpals.model.multitask import dummy_batch
from flaxpals.train import parallel
from flaxpals.train.by_length import abstract
from flaxpals.train.steps import Steps, for_gradients, task_indices

log = logging.getLogger(__name__)


class Programs:
    """The train, additive and predict programs of one run (module docstring).

    steps: the run's Steps; mesh, state_sharding: as `Steps.jitted`; fixed_shapes:
    whether every batch has one padded length (the shape policy `fixed`);
    symbolic_length: `by_length.ByLength`'s switch (config.symbolic_length).
    `Programs.inference` has the predict program alone.
    """

    def __init__(self, steps: Steps, mesh, state_sharding, *, fixed_shapes: bool = False,
                 symbolic_length: bool = True, params_sharding=None):
        self.steps, self.mesh = steps, mesh
        self.names = steps.task_names
        self._pairs = steps.model.options.pair_encoding
        if state_sharding is None:
            self._train = self._additive = None
            self._predict = steps.jitted_predict(mesh, params_sharding, symbolic_length)
        else:
            self._train, self._additive, self._predict = steps.jitted(
                mesh, state_sharding, symbolic_length, fixed_shapes)
        self._worker: Worker | None = None

    @functools.cached_property
    def _index(self) -> dict:
        """name -> the task index the programs take, on the devices (made when first run)."""
        return task_indices(self.names, self.mesh)

    def _abstract_index(self):
        """The task index as lowering sees it: a replicated int32 scalar, no values (so a
        program can be compiled for devices this process cannot run on)."""
        sharding = None if self.mesh is None else parallel.replicated(self.mesh)
        return jax.ShapeDtypeStruct((), np.int32, sharding=sharding)

    @classmethod
    def inference(cls, model, mesh, params_sharding, symbolic_length: bool = True) -> Programs:
        """The predict program of a restored model (eval, predict, export)."""
        return cls(Steps(model, None), mesh, None, symbolic_length=symbolic_length,
                   params_sharding=params_sharding)

    def train(self, state, batches: Mapping[str, Any]):
        """(new state, metrics on the device) of one step: `batches` maps the step's tasks to
        their global batches, one task (its step) or every task (the additive step).
        Metrics: loss/<task> per task, grad_norm, and a combiner's statistics."""
        if self._worker is not None:
            for t, b in batches.items():
                self._worker.wait_if_running(self.train_job(t, _length(b),
                                                            additive=len(batches) > 1))
        if len(batches) > 1:
            return self._additive(state, batches)
        ((task, batch),) = batches.items()
        state, metrics = self._train(state, batch, self._index[task])
        metrics[f"loss/{task}"] = metrics.pop("loss")
        return state, metrics

    def lower_train(self, state, batch, task: str):
        """The Lowered train program of `task`'s batches of this shape (`.compile()` it;
        its `cost_analysis()` counts the step's FLOPs). Arguments may be abstract
        (ShapeDtypeStructs with shardings)."""
        self.steps.model.task(task)  # a known task
        return self._train.lower(state, batch, self._abstract_index())

    def lower_additive(self, state, batches):
        """The Lowered additive step of one padded length (`fixed_shapes`): one program."""
        return self._additive.lower(state, batches)

    def lower_predict(self, params, batch, task: str):
        """The Lowered predict program of `task`'s batches of this shape."""
        self.steps.model.task(task)
        return self._predict.lower(params, batch, self._abstract_index())

    def predict(self, params, batch, task: str):
        """The model's outputs for a global batch of `task`: [rows, output_width], padded
        (`heads.unpad` on the host gives the task's own), on the device."""
        if self._worker is not None:
            self._worker.wait_if_running(self.predict_job(task, _length(batch)))
        return self._predict(params, batch, self._index[task])

    # ------------------------------------------------------------ compiling ahead

    def structure(self, task: str) -> str:
        """'pair' for a task whose batches hold two sentences (a bi-encoded pair), else
        'single': with the padded length, what makes another program."""
        kind = self.steps.model.task(task).kind
        return "pair" if self._pairs == "bi" and kind != "classification" else "single"

    def train_job(self, task: str, length: int, additive: bool = False) -> str:
        """The name of the job compiling the train program of `task`'s batches at `length`
        (for the additive schedule, its per-task gradient part)."""
        what = "grads" if additive and hasattr(self._additive, "parts") else "train"
        return f"{what} {self.structure(task)} L{length}"

    def predict_job(self, task: str, length: int) -> str:
        return f"predict {self.structure(task)} L{length}"

    def compile_ahead(self, state, train: Sequence[tuple[str, int]], train_rows: int,
                      predict: Sequence[tuple[str, int]], predict_rows: int,
                      additive: bool) -> None:
        """Starts compiling, on a background thread, every program of these shapes not yet
        compiled: `train` and `predict`, (task, length) pairs in the order they come up
        (`train_shapes`), batches of `*_rows` global rows; `additive`: the run trains on the
        additive schedule (only the parts of a bucketed additive step compile per shape).
        Shapes whose program a call already made are skipped by jax.jit's own cache."""
        sharding = parallel.batch_sharding(self.mesh)
        state = abstract(state)
        jobs, seen = [], set()
        if additive and not hasattr(self._additive, "parts"):
            train = []  # one program, compiled by the first step
        elif additive:  # its per-task gradient part
            step, step_state = self._additive.parts[0], for_gradients(state)
        else:
            step, step_state = self._train, state
        for task, length in train:
            name = self.train_job(task, length, additive)
            if name in seen:
                continue
            seen.add(name)
            batch = batch_spec(self.steps.model.task(task), self._pairs, train_rows, length,
                               sharding, labels=True)
            jobs.append((name, functools.partial(_compile, step, step_state, batch,
                                                 self._abstract_index())))
        for task, length in predict:
            name = self.predict_job(task, length)
            if name in seen:
                continue
            seen.add(name)
            batch = batch_spec(self.steps.model.task(task), self._pairs, predict_rows, length,
                               sharding)
            jobs.append((name, functools.partial(_compile, self._predict, state.params, batch,
                                                 self._abstract_index())))
        self._worker = start(jobs)

    def close(self) -> None:
        """Stops compiling ahead after the job in flight, and waits for it."""
        if self._worker is not None:
            self._worker.cancel()
            self._worker.join()


def _length(batch) -> int:
    return int(batch["input_ids"].shape[1])


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
               labels: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
    """The abstract batch of `task` (a models.TaskSpec) a step gets: the model inputs
    int32 [rows, length]; with `labels`, labels and mask float32 [rows] too (a train
    batch, `steps.device_batch`)."""
    spec = {k: jax.ShapeDtypeStruct((rows, length), v.dtype, sharding=sharding)
            for k, v in dummy_batch(task, pair_encoding, 1, 1).items()}
    if labels:
        spec["labels"] = jax.ShapeDtypeStruct((rows,), np.float32, sharding=sharding)
        spec["mask"] = jax.ShapeDtypeStruct((rows,), np.float32, sharding=sharding)
    return spec


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
        if self.jobs:
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
