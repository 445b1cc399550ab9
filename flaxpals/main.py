"""The flaxpals command line.

    python -m flaxpals.main --config=configs/pal.py --workdir=DIR
    python -m flaxpals.main --config=configs/pal.py:method=pcgrad --workdir=DIR \
        --config.train.num_epochs=5
    python -m flaxpals.main --config=configs/pal.py --workdir=DIR --mode=eval      # best checkpoint
    python -m flaxpals.main --config=configs/pal.py --workdir=DIR --mode=predict   # CS224N files
    python -m flaxpals.main --config=configs/pal.py --workdir=gs://B/run --distributed=yes  # pod

Every device is used (a ('data',) mesh); see launch/ for TPU pods and GPU hosts.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from flaxpals import parallel, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and predictions.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict"],
                  "train (resumes from the workdir), eval or predict (restore a checkpoint).")
flags.DEFINE_integer("step", None, "eval/predict: this step of the latest checkpoints "
                     "instead of the best checkpoint.")
flags.DEFINE_enum("distributed", "auto", list(parallel.DISTRIBUTED_MODES),
                  "Join a multi-process JAX job (jax.distributed.initialize): auto (when "
                  "the environment says so, see flaxpals/parallel.py), yes or no.")
config_flags.DEFINE_config_file("config", None, "A config file, e.g. configs/pal.py:method=sqrt.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    parallel.initialize(FLAGS.distributed)  # before any JAX computation
    config = FLAGS.config
    if FLAGS.mode == "train":
        train.train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == "eval":
        train.evaluate_checkpoint(config, FLAGS.workdir, FLAGS.step)
    else:
        train.predict(config, FLAGS.workdir, FLAGS.step)


if __name__ == "__main__":
    app.run(main)
