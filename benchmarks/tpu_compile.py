"""A TPU pod without a pod: the run's programs compiled ahead of time for a pod topology.

    pip install --target /tmp/libtpu 'libtpu==0.0.42.*'     # jax[tpu]'s pin for jax 0.10.2
    PYTHONPATH=/tmp/libtpu python -m benchmarks.tpu_compile --out=docs/bench/tpu-compile.json
    PYTHONPATH=/tmp/libtpu python -m benchmarks.tpu_compile --topologies=v5e:4x4 \
        --configs=pal.py:bert_base --method=additive

As MaxText's `train_compile.py` does: `jax.experimental.topologies` describes the pod's
chips (no TPU needed, only libtpu's compiler), the trainer's programs are built as a run
on that pod builds them (`programs.Programs`, the mesh over every chip, batches split
over 'data', the shape policy and compute dtype a TPU gets: `fixed`, bfloat16), lowered
from abstract arguments and compiled. Per program: compile seconds, FLOPs per step
(XLA's cost analysis), and HBM per chip from the compiled memory analysis (arguments,
outputs, temporaries; aliased, i.e. donated, bytes counted once). Per run: how many
programs it compiles (one train and one predict program per batch structure).

The encoder's weights are not needed, only its shape: `bert_base` compiles the
bert-base-uncased shape (`model.encoder=bert-base-random`). Without libtpu, or where the
pinned jax and the libtpu cannot describe a topology, the record says what failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bytes(compiled) -> dict | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 -- a backend without the analysis
        return None
    if m is None:
        return None
    fields = {k: int(getattr(m, f"{k}_size_in_bytes", 0)) for k in
              ("argument", "output", "alias", "temp", "generated_code")}
    fields["hbm_per_chip"] = (fields["argument"] + fields["output"] - fields["alias"]
                              + fields["temp"] + fields["generated_code"])
    return fields


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


# jax topology name -> (chip config, chips per host)
TOPOLOGIES = {"v4:2x2x2": ("megacore", (2, 2, 1)), "v5e:4x4": ("default", (2, 2, 1))}


def compile_run(topology_name: str, config_arg: str, method: str) -> dict:
    """Every program a run of `config_arg` compiles on the pod `topology_name`."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    from flaxpals import config_lib
    from flaxpals.model import build
    from flaxpals.mtl import combiners, task_params
    from flaxpals.train import optim, parallel
    from flaxpals.train.programs import Programs, batch_spec
    from flaxpals.train.steps import Steps, TrainState

    # As MaxText's accelerator_to_spec_map: v4 is one device per chip ("megacore"),
    # two by two chips a host.
    chip_config, per_host = TOPOLOGIES.get(topology_name, ("default", (2, 2, 1)))
    topology = topologies.get_topology_desc(
        topology_name=topology_name, platform="tpu", chip_config_name=chip_config,
        chips_per_host_bounds=per_host, num_slices=1, wrap=(False, False, False))
    devices = list(topology.devices)
    name, _, arg = config_arg.partition(":")
    flags = config_lib.parse_arg(arg)
    bert_base = bool(flags.pop("bert_base", False))
    config = config_lib.load_file(ROOT / "configs" / name,
                                  ",".join([f"method={method}", *flags]))
    if bert_base:  # its shape, without its weights (which this machine cannot download)
        config.model.encoder = "bert-base-random"
        config.eval.batch_size = 256
    # What a run on the pod resolves: the shape policy and compute dtype of a TPU.
    config.data.shapes = config_lib.shape_policy(config.data, "tpu")
    config.model.dtype = config_lib.compute_dtype(config.model, "tpu")
    model, shapes, _, tasks = build.abstract_model(config)
    names = tuple(t.name for t in tasks)
    combiner = combiners.from_config(config.train, task_params.shared_param_mask(shapes, names),
                                     len(names), config.seed)
    tx = optim.make_optimizer(config.train, shapes, 1000, combiner)
    state = jax.eval_shape(lambda p: TrainState(
        jnp.zeros((), jnp.int32), p, tx.init(p), jax.random.key_data(jax.random.key(0))),
        shapes)
    mesh = parallel.make_mesh(devices)
    sharding = parallel.state_shardings(state, mesh, config.parallel.fsdp)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         state, sharding)
    for key, size in (("train.batch_size", config.train.batch_size),
                      ("eval.batch_size", config.eval.batch_size)):
        parallel.check_divisible(size, len(devices), 1, key)
    programs = Programs(Steps(model, tx, combiner is not None), mesh, sharding,
                        fixed_shapes=config_lib.shape_policy(config.data, "tpu") != "buckets")
    (length,) = config_lib.padded_lengths(config.data, "tpu")
    data = parallel.batch_sharding(mesh)
    out = {"topology": topology_name, "chips": len(devices),
           "device_kind": devices[0].device_kind, "config": config_arg, "method": method,
           "encoder": config.model.encoder, "dtype": config.model.dtype,
           "shapes": config.data.shapes, "length": length,
           "train_batch": config.train.batch_size, "eval_batch": config.eval.batch_size,
           "params": int(sum(x.size for x in jax.tree.leaves(shapes))), "programs": []}

    def compile_one(kind: str, structure: str, lower) -> None:
        t0 = time.perf_counter()
        lowered = lower()
        t1 = time.perf_counter()
        compiled = lowered.compile()
        row = {"program": kind, "batch": structure, "lower_s": round(t1 - t0, 2),
               "compile_s": round(time.perf_counter() - t1, 2),
               "flops_per_step": _flops(compiled), "memory": _bytes(compiled)}
        out["programs"].append(row)
        print(json.dumps(row), flush=True)

    # One program per batch structure (a sentence; a bi-encoded pair) and kind.
    first = {}
    for t in model.tasks:
        first.setdefault(programs.structure(t.name), t)
    if config_lib.task_schedule(config.train) == "additive":
        batches = {t.name: batch_spec(t, config.model.pair_encoding, config.train.batch_size,
                                      length, data, labels=True) for t in model.tasks}
        compile_one("additive_step", "every task", lambda: programs.lower_additive(state,
                                                                                   batches))
    else:
        for structure, t in first.items():
            batch = batch_spec(t, config.model.pair_encoding, config.train.batch_size, length,
                               data, labels=True)
            compile_one("train_step", structure,
                        lambda b=batch, t=t: programs.lower_train(state, b, t.name))
    for structure, t in first.items():
        batch = batch_spec(t, config.model.pair_encoding, config.eval.batch_size, length, data)
        compile_one("predict_step", structure,
                    lambda b=batch, t=t: programs.lower_predict(state.params, b, t.name))
    out["programs_per_run"] = len(out["programs"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--topologies", default="v4:2x2x2,v5e:4x4",
                   help="jax topology names: v4:2x2x2 is v4-16 (8 chips), v5e:4x4 v5e-16")
    p.add_argument("--configs", default="pal.py,pal.py:bert_base")
    p.add_argument("--method", default="annealed")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no pod: quiets libtpu
    report = {"command": " ".join([sys.executable, "-m", "benchmarks.tpu_compile",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "runs": []}
    try:
        import jax

        report["jax"] = jax.__version__
        import libtpu  # noqa: F401 -- the TPU compiler this needs

        report["libtpu"] = getattr(libtpu, "__version__", "?")
    except ImportError as e:
        report["error"] = f"libtpu is not installed ({e}): see this module's docstring"
    failed = "error" in report
    for topology in ([] if failed else args.topologies.split(",")):
        for config in args.configs.split(","):
            try:
                report["runs"].append(compile_run(topology, config, args.method))
            except Exception as e:  # noqa: BLE001 -- recorded: what failed, and where
                failed = True
                report["runs"].append({"topology": topology, "config": config,
                                       "error": f"{type(e).__name__}: {str(e)[:500]}",
                                       "traceback": traceback.format_exc()[-2000:]})
                print(f"{topology} {config}: {type(e).__name__}: {e}", flush=True)
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text if failed else f"{len(report['runs'])} run(s) compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
