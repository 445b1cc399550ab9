"""The task registry: every task declared once, builtin or by config.

A `Task` says what the examples are (one sentence or a pair), what the label
is (classes or a real range), how it is scored, and where the examples come
from. The four CS224N tasks ship declared (`get_task("sst")`, "quora", "sts",
"cfimdb"); any other task is declared by config alone (`task_from_config`):

    # a TFDS dataset, fields mapped to id / text / text_pair / label
    {"name": "qqp", "kind": "pair_classification", "num_labels": 2,
     "tfds": "glue/qqp", "splits": {"train": "train", "dev": "validation"},
     "fields": {"id": "idx", "text": "question1", "text_pair": "question2",
                "label": "label"}}
    # a local CSV/TSV file per split, columns named in its header row
    {"name": "reviews", "kind": "classification", "num_labels": 3,
     "files": {"train": "/data/reviews-train.tsv", "dev": "reviews-dev.tsv"},
     "fields": {"id": "review_id", "text": "body", "label": "stars"},
     "label_names": ["bad", "ok", "good"]}

Relative file names are looked up in the data directory (`flaxpals.data.paths`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flaxpals import config_lib
from flaxpals.data.metrics import METRICS as _METRIC_FNS

KINDS = ("classification", "pair_classification", "pair_regression")
METRICS = tuple(_METRIC_FNS)  # the metrics flaxpals.data.metrics computes
SPLITS = ("train", "dev", "test")
SOURCES = ("cs224n", "csv", "tfds")


@dataclasses.dataclass(frozen=True)
class Task:
    """One task. Frozen and hashable, so it can be a static argument of `jax.jit`.

    name: short name, used in logs, metrics and cache file names.
    kind: "classification" (one sentence), "pair_classification" or "pair_regression".
    num_labels: number of classes; 1 for regression.
    label_range: (low, high) of a regression label, inclusive; None for classification.
    metric: "accuracy" or "pearson".
    source: "cs224n" (a file of the CS224N data directory, also buildable with the
      TFDS builder `flaxpals.data.cs224n`), "csv" (local delimited files) or
      "tfds" (a TFDS dataset by name).
    splits: ((split, where), ...): a file name or path per split for "cs224n"/"csv",
      a TFDS split name (e.g. "validation") for "tfds".
    tfds_name: e.g. "glue/qqp" for source "tfds".
    id_field, text_field, text_pair_field, label_field: the column (or TFDS feature)
      names. id_field None numbers the examples ("<split>-<line>"); text_pair_field is
      None for single-sentence tasks.
    label_names: for classification labels given as strings, the class names in
      index order; None when labels are integers 0..num_labels-1.
    delimiter: column delimiter of local files; None sniffs it from the header row
      (a tab if the header has one, else a comma).
    """

    name: str
    kind: str
    num_labels: int
    label_range: tuple[float, float] | None
    metric: str
    source: str
    splits: tuple[tuple[str, str], ...]
    tfds_name: str | None = None
    id_field: str | None = "id"
    text_field: str = "sentence"
    text_pair_field: str | None = None
    label_field: str | None = "label"
    label_names: tuple[str, ...] | None = None
    delimiter: str | None = None
    description: str = ""

    def __post_init__(self):
        _validate(self)

    @property
    def is_pair(self) -> bool:
        return self.kind in ("pair_classification", "pair_regression")

    @property
    def is_regression(self) -> bool:
        return self.kind == "pair_regression"

    @property
    def split_names(self) -> tuple[str, ...]:
        return tuple(s for s, _ in self.splits)

    def split_source(self, split: str) -> str:
        """The file name/path (or TFDS split name) of `split`."""
        for name, where in self.splits:
            if name == split:
                return where
        raise ValueError(f"task {self.name!r} has no split {split!r}; it has "
                         f"{list(self.split_names)}")


def _validate(t: Task) -> None:
    where = f"task {t.name!r}"
    if not t.name or not isinstance(t.name, str):
        raise ValueError(f"a task needs a non-empty name, got {t.name!r}")
    if t.kind not in KINDS:
        raise ValueError(f"{where}: kind {t.kind!r} is not one of {KINDS}")
    if t.metric not in METRICS:
        raise ValueError(f"{where}: metric {t.metric!r} is not one of {METRICS}")
    if t.source not in SOURCES:
        raise ValueError(f"{where}: source {t.source!r} is not one of {SOURCES}")
    if t.is_pair and not t.text_pair_field:
        raise ValueError(f"{where}: a {t.kind} task needs a text_pair field")
    if not t.is_pair and t.text_pair_field:
        raise ValueError(f"{where}: a single-sentence task has no text_pair field")
    if t.is_regression:
        if t.num_labels != 1:
            raise ValueError(f"{where}: regression has num_labels 1, got {t.num_labels}")
        if (t.label_range is None or len(t.label_range) != 2
                or not float(t.label_range[0]) < float(t.label_range[1])):
            raise ValueError(f"{where}: regression needs label_range (low, high) with "
                             f"low < high, got {t.label_range!r}")
        if t.label_names:
            raise ValueError(f"{where}: regression labels have no names")
    else:
        if not isinstance(t.num_labels, int) or t.num_labels < 2:
            raise ValueError(f"{where}: classification needs num_labels >= 2, "
                             f"got {t.num_labels!r}")
        if t.label_range is not None:
            raise ValueError(f"{where}: classification has no label_range")
        if t.label_names is not None and len(t.label_names) != t.num_labels:
            raise ValueError(f"{where}: {len(t.label_names)} label_names for "
                             f"{t.num_labels} classes")
    for split, _ in t.splits:
        if split not in SPLITS:
            raise ValueError(f"{where}: split {split!r} is not one of {SPLITS}")
    if t.source == "tfds" and not t.tfds_name:
        raise ValueError(f"{where}: source 'tfds' needs tfds_name")
    if t.delimiter is not None and len(t.delimiter) != 1:
        raise ValueError(f"{where}: delimiter must be one character, got {t.delimiter!r}")


def _cs224n(name, kind, num_labels, label_range, metric, prefix, fields, label, description):
    text, pair = fields
    return Task(
        name=name, kind=kind, num_labels=num_labels, label_range=label_range, metric=metric,
        source="cs224n",
        splits=(("train", f"{prefix}-train.csv"), ("dev", f"{prefix}-dev.csv"),
                ("test", f"{prefix}-test-student.csv")),
        id_field="id", text_field=text, text_pair_field=pair, label_field=label,
        delimiter="\t", description=description)


BUILTIN: dict[str, Task] = {
    "sst": _cs224n("sst", "classification", 5, None, "accuracy", "ids-sst",
                   ("sentence", None), "sentiment",
                   "Stanford Sentiment Treebank, 5 classes (very negative .. very positive)"),
    "quora": _cs224n("quora", "pair_classification", 2, None, "accuracy", "quora",
                     ("sentence1", "sentence2"), "is_duplicate",
                     "Quora question pairs: is sentence2 a paraphrase of sentence1"),
    "sts": _cs224n("sts", "pair_regression", 1, (0.0, 5.0), "pearson", "sts",
                   ("sentence1", "sentence2"), "similarity",
                   "SemEval STS benchmark: similarity 0 (unrelated) .. 5 (equivalent)"),
    "cfimdb": _cs224n("cfimdb", "classification", 2, None, "accuracy", "ids-cfimdb",
                      ("sentence", None), "sentiment",
                      "CFIMDB movie reviews, binary sentiment"),
}

# Ready-made configs for online users (TFDS downloads GLUE on first use).
GLUE_CONFIGS: dict[str, dict[str, Any]] = {
    "glue/qqp": {"name": "qqp", "kind": "pair_classification", "num_labels": 2,
                 "tfds": "glue/qqp",
                 "fields": {"id": "idx", "text": "question1", "text_pair": "question2",
                            "label": "label"}},
    "glue/stsb": {"name": "stsb", "kind": "pair_regression", "label_range": [0.0, 5.0],
                  "tfds": "glue/stsb",
                  "fields": {"id": "idx", "text": "sentence1", "text_pair": "sentence2",
                             "label": "label"}},
    "glue/sst2": {"name": "sst2", "kind": "classification", "num_labels": 2,
                  "tfds": "glue/sst2",
                  "fields": {"id": "idx", "text": "sentence", "label": "label"}},
}

_FIELD_KEYS = {"id": "id_field", "text": "text_field", "text_pair": "text_pair_field",
               "label": "label_field"}


def _normalise(values: dict[str, Any]) -> dict[str, Any]:
    """Turns config-friendly values (dicts, lists) into Task's hashable ones."""
    out = dict(values)
    if out.get("splits") is not None:
        pairs = out["splits"].items() if isinstance(out["splits"], Mapping) else out["splits"]
        # Canonical order train, dev, test (a ConfigDict sorts its keys).
        rank = {s: i for i, s in enumerate(SPLITS)}
        out["splits"] = tuple(sorted(((str(k), str(v)) for k, v in pairs),
                                     key=lambda kv: rank.get(kv[0], len(rank))))
    if out.get("label_range") is not None:
        lo, hi = out["label_range"]
        out["label_range"] = (float(lo), float(hi))
    if out.get("label_names") is not None:
        out["label_names"] = tuple(str(x) for x in out["label_names"])
    return out


def _to_dict(cfg: Any) -> dict[str, Any]:
    if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict
        cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
        raise TypeError(f"a task config is a dict or ConfigDict, got {type(cfg).__name__}")
    return dict(cfg)


def get_task(name: str, overrides: Mapping[str, Any] | None = None) -> Task:
    """A builtin task ("sst", "quora", "sts", "cfimdb"), optionally with fields replaced.

    overrides: Task field values, e.g. {"splits": {"train": "my-sst-train.csv", ...}}.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in BUILTIN:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(BUILTIN)} "
                         "(declare others with tasks.task_from_config)")
    task = BUILTIN[key]
    if overrides:
        overrides = _to_dict(overrides)
        names = {f.name for f in dataclasses.fields(Task)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"task {name!r}: unknown override(s) {unknown}; "
                             f"Task fields: {sorted(names)}")
        task = dataclasses.replace(task, **_normalise(overrides))
    return task


def task_from_config(cfg: Mapping[str, Any] | Any) -> Task:
    """Declares a task from a dict/ConfigDict (see the module docstring for the format).

    Keys: name; kind; num_labels (classification) or label_range (regression);
    metric (default accuracy, pearson for regression); then either
    `tfds` (a TFDS name) with optional `splits` {split: tfds split}, default
    {"train": "train", "dev": "validation", "test": "test"}, or `files`
    {split: path} with optional `delimiter`; `fields` {id, text, text_pair, label};
    optional label_names, description. A config naming only a builtin task
    (plus Task-field overrides) gives that task.
    """
    cfg = _to_dict(cfg)
    if "name" not in cfg:
        raise ValueError(f"task config without a name: {cfg!r}")
    name = cfg.pop("name")
    if "tfds" not in cfg and "files" not in cfg:
        if str(name).lower() in BUILTIN:
            return get_task(name, overrides=cfg)
        raise ValueError(f"task config {name!r} is neither a builtin task ({sorted(BUILTIN)}) "
                         "nor declares a source: give `tfds` (a TFDS name) or `files` "
                         "({split: path})")
    if "tfds" in cfg and "files" in cfg:
        raise ValueError(f"task config {name!r}: give `tfds` or `files`, not both")
    allowed = {"kind", "num_labels", "label_range", "metric", "tfds", "files", "splits",
               "fields", "label_names", "delimiter", "description"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"task config {name!r}: unknown key(s) {unknown}; allowed: "
                         f"{sorted(allowed | {'name'})}")
    if "kind" not in cfg:
        raise ValueError(f"task config {name!r}: `kind` is required, one of {KINDS}")
    kind = cfg["kind"]
    fields = dict(cfg.get("fields") or {})
    bad = sorted(set(fields) - set(_FIELD_KEYS))
    if bad:
        raise ValueError(f"task config {name!r}: unknown field key(s) {bad}; "
                         f"allowed: {sorted(_FIELD_KEYS)}")
    if "text" not in fields:
        raise ValueError(f"task config {name!r}: fields.text (the sentence column) is required")
    values: dict[str, Any] = {
        "name": name, "kind": kind,
        "num_labels": cfg.get("num_labels", 1 if kind == "pair_regression" else None),
        "label_range": cfg.get("label_range"),
        "metric": cfg.get("metric", "pearson" if kind == "pair_regression" else "accuracy"),
        "id_field": fields.get("id"), "text_field": fields["text"],
        "text_pair_field": fields.get("text_pair"), "label_field": fields.get("label"),
        "label_names": cfg.get("label_names"), "delimiter": cfg.get("delimiter"),
        "description": cfg.get("description", ""),
    }
    if values["num_labels"] is None:
        raise ValueError(f"task config {name!r}: a {kind} task needs num_labels")
    if "tfds" in cfg:
        values.update(source="tfds", tfds_name=cfg["tfds"],
                      splits=cfg.get("splits") or {"train": "train", "dev": "validation",
                                                   "test": "test"})
    else:
        if cfg.get("splits") is not None:
            raise ValueError(f"task config {name!r}: with `files`, name the splits there")
        if not cfg["files"]:
            raise ValueError(f"task config {name!r}: `files` is empty")
        values.update(source="csv", splits=cfg["files"])
    return Task(**_normalise(values))


def tasks_of_config(config) -> list[Task]:
    """The tasks of a run config, in `config.tasks` order: builtin names, or names
    declared in `config.extra_tasks` (a declaration also overrides a builtin's fields).

    A bad declaration or an unknown name raises config_lib.ConfigError naming
    `config.extra_tasks.<name>` or `config.tasks`: the config's check of its tasks is
    this (config_lib.validate does not build them).
    """
    out = []
    for name in config.tasks:
        if name in config.extra_tasks:
            declared = _to_dict(config.extra_tasks[name])
            try:
                out.append(task_from_config({"name": name, **declared}))
            except (TypeError, ValueError) as e:
                raise config_lib.ConfigError(f"config.extra_tasks.{name}: {e}") from None
        else:
            try:
                out.append(get_task(name))
            except ValueError as e:
                raise config_lib.ConfigError(f"config.tasks: {e}") from None
    return out

