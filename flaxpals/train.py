"""Training and evaluation: `train_and_evaluate(config, workdir)`, read top to bottom.

1. Load the encoder and tokenizer; build tasks, data, model, params.
2. Build the sampler, the optimiser and the jitted steps; resume from the
   latest checkpoint in the workdir if there is one.
3. Loop: the sampler picks the task(s) of each step; a NaN or Inf loss stops
   the run (the last checkpoint stays the last good one); every N steps and at
   each epoch's end a checkpoint; at each epoch's end an evaluation on dev and
   on a fixed train sample, written to TensorBoard and metrics.jsonl, and the
   best checkpoint by `config.eval.best_metric`.

`evaluate_checkpoint` and `predict` restore a run for `--mode=eval|predict`.

Every device of every process takes part (parallel.py): the state lives on a
('data',) mesh, each process reads its own shard of every task at
batch_size / process_count rows, and the rows of all processes form one global
batch. Only process 0 writes config, metrics, best.json and prediction files;
all processes write and restore the orbax checkpoints. The workdir may be a
local path or, for a multi-host job, shared storage such as gs://bucket/run.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from clu import metric_writers
from etils import epath
from tqdm import tqdm

from flaxpals import bert, config_lib, input_pipeline, optim, parallel, task_params, weights
from flaxpals import metrics as metrics_lib
from flaxpals import sampler as sampler_lib
from flaxpals import tasks as tasks_lib
from flaxpals.checkpointing import Checkpoints
from flaxpals.models import ModelOptions, MultiTaskModel, TaskSpec, dummy_batch
from flaxpals.steps import MODEL_KEYS, Steps, TrainState, device_batch
from flaxpals.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Fault injection for the resume test: SIGKILL this process after that step.
KILL_AFTER_STEP_ENV = "FLAXPALS_KILL_AFTER_STEP"


class TrainingError(RuntimeError):
    """A run that cannot go on (NaN loss, ...)."""


# ---------------------------------------------------------------- setup


def load_encoder(model_cfg) -> tuple[bert.BertConfig, dict | None, Tokenizer]:
    """(encoder config, pretrained params or None for random init, tokenizer)."""
    if model_cfg.checkpoint == "tiny":
        config, params = bert.tiny_config(), None
        vocab_dir = weights.resolve_checkpoint("minilm")  # a real vocabulary for the tokens
    else:
        config, params, vocab_dir = weights.load_pretrained(model_cfg.checkpoint)
    if model_cfg.hidden_dropout >= 0:
        config = config.replace(hidden_dropout_prob=model_cfg.hidden_dropout,
                                attention_probs_dropout_prob=model_cfg.hidden_dropout)
    return config, params, Tokenizer.from_checkpoint(vocab_dir)


def build_tasks(config) -> list[tasks_lib.Task]:
    out = []
    for name in config.tasks:
        if name in config.extra_tasks:
            out.append(tasks_lib.task_from_config({"name": name, **config.extra_tasks[name]}))
        else:
            out.append(tasks_lib.get_task(name))
    return out


def model_options(model_cfg) -> ModelOptions:
    return ModelOptions(
        adapter=model_cfg.adapter,
        adapter_size=None if model_cfg.adapter_size < 0 else model_cfg.adapter_size,
        adapter_heads=model_cfg.adapter_heads, placement=model_cfg.placement,
        zero_init_decoder=model_cfg.zero_init_decoder, pooling=model_cfg.pooling,
        pair_encoding=model_cfg.pair_encoding, similarity=model_cfg.similarity,
        head_dropout=model_cfg.head_dropout, dtype=model_cfg.dtype)


def build_model(config) -> tuple[MultiTaskModel, dict, Tokenizer, list[tasks_lib.Task]]:
    """The model and its initial params (pretrained encoder, random adapters and heads)."""
    bert_config, pretrained, tokenizer = load_encoder(config.model)
    tasks = build_tasks(config)
    specs = tuple(TaskSpec(t.name, t.kind, t.num_labels) for t in tasks)
    model = MultiTaskModel(bert_config, specs, model_options(config.model))
    dummies = {s.name: dummy_batch(s, config.model.pair_encoding) for s in specs}
    params = jax.jit(lambda key: model.init(key, dummies, method=MultiTaskModel.init_all))(
        jax.random.key(config.seed))["params"]
    params = jax.device_get(params)
    if pretrained is not None:
        params = {**params, "encoder": pretrained}
    return model, params, tokenizer, tasks


def load_data(config, tasks, tokenizer, splits=("train", "dev"),
              limits: bool = True) -> dict[str, dict[str, Any]]:
    """task -> split -> Split; `limits` applies data.train_limit / data.eval_limit."""
    data = {}
    for task in tasks:
        data[task.name] = {}
        for split in splits:
            try:
                s = input_pipeline.load_split(
                    task, split, tokenizer, data_dir=config.data.data_dir or None,
                    cache_dir=config.data.cache_dir or None, strict=config.data.strict,
                    max_length=config.data.max_length, pair_encoding=config.model.pair_encoding)
            except FileNotFoundError as e:
                if split != "test":
                    raise
                print(f"{task.name}: no test split ({e}); skipping it")
                continue
            limit = config.data.train_limit if split == "train" else config.data.eval_limit
            data[task.name][split] = s.take(limit) if limits and limit > 0 else s
    return data


# ---------------------------------------------------------------- evaluation


class EvalSets:
    """Evaluation batches, built once per (task, split, limit) and reused every epoch.

    An eval pass is deterministic, so its padded batches need not go through the
    input pipeline again each epoch. Each process holds its own part of every
    split (eval.batch_size / process_count rows per batch).
    """

    def __init__(self, data, config, mesh):
        self._data, self._config, self._mesh, self._cache = data, config, mesh, {}
        self._batch_size = parallel.process_batch_size(config.eval.batch_size, mesh,
                                                       "eval.batch_size")

    def get(self, task: str, split: str, limit: int = -1):
        """(the split, cut to `limit` rows, and this process's batches of it), or None.

        The train split's `limit` rows are a seeded random sample (eval.train_sample_from),
        other splits' the first.
        """
        key = (task, split, limit)
        if key not in self._cache:
            s = self._data[task].get(split)
            if s is None:
                return None
            if limit > 0 and split == "train" and self._config.eval.train_sample_from == "random":
                s = s.sample(limit, self._config.seed)  # the same rows every epoch
            elif limit > 0:
                s = s.take(limit)
            self._cache[key] = s, list(input_pipeline.eval_batches(
                s, self._batch_size, buckets=tuple(self._config.data.buckets),
                process_index=jax.process_index(), process_count=jax.process_count()))
        return self._cache[key]

    def to_device(self, batch: dict) -> dict[str, jax.Array]:
        """The model inputs and row indices of a batch as global arrays."""
        return parallel.global_batch({k: batch[k] for k in (*MODEL_KEYS, "index")
                                      if k in batch}, self._mesh)


def evaluate(predict_step, params, eval_sets: EvalSets, tasks, split: str,
             limit: int = -1) -> tuple[dict[str, float], dict[str, dict]]:
    """Metrics of every task on a split, and the predictions by example id.

    Predictions and the split rows they belong to (`index`, -1 on padding) come
    back from all processes together, so every process scores the whole split.
    """
    scores, preds = {}, {}
    for task in tasks:
        found = eval_sets.get(task.name, split, limit)
        if found is None:
            continue
        s, batches = found
        out, index = [], []
        for batch in batches:
            arrays = eval_sets.to_device(batch)
            rows = arrays.pop("index")
            out.append(parallel.to_host(predict_step(params, arrays, task.name)))
            index.append(parallel.to_host(rows))
        index, out = np.concatenate(index), np.concatenate(out)
        real = index >= 0
        rows, out = index[real], out[real]
        preds[task.name] = dict(zip(s.ids[rows], out.tolist(), strict=True))
        if s.labels is not None:
            scores[task.name] = metrics_lib.task_metric(task.metric, out, s.labels[rows])
    return scores, preds


def _eval_record(predict_step, params, eval_sets, tasks, config) -> dict[str, float]:
    record = {}
    for split, limit, prefix in (("dev", -1, "dev"), ("train", config.eval.train_sample, "train")):
        scores, _ = evaluate(predict_step, params, eval_sets, tasks, split, limit)
        record.update({f"{prefix}/{t}": v for t, v in scores.items()})
        metric_of = {t.name: t.metric for t in tasks}
        record.update({f"{prefix}/{k}": v
                       for k, v in metrics_lib.summary(scores, metric_of).items()})
    return record


# ---------------------------------------------------------------- training


def _host0() -> bool:
    return jax.process_index() == 0


def _write_json(path: epath.Path, obj) -> None:
    if _host0():
        path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def _logged_steps(workdir: epath.Path) -> set[int]:
    """Steps that already have a line in the workdir's metrics.jsonl."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return set()
    return {json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()}


def train_and_evaluate(config, workdir: str | os.PathLike) -> dict[str, float]:
    """Trains per `config`, writing checkpoints, metrics and logs under `workdir`."""
    config_lib.validate(config)
    mesh = parallel.make_mesh()
    batch_size = parallel.process_batch_size(config.train.batch_size, mesh, "train.batch_size")
    parallel.process_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _write_json(workdir / "config.json", config.to_dict())
    writer = metric_writers.create_default_writer(str(workdir / "tensorboard"),
                                                  just_logging=not _host0())

    model, params, tokenizer, tasks = build_model(config)
    names = tuple(t.name for t in tasks)
    accounting = task_params.param_accounting(params, names)
    _write_json(workdir / "params.json", accounting)
    print(task_params.format_accounting(accounting))

    data = load_data(config, tasks, tokenizer)
    eval_sets = EvalSets(data, config, mesh)
    processes = jax.process_count()
    sizes = {}
    for t in tasks:
        n = input_pipeline.batches_per_epoch(data[t.name]["train"], batch_size,
                                             process_count=processes)
        if n == 0:
            raise ValueError(f"task {t.name}: {len(data[t.name]['train'])} training examples "
                             f"make no full batch of train.batch_size={config.train.batch_size}"
                             f" ({processes} process(es))")
        sizes[t.name] = n
    sampler = sampler_lib.TaskSampler(
        config.train.method, sizes, num_epochs=config.train.num_epochs,
        steps_per_epoch=None if config.train.steps_per_epoch < 0 else config.train.steps_per_epoch,
        temperature=config.train.temperature, seed=config.seed)

    from flaxpals import combiners

    # None for the plain sum: the additive step sums the gradients itself.
    combiner = combiners.from_config(config.train, task_params.shared_param_mask(params, names),
                                     len(names), config.seed)
    tx = optim.make_optimizer(config.train, params, sampler.total_steps, combiner)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=tx.init(params),
                       rng=jax.random.key_data(jax.random.key(config.seed + 1)))
    state_sharding = parallel.state_shardings(state, mesh, config.parallel.fsdp)
    state = parallel.put(state, state_sharding)
    print(parallel.describe(state, state_sharding, mesh))
    steps = Steps(model, tx, config.train.combiner, config.train.loss_weighting)
    train_step, additive_step, predict_step = steps.jitted(mesh, state_sharding)

    ckpts = Checkpoints(workdir, config.checkpoint.keep)
    restored = ckpts.restore_latest(state)
    if restored is not None:
        step0, state, sampler_state = restored
        sampler.load_state_dict(sampler_state)
        print(f"resumed from checkpoint step {step0} (epoch {sampler.epoch})")
    iters = {t: input_pipeline.train_batches(
        data[t]["train"], batch_size, seed=config.seed + i, buckets=tuple(config.data.buckets),
        process_index=jax.process_index(), process_count=processes,
        start_batch=sampler.positions[t]) for i, t in enumerate(names)}

    kill_after = int(os.environ.get(KILL_AFTER_STEP_ENV, "-1"))
    best = ckpts.best_score()
    history = []

    def finish_epoch(epoch: int, step: int, epoch_losses: dict[str, list[float]]) -> None:
        """Evaluates, writes the epoch's metrics line, and keeps the best checkpoint."""
        nonlocal best
        record = {"epoch": epoch, "step": step,
                  **{k: float(np.mean(v)) for k, v in epoch_losses.items()},
                  **_eval_record(predict_step, state.params, eval_sets, tasks, config)}
        history.append(record)
        writer.write_scalars(step, {k: v for k, v in record.items() if "/" in k})
        if _host0():
            with (workdir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
        tqdm.write(f"epoch {epoch}: " + "  ".join(
            f"{k} {v:.4f}" for k, v in record.items() if k.startswith("dev/")))
        score = record.get(config.eval.best_metric)
        if score is None:
            raise ValueError(f"config.eval.best_metric={config.eval.best_metric!r} is not "
                             f"among the eval metrics {sorted(record)}")
        if best is None or score > best:
            best = score
            ckpts.save_best(step, state, sampler.state_dict(), score, config.eval.best_metric)

    # A run killed between an epoch's last checkpoint and its metrics line
    # resumes exactly at that epoch's end: evaluate it now so no epoch goes
    # missing (its mean train losses died with the process and are not logged).
    at_epoch_end = sampler.step > 0 and sampler.step % sampler.steps_per_epoch == 0
    if at_epoch_end and parallel.host0_decides(sampler.step not in _logged_steps(workdir)):
        print(f"epoch {sampler.step // sampler.steps_per_epoch} ended before its evaluation "
              "was written: evaluating it now")
        finish_epoch(sampler.step // sampler.steps_per_epoch, sampler.step, {})

    bar = tqdm(total=sampler.total_steps, initial=sampler.step, desc="train", unit="step",
               disable=not _host0(), dynamic_ncols=True)
    window_start, window_steps = time.perf_counter(), 0
    epoch_losses: dict[str, list[float]] = {}
    while not sampler.done:
        epoch = sampler.epoch
        chosen = sampler.next()
        batches = {t: parallel.global_batch(device_batch(next(iters[t])), mesh) for t in chosen}
        if config.train.method == "additive":
            state, step_metrics = additive_step(state, batches)
        else:
            (task,) = chosen
            state, step_metrics = train_step(state, batches[task], task)
        step = sampler.step
        step_metrics = jax.device_get(step_metrics)
        losses = {k: float(v) for k, v in step_metrics.items() if k.startswith("loss/")}
        bad = [k for k, v in losses.items() if not np.isfinite(v)]
        if bad:
            ckpts.wait()
            raise TrainingError(
                f"non-finite loss at step {step} (epoch {epoch}) for task(s) "
                f"{', '.join(k.split('/', 1)[1] for k in bad)}: {losses}; the newest checkpoint "
                f"in {workdir / 'checkpoints'} (step {ckpts.latest.latest_step()}) is the last "
                "good state")
        for k, v in losses.items():
            epoch_losses.setdefault(k, []).append(v)
        bar.update(1)
        window_steps += 1
        bar.set_postfix({k.split("/", 1)[1]: f"{v:.3f}" for k, v in losses.items()}, refresh=False)
        if step % config.log_every_steps == 0:
            rate = window_steps / (time.perf_counter() - window_start)
            writer.write_scalars(step, {**losses, "grad_norm": float(step_metrics["grad_norm"]),
                                        "steps_per_second": rate})
            window_start, window_steps = time.perf_counter(), 0
        epoch_end = sampler.done or sampler.epoch != epoch
        if step % config.checkpoint.every_steps == 0 or epoch_end:
            ckpts.save(step, state, sampler.state_dict(), force=epoch_end)
        if step == kill_after:
            ckpts.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        if epoch_end:
            finish_epoch(epoch, step, epoch_losses)
            epoch_losses = {}
    bar.close()
    ckpts.wait()
    ckpts.close()
    writer.flush()
    return history[-1] if history else {}


# ---------------------------------------------------------------- eval and predict

# CS224N prediction files: task -> (file prefix, header column). The spelling
# "Predicted_Similiarity" is the starter code's, kept so graders read our files.
PREDICTION_FILES = {"sst": ("sst", "Predicted_Sentiment"),
                    "quora": ("para", "Predicted_Is_Paraphrase"),
                    "sts": ("sts", "Predicted_Similiarity"),
                    "cfimdb": ("cfimdb", "Predicted_Sentiment")}


def restore_for_inference(config, workdir, step: int | None = None):
    """(model, params, tokenizer, tasks, step, mesh, predict_step) of the best checkpoint,
    or of `step` among the latest; params on the mesh, as in training."""
    config_lib.validate(config)
    mesh = parallel.make_mesh()
    parallel.process_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    model, params, tokenizer, tasks = build_model(config)
    sharding = parallel.state_shardings(params, mesh, config.parallel.fsdp)
    ckpts = Checkpoints(workdir, config.checkpoint.keep)
    step, params = ckpts.restore_params(parallel.put(params, sharding),
                                        "best" if step is None else "latest", step)
    ckpts.close()
    predict_step = Steps(model, None).jitted_predict(mesh, sharding)
    return model, params, tokenizer, tasks, step, mesh, predict_step


def evaluate_checkpoint(config, workdir, step: int | None = None) -> dict[str, float]:
    """`--mode=eval`: the best checkpoint's (or a step's) record as training writes it each
    epoch: dev metrics and the train sample's (eval.train_sample), printed and written."""
    _, params, tokenizer, tasks, step, mesh, predict_step = restore_for_inference(
        config, workdir, step)
    data = load_data(config, tasks, tokenizer, splits=("train", "dev"))
    record = {"step": step, **_eval_record(predict_step, params, EvalSets(data, config, mesh),
                                           tasks, config)}
    _write_json(epath.Path(workdir) / f"eval-{step}.json", record)
    print(json.dumps(record, indent=2))
    return record


def predict(config, workdir, step: int | None = None) -> list[epath.Path]:
    """`--mode=predict`: CS224N prediction files for dev and test in <workdir>/predictions."""
    _, params, tokenizer, tasks, step, mesh, predict_step = restore_for_inference(
        config, workdir, step)
    data = load_data(config, tasks, tokenizer, splits=("dev", "test"), limits=False)
    out_dir = epath.Path(workdir) / "predictions"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    eval_sets = EvalSets(data, config, mesh)
    for split in ("dev", "test"):
        _, preds = evaluate(predict_step, params, eval_sets, tasks, split)
        for task in tasks:
            if task.name not in preds:
                print(f"{task.name}: no {split} file; no predictions written")
                continue
            prefix, column = PREDICTION_FILES.get(task.name, (task.name, "Predicted"))
            path = out_dir / f"{prefix}-{split}-output.csv"
            if _host0():
                with path.open("w") as f:
                    f.write(f"id \t {column} \n")
                    for example_id, p in preds[task.name].items():
                        f.write(f"{example_id} , {p} \n")
            written.append(path)
            print(f"wrote {path} ({len(preds[task.name])} predictions, checkpoint step {step})")
    return written
