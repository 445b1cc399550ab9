"""A jitted step traced once per batch structure for every padded length (jax.export).

    step = by_length.ByLength(jax.jit(f, donate_argnums=0), donate_argnums=0,
                              in_shardings=(state_sharding, data, rep), out_shardings=...)
    out = step(state, batch, task)                      # as jitted(state, batch, task)
    step.lower(state, batch, task).compile()            # ahead of time, as jax.jit's

The steps take `(params or state, batch, *rest)`, the batch's arrays of rank >= 2
[rows, length], length one of the run's padded lengths (a batch whose arrays
disagree on the length takes the per-length path); `rest` (the task index) has
fixed shapes. A jitted step runs its Python body again at every new length:
about a second for a MiniLM train step, spent even when the program then loads
from the persistent compilation cache. Here the first length of a batch
structure (its set of keys: one sentence per example, or two) goes through the
plain jitted step; from its second length on, the step is exported once with
the length as a symbolic dimension (`jax.export`), and each length lowers that
module with the length fixed (shape refinement: a fraction of a trace) and
compiles it, or loads it from the cache. The refined program computes what the
per-length trace computes (tests/test_by_length.py compares them).

The first length stays on the plain path so that the first step of a run waits
for no export. A step that cannot be exported (code that a symbolic length
cannot pass through) keeps the per-length trace, with one warning; so does every
step of a multi-process run, where exporting is not tested.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import jax
from jax import export

log = logging.getLogger(__name__)

_FAILED = object()  # the structure's export failed: per-length traces from then on


def length_of(batch: Any) -> int | None:
    """The padded length of a batch (dim 1 of its arrays of rank >= 2); None if those
    disagree or there are none."""
    lengths = {x.shape[1] for x in jax.tree.leaves(batch) if len(x.shape) >= 2}
    return lengths.pop() if len(lengths) == 1 else None


def structure(batch: Any) -> tuple[tuple[str, str], ...]:
    """What, besides its length, makes a batch another program: its keys and dtypes."""
    return tuple(sorted((k, str(v.dtype)) for k, v in batch.items()))


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
    """A step `(first, batch, *rest)` compiled per (batch structure, length), traced
    once per structure."""

    def __init__(self, jitted, *, in_shardings=None, out_shardings=None, donate_argnums=(),
                 enabled: bool = True):
        self.jitted = jitted  # the per-length path (and the first length of each structure)
        self._jit_kw = {"donate_argnums": donate_argnums}
        if in_shardings is not None:
            self._jit_kw |= {"in_shardings": in_shardings, "out_shardings": out_shardings}
        self.enabled = enabled and jax.process_count() == 1
        self.__name__ = getattr(jitted, "__name__", "step")
        self._lock = threading.Lock()
        self._exported: dict[tuple, Any] = {}  # structure -> jax.export.Exported or _FAILED
        self._export_locks: dict[tuple, threading.Lock] = {}
        self._fns: dict[tuple, Any] = {}  # (structure, length) -> its callable

    def __call__(self, first, batch, *rest):
        return self.program(first, batch, *rest)(first, batch, *rest)

    def lower(self, first, batch, *rest):
        """The Lowered program for these shapes (`.compile()` it to compile ahead)."""
        return self.program(first, batch, *rest).lower(first, batch, *rest)

    def program(self, first, batch, *rest):
        """The callable `(first, batch, *rest)` this step runs for these shapes (made on
        first ask: the plain jitted step for a structure's first length, else its
        export's)."""
        length = length_of(batch)
        if length is None:  # no one length to make symbolic: as jitted
            return self.jitted
        kind = structure(batch)
        key = (kind, length)
        with self._lock:
            fn = self._fns.get(key)
            seen = any(k == kind for k, _ in self._fns)
        if fn is not None:
            return fn
        exp = self._export(first, batch, rest, kind) if self.enabled and seen else _FAILED
        if exp is _FAILED:
            fn = self.jitted
        else:
            def call(*args):
                return exp.call(*args)

            # The step's own name in compile logs, stats and cache file names.
            call.__name__ = call.__qualname__ = self.__name__
            fn = jax.jit(call, **self._jit_kw)
        with self._lock:
            return self._fns.setdefault(key, fn)

    def _export(self, first, batch, rest, kind):
        with self._lock:
            lock = self._export_locks.setdefault(kind, threading.Lock())
        with lock:  # one export per structure, whichever thread asks first
            if kind not in self._exported:
                (length,) = export.symbolic_shape("length")
                try:
                    self._exported[kind] = export.export(self.jitted)(
                        abstract(first), abstract(batch, length), *abstract(rest))
                except Exception as e:  # noqa: BLE001 -- any failure: the per-length path
                    first_line = (str(e).splitlines() or [""])[0][:200]
                    log.warning("%s for batches of %s: tracing per length (the "
                                "symbolic-length export failed: %s: %s)", self.__name__,
                                ", ".join(k for k, _ in kind), type(e).__name__, first_line)
                    self._exported[kind] = _FAILED
            return self._exported[kind]
