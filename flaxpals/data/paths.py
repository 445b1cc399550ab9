"""Where flaxpals reads its data files and where it writes what it derives from them.

    data_dir()    # the CS224N files (read, maybe read-only)
    cache_dir()   # token-id caches, prepared TFDS datasets, compiled XLA programs

`data_dir`, in order: an explicit argument (the `--config.data.data_dir` of a run), the
environment variable FLAXPALS_DATA_DIR, then a `shared/data/cs224n` folder
beside or above the current directory or this package's checkout (where the
project's machines keep the files, read-only).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "FLAXPALS_DATA_DIR"
_RELATIVE = Path("shared/data/cs224n")


def _candidates() -> list[Path]:
    starts = [Path.cwd(), Path(__file__).resolve().parent.parent]
    out = []
    for start in starts:
        for base in [start, *start.parents]:
            out.append(base / _RELATIVE)
    return out


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The directory holding the CS224N files (ids-sst-train.csv, ...)."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"data directory {str(path)!r} does not exist")
        return path
    if os.environ.get(ENV_VAR):
        path = Path(os.environ[ENV_VAR]).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{ENV_VAR}={str(path)!r} is not a directory")
        return path
    for path in _candidates():
        if (path / "ids-sst-dev.csv").exists():
            return path
    raise FileNotFoundError(
        f"no CS224N data directory found: set {ENV_VAR} or --config.data.data_dir; looked for "
        f"{_RELATIVE} above {Path.cwd()} and above the flaxpals package")


CACHE_ENV_VAR = "FLAXPALS_CACHE_DIR"


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """A writable directory for derived data (token-id caches, prepared TFDS datasets).

    In order: an explicit argument, the environment variable FLAXPALS_CACHE_DIR,
    then `$XDG_CACHE_HOME/flaxpals` (default `~/.cache/flaxpals`). Never the data
    directory, which may be read-only. Created if missing.
    """
    if explicit:
        path = Path(explicit).expanduser()
    elif os.environ.get(CACHE_ENV_VAR):
        path = Path(os.environ[CACHE_ENV_VAR]).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path = Path(base).expanduser() / "flaxpals"
    path.mkdir(parents=True, exist_ok=True)
    return path
