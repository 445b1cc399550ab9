"""Tokenizer ids equal Hugging Face's BertTokenizerFast on real data."""

import numpy as np
import pytest

from flaxpals.model.tokenizer import Tokenizer
from tests.conftest import read_tsv


@pytest.fixture(scope="module")
def tok(minilm):
    return Tokenizer.from_checkpoint(minilm[2])


def test_known_ids(tok):
    ids, types = tok.encode(["a man"], ["a dog"])
    assert ids == [[101, 1037, 2158, 102, 1037, 3899, 102]]
    assert types == [[0, 0, 0, 0, 1, 1, 1]]


def test_single_sentences_match_hf(tok, hf_tokenizer):
    sentences = [r["sentence"] for r in read_tsv("ids-sst-train.csv")[:1500]]
    sentences += [r["sentence"] for r in read_tsv("ids-cfimdb-dev.csv")[:50]]
    ids, types = tok.encode(sentences)
    ref = hf_tokenizer(sentences)
    assert len(sentences) >= 1000
    assert ids == ref["input_ids"]
    assert types == ref["token_type_ids"]


def test_pairs_match_hf(tok, hf_tokenizer):
    rows = read_tsv("quora-train.csv")[:200] + read_tsv("sts-train.csv")[:200]
    rows = [r for r in rows if r["sentence1"] and r["sentence2"]]
    a, b = [r["sentence1"] for r in rows], [r["sentence2"] for r in rows]
    ids, types = tok.encode(a, b)
    ref = hf_tokenizer(a, b)
    assert len(rows) >= 200
    assert ids == ref["input_ids"]
    assert types == ref["token_type_ids"]


def test_truncation_matches_hf(tok, hf_tokenizer):
    rows = read_tsv("sts-train.csv")[:200]
    a, b = [r["sentence1"] for r in rows], [r["sentence2"] for r in rows]
    ids, types = tok.encode(a, b, max_length=16)
    ref = hf_tokenizer(a, b, truncation="longest_first", max_length=16)
    assert max(len(x) for x in ids) == 16
    assert ids == ref["input_ids"] and types == ref["token_type_ids"]
    long = [r["sentence"] for r in read_tsv("ids-cfimdb-dev.csv")[:50]]
    assert tok.encode(long, max_length=64)[0] == hf_tokenizer(
        long, truncation=True, max_length=64)["input_ids"]


def test_pad(tok):
    batch = tok(["a man", "a man with a hat"], length=10)
    assert batch["input_ids"].shape == (2, 10)
    assert batch["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(batch["attention_mask"].sum(1), [4, 7])
    assert (batch["input_ids"][0, 4:] == tok.pad_id).all()
    with pytest.raises(ValueError, match="more than length"):
        tok(["a man with a hat"], length=3)


def test_missing_vocab(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab"):
        Tokenizer(tmp_path / "vocab.txt")
