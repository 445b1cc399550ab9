"""Where the cores go: a steady step's use of the CPUs, op by op, and a real run's.

    python -m benchmarks.bench_cores                      # SST train L64, predict L128
    python -m benchmarks.bench_cores --workloads=train/sst --lengths=64 --reps=20
    python -m benchmarks.bench_cores --run-steps=0 --json=/tmp/cores.json
    python -m benchmarks.bench_cores --checkpoint=tiny --workloads=train/sst --lengths=16 \
        --reps=2 --run-steps=0

Three measurements, each in its own process (XLA:CPU sizes its thread pool when
JAX starts, so a thread count is a process):

1. Each workload's compiled step (benchmarks.step_sides' FlaxSide: the trainer's
   model, optimiser and jitted steps; synthetic batches at a fixed length) runs
   `--reps` times back to back, once with the process pinned to 1 CPU and once
   with every CPU it may use. Per step: the wall time, the process's CPU time
   (user + system) over wall time and cores ("utilisation"), and the CPU time
   of each thread, grouped by thread name (/proc/self/task). The 1-to-N speedup
   gives Amdahl's parallel fraction p = (1 - T_N/T_1) / (1 - 1/N).
2. A few of those steps under `jax.profiler.trace` (its Perfetto JSON): the self
   time of each traced event (the time not spent in a traced child on the same
   thread), per step, at 1 CPU and at N. An op whose time does not shrink with N
   is the serial part.
3. The trainer itself (`python -m flaxpals.main`, MiniLM whatever `--checkpoint`
   says, SST, `--run-steps` steps, its
   persistent cache warmed by a first run): its threads' CPU time sampled every
   second from /proc, so the steady part of the run shows apart from start-up
   and evaluation.

Ratios depend on the CPU: the report records its model and AVX flags.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.host import cpu


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_cores",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="minilm", help="minilm, tiny or a directory")
    ap.add_argument("--workloads", default="train/sst,predict/sst",
                    help="bench_steps names: train/<task>, predict/<task>")
    ap.add_argument("--lengths", default="64,128",
                    help="padded length per workload, in the same order")
    ap.add_argument("--batch", type=int, default=32, help="training batch")
    ap.add_argument("--eval-batch", type=int, default=128, help="predict batch")
    ap.add_argument("--reps", type=int, default=10, help="timed steps per workload")
    ap.add_argument("--trace-steps", type=int, default=3, help="steps under the profiler")
    ap.add_argument("--top", type=int, default=12, help="ops listed per workload")
    ap.add_argument("--run-steps", type=int, default=120,
                    help="trainer steps sampled in measurement 3 (0: skip it)")
    ap.add_argument("--json", default="", help="also write every figure to this JSON file")
    ap.add_argument("--report-from", default="",
                    help="print the report of an earlier run's --json file; run nothing")
    ap.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    if len(args.lengths) != len(args.workloads):
        ap.error(f"--lengths: one per workload ({len(args.workloads)}), got {args.lengths}")
    if any(not w.startswith(("train/", "predict/")) for w in args.workloads):
        ap.error(f"--workloads: train/<task> or predict/<task>, got {args.workloads}")
    if args.reps < 2 or args.trace_steps < 1:
        ap.error("--reps must be >= 2 and --trace-steps >= 1")
    return args


# ---------------------------------------------------------------- /proc readers


def thread_cpu(pid: int | str = "self") -> dict[str, float]:
    """CPU seconds (user + system) of each live thread of `pid`, keyed "name/tid"."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    root = Path(f"/proc/{pid}/task")
    for task in root.iterdir() if root.exists() else ():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        out[f"{name}/{task.name}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def by_name(delta: dict[str, float]) -> dict[str, float]:
    """Per-thread CPU seconds summed over threads of one name (thread ids dropped)."""
    out = collections.Counter()
    for key, seconds in delta.items():
        out[key.rsplit("/", 1)[0]] += seconds
    return dict(out.most_common())


def diff(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}


# ---------------------------------------------------------------- trace parsing


# An HLO instruction's name (fusion.12, ynn_fusion.3, wrapped_broadcast.14, dot.2): the
# runtime's own events (ThunkExecutor::..., PjRt..., $python frames) are not ops.
OP_NAME = re.compile(r"^[a-z][a-z0-9_\-]*(\.[0-9]+)*$")


def self_times(trace_file: Path) -> dict[str, float]:
    """Seconds of self time per event name in a Perfetto/Chrome JSON trace: each
    complete ("X") event's duration less its traced children's on the same thread."""
    with gzip.open(trace_file, "rt") as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    threads = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            threads[(e.get("pid"), e.get("tid"))].append(e)
    out = collections.Counter()
    for evs in threads.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []  # [end, name, self]
        for e in evs:
            while stack and e["ts"] >= stack[-1][0]:
                end, name, own = stack.pop()
                out[name] += own
            if stack:  # only the overlap: rounding can end a child after its parent
                stack[-1][2] -= min(e["ts"] + e["dur"], stack[-1][0]) - e["ts"]
            stack.append([e["ts"] + e["dur"], e["name"], e["dur"]])
        for _, name, own in stack:
            out[name] += own
    return {k: v / 1e6 for k, v in out.items()}


# ---------------------------------------------------------------- worker (one thread count)


def worker(args) -> dict:
    """Measurements 1 and 2 in this process, pinned to `args.worker` CPUs."""
    available = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, available[:args.worker])
    import jax
    import numpy as np

    from benchmarks.step_sides import FlaxSide, bench_config, synthetic_batch

    bargs = argparse.Namespace(
        tasks=sorted({w.split("/")[1] for w in args.workloads}), checkpoint=args.checkpoint,
        dtype="float32", pooling="mean", pair_encoding="cross", similarity="cosine",
        no_dropout=False, batch=args.batch, eval_batch=args.eval_batch)
    flax = FlaxSide(bench_config(bargs))
    rng = np.random.default_rng(0)
    out = {"threads": len(os.sched_getaffinity(0)), "workloads": {}}
    for name, length in zip(args.workloads, args.lengths, strict=True):
        kind, task = name.split("/")
        batch = synthetic_batch(flax.specs[task], "cross",
                                args.batch if kind == "train" else args.eval_batch,
                                length, flax.model.config.vocab_size, rng)
        call, _, _, _ = flax.compile(name, batch)
        for _ in range(2):
            call()
        walls = []
        cpu0, threads0, t0 = os.times(), thread_cpu(), time.perf_counter()
        for _ in range(args.reps):
            s = time.perf_counter()
            call()
            walls.append(time.perf_counter() - s)
        wall, cpu1, threads1 = time.perf_counter() - t0, os.times(), thread_cpu()
        cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d, create_perfetto_trace=True):
                for _ in range(args.trace_steps):
                    call()
            trace = next(Path(d).rglob("perfetto_trace.json.gz"))
            ops = {k: v / args.trace_steps for k, v in self_times(trace).items()}
        out["workloads"][name] = {
            "length": length, "step_s": statistics.median(walls),
            "utilisation": cpu_s / wall / out["threads"],
            "thread_cpu_per_step_s": {k: v / args.reps
                                      for k, v in by_name(diff(threads1, threads0)).items()},
            "traced_self_s_per_step": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}
        flax.drop("sum")
    return out


# ---------------------------------------------------------------- measurement 3: the trainer


def trainer_run(args, root: Path) -> dict:
    """The SST trainer twice (cold fills the cache, then warm), the warm run sampled."""
    env = {**os.environ, "FLAXPALS_CACHE_DIR": str(root / "cache")}
    cmd = lambda wd: [  # noqa: E731
        sys.executable, "-m", "flaxpals.main", "--config=configs/baseline.py:method=sequential",
        f"--workdir={wd}", "--config.tasks=('sst',)", "--config.train.num_epochs=1",
        f"--config.train.steps_per_epoch={args.run_steps}", "--config.eval.train_sample=0",
        "--config.data.eval_limit=256"]
    done = subprocess.run(cmd(root / "cold"), env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the trainer (cold) failed:\n{done.stderr[-3000:]}")
    proc = subprocess.Popen(cmd(root / "warm"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    samples, start = [], time.perf_counter()
    while proc.poll() is None:
        snap = thread_cpu(proc.pid)
        if snap:
            samples.append((time.perf_counter() - start, snap))
        time.sleep(1.0)
    if proc.returncode:
        raise SystemExit(f"the trainer exited with {proc.returncode}: {' '.join(cmd('WD'))}")
    timeline = []
    for (t0, a), (t1, b) in zip(samples, samples[1:], strict=False):
        d = diff(b, a)
        timeline.append({"t": round(t1, 1), "cores_busy": sum(d.values()) / (t1 - t0),
                         "threads": by_name(d)})
    return {"command": " ".join(cmd("WD")), "timeline": timeline}


def steady(timeline: list[dict]) -> dict:
    """The timeline's middle half (past start-up, before the final evaluation): mean
    cores busy and CPU by thread name."""
    mid = timeline[len(timeline) // 4: max(len(timeline) * 3 // 4, len(timeline) // 4 + 1)]
    names = collections.Counter()
    for s in mid:
        names.update(s["threads"])
    n = max(len(mid), 1)
    return {"seconds": len(mid), "cores_busy": sum(s["cores_busy"] for s in mid) / n,
            "threads": {k: v / n for k, v in names.most_common(8)}}


# ---------------------------------------------------------------- report


def report(args, runs: dict[int, dict], trainer: dict | None) -> str:
    lo, hi = min(runs), max(runs)
    lines = [f"CPU: {cpu()}"]
    for name in args.workloads:
        a, b = runs[lo]["workloads"][name], runs[hi]["workloads"][name]
        speedup = a["step_s"] / b["step_s"]
        p = (1 - b["step_s"] / a["step_s"]) / (1 - lo / hi) if hi > lo else float("nan")
        lines += ["", f"## {name} at length {a['length']}",
                  f"step: {a['step_s'] * 1e3:.0f} ms on {lo} CPU, {b['step_s'] * 1e3:.0f} ms "
                  f"on {hi}: speedup {speedup:.2f}, parallel fraction p = {p:.2f}; "
                  f"utilisation {a['utilisation']:.2f} / {b['utilisation']:.2f}",
                  f"CPU per step by thread name on {hi}: " + ", ".join(
                      f"{k} {v * 1e3:.0f} ms" for k, v in
                      list(b["thread_cpu_per_step_s"].items())[:6]),
                  f"XLA ops' traced self time per step (top {args.top} on {hi} CPUs):",
                  f"  {'event':48} {'1 CPU ms':>9} {f'{hi} CPU ms':>9} {'speedup':>8}"]
        ops_a, ops_b = ({k: v for k, v in w["traced_self_s_per_step"].items()
                         if OP_NAME.match(k)} for w in (a, b))
        for op, t in list(ops_b.items())[:args.top]:
            ta = ops_a.get(op, float("nan"))
            gain = ta / t if t > 0 else float("nan")
            lines.append(f"  {op[:48]:48} {ta * 1e3:9.1f} {t * 1e3:9.1f} {gain:8.2f}")
        serial = sum(t for op, t in ops_b.items() if ops_a.get(op, 0) < 1.2 * t)
        lines.append(f"  ops that gain < 1.2x: {serial * 1e3:.0f} ms of "
                     f"{sum(ops_b.values()) * 1e3:.0f} ms in {len(ops_b)} ops "
                     f"({sum(ops_a.values()) * 1e3:.0f} ms on {lo} CPU)")
    if trainer:
        s = steady(trainer["timeline"])
        lines += ["", f"## the trainer, warm cache: {trainer['command']}",
                  f"middle {s['seconds']} s of {len(trainer['timeline'])}: "
                  f"{s['cores_busy']:.2f} cores busy; by thread name: " + ", ".join(
                      f"{k} {v:.2f}" for k, v in s["threads"].items()),
                  "cores busy per second: " + " ".join(
                      f"{x['cores_busy']:.1f}" for x in trainer["timeline"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.report_from:
        saved = json.loads(Path(args.report_from).read_text())
        runs = {int(k): v for k, v in saved["steps"].items()}
        print(f"(figures of `{saved['command']}`)")
        print(report(args, runs, saved["trainer"]))
        return 0
    argv = list(sys.argv[1:] if argv is None else argv)
    n = len(os.sched_getaffinity(0))
    runs = {}
    for threads in sorted({1, n}):
        print(f"steps on {threads} CPU(s)...", flush=True)
        done = subprocess.run([sys.executable, "-m", "benchmarks.bench_cores", *argv,
                               f"--worker={threads}"], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"worker ({threads} CPUs) failed:\n{done.stderr[-3000:]}")
        runs[threads] = json.loads(done.stdout.strip().splitlines()[-1])
    trainer = None
    if args.run_steps:
        print(f"the trainer, {args.run_steps} steps (twice: cold, then sampled warm)...",
              flush=True)
        with tempfile.TemporaryDirectory() as d:
            trainer = trainer_run(args, Path(d))
    text = report(args, runs, trainer)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"cpu": cpu(), "command": " ".join(["python -m benchmarks.bench_cores", *argv]),
             "steps": runs, "trainer": trainer, "report": text}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
