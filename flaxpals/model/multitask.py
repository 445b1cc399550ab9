"""The multi-task model: one shared BERT encoder, task-specific adapters, task heads.

Param tree:

    encoder/...            the shared BERT (names map onto a Hugging Face checkpoint)
    adapters/<task>/...    PALs or low-rank layers of <task> (absent for the plain encoder)
    heads/<task>/...       the head of <task>

`MultiTaskModel.__call__(batch, task)` runs one task. `task` is a name or a
Python int (static: only that task's adapters and head are traced, and the
outputs are the task's own), or a traced int32 index into `tasks` (the task as
data: every task's adapters and head are traced and `nn.switch` runs the chosen
one, so one program serves every task; outputs padded to `output_width`,
`heads.unpad` recovers the task's own). `init_all` touches every task so that
`init` creates every task's parameters.

A packed batch (`segment_ids` among its keys; `input_pipeline`, data.shapes=packed)
holds several sentences per row; its `example` [groups, n, 3] says where each
example's sentence is (row within its group of rows, segment, first column), and
`example_2` its second sentence's for a bi-encoded pair. Each sentence's vector is
then the one it has alone in a row (`bert.segment_bias`), pooled from its own tokens.

    out = model.apply({"params": p}, batch, "sst")           # [batch, 5] logits
    out = jax.jit(lambda p, b, t: model.apply({"params": p}, b, t))(p, batch, jnp.int32(0))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxpals import config_lib
from flaxpals.model import heads as heads_lib
from flaxpals.model.adapters import AdapterConfig, TaskAdapters
from flaxpals.model.bert import BertConfig, BertModel
from flaxpals.model.heads import SIMILARITY_HEADS, BiEncoderHead, ClassifierHead

Array = jax.Array
POOLINGS = ("cls", "mean")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How the encoder is adapted and how tasks read it (the `config.model` fields)."""

    adapter: AdapterConfig = AdapterConfig()  # kind, size, heads, placement, zero init
    pooling: str = "cls"  # cls: tanh pooler over [CLS] | mean: mean over real tokens
    pair_encoding: str = "bi"  # bi: sentences encoded apart | cross: [CLS] a [SEP] b [SEP]
    similarity: str = "dot"  # bi-encoder regression head: dot | cosine
    head_dropout: float = 0.1
    dtype: str = "float32"  # compute dtype; params stay float32

    def __post_init__(self):
        checks = {"pooling": (self.pooling, POOLINGS),
                  "pair_encoding": (self.pair_encoding, config_lib.PAIR_ENCODINGS),
                  "similarity": (self.similarity, SIMILARITY_HEADS),
                  "dtype": (self.dtype, tuple(DTYPES))}
        for key, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"model.{key}={value!r} is not one of {allowed}")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"model.head_dropout={self.head_dropout} is not in [0, 1)")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What the model needs of a task: its name, kind and number of outputs."""

    name: str
    kind: str  # classification | pair_classification | pair_regression
    num_labels: int = 1


def mean_pool(seq: Array, mask: Array) -> Array:
    """seq: [batch, length, hidden], mask: [batch, length] -> [batch, hidden]."""
    m = mask[..., None].astype(seq.dtype)
    return (seq * m).sum(1) / jnp.maximum(m.sum(1), 1).astype(seq.dtype)


class TaskHeads(nn.Module):
    """One head per task, named by the task."""

    tasks: tuple[TaskSpec, ...]
    options: ModelOptions

    @property
    def width(self) -> int:
        """Columns of the padded outputs of a traced task: the widest task's."""
        return heads_lib.padded_width(self.tasks)

    @nn.compact
    def head(self, task: TaskSpec, a: Array, b: Array | None, deterministic: bool) -> Array:
        """The task's own outputs from its sentence vectors (b: the second sentence's)."""
        o, dtype = self.options, DTYPES[self.options.dtype]
        if task.kind == "classification":
            return ClassifierHead(task.num_labels, o.head_dropout, dtype, name=task.name)(
                a, deterministic)
        if b is None:  # cross-encoded pair: one logit or score from the joint encoding
            return ClassifierHead(1, o.head_dropout, dtype, name=task.name)(a, deterministic)
        similarity = o.similarity if task.kind == "pair_regression" else "dot"
        return BiEncoderHead(similarity, o.head_dropout, dtype, name=task.name)(
            a, b, deterministic)

    def __call__(self, task, a: Array, b: Array | None, deterministic: bool) -> Array:
        """task: a TaskSpec (its own outputs) or a traced index (padded outputs, `width`)."""
        if isinstance(task, TaskSpec):
            return self.head(task, a, b, deterministic)
        bi = self.options.pair_encoding == "bi"

        def branch(spec: TaskSpec):
            def run(mdl, a, b):
                if bi and spec.kind != "classification" and b is None:
                    # A bi-encoded pair task never comes in a batch of single sentences:
                    # its branch in such a program is never taken.
                    return jnp.zeros((a.shape[0], self.width), jnp.float32)
                return heads_lib.pad(mdl.head(spec, a, b, deterministic), self.width)
            return run

        return nn.switch(task, [branch(t) for t in self.tasks], self, a, b)


class MultiTaskModel(nn.Module):
    config: BertConfig
    tasks: tuple[TaskSpec, ...]
    options: ModelOptions = ModelOptions()

    def setup(self):
        dtype = DTYPES[self.options.dtype]
        self.encoder = BertModel(self.config, dtype)
        adapter = self.options.adapter
        self.adapters = None
        if adapter.kind != "none":
            self.adapters = TaskAdapters.create(self.config, adapter,
                                                tuple(t.name for t in self.tasks), dtype)
        self.heads = TaskHeads(self.tasks, self.options)

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"unknown task {name!r}; this model has {[t.name for t in self.tasks]}")

    def task_index(self, name: str) -> int:
        """The task's position in `tasks`: the index a traced task carries."""
        return self.tasks.index(self.task(name))

    @property
    def output_width(self) -> int:
        """Columns of the outputs of a traced task (`__call__`)."""
        return heads_lib.padded_width(self.tasks)

    def encode_packed(self, batch: Mapping[str, Array], task, deterministic: bool
                      ) -> tuple[Array, Array | None]:
        """The sentence vectors of a packed batch's examples: ([examples, hidden], the second
        sentences' or None), examples in the order of their labels."""
        segments = batch["segment_ids"]
        branches = (None if self.adapters is None or task is None else
                    self.adapters.branches(task, batch["attention_mask"], deterministic,
                                           segment_ids=segments))
        where = [batch["example"]] + ([batch["example_2"]] if "example_2" in batch else [])
        at = jnp.concatenate(where, axis=1)  # [groups, n or 2n, 3]
        pool_at = at[..., ::2] if self.options.pooling == "cls" else None  # (row, start)
        seq, pooled = self.encoder(batch["input_ids"], batch["attention_mask"],
                                   batch["token_type_ids"], deterministic, branches=branches,
                                   placement=self.options.adapter.placement,
                                   segment_ids=segments, position_ids=batch["position_ids"],
                                   pool_at=pool_at)
        if pool_at is None:
            pooled = packed_mean_pool(seq, segments, at)
        pooled = pooled.reshape(at.shape[0], len(where), -1, pooled.shape[-1])
        a = pooled[:, 0].reshape(-1, pooled.shape[-1])
        b = pooled[:, 1].reshape(-1, pooled.shape[-1]) if len(where) == 2 else None
        return a, b

    def encode(self, input_ids: Array, attention_mask: Array, token_type_ids: Array,
               task, deterministic: bool,
               inputs_embeds: Array | None = None) -> Array:
        """One sentence (or cross-encoded pair) per row -> its vector [batch, hidden];
        task: a name, or a traced index (`__call__`); None: the shared encoder alone,
        without any task's adapters.

        inputs_embeds: the embedding layer's output to start from (BertModel)."""
        branches = (None if self.adapters is None or task is None
                    else self.adapters.branches(task, attention_mask, deterministic))
        seq, pooled = self.encoder(input_ids, attention_mask, token_type_ids, deterministic,
                                   branches=branches, placement=self.options.adapter.placement,
                                   inputs_embeds=inputs_embeds)
        return pooled if self.options.pooling == "cls" else mean_pool(seq, attention_mask)

    @staticmethod
    def _encoder_inputs(batch: Mapping[str, Array]) -> tuple[list[Array], int]:
        """([input_ids, attention_mask, token_type_ids] of the encoder's one call, sentences
        per example). Bi-encoder: both sentences through the encoder in one call (bigger
        matmuls), padded to a common length, the first sentences' rows first."""
        keys = ("input_ids", "attention_mask", "token_type_ids")
        if "input_ids_2" not in batch:
            return [batch[k] for k in keys], 1
        length = max(batch["input_ids"].shape[1], batch["input_ids_2"].shape[1])
        return [jnp.concatenate([_pad_to(batch[k], length), _pad_to(batch[k + "_2"], length)])
                for k in keys], 2

    def embed(self, batch: Mapping[str, Array], deterministic: bool = True) -> tuple[Array, ...]:
        """The encoder's embedding-layer output for a batch, one [batch, length, hidden]
        per sentence of an example (two for a bi-encoded pair, at a common length):
        what `__call__` takes as `inputs_embeds`."""
        inputs, sentences = self._encoder_inputs(batch)
        h = self.encoder(*inputs, deterministic, embeddings_only=True)
        return tuple(jnp.split(h, sentences))

    def __call__(self, batch: Mapping[str, Array], task, deterministic: bool = True,
                 inputs_embeds: tuple[Array, ...] | None = None) -> Array:
        """The task's outputs: logits [batch, classes] or logits/scores [batch] for a
        static task (a name or int); [batch, output_width] for a traced index.

        inputs_embeds: as `embed` gives them (perhaps perturbed), in place of the
        embedding layer's output; the batch still gives the attention masks.
        """
        if isinstance(task, str):
            task = self.task_index(task)
        spec = self.tasks[task] if heads_lib.is_static(task) else task
        if "segment_ids" in batch:  # packed rows
            if inputs_embeds is not None:
                raise ValueError("inputs_embeds (SMART) does not take packed rows")
            a, b = self.encode_packed(batch, task, deterministic)
            return self.heads(spec, a, b, deterministic)
        inputs, sentences = self._encoder_inputs(batch)
        if inputs_embeds is not None:
            if len(inputs_embeds) != sentences:
                raise ValueError(f"inputs_embeds holds {len(inputs_embeds)} arrays; this batch "
                                 f"has {sentences} sentence(s) per example")
            inputs_embeds = jnp.concatenate(inputs_embeds)
        emb = self.encode(*inputs, task, deterministic, inputs_embeds=inputs_embeds)
        a, b = (emb, None) if sentences == 1 else jnp.split(emb, 2)
        return self.heads(spec, a, b, deterministic)

    def init_all(self, batches: Mapping[str, Mapping[str, Array]]) -> dict[str, Array]:
        """Runs every task once (for `init`): batches maps task name -> a batch."""
        if self.adapters is not None:
            self.adapters.init_all()  # every task's adapter in every layer
        return {t.name: self(batches[t.name], t.name) for t in self.tasks}


def packed_mean_pool(seq: Array, segments: Array, at: Array) -> Array:
    """Mean over each sentence's tokens in packed rows: seq [rows, length, hidden] in
    `groups` blocks of rows, segments [rows, length], at [groups, n, 3] (row within the
    block, segment, first column) -> [groups * n, hidden]."""
    groups = at.shape[0]
    seq = seq.reshape(groups, -1, *seq.shape[1:])
    segments = segments.reshape(groups, -1, segments.shape[-1])

    def one(seq, segments, at):
        mine = (segments[at[:, 0]] == at[:, 1:2]) & (at[:, 1:2] > 0)  # [n, length]
        return mean_pool(seq[at[:, 0]], mine)

    return jax.vmap(one)(seq, segments, at).reshape(-1, seq.shape[-1])


def _pad_to(x: Array, length: int) -> Array:
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]))) if x.shape[1] < length else x


def dummy_batch(task: TaskSpec, pair_encoding: str, batch_size: int = 2,
                length: int = 8) -> dict[str, Any]:
    """A batch of the right structure for `init` and shape inference."""
    ids = jnp.ones((batch_size, length), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": ids, "token_type_ids": jnp.zeros_like(ids)}
    if task.kind != "classification" and pair_encoding == "bi":
        batch.update(input_ids_2=ids, attention_mask_2=ids, token_type_ids_2=jnp.zeros_like(ids))
    return batch
