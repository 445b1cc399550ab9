"""Cost of PCGrad against the additive sum, on the MiniLM shape (standalone).

Three jitted training steps on a randomly initialised MiniLM-shaped BERT
(hidden 384, 6 layers, 12 heads, intermediate 1536) with T task heads (a
linear layer on the pooled output, random labels), one batch per task:

  sum     T per-task gradients (T jax.grad calls), stacked, summed by
          `sum_combiner`, then clip + AdamW;
  pcgrad  the same stacked gradients through `pcgrad`, then clip + AdamW;
  sumloss one jax.grad of the summed loss (the cheapest additive step), then
          clip + AdamW, for reference.

Warm-up (compilation) excluded; the variants are interleaved, in a rotating
order, in each repetition. Prints medians and min-max, the ratios pcgrad/sum
and pcgrad/sumloss, and each compiled step's memory analysis (temporaries;
peak estimate = arguments + outputs - aliased + temporaries). With --rss each
variant also runs alone in a fresh subprocess that reports its peak resident
memory (ru_maxrss), since a process's peak covers everything it ran.

    PYTHONPATH=. python launch/bench_pcgrad.py --reps 5 --rss
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxpals import pcgrad as pc
from flaxpals.bert import BertConfig, BertModel

VARIANTS = ("sum", "pcgrad", "sumloss")


def minilm_config() -> BertConfig:
    return BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                      intermediate_size=1536)


def build(args):
    """(model, params, per-task batches, shared mask, loss_fns)."""
    config = minilm_config()
    model = BertModel(config)
    rng = np.random.default_rng(0)
    b, length, t = args.batch, args.length, args.tasks
    ids = jnp.asarray(rng.integers(1000, config.vocab_size, size=(1, length)), jnp.int32)
    ones = jnp.ones((1, length), jnp.int32)
    encoder = model.init(jax.random.key(0), ids, ones, ones * 0)["params"]
    classes = [5, 2, 3, 4, 6, 7, 8, 9][:t]
    heads = {f"task{k}": {"w": jnp.asarray(rng.normal(size=(config.hidden_size, c)) * 0.02,
                                           jnp.float32),
                          "b": jnp.zeros((c,), jnp.float32)}
             for k, c in enumerate(classes)}
    params = {"encoder": encoder, "heads": heads}
    batches = [{"ids": jnp.asarray(rng.integers(1000, config.vocab_size, size=(b, length)),
                                   jnp.int32),
                "labels": jnp.asarray(rng.integers(0, c, size=(b,)), jnp.int32)}
               for c in classes]
    mask = {"encoder": True, "heads": False}

    def make_loss(k):
        def loss(p, batch):
            mask_ = jnp.ones_like(batch["ids"])
            _, pooled = model.apply({"params": p["encoder"]}, batch["ids"], mask_,
                                    jnp.zeros_like(batch["ids"]), deterministic=True)
            h = p["heads"][f"task{k}"]
            logits = pooled @ h["w"] + h["b"]
            return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                                   batch["labels"]).mean()
        return loss

    return params, batches, mask, [make_loss(k) for k in range(t)]


def make_step(variant, mask, losses, t):
    tail = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, weight_decay=0.01))
    if variant == "pcgrad":
        tx = optax.chain(pc.pcgrad(mask, seed=0), tail)
    elif variant == "sum":
        tx = optax.chain(pc.sum_combiner(mask), tail)
    else:
        tx = tail

    def step(params, state, batches):
        if variant == "sumloss":
            grads = jax.grad(lambda p: sum(losses[k](p, batches[k]) for k in range(t)))(params)
        else:
            per_task = [jax.grad(losses[k])(params, batches[k]) for k in range(t)]
            grads = jax.tree.map(lambda *g: jnp.stack(g), *per_task)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return tx, jax.jit(step, donate_argnums=(0, 1))


def fmt_bytes(n):
    return f"{n / 2**20:8.1f} MiB"


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
    warm-up step by writing 5 to /proc/self/clear_refs (Linux); where that is
    impossible ru_maxrss (the whole process's peak) is reported instead.
    """
    params, batches, mask, losses = build(args)
    tx, step = make_step(args.only, mask, losses, args.tasks)
    state = tx.init(params)
    params, state = step(params, state, batches)
    jax.block_until_ready(params)
    before = _vm_hwm_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        how = "VmHWM after reset"
    except OSError:
        how = "ru_maxrss"
    for _ in range(2):
        params, state = step(params, state, batches)
        jax.block_until_ready(params)
    peak = (_vm_hwm_bytes() if how != "ru_maxrss"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(f"RSS {args.only} {how!r} before-reset {before} peak {peak}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rss", action="store_true", help="also peak RSS, one subprocess each")
    ap.add_argument("--only", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        return run_alone(args)

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"{os.cpu_count()} CPUs; T={args.tasks}, batch {args.batch} x length {args.length} "
          "per task, MiniLM shape, dropout off")
    params, batches, mask, losses = build(args)
    n = sum(x.size for x in jax.tree.leaves(params["encoder"]))
    print(f"shared parameters {n / 1e6:.2f}M")

    steps, states, params_of, mem = {}, {}, {}, {}
    for v in VARIANTS:
        tx, step = make_step(v, mask, losses, args.tasks)
        p = jax.tree.map(jnp.copy, params)
        s = tx.init(p)
        t0 = time.perf_counter()
        compiled = step.lower(p, s, batches).compile()
        compile_s = time.perf_counter() - t0
        ma = compiled.memory_analysis()
        mem[v] = ma
        t0 = time.perf_counter()
        p, s = step(p, s, batches)  # warm-up
        jax.block_until_ready(p)
        print(f"{v:8s} compile {compile_s:5.1f} s, first step {time.perf_counter() - t0:5.2f} s")
        steps[v], states[v], params_of[v] = step, s, p

    times = {v: [] for v in VARIANTS}
    for r in range(args.reps):
        order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
        for v in order:
            t0 = time.perf_counter()
            params_of[v], states[v] = steps[v](params_of[v], states[v], batches)
            jax.block_until_ready(params_of[v])
            times[v].append(time.perf_counter() - t0)

    print("\nstep time (s): median [min, max] over", args.reps, "interleaved repetitions")
    for v in VARIANTS:
        ts = times[v]
        print(f"  {v:8s} {statistics.median(ts):7.3f} [{min(ts):.3f}, {max(ts):.3f}]")
    med = {v: statistics.median(times[v]) for v in VARIANTS}
    print(f"ratio pcgrad / sum     = {med['pcgrad'] / med['sum']:.3f}  (goal <= 1.15)")
    print(f"ratio pcgrad / sumloss = {med['pcgrad'] / med['sumloss']:.3f}")
    paired = [p / s for p, s in zip(times["pcgrad"], times["sum"], strict=True)]
    print(f"per-repetition pcgrad/sum ratios: {', '.join(f'{x:.3f}' for x in paired)}")

    print("\ncompiled memory analysis (temporaries; peak estimate = args + outputs "
          "- aliased + temporaries)")
    peak = {}
    for v in VARIANTS:
        ma = mem[v]
        peak[v] = (ma.argument_size_in_bytes + ma.output_size_in_bytes
                   - ma.alias_size_in_bytes + ma.temp_size_in_bytes)
        print(f"  {v:8s} temp {fmt_bytes(ma.temp_size_in_bytes)}  args "
              f"{fmt_bytes(ma.argument_size_in_bytes)}  aliased "
              f"{fmt_bytes(ma.alias_size_in_bytes)}  peak est. {fmt_bytes(peak[v])}")
    print(f"extra temp pcgrad - sum     = "
          f"{fmt_bytes(mem['pcgrad'].temp_size_in_bytes - mem['sum'].temp_size_in_bytes)}")
    print(f"extra temp pcgrad - sumloss = "
          f"{fmt_bytes(mem['pcgrad'].temp_size_in_bytes - mem['sumloss'].temp_size_in_bytes)}")
    print(f"(one copy of the shared gradient: {fmt_bytes(4 * n)})")

    if args.rss:
        print("\npeak resident memory during 2 steps, each variant alone in a fresh process")
        rss = {}
        for v in VARIANTS:
            cmd = [sys.executable, __file__, "--only", v, "--tasks", str(args.tasks),
                   "--batch", str(args.batch), "--length", str(args.length)]
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                x for x in (root, os.environ.get("PYTHONPATH")) if x))
            out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                 env=env).stdout.strip().splitlines()[-1]
            rss[v] = int(out.split()[-1])
            print(f"  {v:8s} {fmt_bytes(rss[v])}   ({out})")
        print(f"extra RSS pcgrad - sum     = {fmt_bytes(rss['pcgrad'] - rss['sum'])}")
        print(f"extra RSS pcgrad - sumloss = {fmt_bytes(rss['pcgrad'] - rss['sumloss'])}")


if __name__ == "__main__":
    main()
