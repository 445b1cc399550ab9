"""A trained model on your own text: `Predictor` and `python -m flaxpals.predict`.

    p = Predictor.from_workdir("runs/pal")           # best checkpoint; or step=N
    p = Predictor.from_pretrained("exported/pal")    # a `python -m flaxpals.export` directory
    p.tasks                                          # (Task, ...): name, kind, label_names, ...
    p.predict("sst", ["a gripping film", "dull"])    # {"label": [2], "probabilities": [2, 5]}
    p.predict("quora", ["how old are you?"], pairs=["what is your age?"])
                                                     # {"label": [1], "probability": [1]}
    p.predict("sts", ["a man sings"], pairs=["a man is singing"])   # {"score": [1]}
    p.embed(["a sentence"], task=None)               # [1, hidden] sentence vectors
    Ensemble.from_workdirs(["runs/s0", "runs/s1"]).predict(...)   # flaxpals.serve.ensemble

Outputs are NumPy arrays in input order: class ids and class probabilities
(softmax) for classification; the paraphrase probability (sigmoid of the pair
logit) and the 0/1 decision (probability > 0.5, i.e. logit > 0) for
paraphrase; for regression the model's score in the label's units (STS: 0..5;
not clipped). Texts run through the run's length buckets and eval batch size,
the same batches as `--mode=predict`; longer texts are cut to
`data.max_length` tokens and counted. An empty text raises
`reader.DataFormatError` naming its position.

The command line around it: flaxpals/predict.py.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from flaxpals.data import input_pipeline, reader
from flaxpals.data.tasks import Task
from flaxpals.model import heads
from flaxpals.serve import restore
from flaxpals.train import evaluate, parallel

# Show a progress bar from this many examples on.
PROGRESS_FROM = 2048


class Predictor:
    """A restored multi-task model that predicts from raw text (module docstring)."""

    def __init__(self, restored: restore.Restored, source: str):
        self._r, self.source = restored, source
        self._embed_steps: dict[str | None, Any] = {}

    @classmethod
    def from_workdir(cls, workdir, step: int | None = None, config=None) -> Predictor:
        """The best checkpoint of a training workdir (or `step` among its latest)."""
        return cls(restore.restore(workdir, config, step), str(workdir))

    @classmethod
    def from_pretrained(cls, directory) -> Predictor:
        """A directory written by `python -m flaxpals.export` (no workdir, no config file)."""
        from flaxpals.serve import exporter

        return cls(exporter.restore_exported(directory), str(directory))

    @property
    def tasks(self) -> tuple[Task, ...]:
        return tuple(self._r.tasks)

    @property
    def config(self):
        return self._r.config

    @property
    def step(self) -> int:
        return self._r.step

    def task(self, name: str) -> Task:
        for t in self._r.tasks:
            if t.name == name:
                return t
        raise ValueError(f"unknown task {name!r}; this model has "
                         f"{[t.name for t in self._r.tasks]}")

    # ------------------------------------------------------------ from text

    def split(self, task: str, texts: Sequence[str], pairs: Sequence[str] | None = None,
              ids: Sequence[str] | None = None, source: str = "<input>",
              strict: bool = True) -> input_pipeline.Split:
        """Checks and tokenizes texts into a Split of `task` (empty texts: DataFormatError
        in strict mode, else skipped and counted)."""
        t = self.task(task)
        if t.is_pair != (pairs is not None):
            raise ValueError(f"task {task!r} is a {t.kind} task: "
                             + ("give pairs=[...]" if t.is_pair else "give no pairs"))
        if isinstance(texts, str):  # would be read one character per row
            raise ValueError("texts: give a list of strings, not one string")
        for name, other in (("pairs", pairs), ("ids", ids)):
            if other is not None and len(other) != len(texts):
                raise ValueError(f"{name}: {len(other)} of them for {len(texts)} texts")
        records = ((i + 1, None if ids is None else ids[i], text,
                    None if pairs is None else pairs[i], None)
                   for i, text in enumerate(texts))
        parsed = reader.read_records(records, dataclasses.replace(t, id_field=None),
                                     "test", source, strict=strict, unique_ids=False)
        return self._tokenize(t, parsed)

    def _tokenize(self, task: Task, parsed: reader.ParsedSplit) -> input_pipeline.Split:
        c = self._r.config
        return input_pipeline.split_from_parsed(task, "test", parsed, self._r.tokenizer,
                                                max_length=c.data.max_length,
                                                pair_encoding=c.model.pair_encoding)

    def outputs(self, split: input_pipeline.Split, step=None) -> np.ndarray:
        """The outputs for every row of `split`, in its order: the model's for the split's
        task (logits [n, classes], a pair logit or a score [n]); or `step`'s (a function
        of params, batch and task name) if given."""
        sets = evaluate.EvalSets({split.task.name: {"test": split}}, self._r.config,
                                   self._r.mesh)
        bar = tqdm(total=len(split), desc=f"predict {split.task.name}", unit="ex",
                   disable=len(split) < PROGRESS_FROM or jax.process_index() != 0,
                   file=sys.stderr)
        _, rows, out = evaluate.outputs(step or self._r.predict, self._r.params, sets,
                                          split.task.name, "test", progress=bar)
        bar.close()
        if step is None:  # the model's outputs come padded to its widest task's
            out = heads.unpad(split.task.kind, split.task.num_labels, out)
        ordered = np.empty_like(out)
        ordered[rows] = out
        return ordered

    def decide(self, task: Task, outputs: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs -> the arrays `predict` returns."""
        labels = heads.predictions(task.kind, outputs)
        if task.kind == "classification":
            return {"label": labels, "probabilities": heads.probabilities(task.kind, outputs)}
        if task.kind == "pair_classification":
            return {"label": labels, "probability": heads.probabilities(task.kind, outputs)}
        return {"score": labels.astype(np.float32)}

    def predict_parsed(self, task: Task, parsed: reader.ParsedSplit):
        """(the Split of parsed rows, its predictions): `predict` for rows read from a file."""
        split = self._tokenize(task, parsed)
        return split, self.decide(task, self.outputs(split))

    def predict(self, task: str, texts: Sequence[str],
                pairs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Predictions for texts (and pairs, for a pair task), in input order."""
        split = self.split(task, texts, pairs)
        return self.decide(split.task, self.outputs(split))

    def embed(self, texts: Sequence[str], task: str | None = None) -> np.ndarray:
        """Sentence vectors [N, hidden] (model.pooling); `task` adds that task's adapters,
        None uses the shared encoder alone."""
        t = self.task(task) if task is not None else next(iter(self._r.tasks))
        single = dataclasses.replace(t, kind="classification", num_labels=2, label_range=None,
                                     label_names=None, text_pair_field=None, metric="accuracy")
        records = ((i + 1, None, text, None, None) for i, text in enumerate(texts))
        split = self._tokenize(single, reader.read_records(records, single, "test",
                                                           "<input>", strict=True))
        return self.outputs(split, self._embed_step(task)).astype(np.float32)

    def _embed_step(self, task: str | None):
        if task not in self._embed_steps:
            from flaxpals.model.multitask import MultiTaskModel

            model = self._r.model

            def embed(params, batch, _):
                return model.apply({"params": params}, batch["input_ids"],
                                   batch["attention_mask"], batch["token_type_ids"], task, True,
                                   method=MultiTaskModel.encode)

            data = parallel.batch_sharding(self._r.mesh)
            self._embed_steps[task] = jax.jit(embed, static_argnums=2, out_shardings=data)
        return self._embed_steps[task]


def _plain_lines(lines, task: Task, source: str, strict: bool) -> reader.ParsedSplit:
    """Rows from plain lines (str or bytes; pairs tab-separated), numbered from 1."""
    records = []
    for number, line in enumerate(lines, start=1):
        line = line.rstrip(b"\r\n" if isinstance(line, bytes) else "\r\n")
        if task.is_pair:
            text, _, pair = line.partition(b"\t" if isinstance(line, bytes) else "\t")
            records.append((number, None, text, pair, None))
        else:
            records.append((number, None, line, None, None))
    return reader.read_records(records, task, "test", source, strict=strict, unique_ids=False)


def read_input(path: str, task: Task, columns: dict[str, str] | None = None,
               strict: bool = False, stdin=None) -> tuple[reader.ParsedSplit, bool]:
    """Unlabelled examples of `task` from a CSV/TSV/JSONL file, or plain lines (pairs
    tab-separated) from a .txt file or `-` (stdin, read as bytes; `stdin` may be any
    stream of lines), checked as the reader checks files; and whether the input had an
    id column (else ids name the line)."""
    columns = dict(columns or {})
    if path == "-" or path.endswith(".txt"):
        if columns:
            raise ValueError("--columns: for a file with columns (CSV, TSV or JSONL; plain "
                             "lines have none, pairs are tab-separated)")
        if path == "-":
            stream = stdin if stdin is not None else sys.stdin.buffer
            return _plain_lines(stream, task, "<stdin>", strict), False
        return _plain_lines(Path(path).read_bytes().splitlines(), task, path, strict), False
    if path.endswith((".jsonl", ".json")):
        return _read_jsonl(Path(path), task, columns, strict)
    with open(path, "rb") as f:
        raw = f.readline()
    try:  # the header alone: a bad byte in a row is that row's defect (reader.read_file)
        header = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise reader.DataFormatError(path, 1, "bad_header", f"the header is not UTF-8 ({e})"
                                     ) from None
    delimiter = "\t" if path.endswith(".tsv") or "\t" in header else ","
    names = [h.strip() for h in next(csv.reader(io.StringIO(header), delimiter=delimiter), [])]
    fields = _fields(task, columns, names, path)
    as_file = dataclasses.replace(task, source="csv", splits=(("test", path),),
                                  delimiter=delimiter, label_field=None, **fields)
    return (reader.read_file(path, as_file, "test", strict=strict, unique_ids=False),
            bool(fields["id_field"]))


def _fields(task: Task, columns: dict[str, str], names: Sequence[str], source: str) -> dict:
    """The Task field names for a file's columns: --columns, else the task's own, else
    text / text_pair; the id column is used when the file has one."""
    known = {"id", "text", "text_pair"}
    if "label" in columns:  # a mapping that would be read and then ignored
        raise ValueError("--columns: predict reads no labels (label=...); to score a "
                         "labelled file use `python -m flaxpals.main --mode=eval "
                         "--eval_file=...`")
    unknown = sorted(set(columns) - known)
    if unknown:
        raise ValueError(f"--columns: unknown key(s) {unknown}; known: {sorted(known)}")
    defaults = {"text": (task.text_field, "text", "sentence", "sentence1"),
                "text_pair": (task.text_pair_field, "text_pair", "sentence2")}
    out = {}
    for key in ("text", "text_pair") if task.is_pair else ("text",):
        if key in columns:
            out[key] = columns[key]
        else:
            out[key] = next((c for c in defaults[key] if c and c in names), None)
        if out[key] is None:
            raise reader.DataFormatError(
                source, 1, "bad_header", f"no column for {key} in {list(names)}; name it with "
                f"--columns={key}=COLUMN")
    for key, column in columns.items():
        if column not in names:
            raise reader.DataFormatError(
                source, 1, "bad_header", f"no column {column!r} (--columns={key}={column}) "
                f"in {list(names)}")
    ident = columns.get("id") or next((c for c in (task.id_field, "id") if c and c in names),
                                      None)
    return {"id_field": ident, "text_field": out["text"],
            "text_pair_field": out.get("text_pair")}


def _read_jsonl(path: Path, task: Task, columns: dict[str, str], strict: bool):
    rows, records = [], []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except UnicodeDecodeError as e:
            row = reader.Defect(number, "bad_encoding", f"not UTF-8 ({e})")
        except ValueError as e:
            row = reader.Defect(number, "bad_json", str(e))
        if strict and isinstance(row, reader.Defect):
            raise reader.DataFormatError(path, number, row.reason, row.detail)
        rows.append((number, row))
    names = sorted({k for _, r in rows if isinstance(r, dict) for k in r})
    fields = _fields(task, columns, names, str(path))
    for number, row in rows:
        if isinstance(row, reader.Defect):
            records.append(row)
            continue
        records.append((number, row.get(fields["id_field"]) if fields["id_field"] else None,
                        row.get(fields["text_field"]),
                        row.get(fields["text_pair_field"]) if task.is_pair else None, None))
    return (reader.read_records(records, task, "test", str(path), strict=strict,
                                unique_ids=False),
            bool(fields["id_field"]))


def write_output(stream, task: Task, ids, result: dict[str, np.ndarray], fmt: str) -> None:
    """One row per example: id, then label (and its name) and probabilities, or score."""
    rows = []
    for i, ex_id in enumerate(ids):
        row: dict[str, Any] = {"id": ex_id}
        if "label" in result:
            row["label"] = int(result["label"][i])
            if task.label_names:
                row["label_name"] = task.label_names[row["label"]]
        if "probabilities" in result:
            names = task.label_names or [str(k) for k in range(task.num_labels)]
            row.update({f"p_{n}": round(float(p), 6)
                        for n, p in zip(names, result["probabilities"][i], strict=True)})
        if "probability" in result:
            row["probability"] = round(float(result["probability"][i]), 6)
        if "score" in result:
            row["score"] = round(float(result["score"][i]), 6)
        rows.append(row)
    if fmt == "jsonl":
        for row in rows:
            stream.write(json.dumps(row) + "\n")
        return
    writer = csv.DictWriter(stream, fieldnames=list(rows[0]) if rows else ["id"])
    writer.writeheader()
    writer.writerows(rows)


def predict_file(predictor, task: str, path: str, output=None,
                 columns: dict[str, str] | None = None, fmt: str | None = None,
                 strict: bool = False, stdin=None) -> dict[str, Any]:
    """Predicts every kept row of a file with a Predictor or an `ensemble.Ensemble`;
    writes to `output` (a path, or a stream).
    Returns {"rows", "kept", "skipped": {reason: n}, "truncated", "notes": {note: n}}."""
    t = predictor.task(task)
    parsed, named = read_input(path, t, columns, strict=strict, stdin=stdin)
    split, result = predictor.predict_parsed(t, parsed)
    # Without an id column, rows are named by their line in the input.
    ids = split.ids if named else [str(n) for n in split.lines]
    if fmt is None:
        fmt = "jsonl" if isinstance(output, str) and output.endswith(".jsonl") else "csv"
    if isinstance(output, str):
        with open(output, "w", newline="") as f:
            write_output(f, t, ids, result, fmt)
    else:
        write_output(output or sys.stdout, t, ids, result, fmt)
    return {"rows": parsed.num_rows, "kept": len(split), "skipped": dict(split.skip_counts),
            "truncated": split.notes.get("truncated", 0),
            "notes": {k: v for k, v in split.notes.items() if k != "truncated"}}


