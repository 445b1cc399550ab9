"""Task-specific adapters: Projected Attention Layers (PALs) and low-rank layers.

Each layer of the encoder gets, for the task of the step, a branch

    TS(h) = V^D g(V^E h)        h: [batch, length, hidden] -> [batch, length, hidden]

(Stickland & Murray 2019, "BERT and PALs"). `bert.BertLayer` adds TS(h) where
`placement` says; this module only holds the adapters' parameters and computes TS.

The layout follows the reference implementation (AsaCooperStickland/Bert-n-Pals);
what it does, line by line, and the sizes chosen: docs/design/pal-reference.md.

Parameter tree of `TaskAdapters` (under whatever name the caller gives it,
"adapters" by convention); every task's parameters sit under its name, so a
per-task mask only has to look for the task name in a path (`task_params.py`):

    PAL:       <task>/encoder/{kernel [H, d], bias [d]}             (V^E, all layers)
               <task>/decoder/{kernel [d, H], bias [H]}             (V^D, all layers)
               <task>/layer_{i}/{query,key,value}/{kernel [d, d], bias [d]}
    low-rank:  <task>/layer_{i}/encoder/{kernel [H, d], bias [d]}
               <task>/layer_{i}/decoder/{kernel [d, H], bias [H]}

Use inside a model (parameters land under "adapters", the encoder's tree stays
a plain Hugging Face BERT tree):

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids, task, deterministic):
        adapters = TaskAdapters.create(cfg, adapter_cfg, tasks, dtype, name="adapters")
        if self.is_initializing():
            adapters.init_all()          # otherwise only `task`'s adapter would exist
        seq, pooled = BertModel(cfg, dtype, name="encoder")(
            input_ids, attention_mask, token_type_ids, deterministic,
            branches=adapters.branches(task, attention_mask, deterministic),
            placement=adapter_cfg.placement)

`task` is a name or a Python int (static under jit: only that task's adapter
is traced), or a traced int32 index into `tasks`: then every task's adapter is
traced in each layer and `nn.switch` runs the chosen one (one program for every
task; the others' parameters get a zero gradient).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxpals.model.bert import (
    PLACEMENTS,
    BertConfig,
    attention_bias,
    multi_head_attention,
    segment_bias,
)
from flaxpals.model.dropout import Dropout

Array = jax.Array
KINDS = ("none", "pal", "lowrank")

# The paper's sizes for hidden 768 (BERT-base).
_BASE_HIDDEN = 768
_BASE_SIZE = {"pal": 204, "lowrank": 100}

# Keys that occur in the parameter trees; a task with one of these names would
# make "is the task name in the path" ambiguous (see task_params.py).
RESERVED_NAMES = frozenset({
    "params", "encoder", "decoder", "adapters", "heads", "embeddings", "pooler",
    "attention", "intermediate", "output", "query", "key", "value", "kernel", "bias",
    "scale", "embedding", "LayerNorm", "attention_LayerNorm", "output_LayerNorm",
    "word_embeddings", "position_embeddings", "token_type_embeddings", "mu", "nu",
})
_LAYER_NAME = re.compile(r"layer_\d+$")


def default_size(kind: str, hidden: int, num_heads: int = 6) -> int:
    """The paper's adapter width scaled to `hidden`.

    PAL: 204 * hidden / 768, rounded to the nearest multiple of `num_heads`
    (204 for 768, 102 for 384). Low-rank: 100 * hidden / 768 rounded (100, 50).
    """
    if kind not in _BASE_SIZE:
        raise ValueError(f"no default size for adapter kind {kind!r}; kinds with adapters: "
                         f"{sorted(_BASE_SIZE)}")
    exact = _BASE_SIZE[kind] * hidden / _BASE_HIDDEN
    if kind == "pal":
        return num_heads * max(1, math.floor(exact / num_heads + 0.5))
    return max(1, math.floor(exact + 0.5))


def validate_tasks(tasks) -> tuple[str, ...]:
    """Task names as a tuple; they key parameter subtrees, so they must be distinct
    and must not collide with the module names used in the trees."""
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError("at least one task is needed")
    for t in tasks:
        if not isinstance(t, str) or not t or "/" in t:
            raise ValueError(f"task names must be non-empty strings without '/', got {t!r}")
        if t in RESERVED_NAMES or _LAYER_NAME.match(t):
            raise ValueError(f"task name {t!r} collides with a parameter-tree name")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"duplicate task names in {tasks}")
    return tasks


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Which adapter each task gets and where its output enters the layer.

    kind: "none" (plain encoder), "pal" or "lowrank".
    size: the adapter width d; None means `default_size(kind, hidden, num_heads)`.
    num_heads: heads of the PAL attention (d must be a multiple of it).
    zero_init_decoder: V^D kernel and bias start at zero, so TS(h) = 0 and the
        model starts as the plain encoder.
    placement: "output" (the reference implementation: LN2(FFN(a) + a + TS(h)))
        or "parallel" (the paper's equation: LN1(h + SA(h) + TS(h))); applied by
        `bert.BertLayer`, carried here.
    """

    kind: str = "none"
    size: int | None = None
    num_heads: int = 6
    zero_init_decoder: bool = False
    placement: str = "output"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"adapter kind {self.kind!r} is not one of {KINDS}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement {self.placement!r} is not one of {PLACEMENTS}")
        if self.num_heads < 1:
            raise ValueError(f"num_heads must be positive, got {self.num_heads}")
        if self.size is not None:
            if self.size < 1:
                raise ValueError(f"adapter size must be positive, got {self.size}")
            if self.kind == "pal" and self.size % self.num_heads:
                raise ValueError(f"PAL size {self.size} is not a multiple of "
                                 f"num_heads {self.num_heads}")

    def resolved_size(self, hidden: int) -> int:
        """d for an encoder of width `hidden` (0 for kind "none")."""
        if self.kind == "none":
            return 0
        return self.size if self.size is not None else default_size(
            self.kind, hidden, self.num_heads)


def _dense(features: int, init_range: float, dtype, name: str, zero: bool = False) -> nn.Dense:
    # As the reference's init_weights: weights normal(init_range), biases zero.
    kernel_init = nn.initializers.zeros if zero else nn.initializers.normal(init_range)
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                    kernel_init=kernel_init, bias_init=nn.initializers.zeros)


def _gelu(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)  # the reference's erf GELU


class PALAttention(nn.Module):
    """Multi-head self-attention inside the d-dimensional space, no output projection.

    x: [batch, length, d]; bias: [batch, 1, 1, length] (or [batch, 1, length, length],
    packed rows) -> [batch, length, d].
    """

    size: int
    num_heads: int
    dropout_rate: float
    init_range: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
        q, k, v = (_dense(self.size, self.init_range, self.dtype, n)(x)
                   for n in ("query", "key", "value"))
        return multi_head_attention(q, k, v, bias, self.num_heads, Dropout(self.dropout_rate),
                                    deterministic)


class PAL(nn.Module):
    """One task's PALs: V^E, V^D shared by all layers, an attention per layer.

    Call with a layer index: TS_i(h) = GELU(V^D attn_i(V^E h)).
    """

    config: BertConfig
    size: int
    num_heads: int = 6
    zero_init_decoder: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, layer: int, h: Array, bias: Array, deterministic: bool) -> Array:
        """h: [batch, length, hidden]; bias: [batch, 1, 1, length] -> [batch, length, hidden]."""
        c = self.config
        x = _dense(self.size, c.initializer_range, self.dtype, "encoder")(h)
        x = PALAttention(self.size, self.num_heads, c.attention_probs_dropout_prob,
                         c.initializer_range, self.dtype, name=f"layer_{layer}")(
                             x, bias, deterministic)
        x = _dense(c.hidden_size, c.initializer_range, self.dtype, "decoder",
                   zero=self.zero_init_decoder)(x)
        return _gelu(x)


class _LowRankFields(nn.Module):
    """What a low-rank layer is made of (shared by one layer and a task's stack)."""

    config: BertConfig
    size: int
    zero_init_decoder: bool = False
    dtype: Any = jnp.float32


class LowRankLayer(_LowRankFields):
    """V^D GELU(V^E h): [batch, length, hidden] -> [batch, length, hidden]."""

    @nn.compact
    def __call__(self, h: Array) -> Array:
        c = self.config
        x = _gelu(_dense(self.size, c.initializer_range, self.dtype, "encoder")(h))
        return _dense(c.hidden_size, c.initializer_range, self.dtype, "decoder",
                      zero=self.zero_init_decoder)(x)


class LowRank(_LowRankFields):
    """One task's low-rank layers: an independent V^E, V^D in every layer."""

    @nn.compact
    def __call__(self, layer: int, h: Array, bias: Array, deterministic: bool) -> Array:
        del bias, deterministic  # no attention, and the reference has no dropout here
        return LowRankLayer(self.config, self.size, self.zero_init_decoder, self.dtype,
                            name=f"layer_{layer}")(h)


class TaskAdapters(nn.Module):
    """Every task's adapters; `branches` hands one task's to `bert.BertModel`.

    config: the encoder's BertConfig; tasks: task names (they key the subtrees);
    kind: "none" | "pal" | "lowrank"; size: d (None: `default_size`).
    Parameters are float32; computation runs in `dtype`.
    """

    config: BertConfig
    tasks: tuple[str, ...]
    kind: str = "pal"
    size: int | None = None
    num_heads: int = 6
    zero_init_decoder: bool = False
    dtype: Any = jnp.float32

    @classmethod
    def create(cls, config: BertConfig, adapter: AdapterConfig, tasks, dtype=jnp.float32,
               **kw) -> TaskAdapters:
        """From an AdapterConfig; `kw` is passed to the module (e.g. name="adapters")."""
        return cls(config, tuple(tasks), adapter.kind, adapter.size, adapter.num_heads,
                   adapter.zero_init_decoder, dtype, **kw)

    def __post_init__(self):
        validate_tasks(self.tasks)
        AdapterConfig(self.kind, self.size, self.num_heads)  # raises on a bad kind or size
        super().__post_init__()

    @property
    def width(self) -> int:
        """The adapter width d actually used."""
        return AdapterConfig(self.kind, self.size, self.num_heads).resolved_size(
            self.config.hidden_size)

    @nn.compact
    def __call__(self, task: str, layer: int, h: Array, bias: Array,
                 deterministic: bool = True) -> Array:
        """TS(h) of `task` in layer `layer`.

        h: [batch, length, hidden]; bias: [batch, 1, 1, length] additive mask
        (`bert.attention_bias`) -> [batch, length, hidden].
        """
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this model's tasks are {self.tasks}")
        if not 0 <= layer < self.config.num_hidden_layers:
            raise ValueError(f"layer {layer} out of range for "
                             f"{self.config.num_hidden_layers} layers")
        if self.kind == "pal":
            mod = PAL(self.config, self.width, self.num_heads, self.zero_init_decoder,
                      self.dtype, name=task)
        elif self.kind == "lowrank":
            mod = LowRank(self.config, self.width, self.zero_init_decoder, self.dtype,
                          name=task)
        else:
            raise ValueError("adapter kind 'none' has no branch")
        return mod(layer, h, bias, deterministic)

    def branches(self, task, attention_mask: Array, deterministic: bool = True,
                 segment_ids: Array | None = None
                 ) -> Callable[[int], Callable[[Array], Array]] | None:
        """The `branches` argument of `bert.BertModel` for `task` (a name, a Python int or
        a traced index; module docstring).

        attention_mask: [batch, length], 1 for real tokens; segment_ids: of packed rows
        (`bert.segment_bias`), when they are. Returns layer index ->
        (h [batch, length, hidden] -> TS(h)), or None for kind "none".
        """
        if self.kind == "none":
            return None
        if isinstance(task, int):
            task = self.tasks[task]
        if isinstance(task, str) and task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this model's tasks are {self.tasks}")
        bias = (attention_bias(attention_mask, self.dtype) if segment_ids is None
                else segment_bias(segment_ids, self.dtype))
        if isinstance(task, str):
            return lambda layer: (lambda h: self(task, layer, h, bias, deterministic))

        def selected(layer: int) -> Callable[[Array], Array]:
            fns = [lambda mdl, h, bias, t=t: mdl(t, layer, h, bias, deterministic)
                   for t in self.tasks]
            return lambda h: nn.switch(task, fns, self, h, bias)

        return selected

    def init_all(self) -> None:
        """Creates every task's parameters in every layer (call it during `init`).

        Runs each branch once on a one-token dummy input; the outputs are discarded.
        """
        if self.kind == "none":
            return
        h = jnp.zeros((1, 1, self.config.hidden_size), self.dtype)
        bias = attention_bias(jnp.ones((1, 1), jnp.int32), self.dtype)
        for task in self.tasks:
            for layer in range(self.config.num_hidden_layers):
                self(task, layer, h, bias, True)
