"""One BertLayer with a PAL or low-rank branch against a NumPy re-derivation.

The reference below is written from the formulas (BERT's post-LN layer, the
BERT-and-PALs branch), not from flaxpals' code: float64, exact erf GELU, the
padding mask applied by excluding padded keys from the softmax.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxpals.model import bert
from flaxpals.model.adapters import TaskAdapters, default_size

CONFIG = bert.tiny_config(vocab_size=128, num_hidden_layers=1)
TASKS = ("sst", "sts")
_erf = np.vectorize(math.erf)


class OneLayer(nn.Module):
    kind: str
    placement: str

    @nn.compact
    def __call__(self, h, mask, task):
        adapters = TaskAdapters(CONFIG, TASKS, self.kind, name="adapters")
        branch = adapters.branches(task, mask)(0)
        return bert.BertLayer(CONFIG, name="layer")(
            h, bert.attention_bias(mask, jnp.float32), True, branch, self.placement)


def gelu(x):
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def layer_norm(x, p, eps=CONFIG.layer_norm_eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def dense(x, p):
    return x @ p["kernel"] + p["bias"]


def attention(x, p, heads, mask):
    """softmax(q k^T / sqrt(d_head)) v per head over real keys; heads concatenated."""
    b, n, width = x.shape
    dh = width // heads
    q, k, v = (dense(x, p[name]).reshape(b, n, heads, dh).transpose(0, 2, 1, 3)
               for name in ("query", "key", "value"))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh)
    scores = np.where(mask[:, None, None, :] > 0, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ v).transpose(0, 2, 1, 3).reshape(b, n, width)


def reference(params, h, mask, task, kind, placement):
    lay, ad = params["layer"], params["adapters"][task]
    if kind == "pal":  # GELU(V^D attn(V^E h)), attention without output projection
        ts = gelu(dense(attention(dense(h, ad["encoder"]), ad["layer_0"], 6, mask),
                        ad["decoder"]))
    else:  # V^D GELU(V^E h)
        ts = dense(gelu(dense(h, ad["layer_0"]["encoder"])), ad["layer_0"]["decoder"])
    sa = dense(attention(h, lay["attention"], CONFIG.num_attention_heads, mask),
               lay["attention"]["output"])
    a = layer_norm(h + sa + (ts if placement == "parallel" else 0),
                   lay["attention_LayerNorm"])
    ffn = dense(gelu(dense(a, lay["intermediate"])), lay["output"])
    return layer_norm(ffn + a + (ts if placement == "output" else 0), lay["output_LayerNorm"])


@pytest.mark.parametrize("kind", ["pal", "lowrank"])
def test_layer_matches_numpy(kind):
    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, 6, CONFIG.hidden_size))
    mask = np.ones((3, 6), np.int32)
    mask[1, 3:] = 0
    mask[2, 1:] = 0
    shapes = jax.eval_shape(
        lambda k: OneLayer(kind, "output").init(k, jnp.zeros(h.shape), mask, "sst"),
        jax.random.key(0))["params"]
    # Without TaskAdapters.init_all, init creates only the task it ran.
    assert set(shapes["adapters"]) == {"sst"}
    d = default_size(kind, CONFIG.hidden_size, 6)
    assert shapes["adapters"]["sst"]["layer_0"]["query" if kind == "pal" else "encoder"][
        "kernel"].shape == (d if kind == "pal" else CONFIG.hidden_size, d)

    def fill(path, x):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return 1 + rng.normal(0, 0.2, x.shape)
        return rng.normal(0, 0.3, x.shape)

    params64 = jax.tree_util.tree_map_with_path(fill, shapes)
    params32 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params64)
    outs = {}
    for placement in ("output", "parallel"):
        got = OneLayer(kind, placement).apply({"params": params32},
                                              jnp.asarray(h, jnp.float32), mask, "sst")
        want = reference(params64, h, mask, "sst", kind, placement)
        err = np.abs(np.asarray(got, np.float64) - want).max()
        print(f"{kind} {placement}: max |flax - numpy| = {err:.2e}")
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        outs[placement] = want
    # The two placements really differ, and the branch really contributes.
    assert np.abs(outs["output"] - outs["parallel"]).max() > 1e-2
    plain = bert.BertLayer(CONFIG).apply({"params": params32["layer"]},
                                         jnp.asarray(h, jnp.float32),
                                         bert.attention_bias(mask, jnp.float32), True)
    assert np.abs(np.asarray(plain) - outs["output"]).max() > 1e-2
