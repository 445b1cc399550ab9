"""The validation split held out of train (Split.holdout, data.validation_fraction).

References: the real CS224N files and their source line numbers (unique per row).
"""

import numpy as np
import pytest

from flaxpals import config_lib
from flaxpals.data import batching, tasks
from flaxpals.data import input_pipeline as ip
from flaxpals.model import build
from flaxpals.train import evaluate, parallel

pytestmark = pytest.mark.xdist_group("validation_split")


def test_holdout_is_disjoint_deterministic_and_sized(tok, cache):
    sst = ip.load_split(tasks.get_task("sst"), "train", tok, cache_dir=cache)
    assert len(sst) == 8544
    rest, val = sst.holdout(0.1, seed=0)
    assert (len(val), len(rest)) == (854, 7690)  # 854.4 rounded; the rest trains
    assert (val.name, rest.name) == ("val", "train")
    assert not set(val.lines) & set(rest.lines) and not set(val.ids) & set(rest.ids)
    assert sorted([*val.lines, *rest.lines]) == sorted(sst.lines)
    assert np.all(np.diff(val.lines) > 0) and np.all(np.diff(rest.lines) > 0)  # file order
    again_rest, again_val = sst.holdout(0.1, seed=0)
    assert list(again_val.ids) == list(val.ids) and list(again_rest.ids) == list(rest.ids)
    assert list(sst.holdout(0.1, seed=1)[1].ids) != list(val.ids)
    # A held-out row keeps its own tokens and label.
    row_of = {line: k for k, line in enumerate(sst.lines)}
    for part in (val, rest):
        for k in (0, 17, len(part) - 1):
            j = row_of[part.lines[k]]
            np.testing.assert_array_equal(part.input_ids[k], sst.input_ids[j])
            assert part.labels[k] == sst.labels[j] and part.ids[k] == sst.ids[j]
    # The labels are spread as in the file (SST's file is sorted by label).
    share = np.bincount(val.labels, minlength=5) / len(val)
    whole = np.bincount(sst.labels, minlength=5) / len(sst)
    assert np.abs(share - whole).max() < 0.05
    # Never empty, never all; bad fractions refused.
    small = sst.take(5)
    assert [len(p) for p in small.holdout(0.01, 0)] == [4, 1]
    assert [len(p) for p in small.holdout(0.99, 0)] == [1, 4]
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            sst.holdout(bad, 0)


def test_holdout_of_bi_encoded_pairs_keeps_both_sentences(tok, cache):
    quora = ip.load_split(tasks.get_task("quora"), "dev", tok, cache_dir=cache,
                          pair_encoding="bi")
    rest, val = quora.holdout(0.2, seed=3)
    assert len(val) == int(0.2 * len(quora) + 0.5) and len(rest) + len(val) == len(quora)
    j = {line: k for k, line in enumerate(quora.lines)}[val.lines[5]]
    np.testing.assert_array_equal(val.input_ids_2[5], quora.input_ids_2[j])
    assert len(val.input_ids) == len(val.input_ids_2) == len(val.labels) == len(val)


def _config(cache, **kw):
    c = config_lib.base()
    c.tasks = ("sst", "sts")
    c.data.cache_dir = str(cache)
    c.data.train_limit, c.data.validation_fraction = 400, 0.25
    c.eval.best_metric = "val/average"
    for key, value in kw.items():
        section, leaf = key.split(".")
        c[section][leaf] = value
    config_lib.validate(c)
    return c


def test_load_data_holds_out_val_and_no_training_batch_reads_it(tok, cache):
    c = _config(cache)
    task_list = tasks.tasks_of_config(c)
    data = build.load_data(c, task_list, tok)
    for t in task_list:
        full = ip.load_split(t, "train", tok, cache_dir=cache, max_length=c.data.max_length,
                             pair_encoding=c.model.pair_encoding).take(400)
        splits = data[t.name]
        assert set(splits) == {"train", "dev", "val"}
        assert (len(splits["train"]), len(splits["val"])) == (300, 100)
        # The held-out rows are drawn from the limited train rows by validation_seed.
        assert set(splits["val"].lines) <= set(full.lines)
        assert list(splits["val"].ids) == list(full.holdout(0.25, c.data.validation_seed)[1].ids)
        held = set(splits["val"].ids)
        seen = set()
        plan = batching.TrainPlan(splits["train"].lengths(), tuple(c.data.buckets), 16, seed=0)
        for batch in ip.planned_batches(splits["train"], plan, num_epochs=3):
            seen.update(batch["ids"])
        assert seen and not seen & held
        assert seen <= set(splits["train"].ids)
        # The trainer's evaluation reads the whole held-out split.
        found, batches = evaluate.EvalSets(data, c, parallel.make_mesh()).get(t.name, "val")
        assert found is splits["val"]
        assert sum(int((b["index"] >= 0).sum()) for b in batches) == 100
    # The same rows whatever the run's seed.
    c2 = _config(cache)
    c2.seed = 7
    again = build.load_data(c2, task_list, tok)
    for t in task_list:
        assert list(again[t.name]["val"].ids) == list(data[t.name]["val"].ids)
    # Off: no val split, every train row trains.
    off = _config(cache, **{"data.validation_fraction": 0.0, "eval.best_metric": "dev/average"})
    plain = build.load_data(off, task_list, tok)
    assert "val" not in plain["sst"] and len(plain["sst"]["train"]) == 400


@pytest.mark.parametrize("overrides,message", [
    ({"data.validation_fraction": 1.0}, r"data\.validation_fraction: must be in \[0, 1\)"),
    ({"data.validation_fraction": -0.1}, r"data\.validation_fraction: must be in \[0, 1\)"),
    ({"data.validation_fraction": 0.1}, r"eval\.best_metric: with data\.validation_fraction"),
    ({"eval.best_metric": "val/average"}, r"eval\.best_metric: 'val/average' needs "
                                          r"data\.validation_fraction > 0"),
])
def test_config_keys_are_checked_and_named(overrides, message):
    c = config_lib.base()
    for key, value in overrides.items():
        section, leaf = key.split(".")
        c[section][leaf] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(c)
