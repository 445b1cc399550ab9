"""Prediction-time ensembles (flaxpals/serve/ensemble.py): the averaging against its formula,
two trained tiny runs scored, predicted and written as one, and the mismatches named."""

import io
import json
import shutil

import numpy as np
import pytest

from flaxpals import workdir_format
from flaxpals.predict import Predictor, predict_file
from flaxpals.serve import ensemble, eval_files
from flaxpals.serve.ensemble import Ensemble, EnsembleError, combine
from flaxpals.train import loop
from tests.conftest import TRAINED, read_tsv, tiny

# ---------------------------------------------------------------- the averaging


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("members", [1, 2, 5])
def test_combine_averages_probabilities_and_scores(members):
    rng = np.random.default_rng(members)
    logits = [rng.normal(0, 3, (40, 5)).astype(np.float32) for _ in range(members)]
    out = combine("classification", logits)
    want = np.mean([_softmax(x.astype(np.float64)) for x in logits], axis=0)
    np.testing.assert_allclose(_softmax(out.astype(np.float64)), want, atol=1e-6)
    assert (out.argmax(-1) == want.argmax(-1)).all()

    pair = [rng.normal(0, 4, 40).astype(np.float32) for _ in range(members)]
    p = np.mean([1 / (1 + np.exp(-x.astype(np.float64))) for x in pair], axis=0)
    got = combine("pair_classification", pair)
    np.testing.assert_allclose(1 / (1 + np.exp(-got.astype(np.float64))), p, atol=1e-6)
    assert ((got > 0) == (p > 0.5)).all()

    scores = [rng.uniform(0, 5, 40).astype(np.float32) for _ in range(members)]
    np.testing.assert_allclose(combine("pair_regression", scores), np.mean(scores, 0), atol=1e-6)


def test_combine_averages_probabilities_not_logits():
    # One member sure of class 0, two fairly sure of class 1: the mean probability
    # picks class 1 (.635), the mean logit would pick class 0 (3.3 against 2).
    members = [np.array([[10.0, 0.0]]), np.array([[0.0, 3.0]]), np.array([[0.0, 3.0]])]
    assert combine("classification", members).argmax() == 1
    assert np.mean(members, 0).argmax() == 0
    # Saturated members keep a finite, decided output.
    out = combine("pair_classification", [np.array([200.0]), np.array([150.0])])
    assert np.isfinite(out).all() and out[0] > 0
    with pytest.raises(ValueError, match="differ in shape"):
        combine("pair_regression", [np.zeros(3), np.zeros(4)])


# ---------------------------------------------------------------- mismatched members


def test_members_with_other_tasks_are_named_before_any_compute(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (a, b, c):
        d.mkdir()
    workdir_format.write_config(a, tiny("pal"))
    workdir_format.write_config(b, tiny("pal", tasks=("sst",)))
    other = tiny("pal")
    other.extra_tasks.sst = {"num_labels": 3}
    workdir_format.write_config(c, other)
    with pytest.raises(EnsembleError, match=rf"member {b} has tasks \['sst'\]"):
        ensemble.evaluate_ensemble([str(a), str(b)], tmp_path / "out")
    with pytest.raises(EnsembleError, match=r"task 'sst' otherwise .*num_labels: 5 -> 3"):
        ensemble.evaluate_ensemble([str(a), str(c)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_split_some_members_lack_is_named():
    found = ensemble._Outputs()
    ids, labels = np.array(["a", "b"], object), np.array([0, 1])
    found.add("runs/s0", "sts", "test", ids, None, np.zeros(2))
    found.add("runs/s0", "sst", "dev", ids, labels, np.zeros((2, 5)))
    found.add("runs/s1", "sst", "dev", ids, labels, np.zeros((2, 5)))
    with pytest.raises(EnsembleError, match=r"\['runs/s1'\] have no sts test split while "
                                            r"\['runs/s0'\] have"):
        found.check_complete(["runs/s0", "runs/s1"])
    with pytest.raises(EnsembleError, match=r"member runs/s2 reads other labels of sst dev "
                                            r"than runs/s0"):
        found.add("runs/s2", "sst", "dev", ids, labels[::-1], np.zeros((2, 5)))


# ---------------------------------------------------------------- two trained runs


# Session scope, as `trained`: built once by the worker that runs the TRAINED group.
@pytest.fixture(scope="session")
def second(tmp_path_factory):
    """A second tiny PAL run, another seed: another model on the same tasks and files."""
    workdir = tmp_path_factory.mktemp("run_seed1")
    loop.train_and_evaluate(tiny("pal", seed=1), workdir)
    # Evaluated in other batches than the first run: two length buckets (rows leave the
    # model bucket by bucket, not in file order) and another batch size.
    values = json.loads((workdir / "config.json").read_text())
    values["data"]["buckets"], values["eval"]["batch_size"] = [16, 32], 8
    (workdir / "config.json").write_text(json.dumps(values))
    return workdir


def _dev_outputs(workdir):
    """task -> (labels, outputs) of the dev rows in file order, from a Predictor."""
    from flaxpals.model import build

    p = Predictor.from_workdir(workdir)
    data = build.load_data(p.config, p.tasks, p._r.tokenizer, splits=("dev",))
    return {t.name: (data[t.name]["dev"].labels, p.outputs(data[t.name]["dev"]))
            for t in p.tasks}


@TRAINED
def test_ensemble_dev_metrics_follow_from_the_members_outputs(trained, second, tmp_path):
    first = trained[1]
    record = ensemble.evaluate_ensemble([str(first), str(second)], tmp_path)
    assert json.loads((tmp_path / "eval-ensemble.json").read_text()) == record
    assert record["ensemble"] is True and record["members"] == [str(first), str(second)]
    a, b = _dev_outputs(first), _dev_outputs(second)
    # Re-derived here: mean probabilities -> decision -> the task's metric.
    labels, x = a["sst"][0], (a["sst"][1], b["sst"][1])
    acc = np.mean(np.mean([_softmax(o.astype(np.float64)) for o in x], 0).argmax(1) == labels)
    assert record["dev/sst"] == pytest.approx(acc, abs=1e-9)
    labels, x = a["quora"][0], (a["quora"][1], b["quora"][1])
    p = np.mean([1 / (1 + np.exp(-o.astype(np.float64))) for o in x], 0)
    assert record["dev/quora"] == pytest.approx(np.mean((p > 0.5) == labels), abs=1e-9)
    labels, x = a["sts"][0], (a["sts"][1], b["sts"][1])
    r = np.corrcoef(np.mean(x, 0), labels)[0, 1]
    assert record["dev/sts"] == pytest.approx(r, abs=1e-5)
    # Each member's own figures are its logged best epoch's.
    for workdir, scores in zip((first, second), record["member_scores"], strict=True):
        logged = workdir_format.record_at(workdir, workdir_format.read_best(workdir)["step"])
        for key in ("dev/sst", "dev/quora", "dev/sts", "dev/average"):
            assert scores[key] == pytest.approx(logged[key], abs=1e-6), (workdir, key)


@TRAINED
def test_ensemble_predicts_text_and_files_as_the_averaged_members(trained, second, tmp_path):
    members = [Predictor.from_workdir(trained[1]), Predictor.from_workdir(second)]
    e = Ensemble(members)
    texts = ["a gripping film", "dull and long", "fine"]
    got = e.predict("sst", texts)
    want = np.mean([m.predict("sst", texts)["probabilities"] for m in members], 0)
    np.testing.assert_allclose(got["probabilities"], want, atol=1e-6)
    assert (got["label"] == want.argmax(1)).all()
    q = e.predict("sts", ["a man sings"], pairs=["a man is singing"])["score"]
    assert q[0] == pytest.approx(np.mean([m.predict("sts", ["a man sings"],
                                                    pairs=["a man is singing"])["score"][0]
                                          for m in members]), abs=1e-5)
    out = io.StringIO()
    summary = predict_file(e, "sst", "-", out, stdin=io.StringIO("a gripping film\n\nfine\n"))
    assert summary["kept"] == 2 and summary["skipped"] == {"empty_sentence": 1}
    lines = out.getvalue().splitlines()
    assert lines[0] == "id,label,p_0,p_1,p_2,p_3,p_4"
    rows = [x.split(",") for x in lines[1:]]
    assert [r[0] for r in rows] == ["1", "3"]  # lines of the input; line 2 skipped
    both = e.predict("sst", ["a gripping film", "fine"])
    np.testing.assert_allclose([[float(v) for v in r[2:]] for r in rows],
                               both["probabilities"], atol=1e-6)


@TRAINED
def test_members_reading_other_rows_are_named(trained, second, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(second, other)
    values = json.loads((other / "config.json").read_text())
    values["data"]["eval_limit"] = 20  # reads 20 dev rows where the first reads 48
    (other / "config.json").write_text(json.dumps(values))
    with pytest.raises(EnsembleError, match=rf"member {other} reads other rows of sst dev"):
        ensemble.evaluate_ensemble([str(trained[1]), str(other)], tmp_path / "out")


@TRAINED
def test_cli_writes_the_ensembles_prediction_files_and_refuses_a_config(trained, second,
                                                                         tmp_path):
    from tests.test_trained_run import _main

    members = f"--ensemble={trained[1]},{second}"
    result = _main("flaxpals.main", members, f"--workdir={tmp_path}", "--mode=predict")
    assert result.returncode == 0, result.stderr[-2000:]
    sst = tmp_path / "predictions" / "sst-dev-output.csv"
    rows = read_tsv("ids-sst-dev.csv")
    by_id = {a: int(b) for a, b in (x.split(" , ") for x in sst.read_text().splitlines()[1:])}
    e = Ensemble.from_workdirs([trained[1], second])
    labels = e.predict("sst", [r["sentence"] for r in rows])["label"]
    assert [by_id[r["id"]] for r in rows] == labels.tolist()
    assert (tmp_path / "predictions" / "sts-test-output.csv").exists()
    result = _main("flaxpals.predict", members, "--task=sst", "--format=jsonl",
                   stdin="a gripping film\ndull\n")
    assert result.returncode == 0, result.stderr[-2000:]
    got = [json.loads(line) for line in result.stdout.splitlines()]
    want = e.predict("sst", ["a gripping film", "dull"])
    assert [g["label"] for g in got] == want["label"].tolist()
    np.testing.assert_allclose([[g[f"p_{k}"] for k in range(5)] for g in got],
                               want["probabilities"], atol=1e-5)
    result = _main("flaxpals.main", members, f"--workdir={tmp_path}", "--mode=train",
                   "--config=configs/pal.py:tiny")
    assert result.returncode != 0
    assert "--ensemble goes with --mode=eval or --mode=predict" in result.stderr


# ---------------------------------------------------------------- saved outputs


def test_saved_outputs_round_trip_and_a_better_epoch_replaces_them(tmp_path):
    config = tiny("pal")
    ids = np.array(["a1", "b22", "c"])
    first = {"dev": {"sst": (ids, np.array([0, 4, 2]), np.arange(15.0).reshape(3, 5)),
                     "sts": (ids, None, np.array([0.5, 1.5, 4.0], np.float32))}}
    workdir_format.write_outputs(tmp_path, 7, "dev/average", config, first)
    workdir_format.write_outputs(tmp_path, 9, "val/average", config,
                       {"dev": {"sst": (ids, first["dev"]["sst"][1], -first["dev"]["sst"][2])}})
    saved = workdir_format.read_outputs(tmp_path)
    assert (saved.step, saved.metric) == (9, "val/average")
    assert saved.config.to_dict() == config.to_dict() and list(saved.rows["dev"]) == ["sst"]
    got_ids, labels, out = saved.rows["dev"]["sst"]
    assert got_ids.tolist() == ["a1", "b22", "c"] and labels.tolist() == [0, 4, 2]
    np.testing.assert_array_equal(out, -np.arange(15.0).reshape(3, 5))
    assert [p.name for p in tmp_path.iterdir()] == [workdir_format.OUTPUTS_FILE]  # no .tmp left


@TRAINED
def test_a_runs_saved_outputs_are_its_best_checkpoints(trained):
    """best-outputs.npz, written while training, against the best checkpoint restored."""
    workdir = trained[1]
    saved = workdir_format.read_outputs(workdir / workdir_format.OUTPUTS_FILE)
    assert saved.step == workdir_format.read_best(workdir)["step"]
    assert saved.metric == trained[0].eval.best_metric
    restored = _dev_outputs(workdir)  # in file order
    ids = saved.rows["dev"]["sst"][0]
    assert list(ids) == [r["id"] for r in read_tsv("ids-sst-dev.csv")][:len(ids)]
    for task, (labels, out) in restored.items():
        _, saved_labels, saved_out = saved.rows["dev"][task]
        np.testing.assert_array_equal(saved_labels, labels)
        np.testing.assert_allclose(saved_out, out, atol=1e-5, err_msg=task)
    assert set(saved.rows) == {"dev", "train"}  # the splits its epoch scored


@TRAINED
def test_eval_mode_writes_the_saved_outputs_of_a_run_without_them(trained, tmp_path):

    old = tmp_path / "old"
    shutil.copytree(trained[1], old)
    (old / workdir_format.OUTPUTS_FILE).unlink()
    eval_files.evaluate_checkpoint(old, step=None)
    got, want = workdir_format.read_outputs(old), workdir_format.read_outputs(trained[1])
    assert got.step == want.step and got.metric == want.metric
    for task, (ids, labels, out) in want.rows["dev"].items():
        np.testing.assert_array_equal(got.rows["dev"][task][0], ids)
        np.testing.assert_array_equal(got.rows["dev"][task][1], labels)
        np.testing.assert_allclose(got.rows["dev"][task][2], out, atol=1e-5, err_msg=task)


@TRAINED
def test_an_ensemble_of_saved_outputs_scores_as_of_checkpoints(trained, second, tmp_path):
    first = trained[1]
    files = [str(first / workdir_format.OUTPUTS_FILE), str(second / workdir_format.OUTPUTS_FILE)]
    want = ensemble.evaluate_ensemble([str(first), str(second)], tmp_path / "ckpt")
    for members in (files, [files[0], str(second)]):  # files, or a file and a workdir
        got = ensemble.evaluate_ensemble(members, tmp_path / "files")
        assert got["members"] == members and got["steps"] == want["steps"]
        for key in ("dev/sst", "dev/quora", "dev/sts", "dev/average"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), key


@TRAINED
def test_unusable_saved_outputs_are_named(trained, tmp_path):
    from flaxpals import config_lib

    stale = tmp_path / "stale"
    shutil.copytree(trained[1], stale, ignore=shutil.ignore_patterns("checkpoints", "best"))
    best = workdir_format.read_best(stale)
    (stale / "best.json").write_text(json.dumps({**best, "step": best["step"] + 1}))
    npz = str(stale / workdir_format.OUTPUTS_FILE)
    with pytest.raises(EnsembleError, match=rf"{npz} holds step {best['step']}'s outputs"):
        ensemble.evaluate_ensemble([npz, npz], tmp_path / "out")
    with pytest.raises(EnsembleError, match="--step=3 needs the run's workdir"):
        ensemble.evaluate_ensemble([npz], tmp_path / "out", step=3)
    with pytest.raises(EnsembleError, match="predicting needs the runs' checkpoints"):
        Ensemble.from_workdirs([npz])
    # --mode=predict --ensemble=...npz: once dev files only, and "no test file" logged.
    with pytest.raises(EnsembleError, match="predicting needs the runs' checkpoints"):
        ensemble.write_ensemble_predictions([npz, trained[1]], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (stale / workdir_format.OUTPUTS_FILE).write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(config_lib.ConfigError, match=rf"{npz}: not a readable"):
        ensemble.evaluate_ensemble([npz], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="writes best-outputs.npz when it saves"):
        workdir_format.read_outputs(tmp_path / "missing.npz")
