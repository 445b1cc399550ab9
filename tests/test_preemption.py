"""SIGTERM, SIGINT and the time budget stop a run with a checkpoint of the step it reached.

The fast tests drive `preemption.Stopper` in this process (handlers, the second
signal, the budget's margin on a fake clock). The slow ones (`make test-slow`,
CI) signal real tiny training subprocesses and resume them: each resumed run must
write the uninterrupted run's metrics lines, every figure within 1e-5.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from flaxpals import config_lib
from flaxpals.train import preemption
from tests.conftest import ROOT, epochs, tiny

# ---------------------------------------------------------------- the budget's format


@pytest.mark.parametrize("text,seconds", [("23:30", 84600.0), ("0:05", 300.0),
                                          ("100:00", 360000.0), ("0:00:20", 20.0),
                                          ("1:02:03", 3723.0), (" 2:00 ", 7200.0),
                                          ("", None)])
def test_budget_parses_hours_minutes_and_seconds(text, seconds):
    assert config_lib.parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["90", "1:5", "1:60", "0:00:60", "1h", "-1:00", "1:00:00:00",
                                  "0:00", "0:00:00", "one:00"])
def test_budget_rejects_other_formats(text):
    with pytest.raises(ValueError, match=r"'.*' (is not HH:MM|leaves no time)"):
        config_lib.parse_budget(text)


def test_config_names_the_budget_key():
    c = tiny(**{"train.time_budget": "90 minutes"})
    with pytest.raises(config_lib.ConfigError,
                       match=r"^config\.train\.time_budget: '90 minutes' is not HH:MM"):
        config_lib.validate(c)
    config_lib.validate(tiny(**{"train.time_budget": "1:30"}))
    assert config_lib.base().train.time_budget == ""  # no budget unless asked


# ---------------------------------------------------------------- signal handlers


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _previous_handler(signum, frame):  # stands for whatever was installed before
    raise AssertionError("the Stopper's handler should have taken this signal")


@pytest.fixture
def handlers():
    """Known handlers before the test, put back after it whatever happens."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in saved:
        signal.signal(s, _previous_handler)
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_sets_the_flag_and_the_next_check_stops(handlers, capfd, sig, code):
    with preemption.Stopper() as stop:
        stop.install()
        assert signal.getsignal(sig) == stop._handle
        assert stop.check(1) is False
        signal.raise_signal(sig)  # the handler runs before the next bytecode
        assert stop.received is not None  # recorded, nothing else happened
        assert stop.check(2) is True
        assert stop.check(3) is True  # stays set
    # The handlers found at install are back.
    assert signal.getsignal(signal.SIGTERM) is _previous_handler
    assert signal.getsignal(signal.SIGINT) is _previous_handler
    err = [line for line in capfd.readouterr().err.splitlines() if line]
    name = sig.name
    assert err == [f"{name} received: finishing the step in flight, then saving a checkpoint "
                   f"of it (send {name} again to exit at once)"]

    ckpts = SavedAt2()
    stopped = stop.stopped(2, ckpts)
    assert ckpts.closed
    assert (stopped.exit_code, stopped.step, stopped.saved) == (code, 2, 2)
    message = str(stopped)
    assert message.startswith(f"stopped by {name} at step 2: checkpoint step 2 saved in "
                              "/run/checkpoints (")
    assert message.endswith("run the same command again to resume")
    assert "\n" not in message


class SavedAt2:
    """What `Stopper.stopped` uses of Checkpoints: step 2 saved in /run/checkpoints."""

    directory = "/run/checkpoints"

    def __init__(self):
        self.latest, self.closed = self, False

    def wait(self):
        pass

    def latest_step(self):
        return 2

    def close(self):
        self.closed = True


def test_the_same_signal_again_exits_at_once_another_does_not(handlers, capfd):
    exits = []
    now = iter(range(0, 1000, 5)).__next__  # seconds apart: each signal is a new request
    with preemption.Stopper(clock=now) as stop:
        stop._exit = exits.append  # instead of os._exit
        stop.install()
        signal.raise_signal(signal.SIGINT)  # Ctrl-C: stop cleanly
        signal.raise_signal(signal.SIGTERM)  # a supervisor's SIGTERM: still cleanly
        assert exits == []
        assert stop.check(5) and stop.code == preemption.SIGTERM  # the higher code wins
        signal.raise_signal(signal.SIGINT)  # Ctrl-C again: at once
        assert exits == [130]
        signal.raise_signal(signal.SIGTERM)
        assert exits == [130, 143]
    err = [line for line in capfd.readouterr().err.splitlines() if line]
    assert len(err) == 4
    assert err[2] == ("SIGINT again: exiting at once; the newest complete checkpoint stays "
                      "(an unfinished save is ignored on resume)")


def test_one_stop_delivered_twice_at_once_is_one_stop(handlers, capfd):
    # `make run` stopped by `timeout` or a closed terminal: the trainer gets the signal
    # from its process group and again from make, a moment later.
    exits, now = [], [0.0]
    with preemption.Stopper(clock=lambda: now[0]) as stop:
        stop._exit = exits.append
        stop.install()
        signal.raise_signal(signal.SIGTERM)
        now[0] += 0.01
        signal.raise_signal(signal.SIGTERM)
        assert exits == [] and stop.check(3) and stop.code == preemption.SIGTERM
        now[0] += preemption.SAME_STOP_SECONDS
        signal.raise_signal(signal.SIGTERM)  # a second request after all: at once
        assert exits == [143]
    err = [line for line in capfd.readouterr().err.splitlines() if line]
    assert [line.split(":")[0] for line in err] == ["SIGTERM received", "SIGTERM again"]


def test_handlers_are_restored_when_the_loop_raises(handlers):
    with pytest.raises(RuntimeError, match="a NaN, say"):
        with preemption.Stopper() as stop:
            stop.install()
            raise RuntimeError("a NaN, say")
    assert signal.getsignal(signal.SIGTERM) is _previous_handler
    assert signal.getsignal(signal.SIGINT) is _previous_handler


def test_an_ignored_signal_stays_ignored(handlers):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a script's `cmd &` leaves it
    with preemption.Stopper() as stop:
        stop.install()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == stop._handle
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is _previous_handler


def test_outside_the_main_thread_only_the_budget_applies(handlers):
    clock, result = FakeClock(), {}

    def train():
        with preemption.Stopper("0:01:00", clock=clock) as stop:
            stop.install()  # no handlers here: Python allows them in the main thread only
            result["handler"] = signal.getsignal(signal.SIGTERM)
            clock.now += 70
            result["stops"] = stop.check(1)

    thread = threading.Thread(target=train)
    thread.start()
    thread.join()
    assert result == {"handler": _previous_handler, "stops": True}


def test_processes_stop_for_the_highest_code_any_of_them_has(handlers, monkeypatch):
    from jax.experimental import multihost_utils

    gathered = []

    def allgather(local):  # process 1's SIGTERM, process 2's budget, as the collective sees
        gathered.append(int(local))
        return np.array([int(local), preemption.SIGTERM, preemption.BUDGET], np.int32)

    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    with preemption.Stopper() as stop:
        stop.install()
        stop._processes = 3  # as jax.process_count() says in a 3-process job
        assert stop.check(7) is True  # nothing happened here, yet all stop
    assert gathered == [0]
    assert (stop.code, stop.where) == (preemption.SIGTERM, " (on process 1 of 3)")


# ---------------------------------------------------------------- the budget's margin


def test_budget_stops_when_the_slowest_step_and_save_would_not_fit(handlers):
    clock = FakeClock()
    stop = preemption.Stopper("0:01:40", clock=clock)  # 100 s, from construction
    clock.now += 15  # building the model and data
    save = {"seconds": 0.0}
    stop.install(lambda: save["seconds"])
    decisions = []
    for step, seconds in enumerate([20, 5, 5, 5, 5, 5, 5, 5, 5, 5], start=1):
        clock.now += seconds
        if step == 3:
            save["seconds"] = 8.0  # a periodic save's files written
        decisions.append((step, clock.now - 1000, stop.check(step)))
        if decisions[-1][2]:
            break
    stop.uninstall()
    # Margin 20 s (step 1: its compilation) + 8 s (the save): at 75 s the next step and
    # the stop's save might end at 103 s, past 100: stop there, not at the last moment.
    assert decisions[-1] == (9, 75, True)
    assert [d[2] for d in decisions[:-1]] == [False] * 8
    assert stop.code == preemption.BUDGET
    assert stop.slowest_step == 20


def test_no_budget_never_stops(handlers):
    clock = FakeClock()
    with preemption.Stopper("", clock=clock) as stop:
        stop.install(lambda: 1e9)
        clock.now += 1e9
        assert stop.check(1) is False


# ---------------------------------------------------------------- real runs (slow)
#
# Tiny runs of `python -m flaxpals.main`: 2 epochs of 6 steps, a periodic checkpoint
# every 3 steps. The signal goes out once step 3's checkpoint has begun (its temporary
# directory appears before step 4 starts), so the run stops at step 4 (5 if the
# machine is slow to deliver), between periodic checkpoints.

EVERY = 3
# Compilation is most of these runs' cost; every run compiles the same way (and hits
# the session's persistent cache, conftest.py), so the comparisons are unaffected.
XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TOLERANCE = 1e-5


class Run:
    """A `python -m flaxpals.main` subprocess on a tiny config, its output in files."""

    def __init__(self, workdir: Path, *flags: str, env: dict | None = None, name: str = "run",
                 config: str = "configs/baseline.py:tiny"):
        self.workdir = workdir
        self.log = workdir.parent / f"{workdir.name}.{name}.log"
        cmd = [sys.executable, "-m", "flaxpals.main", f"--config={config}",
               f"--workdir={workdir}", f"--config.checkpoint.every_steps={EVERY}",
               f"--config.data.cache_dir={os.environ.get('FLAXPALS_TEST_CACHE', '')}", *flags]
        env = {**os.environ, "PYTHONPATH": str(ROOT),
               "XLA_FLAGS": " ".join(filter(None, [os.environ.get("XLA_FLAGS"), XLA_FLAGS])),
               **(env or {})}
        # The child inherits an ignored SIGINT (pytest started by a script's `cmd &`), and
        # the trainer would keep ignoring it: start it with SIGINT handled, as from a shell.
        sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            with open(self.log, "w") as log:
                self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                             stderr=subprocess.STDOUT)
        finally:
            signal.signal(signal.SIGINT, sigint)

    def wait_for_checkpoint(self, step: int, timeout: float = 600) -> None:
        """Until the save of `step` has begun (or the run ended)."""
        ckpts, deadline = self.workdir / "checkpoints", time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            if ckpts.is_dir() and any(p.name.split(".")[0] == str(step) for p in ckpts.iterdir()):
                return
            time.sleep(0.02)
        raise AssertionError(f"no checkpoint {step} began:\n{self.output()[-3000:]}")

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def output(self) -> str:
        return self.log.read_text(errors="replace").replace("\r", "\n")

    def stop_line(self) -> str:
        lines = [line for line in self.output().splitlines() if line.startswith("stopped by ")]
        assert len(lines) == 1, self.output()[-3000:]
        return lines[0]


def _steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _assert_same_metrics(got_dir: Path, want_dir: Path) -> None:
    """Every figure of every metrics.jsonl line (losses included) within TOLERANCE."""
    got, want = epochs(got_dir), epochs(want_dir)
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want] == [1, 2]
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w)
        assert any(k.startswith("loss/") for k in g)
        for key, value in w.items():
            assert g[key] == pytest.approx(value, abs=TOLERANCE), (g["epoch"], key)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted tiny run every stopped one is compared with."""
    workdir = tmp_path_factory.mktemp("preemption") / "straight"
    run = Run(workdir)
    assert run.wait() == 0, run.output()[-3000:]
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_the_step_reached_and_the_resumed_run_matches(straight, tmp_path, sig,
                                                                    code):
    workdir = tmp_path / "run"
    run = Run(workdir)
    run.wait_for_checkpoint(EVERY)
    sent = time.monotonic()
    run.proc.send_signal(sig)
    assert run.wait() == code, run.output()[-3000:]
    seconds = time.monotonic() - sent
    print(f"{sig.name}: exit {code} {seconds:.1f} s after the signal")
    assert seconds < 30, seconds  # the step in flight and one save, not the rest of the run
    line = run.stop_line()
    match = re.fullmatch(rf"stopped by {sig.name} at step (\d+): checkpoint step \1 saved in "
                         rf"{re.escape(str(workdir / 'checkpoints'))} \(.*\); run the same "
                         "command again to resume", line)
    assert match, line
    step = int(match.group(1))
    assert step in (EVERY + 1, EVERY + 2), line  # the step reached, not a periodic one
    assert _steps(workdir)[-1] == step
    assert "Traceback" not in run.output()

    resumed = Run(workdir, name="resumed")
    assert resumed.wait() == 0, resumed.output()[-3000:]
    assert f"resumed from checkpoint step {step} (epoch 1)" in resumed.output()
    _assert_same_metrics(workdir, straight)


@pytest.mark.slow
def test_time_budget_stops_with_a_checkpoint_and_a_second_run_finishes(straight, tmp_path):
    workdir = tmp_path / "run"
    # One second: spent before the first step's end, so the run stops there.
    run = Run(workdir, "--config.train.time_budget=0:00:01")
    assert run.wait() == 75, run.output()[-3000:]
    line = run.stop_line()
    assert re.fullmatch(r"stopped by the time budget 0:00:01 \(margin: slowest step \d+\.\d s "
                        r"\+ slowest save \d+\.\d s\) at step 1: checkpoint step 1 saved in "
                        r".*; run the same command again to resume", line), line
    assert _steps(workdir) == [1]
    # Again with an hour to spare: it finishes, and its lines are the uninterrupted run's.
    resumed = Run(workdir, "--config.train.time_budget=1:00", name="resumed")
    assert resumed.wait() == 0, resumed.output()[-3000:]
    assert "resumed from checkpoint step 1 (epoch 1)" in resumed.output()
    _assert_same_metrics(workdir, straight)


# Two processes of 2 CPU devices each on a loopback coordinator (as tests/test_scale.py),
# through the CLI's own multi-process rule (JAX_COORDINATOR_ADDRESS, flaxpals/train/parallel.py).
# SST and STS only, 16 training examples per task: a global batch of 8 is 2 rows a device.
PAIR_FLAGS = ("--config.tasks=('sst','sts')", "--config.data.train_limit=16",
              "--config.data.eval_limit=16", "--config.eval.train_sample=8")


def _pair(workdir: Path, name: str) -> list[Run]:
    port = _free_port()
    return [Run(workdir, *PAIR_FLAGS, name=f"{name}{i}", env={
        "XLA_FLAGS": f"{XLA_FLAGS} --xla_force_host_platform_device_count=2",
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": str(i)}) for i in range(2)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_when_one_gets_sigterm(tmp_path):
    straight = _pair(tmp_path / "straight", "straight")
    assert [r.wait() for r in straight] == [0, 0], straight[1].output()[-3000:]
    assert "mesh: 4 device(s) in 2 process(es)" in straight[0].output()

    workdir = tmp_path / "run"
    pair = _pair(workdir, "stopped")
    pair[0].wait_for_checkpoint(EVERY)
    pair[1].proc.send_signal(signal.SIGTERM)  # process 1 only, as a host's maintenance event
    assert [r.wait() for r in pair] == [143, 143], pair[0].output()[-3000:]
    # The same step, reason and checkpoint on both; each process times its own wait for
    # the write, so that figure may differ.
    lines = [re.sub(r"\(\d+\.\d s to finish writing\)", "(...)", r.stop_line()) for r in pair]
    assert lines[0] == lines[1], lines
    match = re.match(r"stopped by SIGTERM \(on process 1 of 2\) at step (\d+): checkpoint step "
                     r"\1 saved in ", lines[0])
    assert match, lines[0]
    step = int(match.group(1))
    assert step in (EVERY + 1, EVERY + 2), lines[0]
    assert _steps(workdir)[-1] == step
    assert "SIGTERM received" in pair[1].output() and "SIGTERM received" not in pair[0].output()

    resumed = _pair(workdir, "resumed")
    assert [r.wait() for r in resumed] == [0, 0], resumed[0].output()[-3000:]
    for r in resumed:
        assert f"resumed from checkpoint step {step} (epoch 1)" in r.output()
    _assert_same_metrics(workdir, tmp_path / "straight")


# The second signal leaves no half-written checkpoint behind: the installed orbax writes
# a step under a temporary name and renames it when complete. A real Stopper's handler
# exits while a 256 MB save is being written.
SAVE_THEN_SIGNAL_TWICE = """
import signal, sys
import jax.numpy as jnp
from flaxpals.train import preemption
from flaxpals.train.checkpointing import Checkpoints
from flaxpals.train.steps import TrainState

def state(value):
    return TrainState(step=jnp.zeros((), jnp.int32),
                      params={"w": jnp.full((64, 1024, 1024), value)}, opt_state={},
                      rng=jnp.zeros((2,), jnp.uint32))

ckpts = Checkpoints(sys.argv[1], 2)
ckpts.save(1, state(1.0), {"step": 1}, force=True)
ckpts.wait()
# A clock whose every reading is seconds after the last: the second signal is a second
# request, not the same stop delivered twice.
stop = preemption.Stopper(clock=iter(range(0, 10**6, 5)).__next__)
stop.install()
ckpts.save(2, state(2.0), {"step": 2}, force=True)  # returns while orbax writes
signal.raise_signal(signal.SIGTERM)
signal.raise_signal(signal.SIGTERM)  # exits here
print("still running")
"""


@pytest.mark.slow
def test_a_second_signal_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    from flaxpals.train.checkpointing import Checkpoints
    from flaxpals.train.steps import TrainState

    done = subprocess.run([sys.executable, "-c", SAVE_THEN_SIGNAL_TWICE, str(tmp_path)],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 143, done.stderr[-3000:]
    assert "SIGTERM again: exiting at once" in done.stderr
    assert "still running" not in done.stdout
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["1", "2.orbax-checkpoint-tmp"], names  # the save was cut short

    target = TrainState(step=jnp.zeros((), jnp.int32),
                        params={"w": jnp.zeros((64, 1024, 1024), jnp.float32)}, opt_state={},
                        rng=jnp.zeros((2,), jnp.uint32))
    ckpts = Checkpoints(tmp_path, 2)
    step, state, sampler = ckpts.restore_latest(target)
    assert (step, sampler, float(state.params["w"][5, 6, 7])) == (1, {"step": 1}, 1.0)
    # The step can be saved again over the leftover, and restored.
    ckpts.save(2, target.replace(params={"w": target.params["w"] + 3}), {"step": 2}, force=True)
    ckpts.wait()
    step, state, _ = ckpts.restore_latest(target)
    ckpts.close()
    assert (step, float(state.params["w"][0, 0, 0])) == (2, 3.0)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
