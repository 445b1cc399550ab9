"""The persistent compilation cache: a second build of a run's steps compiles nothing."""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.compilation_cache import compilation_cache as cc

from flaxpals.model import build
from flaxpals.model.multitask import dummy_batch
from flaxpals.train import compilation, optim
from flaxpals.train.steps import Steps, TrainState
from tests.conftest import tiny


@pytest.fixture
def fresh_cache(tmp_path):
    """This test's own cache directory; the session's is put back afterwards."""
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes", "jax_enable_compilation_cache")
    before = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", None)  # so enable_cache picks its own
    cc.reset_cache()
    yield tmp_path / "cache"
    for k, v in before.items():
        jax.config.update(k, v)
    cc.reset_cache()


def _build_and_run(config):
    """The tiny run's SST train step and predict step, built afresh and run once each."""
    jax.clear_caches()  # no in-memory compiled program survives from an earlier build
    model, params, _, tasks = build.build_model(config)
    tx = optim.make_optimizer(config.train, params, 10)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                       jax.random.key_data(jax.random.key(1)))
    train_step, _, predict_step = Steps(model, tx).jitted()
    batch = dummy_batch(tasks[0], config.model.pair_encoding, 4, 16)
    batch = {**batch, "labels": (jnp.arange(4) % 5).astype(jnp.float32), "mask": jnp.ones(4)}
    state, metrics = train_step(state, batch, jnp.int32(0))
    jax.block_until_ready((metrics, predict_step(state.params, batch, jnp.int32(0))))


def test_a_second_build_loads_every_program_from_the_cache(fresh_cache):
    config = tiny(**{"data.cache_dir": str(fresh_cache), "tasks": ("sst",)})
    assert compilation.enable_cache(config) == str(fresh_cache / "jax")

    mark = compilation.STATS.snapshot()
    _build_and_run(config)
    first = compilation.STATS.since(mark)
    assert first.programs >= 2 and first.cache_hits == 0  # train and predict at least
    assert any((fresh_cache / "jax").iterdir())

    mark, names = compilation.STATS.snapshot(), compilation.STATS.by_function()
    _build_and_run(config)
    second = compilation.STATS.since(mark)
    assert second.programs == 0
    assert second.cache_hits == first.programs
    # By function: the loads add up to the total, and the train step is among them.
    by_name = {k: v - names.get(k, compilation.Compiled())
               for k, v in compilation.STATS.by_function().items()}
    assert sum(v.cache_hits for v in by_name.values()) == second.cache_hits
    assert sum(v.programs for v in by_name.values()) == 0
    assert any("train_step" in k and v.cache_hits for k, v in by_name.items()), by_name


def test_the_cache_can_be_turned_off(fresh_cache):
    config = tiny(**{"data.cache_dir": str(fresh_cache), "compilation_cache": False})
    assert compilation.enable_cache(config) is None
    assert not jax.config.jax_enable_compilation_cache
