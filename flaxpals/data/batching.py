"""Which examples go in which batch: length-bucketed batch plans, in NumPy.

The plans are pure functions of (example lengths, buckets, batch size, seed,
epoch, process), so batch k of a run can be computed without producing
batches 0..k-1: resuming at batch 10,000 costs one epoch's plan (a
permutation, milliseconds), not 10,000 batches. `input_pipeline` turns a plan
into padded NumPy arrays.

Buckets: an example of length n (tokens, specials included) goes to the
smallest bucket length >= n; one longer than the largest bucket goes to the
largest and is truncated there.

Training plan, epoch e (0-based), process p of P: every process plans the same
global batches of G = P x batch_size examples, and takes rows p*batch_size to
(p+1)*batch_size of each. So all processes agree on every step's length (their
rows meet in one global array and one all-reduce), and P processes train on the
batches one process with the same global batch size would.
- shuffle: a permutation of the split from PCG64 seeded with (seed, 0, e), so
  every epoch has a new order, deterministic given the seed;
- bucket: in permuted order, each bucket's examples are cut into full global
  batches; the leftover (< G) of a bucket joins the next larger bucket (it
  fits, padded longer), and only the leftover of the largest bucket (fewer
  than G examples) sits the epoch out. So an epoch has exactly N // G batches
  and each example appears at most once in it;
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
        self.global_batch = batch_size * process_count
        if len(lengths) < self.global_batch:
            raise ValueError(f"{len(lengths)} examples do not fill one global batch of "
                             f"{batch_size} x {process_count} process(es)")
        self.batch_size, self.seed = batch_size, int(seed)
        self.process_index = process_index
        self._rows = slice(process_index * batch_size, (process_index + 1) * batch_size)
        self._bucket = bucket_ids(lengths, self.buckets)
        self.batches_per_epoch = len(lengths) // self.global_batch
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(this process's indices [batches_per_epoch, batch_size] into the split,
        lengths [batches], the same on every process)."""
        indices, lengths = self._global(e)
        return indices[:, self._rows], lengths

    def global_epoch(self, e: int) -> np.ndarray:
        """Every process's indices of epoch e: [batches_per_epoch, global batch], process
        p's rows p * batch_size to (p + 1) * batch_size."""
        return self._global(e)[0]

    def _global(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        cached = self._cached  # read once: another thread may replace it
        if cached is not None and cached[0] == e:
            return cached[1], cached[2]
        # Process 0's stream of the per-process plans this replaces: one process plans
        # (and trains on) exactly what it did.
        rng = np.random.Generator(np.random.PCG64([self.seed, 0, e]))
        perm = rng.permutation(len(self._bucket))
        in_bucket = self._bucket[perm]
        chunks, lengths = [], []
        carry = np.zeros(0, np.int64)
        for k, length in enumerate(self.buckets):
            members = np.concatenate([carry, perm[in_bucket == k]])
            n = len(members) // self.global_batch
            if n:
                chunks.append(members[:n * self.global_batch].reshape(n, self.global_batch))
                lengths += [length] * n
            carry = members[n * self.global_batch:]
        order = rng.permutation(self.batches_per_epoch)
        out = (np.concatenate(chunks)[order], np.asarray(lengths, np.int32)[order])
        self._cached = (e, *out)
        return out

    def batch(self, k: int) -> tuple[np.ndarray, int]:
        """Batch k (0-based, counted from the start of training): (indices [B], length)."""
        if k < 0:
            raise ValueError(f"batch number must be >= 0, got {k}")
        e, i = divmod(k, self.batches_per_epoch)
        indices, lengths = self.epoch(e)
        return indices[i], int(lengths[i])


def pack(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """First-fit decreasing: sequences of `lengths` (each <= capacity) into rows of
    `capacity` tokens. Returns (row [n], first column [n], rows used); ties keep their
    order, so the result is a function of the lengths alone."""
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"a sequence of {lengths.max()} tokens does not fit rows of "
                         f"{capacity}")
    row, start = np.zeros(len(lengths), np.int64), np.zeros(len(lengths), np.int64)
    used: list[int] = []
    for i in np.argsort(-lengths, kind="stable"):
        r = next((r for r, u in enumerate(used) if u + lengths[i] <= capacity), len(used))
        if r == len(used):
            used.append(0)
        row[i], start[i] = r, used[r]
        used[r] += int(lengths[i])
    return row, start, len(used)


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
