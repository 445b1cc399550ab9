"""`--mode=eval` and `--mode=predict` on a saved run: its metrics written to
`eval-<step>[-<name>].json`, and CS224N prediction files.

    evaluate_checkpoint(workdir)                          # --mode=eval
    evaluate_checkpoint(workdir, eval_file="my.csv", task="sst", columns={"text": "body"})
    write_predictions(workdir)                            # --mode=predict
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
from etils import epath

from flaxpals import config_lib, workdir_format
from flaxpals.data import tasks as tasks_lib
from flaxpals.model import build
from flaxpals.serve.restore import restore
from flaxpals.train.evaluate import EvalSets, eval_record, evaluate, record_splits, split_limit

log = logging.getLogger(__name__)


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
    config, a step nor a file, also the outputs to best-outputs.npz (flaxpals/workdir_format.py).

    Default: dev and the train sample, as training records them each epoch. The record
    also says, under "rows", what each figure was computed on (`row_counts`: rows read,
    skipped by reason, kept and scored).
    `eval_file` (with `task`): that labelled CSV/TSV file as the task's dev split,
    its columns named by `columns`. A config whose data.data_dir differs from the
    run's evaluates every task's dev file there.
    """
    r = restore(workdir, config, step)
    saved = workdir_format.read_config(workdir)
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
        workdir_format.write_outputs(workdir, r.step, saved.eval.best_metric, saved, kept)
    if eval_file is not None:
        record["source"] = os.fspath(eval_file)
    suffix = f"-{name}" if name else ""
    workdir_format.write_json(epath.Path(workdir) / f"eval-{r.step}{suffix}.json", record)
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


