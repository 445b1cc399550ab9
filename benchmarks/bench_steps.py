"""Speed of flaxpals' steps against a PyTorch reference doing the same work, same process.

    python -m benchmarks.bench_steps  # MiniLM, batch 32, L 32,64,128
    python -m benchmarks.bench_steps --lengths=64 --reps=7 --workloads=train/sst,pcgrad
    python -m benchmarks.bench_steps --rng-impl=unsafe_rbg             # dropout RNG cost
    python -m benchmarks.bench_steps --no-dropout --json=/tmp/bench.json
    python -m benchmarks.bench_steps --checkpoint=tiny --lengths=16 --reps=1 --batch=4   # smoke

flaxpals side: the trainer's real code: `build.build_model` (MultiTaskModel and
its params from the checkpoint), `optim.make_optimizer` (+ `pcgrad.pcgrad` for
PCGrad), `steps.Steps(...).jitted()`. PyTorch side: `benchmarks.torch_reference`
(transformers.BertModel with the same config and weights, equal heads,
torch.optim.AdamW with the same hyper-parameters). Dropout is on in both
(`--no-dropout` turns it off in both).

Workloads (each at every --lengths value; a batch per task for additive/pcgrad):

  train/<task>   one task's training step (forward, backward, clip, AdamW)
  additive       one batch of every task, their gradients summed, one update
  pcgrad         one batch of every task, a gradient each, PCGrad, one update
  predict/<task> the evaluation step at --eval-batch (no gradient)

Batches are synthetic at a fixed padded length L: random token ids, each row
with a random real length in [L/2, L] (attention masked after it), so that
both frameworks take their padded-attention paths as on real batches.

Timing: each workload is compiled (flaxpals: `.lower()` and `.compile()` timed
apart) and warmed up in both frameworks, then `--reps` repetitions run
interleaved (flaxpals, PyTorch; the order flips every repetition). Printed:
median and min-max per framework, the ratio of medians flaxpals/PyTorch, the
compiled step's memory analysis. Then: the input pipeline's examples/s on the
real training files against the examples/s a training step consumes (the
pipeline measured alone: in training it shares the CPUs with the step); a short
real training run (`loop.train_and_evaluate`, `--run-steps` steps) with every
XLA compilation counted (a `jax.monitoring` listener) and timed; the peak
resident memory of the process.

Threads. XLA:CPU sizes its thread pool from the CPUs the process may run on
and PyTorch from `torch.set_num_threads`. `--threads=N` pins this process to
N CPUs (`os.sched_setaffinity`, before JAX starts) and sets
`torch.set_num_threads(N)`; the default is every CPU the process may use, for
both. Both frameworks run in this one process, one at a time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import tempfile
import time

from benchmarks import host
from benchmarks.step_sides import FlaxSide, TorchSide, bench_config, synthetic_batch

TASKS = ("sst", "quora", "sts")
KINDS = ("train", "additive", "pcgrad", "predict")
RNG_IMPLS = ("threefry2x32", "unsafe_rbg", "rbg")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_steps",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="minilm",
                    help="minilm (embedded all-MiniLM-L6-v2), tiny (random 2-layer) or a dir")
    ap.add_argument("--batch", type=int, default=32, help="training batch per task")
    ap.add_argument("--eval-batch", type=int, default=128, help="batch of predict/<task>")
    ap.add_argument("--lengths", default="32,64,128", help="padded lengths, comma-separated")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per workload")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls after compilation")
    ap.add_argument("--threads", type=int, default=0, help="CPUs for both; 0: all available")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--workloads", default=",".join(KINDS),
                    help="names or kinds: train, train/sst, additive, pcgrad, predict, ...")
    ap.add_argument("--pooling", choices=("mean", "cls"), default="mean")
    ap.add_argument("--pair-encoding", choices=("bi", "cross"), default="cross",
                    help="pairs as one sequence (cross, the trainer's default) or two (bi)")
    ap.add_argument("--similarity", choices=("cosine", "dot"), default="cosine",
                    help="bi-encoder STS head")
    ap.add_argument("--rng-impl", choices=RNG_IMPLS, default=None,
                    help="jax_default_prng_impl (dropout masks); default: JAX's")
    ap.add_argument("--no-dropout", action="store_true", help="dropout 0 in both frameworks")
    ap.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before JAX starts")
    ap.add_argument("--no-torch", action="store_true", help="time flaxpals only")
    ap.add_argument("--torch-attn", choices=("sdpa", "eager"), default="sdpa",
                    help="transformers attention implementation")
    ap.add_argument("--torch-device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: cuda when JAX runs on a GPU and torch sees one, else cpu")
    ap.add_argument("--torch-optimizer", choices=("default", "foreach", "fused"),
                    default="default", help="torch AdamW implementation (default: its CPU one)")
    ap.add_argument("--pipeline-batches", type=int, default=200,
                    help="batches timed per task in the input-pipeline test; 0: skip it")
    ap.add_argument("--run-steps", type=int, default=24,
                    help="steps of the short real training run counting compilations; 0: skip")
    ap.add_argument("--run-eval-limit", type=int, default=256,
                    help="dev examples per task evaluated at the end of that run")
    ap.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = ap.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    args.tasks = [t for t in args.tasks.split(",") if t]
    if args.reps < 1 or args.batch < 1 or args.eval_batch < 1 or not args.lengths:
        ap.error("--reps, --batch, --eval-batch must be >= 1 and --lengths non-empty")
    if min(args.lengths) < 4:
        ap.error(f"--lengths must be >= 4, got {args.lengths}")
    return args


def configure_process(args) -> dict:
    """Threads, XLA flags and the PRNG: everything that must happen before JAX starts."""
    available = sorted(os.sched_getaffinity(0))
    if args.threads and args.threads < len(available):
        os.sched_setaffinity(0, available[:args.threads])
    threads = len(os.sched_getaffinity(0))
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = " ".join(
            x for x in (os.environ.get("XLA_FLAGS", ""), args.xla_flags) if x)
    import jax

    if args.rng_impl:
        jax.config.update("jax_default_prng_impl", args.rng_impl)
    if not args.no_torch:
        import torch

        torch.set_num_threads(threads)
    return {"threads": threads, "cpus": os.cpu_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


# ---------------------------------------------------------------- workloads and batches


def workload_names(tasks, selection: str) -> list[str]:
    names = ([f"train/{t}" for t in tasks] + ["additive", "pcgrad"]
             + [f"predict/{t}" for t in tasks])
    chosen = [s for s in selection.split(",") if s]
    unknown = [s for s in chosen if not any(n == s or n.startswith(s + "/") for n in names)]
    if unknown:
        raise SystemExit(f"--workloads: unknown {unknown}; known: {names} (or a kind: {KINDS})")
    return [n for n in names if any(n == s or n.startswith(s + "/") for s in chosen)]


# ---------------------------------------------------------------- measurements


def parity(args, flax: FlaxSide, torch_side: TorchSide) -> dict:
    """Each task's loss on one batch, dropout off, in both frameworks (same weights and data).

    Equal losses show that the PyTorch reference computes the same function: model,
    pooling, heads and loss.
    """
    import numpy as np
    import torch

    from benchmarks import torch_reference as bench_torch
    from flaxpals.model import heads

    out = {}
    rng = np.random.default_rng(0)
    for task in args.tasks:
        spec = flax.specs[task]
        batch = synthetic_batch(spec, args.pair_encoding, args.batch, min(args.lengths),
                                flax.model.config.vocab_size, rng)
        outputs = flax.model.apply({"params": flax.params}, batch, task, deterministic=True)
        ours = float(heads.loss_fn(spec.kind, outputs, batch["labels"], batch["mask"]))
        model = torch_side.model
        model.eval()
        tb = torch_side.to_torch(batch)
        with torch.no_grad():
            theirs = float(bench_torch.loss_fn(spec.kind, model(tb, task).float(), tb["labels"]))
        out[task] = {"flaxpals": ours, "pytorch": theirs, "abs_diff": abs(ours - theirs)}
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "times_s": times}


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bench_workloads(args, flax: FlaxSide, torch_side: TorchSide | None) -> list[dict]:
    import numpy as np

    rows = []
    vocab = flax.model.config.vocab_size
    for length in args.lengths:
        for name in workload_names(args.tasks, args.workloads):
            rng = np.random.default_rng(length)
            kind, _, task = name.partition("/")
            if kind in ("additive", "pcgrad"):
                batch = {t: synthetic_batch(flax.specs[t], args.pair_encoding, args.batch, length,
                                            vocab, rng) for t in args.tasks}
                size = args.batch * len(args.tasks)
            else:
                size = args.eval_batch if kind == "predict" else args.batch
                batch = synthetic_batch(flax.specs[task], args.pair_encoding, size, length,
                                        vocab, rng)
            call, lower_s, compile_s, memory = flax.compile(name, batch)
            tcall = torch_side.prepare(name, batch) if torch_side else None
            for _ in range(args.warmup):
                call()
                if tcall:
                    tcall()
            ft, tt = [], []
            for r in range(args.reps):
                order = [(call, ft), (tcall, tt)] if r % 2 == 0 else [(tcall, tt), (call, ft)]
                for fn, out in order:
                    if fn is not None:
                        out.append(timed(fn))
            row = {"workload": name, "length": length, "examples": size,
                   "flaxpals": summary(ft), "lower_s": lower_s, "compile_s": compile_s,
                   "memory": memory}
            if tt:
                row["pytorch"] = summary(tt)
                row["ratio"] = row["flaxpals"]["median_s"] / row["pytorch"]["median_s"]
            rows.append(row)
            print(format_row(row), flush=True)
            if kind == "pcgrad":
                flax.drop("pcgrad")
            gc.collect()
    return rows


def pipeline_throughput(args, config, flax: FlaxSide) -> dict:
    """Examples/s of the real training batches of each task (input_pipeline.planned_batches)."""
    from benchmarks import bench_input
    from flaxpals.data import input_pipeline

    out = {}
    for task in flax.tasks:
        split = input_pipeline.load_split(task, "train", flax.tokenizer,
                                          max_length=config.data.max_length,
                                          pair_encoding=config.model.pair_encoding)
        out[task.name] = bench_input.train_throughput(split, args.batch, args.pipeline_batches,
                                                      tuple(config.data.buckets))
    return out


def compilation_run(args, config) -> dict:
    """A short real run (train_and_evaluate, method sequential), its compilations counted
    (flaxpals.train.compilation.STATS: XLA compiles, and persistent-cache loads apart)."""
    from flaxpals.train import loop
    from flaxpals.train.compilation import STATS, Compiled

    c = config.copy_and_resolve_references()
    c.train.method = "sequential"
    c.train.num_epochs = 1
    c.train.steps_per_epoch = args.run_steps
    c.data.eval_limit = args.run_eval_limit
    c.eval.train_sample = min(c.eval.train_sample, args.run_eval_limit)
    c.checkpoint.every_steps = 10**9
    c.log_every_steps = max(args.run_steps, 1)
    with tempfile.TemporaryDirectory() as workdir:
        mark, names = STATS.snapshot(), STATS.by_function()
        t0 = time.perf_counter()
        loop.train_and_evaluate(c, workdir)
        wall = time.perf_counter() - t0
        total = STATS.since(mark)
    by_name = {k: v - names.get(k, Compiled()) for k, v in STATS.by_function().items()}
    by_name = {k: v for k, v in by_name.items() if v.programs or v.cache_hits}
    steps = [v for k, v in by_name.items()
             if any(s in k for s in ("train_step", "task_grads", "apply_combined",
                                     "predict_step"))]
    return {"steps": args.run_steps, "wall_s": wall, "compilations": total.programs,
            "compile_s": total.seconds, "cache_hits": total.cache_hits,
            "cache_s": total.cache_seconds,
            "step_compilations": sum(v.programs for v in steps),
            "step_compile_s": sum(v.seconds for v in steps),
            "by_function": {k: {"count": v.programs, "seconds": v.seconds,
                                "cache_hits": v.cache_hits}
                            for k, v in sorted(by_name.items(), key=lambda kv: -kv[1].seconds)}}


# ---------------------------------------------------------------- report


def _ms(s: dict) -> str:
    return f"{1e3 * s['median_s']:8.1f} [{1e3 * s['min_s']:.1f}-{1e3 * s['max_s']:.1f}]"


HEADER = (f"{'workload':16} {'L':>4} {'ex':>4}  {'flaxpals ms median [min-max]':>30}  "
          f"{'PyTorch ms median [min-max]':>30}  {'ratio':>6}  {'lower s':>7} {'compile s':>9} "
          f"{'temp MiB':>8}")


def format_row(row: dict) -> str:
    torch_part = _ms(row["pytorch"]) if "pytorch" in row else "-"
    ratio = f"{row['ratio']:6.2f}" if "ratio" in row else "     -"
    temp = f"{row['memory']['temp'] / 2**20:8.1f}" if row.get("memory") else "       -"
    return (f"{row['workload']:16} {row['length']:4d} {row['examples']:4d}  "
            f"{_ms(row['flaxpals']):>30}  {torch_part:>30}  {ratio}  {row['lower_s']:7.2f} "
            f"{row['compile_s']:9.2f} {temp}")


def print_pipeline(pipeline: dict, rows: list[dict], batch: int) -> None:
    print("\nInput pipeline (planned_batches on the real training files) against step consumption")
    print(f"{'task':8} {'pipeline ex/s':>13} {'real/padded':>11}  step ex/s at L (flaxpals train "
          "step)    batches per bucket")
    for task, p in pipeline.items():
        steps = {r["length"]: batch / r["flaxpals"]["median_s"] for r in rows
                 if r["workload"] == f"train/{task}"}
        consume = ", ".join(f"L{k}: {v:.0f}" for k, v in sorted(steps.items())) or "-"
        head = (f" (headroom x{p['examples_per_s'] / max(steps.values()):.0f} over the fastest)"
                if steps else "")
        print(f"{task:8} {p['examples_per_s']:13.0f} {p['real_over_padded']:11.2f}  "
              f"{consume}{head}   {p['lengths']}")


def print_run(run: dict) -> None:
    print(f"\nCompilations in a short real run (train_and_evaluate, sequential, {run['steps']} "
          f"steps + dev eval): {run['compilations']} compilations, {run['compile_s']:.1f} s "
          f"compiling of {run['wall_s']:.1f} s wall; {run['step_compilations']} of them steps "
          f"({run['step_compile_s']:.1f} s); loaded from the persistent cache "
          f"{run['cache_hits']} ({run['cache_s']:.1f} s)")
    for name, v in list(run["by_function"].items())[:12]:
        print(f"  {v['count']:3d} x {name:40.40} {v['seconds']:7.2f} s "
              f"(+{v['cache_hits']} loaded)")


def closing_note(rows: list[dict], machine: dict) -> str:
    import math

    train = [r["ratio"] for r in rows if r["workload"].startswith("train/") and "ratio" in r]
    lines = []
    if train:
        gm = math.exp(sum(math.log(x) for x in train) / len(train))
        lines.append(f"train step flaxpals/PyTorch: geometric mean {gm:.2f} over {len(train)} "
                     f"(task, length) pairs, range {min(train):.2f}-{max(train):.2f}")
    for kind in ("additive", "pcgrad", "predict"):
        rs = [r["ratio"] for r in rows if r["workload"].startswith(kind) and "ratio" in r]
        if rs:
            lines.append(f"{kind} flaxpals/PyTorch: {', '.join(f'{x:.2f}' for x in rs)}")
    lines.append(f"machine: {machine['platform']}, {machine['threads']} threads of "
                 f"{machine['cpus']} CPUs ({machine.get('cpu', 'cpu model unknown')}), "
                 f"JAX {machine['jax']} on {machine['device']}, torch "
                 f"{machine.get('torch', '-')} on {machine.get('torch_device', '-')}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    machine = configure_process(args)
    import jax

    machine.update(host.machine())
    machine.update(jax=jax.__version__, device=str(jax.devices()[0]),
                   prng_impl=str(jax.config.jax_default_prng_impl))
    config = bench_config(args)
    flax = FlaxSide(config)
    torch_side = None
    if not args.no_torch:
        import torch

        machine["torch"] = torch.__version__
        machine["torch_threads"] = torch.get_num_threads()
        torch_side = TorchSide(flax, config, args)
        machine["torch_device"] = torch_side.device
    enc = flax.model.config
    print(f"flaxpals bench: {args.checkpoint} (hidden {enc.hidden_size}, {enc.num_hidden_layers} "
          f"layers, {enc.num_attention_heads} heads), tasks {args.tasks}, batch {args.batch} "
          f"(eval {args.eval_batch}), {args.dtype}, pooling {args.pooling}, pairs "
          f"{args.pair_encoding}/{args.similarity}, dropout "
          f"{'off' if args.no_dropout else enc.hidden_dropout_prob}, PRNG "
          f"{machine['prng_impl']}, torch attention {args.torch_attn}, AdamW "
          f"{args.torch_optimizer}")
    print(f"{machine['threads']} threads (of {machine['cpus']} CPUs), XLA_FLAGS="
          f"{machine['xla_flags']!r}, {machine['device']}; {args.reps} interleaved repetitions "
          f"after {args.warmup} warm-up calls; peak RSS so far {rss_mib():.0f} MiB\n")
    result = {"args": vars(args), "machine": machine}
    if torch_side is not None:
        result["parity"] = parity(args, flax, torch_side)
        print("parity, dropout off (same weights, same batch): loss flaxpals / PyTorch: "
              + "; ".join(f"{t} {p['flaxpals']:.6f} / {p['pytorch']:.6f}"
                          for t, p in result["parity"].items()) + "\n")
    print(HEADER)
    rows = result["workloads"] = bench_workloads(args, flax, torch_side)
    if args.pipeline_batches > 0:
        result["pipeline"] = pipeline_throughput(args, config, flax)
        print_pipeline(result["pipeline"], rows, args.batch)
    del torch_side
    gc.collect()
    if args.run_steps > 0:
        result["run"] = compilation_run(args, config)
        print_run(result["run"])
    result["peak_rss_mib"] = rss_mib()
    print(f"\npeak resident memory of this process (ru_maxrss, both frameworks): "
          f"{result['peak_rss_mib']:.0f} MiB")
    result["note"] = closing_note(rows, machine)
    print("\n" + result["note"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
