"""Jitted training and evaluation steps.

- `train_step(state, batch, task)`: one task's batch; `task` is static, so XLA
  compiles one function per task and bucket length. Only the shared encoder and
  this task's adapter and head move (`task_params.keep_other_tasks`).
- `additive_step(state, batches)`: one batch of every task; the per-task
  gradients go through the combiner (a sum, or PCGrad), then the optimiser.
  With the plain sum the gradient of the summed loss is taken directly (one
  backward pass over all tasks' graphs); PCGrad needs them apart, stacked on a
  leading task axis.
- `predict_step(params, batch, task)`: model outputs for evaluation.

`jitted(mesh, state_sharding)` compiles them for data parallelism: every batch
array split over the mesh's 'data' axis, the state as `state_sharding` says
(replicated, or FSDP-split; see parallel.py), the state donated. The steps
themselves are written for one global batch: the loss is the mean over all of
its rows, and XLA inserts the cross-device reductions.

Dropout keys are derived as fold_in(fold_in(state.rng, step), task index), so a
resumed run draws the same masks as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from flaxpals import heads, parallel
from flaxpals.models import MultiTaskModel
from flaxpals.task_params import keep_other_tasks

# Batch keys the model reads; the rest (example ids, labels, mask) stay outside.
MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "input_ids_2",
              "attention_mask_2", "token_type_ids_2")
DEVICE_KEYS = MODEL_KEYS + ("labels", "mask")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimiser steps taken
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 key data of the dropout stream


def device_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The arrays a step needs (drops host-only fields such as example ids)."""
    return {k: v for k, v in batch.items() if k in DEVICE_KEYS}


@dataclasses.dataclass(frozen=True)
class Steps:
    model: MultiTaskModel
    tx: optax.GradientTransformation
    combiner: str = "sum"  # sum | pcgrad

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.model.tasks)

    def _dropout_key(self, state: TrainState, task: str) -> jax.Array:
        key = jax.random.wrap_key_data(state.rng)
        return jax.random.fold_in(jax.random.fold_in(key, state.step),
                                  self.task_names.index(task))

    def loss(self, params, batch, task: str, key) -> jax.Array:
        outputs = self.model.apply({"params": params}, batch, task, deterministic=False,
                                   rngs={"dropout": key})
        return heads.loss_fn(self.model.task(task).kind, outputs, batch["labels"], batch["mask"])

    def train_step(self, state: TrainState, batch, task: str):
        loss, grads = jax.value_and_grad(self.loss)(state.params, batch, task,
                                                    self._dropout_key(state, task))
        return self._apply(state, grads, {f"loss/{task}": loss}, task)

    def additive_step(self, state: TrainState, batches: Mapping[str, Any]):
        names = self.task_names

        def task_loss(params, task):
            return self.loss(params, batches[task], task, self._dropout_key(state, task))

        if self.combiner == "sum":
            def total(params):
                losses = [task_loss(params, t) for t in names]
                return sum(losses), losses
            (_, losses), grads = jax.value_and_grad(total, has_aux=True)(state.params)
        else:
            losses, per_task = zip(*[jax.value_and_grad(task_loss)(state.params, t)
                                     for t in names], strict=True)
            grads = jax.tree.map(lambda *g: jnp.stack(g), *per_task)
        return self._apply(state, grads,
                           {f"loss/{t}": loss for t, loss in zip(names, losses, strict=True)})

    def _apply(self, state: TrainState, grads, metrics, task: str | None = None):
        """The optimiser update; with `task`, other tasks' params and moments stay put."""
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if task is not None:
            params, opt_state = keep_other_tasks((params, opt_state),
                                                 (state.params, state.opt_state),
                                                 task, self.task_names)
        metrics["grad_norm"] = optax.global_norm(grads)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def predict_step(self, params, batch, task: str) -> jax.Array:
        outputs = self.model.apply({"params": params}, batch, task)
        return heads.predictions(self.model.task(task).kind, outputs)

    def jitted(self, mesh: Mesh | None = None, state_sharding=None):
        """(train_step, additive_step, predict_step) compiled with the state donated.

        With a mesh: batches split over its 'data' axis, the state laid out by
        `state_sharding` (a TrainState of NamedShardings, `parallel.state_shardings`),
        metrics replicated, predictions split like the batch.
        """
        if mesh is None:
            return (jax.jit(self.train_step, static_argnames="task", donate_argnums=0),
                    jax.jit(self.additive_step, donate_argnums=0), self.jitted_predict())
        data, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
        shardings = {"in_shardings": (state_sharding, data),
                     "out_shardings": (state_sharding, rep), "donate_argnums": 0}
        return (jax.jit(self.train_step, static_argnames="task", **shardings),
                jax.jit(self.additive_step, **shardings),
                self.jitted_predict(mesh, state_sharding.params))

    def jitted_predict(self, mesh: Mesh | None = None, params_sharding=None):
        """predict_step compiled; with a mesh, params as `params_sharding`, batch and
        predictions split over 'data'."""
        if mesh is None:
            return jax.jit(self.predict_step, static_argnames="task")
        data = parallel.batch_sharding(mesh)
        return jax.jit(self.predict_step, static_argnames="task",
                       in_shardings=(params_sharding, data), out_shardings=data)
