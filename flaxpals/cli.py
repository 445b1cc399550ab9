"""What every flaxpals command shares: quiet library logs and one-line errors.

flaxpals' own messages (logger "flaxpals.*") show at INFO, through absl's
handler on stderr; other libraries' (orbax, TensorFlow, ...) from WARNING up.

    if __name__ == "__main__":
        cli.run(main)      # absl's app.run; an error the user can fix exits with one line

`USER_ERRORS` are the errors whose message says what to fix (a config key, a
data file's line, a checkpoint that does not fit): they print `error: ...` and
exit 1, with no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging as std_logging
import sys
from collections.abc import Callable

from absl import app, logging

from flaxpals import checkpointing, config_lib, runs, weights
from flaxpals.datasets.reader import DataFormatError

USER_ERRORS = (config_lib.ConfigError, runs.ConfigMismatchError, DataFormatError,
               checkpointing.CheckpointMismatchError, weights.CheckpointError,
               FileNotFoundError)


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
        # Exit outside the except block: the traceback's frames are freed first, so
        # open batch iterators close before the interpreter shuts down.
        sys.exit(message)

    return wrapped


def run(main: Callable, extra: tuple[type[Exception], ...] = ()) -> None:
    app.run(guarded(main, extra))
