"""Metrics, configs, the optimiser's masks and task isolation (no data files needed)."""

import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxpals import config_lib
from flaxpals.data import metrics
from flaxpals.model.adapters import AdapterConfig
from flaxpals.model.bert import tiny_config
from flaxpals.model.multitask import ModelOptions, MultiTaskModel, TaskSpec, dummy_batch
from flaxpals.mtl import pcgrad, task_params
from flaxpals.train import compilation, evaluate, optim, parallel
from flaxpals.train.steps import Steps, TrainState, device_batch

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def load_config(name: str, arg: str | None = None):
    return config_lib.load_file(CONFIGS / f"{name}.py", arg)


def test_pearson_and_accuracy_against_numpy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=200), rng.normal(size=200)
    y = 0.6 * x + 0.4 * y
    assert metrics.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert metrics.pearson(np.ones(5), np.arange(5.0)) == 0.0
    assert metrics.accuracy(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75


def test_summary_formulas():
    s = metrics.summary({"sst": 0.5, "quora": 0.8, "sts": 0.6},
                        {"sst": "accuracy", "quora": "accuracy", "sts": "pearson"})
    assert s["average"] == pytest.approx((0.5 + 0.8 + 0.6) / 3)
    assert s["overall"] == pytest.approx((0.5 + 0.8 + (0.6 + 1) / 2) / 3)


@pytest.mark.parametrize("name", ["baseline", "pal", "lowrank", "classifier"])
def test_configs_load_and_validate(name):
    config_lib.validate(load_config(name))
    config_lib.validate(load_config(name, "tiny"))


def test_config_arguments():
    c = load_config("pal", "method=pcgrad,tiny")
    assert (c.train.method, c.model.adapter) == ("pcgrad", "pal")
    assert (config_lib.task_schedule(c.train), config_lib.combiner(c.train)) == \
        ("additive", "pcgrad")
    assert c.model.encoder == "tiny"
    c = load_config("classifier", "task=cfimdb,option=pretrain")
    assert c.tasks == ("cfimdb",) and c.train.trainable == "head_only"
    with pytest.raises(ValueError, match="method='bogus'"):
        load_config("baseline", "method=bogus")
    with pytest.raises(ValueError, match="unknown config argument"):
        load_config("baseline", "mehtod=sqrt")


@pytest.mark.parametrize("key,value,message", [
    ("trainable", "bogus", r"config\.train\.trainable: 'bogus' is not finetune\|adapters_only"),
    ("schedule", "cosine", r"config\.train\.schedule: 'cosine' is not constant\|warmup_linear"),
    ("decay_mask", "none", r"config\.train\.decay_mask: 'none' is not no_bias_norm\|all"),
    ("grad_clip", -1.0, r"config\.train\.grad_clip: must be >= 0"),
    ("steps_per_epoch", 0, r"config\.train\.steps_per_epoch: must be an integer >= 1, or -1"),
    ("adam_b2", 1.0, r"config\.train\.adam_b2: must be in \[0, 1\)"),
    ("adam_eps", 0.0, r"config\.train\.adam_eps: must be positive"),
])
def test_optimiser_values_are_checked_before_any_compute(key, value, message):
    """validate() names each of these, before any compute; unchecked, each fails later,
    unnamed, in optim or the sampler, and a negative grad_clip silently turns every
    clipped update into ascent (optax scales by max_norm / norm)."""
    c = load_config("baseline")
    c.train[key] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(c)


@pytest.mark.parametrize("overrides,message", [
    ({"seed": -1}, r"config\.seed: must be an integer >= 0, got -1"),
    ({"data.max_length": 1}, r"config\.data\.max_length: must be an integer >= 2"),
    # A typo, or a split the epoch does not score: once found only after an epoch.
    ({"eval.best_metric": "dev/averag"},
     r"config\.eval\.best_metric: 'dev/averag' is not in an epoch's record: name "
     r"<dev\|train>/<sst\|quora\|sts\|average\|overall>"),
    ({"eval.best_metric": "train/average", "eval.train_sample": 0},
     r"'train/average' is not in an epoch's record: name <dev>/"),
])
def test_values_that_failed_after_setup_are_checked_first(overrides, message):
    c = load_config("baseline")
    for key, value in overrides.items():
        node, *path = key.split(".")
        if path:
            c[node][path[0]] = value
        else:
            c[node] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(c)


def test_a_best_metric_of_each_scored_split_is_accepted():
    c = load_config("baseline")
    for metric in ("dev/sst", "dev/overall", "train/average"):
        c.eval.best_metric = metric
        config_lib.validate(c)
    c.data.validation_fraction, c.train.ema_decay, c.eval.use_ema = 0.1, 0.99, True
    for metric in ("val/quora", "val_ema/average"):
        c.eval.best_metric = metric
        config_lib.validate(c)


def test_bad_keys_and_values_are_named():
    c = load_config("baseline")
    c.train.unknown_knob = 3
    with pytest.raises(ValueError, match=r"config\.train\.unknown_knob: unknown key"):
        config_lib.validate(c)
    c = load_config("baseline")
    c.train.learning_rate = -1.0
    with pytest.raises(ValueError, match=r"config\.train\.learning_rate: must be positive"):
        config_lib.validate(c)
    c = load_config("baseline")
    c.eval.train_sample_from = "first"
    with pytest.raises(ValueError, match=r"config\.eval\.train_sample_from: 'first' is not"):
        config_lib.validate(c)
    c = load_config("baseline")
    c.eval.train_sample = -1
    with pytest.raises(ValueError, match=r"config\.eval\.train_sample: must be >= 0"):
        config_lib.validate(c)
    c = load_config("baseline")
    c.data.max_length = 512
    with pytest.raises(ValueError, match=r"config\.data\.max_length"):
        config_lib.validate(c)
    with pytest.raises(ValueError, match=r"model\.pooling='max'"):
        ModelOptions(pooling="max")


def test_train_sample_zero_scores_no_train_split():
    # 0 once meant "no limit" and scored the whole train split every epoch.
    c = load_config("baseline")
    assert ("train", "train") in evaluate.record_splits(c)
    c.eval.train_sample = 0
    assert evaluate.record_splits(c) == (("dev", "dev"),)
    c.data.validation_fraction = 0.1
    assert evaluate.record_splits(c) == (("dev", "dev"), ("val", "val"))


TASKS = (TaskSpec("sst", "classification", 5), TaskSpec("quora", "pair_classification"),
         TaskSpec("sts", "pair_regression"))


def _setup(options=None, mode="finetune"):
    options = options or ModelOptions(similarity="dot")
    model = MultiTaskModel(tiny_config(), TASKS, options)
    batches = {t.name: dummy_batch(t, options.pair_encoding, 4, 8) for t in TASKS}
    for t, b in zip(TASKS, batches.values(), strict=True):
        b["labels"] = jnp.arange(4) % 2 if t.kind != "pair_regression" else jnp.linspace(0, 5, 4)
        b["mask"] = jnp.ones(4)
    params = jax.jit(lambda k: model.init(k, batches, method=MultiTaskModel.init_all))(
        jax.random.key(0))["params"]
    cfg = config_lib.base().train
    cfg.trainable = mode
    tx = optim.make_optimizer(cfg, params, 100)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                       jax.random.key_data(jax.random.key(1)))
    return Steps(model, tx), state, batches


def test_decay_mask_skips_biases_and_layernorms():
    steps, state, _ = _setup()
    mask = optim.decay_mask(state.params)
    flat = {optim.path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat["encoder/layer_0/attention/query/kernel"]
    assert not flat["encoder/layer_0/attention/query/bias"]
    assert not flat["encoder/layer_0/attention_LayerNorm/scale"]
    assert not flat["encoder/embeddings/LayerNorm/bias"]
    assert flat["heads/sst/dense/kernel"]


def _leaves(tree, prefix):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {optim.path_str(p): np.asarray(v) for p, v in flat
            if optim.path_str(p).startswith(prefix)}


@pytest.mark.parametrize("adapter", ["none", "pal"])
def test_step_on_one_task_leaves_other_tasks_bit_identical(adapter):
    steps, state, batches = _setup(ModelOptions(similarity="dot", adapter=AdapterConfig(adapter)))
    train_step = jax.jit(steps.train_step, static_argnames="task")
    # Warm Adam's moments and weight decay on every task first.
    for task in ("sst", "quora", "sts", "quora"):
        state, _ = train_step(state, batches[task], task)
    before = jax.device_get(state.params)
    state, _ = train_step(state, batches["sst"], "sst")
    after = jax.device_get(state.params)
    parts = ("heads", "adapters") if adapter != "none" else ("heads",)
    for other in [f"{part}/{t}" for part in parts for t in ("quora", "sts")]:
        b, a = _leaves(before, other), _leaves(after, other)
        assert b, f"no params under {other}"
        for k in b:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    moved = _leaves(after, "heads/sst")
    assert any(not np.array_equal(moved[k], _leaves(before, "heads/sst")[k]) for k in moved)
    enc_b, enc_a = _leaves(before, "encoder"), _leaves(after, "encoder")
    assert any(not np.array_equal(enc_a[k], enc_b[k]) for k in enc_a)


def test_head_only_mode_freezes_the_encoder():
    steps, state, batches = _setup(mode="head_only")
    before = jax.device_get(state.params)
    for _ in range(2):
        state, _ = jax.jit(steps.train_step, static_argnames="task")(state, batches["sst"], "sst")
    after = jax.device_get(state.params)
    for k, v in _leaves(before, "encoder").items():
        np.testing.assert_array_equal(_leaves(after, "encoder")[k], v, err_msg=k)
    assert any(not np.array_equal(_leaves(after, "heads/sst")[k], v)
               for k, v in _leaves(before, "heads/sst").items())


def _random_batch(task: TaskSpec, length: int, seed: int) -> dict:
    """A labelled batch of 4 rows, `length` tokens, random ids (the last 2 padding)."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    ids = jax.random.randint(k1, (4, length), 1000, 2000)
    mask = jnp.ones((4, length), jnp.int32).at[:, -2:].set(0)
    b = {k: ids if k.startswith("input_ids") else mask if k.startswith("attention_mask") else v
         for k, v in dummy_batch(task, "bi", 4, length).items()}
    b["labels"] = jax.random.randint(k2, (4,), 0, 2) if task.kind != "pair_regression" \
        else jax.random.uniform(k2, (4,), maxval=5.0)
    b["mask"] = jnp.ones(4)
    return b


def _sgd_setup(learning_rate: float):
    """_setup's model and state with plain SGD: an update is -learning_rate x gradient."""
    steps, state, _ = _setup()
    steps = Steps(steps.model, optax.sgd(learning_rate))
    return steps, state.replace(opt_state=steps.tx.init(state.params))


def test_jitted_additive_step_compiles_per_task_and_length_not_per_combination():
    # Each task's batch has its own bucket length: one program over all three
    # would compile for every combination (2**3 here, up to 4**3 in training).
    steps, state = _sgd_setup(1e-3)
    mesh = parallel.make_mesh()  # the trainer's path: in_shardings and all
    sharding = parallel.state_shardings(state, mesh)
    _, additive_step, _ = steps.jitted(mesh, sharding)
    state = parallel.put(state, sharding)
    task_grads, apply_combined = additive_step.parts
    mark = compilation.STATS.by_function()
    for i, lengths in enumerate(itertools.product((8, 16), repeat=3)):
        batches = {t.name: device_batch(_random_batch(t, n, 10 * i + j))
                   for j, (t, n) in enumerate(zip(TASKS, lengths, strict=True))}
        state, metrics = additive_step(state, batches)
        assert np.isfinite(float(metrics["grad_norm"]))
    # 2 batch structures (a sentence; a bi-encoded pair, Quora's and STS's) x 2 lengths,
    # each structure's first length through jit (the second: by_length).
    made = {k: v - mark.get(k, compilation.Compiled()) for k, v in
            compilation.STATS.by_function().items()}
    assert sum(made[k].programs + made[k].cache_hits for k in made if "task_grads" in k) == 4
    assert task_grads.jitted._cache_size() == 2
    assert apply_combined._cache_size() == 1


def test_additive_step_is_the_gradient_of_the_summed_loss():
    steps, state = _sgd_setup(0.5)
    batches = {t.name: _random_batch(t, n, i)
               for i, (t, n) in enumerate(zip(TASKS, (8, 16, 8), strict=True))}
    keys = {t: steps._dropout_key(state, t) for t in batches}

    def summed(params):  # the reference: one gradient of the sum of the three losses
        return sum(steps.loss(params, batches[t], t, keys[t]) for t in batches)

    want = jax.tree.map(lambda p, g: p - 0.5 * g, state.params,
                        jax.jit(jax.grad(summed))(state.params))
    want = jax.device_get(want)
    mesh = parallel.make_mesh()
    sharding = parallel.state_shardings(state, mesh)
    new, _ = steps.jitted(mesh, sharding)[1](parallel.put(state, sharding), batches)
    got = jax.device_get(new.params)
    for (path, w), g in zip(jax.tree_util.tree_flatten_with_path(want)[0],
                            jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=optim.path_str(path))


def test_pcgrad_step_in_parts_matches_one_program():
    steps, state, _ = _setup()
    names = tuple(t.name for t in TASKS)
    tx = optax.chain(pcgrad.pcgrad(task_params.shared_param_mask(state.params, names), seed=3,
                                   num_tasks=len(names)), optax.sgd(0.5))
    steps = Steps(steps.model, tx, stacked=True)
    mesh = parallel.make_mesh()
    state = state.replace(opt_state=tx.init(state.params))
    sharding = parallel.state_shardings(state, mesh)
    state = parallel.put(state, sharding)
    batches = {t.name: _random_batch(t, n, i)
               for i, (t, n) in enumerate(zip(TASKS, (16, 8, 8), strict=True))}
    whole, whole_metrics = jax.jit(steps.additive_step)(state, batches)
    whole, before = jax.device_get((whole.params, state.params))
    parts, metrics = steps.jitted(mesh, sharding)[1](state, batches)  # donates state
    for w, p in zip(jax.tree.leaves(whole), jax.tree.leaves(jax.device_get(parts.params)),
                    strict=True):
        np.testing.assert_allclose(p, w, rtol=1e-5, atol=1e-6)
    # The combiner's statistics (kept in the sharded, donated state) agree as well.
    assert {f"share/{n}" for n in names} <= set(metrics)
    for key, value in jax.device_get(whole_metrics).items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
    assert any(not np.allclose(w, b) for w, b in
               zip(jax.tree.leaves(whole), jax.tree.leaves(before), strict=True))


def test_additive_step_moves_every_head():
    steps, state, batches = _setup()
    before = jax.device_get(state.params)
    additive_step = jax.jit(steps.additive_step)
    for _ in range(2):  # the warm-up schedule's first learning rate is 0
        state, m = additive_step(state, batches)
    assert set(m) == {"loss/sst", "loss/quora", "loss/sts", "grad_norm"}
    after = jax.device_get(state.params)
    for task in ("sst", "quora", "sts"):
        assert any(not np.array_equal(_leaves(after, f"heads/{task}")[k], v)
                   for k, v in _leaves(before, f"heads/{task}").items()), task
