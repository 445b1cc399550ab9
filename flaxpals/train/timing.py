"""Where a run's wall time goes: start-up, steps, compiling, evaluating.

    timer = RunTimer(compilation.STATS)  # at the start of a run
    timer.loop_started()               # just before the first step
    timer.steps_done(n)                # when the last n steps' results are on the host
    with timer.evaluating(): ...       # each epoch's evaluation
    record = timer.record()            # the run's line of timings.jsonl

The loop does not wait on the device after every step, so steps are timed in
windows, from one wait to the next: a window during which XLA compiled (a new
bucket shape, say), or loaded a program from the persistent cache, is counted
apart from the steady ones, and `steady_step_s` is the median of the steady
windows' time per step (each window weighted by its steps). Seconds are
wall-clock; `since_process_start` counts from the process's own start (imports
included) where the OS says when that was.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time

_IMPORTED = time.time()


def process_start() -> float:
    """The Unix time this process started (Linux: from /proc), else this module's import."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED


def since_process_start() -> float:
    return time.time() - process_start()


class _NoCompiler:
    """Stands in for compilation.STATS where nothing is compiled (PyTorch)."""

    def snapshot(self):
        return None

    def by_function(self):
        return {}


class RunTimer:
    """Times one invocation of a training run.

    stats: `flaxpals.train.compilation.STATS` (anything with `snapshot()` returning a
    `Compiled` and `by_function()` a {name: Compiled}), or None for a framework that
    does not compile.
    """

    def __init__(self, stats=None):
        self.stats = stats or _NoCompiler()
        self.started = time.perf_counter()
        self.age_at_start = since_process_start()
        self.compiled_at_start = self.stats.snapshot()
        self._by_function_at_start = self.stats.by_function()
        self.first_step_at = None  # seconds since the process started
        self.steady, self.compiling = [], []  # (steps, seconds) of each window
        self.eval_s = 0.0
        self._last = None
        self._compiled = self.compiled_at_start

    def loop_started(self) -> None:
        """Call just before the first step: the steps' clock starts here."""
        self._last = time.perf_counter()
        self._compiled = self.stats.snapshot()

    def steps_done(self, n: int) -> float:
        """The last `n` steps' results are on the host: closes their window; returns its
        seconds."""
        if n <= 0:
            return 0.0
        now, compiled = time.perf_counter(), self.stats.snapshot()
        if self.first_step_at is None:
            self.first_step_at = since_process_start()
        # A window that compiled, or loaded a program from the persistent cache, is not steady.
        new = compiled is not None and (compiled.programs, compiled.cache_hits) != (
            self._compiled.programs, self._compiled.cache_hits)
        seconds = now - self._last
        (self.compiling if new else self.steady).append((n, seconds))
        self._last, self._compiled = now, compiled
        return seconds

    @contextlib.contextmanager
    def evaluating(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.eval_s += time.perf_counter() - t0
            self._last = time.perf_counter()  # the next step's clock starts after the eval
            self._compiled = self.stats.snapshot()

    def record(self) -> dict:
        """The run's timings: one line of the workdir's timings.jsonl (flaxpals.workdir_format)."""
        now = self.stats.snapshot()
        compiled = None if now is None else (now - self.compiled_at_start).as_dict()
        per_step = [s / n for n, s in self.steady for _ in range(n)]
        return {
            "process_start_s": round(self.age_at_start, 3),  # imports etc. before the run
            "first_step_s": None if self.first_step_at is None else round(self.first_step_at, 3),
            "steps": sum(n for n, _ in self.steady + self.compiling),
            "steady_step_s": round(statistics.median(per_step), 5) if per_step else None,
            "steady_steps_s": round(sum(s for _, s in self.steady), 3),
            "compiling_steps": sum(n for n, _ in self.compiling),
            "compiling_steps_s": round(sum(s for _, s in self.compiling), 3),
            "eval_s": round(self.eval_s, 3),
            "run_s": round(time.perf_counter() - self.started, 3),
            "total_s": round(since_process_start(), 3),
            "compile": compiled and {k: round(v, 3) for k, v in compiled.items()},
            # The same by jitted function (train_step, predict_step, ...), those that ran.
            "compile_by_function": self._by_function(),
        }

    def _by_function(self) -> dict[str, dict[str, float]]:
        start, out = self._by_function_at_start, {}
        for name, total in sorted(self.stats.by_function().items()):
            d = total - start[name] if name in start else total
            if d.programs or d.cache_hits:
                out[name] = {k: round(v, 3) for k, v in d.as_dict().items()}
        return out

    @staticmethod
    def summary(record: dict) -> str:
        c, first = record["compile"], record["first_step_s"]
        text = (f"timings: {record['total_s']:.1f} s since the process started; first step "
                f"done at {'-' if first is None else f'{first:.1f}'} s; {record['steps']} steps, "
                f"steady {record['steady_step_s']} s/step; evaluation {record['eval_s']:.1f} s")
        if c:
            text += (f"; compiled {c['programs']} program(s) in {c['seconds']:.1f} s, "
                     f"{c['cache_hits']} loaded from the persistent cache")
        return text
