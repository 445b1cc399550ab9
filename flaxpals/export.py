"""`python -m flaxpals.export`: a trained run as one self-contained model directory
(the Hugging Face encoder, the tasks' adapters and heads, a model card).

    python -m flaxpals.export --workdir=runs/pal --out=exported/pal      # best checkpoint
    python -m flaxpals.export --workdir=runs/pal --out=DIR --step=2500   # a kept latest step

The format and its reader: flaxpals/serve/exporter.py.
"""


from __future__ import annotations

from flaxpals.serve.exporter import export


def main(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    out = export(f.workdir, f.out, f.step, overwrite=f.overwrite)
    print(f"exported {f.workdir} to {out}")


if __name__ == "__main__":
    from absl import flags

    from flaxpals import cli

    flags.DEFINE_string("workdir", None, "A training run's workdir.", required=True)
    flags.DEFINE_string("out", None, "The model directory to write.", required=True)
    flags.DEFINE_integer("step", None, "This step of the latest checkpoints instead of the "
                         "best checkpoint.")
    flags.DEFINE_bool("overwrite", False, "Replace --out if it is a non-empty directory "
                      "(never a training run's workdir).")
    cli.run(main)
