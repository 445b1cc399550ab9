"""SIGTERM, SIGINT and the time budget stop a run with a checkpoint of the step it reached.

The fast tests drive `preemption.Stopper` in this process (handlers, the second
signal, the budget's margin on a fake clock). The slow ones (`make test-slow`,
CI) signal real tiny training subprocesses and resume them: each resumed run must
write the uninterrupted run's metrics lines, every figure within 1e-5.
"""

import signal
import threading

import pytest

from flaxpals import config_lib, preemption
from tests.conftest import tiny

# ---------------------------------------------------------------- the budget's format


@pytest.mark.parametrize("text,seconds", [("23:30", 84600.0), ("0:05", 300.0),
                                          ("100:00", 360000.0), ("0:00:20", 20.0),
                                          ("1:02:03", 3723.0), (" 2:00 ", 7200.0),
                                          ("", None)])
def test_budget_parses_hours_minutes_and_seconds(text, seconds):
    assert preemption.parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["90", "1:5", "1:60", "0:00:60", "1h", "-1:00", "1:00:00:00",
                                  "0:00", "0:00:00", "one:00"])
def test_budget_rejects_other_formats(text):
    with pytest.raises(ValueError, match=r"'.*' (is not HH:MM|leaves no time)"):
        preemption.parse_budget(text)


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
    err = capfd.readouterr().err.splitlines()
    name = sig.name
    assert err == [f"{name} received: finishing the step in flight, then saving a checkpoint "
                   f"of it (send {name} again to exit at once)"]

    class Ckpts:  # what `stopped` uses of Checkpoints
        directory = "/run/checkpoints"
        closed = False

        def __init__(self):
            self.latest = self

        def wait(self):
            pass

        def latest_step(self):
            return 2

        def close(self):
            Ckpts.closed = True

    stopped = stop.stopped(2, Ckpts())
    assert Ckpts.closed
    assert (stopped.exit_code, stopped.step, stopped.saved) == (code, 2, 2)
    message = str(stopped)
    assert message.startswith(f"stopped by {name} at step 2: checkpoint step 2 saved in "
                              "/run/checkpoints (")
    assert message.endswith("run the same command again to resume")
    assert "\n" not in message


def test_the_same_signal_again_exits_at_once_another_does_not(handlers, capfd):
    exits = []
    with preemption.Stopper() as stop:
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
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 4
    assert err[2] == ("SIGINT again: exiting at once; the newest complete checkpoint stays "
                      "(an unfinished save is ignored on resume)")


def test_handlers_are_restored_when_the_loop_raises(handlers):
    with pytest.raises(RuntimeError, match="a NaN, say"):
        with preemption.Stopper() as stop:
            stop.install()
            raise RuntimeError("a NaN, say")
    assert signal.getsignal(signal.SIGTERM) is _previous_handler
    assert signal.getsignal(signal.SIGINT) is _previous_handler


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
