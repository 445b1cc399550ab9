"""Time to a trained, evaluated model: flaxpals against PyTorch + transformers, end to end.

    python -m benchmarks.bench_e2e                         # SST, 1 epoch
    python -m benchmarks.bench_e2e --workload=multitask    # PAL + annealed vs 3 models
    python -m benchmarks.bench_e2e --epochs=1 --train_sample=0 --out=e2e.json
    python -m benchmarks.bench_e2e --workload=multitask --epochs=3 --runs=cold

Each side runs as its own command, one after the other, never together:
- `sst`: flaxpals `configs/baseline.py:method=sequential` on SST alone against
  `experiments.torch_finetune --task=sst` (the same files, recipe and evaluation).
- `multitask`: flaxpals `configs/pal.py` (PAL, annealed sampling, every task's steps
  in one model) against `experiments.torch_finetune` once per task (three models),
  their times summed.

flaxpals runs twice (`--runs`) in a fresh cache directory: `cold` (tokenizing and compiling
everything, a first run) and `warm` (the same command again: token ids and compiled
programs come from the cache). Per run: wall time from the command to its exit, time
to the first finished step, the steady (median) step, compile count and seconds,
evaluation seconds, peak RSS, CPU utilisation (user + system time over wall time and
cores), and each flaxpals run's wall time over PyTorch's. The step, evaluation and
compile figures come from each run's timings.jsonl (flaxpals.train.timing); the wall time,
CPU time and RSS from the operating system (os.wait4).

Ratios depend on the CPU: the report records its model and AVX flags.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.host import cpu
from flaxpals import config_lib
from flaxpals.data import metrics as metrics_lib
from flaxpals.data import tasks

WORKLOADS = ("sst", "multitask")
TASKS = ("sst", "quora", "sts")


def timed(cmd: list[str], env: dict, log: Path) -> dict:
    """Runs `cmd` to its end; wall seconds, CPU seconds and peak RSS from the OS."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"{' '.join(cmd)} exited with {code}; the end of {log}:\n{tail}")
    cpu_s = usage.ru_utime + usage.ru_stime
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu_s, 2),
            "cpu_utilisation": round(cpu_s / wall / (os.cpu_count() or 1), 3),
            "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3)}


def read_timings(workdir: Path) -> dict:
    lines = (workdir / "timings.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def flaxpals_cmd(args, workdir: Path) -> list[str]:
    if args.workload == "sst":
        config = ["--config=configs/baseline.py:method=sequential", "--config.tasks=('sst',)"]
    else:
        config = ["--config=configs/pal.py"]
    return [sys.executable, "-m", "flaxpals.main", *config, f"--workdir={workdir}",
            f"--config.train.num_epochs={args.epochs}",
            f"--config.eval.train_sample={args.train_sample}",
            f"--config.seed={args.seed}", *args.flaxpals_flag]


def torch_cmd(args, task: str, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "experiments.torch_finetune", f"--task={task}",
            f"--workdir={workdir}", f"--epochs={args.epochs}",
            f"--train_sample={args.train_sample}", f"--seed={args.seed}"]


def side(name: str, runs: list[tuple[dict, dict, dict]]) -> dict:
    """One side's figures: summed over its runs (one per task for PyTorch multitask)."""
    os_fig = [r[0] for r in runs]
    tim = [r[1] for r in runs]
    metrics = {k: v for r in runs for k, v in r[2].items() if k.startswith("dev/")}
    if len(runs) > 1:  # each run's average and overall cover its own task: recompute
        scores = {k[len("dev/"):]: v for k, v in metrics.items()
                  if k not in ("dev/average", "dev/overall")}
        summary = metrics_lib.summary(scores, {t: tasks.get_task(t).metric for t in scores})
        metrics = {f"dev/{k}": v for k, v in scores.items()} | {
            f"dev/{k}": v for k, v in summary.items()}
    wall = sum(f["wall_s"] for f in os_fig)
    cpu_s = sum(f["cpu_s"] for f in os_fig)
    compile_ = [t.get("compile") or {} for t in tim]
    return {
        "side": name,
        "wall_s": round(wall, 2),
        "first_step_s": tim[0]["first_step_s"],
        "steady_step_s": tim[0]["steady_step_s"] if len(tim) == 1 else
        [t["steady_step_s"] for t in tim],
        "steps": sum(t["steps"] for t in tim),
        "train_steps_s": round(sum(t["steady_steps_s"] + t["compiling_steps_s"] for t in tim), 2),
        "compile_programs": sum(c.get("programs", 0) for c in compile_),
        "compile_s": round(sum(c.get("seconds", 0.0) for c in compile_), 2),
        "cache_hits": sum(c.get("cache_hits", 0) for c in compile_),
        "eval_s": round(sum(t["eval_s"] for t in tim), 2),
        # The process's own clock stops at its timings record: the rest is its exit.
        "exit_s": round(wall - sum(t["total_s"] for t in tim), 2),
        "peak_rss_gb": max(f["peak_rss_gb"] for f in os_fig),
        "cpu_utilisation": round(cpu_s / wall / (os.cpu_count() or 1), 3),
        "dev": metrics,
    }


def last_metrics(workdir: Path) -> dict:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


ROWS = [("wall time, command to exit (s)", "wall_s"), ("first step done at (s)", "first_step_s"),
        ("steady step (s)", "steady_step_s"), ("steps", "steps"),
        ("time in steps (s)", "train_steps_s"), ("programs compiled", "compile_programs"),
        ("compiling (s)", "compile_s"), ("loaded from the compile cache", "cache_hits"),
        ("evaluation (s)", "eval_s"), ("after its timings record, to exit (s)", "exit_s"),
        ("peak RSS (GB)", "peak_rss_gb"),
        ("CPU utilisation (of all cores)", "cpu_utilisation")]


def table(sides: list[dict]) -> str:
    lines = ["| | " + " | ".join(s["side"] for s in sides) + " |",
             "|---|" + "---|" * len(sides)]
    for label, key in ROWS:
        lines.append(f"| {label} | " + " | ".join(str(s[key]) for s in sides) + " |")
    if sides[-1]["side"].startswith("PyTorch"):
        ref = sides[-1]["wall_s"]
        lines.append("| wall time / PyTorch's | " + " | ".join(
            f"{s['wall_s'] / ref:.2f}×" for s in sides) + " |")
    keys = sorted({k for s in sides for k in s["dev"]})
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(
            f"{s['dev'][k]:.4f}" if k in s["dev"] else "" for s in sides) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=WORKLOADS, default="sst")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train_sample", type=int, default=config_lib.base().eval.train_sample,
                   help="train rows per task scored each epoch on both sides (0: off; "
                   "default: the config's eval.train_sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flaxpals_flag", action="append", default=[],
                   help="an extra flag for the flaxpals command (repeatable)")
    p.add_argument("--skip_torch", action="store_true", help="time flaxpals only")
    p.add_argument("--runs", default="cold,warm", choices=("cold,warm", "cold"),
                   help="flaxpals runs, in order: cold (fresh cache), warm (the cache the "
                   "cold run filled); `cold` alone saves a run on long workloads")
    p.add_argument("--out", default="", help="also write the figures to this JSON file")
    p.add_argument("--keep", default="", help="keep the workdirs and logs here")
    args = p.parse_args(argv)

    root = Path(args.keep or tempfile.mkdtemp(prefix="bench-e2e-"))
    root.mkdir(parents=True, exist_ok=True)
    cache = root / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "FLAXPALS_CACHE_DIR": str(cache)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    print(f"CPU: {cpu()}; workdirs and logs in {root}", flush=True)

    sides = []
    for attempt in args.runs.split(","):
        workdir = root / f"flaxpals-{attempt}"
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"flaxpals ({attempt})...", flush=True)
        fig = timed(flaxpals_cmd(args, workdir), env, root / f"flaxpals-{attempt}.log")
        sides.append(side(f"flaxpals, {attempt}", [(fig, read_timings(workdir),
                                                     last_metrics(workdir))]))
        print(json.dumps(sides[-1]), flush=True)
    if not args.skip_torch:
        runs = []
        for task in (("sst",) if args.workload == "sst" else TASKS):
            workdir = root / f"torch-{task}"
            shutil.rmtree(workdir, ignore_errors=True)
            print(f"PyTorch ({task})...", flush=True)
            fig = timed(torch_cmd(args, task, workdir), env, root / f"torch-{task}.log")
            runs.append((fig, read_timings(workdir), last_metrics(workdir)))
        sides.append(side("PyTorch" if len(runs) == 1 else "PyTorch, 3 models", runs))
        print(json.dumps(sides[-1]), flush=True)
    report = {"workload": args.workload, "epochs": args.epochs,
              "train_sample": args.train_sample, "cpu": cpu(),
              "command": " ".join([sys.executable, "-m", "benchmarks.bench_e2e",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "sides": sides}
    print("\n" + table(sides))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
