"""What every flaxpals command shares: quiet library logs and one-line errors.

flaxpals' own messages (logger "flaxpals.*") show at INFO, through absl's
handler on stderr; other libraries' (orbax, TensorFlow, ...) from WARNING up.

    if __name__ == "__main__":
        cli.run(main)      # absl's app.run; an error the user can fix exits with one line

`USER_ERRORS` are the errors whose message says what to fix (a config key, a
data file's line or checksum, a checkpoint that does not fit, a workdir another
trainer holds, a full disk): they print `error: ...` and exit 1, with no traceback.
An OSError for a full disk (ENOSPC, EDQUOT) from any write is one line too, naming
the file and the space left there. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import logging as std_logging
import os
import shutil
import sys
from collections.abc import Callable

from absl import app, logging

from flaxpals import config_lib, workdir_format
from flaxpals.data.cs224n import ChecksumError
from flaxpals.data.reader import DataFormatError
from flaxpals.model import hf_checkpoint
from flaxpals.train import checkpointing, workdir_lock

USER_ERRORS = (config_lib.ConfigError, workdir_format.ConfigMismatchError, DataFormatError,
               checkpointing.CheckpointMismatchError, checkpointing.BestUnknownError,
               checkpointing.DiskFullError, hf_checkpoint.CheckpointError, ChecksumError,
               workdir_lock.WorkdirLockedError, FileNotFoundError)


def disk_full_message(e: OSError) -> str:
    """One line for an OSError of a full disk: the file, and the space left there."""
    where = e.filename or "a file"
    free = ""
    if e.filename:
        folder = os.path.dirname(os.path.abspath(os.fspath(e.filename)))
        try:
            free = f" ({shutil.disk_usage(folder).free / 2**20:.1f} MB free there)"
        except OSError:
            pass
    return (f"disk full writing {where}{free}: {e.strerror or e}; free space there and "
            "run the same command again (training resumes from its last checkpoint)")


def guarded(main: Callable, extra: tuple[type[Exception], ...] = ()) -> Callable:
    """`main` with INFO logs from flaxpals, WARNING from the rest, and user errors turned
    into one line."""
    def wrapped(argv):
        logging.set_verbosity(logging.WARNING)
        std_logging.getLogger("flaxpals").setLevel(std_logging.INFO)
        try:
            return main(argv)
        except USER_ERRORS + extra as e:
            message = f"error: {e}"
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            message = f"error: {disk_full_message(e)}"
        # Exit outside the except block: the traceback's frames are freed first, so
        # open batch iterators close before the interpreter shuts down.
        sys.exit(message)

    return wrapped


def run(main: Callable, extra: tuple[type[Exception], ...] = ()) -> None:
    app.run(guarded(main, extra))
