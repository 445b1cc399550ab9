"""The prepared check of flaxpals on an accelerator: programs, speed against PyTorch, MFU.

    python -m benchmarks.device_check --prepare=.devcheck      # here: what the device lacks
    python -m benchmarks.device_check --tiny --out=check.json  # the same on a CPU, tiny shapes

On a lent GPU (the `device` tool), `.devcheck` carried, in one call:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .devcheck/whl/*.whl \
      && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 -m benchmarks.device_check \
         --assets=.devcheck --out=$OUT/device-check.json

`--prepare` writes what the device machine lacks and the repository does not carry:
the ml-collections wheel, the CS224N files of SST, Quora and STS, and all-MiniLM-L6-v2
with its weights rounded to float16 (45 MB: the float32 file does not fit the 64 MiB
a call carries; the check widens them back to float32 before either side loads them,
so both train the same weights; dev figures may differ from a float32 checkpoint's in
the last digits). Add the folder to .git/info/exclude.

Sections, each written to the JSON as it ends (a later failure keeps the earlier ones):
1. `environment`: versions, devices, the chip's peak bf16 FLOP/s (`PEAK_BF16`).
2. `e2e`: the default 3-task run, `python -m flaxpals.main --config=configs/pal.py` for
   one epoch, cold (fresh token and compilation caches) then warm (the same command
   again), against PyTorch (`experiments.torch_finetune`, once per task, on the same
   device): wall time, programs compiled and compile seconds (by function), steady
   step, dev metrics, and flaxpals' wall time over PyTorch's.
3. `steps`: the bert-base shape with random weights (`model.encoder=bert-base-random`,
   named so in the record), bf16 compute, AdamW train steps at 32 x 128 and 256 x 128:
   step time (median of timed calls), FLOPs per step from XLA's cost analysis of the
   compiled program, and model FLOPs utilisation = FLOPs / step time / peak.
4. `packing`: MiniLM on real dev examples of each task, packed (data.shapes=packed)
   against padded one per row, float32 and bfloat16: the largest difference of their
   outputs; then the SST train step at data.max_length, fixed (32 rows) against
   packed (the rows its plan needs), step times and tokens per step.

`--tiny` runs every section on the CPU at tiny shapes (the tiny random encoder, a few
steps, a tiny random PyTorch BERT): the default suite runs it so that it cannot rot
before a session with a GPU needs it. Figures from a tiny run measure nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks import bench_e2e, host

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("sst", "quora", "sts")
DATA_FILES = ("SHA256SUMS", "ids-sst-train.csv", "ids-sst-dev.csv", "quora-train.csv",
              "quora-dev.csv", "sts-train.csv", "sts-dev.csv")
MINILM_FILES = ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")
# Dense bf16 peak of one chip, FLOP/s, by a substring of jax's device_kind (vendor sheets).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
             "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
             "TPU v6": 918e12}
STEP_SHAPES = ((32, 128), (256, 128))


def peak_flops(kind: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k.lower() in kind.lower()), None)


# ---------------------------------------------------------------- here: --prepare


def prepare(folder: Path) -> None:
    """The assets the device machine lacks (module docstring) into `folder`."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from flaxpals.data import paths
    from flaxpals.model import hf_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    minilm = hf_checkpoint.resolve_checkpoint("minilm")
    out = folder / "minilm"
    out.mkdir(exist_ok=True)
    for name in MINILM_FILES:
        shutil.copy(minilm / name, out / name)
    tensors = load_file(str(minilm / "model.safetensors"))
    save_file({k: v.astype(np.float16) if v.dtype == np.float32 else v
               for k, v in tensors.items()}, str(out / "model.f16.safetensors"))
    data = folder / "data"
    data.mkdir(exist_ok=True)
    for name in DATA_FILES:
        shutil.copy(paths.data_dir() / name, data / name)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "-d", str(folder / "whl"), "ml-collections"],
                   check=True)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"wrote {folder} ({size / 2**20:.1f} MiB); carry it with the call")


def widen(assets: Path, work: Path) -> Path:
    """The carried MiniLM as a float32 checkpoint directory both sides load."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    out = work / "minilm"
    out.mkdir(parents=True, exist_ok=True)
    for name in MINILM_FILES:
        shutil.copy(assets / "minilm" / name, out / name)
    tensors = load_file(str(assets / "minilm" / "model.f16.safetensors"))
    save_file({k: v.astype(np.float32) if v.dtype == np.float16 else v
               for k, v in tensors.items()}, str(out / "model.safetensors"))
    return out


def tiny_torch_encoder(work: Path) -> Path:
    """A random 2-layer BERT with MiniLM's vocabulary, in the Hugging Face layout."""
    import transformers

    from flaxpals.model import bert, hf_checkpoint

    out = work / "tiny-bert"
    config = bert.tiny_config()
    transformers.BertModel(transformers.BertConfig(**{
        k: v for k, v in config.to_dict().items() if k not in ("architectures", "model_type")})
    ).save_pretrained(out)
    minilm = hf_checkpoint.resolve_checkpoint("minilm")
    for name in MINILM_FILES[1:]:
        shutil.copy(minilm / name, out / name)
    return out


# ---------------------------------------------------------------- sections


def environment() -> dict:
    import jax

    out = {"python": sys.version.split()[0], "jax": jax.__version__,
           "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
           "device_kind": jax.devices()[0].device_kind, "cpu": host.cpu()}
    for name in ("flax", "optax", "orbax.checkpoint", "torch", "transformers"):
        try:
            out[name] = __import__(name, fromlist=["_"]).__version__
        except ImportError:
            out[name] = None
    out["peak_bf16_flops"] = peak_flops(out["device_kind"])
    return out


def e2e(args, work: Path, encoder: str | None, data_dir: str | None) -> dict:
    """flaxpals cold and warm, then PyTorch once per task (module docstring)."""
    cache = work / "cache"
    env = {**os.environ, "FLAXPALS_CACHE_DIR": str(cache)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if data_dir:
        env["FLAXPALS_DATA_DIR"] = data_dir
    shutil.rmtree(cache, ignore_errors=True)
    flags = [f"--config.train.num_epochs={args.epochs}", "--config.eval.train_sample=0"]
    if args.tiny:
        config = "--config=configs/pal.py:tiny"
        flags += ["--config.train.steps_per_epoch=8", "--config.data.train_limit=128",
                  "--config.data.eval_limit=64"]
    else:
        config = "--config=configs/pal.py"
    if encoder:
        flags.append(f"--config.model.encoder={encoder}")
    sides, out = [], {}
    for attempt in ("cold", "warm"):
        workdir = work / f"flaxpals-{attempt}"
        cmd = [sys.executable, "-m", "flaxpals.main", config, f"--workdir={workdir}", *flags]
        fig = bench_e2e.timed(cmd, env, work / f"flaxpals-{attempt}.log")
        timings = bench_e2e.read_timings(workdir)
        sides.append(bench_e2e.side(f"flaxpals, {attempt}", [
            (fig, timings, bench_e2e.last_metrics(workdir))]))
        sides[-1]["compile_by_function"] = timings.get("compile_by_function")
        print(json.dumps(sides[-1]), flush=True)
    runs = []
    for task in TASKS:
        workdir = work / f"torch-{task}"
        cmd = [sys.executable, "-m", "experiments.torch_finetune", f"--task={task}",
               f"--workdir={workdir}", f"--epochs={args.epochs}", "--train_sample=0"]
        cmd += [f"--encoder={args.torch_encoder or encoder or 'minilm'}"]
        if args.tiny:
            cmd += ["--train_limit=128", "--eval_limit=64", "--device=cpu"]
        fig = bench_e2e.timed(cmd, env, work / f"torch-{task}.log")
        runs.append((fig, bench_e2e.read_timings(workdir), bench_e2e.last_metrics(workdir)))
    sides.append(bench_e2e.side("PyTorch, 3 models", runs))
    print(json.dumps(sides[-1]), flush=True)
    torch_wall = sides[-1]["wall_s"]
    out["sides"] = sides
    out["wall_over_pytorch"] = {s["side"]: round(s["wall_s"] / torch_wall, 3) for s in sides}
    out["table"] = bench_e2e.table(sides)
    return out


def steps(args, peak: float | None) -> dict:
    """bf16 train steps of the bert-base shape (random weights) and their MFU."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flaxpals import config_lib
    from flaxpals.model import build
    from flaxpals.train import optim, parallel
    from flaxpals.train.programs import Programs
    from flaxpals.train.steps import Steps, TrainState, task_indices

    config = config_lib.load_file(ROOT / "configs" / "baseline.py", "method=sequential")
    config.tasks = ("sst",)
    config.model.encoder = "tiny" if args.tiny else "bert-base-random"
    config.model.dtype = "bfloat16"
    model, params, _, tasks = build.build_model(config)
    tx = optim.make_optimizer(config.train, params, 1000)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                       jax.random.key_data(jax.random.key(1)))
    mesh = parallel.make_mesh()
    sharding = parallel.state_shardings(state, mesh)
    state = parallel.put(state, sharding)
    programs = Programs(Steps(model, tx), mesh, sharding, fixed_shapes=True)
    rng = np.random.default_rng(0)
    sst = task_indices(("sst",), mesh)["sst"]
    out = {"encoder": config.model.encoder, "weights": "random", "dtype": "bfloat16",
           "params": int(sum(x.size for x in jax.tree.leaves(params))), "shapes": []}
    for batch_size, length in ((8, 16),) if args.tiny else STEP_SHAPES:
        batch = parallel.global_batch({
            "input_ids": rng.integers(1000, 20000, (batch_size, length)).astype(np.int32),
            "attention_mask": np.ones((batch_size, length), np.int32),
            "token_type_ids": np.zeros((batch_size, length), np.int32),
            "labels": rng.integers(0, 5, batch_size).astype(np.float32),
            "mask": np.ones(batch_size, np.float32)}, mesh)
        t0 = time.perf_counter()
        compiled = programs.lower_train(state, batch, "sst").compile()
        compile_s = time.perf_counter() - t0
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        flops = float(cost.get("flops", 0.0)) if cost else 0.0
        times = []
        for r in range(args.reps + 2):  # two warm-up calls
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch, sst)
            jax.block_until_ready((state, metrics))
            if r >= 2:
                times.append(time.perf_counter() - t0)
        step = statistics.median(times)
        row = {"batch": batch_size, "length": length, "compile_s": round(compile_s, 2),
               "step_s": round(step, 5), "step_min_s": round(min(times), 5),
               "flops_per_step": flops, "achieved_flops": flops / step,
               "mfu": None if not peak or not flops else round(flops / step / peak, 4)}
        out["shapes"].append(row)
        print(json.dumps(row), flush=True)
    return out


def packing(args, encoder: str | None, data_dir: str | None) -> dict:
    """Packed against padded outputs on the device, and the train step's time of each."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flaxpals import config_lib
    from flaxpals.data import batching, input_pipeline
    from flaxpals.model import build
    from flaxpals.train import optim, parallel
    from flaxpals.train.programs import Programs
    from flaxpals.train.steps import MODEL_KEYS, Steps, TrainState, device_batch, task_indices

    if data_dir:
        os.environ["FLAXPALS_DATA_DIR"] = data_dir
    out = {"outputs": {}}
    for dtype in ("float32", "bfloat16"):
        config = config_lib.load_file(ROOT / "configs" / "pal.py", "tiny" if args.tiny else "")
        config.model.dtype = dtype
        if encoder:
            config.model.encoder = encoder
        model, params, tokenizer, tasks = build.build_model(config)
        data = build.load_data(config, tasks, tokenizer, splits=("dev",))
        length = config.data.max_length
        for t in tasks:
            split = data[t.name]["dev"]
            index = np.arange(32)
            columns = input_pipeline.sentence_lengths(split, length)
            rows = batching.pack(np.concatenate([c[index] for c in columns]), length)[2]
            packed = input_pipeline.packed_batch(split, index,
                                                 input_pipeline.Packing(length, rows, 1))
            plain = input_pipeline.padded_batch(split, index, length)
            run = jax.jit(lambda p, b, t=t.name, m=model: m.apply({"params": p}, b, t))
            got, want = (np.asarray(run(params, {k: v for k, v in b.items() if k in MODEL_KEYS}),
                                    np.float32) for b in (packed, plain))
            scale = float(np.abs(want).max())
            out["outputs"][f"{t.name}/{dtype}"] = {
                "rows": rows, "max_abs_diff": float(np.abs(got - want).max()),
                "max_abs_output": scale}
            print(f"packing {t.name} {dtype}: {out['outputs'][f'{t.name}/{dtype}']}", flush=True)
    # The SST step, fixed against packed, on the run's own plan (compute dtype: auto).
    config = config_lib.load_file(ROOT / "configs" / "baseline.py", "tiny" if args.tiny else "")
    config.tasks = ("sst",)
    if encoder:
        config.model.encoder = encoder
    model, params, tokenizer, tasks = build.build_model(config)
    split = build.load_data(config, tasks, tokenizer, splits=("train",))["sst"]["train"]
    length, batch_size = config.data.max_length, config.train.batch_size
    plan = batching.TrainPlan(split.lengths(), (length,), batch_size, seed=0)
    groups = jax.local_device_count()  # a block of rows per device, as the trainer packs
    rows = input_pipeline.packed_rows(split, plan, 1, length, groups)
    mesh = parallel.make_mesh()
    tx = optim.make_optimizer(config.train, params, 1000)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                       jax.random.key_data(jax.random.key(1)))
    sharding = parallel.state_shardings(state, mesh)
    state = parallel.put(state, sharding)
    programs = Programs(Steps(model, tx), mesh, sharding, fixed_shapes=True)
    sst = task_indices(("sst",), mesh)["sst"]
    index = plan.batch(0)[0]
    batches = {
        "fixed": input_pipeline.padded_batch(split, index, length),
        "packed": input_pipeline.packed_batch(split, index,
                                                input_pipeline.Packing(length, rows, groups))}
    out["steps"] = {"dtype": model.options.dtype, "length": length, "batch": batch_size}
    for name, batch in batches.items():
        batch = parallel.global_batch(device_batch(batch), mesh)
        compiled = programs.lower_train(state, batch, "sst").compile()
        times = []
        for r in range(args.reps + 2):
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch, sst)
            jax.block_until_ready((state, metrics))
            if r >= 2:
                times.append(time.perf_counter() - t0)
        out["steps"][name] = {"rows": int(batch["input_ids"].shape[0]),
                              "tokens": int(np.prod(batch["input_ids"].shape)),
                              "step_s": round(statistics.median(times), 5)}
        print(f"packing step {name}: {out['steps'][name]}", flush=True)
    return out


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prepare", default="", help="write the device machine's assets here; exit")
    p.add_argument("--assets", default="", help="the folder --prepare wrote (carried)")
    p.add_argument("--tiny", action="store_true", help="CPU, tiny shapes: the script's test")
    p.add_argument("--out", default="device-check.json")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--reps", type=int, default=10, help="timed train steps per shape")
    p.add_argument("--sections", default="e2e,steps,packing")
    p.add_argument("--torch_encoder", default="", help="PyTorch's encoder (default: ours)")
    args = p.parse_args(argv)
    if args.prepare:
        prepare(Path(args.prepare))
        return 0
    os.chdir(ROOT)  # the subprocesses run `-m flaxpals.main` and `-m experiments...`
    work = Path(tempfile.mkdtemp(prefix="device-check-"))
    encoder = data_dir = None
    if args.assets:
        encoder = str(widen(Path(args.assets), work))
        data_dir = str(Path(args.assets).resolve() / "data")
    if args.tiny and not args.torch_encoder:
        args.torch_encoder = str(tiny_torch_encoder(work))
    report = {"command": " ".join([sys.executable, "-m", "benchmarks.device_check",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "tiny": args.tiny, "environment": environment()}
    out = Path(args.out)

    def write():
        out.write_text(json.dumps(report, indent=1, default=str) + "\n")

    write()
    peak = report["environment"]["peak_bf16_flops"]
    sections = {"e2e": lambda: e2e(args, work, encoder, data_dir),
                "steps": lambda: steps(args, peak),
                "packing": lambda: packing(args, encoder, data_dir)}
    failed = False
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            report[name] = sections[name]()
        except (Exception, SystemExit) as e:  # noqa: BLE001 -- recorded; the next section runs
            failed = True
            report[name] = {"error": f"{type(e).__name__}: {e}",
                            "traceback": traceback.format_exc()[-3000:]}
            print(f"{name} failed: {type(e).__name__}: {e}", flush=True)
        report[name]["seconds"] = round(time.perf_counter() - t0, 1)
        write()
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
