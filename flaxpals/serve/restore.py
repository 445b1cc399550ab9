"""A trained workdir restored for inference: its config.json, the model it defines,
the best (or a given step's) parameters on the mesh, and the predict program.

    r = restore(workdir, config=None, step=None)   # the run's own config.json
    r.predict(r.params, batch, task)               # a task's padded outputs

A given config may change only what chooses data or evaluation
(`workdir_format.config_for_restore`); the checkpoint's model fingerprint is
checked against the config. Every reader of a trained run (eval files, the
Predictor, ensembles, the exporter) starts here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from flaxpals import workdir_format
from flaxpals.data import tasks as tasks_lib
from flaxpals.model import build
from flaxpals.train import compilation, parallel
from flaxpals.train.checkpointing import Checkpoints
from flaxpals.train.programs import Programs


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
    config = workdir_format.config_for_restore(workdir, config)
    compilation.enable_cache(config)
    mesh = parallel.make_mesh()
    parallel.process_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    model, shapes, tokenizer, tasks = build.abstract_model(config)

    def load(target):
        ckpts = Checkpoints(workdir, config.checkpoint.keep, workdir_format.fingerprint(config))
        try:
            return ckpts.restore_params(target, "best" if step is None else "latest", step)
        finally:
            ckpts.close()

    return for_inference(config, model, shapes, tokenizer, tasks, mesh, load)


def for_inference(config, model, shapes, tokenizer, tasks, mesh,
                  load: Callable[[Any], tuple[int, Any]]) -> Restored:
    """The tail every restore shares (a workdir's checkpoint, an exported directory): the
    params laid out on `mesh` (FSDP-split per config.parallel.fsdp) as `load(target)`
    gives them, (step, params), target being `shapes` with their shardings; then the
    model's predict program."""
    sharding = parallel.state_shardings(shapes, mesh, config.parallel.fsdp)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, sharding)
    step, params = load(target)
    predict = Programs.inference(model, mesh, sharding, config.symbolic_length).predict
    return Restored(config, model, params, tokenizer, tasks, step, mesh, predict)
