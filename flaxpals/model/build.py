"""A run's parts from its config: encoder, tokenizer, tasks, model, params, data.

    model, params, tokenizer, tasks = build_model(config)          # to train: initial params
    model, shapes, tokenizer, tasks = abstract_model(config)       # to restore: shapes only
    data = load_data(config, tasks, tokenizer)                     # task -> split -> Split

`abstract_model` reads no weights and compiles nothing: the shapes come from
`jax.eval_shape` of the model's init, and a checkpoint fills them.
"""

from __future__ import annotations

import logging
from typing import Any

import jax

from flaxpals import config_lib
from flaxpals.data import input_pipeline
from flaxpals.data import tasks as tasks_lib
from flaxpals.model import bert, hf_checkpoint
from flaxpals.model.adapters import AdapterConfig
from flaxpals.model.multitask import ModelOptions, MultiTaskModel, TaskSpec, dummy_batch
from flaxpals.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Encoders with random weights, by config.model.encoder name (config_lib.RANDOM_ENCODERS),
# and MiniLM's vocabulary (bert-base-uncased's): "tiny" for tests; "bert-base-random",
# bert-base-uncased's shape, for benchmarks on machines that cannot download its weights.
RANDOM_ENCODERS = {"tiny": bert.tiny_config, "bert-base-random": bert.BertConfig}
assert tuple(RANDOM_ENCODERS) == config_lib.RANDOM_ENCODERS


def encoder_config(model_cfg) -> tuple[bert.BertConfig, Any]:
    """(encoder config, the checkpoint directory with its vocab.txt), reading no weights."""
    if model_cfg.encoder in RANDOM_ENCODERS:
        config = RANDOM_ENCODERS[model_cfg.encoder]()
        directory = hf_checkpoint.resolve_checkpoint("minilm")
    else:
        config, directory = hf_checkpoint.load_config(model_cfg.encoder)
    return _with_dropout(config, model_cfg), directory


def _with_dropout(config: bert.BertConfig, model_cfg) -> bert.BertConfig:
    if model_cfg.hidden_dropout >= 0:
        config = config.replace(hidden_dropout_prob=model_cfg.hidden_dropout,
                                attention_probs_dropout_prob=model_cfg.hidden_dropout)
    return config


def load_encoder(model_cfg) -> tuple[bert.BertConfig, dict | None, Tokenizer]:
    """(encoder config, pretrained params or None for random init, tokenizer)."""
    if model_cfg.encoder in RANDOM_ENCODERS:
        config, params = RANDOM_ENCODERS[model_cfg.encoder](), None
        vocab_dir = hf_checkpoint.resolve_checkpoint("minilm")  # a real vocabulary for the tokens
    else:
        config, params, vocab_dir = hf_checkpoint.load_pretrained(model_cfg.encoder)
    return _with_dropout(config, model_cfg), params, Tokenizer.from_checkpoint(vocab_dir)


def model_options(model_cfg, platform: str | None = None) -> ModelOptions:
    """The model's options from config.model; model.dtype auto resolved for `platform`
    (default: JAX's backend; `config_lib.compute_dtype`). The config's check of its model
    fields is this: a bad value raises config_lib.ConfigError naming config.model."""
    try:
        adapter = AdapterConfig(
            kind=model_cfg.adapter,
            size=None if model_cfg.adapter_size < 0 else model_cfg.adapter_size,
            num_heads=model_cfg.adapter_heads, zero_init_decoder=model_cfg.zero_init_decoder,
            placement=model_cfg.placement)
        return ModelOptions(
            adapter=adapter, pooling=model_cfg.pooling,
            pair_encoding=model_cfg.pair_encoding, similarity=model_cfg.similarity,
            head_dropout=model_cfg.head_dropout,
            dtype=config_lib.compute_dtype(model_cfg, platform))
    except ValueError as e:
        raise config_lib.ConfigError(f"config.model: {e}") from None


def _model_and_init(config, bert_config) -> tuple[MultiTaskModel, Any, list[tasks_lib.Task]]:
    tasks = tasks_lib.tasks_of_config(config)
    specs = tuple(TaskSpec(t.name, t.kind, t.num_labels) for t in tasks)
    model = MultiTaskModel(bert_config, specs, model_options(config.model))
    dummies = {s.name: dummy_batch(s, config.model.pair_encoding) for s in specs}

    def init(key):
        return model.init(key, dummies, method=MultiTaskModel.init_all)["params"]

    return model, init, tasks


def build_model(config) -> tuple[MultiTaskModel, dict, Tokenizer, list[tasks_lib.Task]]:
    """The model and its initial params (pretrained encoder, random adapters and heads)."""
    bert_config, pretrained, tokenizer = load_encoder(config.model)
    model, init, tasks = _model_and_init(config, bert_config)
    key = jax.random.key(config.seed)
    if pretrained is None:
        return model, jax.device_get(jax.jit(init)(key)), tokenizer, tasks
    # Only the adapters and heads need random values. XLA drops the encoder's unused
    # initialisation from this program (smaller to compile or load from the cache), and
    # the rest keep their values: flax derives each module's key from its own path.
    def init_all_but_encoder(k):
        return {name: tree for name, tree in init(k).items() if name != "encoder"}

    rest = jax.device_get(jax.jit(init_all_but_encoder)(key))
    return model, dict(sorted({**rest, "encoder": pretrained}.items())), tokenizer, tasks


def abstract_model(config) -> tuple[MultiTaskModel, Any, Tokenizer, list[tasks_lib.Task]]:
    """The model and the shapes of its params (jax.ShapeDtypeStruct leaves), for restoring."""
    bert_config, directory = encoder_config(config.model)
    model, init, tasks = _model_and_init(config, bert_config)
    shapes = jax.eval_shape(init, jax.random.key(config.seed))
    return model, shapes, Tokenizer.from_checkpoint(directory), tasks


def load_data(config, tasks, tokenizer, splits=("train", "dev"),
              limits: bool = True) -> dict[str, dict[str, Any]]:
    """task -> split -> Split; `limits` applies data.train_limit / data.eval_limit.

    A missing test split is skipped with a message; a missing train or dev split raises.
    With data.validation_fraction > 0 a "val" split is held out of "train" (after its
    limit; Split.holdout, drawn by data.validation_seed), and "train" is the rest.
    """
    data = {}
    for task in tasks:
        data[task.name] = {}
        for split in splits:
            if split not in task.split_names:
                if split == "test":
                    continue
                raise ValueError(f"task {task.name!r} has no {split} split; it has "
                                 f"{list(task.split_names)}")
            try:
                s = input_pipeline.load_split(
                    task, split, tokenizer, data_dir=config.data.data_dir or None,
                    cache_dir=config.data.cache_dir or None, strict=config.data.strict,
                    max_length=config.data.max_length, pair_encoding=config.model.pair_encoding)
            except FileNotFoundError as e:
                if split != "test":
                    raise
                log.info("%s: no test split (%s); skipping it", task.name, e)
                continue
            limit = config.data.train_limit if split == "train" else config.data.eval_limit
            data[task.name][split] = s.take(limit) if limits and limit > 0 else s
        if config.data.validation_fraction > 0 and "train" in data[task.name]:
            data[task.name]["train"], data[task.name]["val"] = data[task.name]["train"].holdout(
                config.data.validation_fraction, config.data.validation_seed)
    return data
