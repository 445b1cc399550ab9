"""benchmarks.bench_cores' readers: self time of nested trace events, per-thread CPU
from /proc, and the steady stretch of a sampled run. Figures worked by hand."""

import gzip
import json
import threading
import time

import pytest

from benchmarks import bench_cores


def write_trace(path, events):
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def x(name, ts, dur, tid=1):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 7, "tid": tid}


def test_self_time_subtracts_children_on_the_same_thread_only(tmp_path):
    trace = tmp_path / "t.json.gz"
    write_trace(trace, [
        x("execute", 0, 100), x("fusion.1", 10, 30), x("dot.2", 50, 10),
        x("inner", 15, 5),                    # inside fusion.1: a grandchild
        x("execute", 200, 50),                 # a second step, no children
        x("worker", 20, 70, tid=2),            # another thread: not a child of execute
        {"ph": "M", "name": "thread_name", "pid": 7, "tid": 1, "args": {"name": "main"}},
    ])
    got = bench_cores.self_times(trace)
    # execute: 100 - 30 - 10 = 60, then 50 more; fusion.1: 30 - 5; µs -> s
    assert got == pytest.approx({"execute": 110e-6, "fusion.1": 25e-6, "dot.2": 10e-6,
                                 "inner": 5e-6, "worker": 70e-6})


def test_thread_cpu_sees_a_busy_thread_by_name():
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            sum(range(1000))

    t = threading.Thread(target=spin, name="spinner")
    before = bench_cores.thread_cpu()
    t.start()
    time.sleep(0.5)
    after = bench_cores.thread_cpu()
    stop.set()
    t.join()
    spun = bench_cores.diff(after, before)
    assert any(v > 0.1 for k, v in spun.items() if k.rsplit("/", 1)[1] == str(t.native_id))
    names = bench_cores.by_name({"XLAEigen/11": 1.0, "XLAEigen/12": 0.5, "python/10": 2.0})
    assert names == {"python": 2.0, "XLAEigen": 1.5} and list(names) == ["python", "XLAEigen"]


def test_steady_takes_the_middle_half():
    timeline = [{"t": i, "cores_busy": c, "threads": {"a": c}}
                for i, c in enumerate([1, 1, 2, 2, 2, 2, 1, 1])]
    s = bench_cores.steady(timeline)
    assert s["seconds"] == 4 and s["cores_busy"] == 2.0 and s["threads"] == {"a": 2.0}


def test_a_child_that_outlasts_its_parent_takes_only_the_overlap(tmp_path):
    trace = tmp_path / "t.json.gz"
    write_trace(trace, [x("execute", 0, 100), x("fusion.1", 90, 20)])  # rounding: ends at 110
    assert bench_cores.self_times(trace) == pytest.approx({"execute": 90e-6, "fusion.1": 20e-6})


def test_only_hlo_instruction_names_count_as_ops():
    ops = ["ynn_fusion.112", "wrapped_broadcast.14", "fusion", "dot.2", "custom-call.7"]
    runtime = ["ThunkExecutor::Execute (wait for completion)", "$api.py:2479 block_until_ready",
               "SlinkyThreadPool::Await", "end: ynn_fusion", "CommonPjRtBuffer::Await"]
    assert all(bench_cores.OP_NAME.match(n) for n in ops)
    assert not any(bench_cores.OP_NAME.match(n) for n in runtime)
