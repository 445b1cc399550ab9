"""Which parameters belong to which task: masks, isolation, parameter accounting.

A leaf belongs to task t when t is one of the dictionary keys on its path; every
other leaf is shared. Expected model tree (any nesting works, as long as each
task's parameters sit under a key equal to the task's name):

    {"encoder":  {...plain BERT tree...},               shared
     "adapters": {"<task>": {...}, ...},                task-specific (adapters.py)
     "heads":    {"<task>": {...}, ...}}                task-specific

The rule looks only at keys, so it applies unchanged to optimiser states whose
fields mirror the parameter tree (optax's ScaleByAdamState mu/nu, the
parameters' shape inside `add_decayed_weights` masks, ...): `keep_other_tasks`
uses it to freeze another task's parameters *and* its moments.

A train step on task t must end with

    new_params, new_opt_state = keep_other_tasks(
        (new_params, new_opt_state), (params, opt_state), task, tasks)

so that neither the gradient (zero for other tasks anyway), nor decoupled weight
decay, nor Adam's momentum (non-zero from earlier steps on other tasks) moves
another task's adapter or head, and their moments do not decay either. Leaves
outside any task (the encoder, step counters) take the new value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from flaxpals.model.adapters import validate_tasks

PyTree = Any


def _keys(path) -> list[str]:
    """The dictionary keys on a tree path (attribute names such as an optimiser
    state's `count` or `mu` are not dictionary keys and never name a task)."""
    return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def owner(path, tasks: Sequence[str]) -> str | None:
    """The task a leaf at `path` belongs to, or None for a shared leaf."""
    found = {k for k in _keys(path) if k in tasks}
    if len(found) > 1:
        raise ValueError(f"path {jax.tree_util.keystr(path)} contains several task names "
                         f"{sorted(found)}")
    return found.pop() if found else None


def task_param_mask(params: PyTree, task: str, tasks: Sequence[str]) -> PyTree:
    """True where a step on `task` may change the leaf: shared leaves and `task`'s own.

    False for the adapters and heads of every other task.
    """
    tasks = validate_tasks(tasks)
    if task not in tasks:
        raise ValueError(f"unknown task {task!r}; tasks are {tasks}")
    return jax.tree_util.tree_map_with_path(
        lambda p, _: owner(p, tasks) in (None, task), params)


def shared_param_mask(params: PyTree, tasks: Sequence[str]) -> PyTree:
    """True for parameters no task owns (the encoder), False for task-specific ones."""
    tasks = validate_tasks(tasks)
    return jax.tree_util.tree_map_with_path(lambda p, _: owner(p, tasks) is None, params)


def keep_other_tasks(new: PyTree, old: PyTree, task, tasks: Sequence[str]) -> PyTree:
    """`new`, except that leaves owned by a task other than `task` come from `old`.

    new, old: trees of the same structure (e.g. (params, opt_state) before and
    after an update). `task`: a name (static: each leaf is picked at trace time), or
    a traced int32 index into `tasks` (each task-owned leaf is `new` where its owner
    is the task, else `old`, chosen on the device; shared leaves are `new`).
    """
    if isinstance(task, str):
        mask = task_param_mask(new, task, tasks)
        return jax.tree_util.tree_map(lambda m, n, o: n if m else o, mask, new, old)
    tasks = validate_tasks(tasks)

    def pick(path, n, o):
        t = owner(path, tasks)
        return n if t is None else jax.numpy.where(task == tasks.index(t), n, o)

    return jax.tree_util.tree_map_with_path(pick, new, old)


def _size(x) -> int:
    return int(np.prod(np.shape(x), dtype=np.int64))


def param_accounting(params: PyTree, tasks: Sequence[str],
                     encoder_key: str = "encoder") -> dict[str, Any]:
    """Parameter counts of a multi-task model.

    params: the model's "params" collection (arrays or jax.ShapeDtypeStruct).
    Returns {"total", "encoder" (params[encoder_key]), "shared" (owned by no task),
    "tasks": {task: {top-level key: count, ..., "total": n}},
    "ratio": total / encoder, "ratio_by_key": {top-level key: (encoder + that key's
    leaves) / encoder}} -- e.g. ratio_by_key["adapters"] is the paper's figure
    (encoder plus all adapters, heads excluded).
    """
    tasks = validate_tasks(tasks)
    if encoder_key not in params:
        raise KeyError(f"no {encoder_key!r} in the parameter tree (keys: {sorted(params)})")
    encoder = sum(_size(x) for x in jax.tree_util.tree_leaves(params[encoder_key]))
    per_task = {t: {} for t in tasks}
    by_key: dict[str, int] = {}
    shared = total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        n = _size(leaf)
        total += n
        top = _keys(path)[0] if _keys(path) else ""
        t = owner(path, tasks)
        if t is None:
            shared += n
        else:
            per_task[t][top] = per_task[t].get(top, 0) + n
        by_key[top] = by_key.get(top, 0) + n
    for counts in per_task.values():
        counts["total"] = sum(counts.values())
    return {
        "total": total, "encoder": encoder, "shared": shared, "tasks": per_task,
        "ratio": total / encoder,
        "ratio_by_key": {k: (encoder + n) / encoder for k, n in by_key.items()
                         if k != encoder_key},
    }


def format_accounting(acc: dict[str, Any]) -> str:
    """A few lines for the run log."""
    lines = [f"parameters: total {acc['total']:,}; encoder {acc['encoder']:,}; "
             f"shared {acc['shared']:,}; total/encoder {acc['ratio']:.4f}"]
    for t, counts in acc["tasks"].items():
        parts = ", ".join(f"{k} {n:,}" for k, n in counts.items() if k != "total")
        lines.append(f"  task {t}: {counts['total']:,} ({parts})")
    for k, r in acc["ratio_by_key"].items():
        lines.append(f"  (encoder + all {k}) / encoder = {r:.4f}")
    return "\n".join(lines)
