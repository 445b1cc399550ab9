"""What a run's workdir records, read and written in one place.

    <workdir>/config.json     the resolved config of the run (`write_config`, `read_config`)
    <workdir>/params.json     parameter counts
    <workdir>/metrics.jsonl   one JSON line per evaluated epoch (`append_metrics`, `read_metrics`)
    <workdir>/best.json       {"step", "metric", "score"} of the best checkpoint (`read_best`)
    <workdir>/timings.jsonl   one JSON line per training invocation: where its wall time
                              went (flaxpals.train.timing; `append_timings`, `read_timings`)
    <workdir>/best-outputs.npz  the best checkpoint's outputs on the splits its epoch
                              scored, as evaluated then (`write_outputs`, `read_outputs`):
                              an ensemble member that needs no checkpoint (flaxpals.serve.ensemble)

A workdir describes its run: every command that restores one (eval, predict,
export, `Predictor.from_workdir`) builds the model from the saved
`config.json`. `config_for_restore(workdir, given)` merges a config given on
the command line into it: the fields that only choose data or evaluation
(`data.*`, `eval.*`, `parallel.*`, the sources of declared tasks) are taken
from `given`; the fields that define the model (`MODEL_FIELDS` and each task's
kind, label count, range and names) must match, else `ConfigMismatchError`
lists each differing field as `saved -> given`; training fields come from the
saved run.

`fingerprint(config)` is those model-defining fields as a flat JSON dict. Every
checkpoint carries the fingerprint of the model it holds (flaxpals/train/checkpointing.py),
so an edit of config.json that changes the model is caught at restore, field by field.

metrics.jsonl and timings.jsonl are appended a line at a time; a kill in the middle
of a write can leave the last line cut short. Readers skip such a last line with a
warning; `repair_records` (run by the trainer, holding the workdir's lock) moves it
to `<file>.unreadable` so that the next line starts on a line of its own. A bad line
that is not the last stops with `file:line`.

Only process 0 writes (multi-host jobs share the workdir).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import zipfile
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from flaxpals import config_lib
from flaxpals.data.tasks import tasks_of_config

log = logging.getLogger(__name__)

# Fields that decide the model's parameters or its function: a restored run must agree.
MODEL_FIELDS = ("model.encoder", "model.adapter", "model.adapter_size",
                "model.adapter_heads", "model.placement", "model.pooling",
                "model.pair_encoding", "model.similarity", "tasks")
# Sections that only choose data or evaluation: a restoring command may change them.
DATA_SECTIONS = ("data", "eval", "parallel")
# What of a task the model is built from (its source files may change).
TASK_MODEL_FIELDS = ("kind", "num_labels", "label_range", "label_names")


class ConfigMismatchError(ValueError):
    """A given config that defines another model than the saved run."""


def is_host0() -> bool:
    """Whether this is process 0, the one that writes the workdir's files (every process
    reads them)."""
    return jax.process_index() == 0


def write_json(path: epath.PathLike, obj: Any) -> None:
    if is_host0():
        epath.Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")


def write_config(workdir: epath.PathLike, config: ml_collections.ConfigDict) -> None:
    write_json(epath.Path(workdir) / "config.json", config.to_dict())


def has_run(workdir: epath.PathLike) -> bool:
    return (epath.Path(workdir) / "config.json").exists()


def has_checkpoints(workdir: epath.PathLike) -> bool:
    """Whether the workdir holds a checkpoint (a complete step or a partial one)."""
    for name in ("checkpoints", "best"):
        directory = epath.Path(workdir) / name
        if directory.exists() and any(p.name[:1].isdigit() for p in directory.iterdir()):
            return True
    return False


def read_config(workdir: epath.PathLike) -> ml_collections.ConfigDict:
    """The run's config.json as a validated ConfigDict (fields it lacks: see config_lib)."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        what = "does not exist" if not epath.Path(workdir).exists() else "holds no config.json"
        raise FileNotFoundError(f"workdir {os.fspath(workdir)} {what}: it is not a flaxpals run "
                                "(train one with python -m flaxpals.main --config=...)")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise config_lib.ConfigError(f"{path}: not valid JSON ({e})") from None
    try:
        config = config_lib.from_dict(values)
        tasks_of_config(config)  # a bad task declaration names this file, not a later step
    except config_lib.ConfigError as e:
        raise config_lib.ConfigError(f"{path}: {e}") from None
    return config


def _append(workdir: epath.PathLike, name: str, record: dict) -> None:
    if is_host0():
        with (epath.Path(workdir) / name).open("a") as f:
            f.write(json.dumps(record) + "\n")


def _parse_lines(path: epath.Path) -> tuple[list[dict], int | None, str]:
    """(the records of a JSON-lines file, the number of an unreadable last line or None,
    the text before that line). Raises config_lib.ConfigError for a bad line before the
    last: that is damage, not a write cut short."""
    text = path.read_bytes().decode("utf-8", "replace")
    lines = text.splitlines(keepends=True)
    records, bad, kept = [], None, text
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
        except ValueError as e:
            if any(rest.strip() for rest in lines[i:]):
                raise config_lib.ConfigError(
                    f"{os.fspath(path)}:{i}: not a JSON record ({e}); the lines after it are "
                    "intact, so this is damage, not an interrupted write: fix or delete "
                    "that line") from None
            bad, kept = i, "".join(lines[:i - 1])
            break
        records.append(record)
    return records, bad, kept


def _read_lines(workdir: epath.PathLike, name: str) -> list[dict]:
    path = epath.Path(workdir) / name
    if not path.exists():
        return []
    records, bad, _ = _parse_lines(path)
    if bad is not None:
        log.warning("%s:%d: the last line is cut short (a write was interrupted); "
                    "ignoring it", os.fspath(path), bad)
    return records


def repair_records(workdir: epath.PathLike) -> None:
    """Moves a cut-short last line of metrics.jsonl or timings.jsonl to
    `<file>.unreadable` (appended, kept for inspection) and ends the file with a newline,
    so that the next record starts on a line of its own. Process 0 only."""
    if not is_host0():
        return
    for name in ("metrics.jsonl", "timings.jsonl"):
        path = epath.Path(workdir) / name
        if not path.exists():
            continue
        _, bad, kept = _parse_lines(path)
        if bad is None:
            if kept and not kept.endswith("\n"):
                with path.open("a") as f:
                    f.write("\n")
            continue
        raw = path.read_bytes().decode("utf-8", "replace").splitlines(keepends=True)[bad - 1:]
        aside = path.parent / (name + ".unreadable")
        with aside.open("a") as f:
            f.write("".join(raw).rstrip("\n") + "\n")
        tmp = path.parent / (name + ".tmp")
        tmp.write_text(kept)
        tmp.replace(path)
        log.warning("%s:%d: the last line was cut short (a write was interrupted): moved it "
                    "to %s", os.fspath(path), bad, os.fspath(aside))


def append_metrics(workdir: epath.PathLike, record: dict) -> None:
    _append(workdir, "metrics.jsonl", record)


def read_metrics(workdir: epath.PathLike) -> list[dict]:
    """The epoch records of metrics.jsonl, in order ([] when there are none)."""
    return _read_lines(workdir, "metrics.jsonl")


def append_timings(workdir: epath.PathLike, record: dict) -> None:
    _append(workdir, "timings.jsonl", record)


def read_timings(workdir: epath.PathLike) -> list[dict]:
    """One record per training invocation (a resumed run has several), in order."""
    return _read_lines(workdir, "timings.jsonl")


def read_best(workdir: epath.PathLike) -> dict | None:
    """best.json, or None when it is missing or unreadable. A record only: what is on
    disk under best/ is the truth (`checkpointing.Checkpoints.best_record`)."""
    path = epath.Path(workdir) / "best.json"
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as e:
        log.warning("%s is unreadable (%s); ignoring it", os.fspath(path), e)
        return None
    if not isinstance(record, dict) or not {"step", "score"} <= set(record):
        log.warning("%s is not a best record (step, metric, score); ignoring it",
                    os.fspath(path))
        return None
    return record


OUTPUTS_FILE = "best-outputs.npz"


@dataclasses.dataclass
class SavedOutputs:
    """A best-outputs.npz: the step and metric of the checkpoint, the run's config, and
    rows[split][task] = (ids [n], labels [n] or None, outputs [n, ...]) in file order;
    outputs as `evaluation.evaluate` keeps them, each task's own (logits, a pair logit
    or a score)."""

    path: str
    step: int
    metric: str
    config: ml_collections.ConfigDict
    rows: dict[str, dict[str, tuple[np.ndarray, np.ndarray | None, np.ndarray]]]


def write_outputs(workdir: epath.PathLike, step: int, metric: str,
                  config: ml_collections.ConfigDict, rows: dict) -> None:
    """<workdir>/best-outputs.npz from `rows` (as `SavedOutputs.rows`), replaced whole:
    written to a temporary file first, so a kill leaves the old file or the new one."""
    if not is_host0():
        return
    arrays = {"meta": np.array(json.dumps({"step": int(step), "metric": metric,
                                           "config": config.to_dict()}, default=str))}
    for split, by_task in rows.items():
        for task, (ids, labels, out) in by_task.items():
            arrays[f"{split}/{task}/ids"] = np.asarray(ids).astype(str)
            arrays[f"{split}/{task}/outputs"] = np.asarray(out)
            if labels is not None:
                arrays[f"{split}/{task}/labels"] = np.asarray(labels)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    path = epath.Path(workdir) / OUTPUTS_FILE
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)  # replaces an older best's file (rename would refuse)


def read_outputs(path: epath.PathLike) -> SavedOutputs:
    """A best-outputs.npz (`path`: the file, or the workdir that holds it); raises
    FileNotFoundError or config_lib.ConfigError naming the file."""
    path = epath.Path(path)
    if path.is_dir():
        path = path / OUTPUTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{os.fspath(path)} does not exist (a run writes "
                                f"{OUTPUTS_FILE} when it saves its best checkpoint)")
    try:
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as f:
            files = {k: f[k] for k in f.files}
        meta = json.loads(str(files.pop("meta")))
        config = config_lib.from_dict(meta["config"])
    except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise config_lib.ConfigError(f"{os.fspath(path)}: not a readable {OUTPUTS_FILE} "
                                     f"({type(e).__name__}: {e})") from None
    rows: dict = {}
    for key in sorted(k for k in files if k.endswith("/outputs")):
        split, task, _ = key.split("/")
        rows.setdefault(split, {})[task] = (files[f"{split}/{task}/ids"],
                                            files.get(f"{split}/{task}/labels"), files[key])
    return SavedOutputs(os.fspath(path), int(meta["step"]), meta["metric"], config, rows)


def record_at(workdir: epath.PathLike, step: int) -> dict | None:
    """The metrics.jsonl record of `step`, or None."""
    found = [r for r in read_metrics(workdir) if r.get("step") == step]
    return found[-1] if found else None


def _get(config, dotted: str):
    node = config
    for key in dotted.split("."):
        node = node[key]
    return tuple(node) if isinstance(node, list | tuple) else node


def task_fields(task) -> dict[str, Any]:
    """What of a task the model is built from: {field: value} of TASK_MODEL_FIELDS."""
    return {f: getattr(task, f) for f in TASK_MODEL_FIELDS}


def _task_fields(config) -> dict[str, dict[str, Any]]:
    return {t.name: task_fields(t) for t in tasks_of_config(config)}


def model_differences(saved, given) -> list[tuple[str, Any, Any]]:
    """[(field, saved value, given value)] for every model-defining field that differs."""
    out = [(f, _get(saved, f), _get(given, f)) for f in MODEL_FIELDS
           if _get(saved, f) != _get(given, f)]
    if any(f == "tasks" for f, _, _ in out):
        return out  # other tasks: their fields cannot be compared one to one
    mine, theirs = _task_fields(saved), _task_fields(given)
    for name, fields in mine.items():
        out += [(f"tasks.{name}.{f}", v, theirs[name][f]) for f, v in fields.items()
                if theirs[name][f] != v]
    return out


RESTORE_FIX = "Leave out --config to use the saved run's config."
TRAIN_FIX = ("To train this model, use a new --workdir; to resume the saved run, give the "
             "config it was trained with.")


def check_same_model(saved, given, source: str, fix: str = RESTORE_FIX) -> None:
    """Raises ConfigMismatchError listing the model-defining fields where they differ;
    `fix` ends the message (RESTORE_FIX for eval and predict, TRAIN_FIX for training)."""
    diffs = model_differences(saved, given)
    if diffs:
        lines = "\n".join(f"  {f}: {a!r} -> {b!r}" for f, a, b in diffs)
        raise ConfigMismatchError(
            f"the given config defines another model than the run saved in {source} "
            f"(saved -> given):\n{lines}\n{fix}")


def _plain(value):
    """A config value as JSON gives it back (tuples as lists), so that saved and live
    fingerprints compare equal."""
    return json.loads(json.dumps(value, default=str))


def fingerprint(config) -> dict[str, Any]:
    """The fields that define the model (MODEL_FIELDS, and TASK_MODEL_FIELDS of every
    task as `tasks.<name>.<field>`), flat and JSON-plain: what a checkpoint records."""
    out = {f: _plain(_get(config, f)) for f in MODEL_FIELDS}
    for name, fields in _task_fields(config).items():
        out.update({f"tasks.{name}.{f}": _plain(v) for f, v in fields.items()})
    return out


def fingerprint_differences(recorded: dict, current: dict,
                            ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """[(field, recorded value, current value)] where two fingerprints differ; a field
    one of them lacks shows as None."""
    keys = [k for k in dict.fromkeys([*recorded, *current]) if k not in ignore]
    return [(k, recorded.get(k), current.get(k)) for k in keys
            if _plain(recorded.get(k)) != _plain(current.get(k))]


def config_for_restore(workdir: epath.PathLike,
                       given: ml_collections.ConfigDict | None = None
                       ) -> ml_collections.ConfigDict:
    """The config to restore `workdir` with: the saved one, with `given`'s data and
    evaluation choices when a config is given (module docstring)."""
    saved = read_config(workdir)
    if given is None:
        return saved
    config_lib.validate(given)
    check_same_model(saved, given, str(epath.Path(workdir) / "config.json"))
    out = saved.copy_and_resolve_references()
    with out.unlocked():
        for section in DATA_SECTIONS:
            out[section] = given[section].copy_and_resolve_references()
        out.extra_tasks = given.extra_tasks.copy_and_resolve_references()
    mine, theirs = _flat(saved), _flat(given)
    ignored = [k for k, v in mine.items() if not k.startswith(DATA_SECTIONS + ("extra_tasks",))
               and k not in MODEL_FIELDS and v != theirs.get(k)]
    if ignored:
        log.info("restoring %s: training fields are the saved run's; ignoring the given %s",
                 os.fspath(workdir), ", ".join(ignored))
    return out


def _flat(config) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list | tuple) else v
            for k, v in config_lib.fields(config).items()}
