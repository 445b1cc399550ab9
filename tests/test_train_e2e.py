"""End to end on the tiny random-init config and the real CS224N files."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import pytest

from flaxpals import config_lib
from flaxpals.model import build
from flaxpals.serve import eval_files
from flaxpals.train import loop
from flaxpals.train.checkpointing import Checkpoints
from tests.conftest import TRAINED, epochs, read_tsv, tiny

ROOT = Path(__file__).resolve().parent.parent


# The adapter and PCGrad runs compile steps of their own (about 90-100 s each on
# this project's 2-core machines), so they run in `make test-slow` and CI; the
# default suite trains PALs end to end in the trained_tiny_pal group below.
_SLOW = pytest.mark.slow


@pytest.mark.parametrize("name,method", [(("baseline", m)) for m in config_lib.METHODS]
                         + [pytest.param("pal", "sequential", marks=_SLOW),
                            pytest.param("lowrank", "sequential", marks=_SLOW),
                            pytest.param("pal", "pcgrad", marks=_SLOW)])
def test_every_method_lowers_the_loss_on_a_fixed_batch(tmp_path, name, method):
    # One batch per task (train_limit = batch size): the loss must go down.
    c = tiny(name, f"method={method}", **{"data.train_limit": 8, "train.num_epochs": 4,
                                            "train.steps_per_epoch": 6, "eval.train_sample": 8,
                                            "checkpoint.every_steps": 100})
    loop.train_and_evaluate(c, tmp_path)
    history = epochs(tmp_path)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    for task in c.tasks:
        seen = [r[f"loss/{task}"] for r in history if f"loss/{task}" in r]
        assert len(seen) >= 2, f"{task} trained in fewer than two epochs"
        assert seen[-1] < seen[0], f"{method}: {task} loss did not go down: {seen}"
    for key in ("dev/average", "dev/overall", "train/average", "dev/sst", "dev/sts"):
        assert np.isfinite(history[-1][key])
    accounting = json.loads((tmp_path / "params.json").read_text())
    if name == "pal":
        assert accounting["ratio_by_key"]["adapters"] > 1.0


@TRAINED
def test_eval_restores_the_best_checkpoint(trained):
    c, workdir = trained
    record = eval_files.evaluate_checkpoint(workdir)
    best = json.loads((workdir / "best.json").read_text())
    assert record["step"] == best["step"]
    # The same params on the same dev sample give the score recorded in training.
    logged = [r for r in epochs(workdir) if r["step"] == best["step"]][0]
    assert record["dev/average"] == pytest.approx(logged["dev/average"], abs=1e-6)
    # And the same train sample: eval.train_sample_from=random draws the same rows.
    assert record["train/average"] == pytest.approx(logged["train/average"], abs=1e-6)


@TRAINED
def test_predict_writes_every_id_once(trained):
    c, workdir = trained
    written = eval_files.write_predictions(workdir)
    names = sorted(p.name for p in written)
    assert names == ["para-dev-output.csv", "sst-dev-output.csv", "sst-test-output.csv",
                     "sts-dev-output.csv", "sts-test-output.csv"]  # no Quora test file here
    sources = {"sst-dev": "ids-sst-dev.csv", "sst-test": "ids-sst-test-student.csv",
               "para-dev": "quora-dev.csv", "sts-dev": "sts-dev.csv",
               "sts-test": "sts-test-student.csv"}
    headers = {"sst": "Predicted_Sentiment", "para": "Predicted_Is_Paraphrase",
               "sts": "Predicted_Similiarity"}
    for path in written:
        lines = path.read_text().splitlines()
        prefix = path.name.split("-")[0]
        assert lines[0] == f"id \t {headers[prefix]} "
        ids = [line.split(" , ")[0] for line in lines[1:]]
        expected = [r["id"] for r in read_tsv(sources[path.name.rsplit("-", 1)[0]])]
        assert len(ids) == len(set(ids)) == len(expected)
        assert set(ids) == set(expected)
        values = [float(line.split(" , ")[1]) for line in lines[1:]]
        if prefix == "sst":
            assert set(values) <= {0, 1, 2, 3, 4}
        if prefix == "para":
            assert set(values) <= {0, 1}


def _run_main(workdir, kill_after=None, *extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    entry = ["-m", "flaxpals.main"] if kill_after is None else ["tests/kill_run.py",
                                                                str(kill_after)]
    cmd = [sys.executable, *entry, "--config=configs/baseline.py:tiny",
           f"--workdir={workdir}", "--config.checkpoint.every_steps=4",
           f"--config.data.cache_dir={os.environ.get('FLAXPALS_TEST_CACHE', '')}", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _latest_params(workdir, c):
    model, params, *_ = build.build_model(c)
    ckpts = Checkpoints(workdir, 2)
    step, restored = ckpts.restore_params(params, "latest")
    ckpts.close()
    return step, jax.device_get(restored)


@pytest.mark.slow  # five subprocess runs: `make test-slow` and CI
def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path):
    # Tiny: 6 steps per epoch, 12 in all, a checkpoint every 4 steps and at
    # each epoch end. Killed at step 5: resumes mid-epoch from step 4.
    killed = _run_main(tmp_path / "a", 5)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = _run_main(tmp_path / "a")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from checkpoint step 4" in resumed.stderr
    # Killed at step 6, after the epoch-end checkpoint but before that epoch's
    # evaluation: the resumed run evaluates epoch 1 before it goes on.
    killed = _run_main(tmp_path / "c", 6)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "c" / "metrics.jsonl").exists()
    resumed = _run_main(tmp_path / "c")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from checkpoint step 6" in resumed.stderr
    assert "epoch 1 ended before its evaluation was written" in resumed.stderr
    straight = _run_main(tmp_path / "b")
    assert straight.returncode == 0, straight.stderr[-2000:]
    _assert_same_runs(tmp_path / "b", [tmp_path / "a", tmp_path / "c"], tiny())


def _assert_same_runs(reference, others, c, prefix="loss/"):
    """Each of `others` ends with `reference`'s params (step 12) and epoch lines."""
    step_b, b = _latest_params(reference, c)
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    for run in others:
        step_a, a = _latest_params(run, c)
        assert step_a == step_b == 12
        for path, leaf in jax.tree_util.tree_flatten_with_path(a)[0]:
            np.testing.assert_allclose(leaf, flat_b[path], atol=1e-6, rtol=0,
                                       err_msg=f"run {run}: {path}")
    # Every epoch has its line with the uninterrupted run's figures, the mean train
    # losses of the epoch that was cut included (their sums travel in the checkpoint).
    for run in others:
        lines, want_lines = epochs(run), epochs(reference)
        assert [r["epoch"] for r in lines] == [1, 2], run
        for got, want in zip(lines, want_lines, strict=True):
            assert set(got) == set(want), run
            assert any(k.startswith(prefix) for k in got), (run, prefix)
            for key, value in want.items():
                assert got[key] == pytest.approx(value, abs=1e-5), (run, key)


@pytest.mark.slow  # three subprocess runs: `make test-slow` and CI
def test_a_stateful_loss_weighting_resumes_as_if_uninterrupted(tmp_path):
    """FAMO keeps its logits, their Adam moments and the last losses in the optimiser
    state, and its weights' epoch sums (coef/<task>) travel with the loss sums: killed
    at step 5 and resumed from step 4's checkpoint, the run ends as one never killed."""
    extra = ("--config.train.method=additive", "--config.train.loss_weighting=famo")
    killed = _run_main(tmp_path / "a", 5, *extra)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = _run_main(tmp_path / "a", None, *extra)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from checkpoint step 4" in resumed.stderr
    straight = _run_main(tmp_path / "b", None, *extra)
    assert straight.returncode == 0, straight.stderr[-2000:]
    c = tiny()
    c.train.method, c.train.loss_weighting = "additive", "famo"
    _assert_same_runs(tmp_path / "b", [tmp_path / "a"], c, prefix="coef/")
    # FAMO's weights are a convex combination at every step, so their epoch means too.
    for r in epochs(tmp_path / "b"):
        assert sum(r[f"coef/{t}"] for t in c.tasks) == pytest.approx(1, abs=1e-5), r


@TRAINED
def test_corrupt_latest_checkpoint_falls_back(trained, caplog, tmp_path):
    c, original = trained
    workdir = tmp_path / "run"
    shutil.copytree(original, workdir)
    ckpts = Checkpoints(workdir, c.checkpoint.keep)
    steps = sorted(ckpts.latest.all_steps())
    assert len(steps) >= 2
    for f in (workdir / "checkpoints" / str(steps[-1]) / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    model, params, *_ = build.build_model(c)
    from flaxpals.train.optim import make_optimizer
    from flaxpals.train.steps import TrainState
    tx = make_optimizer(c.train, params, 10)
    target = TrainState(jax.numpy.zeros((), jax.numpy.int32), params, tx.init(params),
                        jax.random.key_data(jax.random.key(0)))
    step, state, sampler = ckpts.restore_latest(target)
    ckpts.close()
    assert step == steps[-2]
    assert sampler["step"] == steps[-2]
    out = caplog.text
    assert f"checkpoint step {steps[-1]} is unreadable" in out
    assert f"falling back to step {steps[-2]}" in out
    assert len(out.strip().splitlines()) == 1, out  # one clean line, no traceback
    # The unreadable step is kept aside, not deleted, and no longer blocks a new save.
    assert (workdir / "checkpoints-unreadable" / str(steps[-1])).is_dir()
    assert not (workdir / "checkpoints" / str(steps[-1])).exists()


def test_nan_loss_stops_the_run_naming_the_window_task_and_step(tmp_path):
    # Metrics are read every log_every_steps (2) and at checkpoints (every 4 steps).
    c = tiny(**{"train.learning_rate": 1e35, "train.schedule": "constant",
                "train.grad_clip": 0.0, "checkpoint.every_steps": 4})
    with pytest.raises(loop.TrainingError, match=r"non-finite loss or gradient in steps "
                       r"(\d+)-(\d+) \(first at step \d+, epoch 1\) for task\(s\) \w+") as e:
        loop.train_and_evaluate(c, tmp_path)
    first, last = map(int, e.value.args[0].split("steps ")[1].split(" ")[0].split("-"))
    assert last - first + 1 <= c.log_every_steps and last % c.log_every_steps == 0
    ckpts = Checkpoints(tmp_path, 2)
    # The last good state is kept: no checkpoint of a step after a non-finite loss.
    assert ckpts.latest.latest_step() is None or ckpts.latest.latest_step() < first
    ckpts.close()


def _host_reads(monkeypatch, stray=False) -> tuple[list, list]:
    """(reads outside loop.sync_point, reads inside it) of a jax.Array's value by the
    training loop's thread, from the loop's start on (every np.asarray, float(),
    .item() and jax.device_get of a jax.Array reads `ArrayImpl._value`).

    jax.transfer_guard_device_to_host would say the same on an accelerator; on a CPU,
    where device memory is host memory, it lets every read through. `stray`: the loop
    also reads its grad norm after every step (the control)."""
    from jax._src import array as jax_array

    state = {"thread": None, "inside": 0}
    outside, inside = [], []
    value = jax_array.ArrayImpl._value

    def read(self):
        if threading.get_ident() == state["thread"]:
            (inside if state["inside"] else outside).append(1)
        return value.fget(self)

    started, sync_point = loop.RunTimer.loop_started, loop.sync_point

    def loop_started(self):
        state["thread"] = threading.get_ident()
        started(self)

    @contextlib.contextmanager
    def counted():
        state["inside"] += 1
        try:
            with sync_point():
                yield
        finally:
            state["inside"] -= 1

    monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(read))
    monkeypatch.setattr(loop.RunTimer, "loop_started", loop_started)
    monkeypatch.setattr(loop, "sync_point", counted)
    if stray:
        step = loop.Programs.train

        def train_and_read(self, state, batches):
            state, metrics = step(self, state, batches)
            float(metrics["grad_norm"])
            return state, metrics

        monkeypatch.setattr(loop.Programs, "train", train_and_read)
    return outside, inside


def test_steps_between_the_loops_waits_read_nothing_from_the_device(tmp_path, monkeypatch):
    """The loop reads the device (metrics, checkpoints, evaluation) only at the first step,
    every log_every_steps and at checkpoints, so a step never waits for the one before."""
    c = tiny(**{"log_every_steps": 4, "checkpoint.every_steps": 100,
                "train.steps_per_epoch": 9, "train.num_epochs": 2})
    outside, inside = _host_reads(monkeypatch)
    loop.train_and_evaluate(c, tmp_path)
    assert [r["step"] for r in epochs(tmp_path)] == [9, 18]
    assert not outside
    assert inside  # the metrics, the checkpoints and the evaluations were read there


def test_the_host_read_counter_sees_a_stray_read(tmp_path, monkeypatch):
    c = tiny(**{"log_every_steps": 4, "checkpoint.every_steps": 100,
                "train.steps_per_epoch": 3, "train.num_epochs": 1, "eval.train_sample": 0})
    outside, _ = _host_reads(monkeypatch, stray=True)
    loop.train_and_evaluate(c, tmp_path)
    assert len(outside) == 3  # one per step


def test_cli_rejects_a_bad_override_naming_the_key(tmp_path):
    result = _run_main(tmp_path, None, "--config.train.lerning_rate=0.1")
    assert result.returncode != 0
    # One line naming the key and the known keys of its section, no traceback.
    assert result.stderr.strip().splitlines() == [
        "error: config.train.lerning_rate: unknown key; config.train has: "
        + ", ".join(sorted(config_lib.base().train.keys()))]
    result = _run_main(tmp_path, None, "--config.nosuchkey=1")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "error: config.nosuchkey: unknown key; config has: "
        + ", ".join(sorted(config_lib.base().keys())))
    result = _run_main(tmp_path, None, "--config.train.method=sideways")
    assert result.returncode != 0
    assert "config.train.method: 'sideways'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()  # rejected before any compute
