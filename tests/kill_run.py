"""`python -m flaxpals.main` that SIGKILLs itself right after a given step's checkpoint.

    python tests/kill_run.py STEP --config=... --workdir=...   (the kill-and-resume test)
"""

import os
import signal
import sys

from flaxpals import cli, main
from flaxpals.train import loop


def kill_after(step: int):
    def hook(done: int, checkpoints) -> None:
        if done == step:
            checkpoints.wait()  # the step's checkpoint is on disk, as after a real crash
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


if __name__ == "__main__":
    loop.AFTER_STEP_HOOKS.append(kill_after(int(sys.argv.pop(1))))
    cli.run(main.main)
