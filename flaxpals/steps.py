"""Jitted training and evaluation steps.

- `train_step(state, batch, task)`: one task's batch; `task` is static, so XLA
  compiles one function per task and bucket length. Only the shared encoder and
  this task's adapter and head move (`task_params.keep_other_tasks`).
- `additive_step(state, batches)`: one batch of every task; each task's
  gradient (`task_grads`), then the combiner over them (a sum, or a combiner
  or loss weighting on the gradients stacked on a leading task axis) and the
  optimiser (`apply_combined`).
- `predict_step(params, batch, task)`: model outputs (logits or scores) for evaluation.

`jitted(mesh, state_sharding)` compiles them for data parallelism, the per-batch
steps traced once per task for all bucket lengths (`by_length.ByLength`). The additive
step is compiled in parts, `task_grads` per task and bucket length and one
`apply_combined`: each task's batch has its own bucket length, so one jitted
function over all tasks' batches would compile once per combination of
lengths (4 buckets, 3 tasks: up to 64 programs of 16-65 s on a CPU) where
the parts compile tasks x buckets + 1 times. Every batch
array split over the mesh's 'data' axis, the state as `state_sharding` says
(replicated, or FSDP-split; see parallel.py), the state donated. The steps
themselves are written for one global batch: the loss is the mean over all of
its rows, and XLA inserts the cross-device reductions.

Dropout keys are derived as fold_in(fold_in(state.rng, step), task index), so a
resumed run draws the same masks as an uninterrupted one.

With `smart` (smart.py) the loss of a batch is SMART's regularised loss; its
Bregman term reads the EMA params from the optimiser state (optim.ema_params),
which is why `for_gradients` keeps that part of it. Without `smart` the loss is
the plain one, computed as it always was.
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

from flaxpals import gradmtl, heads, optim, parallel
from flaxpals import smart as smart_lib
from flaxpals.by_length import ByLength
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
    combiner: str = "sum"  # config_lib.combiner(config.train) (combiners.COMBINERS)
    loss_weighting: str = "none"  # config.train.loss_weighting (weighting.LOSS_WEIGHTINGS)
    smart: smart_lib.SmartOptions | None = None  # SMART regularisation; None: off

    @property
    def stacked(self) -> bool:
        """Whether `tx` takes per-task gradients (and losses) rather than their sum."""
        return self.combiner != "sum" or self.loss_weighting != "none"

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.model.tasks)

    def _dropout_key(self, state: TrainState, task: str) -> jax.Array:
        key = jax.random.wrap_key_data(state.rng)
        return jax.random.fold_in(jax.random.fold_in(key, state.step),
                                  self.task_names.index(task))

    def loss(self, params, batch, task: str, key, anchor=None) -> jax.Array:
        """The loss of one task's batch; `anchor`: the EMA params (SMART's Bregman term)."""
        if self.smart is not None:
            return smart_lib.regularised_loss(self.model, params, batch, task, key,
                                              self.smart, anchor)
        outputs = self.model.apply({"params": params}, batch, task, deterministic=False,
                                   rngs={"dropout": key})
        return heads.loss_fn(self.model.task(task).kind, outputs, batch["labels"], batch["mask"])

    def _anchor(self, state: TrainState):
        """The EMA params when SMART's Bregman term needs them, else None."""
        if self.smart is None or not self.smart.bregman_weight:
            return None
        return optim.ema_params(state.opt_state)

    def train_step(self, state: TrainState, batch, task: str):
        loss, grads = jax.value_and_grad(self.loss)(state.params, batch, task,
                                                    self._dropout_key(state, task),
                                                    self._anchor(state))
        return self._apply(state, grads, {f"loss/{task}": loss}, task)

    def task_grads(self, state: TrainState, batch, task: str):
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
            return self._apply(state, jax.tree.map(lambda *g: gradmtl.task_sum(g), *per_task),
                               metrics)
        stacked = jax.tree.map(lambda *g: jnp.stack(g), *per_task)
        return self._apply(state, stacked, metrics,
                           losses=jnp.stack([losses[t] for t in names]))

    def additive_step(self, state: TrainState, batches: Mapping[str, Any]):
        """One batch of every task (task -> batch), as one pure function."""
        return additive_from_parts(self.task_grads, self.apply_combined, self.task_names,
                                   state, batches)

    def _apply(self, state: TrainState, grads, metrics, task: str | None = None, **extra):
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
            metrics.update(gradmtl.step_stats(opt_state, self.task_names))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def predict_step(self, params, batch, task: str) -> jax.Array:
        """The task's outputs (logits or scores); `heads.predictions` decides on the host."""
        return self.model.apply({"params": params}, batch, task)

    def jitted(self, mesh: Mesh | None = None, state_sharding=None,
               symbolic_length: bool = True):
        """(train_step, additive_step, predict_step) compiled with the state donated.

        additive_step is a Python function over two jitted parts (module
        docstring); its `parts` attribute holds them: (task_grads, apply_combined).
        With a mesh: batches split over its 'data' axis, the state laid out by
        `state_sharding` (a TrainState of NamedShardings, `parallel.state_shardings`),
        gradients laid out like the params, metrics replicated, predictions split
        like the batch. The per-batch steps are `by_length.ByLength`: traced once per
        task with the length symbolic (`symbolic_length`), else once per length.
        """
        if mesh is None:
            train = ByLength(jax.jit(self.train_step, static_argnames="task", donate_argnums=0),
                             donate_argnums=0, enabled=symbolic_length)
            grads = ByLength(jax.jit(self.task_grads, static_argnames="task"),
                             enabled=symbolic_length)
            apply = jax.jit(self.apply_combined, donate_argnums=0)
            return (train, self._composed(grads, apply),
                    self.jitted_predict(symbolic_length=symbolic_length))
        data, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
        shardings = {"in_shardings": (state_sharding, data),
                     "out_shardings": (state_sharding, rep)}
        train = ByLength(jax.jit(self.train_step, static_argnames="task", donate_argnums=0,
                                 **shardings), donate_argnums=0, enabled=symbolic_length,
                         **shardings)
        shardings = {"in_shardings": (for_gradients(state_sharding), data),
                     "out_shardings": (rep, state_sharding.params)}
        grads = ByLength(jax.jit(self.task_grads, static_argnames="task", **shardings),
                         enabled=symbolic_length, **shardings)
        per_task = {t: state_sharding.params for t in self.task_names}
        apply = jax.jit(self.apply_combined, donate_argnums=0,
                        in_shardings=(state_sharding, rep, per_task),
                        out_shardings=(state_sharding, rep))
        return (train, self._composed(grads, apply),
                self.jitted_predict(mesh, state_sharding.params, symbolic_length))

    def _composed(self, grads, apply):
        names = self.task_names

        def additive_step(state: TrainState, batches: Mapping[str, Any]):
            return additive_from_parts(grads, apply, names, state, batches)

        additive_step.parts = (grads, apply)
        return additive_step

    def jitted_predict(self, mesh: Mesh | None = None, params_sharding=None,
                       symbolic_length: bool = True):
        """predict_step compiled (a `ByLength`, as `jitted`'s); with a mesh, params as
        `params_sharding`, batch and predictions split over 'data'."""
        if mesh is None:
            return ByLength(jax.jit(self.predict_step, static_argnames="task"),
                            enabled=symbolic_length)
        data = parallel.batch_sharding(mesh)
        shardings = {"in_shardings": (params_sharding, data), "out_shardings": data}
        return ByLength(jax.jit(self.predict_step, static_argnames="task", **shardings),
                        enabled=symbolic_length, **shardings)


def additive_from_parts(task_grads, apply_combined, names, state, batches):
    """additive_step from its parts: the gradients of every task, then one update."""
    # `task` positionally: jit takes no keyword arguments once in_shardings is given.
    out = {t: task_grads(for_gradients(state), batches[t], t) for t in names}
    return apply_combined(state, {t: out[t][0] for t in names}, {t: out[t][1] for t in names})


def for_gradients(state: TrainState) -> TrainState:
    """What task_grads reads: the state less its optimiser moments, so its compiled
    programs do not depend on the optimiser (the sum and PCGrad share them). Of the
    optimiser state only the EMA params stay (optim.ema_state; None without one),
    for SMART's Bregman term."""
    return state.replace(opt_state=optim.ema_state(state.opt_state))
