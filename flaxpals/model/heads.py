"""Task heads, their losses and their predictions, one per task kind.

- classification (one sentence): dropout + linear; cross entropy; argmax.
- pair_classification, bi-encoder: dropout + a shared linear map of each
  sentence's vector, their dot product as the logit; BCE with logits; logit > 0.
- pair_classification, cross-encoder ([CLS] a [SEP] b [SEP]): dropout + linear
  to one logit; BCE with logits; logit > 0.
- pair_regression, bi-encoder: the dot product above (`dot`) or the cosine of
  the two vectors mapped from [-1, 1] to [0, 5] (`cosine`); MSE; the score.
- pair_regression, cross-encoder: dropout + linear to one score; MSE.

The bi-encoder pair heads follow the seed's design (a shared projection of
each sentence's embedding, then their dot product).

One program serves every task when the task is a traced index (`by_task` picks
the task's branch with `lax.switch`): every task's outputs are then padded to a
common width, [batch, width], the task's own in the first columns (`width`,
`pad`, `unpad`), and labels reach the loss as float32 (class ids are exact).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxpals.model.dropout import Dropout

Array = jax.Array

SIMILARITY_HEADS = ("dot", "cosine")


class ClassifierHead(nn.Module):
    """pooled: [batch, hidden] -> logits [batch, num_outputs] (squeezed when 1)."""

    num_outputs: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pooled: Array, deterministic: bool) -> Array:
        x = Dropout(self.dropout)(pooled, deterministic=deterministic)
        logits = nn.Dense(self.num_outputs, dtype=self.dtype, param_dtype=jnp.float32,
                          kernel_init=nn.initializers.normal(0.02), name="dense")(x)
        logits = logits.astype(jnp.float32)
        return logits[:, 0] if self.num_outputs == 1 else logits


class BiEncoderHead(nn.Module):
    """Scores a pair from its two sentence embeddings: [batch, hidden] x2 -> [batch].

    `dot`: dot product of a shared linear projection of each (after dropout);
    `cosine`: cosine similarity of the two embeddings, mapped from [-1, 1] to [0, 5].
    """

    similarity: str
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, a: Array, b: Array, deterministic: bool) -> Array:
        if self.similarity == "cosine":
            a, b = a.astype(jnp.float32), b.astype(jnp.float32)
            cos = (a * b).sum(-1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
                                     + 1e-8)
            return 2.5 * (cos + 1.0)
        proj = nn.Dense(a.shape[-1], dtype=self.dtype, param_dtype=jnp.float32,
                        kernel_init=nn.initializers.normal(0.02), name="dense")
        drop = Dropout(self.dropout)
        a = proj(drop(a, deterministic=deterministic)).astype(jnp.float32)
        b = proj(drop(b, deterministic=deterministic)).astype(jnp.float32)
        return (a * b).sum(-1)


def width(kind: str, num_labels: int) -> int:
    """Output columns of a task: its classes (classification), else 1 (a pair logit, a score)."""
    return num_labels if kind == "classification" else 1


def padded_width(specs: Sequence[Any]) -> int:
    """Columns of a traced task's padded outputs: the widest of the tasks'."""
    return max(width(s.kind, s.num_labels) for s in specs)


def pad(outputs: Array, columns: int) -> Array:
    """A task's outputs ([batch, classes] or [batch]) as [batch, columns], zeros after them."""
    if outputs.ndim == 1:
        outputs = outputs[:, None]
    return jnp.pad(outputs, ((0, 0), (0, columns - outputs.shape[1])))


def unpad(kind: str, num_labels: int, outputs):
    """Padded outputs [batch, columns] (NumPy or JAX) -> the task's own: logits
    [batch, classes] (classification), else [batch]."""
    return outputs[:, :num_labels] if kind == "classification" else outputs[:, 0]


def is_static(task) -> bool:
    """Whether `task` is known at trace time (a name or a Python int), not a traced index."""
    return isinstance(task, str | int)


def by_task(specs: Sequence[Any], task, fn: Callable[..., Any], *operands):
    """fn(spec, *operands) for the task's spec (anything with .name, .kind, .num_labels).

    task: a name or index, called directly (only that task's code is traced); or a
    traced int32 index, then every task's branch is traced and `lax.switch` runs the
    chosen one, so one program serves them all.
    """
    if is_static(task):
        index = task if isinstance(task, int) else [s.name for s in specs].index(task)
        return fn(specs[index], *operands)
    branches = [lambda *ops, s=s: fn(s, *ops) for s in specs]
    return jax.lax.switch(task, branches, *operands)


def task_loss(specs: Sequence[Any], task, outputs: Array, labels: Array, mask: Array) -> Array:
    """`loss_fn` of the task (`by_task`) on the model's outputs: the task's own for a static
    task, padded [batch, columns] for a traced one (`unpad`)."""
    def one(spec, outputs, labels, mask):
        if not is_static(task):
            outputs = unpad(spec.kind, spec.num_labels, outputs)
        return loss_fn(spec.kind, outputs, labels, mask)

    return by_task(specs, task, one, outputs, labels, mask)


def loss_fn(kind: str, outputs: Array, labels: Array, mask: Array) -> Array:
    """The mean loss over real examples.

    outputs: [batch, classes] logits (classification) or [batch] logits/scores;
    labels: [batch] classes (int, or float holding ints), {0, 1} or float targets;
    mask: [batch] 1 for real examples.
    """
    if kind == "classification":
        per_example = optax.softmax_cross_entropy_with_integer_labels(
            outputs, labels.astype(jnp.int32))
    elif kind == "pair_classification":
        per_example = optax.sigmoid_binary_cross_entropy(outputs, labels.astype(jnp.float32))
    elif kind == "pair_regression":
        per_example = jnp.square(outputs - labels.astype(jnp.float32))
    else:
        raise ValueError(f"unknown task kind {kind!r}")
    mask = mask.astype(jnp.float32)
    return (per_example * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def predictions(kind: str, outputs) -> np.ndarray:
    """Host outputs -> predictions: class ids [batch], 0/1 [batch] or scores [batch]."""
    outputs = np.asarray(outputs)
    if kind == "classification":
        return outputs.argmax(axis=-1)
    if kind == "pair_classification":
        return (outputs > 0).astype(np.int32)
    return outputs


def probabilities(kind: str, outputs, dtype=np.float32) -> np.ndarray | None:
    """Host outputs -> class probabilities [batch, classes] (softmax), the positive class's
    probability [batch] (sigmoid of the pair logit), or None for a regression score;
    computed in float64, returned as `dtype`."""
    x = np.asarray(outputs, np.float64)
    if kind == "classification":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(dtype)
    if kind == "pair_classification":
        return np.exp(-np.logaddexp(0.0, -x)).astype(dtype)  # sigmoid; no overflow
    return None
