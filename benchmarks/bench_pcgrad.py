"""Cost of PCGrad and the other combiners and loss weightings against the additive sum.

Additive training steps of flaxpals' MultiTaskModel (one batch of every task
per step), built by `benchmarks.step_sides.FlaxSide` exactly as the trainer builds
them (`optim.make_optimizer`, `steps.Steps`, `combiners.from_config`):

  sum      per-task gradients (one jax.grad each), stacked, summed by
           `pcgrad.sum_combine`, then clip + AdamW: the combiners' step without
           the combining, the control for their own overhead;
  pcgrad   the same stacked gradients through `pcgrad.pcgrad` (the trainer's
           `method=pcgrad`);
  gradvac, cagrad, mgda, imtl_g, aligned_mtl, nash_mtl
           the same through each combiner (`train.combiner=NAME`);
  uncertainty, dwa, famo
           the same through each loss weighting (`train.loss_weighting=NAME`),
           which also takes the stacked per-task losses;
  sumloss  the same per-task gradients summed as they come, never stacked (the
           trainer's default `method=additive` step, `combiner=sum`).

The per-task gradient programs are compiled once and shared by every variant
(as the trainer's persistent compilation cache shares them), so the first
variant's compile time includes them and the others' is their own
`apply_combined`. Warm-up (compilation) excluded; the variants are
interleaved, in a rotating order, in each repetition. Prints medians and
min-max, every variant's ratio to sum and to sumloss, and each compiled step's
memory analysis (peak estimate = arguments + outputs - aliased + temporaries)
with its extra temporaries over sum. With --rss each variant also runs alone
in a fresh subprocess that reports its peak resident memory. Each variant
holds its own train state (params and AdamW moments): --variants picks some.
`python -m benchmarks.bench_steps` times the sum and PCGrad steps against PyTorch.

    python -m benchmarks.bench_pcgrad --reps 5 --rss
    python -m benchmarks.bench_pcgrad --variants sum,cagrad,sumloss --reps 5
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
from benchmarks import step_sides


def all_variants() -> dict[str, str]:
    """variant -> FlaxSide family (or workload). Imports JAX: after configure_process."""
    combiner_names, weighting_names = step_sides.families()
    return {"sum": "stacked_sum", "pcgrad": "pcgrad",
            **{n: n for n in combiner_names + weighting_names}, "sumloss": "additive"}


def fmt_bytes(n):
    return f"{n / 2**20:8.1f} MiB"


def setup(args):
    """(bench args, FlaxSide, task -> NumPy batch) for --checkpoint/--batch/--length."""
    import numpy as np

    bargs = bench.parse_args([f"--checkpoint={args.checkpoint}", f"--batch={args.batch}",
                              f"--lengths={args.length}", "--no-torch"]
                             + ([] if args.dropout else ["--no-dropout"]))
    bench.configure_process(bargs)
    flax = step_sides.FlaxSide(step_sides.bench_config(bargs), share_task_grads=True)
    rng = np.random.default_rng(0)
    batches = {t: step_sides.synthetic_batch(flax.specs[t], bargs.pair_encoding, args.batch,
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
    call = flax.compile(all_variants()[args.only], batches)[0]
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
    ap.add_argument("--variants", default="",
                    help="comma-separated variants (default all); sum is always included")
    ap.add_argument("--only", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        return run_alone(args)

    flax, batches = setup(args)
    import jax

    known = all_variants()
    chosen = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {list(known)}")
    variants = {v: f for v, f in known.items() if not chosen or v in chosen or v == "sum"}
    names = list(variants)
    width = max(map(len, names))

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {len(os.sched_getaffinity(0))} "
          f"CPUs; tasks {list(batches)}, batch {args.batch} x length {args.length} per task, "
          f"{args.checkpoint}, dropout {'on' if args.dropout else 'off'}")
    n = sum(x.size for x in jax.tree.leaves(flax.params["encoder"]))
    print(f"shared parameters {n / 1e6:.2f}M")

    calls, mem = {}, {}
    for v, family in variants.items():
        t0 = time.perf_counter()
        call, lower_s, compile_s, mem[v] = flax.compile(family, batches)
        call()  # warm-up
        print(f"{v:{width}s} lower {lower_s:5.1f} s, compile {compile_s:5.1f} s, first step "
              f"{time.perf_counter() - t0 - lower_s - compile_s:5.2f} s")
        calls[v] = call

    times = {v: [] for v in variants}
    for r in range(args.reps):
        shift = r % len(names)
        for v in names[shift:] + names[:shift]:
            times[v].append(bench.timed(calls[v]))

    print("\nstep time (s): median [min, max] over", args.reps, "interleaved repetitions")
    med = {v: statistics.median(times[v]) for v in variants}
    for v in variants:
        ts = times[v]
        ratios = f"/ sum {med[v] / med['sum']:6.3f}" + (
            f"   / sumloss {med[v] / med['sumloss']:6.3f}" if "sumloss" in med else "")
        print(f"  {v:{width}s} {med[v]:7.3f} [{min(ts):.3f}, {max(ts):.3f}]   {ratios}")
    if "pcgrad" in med:
        print(f"ratio pcgrad / sum = {med['pcgrad'] / med['sum']:.3f}  (goal <= 1.15)")
        paired = [p / s for p, s in zip(times["pcgrad"], times["sum"], strict=True)]
        print(f"per-repetition pcgrad/sum ratios: {', '.join(f'{x:.3f}' for x in paired)}")

    if all(mem.values()):
        print("\ncompiled memory analysis (peak estimate = args + outputs - aliased + temporaries)")
        for v in variants:
            m = mem[v]
            print(f"  {v:{width}s} temp {fmt_bytes(m['temp'])}  args {fmt_bytes(m['argument'])}  "
                  f"aliased {fmt_bytes(m['alias'])}  peak est. {fmt_bytes(m['peak_estimate'])}  "
                  f"extra temp over sum {fmt_bytes(m['temp'] - mem['sum']['temp'])}")
        print(f"(one copy of the shared gradient: {fmt_bytes(4 * n)})")

    if args.rss:
        print("\npeak resident memory during 2 steps, each variant alone in a fresh process")
        rss = {}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            x for x in (root, os.environ.get("PYTHONPATH")) if x))
        for v in variants:
            cmd = [sys.executable, __file__, "--only", v, "--checkpoint", args.checkpoint,
                   "--batch", str(args.batch), "--length", str(args.length)]
            cmd += ["--dropout"] if args.dropout else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                 env=env).stdout.strip().splitlines()[-1]
            rss[v] = int(out.split()[-1])
            print(f"  {v:{width}s} {fmt_bytes(rss[v])}   extra over sum "
                  f"{fmt_bytes(rss[v] - rss['sum'])}   ({out})")


if __name__ == "__main__":
    main()
