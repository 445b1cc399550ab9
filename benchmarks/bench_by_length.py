"""Step time of a symbolic-length program against the per-length program, same shape.

    python -m benchmarks.bench_by_length                      # SST, lengths 32 and 48
    python -m benchmarks.bench_by_length --lengths=24,64 --reps=12

`flaxpals.train.by_length.ByLength` runs a task's step from its second length on as a
program lowered from one symbolic-length export (`jax.export`), where the
per-length path traces the step again at that length. Both should compile to
programs as fast. This builds the trainer's MiniLM SST train step
(`configs/baseline.py`, batch 32), takes the first length through the plain
path (as a run does), then at each length compiles both programs and times them
interleaved on the same state: median [min-max] ms and the ratio exported /
per-length. Random token ids, full attention masks. Ratios depend on the CPU:
the output records its flags.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.host import cpu
from flaxpals import config_lib
from flaxpals.model import build
from flaxpals.model.multitask import dummy_batch
from flaxpals.train import optim, parallel
from flaxpals.train.steps import Steps, TrainState, task_indices


def _batch(task, rows: int, length: int, seed: int, mesh) -> dict:
    rng = np.random.default_rng(seed)
    b = {k: np.asarray(v) for k, v in dummy_batch(task, "cross", rows, length).items()}
    b["input_ids"] = rng.integers(1000, 20000, (rows, length)).astype(np.int32)
    b["attention_mask"] = np.ones((rows, length), np.int32)
    b["labels"] = rng.integers(0, 5, rows).astype(np.float32)
    b["mask"] = np.ones(rows, np.float32)
    return parallel.global_batch(b, mesh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32,48", help="lengths to compare (comma list)")
    parser.add_argument("--first", type=int, default=16, help="the run's first length")
    parser.add_argument("--reps", type=int, default=8, help="timed calls of each program")
    args = parser.parse_args()
    print(f"CPU: {cpu()}")

    config = config_lib.load_file("configs/baseline.py", "method=sequential")
    config.tasks = ("sst",)
    model, params, _, tasks = build.build_model(config)
    tx = optim.make_optimizer(config.train, params, 1000)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                       jax.random.key_data(jax.random.key(1)))
    mesh = parallel.make_mesh()
    sharding = parallel.state_shardings(state, mesh, False)
    state = parallel.put(state, sharding)
    train, _, _ = Steps(model, tx).jitted(mesh, sharding, symbolic_length=True)
    rows = config.train.batch_size
    sst = task_indices(("sst",), mesh)["sst"]
    state, _ = train(state, _batch(tasks[0], rows, args.first, 0, mesh), sst)

    for n in (int(x) for x in args.lengths.split(",")):
        batch = _batch(tasks[0], rows, n, n, mesh)
        exported = train.program(state, batch, sst)  # what a run calls at this length
        assert exported is not train.jitted, "the SST step was not exported: nothing compared"

        times = {"exported": [], "per-length": []}
        for r in range(args.reps + 1):  # the first call of each compiles: not timed
            for name, fn in (("exported", exported), ("per-length", train.jitted)):
                t0 = time.perf_counter()
                state, _ = fn(state, batch, sst)
                jax.block_until_ready(state)
                if r:
                    times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        cells = ", ".join(f"{k} {med[k] * 1e3:.0f} ms [{min(v) * 1e3:.0f}-{max(v) * 1e3:.0f}]"
                          for k, v in times.items())
        print(f"L{n}: {cells}; ratio {med['exported'] / med['per-length']:.3f}", flush=True)


if __name__ == "__main__":
    main()
