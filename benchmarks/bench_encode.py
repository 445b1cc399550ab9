"""Sentence embeddings for a CS224N file, with timing.

    python -m benchmarks.bench_encode --checkpoint=minilm --file=ids-sst-dev.csv --out=sst-dev.npy

Reads the `sentence` (or `sentence1`) column, tokenizes, runs the encoder in
fixed-length buckets under `jax.jit`, mean-pools over real tokens and writes an
[N, hidden] float32 array. Prints tokenization and encoding throughput.
"""

from __future__ import annotations

import csv
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from flaxpals.data import paths
from flaxpals.model import bert, hf_checkpoint
from flaxpals.model.tokenizer import Tokenizer

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", "minilm", "Checkpoint: a directory, 'minilm' or a hub id.")
flags.DEFINE_string("file", "ids-sst-dev.csv", "A CS224N file in the data directory.")
flags.DEFINE_string("data_dir", None, "Data directory (default: see flaxpals.data.paths).")
flags.DEFINE_string("out", None, "Where to write the [N, hidden] embeddings (.npy).")
flags.DEFINE_integer("batch_size", 64, "Sentences per encoder call.")
flags.DEFINE_integer("max_length", 128, "Truncation length in tokens.")

BUCKETS = (32, 64, 128, 256, 512)


def read_sentences(path) -> list[str]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    column = "sentence" if rows and "sentence" in rows[0] else "sentence1"
    return [(r.get(column) or "").strip() for r in rows]


def mean_pool(seq: jax.Array, mask: jax.Array) -> jax.Array:
    """seq: [batch, length, hidden], mask: [batch, length] -> [batch, hidden]."""
    m = mask[..., None].astype(seq.dtype)
    return (seq * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


def main(argv):
    del argv
    config, params, directory = hf_checkpoint.load_pretrained(FLAGS.checkpoint)
    tok = Tokenizer.from_checkpoint(directory, max_length=FLAGS.max_length)
    path = paths.data_dir(FLAGS.data_dir) / FLAGS.file
    sentences = read_sentences(path)

    start = time.perf_counter()
    ids, types = tok.encode(sentences)
    t_tok = time.perf_counter() - start

    model = bert.BertModel(config)

    @jax.jit
    def embed(params, batch):
        seq, _ = model.apply({"params": params}, **batch)
        return mean_pool(seq, batch["attention_mask"])

    out = np.zeros((len(sentences), config.hidden_size), np.float32)
    order = np.argsort([len(x) for x in ids])  # similar lengths share a bucket
    start = time.perf_counter()
    for lo in tqdm(range(0, len(order), FLAGS.batch_size), desc="encoding", unit="batch"):
        idx = order[lo:lo + FLAGS.batch_size]
        longest = max(len(ids[i]) for i in idx)
        length = next(b for b in BUCKETS if b >= longest)
        batch = tok.pad([ids[i] for i in idx], [types[i] for i in idx], length=length)
        if len(idx) < FLAGS.batch_size:  # pad the batch too: one shape per bucket
            batch = {k: np.pad(v, ((0, FLAGS.batch_size - len(idx)), (0, 0)))
                     for k, v in batch.items()}
        out[idx] = np.asarray(embed(params, batch))[:len(idx)]
    t_enc = time.perf_counter() - start
    logging.info("%s: %d sentences, tokenized in %.3f s, encoded in %.1f s "
                 "(%.0f sentences/s, compilation included) on %s",
                 path.name, len(sentences), t_tok, t_enc, len(sentences) / t_enc,
                 jax.devices()[0].device_kind)
    print(f"{path.name}: {len(sentences)} sentences; tokenize {t_tok:.3f} s; "
          f"encode {t_enc:.1f} s = {len(sentences) / t_enc:.0f} sentences/s "
          f"({jax.devices()[0].platform}, compilation included)")
    if FLAGS.out:
        np.save(FLAGS.out, out)
        print(f"wrote {FLAGS.out}: {out.shape}")


if __name__ == "__main__":
    app.run(main)
