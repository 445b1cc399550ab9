"""Orbax checkpoints of a run: the latest few, and the best by a dev score.

    <workdir>/checkpoints/<step>/{params,train,sampler}   latest, every N steps and each epoch
    <workdir>/best/<step>/{params,train,sampler}          the best so far (kept alone)

`params` is the model's param tree (all that eval and predict restore);
`train` the rest of the TrainState (optimiser state, step, dropout key);
`sampler` the task sampler's JSON state (RNG, step, epoch, positions).
Restoring the latest falls back to older steps when the newest is truncated
or corrupt, saying so.

In a multi-process job every process calls save and restore (orbax writes each
array's shards from the processes that hold them, and process 0 the metadata),
so the workdir must be storage all processes share: a gs:// bucket on a TPU pod.
`best.json` is written by process 0 only.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

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


# What a resume that does not fit its checkpoint can do; _save_config keeps the config
# the run was saved with as the newest config.<n>.json.
RESUME_HINT = ("resume with the config the run was saved with (the workdir's newest "
               "config.<n>.json) or train in a new workdir")


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
    def __init__(self, workdir: str | epath.PathLike, keep: int):
        workdir = epath.Path(workdir)
        if not workdir.is_absolute():  # (epath's absolute() mangles gs:// paths)
            workdir = workdir.absolute()
        # Seconds from a save's call to its last file written, at most (the time budget's
        # margin, flaxpals/preemption.py); orbax writes in the background.
        self.slowest_save = 0.0
        self._save_started = 0.0
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._saved))
        self.latest = ocp.CheckpointManager(workdir / "checkpoints", options=options,
                                            item_handlers=_handlers())
        self.best = ocp.CheckpointManager(
            workdir / "best", options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
            item_handlers=_handlers())
        self._best_file = workdir / "best.json"

    @staticmethod
    def _args(state, sampler_state):
        return ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave(_train_part(state)),
            sampler=ocp.args.JsonSave(_jsonable(sampler_state)))

    def save(self, step: int, state, sampler_state: dict, force: bool = False) -> None:
        self._save_started = time.monotonic()
        self.latest.save(step, args=self._args(state, sampler_state), force=force)

    def _saved(self) -> None:  # in orbax's thread, when a save's files are written
        self.slowest_save = max(self.slowest_save, time.monotonic() - self._save_started)

    def best_score(self) -> float | None:
        if self._best_file.exists():
            return json.loads(self._best_file.read_text())["score"]
        return None

    def save_best(self, step: int, state, sampler_state: dict, score: float,
                  metric: str) -> None:
        self.best.save(step, args=self._args(state, sampler_state), force=True)
        self.best.wait_until_finished()
        if jax.process_index() == 0:
            self._best_file.write_text(json.dumps({"step": step, "metric": metric,
                                                   "score": score}))

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
        if step is None or step not in manager.all_steps():
            raise FileNotFoundError(
                f"no {which} checkpoint{'' if step is None else f' at step {step}'} in "
                f"{manager.directory} (steps there: {sorted(manager.all_steps())})")
        self.check_fits(manager, step, target_params)
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(target_params))))
        return step, restored["params"]

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()
