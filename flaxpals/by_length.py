"""A jitted step traced once per task for every padded length (jax.export).

    step = by_length.ByLength(jax.jit(f, static_argnames="task", donate_argnums=0),
                              in_shardings=(state_sharding, data), out_shardings=...,
                              donate_argnums=0)
    out = step(state, batch, "sst")                     # as jitted(state, batch, "sst")
    step.lower(state, batch, "sst").compile()           # ahead of time, as jax.jit's

The steps take `(params or state, batch, task)`; `task` is static and the batch's
arrays of rank >= 2 are [rows, length], length one of `data.buckets` (a batch
whose arrays disagree on the length takes the per-length path). A jitted
step runs its Python body again at every new length: about a second for a
MiniLM train step, spent even when the program then loads from the persistent
compilation cache. Here the first length of a task goes through the jitted
step as before; from its second length on, the task's step is exported once
with the length as a symbolic dimension (`jax.export`), and each length lowers
that module with the length fixed (shape refinement: a fraction of a trace) and
compiles it, or loads it from the cache. The refined program computes what the
per-length trace computes (tests/test_by_length.py compares them).

The first length stays on the plain path so that the first step of a run waits
for no export. A task whose step cannot be exported (code that a symbolic
length cannot pass through) keeps the per-length trace, with one warning; so
does every step of a multi-process run, where exporting is not tested.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import jax
from jax import export

log = logging.getLogger(__name__)

_FAILED = object()  # the task's export failed: per-length traces from then on


def length_of(batch: Any) -> int | None:
    """The padded length of a batch (dim 1 of its arrays of rank >= 2); None if those
    disagree or there are none."""
    lengths = {x.shape[1] for x in jax.tree.leaves(batch) if len(x.shape) >= 2}
    return lengths.pop() if len(lengths) == 1 else None


def abstract(tree: Any, length: Any = None) -> Any:
    """ShapeDtypeStructs of `tree` (same shapes, dtypes and shardings); with `length`,
    dim 1 of rank >= 2 leaves replaced (a symbolic dimension or an int)."""

    def one(x):
        shape = tuple(x.shape)
        if length is not None and len(shape) >= 2:
            shape = (shape[0], length, *shape[2:])
        return jax.ShapeDtypeStruct(shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, tree)


class ByLength:
    """A step `(first, batch, task)` compiled per (task, length), traced once per task."""

    def __init__(self, jitted, *, in_shardings=None, out_shardings=None, donate_argnums=(),
                 enabled: bool = True):
        self.jitted = jitted  # the per-length path (and the first length of each task)
        self._jit_kw = {"donate_argnums": donate_argnums}
        if in_shardings is not None:
            self._jit_kw |= {"in_shardings": in_shardings, "out_shardings": out_shardings}
        self.enabled = enabled and jax.process_count() == 1
        self.__name__ = getattr(jitted, "__name__", "step")
        self._lock = threading.Lock()
        self._exported: dict[str, Any] = {}  # task -> jax.export.Exported or _FAILED
        self._export_locks: dict[str, threading.Lock] = {}
        self._fns: dict[tuple[str, int], Any] = {}  # (task, length) -> its callable

    def __call__(self, first, batch, task: str):
        return self.program(first, batch, task)(first, batch)

    def lower(self, first, batch, task: str):
        """The Lowered program for these shapes (`.compile()` it to compile ahead)."""
        return self.program(first, batch, task).lower(first, batch)

    def shapes(self) -> list[tuple[str, int]]:
        """The (task, length) pairs called or lowered so far: one program each."""
        with self._lock:
            return sorted(self._fns)

    def exported(self, task: str) -> bool:
        """Whether `task`'s step runs from its symbolic-length export (else per length)."""
        return self._exported.get(task, _FAILED) is not _FAILED

    def program(self, first, batch, task: str):
        """The callable `(first, batch)` this step runs for these shapes (made on first
        ask: the per-length path for a task's first length, else its export's)."""
        length = length_of(batch)
        if length is None:  # no one length to make symbolic: as jitted
            return _Partial(self.jitted, task)
        key = (task, length)
        with self._lock:
            fn = self._fns.get(key)
            seen = any(t == task for t, _ in self._fns)
        if fn is not None:
            return fn
        exp = self._export(first, batch, task) if self.enabled and seen else _FAILED
        if exp is _FAILED:
            fn = _Partial(self.jitted, task)
        else:
            def call(first, batch):
                return exp.call(first, batch)

            # The step's own name in compile logs, stats and cache file names.
            call.__name__ = call.__qualname__ = self.__name__
            fn = jax.jit(call, **self._jit_kw)
        with self._lock:
            return self._fns.setdefault(key, fn)

    def _export(self, first, batch, task: str):
        with self._lock:
            lock = self._export_locks.setdefault(task, threading.Lock())
        with lock:  # one export per task, whichever thread asks first
            if task not in self._exported:
                (length,) = export.symbolic_shape("length")
                try:
                    self._exported[task] = export.export(self.jitted)(
                        abstract(first), abstract(batch, length), task)
                except Exception as e:  # noqa: BLE001 -- any failure: the per-length path
                    first_line = (str(e).splitlines() or [""])[0][:200]
                    log.warning("%s for task %s: tracing per length (the symbolic-length "
                                "export failed: %s: %s)", self.__name__, task,
                                type(e).__name__, first_line)
                    self._exported[task] = _FAILED
            return self._exported[task]


class _Partial:
    """jitted(first, batch, task) with the task fixed; `.lower` as jax.jit's."""

    def __init__(self, jitted, task: str):
        self.jitted, self.task = jitted, task

    def __call__(self, first, batch):
        return self.jitted(first, batch, self.task)

    def lower(self, first, batch):
        return self.jitted.lower(first, batch, self.task)
