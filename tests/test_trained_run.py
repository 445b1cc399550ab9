"""A trained run used from its workdir: eval, predict, Predictor, export, flaxpals.predict."""

import csv
import io
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from flaxpals import config_lib, workdir_format
from flaxpals.data.reader import DataFormatError
from flaxpals.model import build
from flaxpals.predict import Predictor, predict_file
from flaxpals.serve import eval_files, exporter
from flaxpals.train.checkpointing import CheckpointMismatchError, Checkpoints
from tests.conftest import ROOT, TRAINED, epochs, read_tsv, require, tiny

# ---------------------------------------------------------------- saved config, no compute


@pytest.mark.parametrize("key,value", [("model.pooling", "cls"), ("model.adapter", "lowrank"),
                                       ("model.pair_encoding", "bi")])
def test_a_changed_model_field_is_named_saved_to_given(tmp_path, key, value):
    saved = tiny("pal")
    workdir_format.write_config(tmp_path, saved)
    section, field = key.split(".")
    with pytest.raises(workdir_format.ConfigMismatchError) as e:
        workdir_format.config_for_restore(tmp_path, tiny("pal", **{key: value}))
    lines = str(e.value).splitlines()
    assert f"  {key}: {saved[section][field]!r} -> {value!r}" in lines
    assert len(lines) == 3  # the sentence, the one field, the way out


def test_a_changed_label_count_is_named(tmp_path):
    workdir_format.write_config(tmp_path, tiny("pal"))
    given = tiny("pal")
    given.extra_tasks.sst = {"num_labels": 3}  # the builtin SST with 3 classes
    with pytest.raises(workdir_format.ConfigMismatchError, match=r"tasks\.sst\.num_labels: 5 -> 3"):
        workdir_format.config_for_restore(tmp_path, given)


def test_data_and_eval_fields_apply_and_training_fields_stay_saved(tmp_path):
    saved = tiny("pal")
    workdir_format.write_config(tmp_path, saved)
    other_data = tmp_path / "elsewhere"
    other_data.mkdir()
    given = tiny("pal", **{"eval.batch_size": 8, "data.data_dir": str(other_data),
                           "train.learning_rate": 0.5})
    config = workdir_format.config_for_restore(tmp_path, given)
    assert config.eval.batch_size == 8
    assert config.data.data_dir == str(other_data)
    assert config.train.learning_rate == saved.train.learning_rate
    assert config.model.to_dict() == saved.model.to_dict()


def test_a_saved_config_reads_back_and_old_runs_keep_their_train_sample(tmp_path):
    saved = tiny("pal", **{"model.pooling": "cls"})
    workdir_format.write_config(tmp_path, saved)
    assert workdir_format.read_config(tmp_path).to_dict() == saved.to_dict()
    values = json.loads((tmp_path / "config.json").read_text())
    del values["eval"]["train_sample_from"]  # written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(values))
    assert workdir_format.read_config(tmp_path).eval.train_sample_from == "head"
    values["train"]["lerning_rate"] = 1.0
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=r"config\.json: config\.train\.lerning_rate: unknown"):
        workdir_format.read_config(tmp_path)


def _main(*args, stdin=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, input=stdin,
                          capture_output=True, text=True, timeout=600)


def test_cli_stops_a_mismatched_eval_before_any_compute(tmp_path):
    workdir_format.write_config(tmp_path, tiny("pal"))  # a run with no checkpoint at all
    result = _main("flaxpals.main", f"--workdir={tmp_path}", "--mode=eval",
                   "--config=configs/pal.py:tiny", "--config.model.pooling=cls")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-3].startswith("error: the given config defines another model than the run")
    assert lines[-2:] == ["  model.pooling: 'mean' -> 'cls'",
                          "Leave out --config to use the saved run's config."]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flags,message", [
    (["--mode=predict", "--eval_file=x.csv", "--task=sst"],
     "--eval_file, --task: --mode=eval only (here --mode=predict"),
    (["--mode=eval", "--task=sst"], "--task: only with --eval_file"),
    (["--mode=eval", "--eval_file=x.csv", "--task=sst", "--columns=text"],
     "--columns: 'text' is not key=column"),
    (["--mode=train", "--step=5"], "--step: --mode=eval or predict only"),
])
def test_cli_stops_flags_the_mode_would_ignore(tmp_path, flags, message):
    """Each stops the command, named, before it writes anything: ignored, a flag would
    mislead (scoring the run's dev set under a name that says it scored the file, say)."""
    result = _main("flaxpals.main", f"--workdir={tmp_path}", *flags)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())  # stopped before writing anything


# ---------------------------------------------------------------- a trained run


@TRAINED
def test_eval_with_no_config_gives_the_logged_figures(trained):
    _, workdir = trained
    lines = epochs(workdir)
    best = workdir_format.read_best(workdir)
    for step, want in ((None, next(r for r in lines if r["step"] == best["step"])),
                       (lines[-1]["step"], lines[-1])):
        record = eval_files.evaluate_checkpoint(workdir, step=step)
        assert record["step"] == want["step"]
        figures = [k for k in want if k.startswith(("dev/", "train/"))]
        assert len(figures) == 10
        for key in figures:
            assert record[key] == pytest.approx(want[key], abs=1e-6), key
        assert json.loads((workdir / f"eval-{want['step']}.json").read_text()) == record


@TRAINED
def test_eval_on_a_file_with_its_own_columns(trained, tmp_path, monkeypatch):
    # The first 48 SST dev rows (the run's eval_limit) under other column names,
    # comma-delimited, float labels: the same accuracy as the run's dev/sst. Named
    # relative to the working directory, as a user types it (not the data directory).
    _, workdir = trained
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "reviews.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review_id", "body", "stars"])
        for r in read_tsv("ids-sst-dev.csv")[:48]:
            w.writerow([r["id"], r["sentence"], f"{float(r['sentiment']):.1f}"])
    record = eval_files.evaluate_checkpoint(workdir, eval_file="reviews.csv", task="sst",
                                            columns={"text": "body", "label": "stars"})
    logged = workdir_format.record_at(workdir, record["step"])
    assert record["dev/sst"] == pytest.approx(logged["dev/sst"], abs=1e-9)
    assert (workdir / f"eval-{record['step']}-reviews.json").exists()


@TRAINED
def test_timings_say_where_the_run_went(trained):
    _, workdir = trained
    (record,) = workdir_format.read_timings(workdir)  # one invocation
    assert record["steps"] == epochs(workdir)[-1]["step"]
    assert 1 <= record["compiling_steps"] < record["steps"]  # the first step compiled
    assert 0 < record["first_step_s"] <= record["total_s"]
    assert 0 < record["eval_s"] < record["run_s"] <= record["total_s"]
    # One train and one predict program per batch structure and bucket, whatever the task:
    # the tiny config has one bucket and two structures (SST's sentences, and the
    # bi-encoded pairs of Quora and STS), compiled or loaded from the shared test cache.
    config, by_function = trained[0], record["compile_by_function"]
    shapes = (2 if config.model.pair_encoding == "bi" else 1) * len(config.data.buckets)
    for name in ("jit(train_step)", "jit(predict_step)"):
        assert by_function[name]["programs"] + by_function[name]["cache_hits"] == shapes, name
    for key in ("programs", "cache_hits"):
        assert sum(v[key] for v in by_function.values()) == record["compile"][key]


@pytest.fixture(scope="module")
def predictor(trained):
    return Predictor.from_workdir(trained[1])


def _dev(task):
    rows = read_tsv({"sst": "ids-sst-dev.csv", "quora": "quora-dev.csv",
                     "sts": "sts-dev.csv"}[task])
    ids = [r["id"] for r in rows]
    if task == "sst":
        return ids, [r["sentence"] for r in rows], None
    return ids, [r["sentence1"] for r in rows], [r["sentence2"] for r in rows]


@TRAINED
def test_predictor_equals_mode_predict_on_dev(trained, predictor):
    _, workdir = trained
    eval_files.write_predictions(workdir)
    assert [t.name for t in predictor.tasks] == ["sst", "quora", "sts"]
    for task, prefix, key in (("sst", "sst", "label"), ("quora", "para", "label"),
                              ("sts", "sts", "score")):
        lines = (workdir / "predictions" / f"{prefix}-dev-output.csv").read_text().splitlines()
        written = {a: float(b) for a, b in (line.split(" , ") for line in lines[1:])}
        ids, texts, pairs = _dev(task)
        out = predictor.predict(task, texts, pairs)[key]
        assert len(out) == len(ids) == len(written)
        got = dict(zip(ids, out.tolist(), strict=True))
        np.testing.assert_allclose([got[i] for i in written], list(written.values()),
                                   atol=1e-6, rtol=0, err_msg=task)
    sst = predictor.predict("sst", ["a gripping film", "dull"])
    assert sst["probabilities"].shape == (2, 5)
    np.testing.assert_allclose(sst["probabilities"].sum(1), 1.0, atol=1e-6)
    assert (sst["label"] == sst["probabilities"].argmax(1)).all()
    para = predictor.predict("quora", ["how old are you?"], pairs=["what is your age?"])
    assert para["label"][0] == int(para["probability"][0] > 0.5)
    assert predictor.embed(["a sentence", "two"]).shape == (2, 64)


@TRAINED
def test_long_texts_are_cut_and_counted_and_empty_ones_named(predictor):
    split = predictor.split("sst", ["word " * 100, "short"])
    assert split.notes["truncated"] == 1
    assert predictor.predict("sst", ["word " * 100])["label"].shape == (1,)
    with pytest.raises(DataFormatError, match=r"<input>:2: empty_sentence"):
        predictor.predict("sst", ["fine", "   "])


@TRAINED
def test_inputs_that_do_not_line_up_are_named(predictor):
    # Once an IndexError (fewer pairs), silently dropped pairs (more) or one row per
    # character (a string).
    with pytest.raises(ValueError, match="pairs: 1 of them for 2 texts"):
        predictor.predict("quora", ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="pairs: 3 of them for 2 texts"):
        predictor.predict("quora", ["a", "b"], ["c", "d", "e"])
    with pytest.raises(ValueError, match="ids: 1 of them for 2 texts"):
        predictor.split("sst", ["a", "b"], ids=["x"])
    with pytest.raises(ValueError, match="a list of strings, not one string"):
        predictor.predict("sst", "a fine film")


@TRAINED
def test_export_refuses_a_training_runs_workdir(trained):
    _, workdir = trained
    before = (workdir / "config.json").read_text()
    with pytest.raises(config_lib.ConfigError, match="holds a training run"):
        exporter.export(workdir, workdir)
    assert (workdir / "config.json").read_text() == before


@pytest.mark.parametrize("flags,message", [
    (["--pretrained=x", "--step=5"], "--step: with --workdir or --ensemble"),
    (["--workdir=x", "--columns=text=body"], "--columns: for a file"),
])
def test_predict_stops_flags_it_would_ignore(flags, message):
    result = _main("flaxpals.predict", "--task=sst", *flags, stdin="")
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


@TRAINED
def test_export_loads_anywhere_and_predicts_the_same(trained, predictor, tmp_path):
    torch = require("torch")
    transformers = require("transformers")
    _, workdir = trained
    out = exporter.export(workdir, tmp_path / "model")
    for name in ("config.json", "model.safetensors", "vocab.txt", "tasks.safetensors",
                 "flaxpals.json", "README.md"):
        assert (out / name).exists(), name
    meta = json.loads((out / "flaxpals.json").read_text())
    assert meta["step"] == predictor.step
    assert meta["metrics"]["dev/sst"] == \
        workdir_format.record_at(workdir, predictor.step)["dev/sst"]
    assert [t["name"] for t in meta["tasks"]] == ["sst", "quora", "sts"]
    exported = Predictor.from_pretrained(out)
    for task in ("sst", "quora", "sts"):
        _, texts, pairs = _dev(task)
        a = predictor.predict(task, texts[:40], None if pairs is None else pairs[:40])
        b = exported.predict(task, texts[:40], None if pairs is None else pairs[:40])
        for key in a:
            np.testing.assert_allclose(a[key], b[key], atol=1e-6, rtol=0, err_msg=task)
    # The encoder alone in transformers against flaxpals' encoder on the same weights.
    from flaxpals.model import bert

    config, directory = build.encoder_config(predictor.config.model)
    tokens = predictor._r.tokenizer(["a man walks into a bar", "the film is dull"])
    hf = transformers.BertModel.from_pretrained(str(out)).eval()
    with torch.no_grad():
        want = hf(**{k: torch.tensor(v) for k, v in tokens.items()}).last_hidden_state.numpy()
    params = jax.device_get(predictor._r.params)["encoder"]
    got, _ = bert.BertModel(config).apply({"params": params}, tokens["input_ids"],
                                          tokens["attention_mask"], tokens["token_type_ids"])
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


@TRAINED
def test_predict_reads_csv_tsv_jsonl_and_stdin(predictor, tmp_path):
    texts = ["a gripping film", "dull and long", "i laughed"]
    want = predictor.predict("sst", texts)["label"].tolist()
    (tmp_path / "a.csv").write_text("review_id,body\nr1,a gripping film\nr2,dull and long\n"
                                    "r3,\"i laughed\"\n")
    (tmp_path / "a.tsv").write_text("id\tsentence\n1\ta gripping film\n2\tdull and long\n"
                                    "3\ti laughed\n")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cases = [("a.csv", {"id": "review_id", "text": "body"}, ["r1", "r2", "r3"]),
             ("a.tsv", None, ["1", "2", "3"]), ("a.jsonl", None, ["1", "2", "3"])]
    for name, columns, ids in cases:
        stream = io.StringIO()
        summary = predict_file(predictor, "sst", str(tmp_path / name), stream, columns)
        rows = list(csv.DictReader(io.StringIO(stream.getvalue())))
        assert [r["id"] for r in rows] == ids, name
        assert [int(r["label"]) for r in rows] == want, name
        assert summary == {"rows": 3, "kept": 3, "skipped": {}, "truncated": 0, "notes": {}}
    out = tmp_path / "out.jsonl"
    predict_file(predictor, "sts", "-", str(out), stdin=io.StringIO(
        "a man sings\ta man is singing\na cat\ta car\n"))
    scores = [json.loads(line)["score"] for line in out.read_text().splitlines()]
    np.testing.assert_allclose(scores, predictor.predict(
        "sts", ["a man sings", "a cat"], pairs=["a man is singing", "a car"])["score"],
        atol=1e-6)


@TRAINED
def test_a_bad_row_is_skipped_and_counted_or_named_in_strict_mode(predictor, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("id,sentence\n1,a fine film\n2,\n3,dull\n")
    stream = io.StringIO()
    summary = predict_file(predictor, "sst", str(path), stream)
    assert summary["skipped"] == {"empty_sentence": 1}
    assert [r["id"] for r in csv.DictReader(io.StringIO(stream.getvalue()))] == ["1", "3"]
    with pytest.raises(DataFormatError, match=r"bad\.csv:3: empty_sentence"):
        predict_file(predictor, "sst", str(path), io.StringIO(), strict=True)
    with pytest.raises(DataFormatError, match=r"no column 'body' \(--columns=text=body\) in"):
        predict_file(predictor, "sst", str(path), io.StringIO(), columns={"text": "body"})
    # A label column would be read and ignored: predict says so and names eval.
    with pytest.raises(ValueError, match=r"predict reads no labels.*--mode=eval"):
        predict_file(predictor, "sst", str(path), io.StringIO(),
                     columns={"text": "sentence", "label": "stars"})


@TRAINED
def test_predict_command_reads_stdin(trained):
    result = _main("flaxpals.predict", f"--workdir={trained[1]}", "--task=sst",
                   stdin="a fine film\nawful\n")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["id"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == {"id", "label", "p_0", "p_1", "p_2", "p_3", "p_4"}
    assert "sst: 2 of 2 rows predicted" in result.stderr


@TRAINED
def test_a_checkpoint_that_does_not_fit_names_its_paths(trained):
    _, workdir = trained
    _, shapes, *_ = build.abstract_model(tiny("baseline"))  # no adapters
    ckpts = Checkpoints(workdir, 2)
    with pytest.raises(CheckpointMismatchError) as e:
        ckpts.restore_params(jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                           sharding=jax.sharding.SingleDeviceSharding(
                                               jax.devices()[0])), shapes))
    ckpts.close()
    message = str(e.value)
    assert "not in the model: adapters/quora/" in message
    assert "(and " in message and len(message) < 600


# ---------------------------------------------------------------- a task declared in a config


CONFIG_FILE = '''
from flaxpals import config_lib


def get_config(arg=None):
    c = config_lib.base()
    c.tasks = ("sst", "dupes")
    c.extra_tasks.dupes = dict(
        kind="pair_classification", num_labels=2,
        files=dict(train="{data}/dupes-train.csv", dev="{data}/dupes-dev.csv",
                   test="{data}/dupes-test.csv"),
        fields=dict(id="qid", text="first", text_pair="second", label="same"))
    return config_lib.apply_arg(c, "tiny")
'''


@pytest.mark.slow  # three subprocess runs: `make test-slow` and CI
def test_a_task_declared_in_a_config_file_trains_evals_and_predicts(tmp_path):
    # Quora pairs under other column names, comma-delimited, labels as in the file (1.0).
    rows = read_tsv("quora-train.csv")
    for split, part in (("train", rows[:80]), ("dev", rows[80:112]), ("test", rows[112:120])):
        with open(tmp_path / f"dupes-{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["qid", "first", "second"] + (["same"] if split != "test" else []))
            for r in part:
                w.writerow([r["id"], r["sentence1"], r["sentence2"]]
                           + ([r["is_duplicate"]] if split != "test" else []))
    assert rows[0]["is_duplicate"] in ("0.0", "1.0")
    config = tmp_path / "dupes.py"
    config.write_text(CONFIG_FILE.format(data=tmp_path))
    workdir = tmp_path / "run"
    cache = f"--config.data.cache_dir={os.environ.get('FLAXPALS_TEST_CACHE', '')}"
    trained = _main("flaxpals.main", f"--config={config}", f"--workdir={workdir}", cache)
    assert trained.returncode == 0, trained.stderr[-3000:]
    last = epochs(workdir)[-1]
    assert {"dev/sst", "dev/dupes", "loss/dupes"} <= set(last)
    evaluated = _main("flaxpals.main", f"--workdir={workdir}", "--mode=eval",
                      f"--step={last['step']}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    record = json.loads((workdir / f"eval-{last['step']}.json").read_text())
    assert record["dev/dupes"] == pytest.approx(last["dev/dupes"], abs=1e-6)
    predicted = _main("flaxpals.main", f"--workdir={workdir}", "--mode=predict")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    lines = (workdir / "predictions" / "dupes-test-output.csv").read_text().splitlines()
    assert [line.split(" , ")[0] for line in lines[1:]] == [r["id"] for r in rows[112:120]]
    assert (workdir / "predictions" / "sst-dev-output.csv").exists()


def test_a_workdir_saved_under_the_old_field_names_restores(tmp_path):
    saved = tiny("pal", **{"train.trainable": "adapters_only"})
    values = saved.to_dict()
    values["model"]["checkpoint"] = values["model"].pop("encoder")  # the names it had before
    values["train"]["mode"] = values["train"].pop("trainable")
    (tmp_path / "config.json").write_text(json.dumps(values))
    config = workdir_format.read_config(tmp_path)
    assert (config.model.encoder, config.train.trainable) == ("tiny", "adapters_only")
    assert config.to_dict() == saved.to_dict()
    # A published sweep row, written before the rename, reads back too.
    row = ROOT / "docs" / "results" / "best-proportional"
    assert workdir_format.read_config(row).model.encoder == json.loads(
        (row / "config.json").read_text())["model"]["checkpoint"]


@pytest.mark.parametrize("row", sorted(
    p.parent.name for p in (ROOT / "docs" / "results").glob("*/config.json")
    if "framework" not in json.loads(p.read_text())))  # not the PyTorch reference's runs
def test_every_published_run_config_reads_back(row):
    # The committed runs were saved by older layouts of the library: their configs
    # still read, name their tasks and fingerprint their model.
    from flaxpals.data.tasks import tasks_of_config

    config = workdir_format.read_config(ROOT / "docs" / "results" / row)
    assert [t.name for t in tasks_of_config(config)]
    assert workdir_format.fingerprint(config)


def test_a_saved_config_with_a_bad_task_names_its_file(tmp_path):
    values = tiny("pal").to_dict()
    values["tasks"] = ["sst", "mine"]
    values["extra_tasks"] = {"mine": {"kind": "classification"}}  # no source
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(config_lib.ConfigError,
                       match=rf"^{re.escape(str(tmp_path / 'config.json'))}: "
                             r"config.extra_tasks.mine: .*declares a source"):
        workdir_format.read_config(tmp_path)


@TRAINED
@pytest.mark.parametrize("key,value,message", [
    # Another optimiser state tree: named as a config change, not taken for a damaged
    # file (which would set every step aside and start training over from scratch).
    ("train.ema_decay", 0.99, r"optimiser state does not fit this config's .*"
                              r"missing from the checkpoint: opt_state/.*not in this config's: "
                              r"opt_state/"),
    # Another sampler (epochs): the sampler's own check, once a traceback.
    ("train.num_epochs", 3, r"sampler state was saved with another num_epochs: 2 there, 3 here"),
])
def test_a_resume_that_does_not_fit_stops_and_keeps_the_checkpoints(trained, tmp_path, key,
                                                                      value, message):
    import shutil

    from flaxpals.train import loop

    config, workdir = trained
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    steps = sorted(p.name for p in (copy / "checkpoints").iterdir())
    changed = config.copy_and_resolve_references()
    section, field = key.split(".")
    changed[section][field] = value
    with pytest.raises(CheckpointMismatchError, match=message) as e:
        loop.train_and_evaluate(changed, copy)
    assert "resume with the config the run was saved with" in str(e.value)
    assert len(str(e.value)) < 800
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == steps
    assert not (copy / "checkpoints-unreadable").exists()
    # nothing appended
    assert workdir_format.read_metrics(copy) == workdir_format.read_metrics(workdir)
    assert json.loads((copy / "config.1.json").read_text()) == json.loads(
        (workdir / "config.json").read_text())  # the run's own config, kept
