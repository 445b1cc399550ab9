"""Training and evaluation steps, pure functions of the state and a batch.

- `train_step(state, batch, task)`: one task's batch. Only the shared encoder
  and this task's adapter and head move (`task_params.keep_other_tasks`);
  metrics {"loss", "grad_norm"}.
- `additive_step(state, batches)`: one batch of every task; each task's
  gradient (`task_grads`), then the combiner over them (a sum, or a combiner
  or loss weighting on the gradients stacked on a leading task axis) and the
  optimiser (`apply_combined`); metrics {"loss/<task>", "grad_norm", ...}.
- `predict_step(params, batch, task)`: model outputs for evaluation.

`task` is data: an int32 index into the model's tasks, traced, so one program
serves every task of a batch structure and length (`models.MultiTaskModel`
picks the task's adapters and head with `nn.switch`, `heads.task_loss` its
loss; predictions come padded to `model.output_width`, `heads.unpad` on the host
recovers the task's own). A name or a Python int still works (static: only that
task is traced; the additive step uses that inside its one program).

`jitted(mesh, state_sharding, ...)` compiles them for data parallelism: batch
arrays split over the mesh's 'data' axis, the task index replicated, the state
as `state_sharding` says (replicated, or FSDP-split; see parallel.py), the
state donated. With one padded length per run (`fixed_shapes`) the additive
step is one program; with length buckets it is two parts, `task_grads` per batch
structure and length and one `apply_combined`, since each task's batch has its
own length and one program over all of them would compile once per combination
of lengths. The per-batch steps are `by_length.ByLength` (traced once per batch
structure, the length symbolic). The steps are written for one global batch:
the loss is the mean over all of its rows, and XLA inserts the cross-device
reductions.

Dropout keys are derived as fold_in(fold_in(state.rng, step), task index), so a
resumed run draws the same masks as an uninterrupted one, whether the task is
traced or static.

With `smart` (smart.py) the loss of a batch is SMART's regularised loss; its
Bregman term reads the EMA params from the optimiser state (optim.ema_params),
which is why `for_gradients` keeps that part of it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from flaxpals.model import heads
from flaxpals.model.multitask import MultiTaskModel
from flaxpals.mtl import core
from flaxpals.mtl.task_params import keep_other_tasks
from flaxpals.train import optim, parallel
from flaxpals.train import smart as smart_lib
from flaxpals.train.by_length import ByLength

# Batch keys the model reads (a packed batch's too); the rest (example ids, labels,
# mask) stay outside.
MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "input_ids_2",
              "attention_mask_2", "token_type_ids_2", "segment_ids", "position_ids",
              "example", "example_2")
DEVICE_KEYS = MODEL_KEYS + ("labels", "mask")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimiser steps taken
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 key data of the dropout stream


def device_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The arrays a step needs (drops host-only fields such as example ids); labels as
    float32, so that every task's batch has one structure (class ids stay exact)."""
    out = {k: v for k, v in batch.items() if k in DEVICE_KEYS}
    if "labels" in out:
        out["labels"] = out["labels"].astype("float32")
    return out


@dataclasses.dataclass(frozen=True)
class Steps:
    model: MultiTaskModel
    tx: optax.GradientTransformation
    # Whether `tx` takes per-task gradients (and losses) rather than their sum: it holds
    # a combiner or loss weighting (`combiners.from_config` gave one, not None).
    stacked: bool = False
    smart: smart_lib.SmartOptions | None = None  # SMART regularisation; None: off

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.model.tasks)

    def _index(self, task):
        """A name -> its index (static); an index, traced or not, as it is."""
        return self.model.task_index(task) if isinstance(task, str) else task

    def _dropout_key(self, state: TrainState, task) -> jax.Array:
        key = jax.random.wrap_key_data(state.rng)
        return jax.random.fold_in(jax.random.fold_in(key, state.step), self._index(task))

    def loss(self, params, batch, task, key, anchor=None) -> jax.Array:
        """The loss of one task's batch; `anchor`: the EMA params (SMART's Bregman term)."""
        if self.smart is not None:
            return smart_lib.regularised_loss(self.model, params, batch, task, key,
                                              self.smart, anchor)
        outputs = self.model.apply({"params": params}, batch, task, deterministic=False,
                                   rngs={"dropout": key})
        return heads.task_loss(self.model.tasks, task, outputs, batch["labels"], batch["mask"])

    def _anchor(self, state: TrainState):
        """The EMA params when SMART's Bregman term needs them, else None."""
        if self.smart is None or not self.smart.bregman_weight:
            return None
        return optim.ema_params(state.opt_state)

    def train_step(self, state: TrainState, batch, task):
        loss, grads = jax.value_and_grad(self.loss)(state.params, batch, task,
                                                    self._dropout_key(state, task),
                                                    self._anchor(state))
        return self._apply(state, grads, {"loss": loss}, task)

    def task_grads(self, state: TrainState, batch, task):
        """(loss [], gradient with params' tree) of one task's batch at state.params.

        `state` as `for_gradients` gives it (no optimiser moments)."""
        return jax.value_and_grad(self.loss)(state.params, batch, task,
                                             self._dropout_key(state, task),
                                             self._anchor(state))

    def apply_combined(self, state: TrainState, losses: Mapping[str, jax.Array],
                       grads: Mapping[str, Any]):
        """The combiner over every task's gradient (task order), then the optimiser.

        The sum combiner gets the summed gradient (that of the summed loss); the
        other combiners and the loss weightings get them stacked on a leading task
        axis, leaves [tasks, ...], and the losses stacked [tasks] as `losses=`.
        """
        names = self.task_names
        per_task = [grads[t] for t in names]
        metrics = {f"loss/{t}": losses[t] for t in names}
        if not self.stacked:
            return self._apply(state, jax.tree.map(lambda *g: core.task_sum(g), *per_task),
                               metrics)
        stacked = jax.tree.map(lambda *g: jnp.stack(g), *per_task)
        return self._apply(state, stacked, metrics,
                           losses=jnp.stack([losses[t] for t in names]))

    def additive_step(self, state: TrainState, batches: Mapping[str, Any]):
        """One batch of every task (task -> batch), as one pure function."""
        return additive_from_parts(self.task_grads, self.apply_combined, self.task_names,
                                   state, batches, lambda t: t)

    def _apply(self, state: TrainState, grads, metrics, task=None, **extra):
        """The optimiser update; with `task`, other tasks' params and moments stay put.
        `extra`: extra arguments for the transformations that take them (`losses`)."""
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        if task is not None:
            params, opt_state = keep_other_tasks((params, opt_state),
                                                 (state.params, state.opt_state),
                                                 task, self.task_names)
        metrics["grad_norm"] = optax.global_norm(grads)
        if task is None:  # the combiner's coefficients, shares and norms, when it keeps them
            metrics.update(core.step_stats(opt_state, self.task_names))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def predict_step(self, params, batch, task) -> jax.Array:
        """The task's outputs (padded for a traced task); `heads.predictions` decides on
        the host."""
        return self.model.apply({"params": params}, batch, task)

    def jitted(self, mesh: Mesh | None = None, state_sharding=None,
               symbolic_length: bool = True, fixed_shapes: bool = False):
        """(train_step, additive_step, predict_step) compiled with the state donated;
        train_step and predict_step take the task as an int32 index (`task_indices`),
        additive_step the batches of every task.

        With a mesh: batches split over its 'data' axis, the task index replicated, the
        state laid out by `state_sharding` (a TrainState of NamedShardings,
        `parallel.state_shardings`), metrics replicated, predictions split like the batch.
        The per-batch steps are `by_length.ByLength`: traced once per batch structure
        with the length symbolic (`symbolic_length`), else once per length.
        `fixed_shapes` (one padded length per run): the additive step is one program;
        else a Python function over two jitted parts, in its `parts` attribute:
        (task_grads, apply_combined).
        """
        def sharded(ins, outs):
            return {} if mesh is None else {"in_shardings": ins, "out_shardings": outs}

        data = rep = params = grads_state = per_task_data = per_task_params = None
        if mesh is not None:
            data, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
            params, grads_state = state_sharding.params, for_gradients(state_sharding)
            per_task_data = {t: data for t in self.task_names}
            per_task_params = {t: params for t in self.task_names}
        shardings = sharded((state_sharding, data, rep), (state_sharding, rep))
        train = ByLength(jax.jit(self.train_step, donate_argnums=0, **shardings),
                         donate_argnums=0, enabled=symbolic_length, **shardings)
        if fixed_shapes:
            additive = jax.jit(self.additive_step, donate_argnums=0,
                               **sharded((state_sharding, per_task_data), (state_sharding, rep)))
        else:
            shardings = sharded((grads_state, data, rep), (rep, params))
            grads = ByLength(jax.jit(self.task_grads, **shardings), enabled=symbolic_length,
                             **shardings)
            apply = jax.jit(self.apply_combined, donate_argnums=0,
                            **sharded((state_sharding, rep, per_task_params),
                                      (state_sharding, rep)))
            additive = self._composed(grads, apply, mesh)
        return train, additive, self.jitted_predict(mesh, params, symbolic_length)

    def _composed(self, grads, apply, mesh):
        names = self.task_names
        # Put on the devices when first run (a program compiled for devices this process
        # cannot run on needs none).
        indices = functools.cache(lambda: task_indices(names, mesh))

        def additive_step(state: TrainState, batches: Mapping[str, Any]):
            return additive_from_parts(grads, apply, names, state, batches,
                                       lambda t: indices()[t])

        additive_step.parts = (grads, apply)
        return additive_step

    def jitted_predict(self, mesh: Mesh | None = None, params_sharding=None,
                       symbolic_length: bool = True):
        """predict_step compiled (a `ByLength`, as `jitted`'s); with a mesh, params as
        `params_sharding`, the task index replicated, batch and predictions split over
        'data'."""
        shardings = {}
        if mesh is not None:
            data = parallel.batch_sharding(mesh)
            shardings = {"in_shardings": (params_sharding, data, parallel.replicated(mesh)),
                         "out_shardings": data}
        return ByLength(jax.jit(self.predict_step, **shardings), enabled=symbolic_length,
                        **shardings)


def task_indices(names, mesh: Mesh | None = None) -> dict[str, jax.Array]:
    """name -> its index as an int32 scalar on the devices (replicated over the mesh):
    what the jitted steps take as `task`, made once, so passing one costs no transfer."""
    if mesh is None:
        return {t: jnp.int32(i) for i, t in enumerate(names)}
    rep = parallel.replicated(mesh)
    return {t: parallel.put(np.int32(i), rep) for i, t in enumerate(names)}


def additive_from_parts(task_grads, apply_combined, names, state, batches, index):
    """additive_step from its parts: the gradients of every task, then one update;
    index(name): the task argument task_grads takes."""
    # Positional arguments: jit takes no keyword arguments once in_shardings is given.
    out = {t: task_grads(for_gradients(state), batches[t], index(t)) for t in names}
    return apply_combined(state, {t: out[t][0] for t in names}, {t: out[t][1] for t in names})


def for_gradients(state: TrainState) -> TrainState:
    """What task_grads reads: the state less its optimiser moments, so its compiled
    programs do not depend on the optimiser (the sum and PCGrad share them). Of the
    optimiser state only the EMA params stay (optim.ema_state; None without one),
    for SMART's Bregman term."""
    return state.replace(opt_state=optim.ema_state(state.opt_state))
