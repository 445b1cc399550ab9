"""Evaluation and CS224N prediction files, during training and from a saved run.

    sets = EvalSets(data, config, mesh)
    scores, preds = evaluate(predict, params, sets, tasks, "dev")
    record = eval_record(predict, params, sets, tasks, config)   # dev + train sample

    restored = restore(workdir, config=None, step=None)   # the run's own config.json
    evaluate_checkpoint(workdir)                          # --mode=eval
    evaluate_checkpoint(workdir, eval_file="my.csv", task="sst", columns={"text": "body"})
    write_predictions(workdir)                            # --mode=predict

`predict(params, batch, task)` is `programs.Programs.predict`: a task's padded
outputs on the device. A restored run is built from its workdir's config.json; a
given config may change only what chooses data or evaluation
(`runs.config_for_restore`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import numpy as np
from etils import epath

from flaxpals import batching, build, compilation, config_lib, heads, input_pipeline, parallel, runs
from flaxpals import metrics as metrics_lib
from flaxpals import tasks as tasks_lib
from flaxpals.checkpointing import Checkpoints
from flaxpals.programs import Programs
from flaxpals.steps import MODEL_KEYS

log = logging.getLogger(__name__)


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
            s = self.select(task, split, limit)
            if s is None:
                return None
            self._cache[key] = s, list(input_pipeline.eval_batches(
                s, self._batch_size, buckets=config_lib.padded_lengths(self._config.data),
                process_index=jax.process_index(), process_count=jax.process_count()))
        return self._cache[key]

    def select(self, task: str, split: str, limit: int = -1):
        """The rows `get` evaluates (a Split), without batching them; None if no such split."""
        s = self._data[task].get(split)
        if s is None:
            return None
        if limit > 0 and split == "train" and self._config.eval.train_sample_from == "random":
            return s.sample(limit, self._config.seed)  # the same rows every epoch
        return s.take(limit) if limit > 0 else s

    def lengths(self, task: str, split: str, limit: int = -1) -> list[int]:
        """The padded lengths of `get`'s batches, each once, in their order (increasing)."""
        s = self.select(task, split, limit)
        if s is None:
            return []
        plan = batching.eval_plan(s.lengths(), config_lib.padded_lengths(self._config.data),
                                  self._batch_size, process_index=jax.process_index(),
                                  process_count=jax.process_count())
        return sorted({length for _, length in plan})

    def to_device(self, batch: dict) -> dict[str, jax.Array]:
        """The model inputs and row indices of a batch as global arrays."""
        return parallel.global_batch({k: batch[k] for k in (*MODEL_KEYS, "index")
                                      if k in batch}, self._mesh)


def outputs(predict, params, eval_sets: EvalSets, task: str, split: str,
            limit: int = -1, progress=None) -> tuple[Any, np.ndarray, np.ndarray] | None:
    """(the split, its row indices, `predict`'s outputs of those rows) or None.

    Outputs are as `predict` gives them (a task's: padded [n, width], `heads.unpad`);
    they come back from all processes together, so every process holds the whole split.
    """
    found = eval_sets.get(task, split, limit)
    if found is None:
        return None
    s, batches = found
    out, index = [], []
    for batch in batches:
        arrays = eval_sets.to_device(batch)
        rows = arrays.pop("index")
        out.append(parallel.to_host(predict(params, arrays, task)))
        index.append(parallel.to_host(rows))
        if progress is not None:
            progress.update(int((batch["index"] >= 0).sum()))
    index, out = np.concatenate(index), np.concatenate(out)
    real = index >= 0
    return s, index[real], out[real]


def evaluate(predict, params, eval_sets: EvalSets, tasks, split: str,
             limit: int = -1, keep: dict | None = None
             ) -> tuple[dict[str, float], dict[str, dict]]:
    """Metrics of every task on a split, and the predictions by example id; `keep`, if
    given, gets keep[task] = (ids, labels or None, the task's own outputs) in file order
    (`runs.SavedOutputs.rows`)."""
    scores, preds = {}, {}
    for task in tasks:
        found = outputs(predict, params, eval_sets, task.name, split, limit)
        if found is None:
            continue
        s, rows, out = found
        out = heads.unpad(task.kind, task.num_labels, out)
        if keep is not None:
            order = np.argsort(rows)  # batches ran bucket by bucket
            keep[task.name] = (s.ids[rows][order],
                               None if s.labels is None else s.labels[rows][order], out[order])
        decided = heads.predictions(task.kind, out)
        preds[task.name] = dict(zip(s.ids[rows], decided.tolist(), strict=True))
        if s.labels is not None:
            scores[task.name] = metrics_lib.task_metric(task.metric, decided, s.labels[rows])
    return scores, preds


def record_splits(config, tag: str = "") -> tuple[tuple[str, str], ...]:
    """(split, prefix) pairs an epoch records: dev, val (data.validation_fraction > 0) and
    the train sample (eval.train_sample > 0); with a `tag` ("_ema"), dev{tag} and val{tag}
    alone."""
    out = [("dev", "dev" + tag)]
    if config.data.validation_fraction > 0:
        out.append(("val", "val" + tag))
    if not tag and config.eval.train_sample > 0:
        out.append(("train", "train"))
    return tuple(out)


def split_limit(config, split: str) -> int:
    """Rows of `split` an epoch scores: eval.train_sample of train, all (-1) of the others."""
    return config.eval.train_sample if split == "train" else -1


def eval_record(predict, params, eval_sets, tasks, config,
                splits=None, keep: dict | None = None) -> dict[str, float]:
    """{prefix/task: metric, prefix/average, prefix/overall} for (split, prefix) pairs
    (default: `record_splits(config)`); the train split is cut to the sample of
    eval.train_sample rows. `keep`, if given, gets keep[split] as `evaluate`'s."""
    record = {}
    metric_of = {t.name: t.metric for t in tasks}
    for split, prefix in splits or record_splits(config):
        limit = split_limit(config, split)
        scores, _ = evaluate(predict, params, eval_sets, tasks, split, limit,
                             None if keep is None else keep.setdefault(split, {}))
        record.update({f"{prefix}/{t}": v for t, v in scores.items()})
        record.update({f"{prefix}/{k}": v for k, v in metrics_lib.summary(scores,
                                                                          metric_of).items()})
    return record


@dataclasses.dataclass
class Restored:
    """A run restored for inference: its config, model, params on the mesh and step;
    predict: `Programs.predict` of its model."""

    config: Any
    model: Any
    params: Any
    tokenizer: Any
    tasks: list[tasks_lib.Task]
    step: int
    mesh: Any
    predict: Any


def restore(workdir, config=None, step: int | None = None) -> Restored:
    """The best checkpoint of `workdir` (or `step` among the latest), built from the
    run's config.json; `config`, if given, may change data and evaluation only."""
    config = runs.config_for_restore(workdir, config)
    compilation.enable_cache(config)
    mesh = parallel.make_mesh()
    parallel.process_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    model, shapes, tokenizer, tasks = build.abstract_model(config)
    sharding = parallel.state_shardings(shapes, mesh, config.parallel.fsdp)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, sharding)
    ckpts = Checkpoints(workdir, config.checkpoint.keep, runs.fingerprint(config))
    try:
        step, params = ckpts.restore_params(target, "best" if step is None else "latest", step)
    finally:
        ckpts.close()
    predict = Programs.inference(model, mesh, sharding, config.symbolic_length).predict
    return Restored(config, model, params, tokenizer, tasks, step, mesh, predict)


def _with_file(task: tasks_lib.Task, path: str, columns: dict[str, str] | None,
               delimiter: str | None = None) -> tasks_lib.Task:
    """`task` read from one labelled file as its dev split, columns renamed by `columns`
    ({"id", "text", "text_pair", "label"} -> column name); the model side is unchanged."""
    # Without an id column the rows are numbered: metrics need no ids.
    fields = {"id": None, "text": task.text_field,
              "text_pair": task.text_pair_field, "label": task.label_field}
    unknown = sorted(set(columns or {}) - set(fields))
    if unknown:
        raise config_lib.ConfigError(f"columns: unknown key(s) {unknown}; known: {sorted(fields)}")
    fields.update(columns or {})
    # Absolute: a relative split name would be looked up in the data directory.
    return dataclasses.replace(
        task, source="csv", splits=(("dev", os.path.abspath(path)),), delimiter=delimiter,
        id_field=fields["id"] or None, text_field=fields["text"],
        text_pair_field=fields["text_pair"], label_field=fields["label"])


def evaluate_checkpoint(workdir, config=None, step: int | None = None, *,
                        eval_file: str | None = None, task: str | None = None,
                        columns: dict[str, str] | None = None,
                        name: str | None = None) -> dict[str, float]:
    """`--mode=eval`: the best checkpoint's (or a step's) metrics, written to
    `eval-<step>.json` (`eval-<step>-<name>.json` on other data); with neither a
    config, a step nor a file, also the outputs to best-outputs.npz (flaxpals/runs.py).

    Default: dev and the train sample, as training records them each epoch. The record
    also says, under "rows", what each figure was computed on (`row_counts`: rows read,
    skipped by reason, kept and scored).
    `eval_file` (with `task`): that labelled CSV/TSV file as the task's dev split,
    its columns named by `columns`. A config whose data.data_dir differs from the
    run's evaluates every task's dev file there.
    """
    r = restore(workdir, config, step)
    saved = runs.read_config(workdir)
    tasks, splits = r.tasks, record_splits(r.config)
    if eval_file is not None:
        if task not in {t.name for t in r.tasks}:
            raise config_lib.ConfigError(
                f"--task={task!r}: the run has tasks {[t.name for t in r.tasks]}")
        tasks = [_with_file(next(t for t in r.tasks if t.name == task), eval_file, columns)]
        splits = (("dev", "dev"),)
        name = name or epath.Path(eval_file).stem
    elif r.config.data.data_dir != saved.data.data_dir:
        splits = (("dev", "dev"),)
        name = name or epath.Path(r.config.data.data_dir).name
    data = build.load_data(r.config, tasks, r.tokenizer,
                           splits=tuple(s for s, _ in splits if s != "val"))
    kept = {}
    sets = EvalSets(data, r.config, r.mesh)
    record = {"step": r.step, **eval_record(r.predict, r.params, sets, tasks,
                                            r.config, splits, kept)}
    record["rows"] = row_counts(sets, tasks, r.config, splits)
    if config is None and step is None and eval_file is None:
        # The run's own data and best checkpoint: (re)writes what training wrote, for
        # runs from before the file existed.
        runs.write_outputs(workdir, r.step, saved.eval.best_metric, saved, kept)
    if eval_file is not None:
        record["source"] = os.fspath(eval_file)
    suffix = f"-{name}" if name else ""
    runs.write_json(epath.Path(workdir) / f"eval-{r.step}{suffix}.json", record)
    print(json.dumps(record, indent=2))
    return record


def row_counts(sets: EvalSets, tasks, config, splits) -> dict[str, dict[str, Any]]:
    """{"<prefix>/<task>": {"read", "skipped", "skipped_by_reason", "kept", "scored"}}:
    what each metric of an eval record was computed on. `read` counts the file's rows,
    `skipped` the rows the reader skipped (`skipped_by_reason`: rows per reason; a row
    may have two), `scored` the rows the metric saw (fewer than `kept` under
    data.eval_limit or the train sample)."""
    out = {}
    for split, prefix in splits:
        for task in tasks:
            scored = sets.select(task.name, split, split_limit(config, split))
            if scored is None:
                continue
            out[f"{prefix}/{task.name}"] = {
                "read": int(scored.num_rows), "skipped": int(scored.num_skipped),
                "skipped_by_reason": dict(scored.skip_counts),
                "kept": int(scored.num_rows - scored.num_skipped), "scored": len(scored)}
    return out


# CS224N prediction files: task -> (file prefix, header column). The spelling
# "Predicted_Similiarity" is the starter code's, kept so graders read our files.
PREDICTION_FILES = {"sst": ("sst", "Predicted_Sentiment"),
                    "quora": ("para", "Predicted_Is_Paraphrase"),
                    "sts": ("sts", "Predicted_Similiarity"),
                    "cfimdb": ("cfimdb", "Predicted_Sentiment")}


def write_prediction_file(out_dir, task: tasks_lib.Task, split: str, preds: dict,
                          what: str) -> epath.Path:
    """<out_dir>/predictions/<prefix>-<split>-output.csv in the CS224N format, from
    {example id: prediction}; `what` names the model in the log line."""
    directory = epath.Path(out_dir) / "predictions"
    directory.mkdir(parents=True, exist_ok=True)
    prefix, column = PREDICTION_FILES.get(task.name, (task.name, "Predicted"))
    path = directory / f"{prefix}-{split}-output.csv"
    if jax.process_index() == 0:
        with path.open("w") as f:
            f.write(f"id \t {column} \n")
            for example_id, p in preds.items():
                f.write(f"{example_id} , {p} \n")
    log.info("wrote %s (%d predictions, %s)", path, len(preds), what)
    return path


def write_predictions(workdir, config=None, step: int | None = None) -> list[epath.Path]:
    """`--mode=predict`: CS224N prediction files for dev and test in <workdir>/predictions."""
    r = restore(workdir, config, step)
    data = build.load_data(r.config, r.tasks, r.tokenizer, splits=("dev", "test"),
                           limits=False)
    written = []
    eval_sets = EvalSets(data, r.config, r.mesh)
    for split in ("dev", "test"):
        _, preds = evaluate(r.predict, r.params, eval_sets, r.tasks, split)
        for task in r.tasks:
            if task.name not in preds:
                log.info("%s: no %s file; no predictions written", task.name, split)
                continue
            written.append(write_prediction_file(workdir, task, split, preds[task.name],
                                                 f"checkpoint step {r.step}"))
    return written
