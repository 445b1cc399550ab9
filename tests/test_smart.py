"""SMART (smart.py) and the model's entry point from embeddings.

References: the KL divergence written with explicit log-probabilities in NumPy
(float64), central finite differences of that divergence through the model, the
ascent step's normalisation and projection in NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxpals import config_lib
from flaxpals.model import heads
from flaxpals.model.bert import tiny_config
from flaxpals.model.multitask import ModelOptions, MultiTaskModel, TaskSpec, dummy_batch
from flaxpals.train import smart
from flaxpals.train.steps import Steps

TASKS = (TaskSpec("sst", "classification", 5), TaskSpec("quora", "pair_classification"),
         TaskSpec("sts", "pair_regression"))
KIND = {t.name: t.kind for t in TASKS}
B, L, H = 3, 6, 16


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_divergence(kind, p, q):
    """[..., batch]: KL(P||Q) + KL(Q||P) from log-probabilities, or the squared error."""
    p, q = np.float64(p), np.float64(q)
    if kind == "classification":
        lp = p - np.log(np.exp(p).sum(-1, keepdims=True))
        lq = q - np.log(np.exp(q).sum(-1, keepdims=True))
        return (np.exp(lp) * (lp - lq)).sum(-1) + (np.exp(lq) * (lq - lp)).sum(-1)
    if kind == "pair_classification":
        kl = lambda a, b: a * np.log(a / b) + (1 - a) * np.log((1 - a) / (1 - b))
        return kl(_np_sigmoid(p), _np_sigmoid(q)) + kl(_np_sigmoid(q), _np_sigmoid(p))
    return (p - q) ** 2


@pytest.mark.parametrize("kind", sorted(set(KIND.values())))
def test_divergences_against_numpy(kind):
    rng = np.random.default_rng(0)
    shape = (7, 5) if kind == "classification" else (7,)
    p, q = rng.normal(size=shape) * 2, rng.normal(size=shape) * 2
    got = smart.per_example_divergence(kind, jnp.asarray(p, jnp.float32),
                                       jnp.asarray(q, jnp.float32))
    want = np_divergence(kind, np.float32(p), np.float32(q))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    mask = np.array([1, 1, 0, 1, 0, 1, 1], np.float32)
    np.testing.assert_allclose(smart.divergence(kind, jnp.asarray(p), jnp.asarray(q), mask),
                               (want * mask).sum() / mask.sum(), rtol=1e-5)
    assert float(smart.divergence(kind, jnp.asarray(p), jnp.asarray(p), mask)) == 0.0


@pytest.mark.parametrize("norm", ["inf", "l2"])
def test_ascent_step_against_numpy(norm):
    rng = np.random.default_rng(1)
    delta = tuple(rng.normal(size=(4, 3, 5)).astype(np.float32) * 0.05 for _ in range(2))
    grad = [rng.normal(size=(4, 3, 5)).astype(np.float32) * s for s in (1e-6, 3e-6)]
    grad[0][2], grad[1][2] = 0, 0  # an example with no gradient keeps its delta (projected)
    eta, eps = 0.1, 0.12 if norm == "inf" else 0.25
    got = smart.ascent_step(delta, tuple(grad), smart.SmartOptions(
        eps=eps, step_size=eta, norm=norm))
    g = np.concatenate([x.reshape(4, -1) for x in grad], 1).astype(np.float64)
    d = np.concatenate([x.reshape(4, -1) for x in delta], 1).astype(np.float64)
    n = np.abs(g).max(1) if norm == "inf" else np.sqrt((g ** 2).sum(1))
    n[2] = 1.0
    moved = d + eta * g / n[:, None]
    if norm == "inf":
        want = np.clip(moved, -eps, eps)
        assert (np.abs(moved) > eps).any() and (np.abs(moved) < eps).any()
    else:
        length = np.sqrt((moved ** 2).sum(1))
        want = moved * np.minimum(1.0, eps / length)[:, None]
        assert (length > eps).any() and (length < eps).any()
    np.testing.assert_allclose(np.concatenate([x.reshape(4, -1) for x in got], 1), want,
                               rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("norm", ["inf", "l2"])
def test_token_projection_against_numpy(norm):
    """The authors' code (mt-dnn perturbation.py, norm_level 0): delta + eta * g, the
    gradient not normalised, divided by each token's norm over the hidden axis, times eps."""
    rng = np.random.default_rng(2)
    delta = tuple(rng.normal(size=(4, 3, 5)).astype(np.float32) * 1e-5 for _ in range(2))
    grad = tuple(rng.normal(size=(4, 3, 5)).astype(np.float32) * s for s in (1e-2, 3e-3))
    eta, eps = 1e-3, 0.7
    got = smart.ascent_step(delta, grad, smart.SmartOptions(
        eps=eps, step_size=eta, norm=norm, projection="token"))
    for d, g, out in zip(delta, grad, got, strict=True):
        moved = np.float64(d) + eta * np.float64(g)
        n = np.abs(moved).max(-1) if norm == "inf" else np.sqrt((moved ** 2).sum(-1))
        np.testing.assert_allclose(out, eps * moved / n[..., None], rtol=1e-5, atol=1e-9)
        # every token's perturbation has norm eps, whatever the size of delta and g
        got_n = np.abs(out).max(-1) if norm == "inf" else np.sqrt((np.float64(out) ** 2).sum(-1))
        np.testing.assert_allclose(got_n, eps, rtol=1e-5)
    cfg = config_lib.base().train
    cfg.smart_weight, cfg.smart_projection = 1.0, "token"
    assert smart.from_config(cfg).projection == "token"


@pytest.fixture(scope="module")
def small():
    """A 1-layer hidden-16 model (quick to compile), its params and a batch per task."""
    config = tiny_config(hidden_size=H, num_attention_heads=2, intermediate_size=32,
                         num_hidden_layers=1, vocab_size=128, max_position_embeddings=32)
    model = MultiTaskModel(config, TASKS, ModelOptions(similarity="dot"))
    rng = np.random.default_rng(0)
    batches = {}
    for t in TASKS:
        b = {k: jnp.asarray(rng.integers(5, 128, (B, L))) if k.startswith("input_ids") else v
             for k, v in dummy_batch(t, "bi", B, L).items()}
        b["attention_mask"] = b["attention_mask"].at[0, -2:].set(0)  # some padding
        b["labels"] = jnp.asarray(rng.integers(0, 2, B)) if t.kind != "pair_regression" \
            else jnp.asarray(rng.uniform(0, 5, B), jnp.float32)
        b["mask"] = jnp.ones(B)
        batches[t.name] = b
    params = jax.jit(lambda k: model.init(k, batches, method=MultiTaskModel.init_all))(
        jax.random.key(0))["params"]
    return model, params, batches


@pytest.mark.parametrize("task", ["sst", "quora"])
def test_embeddings_entry_point_is_the_plain_forward(small, task):
    # With one dropout key: embed, then the rest from those embeddings, is the
    # plain forward bit for bit (a bi-encoded pair: two arrays, one per sentence).
    model, params, batches = small
    rngs = {"dropout": jax.random.key(3)}
    plain = model.apply({"params": params}, batches[task], task, deterministic=False, rngs=rngs)
    embeds = model.apply({"params": params}, batches[task], deterministic=False, rngs=rngs,
                         method="embed")
    assert [e.shape for e in embeds] == [(B, L, H)] * (2 if task == "quora" else 1)
    via = model.apply({"params": params}, batches[task], task, deterministic=False, rngs=rngs,
                      inputs_embeds=embeds)
    np.testing.assert_array_equal(via, plain)
    moved = model.apply({"params": params}, batches[task], task, deterministic=False,
                        rngs=rngs, inputs_embeds=tuple(e + 0.1 for e in embeds))
    assert not np.allclose(moved, plain)


@pytest.mark.parametrize("task", ["sst", "quora"])
def test_one_ascent_step_follows_the_finite_difference_gradient(small, task):
    # One power-iteration step from the noise, with step size 1 and no projection
    # (eps huge), moves by g_i / ||g_i||_inf per example. g by central differences
    # of the NumPy divergence through the model, one embedding coordinate at a time
    # (all examples at once: an example's outputs read only its own rows).
    model, params, batches = small
    batch, kind = batches[task], KIND[task]
    fwd = jax.jit(lambda e: model.apply({"params": params}, batch, task, inputs_embeds=e))
    embeds = model.apply({"params": params}, batch, method="embed")
    clean = fwd(embeds)

    def divergence_of(delta):
        return smart.divergence(kind, clean, fwd(jax.tree.map(jnp.add, embeds, delta)),
                                batch["mask"])

    key = jax.random.key(9)
    options = smart.SmartOptions(steps=1, eps=1e6, step_size=1.0, noise=0.1, norm="inf")
    delta0 = [np.asarray(d) for d in smart.initial_noise(embeds, key, options.noise)]
    delta1 = smart.perturbation(divergence_of, embeds, key, options)
    direction = [np.float64(d1) - d0 for d1, d0 in zip(delta1, delta0, strict=True)]

    h = 1e-3
    clean_np = np.asarray(clean)
    fd = [np.zeros((B, L, H)) for _ in embeds]
    for a in range(len(embeds)):
        for i in range(L):
            for j in range(H):
                values = []
                for sign in (1, -1):
                    d = [x.copy() for x in delta0]
                    d[a][:, i, j] += sign * h
                    out = fwd(tuple(e + x for e, x in zip(embeds, d, strict=True)))
                    values.append(np_divergence(kind, clean_np, np.asarray(out)))
                fd[a][:, i, j] = (values[0] - values[1]) / (2 * h)
    norm = np.max([np.abs(g).reshape(B, -1).max(1) for g in fd], 0)
    assert (norm > 0).all()
    for got, g in zip(direction, fd, strict=True):
        np.testing.assert_allclose(got, g / norm[:, None, None], atol=3e-3)
    # ... and it is an ascent: the divergence grows.
    assert float(divergence_of(delta1)) > float(divergence_of(tuple(delta0)))


def _cfg(**kw):
    cfg = config_lib.base().train
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def test_smart_weight_zero_leaves_the_loss_bit_identical(small):
    # Whatever the other smart_* keys say, weight 0 turns SMART off (Steps.smart None)
    # and the loss is the one computed before SMART existed, bit for bit.
    model, params, batches = small
    batch, key = batches["sst"], jax.random.key(4)
    for cfg in (_cfg(), _cfg(smart_steps=3, smart_eps=0.5, smart_noise=0.1, smart_norm="l2")):
        assert smart.from_config(cfg) is None

    @jax.jit
    def reference(params, batch, key):
        outputs = model.apply({"params": params}, batch, "sst", deterministic=False,
                              rngs={"dropout": key})
        return heads.loss_fn("classification", outputs, batch["labels"], batch["mask"])

    plain = reference(params, batch, key)
    steps = Steps(model, None, smart=smart.from_config(_cfg()))
    assert jax.jit(steps.loss, static_argnames="task")(params, batch, "sst", key) == plain
    # The check can fail: with a weight the loss moves. (The random-init heads' outputs
    # are small, and so are their divergences: a large weight.)
    on = Steps(model, None, smart=smart.from_config(_cfg(smart_weight=1e4, smart_eps=0.5,
                                                         smart_noise=0.1)))
    assert jax.jit(on.loss, static_argnames="task")(params, batch, "sst", key) > plain


@pytest.mark.parametrize("task", ["sst", "sts"])
def test_regularised_loss_is_its_terms(small, task):
    # loss = task loss + weight D(f(x), f(x + delta)) + bregman D(f(x), f_anchor(x)),
    # the divergences in NumPy; delta as the loss draws it (noise key folded from the
    # dropout key), the anchor a moved copy of the params.
    model, params, batches = small
    batch, kind, key = batches[task], KIND[task], jax.random.key(5)
    options = smart.SmartOptions(weight=3.0, steps=2, eps=0.05, step_size=0.02, noise=0.01,
                                 bregman_weight=0.5)
    rngs = {"dropout": key}
    run = lambda p, e=None: model.apply({"params": p}, batch, task, deterministic=False,
                                        rngs=rngs, inputs_embeds=e)
    embeds = model.apply({"params": params}, batch, deterministic=False, rngs=rngs,
                         method="embed")
    out = run(params)

    def divergence_of(delta):
        return smart.divergence(kind, out, run(params, jax.tree.map(jnp.add, embeds, delta)),
                                batch["mask"])

    delta = smart.perturbation(divergence_of, embeds,
                               jax.random.fold_in(key, smart._NOISE_STREAM), options)
    assert max(float(jnp.abs(d).max()) for d in delta) <= np.float32(options.eps)
    adversarial = np_divergence(kind, out, run(params, tuple(
        e + d for e, d in zip(embeds, delta, strict=True)))).mean()
    anchor = jax.tree.map(lambda p: p * 1.05, params)
    proximal = np_divergence(kind, out, run(anchor)).mean()
    plain = float(heads.loss_fn(kind, out, batch["labels"], batch["mask"]))
    assert adversarial > 0 and proximal > 0
    got = smart.regularised_loss(model, params, batch, task, key, options, anchor)
    np.testing.assert_allclose(float(got), plain + 3.0 * adversarial + 0.5 * proximal,
                               rtol=2e-5)
    # At the anchor (EMA = params, as at the start) the Bregman term is exactly 0.
    no_bregman = smart.SmartOptions(**{**options.__dict__, "bregman_weight": 0.0})
    assert (smart.regularised_loss(model, params, batch, task, key, options, params)
            == smart.regularised_loss(model, params, batch, task, key, no_bregman))
    with pytest.raises(ValueError, match="ema_decay"):
        smart.regularised_loss(model, params, batch, task, key, options)


@pytest.mark.parametrize("key,value,message", [
    ("smart_weight", -1.0, r"train\.smart_weight: must be >= 0"),
    ("smart_steps", 0, r"train\.smart_steps: must be an integer >= 1"),
    ("smart_eps", 0.0, r"train\.smart_eps: must be positive"),
    ("smart_step_size", -1e-3, r"train\.smart_step_size: must be positive"),
    ("smart_noise", 0.0, r"train\.smart_noise: must be positive"),
    ("smart_norm", "l1", r"train\.smart_norm: 'l1' is not inf\|l2"),
    ("smart_projection", "sphere", r"train\.smart_projection: 'sphere' is not ball\|token"),
    ("smart_bregman_weight", 1.0, r"train\.smart_bregman_weight: needs train\.ema_decay > 0"),
])
def test_config_keys_are_checked_and_named(key, value, message):
    c = config_lib.base()
    c.train[key] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(c)
    c = config_lib.base()
    c.train.smart_weight, c.train.smart_bregman_weight, c.train.ema_decay = 1.0, 1.0, 0.99
    c.train.smart_norm, c.train.smart_steps, c.train.smart_projection = "l2", 2, "token"
    config_lib.validate(c)
