"""The TFDS builders: prepared from the manual (data) directory or downloaded."""

import numpy as np

from flaxpals.data import cs224n, paths, reader, tasks
from tests.conftest import require

tfds = require("tensorflow_datasets")


def _examples(builder, split):
    return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def _check_matches_reader(builder, name, directory):
    task = tasks.get_task(name)
    for split in task.split_names:
        parsed = reader.read_file(directory / task.split_source(split), task, split)
        got = {ex["id"].decode(): ex for ex in _examples(builder, split)}
        assert builder.info.splits[split].num_examples == len(parsed) == len(got)
        for i in (0, len(parsed) // 2, len(parsed) - 1):
            ex = got[parsed.ids[i]]
            assert ex["sentence"].decode() == parsed.texts[i]
            assert ex["line"] == parsed.lines[i]
            assert ex["label"] == (parsed.labels[i] if parsed.labels else -1)


def test_builder_prepares_cfimdb_from_the_data_dir(tmp_path):
    cs224n.builder_class()
    assert "cs224n" in tfds.list_builders()  # registered: tfds.load("cs224n/sst") works
    builder = cs224n.prepare("cfimdb", tfds_dir=tmp_path)
    assert str(builder.data_dir).startswith(str(tmp_path))  # never the read-only data dir
    assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {
        "train": 1707, "dev": 245, "test": 488}
    _check_matches_reader(builder, "cfimdb", paths.data_dir())


def test_builder_downloads_when_no_data_dir(tmp_path, monkeypatch):
    real = paths.data_dir()
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "absent"))
    monkeypatch.setenv(cs224n.URL_ENV_VAR, real.as_uri())  # a stand-in for GitHub, offline
    builder = cs224n.prepare("cfimdb", tfds_dir=tmp_path / "tfds")
    assert builder.info.splits["train"].num_examples == 1707
    assert list((tmp_path / "tfds" / "downloads").rglob("*cfimdb-train*"))
    _check_matches_reader(builder, "cfimdb", real)


def test_builder_quora_skips_unlabelled_rows_and_has_no_test_here(tmp_path):
    builder = cs224n.prepare("quora", tfds_dir=tmp_path)
    assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {
        "train": 16217, "dev": 1996}
    ex = _examples(builder, "dev")[0]
    assert set(ex) == {"id", "line", "sentence1", "sentence2", "label"}
    assert ex["label"].dtype == np.int32
