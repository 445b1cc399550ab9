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
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxpals.dropout import Dropout

Array = jax.Array

PAIR_ENCODINGS = ("bi", "cross")
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


def loss_fn(kind: str, outputs: Array, labels: Array, mask: Array) -> Array:
    """The mean loss over real examples.

    outputs: [batch, classes] logits (classification) or [batch] logits/scores;
    labels: [batch] int classes, {0, 1} or float targets; mask: [batch] 1 for real examples.
    """
    if kind == "classification":
        per_example = optax.softmax_cross_entropy_with_integer_labels(outputs, labels)
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
