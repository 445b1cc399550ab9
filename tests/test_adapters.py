"""PALs and low-rank adapters: sizes, parameter counts, wiring, a NumPy re-derivation."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxpals.model import bert
from flaxpals.model.adapters import AdapterConfig, TaskAdapters, default_size
from flaxpals.mtl.task_params import format_accounting, param_accounting

TASKS = ("sst", "para", "sts")


class AdaptedEncoder(nn.Module):
    """The usage pattern documented in adapters.py (what the trainer's model does)."""

    config: bert.BertConfig
    adapter: AdapterConfig
    tasks: tuple = TASKS

    @nn.compact
    def __call__(self, ids, mask, types, task, deterministic=True):
        adapters = TaskAdapters.create(self.config, self.adapter, self.tasks, name="adapters")
        if self.is_initializing():
            adapters.init_all()
        return bert.BertModel(self.config, name="encoder")(
            ids, mask, types, deterministic,
            branches=adapters.branches(task, mask, deterministic),
            placement=self.adapter.placement)


def _batch(config, batch=3, length=7, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, config.vocab_size, (batch, length))
    mask = np.ones((batch, length), np.int32)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    types = np.zeros_like(ids)
    types[:, 3:] = 1
    return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)


def _count(tree):
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


# ---------------------------------------------------------------- sizes and counts

def test_default_sizes():
    assert default_size("pal", 768, 6) == 204
    assert default_size("lowrank", 768) == 100
    # all-MiniLM-L6-v2: hidden 384.
    assert default_size("pal", 384, 6) == 102
    assert default_size("lowrank", 384) == 50
    assert default_size("pal", 64, 6) % 6 == 0
    assert AdapterConfig("pal").resolved_size(384) == 102
    assert AdapterConfig("pal", size=60).resolved_size(384) == 60
    assert AdapterConfig("none").resolved_size(384) == 0


@pytest.mark.parametrize("kw", [dict(kind="adapter"), dict(kind="pal", size=100),
                                dict(kind="pal", placement="before"), dict(kind="lowrank", size=0)])
def test_bad_config_is_rejected(kw):
    with pytest.raises(ValueError):
        AdapterConfig(**kw)


@pytest.mark.parametrize("tasks", [(), ("sst", "sst"), ("encoder",), ("layer_3",), ("a/b",)])
def test_bad_task_names_are_rejected(tasks):
    with pytest.raises(ValueError):
        TaskAdapters(bert.tiny_config(), tasks)


def _shapes(config, adapter, tasks):
    """Parameter shapes of {"encoder", "adapters"} without computing anything."""
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    adapters = TaskAdapters.create(config, adapter, tasks)
    return {
        "encoder": jax.eval_shape(lambda k, x: bert.BertModel(config).init(k, x, x, x),
                                  jax.random.key(0), ids)["params"],
        "adapters": jax.eval_shape(lambda k: adapters.init(k, method="init_all"),
                                   jax.random.key(0))["params"],
    }


def test_pal_parameter_count_bert_base():
    config = bert.BertConfig()  # bert-base shape, nothing loaded
    tasks = tuple(f"task{i}" for i in range(8))
    params = _shapes(config, AdapterConfig("pal"), tasks)
    assert set(params["adapters"]) == set(tasks)
    per_task = 2 * (768 * 204) + 204 + 768 + 12 * 3 * (204 * 204 + 204)
    for t in tasks:
        assert _count(params["adapters"][t]) == per_task, t
    acc = param_accounting(params, tasks)
    assert acc["encoder"] == _count(params["encoder"]) == 109_482_240  # bert-base
    assert all(acc["tasks"][t] == {"adapters": per_task, "total": per_task} for t in tasks)
    assert acc["total"] == acc["encoder"] + 8 * per_task
    assert round(acc["ratio"], 2) == 1.13  # the paper's figure for 8 tasks
    print(format_accounting(acc))

    three = {**params, "adapters": {t: params["adapters"][t] for t in tasks[:3]}}
    acc3 = param_accounting(three, tasks[:3])
    assert acc3["total"] == acc3["encoder"] + 3 * per_task
    print(f"3 tasks: (encoder + 3 PALs) / encoder = {acc3['ratio']:.4f}")


def test_lowrank_parameter_count_bert_base():
    params = _shapes(bert.BertConfig(), AdapterConfig("lowrank"), TASKS)["adapters"]
    per_task = 12 * (2 * 768 * 100 + 100 + 768)
    assert all(_count(params[t]) == per_task for t in TASKS)
    # Nothing shared across layers: one encoder/decoder pair per layer.
    assert set(params["sst"]) == {f"layer_{i}" for i in range(12)}


# ---------------------------------------------------------------- wiring

def _random_params(model, batch, scale=0.05, seed=0):
    """The model's parameter tree (from eval_shape, no init compile) filled with
    random values; LayerNorm scales around 1."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda k: model.init(k, *batch, TASKS[0]), jax.random.key(0))

    def fill(path, x):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return jnp.asarray(1 + rng.normal(0, 0.1, x.shape), jnp.float32)
        return jnp.asarray(rng.normal(0, scale, x.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes["params"])


@pytest.fixture(scope="module", params=["pal", "lowrank"])
def zero_init(request):
    """(kind, real init of TaskAdapters with zero_init_decoder) on the tiny config."""
    adapters = TaskAdapters(CONFIG, TASKS, request.param, zero_init_decoder=True)
    return request.param, adapters.init(jax.random.key(0), method="init_all")["params"]


CONFIG = bert.tiny_config(vocab_size=128)


def test_tree_layout(zero_init):
    kind, params = zero_init
    d = default_size(kind, 64, 6)
    assert set(params) == set(TASKS)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    for t in TASKS:
        if kind == "pal":
            assert set(params[t]) == {"encoder", "decoder", "layer_0", "layer_1"}
            assert set(params[t]["layer_1"]) == {"query", "key", "value"}
            assert params[t]["layer_0"]["query"]["kernel"].shape == (d, d)
            enc, dec = params[t]["encoder"], params[t]["decoder"]
        else:
            assert set(params[t]) == {"layer_0", "layer_1"}
            assert set(params[t]["layer_1"]) == {"encoder", "decoder"}
            enc, dec = params[t]["layer_1"]["encoder"], params[t]["layer_1"]["decoder"]
        assert enc["kernel"].shape == (64, d) and dec["kernel"].shape == (d, 64)
        # Weights normal(0.02), biases zero, V^D all zero (zero_init_decoder).
        assert 0.01 < float(np.std(enc["kernel"])) < 0.03 and not np.any(enc["bias"])
        assert not np.any(dec["kernel"]) and not np.any(dec["bias"])
    # Different tasks start from different random adapters.
    first = [jax.tree_util.tree_leaves(params[t])[-1] for t in ("sst", "sts")]
    assert first[0].shape == first[1].shape and np.any(first[0] != first[1])


def test_model_tree_and_errors():
    batch = _batch(CONFIG)
    model = AdaptedEncoder(CONFIG, AdapterConfig("pal"))
    shapes = jax.eval_shape(lambda k: model.init(k, *batch, "sts"), jax.random.key(0))
    params = shapes["params"]
    # init created every task's adapter, though it ran "sts" only.
    assert set(params) == {"encoder", "adapters"} and set(params["adapters"]) == set(TASKS)
    plain = jax.eval_shape(lambda k: bert.BertModel(CONFIG).init(k, *batch), jax.random.key(0))
    assert jax.tree_util.tree_structure(params["encoder"]) == \
        jax.tree_util.tree_structure(plain["params"])
    with pytest.raises(ValueError, match="unknown task"):
        jax.eval_shape(lambda p: model.apply({"params": p}, *batch, "quora"), params)
    none = AdaptedEncoder(CONFIG, AdapterConfig("none"))
    shapes = jax.eval_shape(lambda k: none.init(k, *batch, "sst"), jax.random.key(0))
    assert set(shapes["params"]) == {"encoder"}


@pytest.mark.parametrize("placement", ["output", "parallel"])
def test_zero_init_decoder_is_the_plain_encoder(zero_init, placement):
    kind, adapter_params = zero_init
    batch = _batch(CONFIG)
    model = AdaptedEncoder(CONFIG, AdapterConfig(kind, zero_init_decoder=True,
                                                 placement=placement))
    params = {"encoder": _random_params(model, batch)["encoder"], "adapters": adapter_params}
    apply = model.apply
    ref_seq, ref_pooled = bert.BertModel(CONFIG).apply(
        {"params": params["encoder"]}, *batch)
    for task in TASKS:
        seq, pooled = apply({"params": params}, *batch, task)
        np.testing.assert_array_equal(seq, ref_seq)
        np.testing.assert_array_equal(pooled, ref_pooled)

    # With a non-zero V^D the branch must change the output (so the check above can fail).
    params = jax.tree_util.tree_map(lambda x: x, params)  # a copy to edit
    rng = np.random.default_rng(1)
    for task in TASKS:
        sub = params["adapters"][task]
        for dec in [sub] if kind == "pal" else [sub["layer_0"], sub["layer_1"]]:
            dec["decoder"] = {k: jnp.asarray(rng.normal(0, 0.02, v.shape), jnp.float32)
                              for k, v in dec["decoder"].items()}
    outs = [np.asarray(apply({"params": params}, *batch, t)[0]) for t in TASKS]
    for out in outs:
        assert np.abs(out - np.asarray(ref_seq)).max() > 1e-4
    assert np.abs(outs[0] - outs[1]).max() > 1e-4  # each task uses its own adapter


def test_dropout_in_the_branch_as_the_reference(zero_init):
    # The branch alone: PAL attention probabilities get the encoder's attention
    # dropout rate; the low-rank branch has no dropout.
    kind, params = zero_init
    params = jax.tree_util.tree_map(lambda x: x + 0.05, params)  # non-zero V^D
    adapters = TaskAdapters(CONFIG.replace(attention_probs_dropout_prob=0.5), TASKS, kind)
    h = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 64)), jnp.float32)
    bias = bert.attention_bias(jnp.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]), jnp.float32)
    a = adapters.apply({"params": params}, "sst", 1, h, bias, True)
    b = adapters.apply({"params": params}, "sst", 1, h, bias, False,
                       rngs={"dropout": jax.random.key(3)})
    changed = float(np.abs(np.asarray(a) - np.asarray(b)).max()) > 1e-6
    assert changed == (kind == "pal")


def test_bfloat16_compute_float32_params():
    adapters = TaskAdapters(CONFIG, TASKS, "pal", dtype=jnp.bfloat16)
    params = jax.eval_shape(lambda k: adapters.init(k, method="init_all"), jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    h = jax.ShapeDtypeStruct((2, 5, 64), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((2, 1, 1, 5), jnp.bfloat16)
    out = jax.eval_shape(lambda p, h, b: adapters.apply(p, "sts", 1, h, b), params, h, bias)
    assert out.shape == (2, 5, 64) and out.dtype == jnp.bfloat16
