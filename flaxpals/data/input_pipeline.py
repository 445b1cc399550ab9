"""Tokenized splits and their batches: load_split, planned_batches, eval_batches.

    split = load_split(get_task("quora"), "train", tokenizer, pair_encoding="bi")
    plan = batching.TrainPlan(split.lengths(), (32, 64, 128), 32, seed=0)
    for batch in planned_batches(split, plan):            # infinite
        batch["input_ids"], batch["input_ids_2"], batch["labels"], ...

load_split parses a split (flaxpals.data.reader: defective rows skipped
and counted, or raised in strict mode) and tokenizes it once; the token ids
are cached under the cache directory (`flaxpals.data.paths.cache_dir`, default
~/.cache/flaxpals/tokens), keyed by the file's SHA256, the task's fields, the
tokenizer's vocabulary and normalisation, max_length and the encoding.

Encodings of a pair task: "bi" tokenizes the two sentences separately
(`[CLS] a [SEP]`, `[CLS] b [SEP]`, each truncated to max_length; a
bi-encoder), "cross" as one sequence `[CLS] a [SEP] b [SEP]` with token
types 0/1, truncated longest-first (a cross-encoder).

Batches (batching.py decides which examples; NumPy gathers and pads them on
a background thread, a few batches ahead) are dicts of NumPy arrays:

  input_ids, attention_mask, token_type_ids   int32 [B, L]; L a bucket length
  input_ids_2, attention_mask_2, token_type_ids_2
                                              int32 [B, L] (pair, "bi" only); the
                                              second sentence, padded to the same L
                                              (the bucket of the longer sentence)
  labels      int32 [B] (classes) or float32 [B] (regression); absent for an
              unlabelled (test) split; 0 on padding rows
  mask        float32 [B]: 1 real example, 0 padding row (eval_batches only pads)
  ids         object [B] of str: example ids; "" on padding rows
  index       int64 [B]: row of the example in the Split; -1 on padding rows

A padding row holds `[CLS] [SEP]` (attention on those two tokens), so a model
computes finite values on it; use `mask` to leave it out.

Packed batches (`Packing`; data.shapes=packed) hold a batch's sentences several to
a row, first-fit decreasing, in `groups` equal blocks of rows (one per device, so
that each example's rows stay on its device), each block holding its share of the
examples in order:

  input_ids, token_type_ids, attention_mask   int32 [groups * rows, length]
  segment_ids  int32: 1, 2, ... per sentence of a row in the order placed; 0 padding
  position_ids int32: 0, 1, ... within each sentence
  example      int32 [groups, examples / groups, 3]: each example's sentence as (row
               within its block, segment, first column); a padding example (0, 0, 0)
  example_2    the same for the second sentence of a bi-encoded pair
  labels, mask, ids, index as above, [examples] Sequences longer
than the largest bucket are truncated to it (keep max(buckets) >= max_length to
avoid that; load_split's max_length already caps the lengths).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np

from flaxpals import config_lib
from flaxpals.data import batching, cs224n, paths, reader
from flaxpals.data.tasks import Task

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when what is cached changes (2: notes count truncation)
DEFAULT_BUCKETS = (32, 64, 128)


@dataclasses.dataclass
class Ragged:
    """Variable-length int32 rows: row i is values[offsets[i]:offsets[i + 1]]."""

    values: np.ndarray  # int32 [total]
    offsets: np.ndarray  # int64 [N + 1]

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[int]]) -> Ragged:
        lengths = np.fromiter(map(len, rows), np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter(itertools.chain.from_iterable(rows), np.int32,
                             count=int(offsets[-1]))
        return cls(values, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def head(self, n: int) -> Ragged:
        """The first n rows."""
        return Ragged(self.values[:self.offsets[n]], self.offsets[:n + 1])

    def select(self, rows: np.ndarray) -> Ragged:
        """The given rows, in the given order."""
        lengths = self.lengths()[rows]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(self.offsets.dtype)
        if not len(rows):
            return Ragged(self.values[:0], offsets)
        values = np.concatenate([self[i] for i in rows])
        return Ragged(values, offsets)


@dataclasses.dataclass
class Split:
    """One tokenized split of a task.

    ids: [N] example ids (object array of str). labels: [N] int32 / float32, or
    None for an unlabelled split. input_ids / token_type_ids: the sentence, or
    the cross-encoded pair; input_ids_2 / token_type_ids_2: the second sentence
    ("bi" pairs only). lines: [N] 1-based source line of each example.
    skip_counts: {reason: rows with that defect}; skipped: [(line, reasons, detail)];
    notes: {note: rows} (kept rows); num_rows: data rows read (kept + skipped).
    stats: parse_s, tokenize_s (0 when cached), load_s, from_cache.
    """

    task: Task
    name: str
    encoding: str  # "single", "bi" or "cross"
    max_length: int
    ids: np.ndarray
    labels: np.ndarray | None
    input_ids: Ragged
    token_type_ids: Ragged
    input_ids_2: Ragged | None
    token_type_ids_2: Ragged | None
    lines: np.ndarray
    num_rows: int
    skip_counts: dict[str, int]
    skipped: list[tuple[int, tuple[str, ...], str]]
    notes: dict[str, int]
    source: str
    sha256: str | None
    pad_id: int
    cls_id: int
    sep_id: int
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def take(self, n: int) -> Split:
        """The first n examples (all when n >= len): data.train_limit / eval_limit."""
        if n >= len(self):
            return self
        return self._rows(slice(0, n), lambda r: r.head(n))

    def sample(self, n: int, seed: int) -> Split:
        """n examples drawn without replacement by `seed`, in file order (all when n >= len).

        The train sample evaluated each epoch: the first n rows would not do, since
        files can be ordered by label (SST's first 1,000 train rows are 80% classes
        3 and 4, against 42% in the whole file).
        """
        if n >= len(self):
            return self
        return self._select(self._draw(n, seed))

    def holdout(self, fraction: float, seed: int) -> tuple[Split, Split]:
        """(the rest, the held-out rows named "val"): data.validation_fraction.

        round(fraction * len) rows, at least one and never all, drawn by `seed` as
        `sample` draws them (the held-out rows are `sample(k, seed)`'s); both parts
        in file order, disjoint, together the whole split.
        """
        if not 0 < fraction < 1:
            raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
        if len(self) < 2:
            raise ValueError(f"{self.task.name} {self.name}: {len(self)} row(s) cannot be split")
        k = min(max(int(fraction * len(self) + 0.5), 1), len(self) - 1)
        held = self._draw(k, seed)
        rest = np.setdiff1d(np.arange(len(self)), held, assume_unique=True)
        return self._select(rest), dataclasses.replace(self._select(held), name="val")

    def _draw(self, n: int, seed: int) -> np.ndarray:
        """n row indices drawn without replacement by `seed`, sorted."""
        return np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))

    def _select(self, rows: np.ndarray) -> Split:
        """The given rows (indices), in the given order."""
        return self._rows(rows, lambda r: r.select(rows))

    def _rows(self, index, ragged) -> Split:
        """A copy with every per-example field cut by `index` (arrays) or `ragged` (Ragged)."""
        cut = lambda r: None if r is None else ragged(r)
        return dataclasses.replace(
            self, ids=self.ids[index],
            labels=None if self.labels is None else self.labels[index],
            input_ids=cut(self.input_ids), token_type_ids=cut(self.token_type_ids),
            input_ids_2=cut(self.input_ids_2), token_type_ids_2=cut(self.token_type_ids_2),
            lines=self.lines[index])

    def lengths(self) -> np.ndarray:
        """[N] token counts used for bucketing: the longer sentence of a "bi" pair."""
        n = self.input_ids.lengths()
        return n if self.input_ids_2 is None else np.maximum(n, self.input_ids_2.lengths())


# ---------------------------------------------------------------- load_split


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the ids: vocabulary and normaliser (not truncation)."""
    fp = getattr(tokenizer, "fingerprint", None)
    if fp is not None:
        return fp() if callable(fp) else str(fp)
    inner = getattr(tokenizer, "_tok", None)
    if inner is None or not hasattr(inner, "to_str"):
        raise TypeError(f"cannot fingerprint a {type(tokenizer).__name__} for the token "
                        "cache: give it a `fingerprint` attribute")
    spec = json.loads(inner.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _task_key(task: Task) -> dict[str, Any]:
    fields = dataclasses.asdict(task)
    fields.pop("description")
    return fields


def _tokenize(tokenizer, parsed: reader.ParsedSplit, encoding: str, max_length: int):
    """(input_ids, token_type_ids, input_ids_2, token_type_ids_2, examples truncated)."""
    if encoding == "cross":
        ids, types, cut = tokenizer.encode(parsed.texts, parsed.text_pairs,
                                           max_length=max_length, count_truncated=True)
        return Ragged.from_lists(ids), Ragged.from_lists(types), None, None, cut
    ids, types, cut = tokenizer.encode(parsed.texts, max_length=max_length,
                                       count_truncated=True)
    out = [Ragged.from_lists(ids), Ragged.from_lists(types), None, None, cut]
    if encoding == "bi":
        ids2, types2, cut2 = tokenizer.encode(parsed.text_pairs, max_length=max_length,
                                              count_truncated=True)
        out[2:] = Ragged.from_lists(ids2), Ragged.from_lists(types2), cut + cut2
    return tuple(out)


_RAGGED = ("input_ids", "token_type_ids", "input_ids_2", "token_type_ids_2")
_META = ("task", "name", "encoding", "max_length", "num_rows", "skip_counts", "skipped",
         "notes", "source", "sha256", "pad_id", "cls_id", "sep_id")


def _save(split: Split, path: Path) -> None:
    arrays = {"ids": np.asarray(split.ids, dtype=str), "lines": split.lines}
    if split.labels is not None:
        arrays["labels"] = split.labels
    for name in _RAGGED:
        r = getattr(split, name)
        if r is not None:
            arrays[f"{name}.values"], arrays[f"{name}.offsets"] = r.values, r.offsets
    meta = {k: getattr(split, k) for k in _META}
    meta["task"] = dataclasses.asdict(split.task)
    arrays["meta"] = np.asarray(json.dumps(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: concurrent processes never read a half-written cache.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path, task: Task) -> Split:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        ragged = {name: Ragged(z[f"{name}.values"], z[f"{name}.offsets"])
                  if f"{name}.values" in z else None for name in _RAGGED}
        labels = z["labels"] if "labels" in z else None
        ids, lines = z["ids"].astype(object), z["lines"]
    meta["task"] = task
    meta["skipped"] = [(line, tuple(reasons), detail)
                       for line, reasons, detail in meta["skipped"]]
    return Split(ids=ids, labels=labels, lines=lines, **ragged, **meta)


def load_split(task: Task, split: str, tokenizer, *, data_dir=None, cache_dir=None,
               strict: bool = False, max_length: int = 128, pair_encoding: str = "bi",
               tfds_data_dir=None, use_cache: bool = True) -> Split:
    """Reads, checks and tokenizes one split ("train", "dev" or "test") of `task`.

    data_dir: the files of "cs224n"/"csv" tasks (see flaxpals.data.paths.data_dir;
    CS224N files are downloaded into the cache when no data directory exists).
    cache_dir: token cache root (flaxpals.data.paths.cache_dir). strict: raise
    reader.DataFormatError (file, line, reason) on the first defective row.
    pair_encoding: "bi" or "cross" (ignored for single-sentence tasks).
    tfds_data_dir: where TFDS tasks are prepared (default <cache>/tfds).
    """
    if pair_encoding not in config_lib.PAIR_ENCODINGS:
        raise ValueError(f"pair_encoding must be one of {config_lib.PAIR_ENCODINGS}, got "
                         f"{pair_encoding!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    task.split_source(split)  # raises for an unknown split
    encoding = pair_encoding if task.is_pair else "single"
    start = time.perf_counter()
    cache = paths.cache_dir(cache_dir)
    if task.source == "tfds":
        path, sha = None, None
        # A versioned name ("glue/qqp:2.0.0") keys the cache to that version.
        source_key = f"tfds:{task.tfds_name}:{task.split_source(split)}"
    else:
        path = cs224n.locate(task, split, data_dir)
        sha = reader.sha256_file(path)
        source_key = sha
    key = hashlib.sha1(json.dumps({
        "version": CACHE_VERSION, "task": _task_key(task), "split": split,
        "source": source_key, "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": max_length, "encoding": encoding}, sort_keys=True).encode()).hexdigest()
    cache_file = cache / "tokens" / f"{task.name}-{split}-{encoding}-{key[:20]}.npz"

    if use_cache and cache_file.exists():
        out = _load(cache_file, task)
        if path is not None:  # the same bytes may have been cached from another place
            out.source = str(path)
        if strict and out.skipped:
            line, reasons, detail = out.skipped[0]
            raise reader.DataFormatError(out.source, line, reasons[0], detail)
        reader.log_summary(out.source, out.num_rows, len(out), out.skip_counts, out.notes,
                           out.skipped)
        out.stats = {"parse_s": 0.0, "tokenize_s": 0.0, "from_cache": True,
                     "load_s": time.perf_counter() - start}
        return out

    t0 = time.perf_counter()
    if task.source == "tfds":
        parsed = reader.read_tfds(task, split, strict=strict,
                                  data_dir=tfds_data_dir or cache / "tfds")
    else:
        if task.source == "cs224n":
            cs224n.verify(path, name=task.split_source(split))
        parsed = reader.read_file(path, task, split, strict=strict)
    t1 = time.perf_counter()
    out = split_from_parsed(task, split, parsed, tokenizer, max_length=max_length,
                            pair_encoding=pair_encoding, sha256=sha)
    t2 = time.perf_counter()
    if use_cache:
        _save(out, cache_file)
    out.stats = {"parse_s": t1 - t0, "tokenize_s": t2 - t1, "from_cache": False,
                 "load_s": time.perf_counter() - start}
    return out


def split_from_parsed(task: Task, split: str, parsed: reader.ParsedSplit, tokenizer, *,
                      max_length: int = 128, pair_encoding: str = "bi",
                      sha256: str | None = None) -> Split:
    """Tokenizes checked examples (`reader.read_file`, `reader.read_records`) into a Split;
    examples longer than max_length are cut to it and counted in notes["truncated"]."""
    if not len(parsed):
        raise reader.DataFormatError(parsed.source, None, "no usable example",
                                     f"every row skipped ({parsed.skip_counts})")
    encoding = pair_encoding if task.is_pair else "single"
    ids, types, ids2, types2, truncated = _tokenize(tokenizer, parsed, encoding, max_length)
    notes = dict(parsed.notes)
    if truncated:
        notes["truncated"] = truncated
        log.info("%s: %d examples longer than %d tokens were truncated", parsed.source,
                 truncated, max_length)
    labels = None
    if parsed.labels is not None:
        labels = np.asarray(parsed.labels, np.float32 if task.is_regression else np.int32)
    return Split(
        task=task, name=split, encoding=encoding, max_length=max_length,
        ids=np.asarray(parsed.ids, dtype=object), labels=labels, input_ids=ids,
        token_type_ids=types, input_ids_2=ids2, token_type_ids_2=types2,
        lines=np.asarray(parsed.lines, np.int32), num_rows=parsed.num_rows,
        skip_counts=parsed.skip_counts, skipped=parsed.skipped, notes=notes,
        source=parsed.source, sha256=sha256, pad_id=tokenizer.pad_id,
        cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id)


# ---------------------------------------------------------------- batches


def _pad(ragged: Ragged, rows: np.ndarray, length: int, pad_id: int):
    """Rows of `ragged` cut or padded to `length`: (values, mask), int32 [len(rows), length]."""
    starts = ragged.offsets[rows]
    n = np.minimum(ragged.offsets[rows + 1] - starts, length)
    mask = np.arange(length) < n[:, None]
    values = np.full(mask.shape, pad_id, np.int32)
    values[mask] = ragged.values[(starts[:, None] + np.arange(length))[mask]]
    return values, mask.astype(np.int32)


def _batch_of(split: Split, index: np.ndarray, length: int, to_device=None,
                packing: Packing | None = None) -> dict[str, Any]:
    """The batch of rows `index`: padded to `length`, or packed; then `to_device(batch)`."""
    batch = padded_batch(split, index, length) if packing is None else packed_batch(
        split, index, packing)
    return batch if to_device is None else to_device(batch)


def padded_batch(split: Split, index: np.ndarray, length: int) -> dict[str, Any]:
    """The batch of rows `index` (-1: a padding row), padded to `length`."""
    padding = index < 0
    rows = np.maximum(index, 0)
    batch = _example_fields(split, index)
    seqs = [("", split.input_ids, split.token_type_ids)]
    if split.input_ids_2 is not None:
        seqs.append(("_2", split.input_ids_2, split.token_type_ids_2))
    for suffix, ids, types in seqs:
        input_ids, attention = _pad(ids, rows, length, split.pad_id)
        token_types, _ = _pad(types, rows, length, 0)
        # A padding row is [CLS] [SEP], attended, so the model stays finite on it.
        input_ids[padding] = split.pad_id
        input_ids[padding, :2] = (split.cls_id, split.sep_id)
        attention[padding] = 0
        attention[padding, :2] = 1
        token_types[padding] = 0
        batch["input_ids" + suffix] = input_ids
        batch["attention_mask" + suffix] = attention
        batch["token_type_ids" + suffix] = token_types
    return batch


def _example_fields(split: Split, index: np.ndarray) -> dict[str, np.ndarray]:
    """What a batch says of its examples `index` (-1: padding) besides their tokens:
    index, mask, labels (0 for padding; none for an unlabelled split), ids ("")."""
    padding = index < 0
    rows = np.maximum(index, 0)
    out = {"index": index, "mask": (~padding).astype(np.float32)}
    if split.labels is not None:
        out["labels"] = split.labels[rows]
        out["labels"][padding] = 0
    out["ids"] = split.ids[rows]
    out["ids"][padding] = ""
    return out


@dataclasses.dataclass(frozen=True)
class Packing:
    """How a packed batch is laid out: `groups` blocks of `rows` rows of `length` tokens."""

    length: int
    rows: int
    groups: int = 1


def sentence_lengths(split: Split, length: int) -> list[np.ndarray]:
    """[N] token counts of each sentence column (one, or two for a bi-encoded pair), cut
    to `length`."""
    columns = [split.input_ids] + ([split.input_ids_2] if split.input_ids_2 is not None
                                   else [])
    return [np.minimum(c.lengths(), length) for c in columns]


def packed_rows(split: Split, plan: batching.TrainPlan, epochs: int, length: int,
                groups: int) -> int:
    """The rows per group that every batch of the plan's first `epochs` epochs packs into
    (first-fit decreasing, `batching.pack`), over every process's groups: the same on
    every process. groups: per process (its devices); they split its rows equally."""
    if plan.batch_size % groups:
        raise ValueError(f"a batch of {plan.batch_size} rows per process does not split "
                         f"over {groups} devices")
    per_group = plan.batch_size // groups
    columns = sentence_lengths(split, length)
    worst = 1
    for e in range(epochs):
        for group in plan.global_epoch(e).reshape(-1, per_group):
            lengths = np.concatenate([c[group] for c in columns])
            worst = max(worst, batching.pack(lengths, length)[2])
    return worst


def packed_batch(split: Split, index: np.ndarray, packing: Packing) -> dict[str, Any]:
    """The examples `index` (-1: a padding example) packed as `Packing` says."""
    padding = index < 0
    rows = np.maximum(index, 0)
    g, r, n = packing.groups, packing.rows, packing.length
    per_group = len(index) // g
    shape = (g * r, n)
    ids = np.full(shape, split.pad_id, np.int32)
    types, segments, positions = (np.zeros(shape, np.int32) for _ in range(3))
    columns = [(split.input_ids, split.token_type_ids)]
    if split.input_ids_2 is not None:
        columns.append((split.input_ids_2, split.token_type_ids_2))
    where = np.zeros((len(columns), g, per_group, 3), np.int32)
    for k in range(g):
        members = [i for i in range(k * per_group, (k + 1) * per_group) if not padding[i]]
        sentences = [(c, i) for c in range(len(columns)) for i in members]
        lengths = np.asarray([min(len(columns[c][0][rows[i]]), n) for c, i in sentences])
        row, start, used = batching.pack(lengths, n)
        if used > r:
            raise ValueError(f"{split.task.name}: a batch needs {used} rows per group, "
                             f"more than the {r} planned")
        placed = np.zeros(r, np.int32)  # sentences so far in each row: the next segment
        for (c, i), rw, st, m in zip(sentences, row, start, lengths, strict=True):
            placed[rw] += 1
            at = k * r + rw
            tokens, token_types = columns[c]
            ids[at, st:st + m] = tokens[rows[i]][:m]
            types[at, st:st + m] = token_types[rows[i]][:m]
            segments[at, st:st + m] = placed[rw]
            positions[at, st:st + m] = np.arange(m)
            where[c, k, i - k * per_group] = (rw, placed[rw], st)
    batch = {"input_ids": ids, "token_type_ids": types,
             "attention_mask": (segments > 0).astype(np.int32), "segment_ids": segments,
             "position_ids": positions, "example": where[0], **_example_fields(split, index)}
    if len(columns) == 2:
        batch["example_2"] = where[1]
    return batch


def _batches(split: Split, plan: Iterator[tuple[np.ndarray, int]],
             prefetch: int, to_device=None,
             packing: Packing | None = None) -> Iterator[dict[str, Any]]:
    """Gathers the plan's batches on one background thread, `prefetch` ahead, in order;
    `to_device`, if given, is applied to each there too (the trainer's: onto the mesh), so
    the batches wait on the devices, not on the host; with `packing`, packed batches.

    Closing the iterator (or dropping it) cancels the batches not started; the
    thread finishes the one in hand (milliseconds) and exits, so an abandoned
    iterator never holds up the interpreter's exit.
    """
    pool = futures.ThreadPoolExecutor(1, thread_name_prefix="flaxpals-batches")
    pending: collections.deque[futures.Future] = collections.deque()
    try:
        for index, length in plan:
            # A copy: the plan's index rows are views of its cached epoch.
            pending.append(pool.submit(_batch_of, split, np.array(index, np.int64),
                                       int(length), to_device, packing))
            if len(pending) > prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def planned_batches(split: Split, plan: batching.TrainPlan, *, start_batch: int = 0,
                    num_epochs: int | None = None, prefetch: int = 2,
                    to_device=None, packing: Packing | None = None
                    ) -> Iterator[dict[str, Any]]:
    """Shuffled, length-bucketed, full batches of `plan` (batching.TrainPlan: this process's
    rows of each global batch), from batch `start_batch` on.

    Infinite unless num_epochs is given. Batch k depends only on the split and the plan
    (batch_size, seed, buckets, process), and start_batch=k starts there at the cost of
    one epoch's plan, so a resumed run sees what an uninterrupted one would have.
    `to_device`, `packing`: as `_batches`."""
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    stop = None if num_epochs is None else num_epochs * plan.batches_per_epoch

    def indices():
        k = start_batch
        while stop is None or k < stop:
            yield plan.batch(k)
            k += 1

    return _batches(split, indices(), prefetch, to_device, packing)


def eval_batches(split: Split, batch_size: int, *, buckets: Sequence[int] = DEFAULT_BUCKETS,
                 process_index: int = 0, process_count: int = 1,
                 prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """One pass over this process's part of the split, every example exactly once.

    Order: bucket by bucket, file order within a bucket (`batching.eval_plan`; a
    bucket's leftover may ride in a longer bucket's batches). The last batch of each
    length is padded to batch_size with rows whose `mask` is 0; every process
    yields the same number of batches.
    """
    # Planned now (cheap): bad arguments raise here, not at the first batch.
    plan = list(batching.eval_plan(split.lengths(), buckets, batch_size,
                                   process_index=process_index, process_count=process_count))
    return _batches(split, iter(plan), prefetch)


def batches_per_epoch(split: Split, batch_size: int, *, process_count: int = 1) -> int:
    """Train batches per epoch (every process the same): len(split) // (batch_size x
    process_count), batch_size being the per-process batch."""
    return len(split) // (batch_size * process_count)
