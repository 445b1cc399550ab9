"""Stopping a run cleanly: SIGTERM, SIGHUP, SIGINT or a wall-clock budget cost at most one step.

    with preemption.Stopper(config.train.time_budget) as stop:  # the budget counts from here
        ...
        stop.install(lambda: ckpts.slowest_save)  # handlers for the loop's duration
        while ...:
            ...one step...
            if stop.check(step):                  # on every process, at the same steps
                ...save this step...
                raise stop.stopped(step, ckpts)   # waits for the save; main.py exits

A signal handler only records the signal (and says so in one line on stderr); the
loop finishes the steps in flight (loop.AHEAD), saves a checkpoint of the last
(params, optimiser, sampler and the epoch's running loss sums), flushes metrics and
TensorBoard, and
raises `Stopped`; `python -m flaxpals.main` prints its one line and exits with
its code. The handlers are restored when the Stopper's `with` block ends.

SIGHUP (the terminal or ssh session closed: the usual end of a run started by hand
on a TPU VM) is handled as SIGTERM, same stop code and exit code 143, its lines
naming SIGHUP. Writes to a hung-up terminal may fail (EIO), and a failed write of
the progress bar or a log line would end the loop before its save: on SIGHUP,
stdout and stderr that are terminals are pointed at /dev/null first.

Exit codes (launch/tpu.sh --retry reads them; docs/preemption.md):

    0    the run finished
    143  SIGTERM (128 + 15) or SIGHUP: preempted; run the same command again to resume
    130  SIGINT (128 + 2, Ctrl-C): stopped by hand; likewise resumable
    75   the time budget ran out (EX_TEMPFAIL): likewise resumable
    1    an error (a traceback or one "error: ..." line)

The same signal a second time exits at once (os._exit, same code), whatever the
loop is doing, even in the middle of a save. That corrupts nothing: orbax (0.12)
writes a step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` when
complete (on GCS, where there is no atomic rename, it writes commit_success.txt
last instead); an unfinished step is invisible to restore, which takes the newest
complete one, and a new save of that step replaces the leftover (checked by
tests/test_preemption.py). A different second signal (SIGINT from the terminal,
then SIGTERM from a supervisor such as experiments.sweep) keeps the clean stop.

The time budget, `config.train.time_budget` = "HH:MM" (or "H:MM:SS", for short
runs and tests; "" = none), counts from the start of `train_and_evaluate`. After
each step the run stops if the time used plus a margin would pass it: the margin
is the slowest interval between two steps seen so far (a compilation or an
epoch's evaluation included) plus the slowest checkpoint save seen so far (from
the save call to its last file; `Checkpoints.slowest_save`).

Several processes (a TPU pod slice, launch/gpu.sh) must stop at the same step:
every process takes part in every step's collectives and in the save. A SIGTERM
may reach one host only (a maintenance event), and each host has its own clock.
So in a multi-process job `check` all-gathers each process's stop code (0 none,
1 budget, 2 SIGINT, 3 SIGTERM) with `multihost_utils.process_allgather`; every
process sees the same codes and stops at the same step, for the same reason (the
highest code), with the same exit code. On one process no collective is made, and
the trainer checks after every step. Several processes are checked only where
the trainer waits for the devices anyway (every `log_every_steps` and at
checkpoints, train/loop.py): an all-gather after every step (10.7 ms between two CPU
processes over gloo on this project's 2-core machines) would make every step wait
for the one before, and a stop comes at most `log_every_steps` - 1 steps later.
The budget's margin is the slowest interval between two checks, so it holds.

Not chosen: `multihost_utils.reached_preemption_sync_point` (JAX's preemption
service, used by orbax's CheckpointManager) costs nothing per step, but it hears
only SIGTERM and only through a handler JAX installs in C++, which a Python
handler replaces: it cannot carry SIGINT or the budget, or tell a second signal.
In a multi-process job that C++ handler is therefore replaced while the loop
runs; Python cannot reinstate it afterwards, so SIGTERM then has its default
action again (the process ends), where before the loop it was swallowed.
"""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
from collections.abc import Callable

from flaxpals import config_lib

# Stop codes: all processes stop for the highest one any of them has.
BUDGET, SIGINT, SIGTERM = 1, 2, 3
# SIGHUP stops as SIGTERM does (module docstring).
SIGNALS = {signal.SIGTERM: SIGTERM, signal.SIGINT: SIGINT, signal.SIGHUP: SIGTERM}
# One stop can arrive twice at once: `make` passes a SIGTERM or SIGHUP it gets on to its
# child, which had it already from the process group (`timeout`, a closed ssh session).
# The same signal again within this many seconds is that one stop, not a second request.
SAME_STOP_SECONDS = 1.0
EXIT_CODES = {BUDGET: 75, SIGINT: 128 + signal.SIGINT, SIGTERM: 128 + signal.SIGTERM}
NAMES = {BUDGET: "the time budget", SIGINT: "SIGINT", SIGTERM: "SIGTERM"}


def format_seconds(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _say(text: str) -> None:
    """One write to stderr from a signal handler; a closed stream loses it, nothing more."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


def _leave_terminal() -> None:
    """Points stdout and stderr at /dev/null where they are a terminal (writes to a
    hung-up one may fail, ending the loop before its save). A character device, not
    isatty(): a hung-up terminal may no longer answer isatty."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            try:
                if stat.S_ISCHR(os.fstat(fd).st_mode):
                    os.dup2(devnull, fd)
            except OSError:
                pass
    finally:
        os.close(devnull)


class Stopped(Exception):  # noqa: N818 - a stop, not an error
    """A run stopped with a checkpoint of the step it reached; str() is its one line."""

    def __init__(self, message: str, code: int, step: int, saved: int | None):
        super().__init__(message)
        self.exit_code = EXIT_CODES[code]
        self.reason = NAMES[code]
        self.step = step
        self.saved = saved


class Stopper:
    """Signal handlers, the time budget, and the step all processes stop at."""

    def __init__(self, time_budget: str = "", clock: Callable[[], float] = time.monotonic):
        self.budget = config_lib.parse_budget(time_budget)
        self.clock = clock
        self.start = clock()
        self.received: int | None = None  # the highest stop code of the signals received here
        self._seen: dict[int, float] = {}  # signal received here -> when, first
        self._names: dict[int, str] = {}  # stop code -> the first signal here that set it
        self._processes = 1
        self.code = 0  # the agreed stop code, once `check` returned True
        self.where = ""  # which processes received it, in a multi-process job
        self.slowest_step = 0.0  # seconds between two checks, at most
        self._save_seconds: Callable[[], float] = lambda: 0.0
        self._last: float | None = None
        self._previous: dict[int, object] = {}
        self._exit = os._exit  # tests replace it

    # ------------------------------------------------------------ handlers

    def __enter__(self) -> Stopper:
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def install(self, save_seconds: Callable[[], float] | None = None) -> None:
        """Handles SIGTERM, SIGHUP and SIGINT until `uninstall`; starts timing steps.

        save_seconds: the slowest checkpoint save so far, for the budget's margin.
        Outside the main thread Python allows no handlers: only the budget applies. A
        signal ignored when this is called stays ignored (as Python leaves SIGINT alone
        when the parent ignored it, e.g. for a job started with `&` by a script).
        """
        if save_seconds is not None:
            self._save_seconds = save_seconds
        import jax

        self._processes = jax.process_count()
        self._last = self.clock()
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Puts back the handlers `install` found (SIG_DFL where one was set from C)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        sig = signal.Signals(signum)
        code, name = SIGNALS[sig], sig.name
        if sig == signal.SIGHUP:
            _leave_terminal()
        # os.write: print() could re-enter a write the main thread was making (tqdm).
        now = self.clock()
        if signum in self._seen:
            if now - self._seen[signum] < SAME_STOP_SECONDS:
                return
            _say(f"\n{name} again: exiting at once; the newest complete checkpoint stays "
                 "(an unfinished save is ignored on resume)\n")
            self._exit(EXIT_CODES[code])
            return
        self._seen[signum] = now
        self._names.setdefault(code, name)
        self.received = max(self.received or 0, code)
        _say(f"\n{name} received: finishing the step in flight, then saving a checkpoint of "
             f"it (send {name} again to exit at once)\n")

    # ------------------------------------------------------------ the loop's check

    def _local_code(self, now: float) -> int:
        if self.received is not None:
            return self.received
        if self.budget is not None:
            margin = self.slowest_step + self._save_seconds()
            if now - self.start + margin >= self.budget:
                return BUDGET
        return 0

    def check(self, step: int) -> bool:
        """After each step, on every process (a collective when there are several):
        True when the run must stop here, the same on all processes."""
        now = self.clock()
        if self._last is not None:
            self.slowest_step = max(self.slowest_step, now - self._last)
        self._last = now
        local = self._local_code(now)
        if self._processes == 1:
            self.code = local
            return local > 0
        import numpy as np
        from jax.experimental import multihost_utils

        codes = np.asarray(multihost_utils.process_allgather(np.int32(local))).reshape(-1)
        self.code = int(codes.max())
        if self.code:
            senders = [str(p) for p, c in enumerate(codes) if c == self.code]
            self.where = (f" (on process{'es' if len(senders) > 1 else ''} "
                          f"{', '.join(senders)} of {len(codes)})")
        return self.code > 0

    def stopped(self, step: int, ckpts) -> Stopped:
        """After saving `step`: waits for the save, closes `ckpts`, and returns the
        exception to raise, whose message is the run's last line."""
        t0 = self.clock()
        ckpts.wait()
        saved = ckpts.latest.latest_step()
        directory = ckpts.latest.directory
        ckpts.close()
        what = (f"checkpoint step {saved} saved in {directory}" if saved == step else
                f"WARNING: the newest checkpoint is step {saved}, not {step}")
        reason = self._names.get(self.code, NAMES[self.code]) + self.where
        if self.code == BUDGET:
            reason += (f" {format_seconds(self.budget)} (margin: slowest step "
                       f"{self.slowest_step:.1f} s + slowest save {self._save_seconds():.1f} s)")
        message = (f"stopped by {reason} at step {step}: {what} "
                   f"({self.clock() - t0:.1f} s to finish writing); run the same command "
                   "again to resume")
        return Stopped(message, self.code, step, saved)
