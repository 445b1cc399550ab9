"""`python -m flaxpals.predict`: a trained model on your own text; `Predictor` for
Python (flaxpals/serve/predictor.py).

Command line (input: CSV, TSV or JSONL with named columns, or plain lines from
a `.txt` file or `-` for stdin, pairs tab-separated; output: CSV or JSONL by
--output's extension or --format, keeping any id column). Every input is read
as bytes and checked row by row: a row that is not UTF-8, not JSON (JSONL) or
empty (whitespace or zero-width characters only) is skipped and counted, or with
--strict stops the command naming file and line. Ids only label the output
rows: a repeated id is predicted again (counted as a note), not dropped.

    python -m flaxpals.predict --workdir=runs/pal --task=sst --input=reviews.csv \
        --columns=text=body --output=preds.jsonl
    printf 'a fine film\\nawful\\n' | python -m flaxpals.predict --workdir=runs/pal --task=sst
    python -m flaxpals.predict --ensemble=runs/s0,runs/s1,runs/s2 --task=sst --input=reviews.csv
"""


from __future__ import annotations

import sys

from flaxpals.data import reader
from flaxpals.serve.predictor import Predictor, predict_file

__all__ = ["Predictor", "main"]  # the predictor's API beside its command


def main(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    if sum(bool(x) for x in (f.workdir, f.pretrained, f.ensemble)) != 1:
        raise ValueError("give one of --workdir (a training run), --pretrained (an export) "
                         "or --ensemble (training runs, comma-separated)")
    # Flags that would be ignored stop the run instead.
    if f.step is not None and f.pretrained:
        raise ValueError("--step: with --workdir or --ensemble (an export holds one step)")
    if f.columns and (f.input == "-" or f.input.endswith(".txt")):
        raise ValueError("--columns: for a file with columns (CSV, TSV or JSONL; stdin and "
                         ".txt files are plain lines, pairs tab-separated)")
    if f.ensemble:
        from flaxpals.serve.ensemble import Ensemble

        predictor = Ensemble.from_workdirs(f.ensemble, f.step)
    elif f.workdir:
        predictor = Predictor.from_workdir(f.workdir, f.step)
    else:
        predictor = Predictor.from_pretrained(f.pretrained)
    summary = predict_file(predictor, f.task, f.input, f.output,
                           reader.parse_columns(f.columns),
                           f.format, f.strict)
    print(f"{f.task}: {summary['kept']} of {summary['rows']} rows predicted"
          + (f"; skipped {summary['skipped']}" if summary["skipped"] else "")
          + (f"; {summary['notes']['duplicate_id']} repeated id(s) predicted again"
             if summary["notes"].get("duplicate_id") else "")
          + (f"; {summary['truncated']} truncated to {predictor.config.data.max_length} tokens"
             if summary["truncated"] else "")
          + (f"; wrote {f.output}" if f.output else ""), file=sys.stderr)


def _define_flags():
    from absl import flags

    flags.DEFINE_string("workdir", None, "A training run's workdir (best checkpoint).")
    flags.DEFINE_string("pretrained", None, "Or a directory written by flaxpals.export.")
    flags.DEFINE_list("ensemble", None, "Or several training runs' workdirs, comma-separated: "
                      "their averaged predictions (flaxpals.serve.ensemble).")
    flags.DEFINE_integer("step", None, "With --workdir or --ensemble: this step of the latest "
                         "checkpoints.")
    flags.DEFINE_string("task", None, "The task to predict.", required=True)
    flags.DEFINE_string("input", "-", "CSV, TSV or JSONL file; a .txt file or - (stdin) "
                        "for plain lines.")
    flags.DEFINE_string("columns", None, "Column names, e.g. text=body,id=review_id.")
    flags.DEFINE_string("output", None, "Output file (.csv or .jsonl); default stdout.")
    flags.DEFINE_enum("format", None, ["csv", "jsonl"], "Output format (default: by "
                      "--output's extension, else csv).")
    flags.DEFINE_bool("strict", False, "Stop at the first bad row instead of skipping it.")


if __name__ == "__main__":
    from flaxpals import cli

    _define_flags()
    cli.run(main, extra=(ValueError,))  # ValueError: a bad --task, --columns or input
