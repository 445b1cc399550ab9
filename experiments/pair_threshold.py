"""Is a sweep row's paraphrase accuracy lost to the logit's threshold? Its raw logits tell.

    python -m experiments.pair_threshold --row=pal-annealed            # results/pal-annealed
    python -m experiments.pair_threshold --row=bert-sequential --results=results --train-pairs=8000

The seed's bi-encoded paraphrase head scores a pair by the dot product of the two
sentences' projected embeddings and predicts "duplicate" when it is above 0. That
logit has no bias: two questions on one topic have similar embeddings, so their
dot product is positive whether or not they are duplicates, and nothing in the
head can move the threshold. This script restores a row's best checkpoint (as
`--mode=eval` does), computes its raw Quora logits, and prints the dev accuracy
at the head's threshold 0 against the accuracy at a threshold fitted on a sample
of train pairs (so dev stays held out). A large gap means the embeddings rank
the pairs well and the fixed threshold throws that away.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from experiments import sweep_common
from flaxpals.model import build
from flaxpals.serve import restore
from flaxpals.train import evaluate


def raw_outputs(restored, eval_sets, task: str, split: str, limit: int):
    """(logits [n], labels [n]) of a split's `limit` rows (-1: all; train: the seeded
    sample)."""
    s, rows, out = evaluate.outputs(restored.predict, restored.params, eval_sets, task,
                                      split, limit)
    return out[:, 0], np.asarray(s.labels)[rows].astype(int)  # the pair logit


def best_threshold(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy of `logits > threshold`: -inf (all
    positive) or one of 401 quantiles of the logits."""
    candidates = np.concatenate([[-np.inf],
                                 np.unique(np.quantile(logits, np.linspace(0.0, 1.0, 401)))])
    accuracy = np.array([((logits > c) == labels).mean() for c in candidates])
    i = int(np.argmax(accuracy))
    return float(candidates[i]), float(accuracy[i])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--row", required=True, help="a sweep row slug, e.g. pal-annealed")
    ap.add_argument("--results", default="results", help="the sweep's results folder")
    ap.add_argument("--task", default="quora")
    ap.add_argument("--train-pairs", type=int, default=4000,
                    help="train pairs the threshold is fitted on")
    args = ap.parse_args(argv)
    rows = {r.slug: r for r in sweep_common.ROWS}
    if args.row not in rows:
        ap.error(f"--row={args.row!r}: not a sweep row; rows: {', '.join(rows)}")
    workdir = Path(args.results) / args.row
    if not (workdir / "best").is_dir():
        ap.error(f"{workdir}: no best checkpoint (has the row run?)")
    r = restore.restore(workdir.absolute())  # the row's own config.json
    task = [t for t in r.tasks if t.name == args.task]
    if not task or task[0].kind != "pair_classification":
        ap.error(f"--task={args.task!r}: not a paraphrase task of row {args.row}")
    data = build.load_data(r.config, task, r.tokenizer, splits=("train", "dev"), limits=False)
    eval_sets = evaluate.EvalSets(data, r.config, r.mesh)
    train_x, train_y = raw_outputs(r, eval_sets, args.task, "train", args.train_pairs)
    dev_x, dev_y = raw_outputs(r, eval_sets, args.task, "dev", -1)
    threshold, train_acc = best_threshold(train_x, train_y)
    print(f"{args.row}, best checkpoint (step {r.step}), {args.task} dev: {len(dev_y)} pairs, "
          f"{dev_y.mean():.3f} positive")
    print(f"dev logits: min {dev_x.min():.2f}, median {np.median(dev_x):.2f}, "
          f"max {dev_x.max():.2f}; above 0: {(dev_x > 0).mean():.3f}")
    print(f"dev accuracy at the head's threshold 0: {((dev_x > 0) == dev_y).mean():.3f}")
    print(f"threshold fitted on {len(train_y)} train pairs: {threshold:.2f} "
          f"(train accuracy {train_acc:.3f}); dev accuracy with it: "
          f"{((dev_x > threshold) == dev_y).mean():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
