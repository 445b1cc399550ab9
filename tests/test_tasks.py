"""The task registry: builtin declarations, overrides, tasks declared by config."""

import dataclasses

import pytest

from flaxpals.data import tasks
from tests.conftest import require


def test_builtin_tasks_are_declared_with_their_kind_labels_and_metric():
    sst, quora, sts, cfimdb = (tasks.get_task(n) for n in ("sst", "quora", "sts", "cfimdb"))
    assert (sst.kind, sst.num_labels, sst.metric, sst.is_pair) == (
        "classification", 5, "accuracy", False)
    assert (quora.kind, quora.num_labels, quora.metric, quora.is_pair) == (
        "pair_classification", 2, "accuracy", True)
    assert (sts.kind, sts.num_labels, sts.label_range, sts.metric, sts.is_pair) == (
        "pair_regression", 1, (0.0, 5.0), "pearson", True)
    assert (cfimdb.kind, cfimdb.num_labels, cfimdb.metric) == ("classification", 2, "accuracy")
    assert sst.split_source("test") == "ids-sst-test-student.csv"
    assert quora.split_source("train") == "quora-train.csv"
    assert (quora.text_field, quora.text_pair_field, quora.label_field) == (
        "sentence1", "sentence2", "is_duplicate")
    # Frozen and hashable: usable as a static argument of jax.jit.
    assert hash(sst) == hash(tasks.get_task("SST"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        sst.num_labels = 3


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown task 'imdb'.*cfimdb.*quora.*sst.*sts"):
        tasks.get_task("imdb")
    with pytest.raises(ValueError, match="no split 'validation'"):
        tasks.get_task("sst").split_source("validation")


def test_overrides_replace_fields_and_reject_unknown_ones():
    t = tasks.get_task("sst", {"splits": {"train": "/tmp/a.tsv", "dev": "b.tsv"}})
    assert t.splits == (("train", "/tmp/a.tsv"), ("dev", "b.tsv"))
    assert t.num_labels == 5
    with pytest.raises(ValueError, match="unknown override"):
        tasks.get_task("sst", {"num_classes": 3})
    with pytest.raises(ValueError, match="label_range"):
        tasks.get_task("sts", {"label_range": (5.0, 0.0)})


def test_tfds_task_by_config():
    t = tasks.task_from_config(tasks.GLUE_CONFIGS["glue/qqp"])
    assert (t.source, t.tfds_name, t.kind, t.num_labels, t.metric) == (
        "tfds", "glue/qqp", "pair_classification", 2, "accuracy")
    assert t.split_source("dev") == "validation"
    assert (t.id_field, t.text_field, t.text_pair_field, t.label_field) == (
        "idx", "question1", "question2", "label")
    stsb = tasks.task_from_config(tasks.GLUE_CONFIGS["glue/stsb"])
    assert (stsb.metric, stsb.num_labels, stsb.label_range) == ("pearson", 1, (0.0, 5.0))


def test_csv_task_by_config_from_a_configdict():
    ml_collections = require("ml_collections")
    cfg = ml_collections.ConfigDict({
        "name": "reviews", "kind": "classification", "num_labels": 3,
        "files": {"train": "/data/r-train.tsv", "dev": "r-dev.tsv"},
        "fields": {"id": "rid", "text": "body", "label": "stars"},
        "label_names": ["bad", "ok", "good"]})
    t = tasks.task_from_config(cfg)
    assert (t.source, t.delimiter, t.label_names, t.id_field) == (
        "csv", None, ("bad", "ok", "good"), "rid")
    assert t.split_names == ("train", "dev")


def test_config_naming_a_builtin_gives_it():
    assert tasks.task_from_config({"name": "sts"}) == tasks.get_task("sts")


@pytest.mark.parametrize("cfg, error", [
    ({"name": "x", "kind": "classification", "num_labels": 2, "files": {"train": "a"}},
     "fields.text"),
    ({"name": "x", "num_labels": 2, "files": {"train": "a"}, "fields": {"text": "s"}},
     "`kind` is required"),
    ({"name": "x", "kind": "classification", "files": {"train": "a"}, "fields": {"text": "s"}},
     "needs num_labels"),
    ({"name": "x", "kind": "pair_classification", "num_labels": 2, "files": {"train": "a"},
      "fields": {"text": "s"}}, "text_pair"),
    ({"name": "x", "kind": "pair_regression", "files": {"train": "a"},
      "fields": {"text": "s", "text_pair": "t"}}, "label_range"),
    ({"name": "x", "kind": "classification", "num_labels": 2, "label_names": ["a"],
      "files": {"train": "a"}, "fields": {"text": "s"}}, "label_names"),
    ({"name": "x", "kind": "classification", "num_labels": 2, "tfds": "glue/sst2",
      "files": {"train": "a"}, "fields": {"text": "s"}}, "not both"),
    ({"name": "x", "kind": "classification", "num_labels": 2, "files": {"validation": "a"},
      "fields": {"text": "s"}}, "split 'validation'"),
    ({"name": "x", "kind": "classification", "num_labels": 2, "files": {"train": "a"},
      "fields": {"text": "s", "sentence": "t"}}, "unknown field"),
    ({"name": "x", "kind": "classification", "num_labels": 2, "files": {"train": "a"},
      "fields": {"text": "s"}, "labels": 2}, "unknown key"),
    ({"name": "mystery"}, "neither a builtin"),
])
def test_bad_configs_are_refused_with_a_reason(cfg, error):
    with pytest.raises(ValueError, match=error):
        tasks.task_from_config(cfg)
