"""Orbax checkpoints of a run: the latest few, and the best by a dev score.

    <workdir>/checkpoints/<step>/{params,train,sampler}   latest, every N steps and each epoch
    <workdir>/best/<step>/{params,train,sampler}          the best so far (kept alone)

`params` is the model's param tree (all that eval and predict restore);
`train` the rest of the TrainState (optimiser state, step, dropout key);
`sampler` the task sampler's JSON state (RNG, step, epoch, positions).
Restoring the latest falls back to older steps when the newest is truncated
or corrupt, saying so.

Each step's orbax metadata (`_CHECKPOINT_METADATA`, committed with the step) carries
custom_metadata {"flaxpals": {"fingerprint": workdir_format.fingerprint(config), "best":
{"metric", "score"} (best/ only)}}:

- the fingerprint is checked at every restore (resume, eval, predict, export,
  Predictor, ensemble): a config.json edited into another model stops with
  `CheckpointMismatchError` listing each field `checkpoint -> config`. A step saved
  before fingerprints existed is restored with a log line (the config is then only
  checked against the param shapes);
- the best checkpoint's score is the truth `best_record` reads: best.json is a copy
  for people and scripts, rewritten from it when missing or disagreeing; for a step
  that records no score, best.json (same step) or metrics.jsonl's line of that step
  gives it. A best checkpoint whose score is known nowhere stops training
  (`BestUnknownError`) rather than be replaced by a worse one.

A full disk: before each save on a local disk the free space is compared with the
size of the newest complete step; a save that would not fit, or one that failed with
ENOSPC, raises `DiskFullError` (one line: the path, the free space and the space
needed, the last good step) after removing the partial step. Training managers
(`for_training=True`) also remove partial steps a killed run left (orbax's
cleanup_tmp_directories); eval and predict never do, since a trainer may be writing.

In a multi-process job every process calls save and restore (orbax writes each
array's shards from the processes that hold them, and process 0 the metadata),
so the workdir must be storage all processes share: a gs:// bucket on a TPU pod.
`best.json` is written by process 0 only.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from flaxpals import workdir_format
from flaxpals.train import parallel

log = logging.getLogger(__name__)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model, optimiser or sampler being restored."""


class BestUnknownError(ValueError):
    """A best checkpoint whose score is recorded nowhere: training would replace it blind."""


class DiskFullError(RuntimeError):
    """A checkpoint that does not fit on the disk; str() is the one line to show."""


def _is_disk_full(e: BaseException | None) -> bool:
    """Whether an exception (or one it wraps) says no space is left: an OSError's errno,
    or the text of tensorstore's error that orbax passes on."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class _QuietDiskFull(logging.Filter):
    """Drops orbax's own error logs (tracebacks from its writer threads) of a full disk:
    `DiskFullError` says it in one line, with what to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (_is_disk_full(error) or "No space left on device" in record.getMessage())


_QUIET = _QuietDiskFull()


def _size(path: epath.Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)


def _megabytes(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


# What a resume that does not fit its checkpoint can do; _save_config keeps the config
# the run was saved with as the newest config.<n>.json.
RESUME_HINT = ("resume with the config the run was saved with (the workdir's newest "
               "config.<n>.json) or train in a new workdir")
# What eval, predict or export can do when the workdir's config.json no longer describes
# the model its checkpoints hold (an edit of the file).
RESTORE_HINT = ("the workdir's config.json was changed after training: set these fields back "
                "to the checkpoint's values")


def _read_best_file(path: epath.Path) -> dict | None:
    return workdir_format.read_best(path.parent) if path.exists() else None


def _handlers() -> dict[str, ocp.CheckpointHandler]:
    # Explicit handlers let the manager read an item's metadata before restoring it.
    return {"params": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
            "sampler": ocp.JsonCheckpointHandler()}


def _key(k) -> str:
    # A field of optax's state tuples is an attribute in the live tree and a dict key in
    # orbax's metadata of it: both are named plainly, so that the two trees compare.
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    return str(k)  # a position: [i]


def _paths(tree) -> dict[str, tuple]:
    """'a/b/c' -> shape, for every leaf of a tree (arrays, shapes or orbax metadata)."""
    return {"/".join(_key(k) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_differences(saved, target, limit: int = 5, target_name: str = "the model"
                     ) -> list[str]:
    """Short lines naming the first missing, unexpected and mis-shaped param paths."""
    have, want = _paths(saved), _paths(target)
    out = []
    for label, names in (("missing from the checkpoint", sorted(set(want) - set(have))),
                         (f"not in {target_name}", sorted(set(have) - set(want)))):
        if names:
            more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
            out.append(f"{label}: {', '.join(names[:limit])}{more}")
    shapes = [f"{n} {have[n]} in the checkpoint, {want[n]} in {target_name}"
              for n in sorted(set(have) & set(want)) if have[n] != want[n]]
    if shapes:
        out.append("other shape: " + "; ".join(shapes[:limit])
                   + (f" (and {len(shapes) - limit} more)" if len(shapes) > limit else ""))
    return out


def _train_part(state) -> dict[str, Any]:
    return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}


def _abstract(tree):
    """Restore targets: a jax.Array keeps its sharding; a host (NumPy) value goes to this
    process's first device, whatever device layout the checkpoint was saved from."""
    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None:
            return x
        if isinstance(x, jax.Array):
            return ocp.utils.to_shape_dtype_struct(x)
        x = np.asarray(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                    sharding=jax.sharding.SingleDeviceSharding(
                                        jax.local_devices()[0]))
    return jax.tree.map(one, tree)


class Checkpoints:
    """The latest and best checkpoints of a workdir (module docstring).

    fingerprint: `workdir_format.fingerprint` of the config the model is built from: recorded
    with every save, checked at every restore (None: neither). for_training: this
    process trains into the workdir (holding its lock): partial steps a killed run left
    are removed, freeing their space."""

    def __init__(self, workdir: str | epath.PathLike, keep: int,
                 fingerprint: dict | None = None, for_training: bool = False):
        workdir = epath.Path(workdir)
        if not workdir.is_absolute():  # (epath's absolute() mangles gs:// paths)
            workdir = workdir.absolute()
        self.workdir = workdir
        self.fingerprint = fingerprint
        # Seconds from a save's call to its last file written, at most (the time budget's
        # margin, flaxpals/train/preemption.py); orbax writes in the background.
        self.slowest_save = 0.0
        self._save_started = 0.0
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=for_training,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._saved))
        self.latest = ocp.CheckpointManager(workdir / "checkpoints", options=options,
                                            item_handlers=_handlers())
        self.best = ocp.CheckpointManager(
            workdir / "best", options=ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, cleanup_tmp_directories=for_training),
            item_handlers=_handlers())
        self._best_file = workdir / "best.json"
        self._unrecorded_logged = False
        absl_logger = logging.getLogger("absl")  # orbax logs through absl
        if _QUIET not in absl_logger.filters:
            absl_logger.addFilter(_QUIET)

    @staticmethod
    def _args(state, sampler_state):
        return ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave(_train_part(state)),
            sampler=ocp.args.JsonSave(_jsonable(sampler_state)))

    def _metadata(self, **extra) -> dict:
        mine = {"fingerprint": self.fingerprint} if self.fingerprint is not None else {}
        return {"flaxpals": {**mine, **extra}}

    def save(self, step: int, state, sampler_state: dict, force: bool = False) -> None:
        self._wait(self.latest)  # the previous save's error, if any, surfaces here
        self._check_space(self.latest, step, state)
        self._save_started = time.monotonic()
        try:
            self.latest.save(step, args=self._args(state, sampler_state), force=force,
                             custom_metadata=self._metadata())
        except Exception as e:  # noqa: BLE001 - re-raised unless it is a full disk.
            self._raise_if_disk_full(e, self.latest)
            raise

    def _saved(self) -> None:  # in orbax's thread, when a save's files are written
        self.slowest_save = max(self.slowest_save, time.monotonic() - self._save_started)

    # ------------------------------------------------------------ a full disk

    def _last_good(self) -> str:
        step = self.latest.latest_step()
        if step is None:
            return "no checkpoint was saved yet"
        return f"the last good checkpoint is step {step} ({self.latest.directory / str(step)})"

    def _needed(self) -> int | None:
        """Bytes a new step takes: the size of the newest complete one, if any."""
        for manager in (self.latest, self.best):
            step = manager.latest_step()
            if step is not None:
                return _size(epath.Path(manager.directory) / str(step))
        return None

    def _check_space(self, manager: ocp.CheckpointManager, step: int, state) -> None:
        """Raises DiskFullError before a save that would not fit (local disks only): the
        size of the newest complete step, or before the first one the params' bytes (a
        step holds them and more)."""
        directory = epath.Path(manager.directory)
        if "://" in os.fspath(directory):
            return  # a bucket has no free space to ask about
        try:
            self._check_local_space(directory, step, state)
        except DiskFullError as e:
            parallel.raise_together(e)  # every process stops, none waits in orbax's save
        parallel.raise_together(None)

    def _check_local_space(self, directory, step: int, state) -> None:
        needed = self._needed()
        about = "about"
        if needed is None:
            needed = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                         for x in jax.tree.leaves(state.params))
            about = "at least"
        free = shutil.disk_usage(os.fspath(directory)).free
        margin = needed // 20 + 2**20  # files written beside it: metrics, events, best.json
        if free < needed + margin:
            raise DiskFullError(
                f"disk full: {directory} has {_megabytes(free)} free; checkpoint step {step} "
                f"needs {about} {_megabytes(needed + margin)}; not saved, {self._last_good()}. "
                f"Free {_megabytes(needed + margin - free)} or more there and run the same "
                "command again to resume")

    def _remove_partial(self, manager: ocp.CheckpointManager) -> list[str]:
        directory = epath.Path(manager.directory)
        partial = sorted(p for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name)
        if jax.process_index() == 0:
            for p in partial:
                shutil.rmtree(os.fspath(p), ignore_errors=True)
        return [p.name for p in partial]

    def _raise_if_disk_full(self, e: BaseException, manager: ocp.CheckpointManager) -> None:
        if not _is_disk_full(e):
            return
        try:  # let orbax's writer threads end before the partial step is removed
            manager.close()
        except Exception:  # noqa: BLE001 - the same failure again; it is being reported.
            pass
        removed = self._remove_partial(manager)
        free = shutil.disk_usage(os.fspath(manager.directory)).free \
            if "://" not in os.fspath(manager.directory) else None
        needed = self._needed()
        raise DiskFullError(
            f"disk full: a checkpoint save in {manager.directory} failed (No space left on "
            f"device)" + (f" with {_megabytes(free)} free" if free is not None else "")
            + (f"; a checkpoint needs about {_megabytes(needed)}" if needed else "")
            + (f"; removed the partial {', '.join(removed)}" if removed else "")
            + f"; {self._last_good()}. Free space there and run the same command again to "
            "resume") from None

    def _wait(self, manager: ocp.CheckpointManager) -> None:
        try:
            manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - re-raised unless it is a full disk.
            self._raise_if_disk_full(e, manager)
            raise

    # ------------------------------------------------------------ the best checkpoint

    def _recorded(self, manager: ocp.CheckpointManager, step: int) -> dict:
        """The flaxpals part of a step's custom metadata ({} if none or unreadable)."""
        try:
            custom = manager.metadata(step).custom_metadata or {}
        except Exception:  # noqa: BLE001 - an unreadable step records nothing.
            return {}
        return dict(custom.get("flaxpals") or {})

    def _score_of(self, step: int, metric: str | None, best_json: dict | None
                  ) -> tuple[str, float, str] | None:
        """(metric, score, where it was found) of best/<step>, or None if unknown."""
        recorded = self._recorded(self.best, step).get("best")
        if recorded and metric in (None, recorded["metric"]):
            return recorded["metric"], float(recorded["score"]), "the checkpoint"
        if best_json and best_json["step"] == step and metric in (None,
                                                                   best_json.get("metric")):
            return best_json.get("metric", metric), float(best_json["score"]), "best.json"
        metric = metric or (recorded or {}).get("metric") or (best_json or {}).get("metric")
        line = workdir_format.record_at(self.workdir, step)
        if metric and line and line.get(metric) is not None:
            return metric, float(line[metric]), "metrics.jsonl"
        return None

    def best_record(self, metric: str | None = None) -> dict | None:
        """{"step", "metric", "score"} of the best checkpoint on disk, or None when best/
        is empty. `metric`: the score wanted (eval.best_metric; None: the recorded one).
        With several steps in best/ (a kill between a save and the removal of the older),
        the higher score. Raises BestUnknownError when a step's score is known nowhere."""
        steps = sorted(self.best.all_steps())
        if not steps:
            return None
        best_json = _read_best_file(self._best_file)
        found = []
        for step in steps:
            score = self._score_of(step, metric, best_json)
            if score is None:
                raise BestUnknownError(
                    f"{self.best.directory / str(step)}: the best checkpoint's "
                    f"{metric or 'score'} is recorded nowhere (not in the checkpoint, "
                    f"best.json or metrics.jsonl), so training could replace it by a worse "
                    f"one; move it aside (mv {self.best.directory} "
                    f"{self.best.directory}-kept) to let training choose a new best")
            found.append((score[1], step, score[0]))
        score, step, metric = max(found)
        return {"step": step, "metric": metric, "score": score}

    def best_score(self, metric: str | None = None) -> float | None:
        """The best checkpoint's score (`best_record`), rewriting best.json from it when
        the file is missing or says otherwise (process 0; the trainer calls this)."""
        record = self.best_record(metric)
        if record is None:
            return None
        written = _read_best_file(self._best_file)
        if written != record and jax.process_index() == 0:
            what = "is missing" if written is None else f"said {written}"
            log.warning("best.json %s; best/ holds step %d (%s %.6g): rewrote best.json",
                        what, record["step"], record["metric"], record["score"])
            self._write_best_file(record)
        return record["score"]

    def _write_best_file(self, record: dict) -> None:
        tmp = self._best_file.parent / (self._best_file.name + ".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(self._best_file)

    def save_best(self, step: int, state, sampler_state: dict, score: float,
                  metric: str) -> None:
        # The latest's save in flight first: two managers' saves at once collide in
        # orbax's multi-host barriers (seen with two processes, at an epoch's end).
        self._wait(self.latest)
        self._wait(self.best)
        self._check_space(self.best, step, state)
        record = {"step": step, "metric": metric, "score": float(score)}
        try:
            self.best.save(step, args=self._args(state, sampler_state), force=True,
                           custom_metadata=self._metadata(best={"metric": metric,
                                                                "score": float(score)}))
        except Exception as e:  # noqa: BLE001 - re-raised unless it is a full disk.
            self._raise_if_disk_full(e, self.best)
            raise
        self._wait(self.best)
        if jax.process_index() == 0:
            self._write_best_file(record)

    # ------------------------------------------------------------ the model's fingerprint

    def check_fingerprint(self, manager: ocp.CheckpointManager, step: int, fix: str) -> None:
        """Raises CheckpointMismatchError when the step's recorded model differs from
        `self.fingerprint`; logs once when the step records none (an older flaxpals)."""
        if self.fingerprint is None:
            return
        recorded = self._recorded(manager, step).get("fingerprint")
        where = f"checkpoint {manager.directory / str(step)}"
        if recorded is None:
            if not self._unrecorded_logged:
                log.info("%s records no model fingerprint (saved by an earlier flaxpals): "
                         "its config is checked against the param shapes only", where)
                self._unrecorded_logged = True
            return
        diffs = workdir_format.fingerprint_differences(recorded, self.fingerprint)
        if diffs:
            raise CheckpointMismatchError(
                f"{where} holds another model than the config describes (checkpoint -> "
                "config): " + "; ".join(f"{f}: {a!r} -> {b!r}" for f, a, b in diffs)
                + f"; {fix}")

    def check_fits(self, manager: ocp.CheckpointManager, step: int, target_params,
                   target_train=None) -> None:
        """Raises CheckpointMismatchError, naming paths, when the saved param tree (or,
        given `target_train`, the optimiser state's tree) differs from the target's.

        Checked before restoring: a restore of a tree that does not fit fails as a damaged
        file would, and restore_latest would set every step aside and start over."""
        try:
            saved = manager.item_metadata(step)
        except Exception:  # noqa: BLE001 - unreadable metadata: the restore itself will say.
            return
        where = f"checkpoint {manager.directory}/{step}"
        diffs = tree_differences(saved["params"], target_params) \
            if saved.get("params") is not None else []
        if diffs:
            raise CheckpointMismatchError(f"{where} does not fit the model: " + "; ".join(diffs))
        if target_train is not None and saved.get("train") is not None:
            diffs = tree_differences(saved["train"], target_train, limit=2,
                                     target_name="this config's")
            if diffs:
                raise CheckpointMismatchError(
                    f"{where}: its optimiser state does not fit this config's (a train setting "
                    f"that shapes it changed: combiner, loss_weighting, ema_decay, trainable, "
                    f"..., or the flaxpals version that saved it); {RESUME_HINT}: "
                    + "; ".join(diffs))

    def _restore(self, manager: ocp.CheckpointManager, step: int, target):
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(target.params)),
            train=ocp.args.StandardRestore(_abstract(_train_part(target))),
            sampler=ocp.args.JsonRestore()))
        state = target.replace(params=restored["params"], **restored["train"])
        return state, restored["sampler"]

    def restore_latest(self, target) -> tuple[int, Any, dict] | None:
        """(step, state, sampler state) of the newest readable checkpoint, or None."""
        steps = sorted(self.latest.all_steps(), reverse=True)
        if steps:
            self.check_fingerprint(self.latest, steps[0], RESUME_HINT)
            self.check_fits(self.latest, steps[0], target.params, _train_part(target))
        for i, step in enumerate(steps):
            try:
                state, sampler = self._restore(self.latest, step, target)
            except (NameError, AttributeError, ImportError):
                raise  # our own bug, not a bad file: never start over because of it
            except Exception as e:  # noqa: BLE001 - orbax raises many kinds on bad files.
                fallback = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else (
                    "no older checkpoint: starting from scratch")
                kept = self._set_aside(step)
                log.warning("checkpoint step %s is unreadable (%s); moved to %s; %s", step,
                            type(e).__name__, kept, fallback)
                continue
            return step, state, sampler
        return None

    def _set_aside(self, step: int) -> epath.Path:
        """Moves an unreadable step out of the manager's way (a new save of that step would
        collide with it), keeping its files."""
        src = epath.Path(self.latest.directory) / str(step)
        dst = epath.Path(self.latest.directory).parent / "checkpoints-unreadable" / str(step)
        if jax.process_index() == 0 and src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.exists():
                dst = dst.parent / f"{step}-{len(list(dst.parent.iterdir()))}"
            src.rename(dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"flaxpals-set-aside-{step}")
        self.latest.reload()
        return dst

    def restore_params(self, target_params, which: str = "best", step: int | None = None):
        """(step, params) of the best checkpoint, or of `step` among the latest ones."""
        manager = self.best if which == "best" else self.latest
        if step is None:
            step = manager.latest_step()
            if which == "best" and len(manager.all_steps()) > 1:
                try:  # a kill between a new best's save and the older's removal
                    step = self.best_record()["step"]
                except BestUnknownError:
                    pass
        if step is None or step not in manager.all_steps():
            raise FileNotFoundError(
                f"no {which} checkpoint{'' if step is None else f' at step {step}'} in "
                f"{manager.directory} (steps there: {sorted(manager.all_steps())})")
        self.check_fingerprint(manager, step, RESTORE_HINT)
        self.check_fits(manager, step, target_params)
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(target_params))))
        return step, restored["params"]

    def wait(self) -> None:
        self._wait(self.latest)
        self._wait(self.best)

    def close(self) -> None:
        self.latest.close()
        self.best.close()
