"""XLA compilations: the persistent cache, and counting what a run compiles.

    compilation.enable_cache(config)           # before the first jit call of a run
    mark = compilation.STATS.snapshot()
    ...                                        # jit-compiled work
    print(compilation.STATS.since(mark))       # Compiled(programs=3, seconds=8.1, ...)
    names = compilation.STATS.by_function()    # {jitted function's name: Compiled}

The cache keeps every compiled program under `<cache dir>/jax` (flaxpals.data.paths;
`config.compilation_cache` turns it off), so a second run of the same config
loads its programs instead of compiling them. A directory set before flaxpals
runs (`JAX_COMPILATION_CACHE_DIR`, or `jax.config.update`) is kept.

Counts come from `jax.monitoring`: JAX reports each backend compile request and
each persistent-cache hit; a request that was not a hit compiled.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

import jax
from jax import monitoring

from flaxpals.data import paths

log = logging.getLogger(__name__)

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # a hit or a compile
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


@dataclasses.dataclass(frozen=True)
class Compiled:
    """What was compiled over some span: XLA compilations and persistent-cache loads."""

    programs: int = 0  # compiled by XLA
    seconds: float = 0.0  # spent compiling them (cache loads excluded)
    cache_hits: int = 0  # loaded from the persistent cache instead
    cache_seconds: float = 0.0  # spent loading those

    def __add__(self, other: Compiled) -> Compiled:
        return Compiled(*(a + b for a, b in zip(dataclasses.astuple(self),
                                                dataclasses.astuple(other), strict=True)))

    def __sub__(self, other: Compiled) -> Compiled:
        return Compiled(*(a - b for a, b in zip(dataclasses.astuple(self),
                                                dataclasses.astuple(other), strict=True)))

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (f"{self.programs} program(s) compiled in {self.seconds:.1f} s, "
                f"{self.cache_hits} loaded from the persistent cache in "
                f"{self.cache_seconds:.1f} s")


class CompileStats:
    """Process-wide running totals, fed by jax.monitoring listeners (registered once)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._totals = Compiled()
        self._by_function: dict[str, Compiled] = {}
        self._thread = threading.local()  # a hit seen, its request not yet timed
        self._registered = False

    def _register(self) -> None:
        with self._lock:
            if self._registered:
                return
            monitoring.register_event_duration_secs_listener(self._on_duration)
            monitoring.register_event_listener(self._on_event)
            self._registered = True

    def _on_event(self, event: str, **_) -> None:
        if event == _CACHE_HIT:  # reported inside the request it answers
            self._thread.hit = True

    def _on_duration(self, event: str, duration: float, **kw) -> None:
        if event != _BACKEND_COMPILE:
            return
        hit, self._thread.hit = getattr(self._thread, "hit", False), False
        add = Compiled(0, 0.0, 1, duration) if hit else Compiled(1, duration, 0, 0.0)
        name = str(kw.get("fun_name", "?"))
        with self._lock:
            self._totals = self._totals + add
            self._by_function[name] = self._by_function.get(name, Compiled()) + add

    def snapshot(self) -> Compiled:
        """The totals so far; listening starts on the first call."""
        self._register()
        with self._lock:
            return self._totals

    def since(self, mark: Compiled) -> Compiled:
        return self.snapshot() - mark

    def by_function(self) -> dict[str, Compiled]:
        """The totals so far by jitted function name (JAX's `fun_name`, "?" if none)."""
        self._register()
        with self._lock:
            return dict(self._by_function)


STATS = CompileStats()


def enable_cache(config) -> str | None:
    """Turns on JAX's persistent compilation cache for this process per `config`.

    Returns the cache directory in use, or None when off. Every program is cached,
    however quick to compile: a rerun then compiles nothing.
    """
    STATS.snapshot()  # listen from here on
    if not config.compilation_cache:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    current = jax.config.jax_compilation_cache_dir
    if not current:
        current = str(paths.cache_dir(config.data.cache_dir or None) / "jax")
        jax.config.update("jax_compilation_cache_dir", current)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        log.info("persistent compilation cache: %s", current)
    jax.config.update("jax_enable_compilation_cache", True)
    return current
