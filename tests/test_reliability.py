"""Faults a careful or a clumsy user causes, and what each must lead to (docs/reliability.md).

Every fault is injected from the outside: a file deleted, edited or cut short, a second
process, a full disk (the free space reported by a monkeypatched `shutil.disk_usage`,
or orbax's own ENOSPC error raised from its save), a signal. The fast tests drive the
library's pieces in this process; the slow ones run `python -m flaxpals.main`.
"""

import errno
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flaxpals import cli, config_lib, main, workdir_format
from flaxpals.data import reader
from flaxpals.data.tasks import get_task
from flaxpals.serve import eval_files, exporter
from flaxpals.serve.predictor import read_input
from flaxpals.train import checkpointing, loop, preemption, preflight, workdir_lock
from flaxpals.train.checkpointing import Checkpoints
from flaxpals.train.steps import TrainState
from tests.conftest import ROOT, TRAINED, tiny
from tests.test_preemption import SavedAt2

SST = get_task("sst")
QUORA = get_task("quora")


def _state(value: float = 0.0, size: int = 1000) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.full((size,), value)},
                      opt_state={}, rng=jnp.zeros((2,), jnp.uint32))


def _main(*args, stdin=None, timeout=600):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, input=stdin,
                          capture_output=True, timeout=timeout)


def _err(result) -> str:
    return result.stderr.decode(errors="replace")


# ---------------------------------------------------------------- 1. the best checkpoint


def test_a_missing_best_json_is_rewritten_from_what_best_holds(tmp_path):
    ckpts = Checkpoints(tmp_path, 2)
    ckpts.save_best(6, _state(1.0), {"step": 6}, 0.9, "dev/average")
    ckpts.close()
    (tmp_path / "best.json").unlink()
    ckpts = Checkpoints(tmp_path, 2)
    assert ckpts.best_score("dev/average") == 0.9  # not None: a worse epoch must not win
    ckpts.close()
    assert json.loads((tmp_path / "best.json").read_text()) == {
        "step": 6, "metric": "dev/average", "score": 0.9}


def test_a_best_json_that_disagrees_is_rewritten(tmp_path):
    ckpts = Checkpoints(tmp_path, 2)
    ckpts.save_best(6, _state(1.0), {"step": 6}, 0.9, "dev/average")
    (tmp_path / "best.json").write_text(json.dumps({"step": 12, "metric": "dev/average",
                                                    "score": 0.1}))
    assert ckpts.best_score("dev/average") == 0.9
    ckpts.close()
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 6


def test_an_old_best_checkpoint_takes_its_score_from_metrics_jsonl(tmp_path):
    """A step saved before scores were recorded in it, best.json gone: metrics.jsonl's line
    of that step has the score, under the metric asked for."""
    ckpts = Checkpoints(tmp_path, 2)
    ckpts.best.save(6, args=Checkpoints._args(_state(1.0), {"step": 6}), force=True)
    ckpts.best.wait_until_finished()
    workdir_format.append_metrics(tmp_path, {"epoch": 1, "step": 6, "dev/average": 0.7,
                                   "dev/sst": 0.4})
    assert ckpts.best_score("dev/average") == 0.7
    assert ckpts.best_score("dev/sst") == 0.4  # another eval.best_metric: its own figure
    ckpts.close()


def test_a_best_checkpoint_scored_nowhere_stops_training(tmp_path):
    ckpts = Checkpoints(tmp_path, 2)
    ckpts.best.save(6, args=Checkpoints._args(_state(1.0), {"step": 6}), force=True)
    ckpts.best.wait_until_finished()
    with pytest.raises(checkpointing.BestUnknownError, match=r"best/6: .*recorded nowhere.*mv "):
        ckpts.best_score("dev/average")
    ckpts.close()
    assert (tmp_path / "best" / "6").is_dir()


def _scripted_eval(monkeypatch, scores: list[float]) -> None:
    """train's eval_record giving these dev/average scores, one per epoch evaluated, so
    which epoch is best does not depend on the numerics."""
    left = list(scores)
    monkeypatch.setattr(loop, "eval_record", lambda *a, **k: {"dev/average": left.pop(0)})


class _Killed(Exception):
    pass


def test_training_keeps_the_better_best_when_best_json_is_lost(tmp_path, monkeypatch):
    """A run stopped at step 8, after epoch 1 (best, .9), best.json deleted, resumed: epoch
    2 scores .5 and must not replace best/6. A cut-short metrics line is repaired too."""
    c = tiny("baseline", **{"tasks": ("sst",), "train.num_epochs": 2,
                            "train.steps_per_epoch": 6, "checkpoint.every_steps": 4,
                            "eval.train_sample": 0, "compile_ahead": False})
    _scripted_eval(monkeypatch, [0.9])

    save = Checkpoints.save

    def stop_after_8(self, step, *args, **kwargs):  # the run ends right after step 8's save
        save(self, step, *args, **kwargs)
        if step == 8:
            self.wait()
            raise _Killed

    with monkeypatch.context() as m:
        m.setattr(Checkpoints, "save", stop_after_8)
        with pytest.raises(_Killed):
            loop.train_and_evaluate(c, tmp_path)
    assert sorted(os.listdir(tmp_path / "best")) == ["6"]
    (tmp_path / "best.json").unlink()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "st')  # a write cut short by the kill
    _scripted_eval(monkeypatch, [0.5])
    loop.train_and_evaluate(c, tmp_path)
    assert sorted(os.listdir(tmp_path / "best")) == ["6"]
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 6
    lines = workdir_format.read_metrics(tmp_path)
    assert [(r["epoch"], r["dev/average"]) for r in lines] == [(1, 0.9), (2, 0.5)]
    assert (tmp_path / "metrics.jsonl.unreadable").read_text() == '{"epoch": 2, "st\n'


# ---------------------------------------------------------------- 2. the workdir lock

HOLD = """
import sys, time
from flaxpals.train import workdir_lock
lock = workdir_lock.FileLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_trainer_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(workdir_lock.WorkdirLockedError) as e:
            workdir_lock.FileLock(tmp_path).acquire()
        message = str(e.value)
        assert f"host {socket.gethostname()}, pid {holder.pid}" in message
        assert f"kill -TERM {holder.pid}" in message and "\n" not in message
    finally:
        holder.kill()
        holder.wait()
    lock = workdir_lock.FileLock(tmp_path)  # the kernel freed it with the process
    lock.acquire()
    lock.release()


def _gs_fake(root: Path, monkeypatch):
    """etils' mock backend with gs://bucket/... kept under `root` (with TensorFlow
    installed etils picks its TF backend for gs:// over the mock: told it is not)."""
    from etils.epath import gpath, testing

    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)

    def local(path):
        text = os.fspath(path)
        return os.fspath(root / text[len("gs://"):]) if text.startswith("gs://") else text

    def one(fn, path, *args, **kwargs):
        return fn(local(path), *args, **kwargs)

    def two(fn, path, dst, *args, **kwargs):
        return fn(local(path), local(dst), *args, **kwargs)

    return testing.mock_epath(open=one, exists=one, isdir=one, listdir=one, makedirs=one,
                              mkdir=one, remove=one, rmtree=one, stat=one, glob=one,
                              rename=two, replace=two, copy=two)


def test_a_bucket_workdir_takes_a_lease_and_a_stale_one_is_taken_over(tmp_path, monkeypatch):
    with _gs_fake(tmp_path, monkeypatch):
        workdir = "gs://bucket/run"
        assert isinstance(workdir_lock.lock_for(workdir), workdir_lock.LeaseLock)
        first = workdir_lock.LeaseLock(workdir, settle_seconds=0.01)
        (tmp_path / "bucket" / "run").mkdir(parents=True)
        first.acquire()
        record = json.loads((tmp_path / "bucket/run/lock").read_text())
        assert (record["host"], record["pid"]) == (socket.gethostname(), os.getpid())
        with pytest.raises(workdir_lock.WorkdirLockedError) as e:
            workdir_lock.LeaseLock(workdir, settle_seconds=0.01).acquire()
        assert f"pid {os.getpid()}" in str(e.value)
        assert "delete gs://bucket/run/lock to break it now" in str(e.value)
        first.release()
        assert not (tmp_path / "bucket/run/lock").exists()
        # A holder that died without releasing: its lease, not renewed, goes stale.
        (tmp_path / "bucket/run/lock").write_text(json.dumps(
            {"host": "gone", "pid": 1, "renewed": time.time() - 3600}))
        taker = workdir_lock.LeaseLock(workdir, settle_seconds=0.01)
        taker.acquire()
        assert json.loads((tmp_path / "bucket/run/lock").read_text())["pid"] == os.getpid()
        taker.release()


# ---------------------------------------------------------------- 3. the model's fingerprint


def test_a_checkpoint_without_a_fingerprint_restores_with_a_log_line(tmp_path, caplog):
    old = Checkpoints(tmp_path, 2)  # as an earlier flaxpals saved it
    old.save_best(6, _state(2.0), {"step": 6}, 0.5, "dev/average")
    old.close()
    ckpts = Checkpoints(tmp_path, 2, workdir_format.fingerprint(tiny("pal")))
    with caplog.at_level("INFO", logger="flaxpals"):
        step, params = ckpts.restore_params({"w": np.zeros(1000, np.float32)})
    ckpts.close()
    assert step == 6 and float(params["w"][0]) == 2.0
    assert "records no model fingerprint" in caplog.text


def test_resuming_a_checkpoint_of_another_model_stops(tmp_path):
    saved = workdir_format.fingerprint(tiny("pal"))
    ckpts = Checkpoints(tmp_path, 2, saved)
    ckpts.save(4, _state(1.0), {"step": 4}, force=True)
    ckpts.close()
    other = workdir_format.fingerprint(tiny("pal", **{"model.adapter_heads": 3}))
    ckpts = Checkpoints(tmp_path, 2, other)
    with pytest.raises(checkpointing.CheckpointMismatchError,
                       match=r"model\.adapter_heads: 6 -> 3; resume with the config"):
        ckpts.restore_latest(_state())
    ckpts.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]  # nothing set aside


def _edit_config(workdir: Path, edit) -> None:
    path = workdir / "config.json"
    values = json.loads(path.read_text())
    edit(values)
    path.write_text(json.dumps(values))


EDITS = {
    "pooling": (lambda v: v["model"].update(pooling="cls"), "model.pooling: 'mean' -> 'cls'"),
    "kind": (lambda v: v["extra_tasks"].update(quora={
        "kind": "pair_regression", "num_labels": 1, "label_range": [0, 1], "metric": "pearson"}),
             "tasks.quora.kind: 'pair_classification' -> 'pair_regression'"),
    "heads": (lambda v: v["model"].update(adapter_heads=3), "model.adapter_heads: 6 -> 3"),
    "labels": (lambda v: v["extra_tasks"].update(quora={"num_labels": 3}),
               "tasks.quora.num_labels: 2 -> 3"),
}


@TRAINED
@pytest.mark.parametrize("edit", sorted(EDITS))
def test_a_config_json_edited_into_another_model_stops_every_restore(trained, tmp_path, edit):
    _, source = trained
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    change, field = EDITS[edit]
    _edit_config(workdir, change)
    from flaxpals.predict import Predictor
    from flaxpals.serve import ensemble

    for restore in (lambda: eval_files.evaluate_checkpoint(workdir),
                    lambda: Predictor.from_workdir(workdir),
                    lambda: exporter.export(workdir, tmp_path / "out"),
                    lambda: ensemble.evaluate_ensemble([str(workdir)], tmp_path / "ens")):
        with pytest.raises(checkpointing.CheckpointMismatchError) as e:
            restore()
        assert field in str(e.value) and "set these fields back" in str(e.value)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 4. a failed start


def test_a_missing_encoder_or_data_file_stops_before_the_workdir_is_touched(tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(config_lib.ConfigError,
                       match=r"^config\.model\.encoder: checkpoint directory '/nonexistent/dir' "):
        loop.train_and_evaluate(tiny("pal", **{"model.encoder": "/nonexistent/dir"}), workdir)
    empty = tmp_path / "data"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"task 'sst', split 'train': .*does not exist"):
        loop.train_and_evaluate(tiny("pal", **{"data.data_dir": str(empty)}), workdir)
    assert not workdir.exists()


def test_a_workdir_without_checkpoints_takes_a_corrected_config(tmp_path):
    """A run that failed before its first checkpoint (its config.json written by an
    earlier flaxpals) does not make the corrected command look like another model."""
    workdir_format.write_config(tmp_path, tiny("pal", **{"model.encoder": "/nonexistent/dir"}))
    loop._save_config(tmp_path, tiny("pal"))
    assert workdir_format.read_config(tmp_path).model.encoder == "tiny"
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)  # with a checkpoint it is refused
    with pytest.raises(workdir_format.ConfigMismatchError, match="use a new --workdir"):
        loop._save_config(tmp_path, tiny("pal", **{"model.pooling": "cls"}))


# ---------------------------------------------------------------- 5. the eval record's rows


@TRAINED
def test_an_eval_record_counts_rows_read_scored_and_skipped(trained, tmp_path):
    _, source = trained
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    path = tmp_path / "half.csv"
    rows = ["id,sentence,sentiment"] + [f"r{i},{'a fine film' if i % 2 == 0 else ''},{i % 5}"
                                        for i in range(40)]
    path.write_text("\n".join(rows) + "\n")
    record = eval_files.evaluate_checkpoint(workdir, eval_file=str(path), task="sst")
    assert record["rows"] == {"dev/sst": {"read": 40, "skipped": 20, "kept": 20, "scored": 20,
                                          "skipped_by_reason": {"empty_sentence": 20}}}
    saved = json.loads((workdir / f"eval-{record['step']}-half.json").read_text())
    assert saved["rows"] == record["rows"]
    # The run's own data: the eval limit scores 48 of SST dev's 1,101 rows.
    assert eval_files.evaluate_checkpoint(workdir)["rows"]["dev/sst"] == {
        "read": 1101, "skipped": 0, "kept": 1101, "scored": 48, "skipped_by_reason": {}}


# ---------------------------------------------------------------- 6. a full disk


def test_a_save_that_would_not_fit_stops_naming_path_space_and_last_checkpoint(tmp_path,
                                                                              monkeypatch):
    ckpts = Checkpoints(tmp_path, 2)
    ckpts.save(4, _state(1.0, 100_000), {"step": 4}, force=True)
    ckpts.wait()
    size = sum(f.stat().st_size for f in (tmp_path / "checkpoints" / "4").rglob("*")
               if f.is_file())
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: usage._replace(free=size // 2))
    with pytest.raises(checkpointing.DiskFullError) as e:
        ckpts.save(8, _state(2.0, 100_000), {"step": 8}, force=True)
    message = str(e.value)
    assert message.startswith(f"disk full: {tmp_path / 'checkpoints'} has ")
    assert "checkpoint step 8 needs about" in message
    assert f"the last good checkpoint is step 4 ({tmp_path / 'checkpoints' / '4'})" in message
    assert "run the same command again to resume" in message and "\n" not in message
    ckpts.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]  # nothing partial


TENSORSTORE_ENOSPC = ('RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local '
                      'file "{}": Failed to write 430080 bytes to file 5: No space left on '
                      "device [os_error_code='28']")


def test_a_save_that_failed_for_space_removes_its_partial_step(tmp_path, monkeypatch):
    ckpts = Checkpoints(tmp_path, 2)
    ckpts.save(4, _state(1.0), {"step": 4}, force=True)
    ckpts.wait()

    def full(self, step, *args, **kwargs):  # as orbax fails when tensorstore hits ENOSPC
        partial = Path(self.directory) / f"{step}.orbax-checkpoint-tmp"
        partial.mkdir()
        (partial / "d").write_bytes(b"x" * 1000)
        raise ValueError(TENSORSTORE_ENOSPC.format(partial))

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(checkpointing.DiskFullError) as e:
        ckpts.save(8, _state(2.0), {"step": 8}, force=True)
    message = str(e.value)
    assert "failed (No space left on device)" in message
    assert "removed the partial 8.orbax-checkpoint-tmp" in message
    assert "the last good checkpoint is step 4" in message
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]


def test_any_other_write_to_a_full_disk_is_one_line(tmp_path):
    def writes():
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))

    with pytest.raises(SystemExit) as e:
        cli.guarded(lambda argv: writes())([])
    assert str(e.value).startswith(f"error: disk full writing {tmp_path / 'metrics.jsonl'} (")
    assert "MB free there): No space left on device" in str(e.value)


# ---------------------------------------------------------------- 7. a bad checksum


def test_a_data_file_that_fails_its_checksum_is_one_line_and_writes_nothing(tmp_path):
    from flaxpals.data import paths

    data = tmp_path / "data"
    shutil.copytree(paths.data_dir(), data)
    (data / "ids-sst-dev.csv").chmod(0o644)
    with open(data / "ids-sst-dev.csv", "a") as f:
        f.write("extra\tline\n")
    result = _main("flaxpals.main", "--config=configs/pal.py:tiny",
                   f"--config.data.data_dir={data}", f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 1
    err = _err(result).strip().splitlines()
    assert err[-1].startswith(f"error: {data / 'ids-sst-dev.csv'}: sha256 ")
    assert "differs from" in err[-1] and "Traceback" not in _err(result)
    assert not (tmp_path / "run").exists()


def test_preflight_checks_the_checksum_before_anything_is_written(tmp_path):
    from flaxpals.data import paths
    from flaxpals.data.cs224n import ChecksumError

    data = tmp_path / "data"
    shutil.copytree(paths.data_dir(), data)
    (data / "sts-train.csv").chmod(0o644)
    (data / "sts-train.csv").write_bytes((data / "sts-train.csv").read_bytes()[:-10])
    with pytest.raises(ChecksumError, match=r"sts-train\.csv: sha256 .* differs"):
        preflight.check(tiny("pal", **{"data.data_dir": str(data)}))


# ---------------------------------------------------------------- 8. a cut-short metrics line


def test_a_cut_short_last_metrics_line_is_skipped_then_set_aside(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "step": 6}\n{"epoch": 2, "st')
    with caplog.at_level("WARNING", logger="flaxpals"):
        assert workdir_format.read_metrics(tmp_path) == [{"epoch": 1, "step": 6}]
    assert "metrics.jsonl:2: the last line is cut short" in caplog.text
    workdir_format.repair_records(tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 1, "step": 6}\n'
    assert (tmp_path / "metrics.jsonl.unreadable").read_text() == '{"epoch": 2, "st\n'
    workdir_format.append_metrics(tmp_path, {"epoch": 2, "step": 12})
    assert [r["epoch"] for r in workdir_format.read_metrics(tmp_path)] == [1, 2]


def test_a_damaged_metrics_line_before_the_last_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n')
    with pytest.raises(config_lib.ConfigError, match=r"metrics\.jsonl:2: not a JSON record"):
        workdir_format.read_metrics(tmp_path)


# ---------------------------------------------------------------- 9, 10. exports


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    exporter.export(trained[1], out)
    return out


@TRAINED
@pytest.mark.parametrize("name", ["tasks.safetensors", "flaxpals.json", "model.safetensors"])
def test_a_damaged_export_names_its_file_and_the_fix(exported, tmp_path, name):
    copy = tmp_path / "model"
    shutil.copytree(exported, copy)
    data = (copy / name).read_bytes()
    (copy / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(exporter.ExportError) as e:
        exporter.restore_exported(copy)
    message = str(e.value)
    assert str(copy / name) in message
    assert f"export the run again (python -m flaxpals.export --workdir=RUN --out={copy} " \
           "--overwrite)" in message


@TRAINED
def test_export_refuses_a_non_empty_directory_or_a_file_and_replaces_whole(trained, tmp_path,
                                                                            monkeypatch):
    _, workdir = trained
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(config_lib.ConfigError, match=r"is not empty \(1 entries: notes\.txt\); "
                       r"give a new directory, or --overwrite"):
        exporter.export(workdir, out)
    assert (out / "notes.txt").read_text() == "my notes"
    with pytest.raises(config_lib.ConfigError, match=r"notes\.txt is a file; give a directory"):
        exporter.export(workdir, out / "notes.txt")
    # A failure half-way leaves the directory as it was, and no temporary one.
    real = exporter._write

    def half(r, source, target):
        (target / "README.md").parent.mkdir(parents=True, exist_ok=True)
        (target / "README.md").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(exporter, "_write", half)
    with pytest.raises(OSError):
        exporter.export(workdir, out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["mine"]
    assert sorted(os.listdir(out)) == ["notes.txt"]
    monkeypatch.setattr(exporter, "_write", real)
    exporter.export(workdir, out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / exporter.META_FILE).exists()
    assert sorted(os.listdir(tmp_path)) == ["mine"]


def test_the_export_command_names_a_file_given_as_out(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("x")
    result = _main("flaxpals.export", f"--workdir={tmp_path}", f"--out={target}")
    assert result.returncode == 1
    assert _err(result).strip().splitlines()[-1] == (
        f"error: --out={target} is a file; give a directory to export to")


# ---------------------------------------------------------------- 11, 12 and the smaller:
# predict's input


def _csv(path: Path, body: bytes) -> str:
    path.write_bytes(body)
    return str(path)


def test_invalid_utf8_early_in_a_file_skips_the_row_or_names_the_line(tmp_path):
    path = _csv(tmp_path / "in.csv", b"id,text\na,fine\nb,caf\xe9 bad\nc,good\n")
    parsed, _ = read_input(path, SST)
    assert parsed.ids == ["a", "c"] and parsed.skip_counts == {"bad_encoding": 1}
    with pytest.raises(reader.DataFormatError, match=rf"^{path}:3: bad_encoding: "):
        read_input(path, SST, strict=True)


def test_invalid_utf8_in_jsonl_and_stdin_is_skipped_and_counted(tmp_path):
    path = _csv(tmp_path / "in.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n{"te\n')
    parsed, _ = read_input(path, SST)
    assert parsed.texts == ["fine"]
    assert parsed.skip_counts == {"bad_encoding": 1, "bad_json": 1}
    with pytest.raises(reader.DataFormatError, match=rf"^{path}:2: bad_encoding: "):
        read_input(path, SST, strict=True)
    stdin = io.BytesIO(b"fine\ncaf\xe9\n\xe2\x80\x8b\xe2\x80\x8b\nhow\tare you\n")
    parsed, _ = read_input("-", SST, stdin=stdin)
    assert parsed.texts == ["fine", "how\tare you"]
    assert parsed.skip_counts == {"bad_encoding": 1, "empty_sentence": 1}  # zero-width line
    with pytest.raises(reader.DataFormatError, match=r"^<stdin>:2: bad_encoding: "):
        read_input("-", SST, stdin=io.BytesIO(b"fine\ncaf\xe9\n"), strict=True)


def test_a_columns_flag_naming_a_missing_column_names_it(tmp_path):
    path = _csv(tmp_path / "in.csv", b"id,review\na,fine\n")
    with pytest.raises(reader.DataFormatError,
                       match=r"no column 'body' \(--columns=text=body\) in \['id', 'review'\]"):
        read_input(path, SST, {"text": "body"})


def test_a_txt_file_is_plain_lines(tmp_path):
    path = _csv(tmp_path / "notes.txt", b"a fine film\nid,text\n\nhow old?\twhat age?\n")
    parsed, named = read_input(path, SST)
    assert parsed.texts == ["a fine film", "id,text", "how old?\twhat age?"] and not named
    assert parsed.lines == [1, 2, 4]
    parsed, _ = read_input(path, QUORA)
    assert parsed.text_pairs == ["what age?"] and parsed.skip_counts == {"empty_sentence": 3}


def test_repeated_ids_are_all_predicted_and_counted(tmp_path):
    path = _csv(tmp_path / "in.csv", b"id,text\nx,one\nx,two\ny,three\n")
    parsed, named = read_input(path, SST)
    assert parsed.ids == ["x", "x", "y"] and parsed.texts == ["one", "two", "three"]
    assert parsed.notes == {"duplicate_id": 1} and named


def test_the_reader_says_when_a_row_has_two_reasons(caplog):
    records = [(2, "a", "", None, ""), (3, "b", "ok", None, ""), (4, "c", "fine", None, "1")]
    with caplog.at_level("INFO", logger="flaxpals"):
        parsed = reader.read_records(records, SST, "dev", "f.csv", labelled=True)
    assert parsed.num_skipped == 2
    assert parsed.skip_counts == {"empty_sentence": 1, "empty_label": 2}
    assert ("f.csv: 3 rows, kept 1, skipped 2 (empty_sentence: 1, empty_label: 2; 1 row "
            "with more than one reason, counted under each)") in caplog.text


@TRAINED
def test_the_predict_command_skips_bad_bytes_on_stdin(trained):
    result = _main("flaxpals.predict", f"--workdir={trained[1]}", "--task=sst",
                   stdin=b"a fine film\ncaf\xe9\nawful\n")
    assert result.returncode == 0, _err(result)[-2000:]
    out = result.stdout.decode().splitlines()
    assert [line.split(",")[0] for line in out[1:]] == ["1", "3"]
    assert "sst: 2 of 3 rows predicted; skipped {'bad_encoding': 1}" in _err(result)
    strict = _main("flaxpals.predict", f"--workdir={trained[1]}", "--task=sst", "--strict",
                   stdin=b"a fine film\ncaf\xe9\n")
    assert strict.returncode == 1
    assert _err(strict).strip().splitlines()[-1].startswith("error: <stdin>:2: bad_encoding: ")


# ---------------------------------------------------------------- 13. SIGHUP


def _refuse(signum, frame):
    raise AssertionError("the Stopper's handler should have taken this signal")


@pytest.fixture
def hup_handler():
    saved = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    for s in saved:
        signal.signal(s, _refuse)
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_sighup_stops_as_sigterm_does(hup_handler, capfd):
    with preemption.Stopper() as stop:
        stop.install()
        assert stop.check(1) is False
        signal.raise_signal(signal.SIGHUP)
        assert stop.check(2) is True and stop.code == preemption.SIGTERM
        stopped = stop.stopped(2, SavedAt2())
    assert stopped.exit_code == 143
    assert str(stopped).startswith("stopped by SIGHUP at step 2: checkpoint step 2 saved")
    assert signal.getsignal(signal.SIGHUP) is _refuse  # put back
    assert "SIGHUP received: finishing the step in flight" in capfd.readouterr().err


# ---------------------------------------------------------------- workdir overrides


def test_overrides_without_config_apply_to_the_workdirs_config(tmp_path):
    argv = ["prog", "--workdir=W", "--mode=eval", "--config.data.data_dir=/d",
            "--config.eval.batch_size=8", "--noconfig.data.strict"]
    kept, overrides = main.split_overrides(argv)
    assert kept == ["prog", "--workdir=W", "--mode=eval"]
    assert overrides == [("data.data_dir", "/d"), ("eval.batch_size", "8"),
                         ("data.strict", "false")]
    assert main.split_overrides(["prog", "--config=c.py", "--config.seed=1"])[1] == []
    workdir_format.write_config(tmp_path, tiny("pal"))
    config = main.workdir_config(str(tmp_path), overrides)
    assert (config.data.data_dir, config.eval.batch_size, config.data.strict) == ("/d", 8, False)
    with pytest.raises(config_lib.ConfigError, match=r"--config\.eval\.batch_size=many: not a"):
        main.workdir_config(str(tmp_path), [("eval.batch_size", "many")])
    pooled = main.workdir_config(str(tmp_path), [("model.pooling", "cls")])
    with pytest.raises(workdir_format.ConfigMismatchError, match="model.pooling: 'mean' -> 'cls'"):
        workdir_format.config_for_restore(tmp_path, pooled)


@TRAINED
def test_eval_takes_a_data_dir_override_without_config(trained, tmp_path):
    from flaxpals.data import paths

    data = tmp_path / "other"
    shutil.copytree(paths.data_dir(), data)
    workdir = tmp_path / "run"
    shutil.copytree(trained[1], workdir)
    result = _main("flaxpals.main", f"--workdir={workdir}", "--mode=eval",
                   f"--config.data.data_dir={data}")
    assert result.returncode == 0, _err(result)[-2000:]
    step = workdir_format.read_best(workdir)["step"]
    assert (workdir / f"eval-{step}-other.json").exists()


# ---------------------------------------------------------------- slow: real processes

RUN_FLAGS = ("--config=configs/baseline.py:tiny", "--config.checkpoint.every_steps=3",
             f"--config.data.cache_dir={os.environ.get('FLAXPALS_TEST_CACHE', '')}")


def _trainer(workdir: Path, name: str, *flags: str, **popen) -> subprocess.Popen:
    log = open(workdir.parent / f"{name}.log", "w")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "flaxpals.main", *RUN_FLAGS,
                             f"--workdir={workdir}", *flags], cwd=ROOT, env=env,
                            stdout=popen.pop("stdout", log), stderr=popen.pop("stderr", log),
                            **popen)


def _log(workdir: Path, name: str) -> str:
    return (workdir.parent / f"{name}.log").read_text(errors="replace").replace("\r", "\n")


@pytest.mark.slow
def test_two_trainers_on_one_workdir(tmp_path):
    workdir = tmp_path / "run"
    both = [_trainer(workdir, f"t{i}") for i in range(2)]
    codes = sorted(p.wait(timeout=600) for p in both)
    assert codes == [0, 1], [_log(workdir, f"t{i}")[-2000:] for i in range(2)]
    refused = next(f"t{i}" for i, p in enumerate(both) if p.returncode == 1)
    last = _log(workdir, refused).strip().splitlines()[-1]
    assert last.startswith(f"error: workdir {workdir} is in use by a flaxpals trainer: host ")
    assert "Traceback" not in _log(workdir, refused)
    assert [r["epoch"] for r in workdir_format.read_metrics(workdir)] == [1, 2]
    # One started while another trains is refused too, and leaves the run alone.
    again = tmp_path / "again"
    first = _trainer(again, "first")
    deadline = time.monotonic() + 300
    while not (again / "checkpoints").is_dir() and time.monotonic() < deadline:
        time.sleep(0.1)
    second = _trainer(again, "second")
    assert second.wait(timeout=600) == 1
    assert f"pid {first.pid}" in _log(again, "second")
    assert first.wait(timeout=600) == 0
    assert [r["epoch"] for r in workdir_format.read_metrics(again)] == [1, 2]


def _mount_tmpfs(path: Path, megabytes: int) -> bool:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs",
                           str(path)], capture_output=True)
    return done.returncode == 0


@pytest.mark.slow
def test_a_full_disk_stops_in_one_line_and_the_run_resumes(tmp_path):
    """On a real 15 MB tmpfs (needs root to mount; skipped otherwise): a checkpoint of the
    tiny baseline is about 9 MB, so the second save (step 6) does not fit."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, 15):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        workdir = disk / "run"
        run = _trainer(workdir, "full")
        assert run.wait(timeout=600) == 1
        out = _log(workdir, "full")
        assert out.strip().splitlines()[-1].startswith(f"error: disk full: {workdir}/checkpoints "
                                                       "has ")
        assert "Traceback" not in out and out.count("error:") == 1
        assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
        subprocess.run(["mount", "-o", "remount,size=60m", str(disk)], check=True)
        resumed = _trainer(workdir, "resumed")
        assert resumed.wait(timeout=600) == 0, _log(workdir, "resumed")[-2000:]
        assert "resumed from checkpoint step 3 (epoch 1)" in _log(workdir, "resumed")
        assert [r["epoch"] for r in workdir_format.read_metrics(workdir)] == [1, 2]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.slow
def test_sighup_from_a_closed_terminal_saves_the_step_reached(tmp_path):
    """The run's stdout and stderr are a terminal that goes away (an ssh session closed);
    then SIGHUP. The step in flight is saved, exit 143, and the run resumes."""
    import pty

    workdir = tmp_path / "run"
    master, slave = pty.openpty()
    run = _trainer(workdir, "hup", stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    deadline = time.monotonic() + 600
    chunks = []
    while time.monotonic() < deadline:
        ckpts = workdir / "checkpoints"
        if ckpts.is_dir() and any(p.name.split(".")[0] == "3" for p in ckpts.iterdir()):
            break
        try:  # keep the terminal drained until it hangs up
            import select

            if select.select([master], [], [], 0.05)[0]:
                chunks.append(os.read(master, 65536))
        except OSError:
            break
    run.send_signal(signal.SIGHUP)
    fd2, deadline = f"/proc/{run.pid}/fd/2", time.monotonic() + 60
    while os.path.exists(fd2) and os.readlink(fd2) != os.devnull:
        assert time.monotonic() < deadline, "the handler never left the terminal"
        time.sleep(0.01)
    os.close(master)  # the terminal goes away: writes to it would now fail
    assert run.wait(timeout=120) == 143
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] in (4, 5), steps  # the step reached, not the periodic 3
    assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
    resumed = _trainer(workdir, "resumed")
    assert resumed.wait(timeout=600) == 0, _log(workdir, "resumed")[-2000:]
    assert f"resumed from checkpoint step {steps[-1]} (epoch 1)" in _log(workdir, "resumed")
