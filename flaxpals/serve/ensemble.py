"""Prediction-time ensembles: several trained runs' outputs averaged.

    e = Ensemble.from_workdirs(["runs/s0", "runs/s1", "runs/s2"])
    e.predict("sst", ["a gripping film"])         # as Predictor.predict
    evaluate_ensemble(["runs/s0", ...], "runs/ens")          # dev metrics, eval-ensemble.json
    write_ensemble_predictions(["runs/s0", ...], "runs/ens") # CS224N files, runs/ens/predictions

    python -m flaxpals.main --mode=eval --ensemble=runs/s0,runs/s1,runs/s2 --workdir=runs/ens
    python -m flaxpals.main --mode=eval --workdir=runs/ens \
        --ensemble=runs/s0/best-outputs.npz,runs/s1/best-outputs.npz  # no checkpoints
    python -m flaxpals.predict --ensemble=runs/s0,runs/s1 --task=sst --input=reviews.csv

How outputs are averaged (`combine`): classification, the mean of the
members' class probabilities (softmax); paraphrase, the mean probability
(sigmoid); regression, the mean score. The result is given back in the
models' own output space (log of the mean probabilities, logit of the mean
probability, the mean score), so that decisions, metrics and files follow
exactly as for one model: the class of highest mean probability, paraphrase
when the mean probability exceeds 0.5.

Members must define the same tasks (name, kind, label count, range and
names); the model may differ in anything else (encoder, adapters, tokenizer,
recipe). Each member reads and tokenizes the data with its own config, so the
rows each reads must come out the same: the same ids and labels in the same
order (same files, `data.eval_limit`, `data.strict`), and a split that one
member has all must have; else `EnsembleError` names the member and the split.
A member given as a run's `best-outputs.npz` (flaxpals/workdir_format.py) is read, not
restored: the outputs its best epoch computed on the splits the epoch scored
(dev, val, the train sample), the same as restoring the best checkpoint and
evaluating it. So an ensemble of finished runs needs no checkpoints: a results
folder that keeps only the runs' records can still be scored. Such a member has
no test split, and no --step. `eval-ensemble.json` says "ensemble": true and
lists its members and their own scores. `Ensemble` holds every member in
memory; `member_outputs` restores one at a time.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from flaxpals import config_lib, workdir_format
from flaxpals.data import metrics as metrics_lib
from flaxpals.data.tasks import KINDS, Task, tasks_of_config
from flaxpals.model import build, heads
from flaxpals.serve import eval_files, restore
from flaxpals.train import evaluate as evaluation_lib

log = logging.getLogger(__name__)

# Floors a mean probability so that its log stays finite (a member's probability
# underflows to 0 past a logit gap of about 745); moves no decision.
_TINY = 1e-300
EVAL_FILE = "eval-ensemble.json"


class EnsembleError(config_lib.ConfigError):
    """Members that cannot be averaged: other tasks, or other rows of a split."""


def combine(kind: str, outputs: Sequence[np.ndarray]) -> np.ndarray:
    """The members' outputs ([n, classes] logits, [n] pair logits or [n] scores)
    averaged as the module docstring says, in the same output space; float32."""
    if not outputs:
        raise ValueError("an ensemble needs at least one member's outputs")
    shapes = {np.shape(o) for o in outputs}
    if len(shapes) != 1:
        raise ValueError(f"members' outputs differ in shape: {sorted(shapes)}")
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}; known: {KINDS}")
    if kind == "pair_regression":
        return np.mean([np.asarray(o, np.float64) for o in outputs], 0).astype(np.float32)
    p = np.mean([heads.probabilities(kind, o, np.float64) for o in outputs], 0)
    if kind == "classification":
        return np.log(np.maximum(p, _TINY)).astype(np.float32)
    p = np.clip(p, _TINY, 1.0 - 1e-16)  # a saturated mean keeps a finite logit
    return (np.log(p) - np.log1p(-p)).astype(np.float32)


def check_tasks(members: Sequence[tuple[str, Sequence[Task]]]) -> list[Task]:
    """The first member's tasks, after checking every member defines the same ones;
    `members`: (name, tasks) pairs."""
    (first, tasks), *rest = members
    mine = {t.name: workdir_format.task_fields(t) for t in tasks}
    for name, other in rest:
        theirs = {t.name: workdir_format.task_fields(t) for t in other}
        if set(theirs) != set(mine):
            raise EnsembleError(f"ensemble member {name} has tasks {sorted(theirs)}; "
                                f"{first} has {sorted(mine)}")
        for task, fields in mine.items():
            diffs = [f"{f}: {v!r} -> {theirs[task][f]!r}" for f, v in fields.items()
                     if theirs[task][f] != v]
            if diffs:
                raise EnsembleError(f"ensemble member {name} defines task {task!r} otherwise "
                                    f"than {first}: " + "; ".join(diffs))
    return list(tasks)


def check_rows(name: str, split: str, task: str, ids: np.ndarray, labels, ref_name: str,
               ref_ids: np.ndarray, ref_labels) -> None:
    """Raises EnsembleError unless a member's rows of a split are the reference's."""
    if len(ids) != len(ref_ids) or not np.array_equal(ids, ref_ids):
        how = (f"{len(ids)} rows against {len(ref_ids)}" if len(ids) != len(ref_ids)
               else "other ids or another order")
        raise EnsembleError(f"ensemble member {name} reads other rows of {task} {split} than "
                            f"{ref_name} ({how}): members must read the same files with the "
                            "same data.* limits")
    if (labels is None) != (ref_labels is None) or (
            labels is not None and not np.array_equal(labels, ref_labels)):
        raise EnsembleError(f"ensemble member {name} reads other labels of {task} {split} "
                            f"than {ref_name}")


class _Outputs:
    """task -> split -> (ids [n], labels [n] or None, [member outputs], [member names]),
    rows in file order."""

    def __init__(self):
        self.rows: dict[str, dict[str, tuple[np.ndarray, Any, list, list[str]]]] = {}
        self.steps: list[int] = []

    def add(self, name: str, task: str, split: str, ids, labels, out) -> None:
        if split not in self.rows.setdefault(task, {}):
            self.rows[task][split] = (ids, labels, [out], [name])
            return
        ref_ids, ref_labels, outs, names = self.rows[task][split]
        check_rows(name, split, task, ids, labels, names[0], ref_ids, ref_labels)
        outs.append(out)
        names.append(name)

    def check_complete(self, members: Sequence[str]) -> None:
        """Raises EnsembleError for a split some members have and others lack."""
        for task, splits in self.rows.items():
            for split, (*_, names) in splits.items():
                missing = [m for m in members if m not in names]
                if missing:
                    raise EnsembleError(
                        f"ensemble members {missing} have no {task} {split} split while "
                        f"{names} have: members must read the same files")


def is_saved(member) -> bool:
    """Whether an ensemble member names a saved best-outputs.npz rather than a workdir."""
    return os.fspath(member).endswith(".npz")


def _saved_member(saved: workdir_format.SavedOutputs, splits: Sequence[str], step: int | None,
                  found: _Outputs) -> None:
    """Adds a best-outputs.npz member's rows of `splits` to `found`."""
    path = name = saved.path
    if step is not None:
        raise EnsembleError(f"ensemble member {name} holds the best checkpoint's outputs "
                            f"only: --step={step} needs the run's workdir")
    best = workdir_format.read_best(epath.Path(path).parent)
    if best is not None and best["step"] != saved.step:
        raise EnsembleError(f"ensemble member {name} holds step {saved.step}'s outputs but "
                            f"best.json beside it says step {best['step']}: use the workdir")
    found.steps.append(saved.step)
    for split in splits:
        for task, rows in saved.rows.get(split, {}).items():
            found.add(name, task, split, *rows)


def member_outputs(members: Sequence[str], splits: Sequence[str], step: int | None = None,
                   limits: bool = True) -> tuple[list[Task], _Outputs]:
    """Every member's outputs on `splits` of every task, one member restored at a time
    (memory holds one model); the members' tasks checked alike. A member is a run's
    workdir (its best checkpoint, or `step`) or a best-outputs.npz it wrote
    (workdir_format.read_outputs: no restore; the file holds the splits its epoch scored)."""
    if not members:
        raise EnsembleError("--ensemble: give at least one workdir")
    saved = {i: workdir_format.read_outputs(m) for i, m in enumerate(members) if is_saved(m)}
    configs = [saved[i].config if i in saved else workdir_format.read_config(m)
               for i, m in enumerate(members)]
    tasks = check_tasks([(os.fspath(m), tasks_of_config(c)) for m, c in zip(members, configs,
                                                                              strict=True)])
    found = _Outputs()
    for i, member in enumerate(members):
        if i in saved:
            _saved_member(saved[i], splits, step, found)
            continue
        r = restore.restore(member, None, step)
        found.steps.append(r.step)
        data = build.load_data(r.config, r.tasks, r.tokenizer, splits=tuple(splits),
                               limits=limits)
        sets = evaluation_lib.EvalSets(data, r.config, r.mesh)
        for split in splits:
            kept = {}
            evaluation_lib.evaluate(r.predict, r.params, sets, r.tasks, split, keep=kept)
            for task, rows in kept.items():
                found.add(os.fspath(member), task, split, *rows)
        log.info("ensemble member %s: step %d", os.fspath(member), r.step)
        del r, data, sets
    found.check_complete([os.fspath(m) for m in members])
    return tasks, found


def _scores(tasks: Sequence[Task], found: _Outputs, split: str,
            outputs_of) -> dict[str, float]:
    scores = {}
    for task in tasks:
        entry = found.rows.get(task.name, {}).get(split)
        if entry is None or entry[1] is None:
            continue
        decided = heads.predictions(task.kind, outputs_of(task, entry[2]))
        scores[task.name] = metrics_lib.task_metric(task.metric, decided, entry[1])
    metric_of = {t.name: t.metric for t in tasks}
    return {**{f"{split}/{t}": v for t, v in scores.items()},
            **{f"{split}/{k}": v for k, v in metrics_lib.summary(scores, metric_of).items()}}


def evaluate_ensemble(members: Sequence[str], out_dir, step: int | None = None
                      ) -> dict[str, Any]:
    """Dev metrics of the members' averaged outputs (best checkpoints or saved
    best-outputs.npz, or `step`), and each member's own, to <out_dir>/eval-ensemble.json."""
    tasks, found = member_outputs(members, ("dev",), step)
    record: dict[str, Any] = {"ensemble": True,
                              "members": [os.fspath(m) for m in members],
                              "steps": found.steps}
    record.update(_scores(tasks, found, "dev", lambda t, outs: combine(t.kind, outs)))
    record["member_scores"] = [
        _scores(tasks, found, "dev", lambda t, outs, i=i: outs[i]) for i in range(len(members))]
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workdir_format.write_json(out / EVAL_FILE, record)
    print(json.dumps(record, indent=2))
    return record


def read_eval(out_dir) -> dict[str, Any] | None:
    """<out_dir>/eval-ensemble.json, or None."""
    path = epath.Path(out_dir) / EVAL_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write_ensemble_predictions(workdirs: Sequence[str], out_dir,
                               step: int | None = None) -> list[epath.Path]:
    """CS224N prediction files of the ensemble for dev and test in <out_dir>/predictions."""
    _need_checkpoints(workdirs)
    tasks, found = member_outputs(workdirs, ("dev", "test"), step, limits=False)
    written = []
    for split in ("dev", "test"):
        for task in tasks:
            entry = found.rows.get(task.name, {}).get(split)
            if entry is None:
                log.info("%s: no %s file; no predictions written", task.name, split)
                continue
            decided = heads.predictions(task.kind, combine(task.kind, entry[2]))
            preds = dict(zip(entry[0], decided.tolist(), strict=True))
            written.append(eval_files.write_prediction_file(out_dir, task, split, preds,
                                                                f"an ensemble of "
                                                                f"{len(workdirs)}"))
    return written


def _need_checkpoints(workdirs: Sequence[str]) -> None:
    """Predicting reads each member's checkpoint: a saved best-outputs.npz (dev outputs
    only, for --mode=eval) cannot stand in for one."""
    saved = [os.fspath(w) for w in workdirs if is_saved(w)]
    if saved:
        raise EnsembleError(f"{saved}: predicting needs the runs' checkpoints; give "
                            "their workdirs, not saved outputs")


class Ensemble:
    """Several `Predictor`s answering as one, with Predictor's `predict` (module docstring)."""

    def __init__(self, members: Sequence[Any]):
        if not members:
            raise EnsembleError("an ensemble needs at least one member")
        self.members = list(members)
        self._tasks = check_tasks([(m.source, m.tasks) for m in self.members])
        self.source = "ensemble of " + ", ".join(m.source for m in self.members)

    @classmethod
    def from_workdirs(cls, workdirs: Sequence[str], step: int | None = None) -> Ensemble:
        from flaxpals.serve.predictor import Predictor

        _need_checkpoints(workdirs)
        return cls([Predictor.from_workdir(w, step) for w in workdirs])

    @property
    def tasks(self) -> tuple[Task, ...]:
        return tuple(self._tasks)

    @property
    def config(self):
        return self.members[0].config

    def task(self, name: str) -> Task:
        return self.members[0].task(name)

    def predict_parsed(self, task: Task, parsed):
        """(the first member's Split of the parsed rows, the averaged predictions)."""
        splits = [m._tokenize(task, parsed) for m in self.members]
        for m, s in zip(self.members[1:], splits[1:], strict=True):
            check_rows(m.source, "input", task.name, s.ids, s.labels, self.members[0].source,
                       splits[0].ids, splits[0].labels)
        outs = [m.outputs(s) for m, s in zip(self.members, splits, strict=True)]
        return splits[0], self.members[0].decide(task, combine(task.kind, outs))

    def predict(self, task: str, texts: Sequence[str],
                pairs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The averaged predictions for texts (and pairs), in input order."""
        outs = [m.outputs(m.split(task, texts, pairs)) for m in self.members]
        t = self.task(task)
        return self.members[0].decide(t, combine(t.kind, outs))
