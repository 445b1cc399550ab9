"""SummaryWriter's event files, read back by TensorBoard's own event reader."""

import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flaxpals.train.summary_writer import SummaryWriter
from tests.conftest import TRAINED, epochs


def _scalars(logdir):
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_read_back_by_tensorboard(tmp_path):
    writer = SummaryWriter(tmp_path / "tb")
    writer.write_scalars(1, {"loss/sst": 1.5, "grad_norm": 0.25})
    writer.write_scalars(7, {"loss/sst": 0.75})
    writer.close()
    assert _scalars(tmp_path / "tb") == {"loss/sst": [(1, 1.5), (7, 0.75)],
                                         "grad_norm": [(1, 0.25)]}


def test_a_disabled_writer_writes_nothing(tmp_path):
    writer = SummaryWriter(tmp_path / "tb", enabled=False)
    writer.write_scalars(1, {"loss": 1.0})
    writer.close()
    assert writer.path is None and not (tmp_path / "tb").exists()


@TRAINED
def test_the_trained_run_logs_its_epochs_to_tensorboard(trained):
    _, workdir = trained
    scalars = _scalars(workdir / "tensorboard")
    for record in epochs(workdir):
        got = dict(scalars["dev/average"])[record["step"]]
        assert got == pytest.approx(record["dev/average"], rel=1e-6)
    assert "compile/programs" in scalars and any(t.startswith("loss/") for t in scalars)


def test_training_imports_no_tensorflow():
    # TensorFlow takes seconds to import; only a TFDS-sourced task should pay for it.
    code = ("import sys, flaxpals.main, flaxpals.train.loop, flaxpals.predict\n"
            "print(sorted(m for m in sys.modules if m.startswith(('tensorflow', 'clu'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_two_writers_in_one_second_keep_both_files(tmp_path):
    first = SummaryWriter(tmp_path / "tb")
    first.write_scalars(1, {"a": 1.0})
    first.close()
    second = SummaryWriter(tmp_path / "tb")
    second.write_scalars(2, {"a": 2.0})
    second.close()
    assert first.path != second.path
    assert _scalars(tmp_path / "tb") == {"a": [(1, 1.0), (2, 2.0)]}
