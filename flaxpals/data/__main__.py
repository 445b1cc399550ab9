"""Prepares the CS224N TFDS datasets under the cache directory.

    python -m flaxpals.data                 # sst, quora, sts, cfimdb
    python -m flaxpals.data sst --data_dir=/path/to/cs224n --tfds_dir=/tmp/tfds
"""

from absl import app, flags

from flaxpals.data import cs224n, tasks

flags.DEFINE_string("data_dir", None, "The CS224N files (default: flaxpals.data.paths.data_dir; "
                    "downloaded when none is found).")
flags.DEFINE_string("tfds_dir", None, "Where TFDS writes (default: <cache>/tfds).")
FLAGS = flags.FLAGS


def main(argv):
    for name in argv[1:] or list(tasks.BUILTIN):
        builder = cs224n.prepare(name, data_dir=FLAGS.data_dir, tfds_dir=FLAGS.tfds_dir)
        counts = {s: builder.info.splits[s].num_examples for s in builder.info.splits}
        print(f"cs224n/{name}: {counts} in {builder.data_dir}")


if __name__ == "__main__":
    app.run(main)
