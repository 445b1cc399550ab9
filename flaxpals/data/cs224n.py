"""The CS224N minBERT files: where they live, their checksums, and TFDS builders.

Public home: https://github.com/gpoesia/minbert-default-final-project, folder
data/ (raw files under BASE_URL; override with FLAXPALS_CS224N_URL, e.g. a
mirror or a file:// URL). Every file is checked against SHA256 before use:

- against `SHA256SUMS` of the directory it sits in, when there is one (a
  mismatch raises: the file was modified or damaged);
- against KNOWN_SHA256, the official checksums (and those of the Quora stand-in
  of this project's machines, see shared/data/README.md). An unknown checksum
  is logged as a warning, not an error: the official Quora train and test
  files have never been seen here, so their checksums are not known.

TFDS: `Cs224n` is a GeneratorBasedBuilder with one config per task
("cs224n/sst", "cs224n/quora", "cs224n/sts", "cfimdb"). It reads the files from
the manual directory when they are there (the data directory, see
`flaxpals.data.paths.data_dir`) and downloads them otherwise; rows are parsed and
checked by `flaxpals.data.reader.read_file` (skipped rows are logged).
`prepare(name)` builds it under the cache directory (never the data directory):

    builder = cs224n.prepare("sst")             # or: python -m flaxpals.data sst
    ds = builder.as_dataset(split="dev")        # {"id", "sentence", "label", "line"}
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from flaxpals.data import paths, reader, tasks
from flaxpals.data.tf_util import import_tf

log = logging.getLogger(__name__)

BASE_URL = "https://raw.githubusercontent.com/gpoesia/minbert-default-final-project/main/data/"
URL_ENV_VAR = "FLAXPALS_CS224N_URL"

_OFFICIAL = "official"
_STAND_IN = "Quora stand-in carved from the official quora-dev.csv (shared/data/README.md)"
# file -> {sha256: what it is}. Sizes of the official files are in the docs.
KNOWN_SHA256: dict[str, dict[str, str]] = {
    "ids-cfimdb-dev.csv": {
        "3087f571b66860fe5d035b5a018d08202ad3fd3720e4821c04b2acf6c7ded559": _OFFICIAL},
    "ids-cfimdb-test-student.csv": {
        "7ae611548c9eac879e9ebb406cc9f8ae68ff12f78090e4965af5cbdfa06240f4": _OFFICIAL},
    "ids-cfimdb-train.csv": {
        "140fc513045a966109faed46a5c7a898767b96714d71bcb9c15f659129fadcea": _OFFICIAL},
    "ids-sst-dev.csv": {
        "a186ce94577635fbe10beaaddd50f16cccf6c30973221cefdf90deed2a584bfe": _OFFICIAL},
    "ids-sst-test-student.csv": {
        "bdd5a767faa0c26782117e37767ece154c30d5d04fb8727d09c71e3850a55c7b": _OFFICIAL},
    "ids-sst-train.csv": {
        "03b2b625c090f94a6afd59f114cde5282e2053aab0b101e87ed695d8a0c5b1df": _OFFICIAL},
    "sts-dev.csv": {
        "ce3cad6f16062586ac7ba462c28b010a9be10c530fd5074165860d7b7ab4e93d": _OFFICIAL},
    "sts-test-student.csv": {
        "dee455745b72e9ca3ff74e7c056bd73e34bad5b8d5641045a2c1e7e131866f47": _OFFICIAL},
    "sts-train.csv": {
        "15d12efc2d656fffb1d61ac1f08ec4227f43925fd16f420c037cbd063699c21b": _OFFICIAL},
    "quora-dev.csv": {
        "bfa3cc954a9ba300ae776a980141de65f622a3c1b97e3fd905d63245bc36d5ad": _OFFICIAL,
        "1fc82f2d9064bd33c29ec082ea2ded5e867869b3c355dbc712e1099135437d86": _STAND_IN},
    "quora-train.csv": {
        "7711f10d43be84c3c4ea0448b0ac7d847a46be39ac21fb4d070471b055f14869": _STAND_IN},
    "quora-test-student.csv": {},
}


class ChecksumError(ValueError):
    """A data file whose SHA256 differs from the one its directory declares."""


def base_url() -> str:
    url = os.environ.get(URL_ENV_VAR) or BASE_URL
    return url if url.endswith("/") else url + "/"


def _declared(directory: Path) -> dict[str, str]:
    """The SHA256SUMS of a directory: {file name: sha256} (empty if none)."""
    sums = directory / "SHA256SUMS"
    if not sums.exists():
        return {}
    out = {}
    for number, line in enumerate(sums.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ChecksumError(f"{sums}:{number}: expected 'sha256  name', got {line!r}")
        out[parts[1].lstrip("*")] = parts[0]
    return out


def verify(path: str | os.PathLike, name: str | None = None) -> str:
    """Checks a file's SHA256 (see the module docstring); returns what the file is.

    name: the file's CS224N name when `path` has another (a download cache entry).
    """
    path = Path(path)
    name = name or path.name
    digest = reader.sha256_file(path)
    declared = _declared(path.parent).get(path.name)
    if declared is not None and declared != digest:
        raise ChecksumError(f"{path}: sha256 {digest} differs from {declared} declared in "
                            f"{path.parent / 'SHA256SUMS'}: the file was modified or damaged")
    what = KNOWN_SHA256.get(name, {}).get(digest)
    if what is None:
        log.warning("%s: sha256 %s is not a known version of %s%s", path, digest, name,
                    "" if name in KNOWN_SHA256 else " (not a CS224N file name)")
        return "unknown"
    return what


def download(name: str, directory: str | os.PathLike | None = None) -> Path:
    """Downloads one CS224N file from `base_url()` into directory (default
    <cache>/cs224n), verifies it, returns its path. A file already there is reused."""
    if name not in KNOWN_SHA256:
        raise ValueError(f"{name!r} is not a CS224N file; known: {sorted(KNOWN_SHA256)}")
    directory = Path(directory) if directory else paths.cache_dir() / "cs224n"
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    if not target.exists():
        url = base_url() + name
        log.info("downloading %s", url)
        with tempfile.NamedTemporaryFile(dir=directory, delete=False) as tmp:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    shutil.copyfileobj(response, tmp)
            except OSError as e:
                os.unlink(tmp.name)
                raise FileNotFoundError(f"could not download {url}: {e}") from e
        os.replace(tmp.name, target)
    verify(target)
    return target


def locate(task: tasks.Task, split: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The file of a split of a "cs224n" or "csv" task.

    A relative name is looked up in the data directory (`paths.data_dir`). When
    no data directory is found and the file is a CS224N file, it is downloaded
    into the cache (online only). An absolute path is used as is.
    """
    where = task.split_source(split)
    if os.path.isabs(where):
        path = Path(where)
        if not path.exists():
            raise FileNotFoundError(f"task {task.name!r}, split {split!r}: {path} does not exist")
        return path
    try:
        directory = paths.data_dir(data_dir)
    except FileNotFoundError as missing:
        if data_dir is None and task.source == "cs224n":
            try:
                return download(where)
            except FileNotFoundError as e:  # offline: say where the files were looked for
                raise FileNotFoundError(f"{missing}; and {e}") from None
        raise
    path = directory / where
    if not path.exists():
        hint = ""
        if where == "quora-test-student.csv":
            hint = (" (the Quora files of this project's machines are a stand-in without a "
                    "test file, see shared/data/README.md)")
        raise FileNotFoundError(f"task {task.name!r}, split {split!r}: {path} does not "
                                f"exist{hint}")
    return path


# --------------------------------------------------------------------------- TFDS

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put the CS224N files (ids-sst-train.csv, ids-sst-dev.csv, ids-sst-test-student.csv,
quora-*.csv, sts-*.csv, ids-cfimdb-*.csv) in the manual directory, for instance by
cloning https://github.com/gpoesia/minbert-default-final-project and passing its
data/ folder. `flaxpals.data.cs224n.prepare` passes the flaxpals data
directory (flaxpals.data.paths.data_dir) as the manual directory. Without them the
builder downloads the files from {url}.
"""


def _features(task: tasks.Task):
    import tensorflow_datasets as tfds

    text = tfds.features.Text()
    feats = {"id": text, "line": tfds.features.Scalar(np.int32,
                                                     doc="1-based line in the source file")}
    if task.is_pair:
        feats.update(sentence1=text, sentence2=text)
    else:
        feats["sentence"] = text
    if task.is_regression:
        feats["label"] = tfds.features.Scalar(np.float32, doc="similarity; NaN on test")
    else:
        feats["label"] = tfds.features.Scalar(np.int32, doc="class; -1 on test")
    return tfds.features.FeaturesDict(feats)


def _make_builder_class():
    """Defines (and so registers) the TFDS builder; needs tensorflow_datasets."""
    import_tf()
    import tensorflow_datasets as tfds
    from etils import epath

    class Cs224n(tfds.core.GeneratorBasedBuilder):
        """The CS224N minBERT datasets: SST-5, Quora, STS, CFIMDB."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Rows checked by flaxpals.data.reader; defects skipped."}
        MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS.format(url=BASE_URL)
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=task.description)
                           for name, task in tasks.BUILTIN.items()]

        # tfds 4.9.10 finds a builder's source through `importlib_resources`, a
        # package it only declares for Python < 3.9; give the path directly.
        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            return epath.Path(__file__)

        @property
        def task(self) -> tasks.Task:
            return tasks.get_task(self.builder_config.name)

        def _info(self):
            return self.dataset_info_from_configs(
                features=_features(self.task),
                homepage="https://github.com/gpoesia/minbert-default-final-project",
                description=self.task.description)

        def _split_generators(self, dl_manager):
            files = {s: self.task.split_source(s) for s in self.task.split_names}
            try:
                manual = Path(str(dl_manager.manual_dir))
            except AssertionError:  # no manual directory: download
                manual = None
            if manual is not None:
                found = {s: manual / f for s, f in files.items() if (manual / f).exists()}
                missing = sorted(set(files) - set(found))
                if "train" in missing or "dev" in missing:
                    raise FileNotFoundError(f"{manual} lacks {[files[s] for s in missing]}\n"
                                            + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
                for s in missing:
                    log.warning("%s: no %s, the %s split is left out", manual, files[s], s)
                located = {s: (p, p.name) for s, p in found.items()}
            else:
                got = dl_manager.download({s: base_url() + f for s, f in files.items()})
                located = {s: (Path(str(got[s])), files[s]) for s in files}
            return {s: self._generate_examples(p, name, s) for s, (p, name) in located.items()}

        def _generate_examples(self, path, name, split):
            verify(path, name)
            parsed = reader.read_file(path, self.task, split)
            missing = np.float32("nan") if self.task.is_regression else -1
            for i, ex_id in enumerate(parsed.ids):
                ex = {"id": ex_id, "line": parsed.lines[i],
                      "label": parsed.labels[i] if parsed.labels is not None else missing}
                if self.task.is_pair:
                    ex.update(sentence1=parsed.texts[i], sentence2=parsed.text_pairs[i])
                else:
                    ex["sentence"] = parsed.texts[i]
                yield ex_id, ex

    return Cs224n


_BUILDER = None


def builder_class():
    """The registered TFDS builder class (`cs224n` in tfds.list_builders())."""
    global _BUILDER
    if _BUILDER is None:
        _BUILDER = _make_builder_class()
    return _BUILDER


def prepare(name: str, *, data_dir: str | os.PathLike | None = None,
            tfds_dir: str | os.PathLike | None = None, download: bool = True):
    """Builds "cs224n/<name>" and returns the builder (`.as_dataset(split=...)`).

    data_dir: the files (manual directory), default `paths.data_dir()`; when none
    is found the builder downloads them. tfds_dir: where TFDS writes the prepared
    dataset, default <cache>/tfds.
    """
    cls = builder_class()  # first: hides the GPUs from TensorFlow
    import tensorflow_datasets as tfds

    tfds_dir = Path(tfds_dir) if tfds_dir else paths.cache_dir() / "tfds"
    try:
        manual = paths.data_dir(data_dir)
    except FileNotFoundError:
        if data_dir is not None:
            raise
        manual = None
    builder = cls(config=name, data_dir=str(tfds_dir))
    if download:
        config = tfds.download.DownloadConfig(
            manual_dir=str(manual) if manual else str(tfds_dir / "downloads" / "no-manual-dir"))
        builder.download_and_prepare(download_config=config)
    return builder

