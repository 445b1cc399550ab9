"""The flaxpals command line.

    python -m flaxpals.main --config=configs/pal.py --workdir=DIR
    python -m flaxpals.main --config=configs/pal.py:method=pcgrad --workdir=DIR \
        --config.train.num_epochs=5
    python -m flaxpals.main --workdir=DIR --mode=eval         # best checkpoint, saved config
    python -m flaxpals.main --workdir=DIR --mode=eval --eval_file=my.csv --task=sst \
        --columns=text=review,label=stars                     # other labelled data
    python -m flaxpals.main --workdir=DIR --mode=predict      # CS224N prediction files
    python -m flaxpals.main --mode=eval --ensemble=RUN1,RUN2,RUN3 --workdir=OUT
                          # averaged runs (flaxpals/serve/ensemble.py): OUT/eval-ensemble.json;
                          # --mode=predict: their CS224N files in OUT/predictions
    python -m flaxpals.main --config=configs/pal.py --workdir=gs://B/run --distributed=yes  # pod

Eval and predict build the model from the workdir's config.json; a `--config`
given there may change data and evaluation fields only (flaxpals/workdir_format.py). Without
`--config`, `--config.<key>=value` overrides apply to the workdir's own config, e.g.

    python -m flaxpals.main --workdir=DIR --mode=eval --config.data.data_dir=/data/other

Every device is used (a ('data',) mesh); see launch/ for TPU pods and GPU hosts.
"""

import ast
import sys

from absl import app, flags
from ml_collections import config_flags

from flaxpals import cli, config_lib
from flaxpals.data.reader import parse_columns
from flaxpals.serve import eval_files
from flaxpals.train import loop, parallel
from flaxpals.train.preemption import Stopped

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and predictions.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict"],
                  "train (resumes from the workdir), eval or predict (restore a checkpoint).")
flags.DEFINE_integer("step", None, "eval/predict: this step of the latest checkpoints "
                     "instead of the best checkpoint.")
flags.DEFINE_string("eval_file", None, "eval: a labelled CSV/TSV file to score as --task's "
                    "dev split (the model is unchanged; only the data's source).")
flags.DEFINE_string("task", None, "eval: the trained task that --eval_file is for.")
flags.DEFINE_string("columns", None, "eval: the file's column names, e.g. "
                    "text=review,label=stars (keys id, text, text_pair, label; default: "
                    "the task's own).")
flags.DEFINE_string("name", None, "eval: names the output eval-<step>-<name>.json "
                    "(default: the file's or data directory's name).")
flags.DEFINE_list("ensemble", None, "eval/predict: several training runs' workdirs, "
                  "comma-separated; their averaged outputs are scored or written to --workdir. "
                  "eval also takes a run's best-outputs.npz in place of its workdir.")
flags.DEFINE_enum("distributed", "auto", list(parallel.DISTRIBUTED_MODES),
                  "Join a multi-process JAX job (jax.distributed.initialize): auto (when "
                  "the environment says so, see flaxpals/train/parallel.py), yes or no.")
config_flags.DEFINE_config_file("config", None, "A config file, e.g. configs/pal.py:method=sqrt "
                                "(train; optional for eval and predict).", lock_config=True)
flags.mark_flags_as_required(["workdir"])


def check_overrides(argv: list[str]) -> None:
    """Names an unknown --config.<key> in one line, before ml_collections sees it."""
    for arg in argv:
        if arg.startswith(("--config.", "-config.", "--noconfig.")):
            name = arg.split("=", 1)[0].split(".", 1)[1]
            config_lib.check_key(name)


# --config.<key>=value overrides given without --config: (key, text), applied to the
# workdir's own config (absl knows such flags only once a config file defines them).
WORKDIR_OVERRIDES: list[tuple[str, str]] = []


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(argv without its --config.<key> overrides, the overrides) when no --config is
    given; (argv, []) otherwise, where ml_collections applies them to the file's config."""
    if any(a in ("--config", "-config") or a.startswith(("--config=", "-config="))
           for a in argv):
        return argv, []
    kept, overrides = [], []
    for arg in argv:
        if arg.startswith(("--config.", "-config.")):
            name, sep, value = arg.lstrip("-").partition("=")
            overrides.append((name.split(".", 1)[1], value if sep else "true"))
        elif arg.startswith(("--noconfig.", "-noconfig.")):
            overrides.append((arg.lstrip("-").split(".", 1)[1], "false"))
        else:
            kept.append(arg)
    return kept, overrides


def _parse_value(current, text: str, key: str):
    """`text` as a value of the field's type (as --config.<key>=text would set it)."""
    try:
        if isinstance(current, bool):
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError("not true or false")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, tuple | list):
            value = ast.literal_eval(text)
            return tuple(value) if isinstance(value, tuple | list) else (value,)
        if isinstance(current, str) or current is None:
            return text
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise config_lib.ConfigError(f"--config.{key}={text}: not a {type(current).__name__} "
                                     f"({e})") from None


def workdir_config(workdir: str, overrides: list[tuple[str, str]]):
    """The workdir's config.json with `overrides` applied (checked later, as a given
    config is, by workdir_format.config_for_restore: a model field stops there)."""
    from flaxpals import workdir_format

    config = workdir_format.read_config(workdir)
    for key, text in overrides:
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            if part not in node:
                raise config_lib.ConfigError(f"--config.{key}: the workdir's config has no "
                                             f"{part!r} there")
            node = node[part]
        if leaf not in node:
            raise config_lib.ConfigError(f"--config.{key}: the workdir's config has no "
                                         f"{leaf!r} there")
        try:
            node[leaf] = _parse_value(node[leaf], text, key)
        except TypeError as e:  # ml_collections' type check
            raise config_lib.ConfigError(f"--config.{key}={text}: {e}") from None
    config_lib.validate(config)
    return config


def check_mode_flags(mode: str) -> None:
    """A flag the mode would ignore stops the run (a silently ignored --eval_file would
    score the wrong data under the right name)."""
    if FLAGS.eval_file and not FLAGS.task:
        raise app.UsageError("--eval_file needs --task (the trained task it is for)")
    file_flags = [f"--{n}" for n in ("eval_file", "task", "columns", "name")
                  if getattr(FLAGS, n)]
    if file_flags and mode != "eval" and not FLAGS.ensemble:
        raise app.UsageError(f"{', '.join(file_flags)}: --mode=eval only (here --mode={mode}; "
                             "flaxpals.predict predicts your own file)")
    if file_flags and not FLAGS.eval_file and not FLAGS.ensemble:
        raise app.UsageError(f"{', '.join(file_flags)}: only with --eval_file")
    if FLAGS.step is not None and mode == "train":
        raise app.UsageError("--step: --mode=eval or predict only (training resumes from "
                             "the latest checkpoint)")


def run(mode: str, workdir: str, config, step: int | None = None,
        columns: dict[str, str] | None = None) -> None:
    if FLAGS.ensemble:
        from flaxpals.serve import ensemble

        if mode == "train" or config is not None or any(
                (FLAGS.eval_file, FLAGS.task, FLAGS.columns, FLAGS.name)):
            raise app.UsageError("--ensemble goes with --mode=eval or --mode=predict alone "
                                 "(no --config, --eval_file, --task, --columns or --name): "
                                 "each member uses its own config.json")
        if mode == "eval":
            ensemble.evaluate_ensemble(FLAGS.ensemble, workdir, step)
        else:
            ensemble.write_ensemble_predictions(FLAGS.ensemble, workdir, step)
    elif mode == "train":
        if config is None:
            raise config_lib.ConfigError(
                "--config is required to train, e.g. --config=configs/pal.py (to resume, the "
                "same --config as the run was started with" + (
                    "; --config.<key> overrides need it too)" if WORKDIR_OVERRIDES else ")"))
        loop.train_and_evaluate(config, workdir)
    elif mode == "eval":
        eval_files.evaluate_checkpoint(
            workdir, config, step, eval_file=FLAGS.eval_file, task=FLAGS.task,
            columns=columns, name=FLAGS.name)
    else:
        eval_files.write_predictions(workdir, config, step)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    check_mode_flags(FLAGS.mode)
    try:
        columns = parse_columns(FLAGS.columns)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    parallel.initialize(FLAGS.distributed)  # before any JAX computation
    config = FLAGS.config
    if config is None and WORKDIR_OVERRIDES and FLAGS.mode != "train":
        if FLAGS.ensemble:
            raise app.UsageError("--config.<key> overrides: not with --ensemble (each member "
                                 "uses its own config.json)")
        config = workdir_config(FLAGS.workdir, WORKDIR_OVERRIDES)
    try:
        run(FLAGS.mode, FLAGS.workdir, config, FLAGS.step, columns)
    except Stopped as e:  # a signal or the time budget, with a checkpoint
        print(e, file=sys.stderr, flush=True)
        code = e.exit_code
    else:
        return
    # Outside the except block, so the traceback and the stopped loop's frame are freed
    # first: its batch iterators then close before the interpreter shuts down.
    sys.exit(code)


if __name__ == "__main__":
    try:
        check_overrides(sys.argv[1:])
    except config_lib.ConfigError as e:
        sys.exit(f"error: {e}")
    sys.argv, WORKDIR_OVERRIDES[:] = split_overrides(sys.argv)
    cli.run(main)
