"""Where XLA:CPU loses to PyTorch: the encoder's parts timed alone, same process, same data.

    python -m benchmarks.bench_ops               # MiniLM shape: forward 128x128, fwd+bwd 32x128
    python -m benchmarks.bench_ops --length 64 --reps 7
    python -m benchmarks.bench_ops --ops gelu,softmax --json /tmp/ops.json

`python -m benchmarks.bench_steps` times whole steps; this script splits a layer into
the pieces XLA compiles separately (each its own `jax.jit`) and times each
against the PyTorch op that transformers' BertLayer runs for it:

  dense_up, dense_down   the feed-forward matmuls (+ bias), 384->1536->384
  qkv                    the three attention projections
  attention              flaxpals.model.bert.multi_head_attention (no dropout) against
                         the same math in torch (matmul, softmax, matmul)
  attention_sdpa         jax.nn.dot_product_attention against
                         torch.nn.functional.scaled_dot_product_attention
                         (what transformers' default "sdpa" attention calls)
  softmax                masked softmax over [batch, heads, L, L]
  gelu                   exact (erf) GELU over [batch*L, 1536]
  layernorm              over [batch*L, 384]
  dropout                flaxpals.model.dropout.Dropout (rate 0.1) against F.dropout

Two modes: "forward" at the evaluation batch (--eval-batch, as predict_step)
and "fwd+bwd" at the training batch (--batch; the gradient of sum(out * g)
with respect to every input and parameter, as a training step needs). Inputs
are the same float32 arrays in both frameworks. Repetitions are interleaved
(the order flips each time) after warm-up; printed: medians, min-max and the
ratio flaxpals/PyTorch. Before timing, each op's forward output is compared
across the frameworks (max absolute difference printed; dropout excepted).
Threads as in benchmarks.bench_steps (all CPUs, both).
"""

from __future__ import annotations

import argparse
import json
import os

OPS = ("dense_up", "dense_down", "qkv", "attention", "attention_sdpa", "softmax", "gelu",
       "layernorm", "dropout")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32, help="batch of the fwd+bwd mode")
    ap.add_argument("--eval-batch", type=int, default=128, help="batch of the forward mode")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.ops = [o for o in args.ops.split(",") if o]
    unknown = set(args.ops) - set(OPS)
    if unknown:
        ap.error(f"--ops: unknown {sorted(unknown)}; known: {OPS}")
    return args


def make_ops(args, batch: int):
    """name -> (inputs as NumPy arrays, jax_fn, torch_fn, constants); fn(*inputs) -> output.

    The last `constants` inputs (attention biases) get no gradient.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F
    from flax import linen as nn

    from flaxpals.model import bert, dropout

    rng = np.random.default_rng(0)
    h, f, n, nh = args.hidden, args.ffn, args.length, args.heads

    def arr(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    mask = np.ones((batch, n), np.float32)
    mask[:, n * 3 // 4:] = 0.0  # a padded tail, as bucketed batches have
    jbias = np.asarray(bert.attention_bias(jnp.asarray(mask), jnp.float32))  # [b,1,1,n]
    x_h, x_f = arr(batch * n, h), arr(batch * n, f)
    q, k, v = arr(batch, n, h), arr(batch, n, h), arr(batch, n, h)
    d = h // nh

    def t_attention(q, k, v, bias):
        def heads(x):
            return x.view(batch, n, nh, d).transpose(1, 2)
        scores = heads(q) @ heads(k).transpose(-1, -2) / d ** 0.5
        probs = torch.softmax(scores + bias, dim=-1)
        return (probs @ heads(v)).transpose(1, 2).reshape(batch, n, h)

    def t_sdpa(q, k, v, bias):
        def heads(x):
            return x.view(batch, n, nh, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=bias)
        return out.transpose(1, 2).reshape(batch, n, h)

    def j_sdpa(q, k, v, bias):
        def heads(x):
            return x.reshape(batch, n, nh, d)
        out = jax.nn.dot_product_attention(heads(q), heads(k), heads(v), bias=bias)
        return out.reshape(batch, n, h)

    drop = dropout.Dropout(0.1)
    key = jax.random.key(0)
    layer_norm = nn.LayerNorm(epsilon=1e-12)  # as bert._layer_norm
    ops = {
        "dense_up": ([x_h, arr(h, f, scale=0.02), arr(f)],
                     lambda x, w, b: x @ w + b, lambda x, w, b: F.linear(x, w.T, b), 0),
        "dense_down": ([x_f, arr(f, h, scale=0.02), arr(h)],
                       lambda x, w, b: x @ w + b, lambda x, w, b: F.linear(x, w.T, b), 0),
        "qkv": ([x_h] + [arr(h, h, scale=0.02) for _ in range(3)],
                lambda x, a, b, c: jnp.stack([x @ a, x @ b, x @ c]),
                lambda x, a, b, c: torch.stack([x @ a, x @ b, x @ c]), 0),
        "attention": ([q, k, v, jbias],
                      lambda q, k, v, b: bert.multi_head_attention(q, k, v, b, nh, None, True),
                      t_attention, 1),
        "attention_sdpa": ([q, k, v, jbias], j_sdpa, t_sdpa, 1),
        "softmax": ([arr(batch, nh, n, n), jbias],
                    lambda s, b: jax.nn.softmax(s + b, axis=-1),
                    lambda s, b: torch.softmax(s + b, dim=-1), 1),
        "gelu": ([x_f], lambda x: jax.nn.gelu(x, approximate=False), F.gelu, 0),
        "layernorm": ([x_h, arr(h), arr(h)],
                      lambda x, g, b: layer_norm.apply({"params": {"scale": g, "bias": b}}, x),
                      lambda x, g, b: F.layer_norm(x, (h,), g, b, 1e-12), 0),
        "dropout": ([x_f], lambda x: drop.apply({}, x, False, rngs={"dropout": key}),
                    lambda x: F.dropout(x, 0.1, training=True), 0),
    }
    return {name: ops[name] for name in args.ops}


def max_abs_diff(inputs, jfn, tfn) -> float:
    """max |flaxpals - PyTorch| of an op's forward output on the same inputs."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    ours = np.asarray(jfn(*[jnp.asarray(x) for x in inputs]))
    with torch.no_grad():
        theirs = tfn(*[torch.from_numpy(x.copy()) for x in inputs]).numpy()
    return float(np.max(np.abs(ours - theirs)))


def callables(inputs, jfn, tfn, constants: int, backward: bool):
    """(jax call, torch call), each running the op once to completion."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    jin = [jnp.asarray(x) for x in inputs]
    grads = [i < len(inputs) - constants for i in range(len(inputs))]
    tin = [torch.from_numpy(x.copy()).requires_grad_(backward and g) for x, g in
           zip(inputs, grads, strict=True)]
    out_shape = jax.eval_shape(jfn, *jin)
    ct_np = np.random.default_rng(1).standard_normal(out_shape.shape).astype(np.float32)
    ct, tct = jnp.asarray(ct_np), torch.from_numpy(ct_np)
    if not backward:
        jf = jax.jit(jfn)

        def jcall():
            jax.block_until_ready(jf(*jin))

        def tcall():
            with torch.no_grad():
                tfn(*tin)
        return jcall, tcall
    argnums = tuple(i for i, g in enumerate(grads) if g)
    jg = jax.jit(jax.grad(lambda *a: jnp.sum(jfn(*a) * ct), argnums=argnums))

    def jcall():
        jax.block_until_ready(jg(*jin))

    def tcall():
        for t in tin:
            t.grad = None
        tfn(*tin).backward(tct)
    return jcall, tcall


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from benchmarks import bench_steps as bench  # its timing and formatting helpers

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    print(f"ops bench: hidden {args.hidden}, ffn {args.ffn}, heads {args.heads}, L {args.length}; "
          f"forward at batch {args.eval_batch}, fwd+bwd at batch {args.batch}; {threads} threads;"
          f" {args.reps} interleaved reps after {args.warmup} warm-up calls")
    parity = {name: max_abs_diff(inputs, jfn, tfn)
              for name, (inputs, jfn, tfn, _) in make_ops(args, args.batch).items()
              if name != "dropout"}  # random masks: the two frameworks draw different ones
    print("same output, max |flaxpals - PyTorch|: "
          + ", ".join(f"{k} {v:.1e}" for k, v in parity.items()))
    print(f"{'op':16} {'mode':8} {'flaxpals ms [min-max]':>26} {'PyTorch ms [min-max]':>26} "
          f"{'ratio':>6}")
    rows = []
    for mode, batch, backward in (("forward", args.eval_batch, False),
                                  ("fwd+bwd", args.batch, True)):
        for name, (inputs, jfn, tfn, constants) in make_ops(args, batch).items():
            if name == "dropout" and backward:
                continue  # the mask is the cost; its backward is a multiply
            jcall, tcall = callables(inputs, jfn, tfn, constants, backward)
            for _ in range(args.warmup):
                jcall()
                tcall()
            jt, tt = [], []
            for r in range(args.reps):
                pair = [(jcall, jt), (tcall, tt)]
                for fn, out in (pair if r % 2 == 0 else pair[::-1]):
                    out.append(bench.timed(fn))
            row = {"op": name, "mode": mode, "batch": batch, "flaxpals": bench.summary(jt),
                   "pytorch": bench.summary(tt)}
            row["ratio"] = row["flaxpals"]["median_s"] / row["pytorch"]["median_s"]
            rows.append(row)
            print(f"{name:16} {mode:8} {bench._ms(row['flaxpals']):>26} "
                  f"{bench._ms(row['pytorch']):>26} {row['ratio']:6.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "parity": parity, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return {"parity": parity, "rows": rows}


if __name__ == "__main__":
    main()
