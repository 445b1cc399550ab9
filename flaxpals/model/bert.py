"""A functional Flax (linen) BERT encoder that loads Hugging Face checkpoints.

The module tree mirrors Hugging Face's `BertModel`, so `hf_checkpoint.py` can map a
checkpoint onto it name by name:

    embeddings/{word_embeddings,position_embeddings,token_type_embeddings,LayerNorm}
    layer_{i}/attention/{query,key,value,output,LayerNorm}
    layer_{i}/{intermediate,output,output_LayerNorm}
    pooler

Every layer is post-LN, as in BERT. A layer takes an optional task-specific
branch `ts(h) -> [batch, length, hidden]` (a PAL or a low-rank adapter, see
`adapters.py`); where its output enters the layer is chosen by `placement`.
With no branch the layer is exactly Hugging Face's `BertLayer`.

Packed rows (several sequences per row, `input_pipeline`'s packed batches): give
`segment_ids` (1, 2, ... per sequence in a row, 0 for padding) and `position_ids`
(0, 1, ... within each sequence); a token then attends only to its own sequence
(`segment_bias`) and is embedded at its position in it, so each sequence's outputs
are those it has alone in a row.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxpals.model.dropout import Dropout

Array = jax.Array
Branch = Callable[[Array], Array]

# Where a task-specific branch's output enters a layer.
PLACEMENTS = ("output", "parallel")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The architecture of a BERT encoder (the fields of Hugging Face's config.json)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    hidden_act: str = "gelu"
    initializer_range: float = 0.02
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BertConfig:
        """Builds a config from a Hugging Face config.json dict, ignoring unrelated keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path) -> BertConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        """A Hugging Face compatible config.json dict."""
        return {"architectures": ["BertModel"], "model_type": "bert",
                **dataclasses.asdict(self)}

    def replace(self, **kw) -> BertConfig:
        return dataclasses.replace(self, **kw)


def tiny_config(**kw) -> BertConfig:
    """A 2-layer, hidden-64 config for tests: random init, no files needed."""
    base = dict(vocab_size=30522, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=128, max_position_embeddings=512)
    base.update(kw)
    return BertConfig(**base)


ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf GELU, as BERT
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def _dense(config: BertConfig, features: int, dtype, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                    kernel_init=nn.initializers.normal(config.initializer_range))


def _layer_norm(config: BertConfig, dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype,
                        param_dtype=jnp.float32, name=name)


def attention_bias(attention_mask: Array, dtype) -> Array:
    """Additive attention bias from a padding mask.

    attention_mask: [batch, length], 1 for real tokens, 0 for padding.
    Returns [batch, 1, 1, length]: 0 where attended, a large negative elsewhere.
    """
    mask = attention_mask[:, None, None, :].astype(bool)
    return jnp.where(mask, 0.0, jnp.finfo(dtype).min).astype(dtype)


def segment_bias(segment_ids: Array, dtype) -> Array:
    """Additive attention bias of packed rows: a token attends to the tokens of its own
    sequence. segment_ids: [batch, length], 0 for padding -> [batch, 1, length, length]."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    keep = same & (segment_ids[:, None, :] > 0)
    return jnp.where(keep[:, None], 0.0, jnp.finfo(dtype).min).astype(dtype)


def multi_head_attention(q: Array, k: Array, v: Array, bias: Array, num_heads: int,
                         dropout: Dropout | None, deterministic: bool) -> Array:
    """Scaled dot-product attention over heads.

    q, k, v: [batch, length, width]; bias: [batch, 1, 1, length], or
    [batch, 1, length, length] (packed rows, `segment_bias`).
    Returns the heads concatenated: [batch, length, width].
    """
    b, n, width = q.shape
    d = width // num_heads
    # Scale the [b, n, width] queries, not the [b, h, n, n] scores. Transpose to
    # heads-first [b, h, n, d] explicitly: XLA:CPU's forward ran 2.5x faster so
    # (benchmarks/bench_ops.py, MiniLM at L128, batch 128: 449 ms to 178 ms) than when
    # the einsums took "bqhd" operands and picked the layouts themselves.
    q = q / jnp.sqrt(d).astype(q.dtype)
    q, k, v = (x.reshape(b, n, num_heads, d).transpose(0, 2, 1, 3) for x in (q, k, v))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k)
    # Softmax in float32 whatever the compute dtype: bf16 sums lose the tail.
    probs = jax.nn.softmax(scores.astype(jnp.float32) + bias.astype(jnp.float32), axis=-1)
    probs = probs.astype(q.dtype)
    if dropout is not None:
        probs = dropout(probs, deterministic=deterministic)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
    return out.transpose(0, 2, 1, 3).reshape(b, n, width)


def gather_tokens(h: Array, at: Array) -> Array:
    """h [rows, length, hidden] in `groups` blocks of rows, at [groups, n, 2] (row within
    the block, column) -> those tokens' vectors [groups * n, hidden]."""
    blocks = h.reshape(at.shape[0], -1, *h.shape[1:])
    picked = jax.vmap(lambda b, a: b[a[:, 0], a[:, 1]])(blocks, at)
    return picked.reshape(-1, h.shape[-1])


class BertEmbeddings(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array, deterministic: bool,
                 position_ids: Array | None = None) -> Array:
        """input_ids, token_type_ids: [batch, length] -> [batch, length, hidden];
        position_ids: [batch, length] (packed rows), default 0, 1, ... along each row."""
        c = self.config
        init = nn.initializers.normal(c.initializer_range)

        def embed(num, name):
            return nn.Embed(num, c.hidden_size, embedding_init=init, dtype=self.dtype,
                            param_dtype=jnp.float32, name=name)

        positions = (jnp.arange(input_ids.shape[1])[None, :] if position_ids is None
                     else position_ids)
        x = (embed(c.vocab_size, "word_embeddings")(input_ids)
             + embed(c.max_position_embeddings, "position_embeddings")(positions)
             + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids))
        x = _layer_norm(c, self.dtype, "LayerNorm")(x)
        return Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class BertAttention(nn.Module):
    """Self-attention sublayer without its residual LayerNorm: returns SA(h)."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: Array, bias: Array, deterministic: bool) -> Array:
        c = self.config
        q, k, v = (_dense(c, c.hidden_size, self.dtype, n)(h) for n in ("query", "key", "value"))
        ctx = multi_head_attention(q, k, v, bias, c.num_attention_heads,
                                   Dropout(c.attention_probs_dropout_prob), deterministic)
        out = _dense(c, c.hidden_size, self.dtype, "output")(ctx)
        return Dropout(c.hidden_dropout_prob)(out, deterministic=deterministic)


class BertLayer(nn.Module):
    """One post-LN transformer layer, with an optional task-specific branch.

    Without a branch:   a = LN1(h + SA(h));          out = LN2(FFN(a) + a)
    placement "output": a = LN1(h + SA(h));          out = LN2(FFN(a) + a + TS(h))
        (the reference implementation of BERT and PALs)
    placement "parallel": a = LN1(h + SA(h) + TS(h)); out = LN2(FFN(a) + a)
        (the paper's equation)
    """

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: Array, bias: Array, deterministic: bool,
                 branch: Branch | None = None, placement: str = "output") -> Array:
        """h: [batch, length, hidden]; bias: [batch, 1, 1, length] -> [batch, length, hidden]."""
        if placement not in PLACEMENTS:
            raise ValueError(f"placement {placement!r} is not one of {PLACEMENTS}")
        c = self.config
        ts = branch(h) if branch is not None else None
        attn = BertAttention(c, self.dtype, name="attention")(h, bias, deterministic)
        pre = h + attn
        if ts is not None and placement == "parallel":
            pre = pre + ts
        a = _layer_norm(c, self.dtype, "attention_LayerNorm")(pre)
        f = ACTIVATIONS[c.hidden_act](_dense(c, c.intermediate_size, self.dtype, "intermediate")(a))
        f = Dropout(c.hidden_dropout_prob)(_dense(c, c.hidden_size, self.dtype, "output")(f),
                                           deterministic=deterministic)
        pre = f + a
        if ts is not None and placement == "output":
            pre = pre + ts
        return _layer_norm(c, self.dtype, "output_LayerNorm")(pre)


class BertModel(nn.Module):
    """The encoder: embeddings, N layers, a tanh pooler over [CLS].

    `branches`, when given, maps a layer index to that layer's task-specific
    branch (or None). The branches are bound modules of the caller (see
    `multitask.py`), so adapter parameters stay out of this tree, whose names map
    one to one onto a Hugging Face checkpoint.
    """

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array, token_type_ids: Array,
                 deterministic: bool = True,
                 branches: Callable[[int], Branch | None] | None = None,
                 placement: str = "output", inputs_embeds: Array | None = None,
                 embeddings_only: bool = False, segment_ids: Array | None = None,
                 position_ids: Array | None = None, pool_at: Array | None = None):
        """Encodes a padded batch.

        input_ids, attention_mask, token_type_ids: [batch, length] integers.
        Returns (sequence_output [batch, length, hidden], pooled_output [batch, hidden]).

        inputs_embeds: [batch, length, hidden], used in place of the embedding layer's
        output (input_ids and token_type_ids are then not read); a perturbed copy of
        that output runs the rest of the encoder (SMART, smart.py).
        embeddings_only: return the embedding layer's output [batch, length, hidden]
        alone. With one dropout key, the two give what one call without them does.
        segment_ids, position_ids: packed rows (module docstring); pool_at: [groups, n, 2]
        (row within its group, column) of the [CLS] tokens the pooler reads, the rows in
        `groups` equal consecutive blocks (one per device, so each gather stays on its
        device); default: column 0 of every row. Returns pooled [groups * n, hidden] then.
        """
        c = self.config
        h = inputs_embeds
        if h is None:
            h = BertEmbeddings(c, self.dtype, name="embeddings")(input_ids, token_type_ids,
                                                                  deterministic, position_ids)
        if embeddings_only:
            return h
        bias = (attention_bias(attention_mask, self.dtype) if segment_ids is None
                else segment_bias(segment_ids, self.dtype))
        for i in range(c.num_hidden_layers):
            branch = branches(i) if branches is not None else None
            h = BertLayer(c, self.dtype, name=f"layer_{i}")(h, bias, deterministic, branch,
                                                            placement)
        first = h[:, 0] if pool_at is None else gather_tokens(h, pool_at)
        pooled = jnp.tanh(_dense(c, c.hidden_size, self.dtype, "pooler")(first))
        return h, pooled
