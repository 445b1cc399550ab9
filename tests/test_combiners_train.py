"""The combiners and loss weightings in the trainer: config keys, validation, end to end."""

import json
import re

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from flaxpals import config_lib
from flaxpals.mtl import combiners, loss_weighting
from flaxpals.train import loop
from tests.conftest import epochs, tiny

NEW_COMBINERS = [n for n in config_lib.COMBINERS if n not in ("sum", "pcgrad")]
WEIGHTINGS = list(config_lib.LOSS_WEIGHTINGS[1:])

# ---------------------------------------------------------------------------
# Config


def test_every_config_name_validates_and_builds():
    """config_lib names the combiners and loss weightings; the modules implement each."""
    c = config_lib.base()
    c.train.method = "additive"
    for name in config_lib.COMBINERS:
        c.train.combiner = name
        config_lib.validate(c)
        tx = combiners.from_config(c.train, {"w": True}, 3, 0)
        assert (tx is None) == (name == "sum")
    c.train.combiner = "sum"
    for name in config_lib.LOSS_WEIGHTINGS:
        c.train.loss_weighting = name
        config_lib.validate(c)
        tx = combiners.from_config(c.train, {"w": True}, 3, 0)
        assert (tx is None) == (name == "none")


@pytest.mark.parametrize("overrides,key", [
    ({"train.combiner": "graddrop"}, "train.combiner"),
    ({"train.method": "sequential", "train.combiner": "mgda"}, "train.combiner"),
    ({"tasks": tuple(f"t{i}" for i in range(13)), "train.combiner": "mgda"}, "train.combiner"),
    ({"train.cagrad_c": 1.0}, "train.cagrad_c"),
    ({"train.cagrad_c": -0.1}, "train.cagrad_c"),
    ({"train.gradvac_beta": 0.0}, "train.gradvac_beta"),
    ({"train.loss_weighting": "gradnorm"}, "train.loss_weighting"),
    ({"train.loss_weighting": "dwa", "train.combiner": "cagrad"}, "train.loss_weighting"),
    ({"train.loss_weighting": "famo", "train.method": "round_robin"}, "train.loss_weighting"),
    ({"train.uncertainty_lr": 0.0}, "train.uncertainty_lr"),
    ({"train.dwa_temperature": 0.0}, "train.dwa_temperature"),
    ({"train.dwa_window": 0}, "train.dwa_window"),
    ({"train.famo_lr": 0.0}, "train.famo_lr"),
    ({"train.famo_decay": -1e-3}, "train.famo_decay"),
])
def test_validate_names_the_key(overrides, key):
    c = config_lib.base()
    c.train.method = "additive"
    for path, value in overrides.items():
        node = c
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    with pytest.raises(ValueError, match="^" + re.escape(f"config.{key}:")):
        config_lib.validate(c)


def test_from_config_passes_the_options():
    c = config_lib.base().train
    mask = {"w": True}
    # the plain sum: no transformation
    assert combiners.from_config(c, mask, 3, 0) is None
    c.combiner, c.cagrad_c = "cagrad", 0.0
    g = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    tx = combiners.from_config(c, mask, 3, 0)
    out, _ = tx.update({"w": g}, tx.init(None))
    np.testing.assert_allclose(out["w"], g.mean(0), rtol=1e-6)  # c = 0: the mean
    c.combiner, c.gradvac_beta = "gradvac", 0.5
    tx = combiners.from_config(c, mask, 3, 0)
    assert tx.init(None).inner.targets.shape == (3, 3)
    c.combiner, c.loss_weighting, c.dwa_window = "sum", "dwa", 7
    state = combiners.from_config(c, mask, 3, 0).init(None)
    assert isinstance(state.inner, loss_weighting.DWAState)


# ---------------------------------------------------------------------------
# Through the trainer

# Every run but one uses the baseline model (no adapters): its per-task
# programs compile once and are then shared through the persistent cache, so
# each run compiles little beside its own apply_combined (all nine runs with
# PALs took far over the 90 s budget). The one PAL run covers the adapters'
# task-specific leaves; like the other adapter runs (test_train_e2e.py) it
# compiles programs of its own, so it runs in `make test-slow`.
# All run in `make test-slow` (and CI): the first run on a worker compiles the shared
# per-task programs, which kept the default suite over its 10 minutes.
_SLOW = pytest.mark.slow
CASES = ([pytest.param("pal", "gradvac", "none", id="pal-gradvac", marks=_SLOW)]
         + [pytest.param("baseline", n, "none", id=n, marks=_SLOW)
            for n in NEW_COMBINERS if n != "gradvac"]
         + [pytest.param("baseline", "sum", w, id=w, marks=_SLOW) for w in WEIGHTINGS])
STATE_MOVED = {  # a leaf of the transformation's state that training must have changed
    "gradvac": "targets", "uncertainty": "log_vars", "dwa": "windows", "famo": "logits"}


def _find(tree, name):
    """The values under key `name` anywhere in a restored (dict/list) tree."""
    found = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            found += [v] if k == name else _find(v, name)
    elif isinstance(tree, list | tuple):
        for v in tree:
            found += _find(v, name)
    return found


@pytest.mark.parametrize("model,name,loss_weighting", CASES)
def test_trains_end_to_end(tmp_path, monkeypatch, model, name, loss_weighting):
    """train_and_evaluate with each combiner and weighting: the configured
    transformation is the one traced into the step (per-task gradients, and the
    losses for a weighting), losses stay per task in the metrics and go down on a
    fixed batch, and a stateful method's state moves and reaches the checkpoint."""
    traced = []
    real = combiners.from_config

    def spy(train_cfg, shared, num_tasks, seed):
        tx = real(train_cfg, shared, num_tasks, seed)

        def update(updates, state, params=None, **extra):
            traced.append((train_cfg.combiner, train_cfg.loss_weighting,
                           jax.tree.leaves(updates)[0].shape[0], sorted(extra)))
            return tx.update(updates, state, params, **extra)

        return optax.GradientTransformationExtraArgs(tx.init, update)

    monkeypatch.setattr(combiners, "from_config", spy)
    c = tiny(model, "method=additive", **{
        "train.combiner": name, "train.loss_weighting": loss_weighting,
        "train.dwa_window": 2, "data.train_limit": 8, "train.num_epochs": 2,
        "train.steps_per_epoch": 6, "eval.train_sample": 8, "checkpoint.every_steps": 100})
    loop.train_and_evaluate(c, tmp_path)

    assert traced and all(t == (name, loss_weighting, 3, ["losses"]) for t in traced), traced
    history = epochs(tmp_path)
    assert [r["epoch"] for r in history] == [1, 2]
    for task in c.tasks:
        seen = [r[f"loss/{task}"] for r in history]
        assert seen[-1] < seen[0], f"{name}/{loss_weighting}: {task} loss did not go down: {seen}"
    assert np.isfinite(history[-1]["dev/average"])
    # The combination's statistics, epoch means: weights for every method, and for
    # the gradient combiners shares of the update that sum to 1.
    for r in history:
        assert all(np.isfinite(r[f"coef/{t}"]) for t in c.tasks), r
        if loss_weighting == "none":
            assert sum(r[f"share/{t}"] for t in c.tasks) == pytest.approx(1, abs=1e-5)
            assert sum(r[f"sum_share/{t}"] for t in c.tasks) == pytest.approx(1, abs=1e-5)
        else:
            assert not any(k.startswith("share/") for k in r), r
        # Each method's own equation, step by step, so in the means: MGDA's shares are
        # its weights; Nash-MTL's alpha_t (G alpha)_t = 1 gives every task 1/3.
        for t in c.tasks:
            if name == "mgda":
                assert r[f"share/{t}"] == pytest.approx(r[f"coef/{t}"], abs=1e-4), r
            if name == "nash_mtl":
                assert r[f"share/{t}"] == pytest.approx(1 / 3, abs=1e-3), r
    if model == "pal":
        assert json.loads((tmp_path / "params.json").read_text())["ratio_by_key"]["adapters"] > 1
    key = STATE_MOVED.get(name if loss_weighting == "none" else loss_weighting)
    if key:
        step = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(tmp_path / "checkpoints" / str(step) / "train")
        (value,) = _find(restored["opt_state"], key)
        assert np.any(np.asarray(value) != 0), (key, value)
