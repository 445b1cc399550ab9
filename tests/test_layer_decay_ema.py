"""Layer-wise learning-rate decay and the params EMA (optim.py), and their config keys.

References: Adam's first step written out (m = g, v = g^2 after bias correction),
a hand-written depth table of the tiny 2-layer model, and the EMA recurrence in
NumPy over the params the steps produced.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxpals import config_lib
from flaxpals.model.adapters import AdapterConfig
from flaxpals.model.bert import tiny_config
from flaxpals.model.multitask import ModelOptions, MultiTaskModel, TaskSpec, dummy_batch
from flaxpals.train import optim
from flaxpals.train.steps import Steps, TrainState

TASKS = (TaskSpec("sst", "classification", 5), TaskSpec("quora", "pair_classification"))
# The tiny model has L = 2 layers: powers of the decay by where a param lives.
POWERS = {"encoder/embeddings/": 3, "encoder/layer_0/": 2, "encoder/layer_1/": 1,
          "encoder/pooler/": 0, "adapters/": 0, "heads/": 0}


def _power(path: str) -> int:
    (power,) = [p for prefix, p in POWERS.items() if path.startswith(prefix)]
    return power


def _random_params(seed=0):
    """The PAL model's param tree (shapes by eval_shape: nothing compiles), random values."""
    model = MultiTaskModel(tiny_config(), TASKS,
                           ModelOptions(adapter=AdapterConfig("pal"), similarity="dot"))
    batches = {t.name: dummy_batch(t, "bi", 2, 8) for t in TASKS}
    shapes = jax.eval_shape(lambda k: model.init(k, batches, method=MultiTaskModel.init_all),
                            jax.random.key(0))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def _flat(tree):
    return {optim.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _train_cfg(**kw):
    cfg = config_lib.base().train
    cfg.schedule, cfg.learning_rate, cfg.grad_clip, cfg.weight_decay = "constant", 1e-3, 0.0, 0.0
    for k, v in kw.items():
        cfg[k] = v
    return cfg


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_layer_decay_scales_a_first_adam_step_by_depth(weight_decay):
    params = _random_params()
    grads = _random_params(seed=1)
    decay, lr, eps = 0.7, 1e-3, 1e-8
    tx = optim.make_optimizer(_train_cfg(layer_decay=decay, weight_decay=weight_decay),
                              params, 10)
    updates, _ = tx.update(grads, tx.init(params), params)
    got = _flat(updates)
    decays = _flat(optim.decay_mask(params))
    assert any("adapters/quora/layer_1/" in k for k in got)  # adapters' layer_i: full rate
    for path, g in _flat(grads).items():
        p = _flat(params)[path]
        # Adam's first step from zero moments is g / (|g| + eps); AdamW adds wd * p.
        want = -lr * decay ** _power(path) * (g / (np.abs(g) + eps)
                                              + weight_decay * decays[path] * p)
        # rtol: optax's bias corrections divide by 1 - 0.9 and 1 - 0.999 in float32
        # (off by 2e-7 and 1.3e-5 relative); the powers differ by 30% and more.
        np.testing.assert_allclose(got[path], want, rtol=2e-5, atol=0, err_msg=path)
    if weight_decay == 0:  # |g| >> eps: every update is lr x the layer's scale
        mean = {k: np.abs(v).mean() for k, v in got.items()}
        ratio = (mean["encoder/layer_0/output/kernel"] / mean["encoder/layer_1/output/kernel"])
        assert ratio == pytest.approx(decay, rel=1e-5)
        assert (mean["encoder/embeddings/word_embeddings/embedding"]
                / mean["heads/sst/dense/kernel"]) == pytest.approx(decay ** 3, rel=1e-5)


def test_layer_decay_under_a_frozen_encoder():
    # adapters_only: multi_transform hands the stage masked trees; the encoder's
    # updates are zero and the adapters' and heads' are at the full rate.
    params, grads = _random_params(), _random_params(seed=1)
    tx = optim.make_optimizer(_train_cfg(layer_decay=0.5, trainable="adapters_only"), params, 10)
    got = _flat(tx.update(grads, tx.init(params), params)[0])
    for path, g in _flat(grads).items():
        want = 0.0 * g if path.startswith("encoder/") else -1e-3 * g / (np.abs(g) + 1e-8)
        np.testing.assert_allclose(got[path], want, rtol=2e-5, atol=0, err_msg=path)


def test_defaults_add_no_stage_and_leave_updates_bit_identical():
    # The optimiser without layer_decay and ema_decay, written out.
    params = _random_params()
    cfg = config_lib.base().train
    assert (cfg.layer_decay, cfg.ema_decay) == (1.0, 0.0)
    tx = optim.make_optimizer(cfg, params, 100)
    before = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                         optax.adamw(optim.schedule(cfg, 100), b1=cfg.adam_b1, b2=cfg.adam_b2,
                                     eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                                     mask=optim.decay_mask(params)))
    s1, s2 = tx.init(params), before.init(params)
    assert jax.tree.structure(s1) == jax.tree.structure(s2)
    assert optim.ema_state(s1) is None
    for seed in (1, 2, 3):  # past the first (zero-rate) warm-up step
        grads = _random_params(seed)
        u1, s1 = tx.update(grads, s1, params)
        u2, s2 = before.update(grads, s2, params)
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
            np.testing.assert_array_equal(a, b)


def test_ema_follows_the_recurrence_and_leaves_updates_alone():
    params = _random_params()
    d = 0.8
    cfg = _train_cfg(ema_decay=d, weight_decay=0.01, grad_clip=1.0)
    tx, plain = optim.make_optimizer(cfg, params, 10), optim.make_optimizer(
        _train_cfg(weight_decay=0.01, grad_clip=1.0), params, 10)
    state, plain_state = tx.init(params), plain.init(params)
    ema = {k: v.astype(np.float64) for k, v in _flat(params).items()}
    p = params
    for step in range(4):
        grads = _random_params(seed=10 + step)
        updates, state = tx.update(grads, state, p)
        plain_updates, plain_state = plain.update(grads, plain_state, p)
        for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(plain_updates), strict=True):
            np.testing.assert_array_equal(a, b)
        p = optax.apply_updates(p, updates)
        ema = {k: d * ema[k] + (1 - d) * v for k, v in _flat(p).items()}
        got = _flat(optim.ema_params(state))
        for k, v in ema.items():
            np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=f"{step} {k}")
    # The EMA lags the params: after 4 steps of moving params they differ.
    assert not np.allclose(got["heads/sst/dense/kernel"], _flat(p)["heads/sst/dense/kernel"])


def test_eval_weights():
    params = _random_params()
    tx = optim.make_optimizer(_train_cfg(ema_decay=0.5), params, 10)
    state = tx.init(params)
    assert list(optim.eval_weights(params, state, use_ema=False)) == [""]
    both = optim.eval_weights(params, state, use_ema=True)
    assert list(both) == ["", "_ema"] and both["_ema"] is optim.ema_params(state)
    with pytest.raises(ValueError, match="train.ema_decay"):
        optim.eval_weights(params, optim.make_optimizer(_train_cfg(), params, 10).init(params),
                           use_ema=True)
    # The best checkpoint keeps the weights its metric scored.
    for metric in ("dev_ema/average", "val_ema/sst"):
        assert optim.scored_weights(params, state, metric) is optim.ema_params(state)
    for metric in ("dev/average", "val/overall", "train/average"):
        assert optim.scored_weights(params, state, metric) is params


def test_ema_in_single_task_steps_moves_with_its_task():
    # Steps._apply (the update of train_step: the optimiser, then keep_other_tasks) with
    # given gradients: a step on one task leaves the other task's head and its EMA alone.
    params = _random_params()
    tx = optim.make_optimizer(_train_cfg(ema_decay=0.5, learning_rate=1e-2), params, 10)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                       jax.random.key_data(jax.random.key(1)))
    model = MultiTaskModel(tiny_config(), TASKS, ModelOptions(adapter=AdapterConfig("pal")))
    apply = jax.jit(Steps(model, tx)._apply, static_argnames="task")
    history, emas = [_flat(params)], []
    for step, task in enumerate(("sst", "quora", "sst")):
        state, _ = apply(state, _random_params(seed=20 + step), {}, task)
        history.append(_flat(jax.device_get(state.params)))
        emas.append(_flat(jax.device_get(optim.ema_params(state.opt_state))))
    k = "encoder/layer_0/output/kernel"  # shared: the EMA of all three steps' params
    want = history[0][k]
    for h in history[1:]:
        want = 0.5 * want + 0.5 * h[k]
    np.testing.assert_allclose(emas[-1][k], want, rtol=1e-6, atol=1e-7)
    for q in ("heads/quora/dense/kernel", "adapters/quora/layer_1/query/kernel"):
        # quora's params moved on step 2 only, and so did their EMA.
        np.testing.assert_array_equal(emas[0][q], history[0][q])
        np.testing.assert_allclose(emas[1][q], 0.5 * history[0][q] + 0.5 * history[2][q],
                                   rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(emas[2][q], emas[1][q])
        assert not np.array_equal(history[2][q], history[0][q])


@pytest.mark.parametrize("key,value,message", [
    ("train.layer_decay", 0.0, r"train\.layer_decay: must be in \(0, 1\]"),
    ("train.layer_decay", 1.5, r"train\.layer_decay: must be in \(0, 1\]"),
    ("train.ema_decay", 1.0, r"train\.ema_decay: must be in \[0, 1\)"),
    ("eval.use_ema", True, r"eval\.use_ema: needs train\.ema_decay > 0"),
    ("eval.best_metric", "dev_ema/average", r"eval\.best_metric: 'dev_ema/average' needs "
                                            r"eval\.use_ema"),
])
def test_config_keys_are_checked_and_named(key, value, message):
    c = config_lib.base()
    section, leaf = key.split(".")
    c[section][leaf] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(c)
    c = config_lib.base()
    c.train.ema_decay, c.eval.use_ema, c.eval.best_metric = 0.99, True, "dev_ema/average"
    c.train.layer_decay = 0.9
    config_lib.validate(c)
