"""load_split, planned_batches, eval_batches on the real files.

References: the raw files through Python's csv module (`read_tsv`) and Hugging
Face's BertTokenizerFast (`hf_tokenizer`) for the token ids of both pair
encodings.
"""

import itertools
import threading
import time

import numpy as np
import pytest

from flaxpals.data import batching, reader, tasks
from flaxpals.data import input_pipeline as ip
from tests.conftest import read_tsv, require

# The module's token cache is built once: keep the module on one xdist worker.
pytestmark = pytest.mark.xdist_group("input_pipeline")

BUCKETS = (32, 64, 128)


def load(name, split, tok, cache, **kw):
    return ip.load_split(tasks.get_task(name), split, tok, cache_dir=cache, **kw)


def train_batches(split, batch_size, *, seed, buckets=ip.DEFAULT_BUCKETS, process_index=0,
                  process_count=1, start_batch=0, num_epochs=None):
    """The trainer's batches of one task: its TrainPlan read by planned_batches."""
    plan = batching.TrainPlan(split.lengths(), buckets, batch_size, seed=seed,
                              process_index=process_index, process_count=process_count)
    return ip.planned_batches(split, plan, start_batch=start_batch, num_epochs=num_epochs)


def _take(it, n):
    return list(itertools.islice(it, n))


def test_splits_hold_what_the_files_hold(tok, cache):
    quora = load("quora", "train", tok, cache)
    raw = read_tsv("quora-train.csv")
    assert len(quora) == 16217 and quora.num_rows == len(raw) == 16219
    assert quora.skip_counts == {"empty_sentence": 1, "empty_label": 2}
    kept = [r for r in raw if r["is_duplicate"].strip() and r["sentence2"].strip()]
    assert list(quora.ids) == [r["id"] for r in kept]
    np.testing.assert_array_equal(quora.labels, [int(float(r["is_duplicate"])) for r in kept])
    assert quora.labels.dtype == np.int32 and isinstance(quora.ids[0], str)
    sts = load("sts", "dev", tok, cache)
    assert sts.labels.dtype == np.float32 and len(sts) == 863
    np.testing.assert_allclose(sts.labels, [float(r["similarity"]) for r in read_tsv(
        "sts-dev.csv")])
    test = load("sst", "test", tok, cache)
    assert test.labels is None and len(test) == 2210 and test.ids[0] == "b7573736a6ddf7be102b7fee0"


@pytest.mark.parametrize("max_length", [128, 20])
def test_pair_encodings_match_the_reference_tokenizer(tok, cache, hf_tokenizer, max_length):
    raw = read_tsv("quora-dev.csv")
    bi = load("quora", "dev", tok, cache, pair_encoding="bi", max_length=max_length)
    cross = load("quora", "dev", tok, cache, pair_encoding="cross", max_length=max_length)
    assert cross.input_ids_2 is None and bi.input_ids_2 is not None
    for i in range(0, len(raw), 37):
        a, b = raw[i]["sentence1"].strip(), raw[i]["sentence2"].strip()
        ref = hf_tokenizer(a, b, truncation="longest_first", max_length=max_length)
        assert cross.input_ids[i].tolist() == ref["input_ids"]
        assert cross.token_type_ids[i].tolist() == ref["token_type_ids"]
        assert bi.input_ids[i].tolist() == hf_tokenizer(
            a, truncation=True, max_length=max_length)["input_ids"]
        assert bi.input_ids_2[i].tolist() == hf_tokenizer(
            b, truncation=True, max_length=max_length)["input_ids"]
    # and through the batches: padded rows hold the same ids
    for batch in itertools.islice(ip.eval_batches(cross, 16), 3):
        for row, i in enumerate(batch["index"]):
            r = raw[i]
            ref = hf_tokenizer(r["sentence1"].strip(), r["sentence2"].strip(),
                               truncation="longest_first", max_length=max_length)
            n = len(ref["input_ids"])
            assert batch["input_ids"][row, :n].tolist() == ref["input_ids"]
            assert batch["token_type_ids"][row, :n].tolist() == ref["token_type_ids"]
            assert batch["attention_mask"][row].sum() == n
            assert (batch["input_ids"][row, n:] == tok.pad_id).all()


def test_token_cache(tok, cache):
    first = load("sts", "train", tok, cache, pair_encoding="cross", max_length=96)
    again = load("sts", "train", tok, cache, pair_encoding="cross", max_length=96)
    assert not first.stats["from_cache"] and again.stats["from_cache"]
    np.testing.assert_array_equal(first.input_ids.values, again.input_ids.values)
    np.testing.assert_array_equal(first.token_type_ids.offsets, again.token_type_ids.offsets)
    np.testing.assert_array_equal(first.labels, again.labels)
    assert list(first.ids) == list(again.ids) and again.task == first.task
    files = sorted(p.name for p in (cache / "tokens").glob("sts-train-cross-*.npz"))
    assert len(files) == 1
    load("sts", "train", tok, cache, pair_encoding="cross", max_length=64)
    assert len(list((cache / "tokens").glob("sts-train-cross-*.npz"))) == 2  # keyed by length
    # strict mode raises from the cache too, naming file and line
    load("quora", "train", tok, cache)
    with pytest.raises(reader.DataFormatError, match=r"quora-train.csv:2065: empty_label"):
        load("quora", "train", tok, cache, strict=True)


def test_tokenizing_the_three_train_sets_takes_seconds(tok, tmp_path):
    total = 0.0
    for name in ("sst", "quora", "sts"):
        split = load(name, "train", tok, tmp_path)
        assert not split.stats["from_cache"]
        total += split.stats["parse_s"] + split.stats["tokenize_s"]
    assert total < 30, f"parsing and tokenizing SST+Quora+STS train took {total:.1f} s"


def test_train_batches_are_bucketed_full_and_consistent(tok, cache):
    split = load("sst", "train", tok, cache)
    lengths = split.lengths()
    for batch in _take(train_batches(split, 32, seed=0, buckets=BUCKETS), 60):
        b, length = batch["input_ids"].shape
        assert b == 32 and length in BUCKETS
        assert all(batch[k].shape == (32, length) and batch[k].dtype == np.int32
                   for k in ("input_ids", "attention_mask", "token_type_ids"))
        n = lengths[batch["index"]]
        assert (n <= length).all()
        # the bucket is the smallest that fits its longest example
        assert n.max() > ([0, *BUCKETS][BUCKETS.index(length)])
        np.testing.assert_array_equal(batch["attention_mask"].sum(1), n)
        np.testing.assert_array_equal(batch["labels"], split.labels[batch["index"]])
        assert list(batch["ids"]) == list(split.ids[batch["index"]])
        assert batch["labels"].dtype == np.int32 and (batch["mask"] == 1).all()


def test_one_pass_has_every_example_once(tok, cache):
    split = load("sts", "dev", tok, cache)
    n = len(split)
    seen = np.concatenate([b["index"] for b in train_batches(split, 32, seed=3,
                                                                num_epochs=1)])
    assert len(seen) == (n // 32) * 32 and len(np.unique(seen)) == len(seen)
    batches = list(ip.eval_batches(split, 32))
    index = np.concatenate([b["index"] for b in batches])
    real = index[index >= 0]
    np.testing.assert_array_equal(np.sort(real), np.arange(n))
    mask = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(mask, (index >= 0).astype(np.float32))
    ids = np.concatenate([b["ids"] for b in batches])
    assert set(ids[index < 0]) <= {""} and sorted(ids[index >= 0]) == sorted(split.ids)
    assert {b["input_ids"].shape for b in batches} <= {(32, L) for L in BUCKETS}
    for b in batches:  # padding rows are [CLS] [SEP], labels 0
        pad = b["index"] < 0
        assert (b["input_ids"][pad, :2] == [tok.cls_id, tok.sep_id]).all()
        assert (b["attention_mask"][pad].sum(1) == 2).all() and (b["labels"][pad] == 0).all()
        assert b["input_ids_2"].shape == b["input_ids"].shape


def _plan(lengths, buckets, batch, **kw):
    """[(real row indices, batch length)] of an eval plan."""
    return [(row[row >= 0].tolist(), n) for row, n in
            batching.eval_plan(np.asarray(lengths), buckets, batch, **kw)]


def test_eval_leftovers_ride_in_longer_batches_where_that_pads_less():
    # One row of 16 and two of 32, batches of 4: one batch of 32 (32 tokens a row)
    # instead of a batch of 16 and one of 32 (48).
    assert _plan([10, 20, 30], (16, 32, 64), 4) == [([0, 1, 2], 32)]
    # One row of 16 joining exactly a batch of 64s would cost a second batch of 64
    # (128 tokens a row) against 16 + 64: it gets its own batch.
    assert _plan([10, 60, 60, 60, 60], (16, 32, 64), 4) == [([0], 16), ([1, 2, 3, 4], 64)]
    # Two processes of 2 rows (global batch 4): the 32s ride with the 64s (one batch of
    # 64: 16 + 64 tokens a row, against 16 + 32 + 64, or 32 + 64 with the 16 carried too,
    # or two batches of 64 with everything carried); every row once, each process the
    # same lengths (process 1 gets a batch of padding at 16).
    parts = [_plan([10, 20, 30, 60, 60], (16, 32, 64), 2, process_index=p, process_count=2)
             for p in (0, 1)]
    assert [n for _, n in parts[0]] == [n for _, n in parts[1]] == [16, 64]
    assert parts[1][0] == ([], 16)
    assert sorted(i for part in parts for rows, _ in part for i in rows) == [0, 1, 2, 3, 4]


def test_eval_plan_pads_less_than_a_batch_per_bucket(tok, cache):
    for name in ("sst", "quora", "sts"):
        lengths = load(name, "dev", tok, cache).lengths()
        buckets, batch = (16, 24, 32, 48, 64, 96, 128), 128
        plan = _plan(lengths, buckets, batch)
        rows = [i for r, _ in plan for i in r]
        assert sorted(rows) == list(range(len(lengths)))
        assert all(lengths[i] <= n for r, n in plan for i in r)
        # Against padding each bucket's rows to whole batches (the plan before leftovers
        # rode on): fewer padded tokens on each CS224N dev set.
        per_bucket = np.bincount(batching.bucket_ids(lengths, buckets), minlength=len(buckets))
        before = sum(-(-int(k) // batch) * batch * n
                     for k, n in zip(per_bucket, buckets, strict=True))
        assert sum(batch * n for _, n in plan) < before, name


def test_seeded_shuffle_resume_and_skip_cost(tok, cache):
    split = load("sts", "dev", tok, cache)
    per_epoch = ip.batches_per_epoch(split, 32)
    assert per_epoch == 863 // 32

    def order(seed, start=0, n=2 * per_epoch + 5):
        it = train_batches(split, 32, seed=seed, start_batch=start)
        return [tuple(b["index"]) for b in _take(it, n)]

    a = order(0)
    assert a == order(0)
    assert a != order(1)
    epoch1, epoch2 = a[:per_epoch], a[per_epoch:2 * per_epoch]
    assert epoch1 != epoch2  # a new order each epoch
    k = per_epoch - 2  # resume across an epoch boundary
    assert order(0, start=k, n=6) == a[k:k + 6]
    start = time.perf_counter()
    far = order(0, start=10_000, n=1)[0]
    assert time.perf_counter() - start < 5
    e, i = divmod(10_000, per_epoch)
    assert len(far) == 32 and far == order(0, start=e * per_epoch + i, n=1)[0]


def test_each_process_reads_its_rows_of_the_same_global_batches(tok, cache):
    split = load("sst", "dev", tok, cache)
    parts = [list(train_batches(split, 16, seed=0, buckets=(16, 32, 64), process_index=p,
                                   process_count=2, num_epochs=1)) for p in (0, 1)]
    one = list(train_batches(split, 32, seed=0, buckets=(16, 32, 64), num_epochs=1))
    assert len(parts[0]) == len(parts[1]) == len(one) == len(split) // 32
    # Step by step the same length on both processes, and together one process's batch.
    for a, b, whole in zip(*parts, one, strict=True):
        assert a["input_ids"].shape == b["input_ids"].shape == (16, whole["input_ids"].shape[1])
        np.testing.assert_array_equal(np.concatenate([a["index"], b["index"]]), whole["index"])
    assert len({b["input_ids"].shape[1] for b in one}) > 1  # several lengths: not vacuous
    train = [np.concatenate([b["index"] for b in part]) for part in parts]
    assert not set(train[0]) & set(train[1])
    evals = [list(ip.eval_batches(split, 16, process_index=p, process_count=2)) for p in (0, 1)]
    assert len(evals[0]) == len(evals[1])
    index = [np.concatenate([b["index"] for b in e]) for e in evals]
    real = [i[i >= 0] for i in index]
    assert not set(real[0]) & set(real[1])
    np.testing.assert_array_equal(np.sort(np.concatenate(real)), np.arange(len(split)))


def test_test_split_batches_have_no_labels_and_long_rows_are_truncated(tok, cache):
    split = load("sts", "test", tok, cache)
    batch = next(ip.eval_batches(split, 8, buckets=(16,)))
    assert "labels" not in batch and batch["input_ids"].shape == (8, 16)
    assert split.lengths()[batch["index"]].max() > 16  # some rows are cut to the largest bucket
    for suffix, ids in (("", split.input_ids), ("_2", split.input_ids_2)):
        np.testing.assert_array_equal(batch["attention_mask" + suffix].sum(1),
                                      np.minimum(ids.lengths()[batch["index"]], 16))
    for row, i in enumerate(batch["index"]):
        m = min(len(split.input_ids[i]), 16)
        assert batch["input_ids"][row, :m].tolist() == split.input_ids[i][:m].tolist()


def test_a_tfds_task_declared_by_config(tok, cache):
    tfds = require("tensorflow_datasets")
    task = tasks.task_from_config(tasks.GLUE_CONFIGS["glue/qqp"])
    with tfds.testing.mock_data(num_examples=40):  # offline: random examples, real features
        split = ip.load_split(task, "train", tok, cache_dir=cache, use_cache=False,
                              pair_encoding="cross")
        test = ip.load_split(task, "test", tok, cache_dir=cache, use_cache=False)
    assert split.num_rows == 40 and len(split) + split.num_skipped == 40
    assert set(split.skip_counts) <= {"duplicate_id", "empty_sentence"}
    assert set(split.labels.tolist()) <= {0, 1} and test.labels is None
    batch = next(train_batches(split, 8, seed=0))
    assert batch["input_ids"].shape[0] == 8 and "input_ids_2" not in batch


def test_bad_arguments_are_refused(tok, cache):
    split = load("sts", "dev", tok, cache)
    with pytest.raises(ValueError, match="pair_encoding"):
        load("sts", "dev", tok, cache, pair_encoding="siamese")
    with pytest.raises(ValueError, match="buckets"):
        next(train_batches(split, 8, seed=0, buckets=(64, 32)))
    with pytest.raises(ValueError, match="do not fill one global batch"):
        next(train_batches(split, 1000, seed=0))
    with pytest.raises(ValueError, match="process_index"):
        next(ip.eval_batches(split, 8, process_index=2, process_count=2))


def test_train_sample_is_seeded_random_not_the_files_head(tok, cache):
    # SST's train file is sorted: its first 1,000 rows are 80% classes 3 and 4. The
    # sample evaluated each epoch must look like the file, not like its head.
    sst = load("sst", "train", tok, cache)
    raw = read_tsv("ids-sst-train.csv")
    whole = np.bincount([int(r["sentiment"]) for r in raw], minlength=5) / len(raw)
    head = np.bincount(sst.take(1000).labels, minlength=5) / 1000
    assert head[3] + head[4] > 0.75  # the premise: the head is skewed
    sample = sst.sample(1000, seed=0)
    share = np.bincount(sample.labels, minlength=5) / 1000
    assert np.abs(share - whole).max() < 0.05, (share, whole)
    # Same seed, same rows; another seed, other rows; file order kept.
    assert list(sst.sample(1000, seed=0).ids) == list(sample.ids)
    assert list(sst.sample(1000, seed=1).ids) != list(sample.ids)
    assert np.all(np.diff(sample.lines) > 0) and len(set(sample.ids)) == 1000
    # Each sampled row keeps its own tokens and label (the reference: the full split).
    row_of = {i: k for k, i in enumerate(sst.ids)}
    for k in (0, 1, 500, 999):
        j = row_of[sample.ids[k]]
        np.testing.assert_array_equal(sample.input_ids[k], sst.input_ids[j])
        np.testing.assert_array_equal(sample.token_type_ids[k], sst.token_type_ids[j])
        assert sample.labels[k] == sst.labels[j] and sample.lines[k] == sst.lines[j]
    assert sst.sample(len(sst) + 5, seed=0) is sst
    # Bi-encoded pairs: both sentences' rows follow the sample.
    quora = load("quora", "dev", tok, cache, pair_encoding="bi")
    pairs = quora.sample(50, seed=3)
    j = {i: k for k, i in enumerate(quora.ids)}[pairs.ids[7]]
    np.testing.assert_array_equal(pairs.input_ids_2[7], quora.input_ids_2[j])
    assert len(pairs.input_ids) == len(pairs.input_ids_2) == 50


def test_the_trainers_train_sample_is_the_seeded_one(tok, cache):
    # What the trainer evaluates each epoch (evaluate.EvalSets): the seeded sample for
    # train, the head for any other split's limit.
    from flaxpals import config_lib
    from flaxpals.train import evaluate, parallel

    c = config_lib.base()
    c.seed = 5
    sst, dev = load("sst", "train", tok, cache), load("sst", "dev", tok, cache)
    sets = evaluate.EvalSets({"sst": {"train": sst, "dev": dev}}, c, parallel.make_mesh())
    sampled, batches = sets.get("sst", "train", c.eval.train_sample)
    assert list(sampled.ids) == list(sst.sample(c.eval.train_sample, seed=5).ids)
    assert sum(int((b["index"] >= 0).sum()) for b in batches) == c.eval.train_sample
    assert list(sets.get("sst", "dev", 100)[0].ids) == list(dev.ids[:100])


def test_batches_match_a_row_by_row_reference(tok, cache):
    # Reference: each row's token list, cut to the bucket, then padded, one row at a time.
    split = load("quora", "dev", tok, cache, pair_encoding="bi")
    batches = _take(train_batches(split, 8, seed=5, buckets=(16, 32)), 10)
    batches += list(ip.eval_batches(split.take(21), 8, buckets=(16, 32)))  # padding rows
    for batch in batches:
        length = batch["input_ids"].shape[1]
        for row, i in enumerate(batch["index"]):
            for suffix, ids, types in (("", split.input_ids, split.token_type_ids),
                                       ("_2", split.input_ids_2, split.token_type_ids_2)):
                if i < 0:
                    want = [tok.cls_id, tok.sep_id]
                    want_types = [0, 0]
                else:
                    want = ids[i][:length].tolist()
                    want_types = types[i][:length].tolist()
                pad = length - len(want)
                assert batch["input_ids" + suffix][row].tolist() == want + [tok.pad_id] * pad
                assert batch["token_type_ids" + suffix][row].tolist() == want_types + [0] * pad
                assert batch["attention_mask" + suffix][row].tolist() == [1] * len(want) + [0] * pad
            assert batch["labels"][row] == (split.labels[i] if i >= 0 else 0)
            assert batch["ids"][row] == (split.ids[i] if i >= 0 else "")
    assert any((b["index"] < 0).any() for b in batches)


def test_an_abandoned_iterator_stops_its_thread(tok, cache):
    def workers():
        return {t for t in threading.enumerate() if t.name.startswith("flaxpals-batches")}

    split = load("sts", "dev", tok, cache)
    before = workers()
    it = train_batches(split, 8, seed=0)  # infinite
    next(it)
    mine = workers() - before
    assert len(mine) == 1
    it.close()
    thread = mine.pop()
    thread.join(timeout=30)
    assert not thread.is_alive()
