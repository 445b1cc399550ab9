"""WordPiece tokenization from a checkpoint's vocab.txt (Rust `tokenizers`).

Gives the same ids as Hugging Face's `BertTokenizerFast` for uncased BERT:
clean text, split Chinese characters, lowercase and strip accents, WordPiece,
`[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]` with token types 0 / 1, pairs
truncated longest-first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import BertWordPieceTokenizer


class Tokenizer:
    """Encodes sentences and sentence pairs into ragged id lists, then pads batches."""

    def __init__(self, vocab_file: str | os.PathLike, lowercase: bool = True,
                 max_length: int = 512):
        vocab_file = Path(vocab_file)
        if not vocab_file.exists():
            raise FileNotFoundError(f"vocab file {vocab_file} does not exist")
        # BertTokenizerFast strips accents whenever it lowercases (strip_accents=None).
        self._tok = BertWordPieceTokenizer(str(vocab_file), lowercase=lowercase,
                                           strip_accents=lowercase, clean_text=True,
                                           handle_chinese_chars=True)
        self.max_length = max_length
        self._tok.enable_truncation(max_length, strategy="longest_first")
        self._tok.no_padding()
        self.pad_id = self._tok.token_to_id("[PAD]")
        self.cls_id = self._tok.token_to_id("[CLS]")
        self.sep_id = self._tok.token_to_id("[SEP]")
        self.vocab_size = self._tok.get_vocab_size()

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, max_length: int = 512) -> Tokenizer:
        """Builds the tokenizer of a checkpoint directory (vocab.txt, tokenizer_config.json)."""
        directory = Path(directory)
        lowercase = True
        config_file = directory / "tokenizer_config.json"
        if config_file.exists():
            with open(config_file) as f:
                lowercase = json.load(f).get("do_lower_case", True)
        return cls(directory / "vocab.txt", lowercase=lowercase, max_length=max_length)

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
               max_length: int | None = None, count_truncated: bool = False):
        """Tokenizes a batch; returns (input_ids, token_type_ids), one list per example.

        texts: N sentences; pairs: N second sentences for a pair encoding, or None.
        max_length: truncation length including special tokens (default: the tokenizer's).
        count_truncated: also return how many examples were cut to max_length.
        """
        length = max_length or self.max_length
        if length != self.max_length:
            self._tok.enable_truncation(length, strategy="longest_first")
        try:
            inputs = list(texts) if pairs is None else list(zip(texts, pairs, strict=True))
            encodings = self._tok.encode_batch(inputs)
        finally:
            if length != self.max_length:
                self._tok.enable_truncation(self.max_length, strategy="longest_first")
        out = [e.ids for e in encodings], [e.type_ids for e in encodings]
        return (*out, sum(bool(e.overflowing) for e in encodings)) if count_truncated else out

    def pad(self, ids: Sequence[Sequence[int]], type_ids: Sequence[Sequence[int]],
            length: int | None = None) -> dict[str, np.ndarray]:
        """Pads a batch to `length` (default: its longest).

        Returns int32 arrays input_ids, attention_mask, token_type_ids: [batch, length].
        """
        length = length or max(len(x) for x in ids)
        out = {k: np.zeros((len(ids), length), np.int32)
               for k in ("input_ids", "attention_mask", "token_type_ids")}
        out["input_ids"][:] = self.pad_id
        for i, (x, t) in enumerate(zip(ids, type_ids, strict=True)):
            if len(x) > length:
                raise ValueError(f"example {i} has {len(x)} tokens, more than length {length}")
            out["input_ids"][i, :len(x)] = x
            out["token_type_ids"][i, :len(t)] = t
            out["attention_mask"][i, :len(x)] = 1
        return out

    def __call__(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
                 max_length: int | None = None,
                 length: int | None = None) -> dict[str, np.ndarray]:
        """Tokenizes and pads a batch: a dict of [batch, length] int32 arrays."""
        return self.pad(*self.encode(texts, pairs, max_length), length=length)
