"""Checks that a training config can run, before anything is written to its workdir.

    preflight.check(config)   # after config_lib.validate; raises a one-line user error

A run that fails on a missing encoder or data file must leave its workdir as it found
it: a config.json written by a run that never trained would make the corrected
command look like a different model. So before the trainer creates or locks its
workdir this reads, without loading weights or tokenizing:

- the model's options and the declared tasks (`build.model_options`,
  `tasks.tasks_of_config`: config_lib.validate checks neither);
- the encoder's config.json and vocab.txt (`model.encoder`: a directory, `minilm`,
  `tiny` or a hub id, fetched once as the trainer would);
- the train and dev file of every task read from files (CS224N or declared CSV/TSV),
  and, for the CS224N files, their SHA256 against SHA256SUMS (`cs224n.verify`);
- that the global batch sizes divide over the devices (`parallel.check_divisible`).

TFDS tasks are prepared by the trainer itself and not checked here.
"""

from __future__ import annotations

import jax

from flaxpals import config_lib
from flaxpals.data import cs224n
from flaxpals.data.tasks import tasks_of_config
from flaxpals.model import build, hf_checkpoint
from flaxpals.train import parallel

SPLITS = ("train", "dev")


def check(config) -> None:
    """Raises ConfigError (naming the key), FileNotFoundError or cs224n.ChecksumError
    when the encoder or a data file of `config` is missing or damaged; ValueError (naming
    the key) when a batch size does not divide over the devices."""
    for key in ("train.batch_size", "eval.batch_size"):
        section, field = key.split(".")
        parallel.check_divisible(config[section][field], jax.device_count(),
                                 jax.process_count(), key)
    build.model_options(config.model, platform="cpu")  # checks only: touches no device
    try:
        _, directory = build.encoder_config(config.model)
    except hf_checkpoint.CheckpointError as e:
        raise config_lib.ConfigError(f"config.model.encoder: {e}") from None
    if not (directory / "vocab.txt").exists():
        raise config_lib.ConfigError(f"config.model.encoder: {directory} has no vocab.txt")
    for task in tasks_of_config(config):
        if task.source == "tfds":
            continue
        for split in SPLITS:
            if split not in task.split_names:
                raise config_lib.ConfigError(f"task {task.name!r} has no {split} split; it has "
                                             f"{list(task.split_names)}")
            path = cs224n.locate(task, split, config.data.data_dir or None)
            if task.source == "cs224n":
                cs224n.verify(path, name=task.split_source(split))
