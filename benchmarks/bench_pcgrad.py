"""Cost of PCGrad against the additive sum, with the trainer's real steps.

Three additive training steps of flaxpals' MultiTaskModel (one batch of every
task per step), built by `benchmarks.bench_steps.FlaxSide` exactly as the trainer
builds them (`optim.make_optimizer`, `steps.Steps`):

  sum      per-task gradients (one jax.grad each), stacked, summed by
           `pcgrad.sum_combiner`, then clip + AdamW: PCGrad's step without the
           projection, the control for PCGrad's own overhead;
  pcgrad   the same stacked gradients through `pcgrad.pcgrad` (the trainer's
           `method=pcgrad`);
  sumloss  one jax.grad of the summed loss (the trainer's `method=additive`).

Warm-up (compilation) excluded; the variants are interleaved, in a rotating
order, in each repetition. Prints medians and min-max, the ratios pcgrad/sum
and pcgrad/sumloss, and each compiled step's memory analysis (peak estimate =
arguments + outputs - aliased + temporaries). With --rss each variant also
runs alone in a fresh subprocess that reports its peak resident memory.
`python -m benchmarks.bench_steps` times the same steps (workloads additive, pcgrad)
against PyTorch.

    python -m benchmarks.bench_pcgrad --reps 5 --rss
    python -m benchmarks.bench_pcgrad --checkpoint tiny --length 16 --batch 4 --reps 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from benchmarks import bench_steps as bench

VARIANTS = {"sum": "stacked_sum", "pcgrad": "pcgrad", "sumloss": "additive"}


def fmt_bytes(n):
    return f"{n / 2**20:8.1f} MiB"


def setup(args):
    """(bench args, FlaxSide, task -> NumPy batch) for --checkpoint/--batch/--length."""
    import numpy as np

    bargs = bench.parse_args([f"--checkpoint={args.checkpoint}", f"--batch={args.batch}",
                              f"--lengths={args.length}", "--no-torch"]
                             + ([] if args.dropout else ["--no-dropout"]))
    bench.configure_process(bargs)
    flax = bench.FlaxSide(bench.bench_config(bargs))
    rng = np.random.default_rng(0)
    batches = {t: bench.synthetic_batch(flax.specs[t], bargs.pair_encoding, args.batch,
                                        args.length, flax.model.config.vocab_size, rng)
               for t in bargs.tasks}
    return flax, batches


def _vm_hwm_bytes() -> int | None:
    """This process's peak resident memory (VmHWM) from /proc, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_alone(args):
    """One variant in this process: compile and warm up, reset the peak, 2 steps, report.

    Compilation's own peak would hide the step's, so the peak is reset after the
    warm-up step by writing 5 to /proc/self/clear_refs (Linux).
    """
    flax, batches = setup(args)
    call = flax.compile(VARIANTS[args.only], batches)[0]
    call()
    before = _vm_hwm_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(2):
        call()
    print(f"RSS {args.only} 'VmHWM after reset' before-reset {before} peak {_vm_hwm_bytes()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="minilm", help="minilm or tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dropout", action="store_true", help="dropout on (default off)")
    ap.add_argument("--rss", action="store_true", help="also peak RSS, one subprocess each")
    ap.add_argument("--only", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        return run_alone(args)

    flax, batches = setup(args)
    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {len(os.sched_getaffinity(0))} "
          f"CPUs; tasks {list(batches)}, batch {args.batch} x length {args.length} per task, "
          f"{args.checkpoint}, dropout {'on' if args.dropout else 'off'}")
    n = sum(x.size for x in jax.tree.leaves(flax.params["encoder"]))
    print(f"shared parameters {n / 1e6:.2f}M")

    calls, mem = {}, {}
    for v, family in VARIANTS.items():
        t0 = time.perf_counter()
        call, lower_s, compile_s, mem[v] = flax.compile(family, batches)
        call()  # warm-up
        print(f"{v:8s} lower {lower_s:5.1f} s, compile {compile_s:5.1f} s, first step "
              f"{time.perf_counter() - t0 - lower_s - compile_s:5.2f} s")
        calls[v] = call

    times = {v: [] for v in VARIANTS}
    names = list(VARIANTS)
    for r in range(args.reps):
        for v in names[r % 3:] + names[:r % 3]:
            times[v].append(bench.timed(calls[v]))

    print("\nstep time (s): median [min, max] over", args.reps, "interleaved repetitions")
    for v in VARIANTS:
        ts = times[v]
        print(f"  {v:8s} {statistics.median(ts):7.3f} [{min(ts):.3f}, {max(ts):.3f}]")
    med = {v: statistics.median(times[v]) for v in VARIANTS}
    print(f"ratio pcgrad / sum     = {med['pcgrad'] / med['sum']:.3f}  (goal <= 1.15)")
    print(f"ratio pcgrad / sumloss = {med['pcgrad'] / med['sumloss']:.3f}")
    paired = [p / s for p, s in zip(times["pcgrad"], times["sum"], strict=True)]
    print(f"per-repetition pcgrad/sum ratios: {', '.join(f'{x:.3f}' for x in paired)}")

    if all(mem.values()):
        print("\ncompiled memory analysis (peak estimate = args + outputs - aliased + temporaries)")
        for v in VARIANTS:
            m = mem[v]
            print(f"  {v:8s} temp {fmt_bytes(m['temp'])}  args {fmt_bytes(m['argument'])}  "
                  f"aliased {fmt_bytes(m['alias'])}  peak est. {fmt_bytes(m['peak_estimate'])}")
        print(f"extra temp pcgrad - sum     = "
              f"{fmt_bytes(mem['pcgrad']['temp'] - mem['sum']['temp'])}")
        print(f"extra temp pcgrad - sumloss = "
              f"{fmt_bytes(mem['pcgrad']['temp'] - mem['sumloss']['temp'])}")
        print(f"(one copy of the shared gradient: {fmt_bytes(4 * n)})")

    if args.rss:
        print("\npeak resident memory during 2 steps, each variant alone in a fresh process")
        rss = {}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            x for x in (root, os.environ.get("PYTHONPATH")) if x))
        for v in VARIANTS:
            cmd = [sys.executable, __file__, "--only", v, "--checkpoint", args.checkpoint,
                   "--batch", str(args.batch), "--length", str(args.length)]
            cmd += ["--dropout"] if args.dropout else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                 env=env).stdout.strip().splitlines()[-1]
            rss[v] = int(out.split()[-1])
            print(f"  {v:8s} {fmt_bytes(rss[v])}   ({out})")
        print(f"extra RSS pcgrad - sum     = {fmt_bytes(rss['pcgrad'] - rss['sum'])}")
        print(f"extra RSS pcgrad - sumloss = {fmt_bytes(rss['pcgrad'] - rss['sumloss'])}")


if __name__ == "__main__":
    main()
