"""Input-pipeline figures: tokenization time per split, batches per second per task.

    python -m benchmarks.bench_input                       # all four tasks, both pair encodings
    python -m benchmarks.bench_input --tasks=sst,quora --batches=500

Tokenization is timed into a fresh temporary cache (parse + tokenize, nothing
cached), then the cached load is timed. Pipeline throughput is measured on
the trainer's batches (a TrainPlan read by planned_batches) after a warm-up batch, and on one
eval_batches pass; padding efficiency is real tokens / padded tokens.
"""

from __future__ import annotations

import collections
import logging
import tempfile
import time

from absl import app, flags

from flaxpals.data import batching, tasks
from flaxpals.data import input_pipeline as ip
from flaxpals.model import hf_checkpoint
from flaxpals.model.tokenizer import Tokenizer

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", "minilm", "Checkpoint whose vocab.txt tokenizes.")
flags.DEFINE_string("tasks", "sst,quora,sts,cfimdb", "Comma-separated builtin task names.")
flags.DEFINE_string("data_dir", None, "Data directory (default: see flaxpals.data.paths).")
flags.DEFINE_integer("batch_size", 32, "Per-process batch size.")
flags.DEFINE_integer("batches", 300, "Train batches timed per task and encoding.")
flags.DEFINE_integer("max_length", 128, "Truncation length.")
flags.DEFINE_list("buckets", ["32", "64", "128"], "Bucket lengths.")


def _tokenization(task, tok, cache):
    rows = []
    encodings = ("bi", "cross") if task.is_pair else ("bi",)
    for split in task.split_names:
        for enc in encodings:
            try:
                s = ip.load_split(task, split, tok, data_dir=FLAGS.data_dir, cache_dir=cache,
                                  max_length=FLAGS.max_length, pair_encoding=enc)
            except FileNotFoundError as e:
                print(f"  {task.name}/{split}: skipped ({e})")
                break
            again = ip.load_split(task, split, tok, data_dir=FLAGS.data_dir, cache_dir=cache,
                                  max_length=FLAGS.max_length, pair_encoding=enc)
            rows.append((task.name, split, s.encoding, s.num_rows, len(s), s.num_skipped,
                         s.stats["parse_s"], s.stats["tokenize_s"], again.stats["load_s"]))
    return rows


def train_throughput(split, batch_size: int, num_batches: int, buckets) -> dict:
    """Examples/s of the trainer's batches (`planned_batches`) over `num_batches` batches
    after a warm-up batch.

    Returns {"first_batch_s", "examples_per_s", "real_over_padded", "lengths"
    (batches per bucket length)}; a pair counts as one example.
    """
    it = ip.planned_batches(split, batching.TrainPlan(split.lengths(), buckets, batch_size,
                                                      seed=0))
    start = time.perf_counter()
    next(it)
    first = time.perf_counter() - start
    shapes = collections.Counter()
    real = padded = 0
    start = time.perf_counter()
    for _ in range(num_batches):
        b = next(it)
        shapes[b["input_ids"].shape[1]] += 1
        for key in ("attention_mask", "attention_mask_2"):  # both sentences of a "bi" pair
            if key in b:
                real += int(b[key].sum())
                padded += b[key].size
    rate = num_batches * batch_size / (time.perf_counter() - start)
    return {"first_batch_s": first, "examples_per_s": rate, "real_over_padded": real / padded,
            "lengths": dict(sorted(shapes.items()))}


def _throughput(split, buckets):
    t = train_throughput(split, FLAGS.batch_size, FLAGS.batches, buckets)
    start = time.perf_counter()
    n = sum(int(b["mask"].sum()) for b in ip.eval_batches(split, FLAGS.batch_size,
                                                          buckets=buckets))
    evals = n / (time.perf_counter() - start)
    return (t["first_batch_s"], t["examples_per_s"], evals, t["real_over_padded"],
            t["lengths"])


def main(argv):
    del argv
    logging.getLogger("flaxpals.data.reader").setLevel(logging.WARNING)  # one line a load
    _, _, directory = hf_checkpoint.load_pretrained(FLAGS.checkpoint)
    tok = Tokenizer.from_checkpoint(directory, max_length=FLAGS.max_length)
    buckets = tuple(int(b) for b in FLAGS.buckets)
    chosen = [tasks.get_task(name.strip()) for name in FLAGS.tasks.split(",")]
    with tempfile.TemporaryDirectory() as cache:
        print("Tokenization (parse + tokenize into an empty cache; then a cached load)")
        print(f"{'task':8} {'split':5} {'enc':6} {'rows':>6} {'kept':>6} {'skip':>4} "
              f"{'parse s':>8} {'tokenize s':>10} {'ex/s':>9} {'cached s':>8}")
        total = collections.defaultdict(float)
        for task in chosen:
            for name, split, enc, n, kept, skip, parse, tokenize, cached in _tokenization(
                    task, tok, cache):
                print(f"{name:8} {split:5} {enc:6} {n:6d} {kept:6d} {skip:4d} {parse:8.3f} "
                      f"{tokenize:10.3f} {kept / tokenize:9.0f} {cached:8.3f}")
                if split == "train" and enc in ("bi", "single"):
                    total["train"] += parse + tokenize
        print(f"parse + tokenize, all train splits (bi): {total['train']:.2f} s")

        print(f"\nPipeline, batch {FLAGS.batch_size}, buckets {buckets}, train split "
              f"({FLAGS.batches} batches timed after the first)")
        print(f"{'task':8} {'enc':6} {'first batch s':>13} {'train ex/s':>10} "
              f"{'eval ex/s':>9} {'real/padded':>11}  batches per bucket length")
        for task in chosen:
            for enc in ("bi", "cross") if task.is_pair else ("bi",):
                split = ip.load_split(task, "train", tok, data_dir=FLAGS.data_dir,
                                      cache_dir=cache, max_length=FLAGS.max_length,
                                      pair_encoding=enc)
                first, train, evals, eff, shapes = _throughput(split, buckets)
                print(f"{task.name:8} {split.encoding:6} {first:13.3f} {train:10.0f} "
                      f"{evals:9.0f} {eff:11.2f}  {dict(sorted(shapes.items()))}")


if __name__ == "__main__":
    app.run(main)
