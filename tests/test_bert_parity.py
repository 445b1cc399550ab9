"""The Flax encoder against transformers.BertModel (PyTorch) on MiniLM weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxpals.model import bert
from flaxpals.model.tokenizer import Tokenizer
from tests.conftest import read_tsv, require


@pytest.fixture(scope="module")
def hf_model(minilm):
    transformers = require("transformers")
    return transformers.BertModel.from_pretrained(str(minilm[2])).eval()


def _reference(hf_model, batch):
    torch = require("torch")
    with torch.no_grad():
        out = hf_model(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()})
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _batches(tok):
    sst = [r["sentence"] for r in read_tsv("ids-sst-dev.csv")[:24]]
    quora = [r for r in read_tsv("quora-dev.csv")[:24] if r["sentence1"] and r["sentence2"]]
    singles = sst + [r["sentence1"] for r in quora[:12]]
    yield "single", tok(singles, max_length=64)
    yield "pair", tok([r["sentence1"] for r in quora], [r["sentence2"] for r in quora],
                      max_length=64)


def test_matches_transformers(minilm, hf_model):
    config, params, directory = minilm
    tok = Tokenizer.from_checkpoint(directory)
    model = bert.BertModel(config)
    apply = jax.jit(lambda p, b: model.apply({"params": p}, **b))
    for kind, batch in _batches(tok):
        mask = batch["attention_mask"].astype(bool)
        assert len(mask) >= 24 and not mask.all(), f"{kind}: batch needs padding"
        seq, pooled = apply(params, batch)
        ref_seq, ref_pooled = _reference(hf_model, batch)
        real = np.abs(np.asarray(seq) - ref_seq)[mask].max()
        print(f"{kind}: max |diff| sequence (real tokens) {real:.2e}, all positions "
              f"{np.abs(np.asarray(seq) - ref_seq).max():.2e}, pooled "
              f"{np.abs(np.asarray(pooled) - ref_pooled).max():.2e}")
        np.testing.assert_allclose(seq, ref_seq, atol=1e-4, rtol=0)
        np.testing.assert_allclose(pooled, ref_pooled, atol=1e-4, rtol=0)


def test_bfloat16_computes_with_float32_params(minilm, hf_model):
    config, params, directory = minilm
    batch = Tokenizer.from_checkpoint(directory)(
        [r["sentence"] for r in read_tsv("ids-sst-dev.csv")[:8]])
    model = bert.BertModel(config, dtype=jnp.bfloat16)
    variables = model.init(jax.random.key(0), **batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
    seq, pooled = model.apply({"params": params}, **batch)
    assert seq.dtype == jnp.bfloat16
    _, ref_pooled = _reference(hf_model, batch)
    # bf16 keeps ~3 significant digits; the pooled output stays close.
    assert np.abs(np.asarray(pooled, np.float32) - ref_pooled).max() < 0.1


def test_dropout_only_in_training(minilm):
    config, params, directory = minilm
    batch = Tokenizer.from_checkpoint(directory)(["a man", "a woman rides a horse"])
    model = bert.BertModel(config)
    a, _ = model.apply({"params": params}, **batch)
    b, _ = model.apply({"params": params}, **batch)
    c, _ = model.apply({"params": params}, **batch, deterministic=False,
                       rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2


def test_tiny_config_random_init():
    config = bert.tiny_config()
    ids = np.ones((2, 5), np.int32)
    model = bert.BertModel(config)
    params = model.init(jax.random.key(0), ids, ids, ids)["params"]
    seq, pooled = model.apply({"params": params}, ids, ids, ids)
    assert seq.shape == (2, 5, 64) and pooled.shape == (2, 64)


def test_bad_config_values():
    with pytest.raises(ValueError, match="num_attention_heads"):
        bert.BertConfig(hidden_size=100, num_attention_heads=12)
    with pytest.raises(ValueError, match="hidden_act"):
        bert.BertConfig(hidden_act="swish2")
