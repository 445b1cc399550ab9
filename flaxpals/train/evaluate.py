"""Evaluation on the device during training: a run's dev (and train-sample) metrics.

    sets = EvalSets(data, config, mesh)
    scores, preds = evaluate(predict, params, sets, tasks, "dev")
    record = eval_record(predict, params, sets, tasks, config)   # dev + train sample

`predict(params, batch, task)` is `programs.Programs.predict`: a task's padded
outputs on the device. The same functions score a saved run (flaxpals/serve/).
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np

from flaxpals import config_lib
from flaxpals.data import batching, input_pipeline
from flaxpals.data import metrics as metrics_lib
from flaxpals.model import heads
from flaxpals.train import parallel
from flaxpals.train.steps import MODEL_KEYS

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
    (`workdir_format.SavedOutputs.rows`)."""
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
















