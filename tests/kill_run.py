"""`python -m flaxpals.main` that SIGKILLs itself once a given step is done.

    python tests/kill_run.py STEP --config=... --workdir=...   (the kill-and-resume test)

The kill comes at the trainer's next move after step STEP: the draw of the next step's
task(s) (`TaskSampler.next`) or, when STEP ends an epoch, that epoch's evaluation
(`loop.eval_record`). Every checkpoint is written before the trainer goes on
(`Checkpoints.save` waits for its files), so those saved up to STEP are on disk, as after
a crash; the training itself is unchanged.
"""

import os
import signal
import sys

from flaxpals import cli, main
from flaxpals.mtl.sampler import TaskSampler
from flaxpals.train import loop
from flaxpals.train.checkpointing import Checkpoints


def kill_after(step: int) -> None:
    drawn = [None]  # the step the sampler last drew

    def kill_if_done() -> None:
        if drawn[0] == step:
            os.kill(os.getpid(), signal.SIGKILL)

    save = Checkpoints.save

    def save_and_wait(self, *args, **kwargs):
        save(self, *args, **kwargs)
        self.wait()

    draw = TaskSampler.next

    def draw_unless_done(self):
        kill_if_done()
        chosen = draw(self)
        drawn[0] = self.step
        return chosen

    evaluate = loop.eval_record

    def evaluate_unless_done(*args, **kwargs):
        kill_if_done()
        return evaluate(*args, **kwargs)

    Checkpoints.save = save_and_wait
    TaskSampler.next = draw_unless_done
    loop.eval_record = evaluate_unless_done


if __name__ == "__main__":
    kill_after(int(sys.argv.pop(1)))
    cli.run(main.main)
