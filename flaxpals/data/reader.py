"""Reads a task's split from a delimited file (or a TFDS dataset) and checks every row.

One parser for everything that reads examples: `load_split` and the TFDS
builders both call `read_file`, so they agree row for row.

File format: a header row naming the columns, then one record per physical
line; fields may be quoted the CSV way (`"a ""quoted"" word"`) but a quoted
field may not span lines. Columns are found by name, so extra columns (the
CS224N files' leading index column, the test files' odd `0`, `` header) are
ignored.

Defective rows. Default: the row is skipped and counted per reason, and the
counts are logged once per file (a warning naming the lines for labels out of
range). strict=True: the first defect raises `DataFormatError` naming file,
line and reason. A defect of the header itself (a required column missing)
always raises: nothing could be read. Reasons:

  bad_encoding         the line (or a field) is not UTF-8
  bad_json             a JSON-lines row that is not JSON (predict's input)
  bad_quoting          an unterminated or misplaced quote (csv strict parsing fails)
  blank_line           an empty line inside the file
  wrong_column_count   not as many fields as the header
  header_row           a repeat of the header row
  empty_id             the id field is empty
  duplicate_id         an id seen on an earlier row (the later row is skipped)
  empty_sentence       a text field is empty, or only whitespace and invisible format
                       characters (zero-width spaces, joiners, BOMs)
  empty_label          the label field is empty (labelled splits)
  bad_label            not a number, not an integer for classes, unknown class name, NaN
  label_out_of_range   a class outside 0..num_labels-1 or a score outside label_range;
                       never clipped

A row may have several defects (an empty sentence and an empty label); each
is counted, so `skip_counts` counts rows per reason and `num_skipped` counts
rows; the logged summary says how many rows had more than one. Kept rows may
carry notes, counted but harmless:

  stray_quote          a text with an odd number of `"` characters (kept as is)
  odd_header           the header has unnamed or numeric column names (once per file)
  truncated            longer than max_length tokens: cut to it (counted when tokenized)
  duplicate_id         with unique_ids=False (predict's input, where ids only label the
                       output rows): an id seen on an earlier row, the row kept
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import math
import os
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

from flaxpals.data.tasks import Task

log = logging.getLogger(__name__)

SKIP_REASONS = ("bad_encoding", "bad_json", "bad_quoting", "blank_line",
                "wrong_column_count", "header_row", "empty_id", "duplicate_id",
                "empty_sentence", "empty_label", "bad_label", "label_out_of_range")
NOTES = ("stray_quote", "odd_header", "truncated", "duplicate_id")


@dataclasses.dataclass(frozen=True)
class Defect:
    """A record that could not be read at all (`read_records` skips and counts it, or
    raises in strict mode): its line, reason (one of SKIP_REASONS) and detail."""

    line: int
    reason: str
    detail: str


def is_blank(text: str) -> bool:
    """Whether a text shows nothing: whitespace and invisible format characters (Unicode
    category Cf: zero-width spaces and joiners, BOMs, direction marks) only."""
    return all(c.isspace() or unicodedata.category(c) == "Cf" for c in text)


def _text(value: Any) -> tuple[str, str | None]:
    """(a field as text, or a reason it is not UTF-8): bytes are decoded strictly, and a
    str holding lone surrogates (undecodable input read with surrogateescape) fails."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8"), None
        except UnicodeDecodeError as e:
            return "", f"not UTF-8 ({e})"
    text = "" if value is None else str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return "", f"not UTF-8 ({e})"
    return text, None


class DataFormatError(ValueError):
    """A defect in a data file: `path:line: reason: detail` (`path: reason: detail` for
    the file as a whole, line None)."""

    def __init__(self, path: str | os.PathLike, line: int | None, reason: str, detail: str):
        self.path, self.line, self.reason, self.detail = str(path), line, reason, detail
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {reason}: {detail}")


@dataclasses.dataclass
class ParsedSplit:
    """The kept examples of one split, column-wise, with what was skipped.

    lines[i]: 1-based line of example i in the file (header = line 1), or its
    1-based position in a TFDS split. labels is None for an unlabelled split.
    skipped: (line, reasons, detail) for every skipped row, in file order.
    """

    source: str
    sha256: str | None
    ids: list[str]
    texts: list[str]
    text_pairs: list[str] | None
    labels: list[int] | list[float] | None
    lines: list[int]
    num_rows: int
    skip_counts: dict[str, int]
    skipped: list[tuple[int, tuple[str, ...], str]]
    notes: dict[str, int]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _Checker:
    """Validates records of one split; collects examples, skips and notes."""

    def __init__(self, task: Task, split: str, source: str, labelled: bool, strict: bool,
                 sha256: str | None = None, unique_ids: bool = True):
        self.task, self.split, self.source = task, split, source
        self.labelled, self.strict, self.unique_ids = labelled, strict, unique_ids
        self.out = ParsedSplit(source=source, sha256=sha256, ids=[], texts=[],
                               text_pairs=[] if task.is_pair else None,
                               labels=[] if labelled else None, lines=[], num_rows=0,
                               skip_counts={}, skipped=[], notes={})
        self._seen: set[str] = set()
        self._skips: Counter = Counter()
        self._notes: Counter = Counter()

    def note(self, what: str) -> None:
        self._notes[what] += 1

    def skip(self, line: int, reasons: list[str], detail: str) -> None:
        if self.strict:
            raise DataFormatError(self.source, line, reasons[0], detail)
        self._skips.update(reasons)
        self.out.skipped.append((line, tuple(reasons), detail))

    def _label(self, raw: Any) -> tuple[int | float | None, str | None, str]:
        """(label, defect or None, detail)."""
        t = self.task
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "replace")
        if isinstance(raw, str):
            raw = raw.strip()
            if not raw:
                return None, "empty_label", "the label is empty"
            if t.label_names is not None and raw in t.label_names:
                return t.label_names.index(raw), None, ""
        try:
            value = float(raw)
        except (TypeError, ValueError):
            return None, "bad_label", f"label {raw!r} is not a number" + (
                f" nor one of {list(t.label_names)}" if t.label_names else "")
        if not math.isfinite(value):
            return None, "bad_label", f"label {raw!r} is not finite"
        if t.is_regression:
            lo, hi = t.label_range
            if not lo <= value <= hi:
                return None, "label_out_of_range", f"label {raw!r} outside [{lo}, {hi}]"
            return value, None, ""
        if not value.is_integer():
            return None, "bad_label", f"class label {raw!r} is not an integer"
        if not 0 <= value < t.num_labels:
            return None, "label_out_of_range", (f"class {raw!r} outside 0..{t.num_labels - 1}")
        return int(value), None, ""

    def add(self, line: int, ex_id: Any, text: Any, pair: Any, label: Any) -> None:
        """Checks one record (raw field values); keeps it or skips it."""
        self.out.num_rows += 1
        reasons, details = [], []
        fields = {"id": ex_id, "text": text}
        if self.task.is_pair:
            fields["text_pair"] = pair
        decoded, undecodable = {}, []
        for name, value in fields.items():
            decoded[name], problem = _text(value)
            if problem:
                undecodable.append(f"{name} {problem}")
        if undecodable:
            reasons.append("bad_encoding")
            details.append("; ".join(undecodable))
        ex_id = decoded["id"].strip() if ex_id is not None else f"{self.split}-{line}"
        if not ex_id:
            if not undecodable:
                reasons.append("empty_id")
                details.append("the id is empty")
        elif ex_id in self._seen:
            if self.unique_ids:
                reasons.append("duplicate_id")
                details.append(f"id {ex_id!r} already seen")
            else:
                self.note("duplicate_id")
        names = ("text", "text_pair") if self.task.is_pair else ("text",)
        texts = [decoded[n].strip() for n in names]
        empty = [n for n, s in zip(names, texts, strict=True)
                 if is_blank(s) and not any(u.startswith(n + " ") for u in undecodable)]
        if empty:
            reasons.append("empty_sentence")
            details.append(f"empty {' and '.join(empty)}")
        value = None
        if self.labelled:
            value, defect, detail = self._label(label)
            if defect:
                reasons.append(defect)
                details.append(detail)
        if reasons:
            self.skip(line, reasons, "; ".join(details))
            return
        if any(s.count('"') % 2 for s in texts):
            self.note("stray_quote")
        self._seen.add(ex_id)
        self.out.ids.append(ex_id)
        self.out.texts.append(texts[0])
        if self.task.is_pair:
            self.out.text_pairs.append(texts[1])
        if self.labelled:
            self.out.labels.append(value)
        self.out.lines.append(line)

    def finish(self) -> ParsedSplit:
        self.out.skip_counts = {r: self._skips[r] for r in SKIP_REASONS if self._skips[r]}
        self.out.notes = {n: self._notes[n] for n in NOTES if self._notes[n]}
        o = self.out
        log_summary(o.source, o.num_rows, len(o), o.skip_counts, o.notes, o.skipped)
        return self.out


def log_summary(source: str, num_rows: int, kept: int, skip_counts: dict[str, int],
                notes: dict[str, int], skipped: list[tuple[int, tuple[str, ...], str]]) -> None:
    """Logs what a split's reading kept and skipped: once per file, a warning if any skip.
    The reasons count rows per reason; when a row had several, the line says how many."""
    counts = ", ".join(f"{k}: {v}" for k, v in skip_counts.items())
    several = sum(len(reasons) > 1 for _, reasons, _ in skipped)
    if several:
        counts += (f"; {several} row{'s' if several > 1 else ''} with more than one reason, "
                   "counted under each")
    note = ", ".join(f"{k}: {v}" for k, v in notes.items())
    msg = (f"{source}: {num_rows} rows, kept {kept}, skipped {len(skipped)}"
           + (f" ({counts})" if counts else "") + (f"; notes: {note}" if note else ""))
    log.log(logging.WARNING if skipped else logging.INFO, msg)
    bad = [line for line, reasons, _ in skipped if "label_out_of_range" in reasons]
    if bad:  # never clipped: make the skip loud
        log.warning("%s: %d rows skipped for a label out of range (not clipped), lines %s%s",
                    source, len(bad), bad[:20], " ..." if len(bad) > 20 else "")


def _parse_line(text: str, delimiter: str) -> list[str]:
    """One physical line -> fields; csv.Error on bad quoting."""
    if '"' not in text:  # nothing quoted: the same fields as csv gives, 10x faster
        return text.split(delimiter)
    return next(csv.reader([text], delimiter=delimiter, strict=True), [])


def _sniff(header: str) -> str:
    return "\t" if "\t" in header else ","


def _is_odd(name: str, position: int) -> bool:
    # The CS224N files start with an unnamed pandas index column: that one is normal.
    if name == "":
        return position != 0
    try:
        float(name)
    except ValueError:
        return False
    return True


def read_file(path: str | os.PathLike, task: Task, split: str, *,
              strict: bool = False, unique_ids: bool = True) -> ParsedSplit:
    """Parses one split's file of `task`; see the module docstring for the rules.

    The split is labelled iff its header has the task's label column; train and
    dev must be labelled. unique_ids=False keeps a row whose id was seen before
    (a note, not a skip).
    """
    path = Path(path)
    data = path.read_bytes()
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] in (b"", b"\r"):
        raw_lines.pop()  # the final newline ends the last row, it does not start one
    if not raw_lines:
        raise DataFormatError(path, 1, "bad_header", "the file is empty")
    try:
        header_text = raw_lines[0].decode("utf-8").lstrip("\ufeff").rstrip("\r")
        delimiter = task.delimiter or _sniff(header_text)
        header = [h.strip() for h in _parse_line(header_text, delimiter)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataFormatError(path, 1, "bad_header", f"unreadable header: {e}") from None

    def column(field: str | None, required: bool) -> int | None:
        if field is None:
            return None
        hits = [i for i, h in enumerate(header) if h == field]
        if len(hits) > 1:
            raise DataFormatError(path, 1, "bad_header", f"column {field!r} appears "
                                  f"{len(hits)} times in header {header}")
        if not hits:
            if required:
                raise DataFormatError(path, 1, "bad_header", f"no column {field!r} in "
                                      f"header {header} (task {task.name!r}, split {split!r})")
            return None
        return hits[0]

    c_id = column(task.id_field, True)
    c_text = column(task.text_field, True)
    c_pair = column(task.text_pair_field, task.is_pair)
    c_label = column(task.label_field, split in ("train", "dev"))
    checker = _Checker(task, split, str(path), labelled=c_label is not None, strict=strict,
                       sha256=hashlib.sha256(data).hexdigest(), unique_ids=unique_ids)
    if any(_is_odd(h, i) for i, h in enumerate(header)):
        checker.note("odd_header")
    width = len(header)
    for number, raw in enumerate(raw_lines[1:], start=2):
        try:
            text = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            checker.out.num_rows += 1
            checker.skip(number, ["bad_encoding"], str(e))
            continue
        if not text.strip():
            checker.out.num_rows += 1
            checker.skip(number, ["blank_line"], "empty line")
            continue
        try:
            fields = _parse_line(text, delimiter)
        except csv.Error as e:
            checker.out.num_rows += 1
            checker.skip(number, ["bad_quoting"], f"{e} in {text[:60]!r}")
            continue
        if len(fields) != width:
            checker.out.num_rows += 1
            checker.skip(number, ["wrong_column_count"],
                         f"{len(fields)} fields, the header has {width}")
            continue
        if [f.strip() for f in fields] == header:
            checker.out.num_rows += 1
            checker.skip(number, ["header_row"], "a repeat of the header")
            continue
        checker.add(number, fields[c_id] if c_id is not None else None, fields[c_text],
                    fields[c_pair] if c_pair is not None else None,
                    fields[c_label] if c_label is not None else None)
    return checker.finish()


def parse_columns(text: str | None) -> dict[str, str]:
    """'text=review,label=stars' -> {'text': 'review', 'label': 'stars'} (a --columns flag)."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"--columns: {item!r} is not key=column")
        out[key.strip()] = value.strip()
    return out


def read_records(records, task: Task, split: str, source: str, *, labelled: bool = False,
                 strict: bool = False, unique_ids: bool = True) -> ParsedSplit:
    """Checks in-memory records as `read_file` checks a file's rows.

    records: iterable of (line, id or None, text, text_pair or None, label or None),
    or a `Defect` for a row that could not be read; `line` is what errors and skip
    lists name (1-based). Text given as bytes must be UTF-8.
    """
    checker = _Checker(task, split, source, labelled=labelled, strict=strict,
                       unique_ids=unique_ids)
    for record in records:
        if isinstance(record, Defect):
            checker.out.num_rows += 1
            checker.skip(record.line, [record.reason], record.detail)
            continue
        line, ex_id, text, pair, label = record
        checker.add(line, ex_id, text, pair, label)
    return checker.finish()


def read_tfds(task: Task, split: str, *, data_dir: str | os.PathLike | None = None,
              strict: bool = False, download: bool = True) -> ParsedSplit:
    """Reads a split of a TFDS task (`task.tfds_name`) with the same checks as files.

    Test splits are read unlabelled (GLUE marks their labels -1). `line` is the
    1-based position in the TFDS split. data_dir: where TFDS keeps prepared data.
    """
    from flaxpals.data.tf_util import import_tf

    import_tf()
    import tensorflow_datasets as tfds

    tfds_split = task.split_source(split)
    source = f"{task.tfds_name}[{tfds_split}]"
    ds = tfds.load(task.tfds_name, split=tfds_split, data_dir=data_dir, download=download,
                   shuffle_files=False)
    names = set(ds.element_spec)
    for f in (task.id_field, task.text_field, task.text_pair_field,
              task.label_field if split != "test" else None):
        if f is not None and f not in names:
            raise DataFormatError(source, 0, "bad_header",
                                  f"no feature {f!r}; features are {sorted(names)}")
    checker = _Checker(task, split, source, labelled=split != "test", strict=strict)
    for i, ex in enumerate(tfds.as_numpy(ds), start=1):
        checker.add(i, ex[task.id_field] if task.id_field else None, ex[task.text_field],
                    ex[task.text_pair_field] if task.is_pair else None,
                    ex[task.label_field] if split != "test" else None)
    return checker.finish()
