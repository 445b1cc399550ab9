"""Which examples go in which batch: length-bucketed batch plans, in NumPy.

The plans are pure functions of (example lengths, buckets, batch size, seed,
epoch, process), so batch k of a run can be computed without producing
batches 0..k-1: resuming at batch 10,000 costs one epoch's plan (a
permutation, milliseconds), not 10,000 batches. `input_pipeline` turns a plan
into padded NumPy arrays.

Buckets: an example of length n (tokens, specials included) goes to the
smallest bucket length >= n; one longer than the largest bucket goes to the
largest and is truncated there.

Training plan, epoch e (0-based), process p of P:
- shard: the process keeps examples p, p+P, p+2P, ... of the split (file
  order), cut to N // P so that every process has as many batches;
- shuffle: a permutation of the shard from PCG64 seeded with (seed, p, e), so
  every epoch has a new order, deterministic given the seed;
- bucket: in permuted order, each bucket's examples are cut into full batches;
  the leftover (< batch size) of a bucket joins the next larger bucket (it
  fits, padded longer), and only the leftover of the largest bucket (fewer
  than batch_size examples) sits the epoch out. So an epoch has exactly
  (N // P) // batch_size batches and each example appears at most once in it;
- batch order: shuffled with the same generator, so buckets interleave.

Evaluation plan: every example exactly once, bucket by bucket, file order
within a bucket. Batches have a fixed number of rows (one compiled program per
length), so a bucket's leftover would fill a last batch mostly with padding
rows: instead it may ride in the next larger bucket, padded longer, and does
so where that costs fewer padded tokens over the whole pass (the choice is
made for all buckets at once, `_eval_carries`). Each batch length's examples
(those carried in first) are split into P contiguous parts; the last batch of
a part is padded with index -1; processes with fewer batches at a length get
all-padding batches, so all processes run the same steps.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np


def _check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    buckets = tuple(int(b) for b in buckets)
    if not buckets or any(b <= 0 for b in buckets) or list(buckets) != sorted(set(buckets)):
        raise ValueError(f"buckets must be increasing positive lengths, got {buckets}")
    return buckets


def _check_process(process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in 0..{process_count - 1}")


def bucket_ids(lengths: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
    """[N] lengths -> [N] index of the smallest bucket >= length (last if longer)."""
    buckets = _check_buckets(buckets)
    ids = np.searchsorted(np.asarray(buckets), np.asarray(lengths), side="left")
    return np.minimum(ids, len(buckets) - 1)


class TrainPlan:
    """The infinite, seeded, bucketed batch sequence of one process (module docstring)."""

    def __init__(self, lengths: np.ndarray, buckets: Sequence[int], batch_size: int, *,
                 seed: int, process_index: int = 0, process_count: int = 1):
        self.buckets = _check_buckets(buckets)
        _check_process(process_index, process_count)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        lengths = np.asarray(lengths)
        per_process = len(lengths) // process_count
        if per_process < batch_size:
            raise ValueError(f"{len(lengths)} examples over {process_count} process(es) do "
                             f"not fill one batch of {batch_size}")
        self.batch_size, self.seed = batch_size, int(seed)
        self.process_index = process_index
        self.shard = np.arange(process_index, len(lengths), process_count)[:per_process]
        self._bucket = bucket_ids(lengths[self.shard], self.buckets)
        self.batches_per_epoch = per_process // batch_size
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices [batches_per_epoch, batch_size] into the split, lengths [batches])."""
        cached = self._cached  # read once: another thread may replace it
        if cached is not None and cached[0] == e:
            return cached[1], cached[2]
        rng = np.random.Generator(np.random.PCG64([self.seed, self.process_index, e]))
        perm = rng.permutation(len(self.shard))
        in_bucket = self._bucket[perm]
        chunks, lengths = [], []
        carry = np.zeros(0, np.int64)
        for k, length in enumerate(self.buckets):
            members = np.concatenate([carry, perm[in_bucket == k]])
            n = len(members) // self.batch_size
            if n:
                chunks.append(members[:n * self.batch_size].reshape(n, self.batch_size))
                lengths += [length] * n
            carry = members[n * self.batch_size:]
        order = rng.permutation(self.batches_per_epoch)
        indices = self.shard[np.concatenate(chunks)[order]]
        out = (indices, np.asarray(lengths, np.int32)[order])
        self._cached = (e, *out)
        return out

    def batch(self, k: int) -> tuple[np.ndarray, int]:
        """Batch k (0-based, counted from the start of training): (indices [B], length)."""
        if k < 0:
            raise ValueError(f"batch number must be >= 0, got {k}")
        e, i = divmod(k, self.batches_per_epoch)
        indices, lengths = self.epoch(e)
        return indices[i], int(lengths[i])


def _eval_carries(counts: Sequence[int], buckets: Sequence[int], batch: int) -> tuple[bool, ...]:
    """For each bucket but the last, whether its leftover rides in the next one: the
    choice with the fewest padded tokens (sum of batch lengths), then the fewest batches.

    counts: examples per bucket; batch: rows per global batch. A leftover that rides
    on can push a larger bucket over a multiple of `batch` (one row of 16 tokens joining
    exactly 128 rows of 128 costs a second batch of 128), so each choice is costed as a
    whole; buckets are few (2 ** (K - 1) choices).
    """
    best, best_cost = (), None
    for carries in itertools.product((False, True), repeat=len(buckets) - 1):
        tokens = batches = carry = 0
        for n, length, rides in zip(counts, buckets, (*carries, False), strict=True):
            members = carry + n
            full, carry = divmod(members, batch)
            if not rides and carry:
                full, carry = full + 1, 0
            tokens, batches = tokens + full * length, batches + full
        if best_cost is None or (tokens, batches) < best_cost:
            best, best_cost = carries, (tokens, batches)
    return best


def eval_plan(lengths: np.ndarray, buckets: Sequence[int], batch_size: int, *,
              process_index: int = 0,
              process_count: int = 1) -> Iterator[tuple[np.ndarray, int]]:
    """One pass (module docstring): (indices [batch_size] with -1 for padding, bucket
    length) per batch, lengths in increasing order."""
    buckets = _check_buckets(buckets)
    _check_process(process_index, process_count)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    in_bucket = bucket_ids(lengths, buckets)
    members = [np.flatnonzero(in_bucket == k) for k in range(len(buckets))]
    global_batch = batch_size * process_count
    carries = (*_eval_carries([len(m) for m in members], buckets, global_batch), False)
    carry = np.zeros(0, np.int64)
    for k, length in enumerate(buckets):
        here = np.concatenate([carry, members[k]])
        if carries[k]:
            cut = len(here) // global_batch * global_batch
            here, carry = here[:cut], here[cut:]
        else:
            carry = np.zeros(0, np.int64)
        if not len(here):
            continue
        parts = np.array_split(here, process_count)
        n = max(-(-len(p) // batch_size) for p in parts)
        mine = np.full(n * batch_size, -1, np.int64)
        mine[:len(parts[process_index])] = parts[process_index]
        for row in mine.reshape(n, batch_size):
            yield row, length
