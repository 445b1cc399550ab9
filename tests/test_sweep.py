"""The sweep on the smoke budget (tiny config): rows run, the report fills, a rerun resumes.

Each row is a real `python -m flaxpals.main` subprocess on the tiny config and
the real CS224N files; it is killed mid-run (tests/kill_run.py) to exercise
resumption.
"""

import json
import re

import numpy as np
import pytest

from benchmarks import host
from experiments import sweep, sweep_common, sweep_plots, sweep_report, sweep_shares
from flaxpals import workdir_format
from tests.conftest import ROOT, require

ROW = "separate-sst"  # one task: the cheapest row to compile (a cold compile dominates)


def epochs(workdir):
    return [r["epoch"] for r in workdir_format.read_metrics(workdir)]


def table_row(markdown: str, name: str) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == name:
            return cells
    raise AssertionError(f"no table row {name!r} in\n{markdown}")


def test_smoke_sweep_reports_and_resumes(tmp_path, monkeypatch):
    argv = [f"--results={tmp_path}", "--budget=smoke", f"--only={ROW}"]
    workdir = tmp_path / ROW

    # 1. The row is killed after step 5 of 8 (epoch 1 is complete and checkpointed):
    # its trainer runs through tests/kill_run.py, which installs the fault injection.
    command = sweep.command

    def killed_after_5(*args, **kwargs):
        cmd = command(*args, **kwargs)
        i = cmd.index("-m")
        return cmd[:i] + [str(ROOT / "tests" / "kill_run.py"), "5"] + cmd[i + 2:]

    monkeypatch.setattr(sweep, "command", killed_after_5)
    assert sweep.main(argv) == 1
    assert epochs(workdir) == [1]
    invocations = json.loads((workdir / "sweep.json").read_text())["runs"]
    assert [r["status"] for r in invocations] == ["failed (exit code -9)"]
    monkeypatch.setattr(sweep, "command", command)

    # 2. The same command resumes it from its checkpoint.
    assert sweep.main(argv) == 0
    assert epochs(workdir) == [1, 2], "the resumed row repeated or lost an epoch"
    record = json.loads((workdir / "sweep.json").read_text())
    assert [r["status"] for r in record["runs"]] == ["failed (exit code -9)", "finished"]
    assert record["seconds"] == pytest.approx(sum(r["seconds"] for r in record["runs"]))
    assert all(r["seconds"] > 0 for r in record["runs"])

    report = (tmp_path / "RESULTS.md").read_text()
    logged = workdir_format.read_metrics(workdir)
    best = max(logged, key=lambda r: r["dev/average"])
    sst = table_row(report, "Separate model: sst")
    number = re.compile(r"^\d\.\d{3}$")
    assert number.match(sst[1]) and number.match(sst[2])  # SST train and dev accuracy
    assert float(sst[2]) == pytest.approx(best["dev/sst"], abs=6e-4)  # printed with 3 decimals
    assert float(sst[1]) == pytest.approx(best["train/sst"], abs=6e-4)  # printed with 3 decimals
    assert sst[3:7] == ["–"] * 4  # no Quora or STS in a single-task row
    assert sst[10] == f"{best['epoch']} of 2"
    combined = table_row(report, "Separate models (1 of 3 tasks, each its best epoch)")
    assert combined[1:3] == sst[1:3]
    assert table_row(report, "PAL + PCGrad")[1] == "not run yet"
    for png in ("dev_per_epoch.png", "train_vs_dev.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    # 3. A finished row is skipped: no subprocess may start.
    def no_run(*args, **kwargs):
        raise AssertionError("a finished row was run again")

    monkeypatch.setattr(sweep.subprocess, "Popen", no_run)
    assert sweep.main(argv) == 0
    assert len(json.loads((workdir / "sweep.json").read_text())["runs"]) == 2

    # 4. Another budget or override in the same folder is refused, naming the row.
    with pytest.raises(SystemExit, match=ROW):
        sweep.main(argv + ["--set", "train.num_epochs=3"])


def _row(group, name, dev, done=True):
    best = {f"dev/{t}": v for t, v in dev.items()}
    return {"group": group, "name": name, "slug": name, "best": best, "done": done,
            "param_ratio": 1.0, "seconds": 1.0}


def test_references_section_counts_reached_and_close_tasks(monkeypatch):
    monkeypatch.setattr(sweep_common, "PYTORCH_REFERENCE",
                        {"sst": 0.489, "quora": 0.856, "sts": 0.855})
    rows = [_row("separate", "separate-sst", {"sst": 0.480}),
            _row("separate", "separate-quora", {"quora": 0.854}),
            _row("separate", "separate-sts", {"sts": 0.851}),
            # Reaches PyTorch on SST (equal at 3 digits) and STS; Quora .842 is 1.2 pt
            # under the separate .854, so close on 2 of 3.
            _row("best", "cand", {"sst": 0.4891, "quora": 0.842, "sts": 0.860}, done=False),
            _row("table1", "partial", {"sst": 0.5})]  # fewer than three tasks: not listed
    md = "\n".join(sweep_report.against_references(rows))
    cells = table_row(md, "cand (unfinished)")
    assert cells[1:] == ["0.489, +0.0, +0.9", "0.842, -1.4, -1.2", "0.860, +0.5, +0.9",
                         "2 of 3", "2 of 3"]
    assert "partial" not in md and "separate-sst" not in md


def test_train_figures_from_the_files_head_are_marked():
    # Rows whose config.json predates eval.train_sample_from evaluated the file's head.
    old = _row("table1", "PAL + annealed", {"sst": 0.430, "quora": 0.453, "sts": 0.492})
    old["best"].update({"train/sst": 0.703, "train/quora": 0.5, "train/sts": 0.6})
    old["train_sample_from"] = "head"
    new = _row("table1", "PAL + PCGrad", {"sst": 0.44, "quora": 0.46, "sts": 0.5})
    new["best"].update({"train/sst": 0.45, "train/quora": 0.47, "train/sts": 0.51})
    new["train_sample_from"] = "random"
    sep = _row("separate", "separate-sst", {"sst": 0.48})
    sep["best"]["train/sst"] = 0.6
    sep["train_sample_from"] = "head"
    md = sweep_report.table([old, new, sep])
    assert table_row(md, "PAL + annealed")[1:7] == ["0.703ʰ", "0.430", "0.500ʰ", "0.453",
                                                     "0.600ʰ", "0.492"]
    assert table_row(md, "PAL + PCGrad")[1:7] == ["0.450", "0.440", "0.470", "0.460",
                                                   "0.510", "0.500"]
    # The combined separate models inherit the mark; absent tasks stay unmarked.
    combined = table_row(md, "Separate models (1 of 3 tasks, each its best epoch)")
    assert combined[1:4] == ["0.600ʰ", "0.480", "–"]


def test_train_figures_are_not_averaged_across_sample_kinds(tmp_path):
    # Seed 0 evaluated the train file's head (its config predates the field), seeds 1-2 a
    # random sample: the row's train figure is the random seeds' mean, unmarked.
    import statistics

    for seed, dev in enumerate((0.48, 0.47, 0.49)):
        _fake_run(tmp_path / ("separate-sst" + (f"-seed{seed}" if seed else "")), [dev])
    config = json.loads((tmp_path / "separate-sst" / "config.json").read_text())
    del config["eval"]["train_sample_from"]
    (tmp_path / "separate-sst" / "config.json").write_text(json.dumps(config))
    row = {r["slug"]: r for r in sweep_report.collect(tmp_path)}["separate-sst"]
    assert row["train_sample_from"] == "random"
    assert row["best"]["train/sst"] == pytest.approx(statistics.mean([0.57, 0.59]))
    assert row["std"]["train/sst"] == pytest.approx(statistics.stdev([0.57, 0.59]))
    assert row["best"]["dev/sst"] == pytest.approx(statistics.mean([0.48, 0.47, 0.49]))
    cells = table_row(sweep_report.table([row]), "Separate model: sst")
    assert cells[1] == f"{0.58:.3f} ± {statistics.stdev([0.57, 0.59]):.3f}"
    # Seed 0 alone keeps its head-sampled figure, marked.
    alone = {**row, **sweep_report.aggregate({0: row["seeds"][0]})}
    assert alone["train_sample_from"] == "head" and alone["best"]["train/sst"] == 0.58
    assert table_row(sweep_report.table([alone]), "Separate model: sst")[1] == "0.580ʰ"
    # Combined with a head-sampled STS model, only the STS train cell is marked.
    sts = _row("separate", "separate-sts", {"sts": 0.85})
    sts["best"]["train/sts"] = 0.9
    sts["train_sample_from"] = "head"
    combined = table_row(sweep_report.table([row, sts]),
                         "Separate models (2 of 3 tasks, each its best epoch)")
    assert combined[1] == cells[1] and combined[5] == "0.900ʰ"


def test_sigterm_marks_the_row_interrupted_and_stops_its_trainer(tmp_path):
    """`kill <sweep>` must not orphan the row's trainer nor leave its record "running"."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    child = (f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
             "time.sleep(120)")
    script = (
        "import sys; from pathlib import Path; from experiments import sweep\n"
        "sweep.exit_on_sigterm()\n"
        f"w = Path({str(tmp_path)!r}); row = sweep.ROWS[0]\n"
        f"cmd = [sys.executable, '-c', {child!r}]\n"
        "sweep.run_row(row, cmd, sweep.RowRecord(w, row, 'smoke', cmd), w, heartbeat_s=0.2)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and proc.poll() is None, "the row never started"
        time.sleep(0.1)
    child_pid = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    run = json.loads((tmp_path / "sweep.json").read_text())["runs"][-1]
    assert run["status"] == "interrupted"
    with pytest.raises(ProcessLookupError):  # the trainer is gone, not orphaned
        for _ in range(100):
            os.kill(child_pid, 0)
            time.sleep(0.1)


def _fake_run(workdir, dev_by_epoch, best_metric="dev/average", val_by_epoch=None,
              task="sst"):
    """A finished single-task run's files, as the trainer writes them."""
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(
        {"train": {"num_epochs": len(dev_by_epoch)}, "eval": {"best_metric": best_metric,
                                                               "train_sample_from": "random"}}))
    for epoch, dev in enumerate(dev_by_epoch, start=1):
        record = {"epoch": epoch, "step": 10 * epoch, f"dev/{task}": dev, "dev/average": dev,
                  f"train/{task}": dev + 0.1}
        if val_by_epoch:
            record["val/average"] = val_by_epoch[epoch - 1]
        workdir_format.append_metrics(workdir, record)


def test_seeds_are_reported_as_mean_and_std(tmp_path):
    import statistics

    # separate-sst over seeds 0, 1, 2: best epochs 2, 1, 2 by dev
    _fake_run(tmp_path / "separate-sst", [0.40, 0.48])
    _fake_run(tmp_path / "separate-sst-seed1", [0.47, 0.45])
    _fake_run(tmp_path / "separate-sst-seed2", [0.41, 0.50])
    # a validation split chooses the epoch, not dev: epoch 1 although dev is higher at 2
    _fake_run(tmp_path / "separate-sts", [0.80, 0.85], best_metric="val/average",
              val_by_epoch=[0.9, 0.7], task="sts")
    rows = {r["slug"]: r for r in sweep_report.collect(tmp_path)}
    sst, sts = rows["separate-sst"], rows["separate-sts"]
    assert sst["n_seeds"] == 3 and sorted(sst["seeds"]) == [0, 1, 2]
    assert sst["best_epochs"] == [2, 1, 2] and "epoch" not in sst["best"]
    best = [0.48, 0.47, 0.50]
    assert sst["best"]["dev/sst"] == pytest.approx(statistics.mean(best))
    assert sst["std"]["dev/sst"] == pytest.approx(statistics.stdev(best))
    assert sts["n_seeds"] == 1 and sts["best"]["dev/sts"] == 0.80 and not sts["std"]
    md = sweep_report.table(list(rows.values()))
    cells = table_row(md, "Separate model: sst")
    assert cells[2] == f"{statistics.mean(best):.3f} ± {statistics.stdev(best):.3f}"
    assert cells[10] == "2,1,2 of 2" and cells[12] == "3"
    assert table_row(md, "Separate model: sts")[6] == "0.800"
    # the per-epoch curve behind the plot's band
    assert sweep_plots.epoch_curve(sst, "dev/sst") == [
        (1, pytest.approx(statistics.mean([0.40, 0.47, 0.41])),
         pytest.approx(statistics.stdev([0.40, 0.47, 0.41]))),
        (2, pytest.approx(statistics.mean([0.48, 0.45, 0.50])),
         pytest.approx(statistics.stdev([0.48, 0.45, 0.50])))]
    path = sweep_report.report(tmp_path, "smoke")
    text = path.read_text()
    assert "± " in text and (tmp_path / "dev_per_epoch.png").stat().st_size > 10_000


def test_every_row_gets_its_own_line_style():
    styles = sweep_plots.row_styles(len(sweep_common.ROWS) + 10)
    keys = [(s["color"], s["linestyle"], s["marker"]) for s in styles]
    assert len(set(keys)) == len(keys)
    assert len({s["color"] for s in styles[:20]}) == 20  # 20 distinct colours first


def test_seeds_flag_runs_each_row_once_per_seed(tmp_path, capsys):
    argv = [f"--results={tmp_path}", "--budget=smoke", "--only=separate-sst,separate-sts",
            "--seeds=0,2", "--dry-run"]
    assert sweep.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    workdirs = [next(x for x in line.split() if x.startswith("--workdir=")) for line in lines]
    assert [w.rsplit("/", 1)[1] for w in workdirs] == [
        "separate-sst", "separate-sts", "separate-sst-seed2", "separate-sts-seed2"]
    assert ["--config.seed=2" in line for line in lines] == [False, False, True, True]
    for bad in ("0,0", "a", "-1", ""):
        with pytest.raises(SystemExit, match="--seeds"):
            sweep.main(argv[:3] + [f"--seeds={bad}", "--dry-run"])
    with pytest.raises(SystemExit, match="--seeds"):
        sweep.main(argv + ["--set", "seed=3"])


def _fake_torch_run(workdir, dev_by_epoch, task="sst"):
    """experiments.torch_finetune's files: its own config.json, flaxpals' metrics.jsonl."""
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(
        {"framework": "pytorch", "task": task, "epochs": len(dev_by_epoch)}))
    for epoch, dev in enumerate(dev_by_epoch, start=1):
        workdir_format.append_metrics(workdir, {"epoch": epoch, "step": epoch, f"dev/{task}": dev,
                                      "dev/average": dev})


def test_pytorch_rows_replace_the_fixed_reference(tmp_path):
    _fake_run(tmp_path / "separate-sst", [0.40, 0.48])
    _fake_torch_run(tmp_path / "torch-sst", [0.47, 0.49])
    _fake_torch_run(tmp_path / "torch-sst-seed1", [0.50, 0.45])
    rows = sweep_report.collect(tmp_path)
    torch_sst = next(r for r in rows if r["slug"] == "torch-sst")
    assert torch_sst["done"] and torch_sst["n_seeds"] == 2
    ref = sweep_common.pytorch_reference(rows)
    assert ref["sst"][0] == pytest.approx(0.495) and ref["sst"][2] == "2 seed(s)"
    assert ref["quora"] == (sweep_common.PYTORCH_REFERENCE["quora"], None, "fixed")  # not run
    md = "\n".join(sweep_report.calibration(rows))
    assert table_row(md, "SST acc")[1:] == ["0.480", "0.495 ± 0.007 (2 seed(s))", "-1.5"]
    table = sweep_report.table(rows)
    assert table_row(table, "PyTorch reference: sst")[2] == "0.495 ± 0.007"
    assert table_row(table, "PyTorch reference models (1 of 3 tasks, each its best epoch)")


def test_pytorch_rows_run_the_reference_script(tmp_path, capsys):
    assert sweep.main([f"--results={tmp_path}", "--only=torch-sts,separate-sts",
                       "--seeds=0,1", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("python -m experiments.torch_finetune ")
    assert "--task=sts" in lines[0] and "--epochs=3" in lines[0] and "--seed" not in lines[0]
    assert "--train_sample=500" in lines[0] and lines[1].startswith("python -m flaxpals.main")
    assert "--seed=1" in lines[2] and "torch-sts-seed1" in lines[2]


@pytest.mark.slow
def test_smoke_pytorch_row_runs_and_reports(tmp_path):
    # MiniLM in PyTorch on 32 SST examples, 2 epochs: the row the sweep really runs.
    require("torch")
    require("transformers")
    argv = [f"--results={tmp_path}", "--budget=smoke", "--only=torch-sst"]
    assert sweep.main(argv) == 0
    records = workdir_format.read_metrics(tmp_path / "torch-sst")
    assert [r["epoch"] for r in records] == [1, 2]
    report = (tmp_path / "RESULTS.md").read_text()
    best = max(r["dev/sst"] for r in records)
    assert float(table_row(report, "PyTorch reference: sst")[2]) == pytest.approx(best, abs=6e-4)
    # A row with records but nothing to resume from (finished: its resume.pt is gone;
    # its last line cut here) starts over and keeps the earlier records aside.
    lines = (tmp_path / "torch-sst" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "torch-sst" / "metrics.jsonl").write_text(lines[0] + "\n")
    assert sweep.main(argv) == 0
    assert [r["epoch"] for r in workdir_format.read_metrics(tmp_path / "torch-sst")] == [1, 2]
    assert (tmp_path / "torch-sst" / "metrics.jsonl.1").read_text() == lines[0] + "\n"


def test_an_ema_row_is_reported_by_its_ema_figures(tmp_path):
    workdir = tmp_path / "best-val-ema"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(
        {"train": {"num_epochs": 2}, "eval": {"best_metric": "val_ema/average"}}))
    for epoch, (raw, ema, val_ema) in enumerate([(0.5, 0.6, 0.9), (0.55, 0.58, 0.8)], 1):
        workdir_format.append_metrics(workdir, {"epoch": epoch, "dev/sst": raw, "dev_ema/sst": ema,
                                      "val_ema/average": val_ema})
    row = next(r for r in sweep_report.collect(tmp_path) if r["slug"] == "best-val-ema")
    # epoch 1 by val_ema; the checkpoint kept holds the EMA weights: their dev score
    assert row["best_epochs"] == [1] and row["best"]["dev/sst"] == 0.6


def test_ensemble_rows_wait_for_every_seed_and_are_labelled(tmp_path, monkeypatch, capsys):
    from experiments import sweep_ensemble

    argv = [f"--results={tmp_path}", "--budget=smoke", "--only=best-val", "--seeds=0,1",
            "--ensemble"]
    _fake_run(tmp_path / "best-val", [0.40, 0.48])
    _fake_run(tmp_path / "best-val-seed1", [0.41])  # 1 of 2 epochs: unfinished
    ran = []

    def fake_row(row, cmd, record, workdir):
        ran.append(cmd)
        record.data["runs"].append({"seconds": 1.0, "status": "finished"})
        record.save()
        if "--mode=eval" in cmd:  # what `flaxpals.main --mode=eval --ensemble` writes
            members = cmd[cmd.index("--mode=eval") + 1].split("=", 1)[1].split(",")
            (workdir / "eval-ensemble.json").write_text(json.dumps(
                {"ensemble": True, "members": members, "steps": [20, 20], "dev/sst": 0.51,
                 "dev/average": 0.51, "member_scores": [{"dev/sst": .48}, {"dev/sst": .47}]}))
        return "finished"  # a trainer that exits 0 and writes nothing: incomplete

    monkeypatch.setattr(sweep, "run_row", fake_row)
    assert sweep.main(argv) == 1  # seed 1 did not finish: no ensemble
    assert "best-val-ensemble] not all of seeds [0, 1] have finished" in capsys.readouterr().out
    assert [c for c in ran if "--mode=eval" in c] == []

    workdir_format.append_metrics(tmp_path / "best-val-seed1", {
        "epoch": 2, "step": 20, "dev/sst": .47, "dev/average": .47})
    ran.clear()
    assert sweep.main(argv) == 0
    assert len(ran) == 1 and ran[0][2:4] == ["flaxpals.main", "--mode=eval"]
    assert ran[0][4] == f"--ensemble={tmp_path / 'best-val'},{tmp_path / 'best-val-seed1'}"
    assert ran[0][5] == f"--workdir={sweep_ensemble.workdir_of(tmp_path, 'best-val')}"
    report = (tmp_path / "RESULTS.md").read_text()
    cells = table_row(report, "Ensemble of 2 seeds (averaged probabilities): Best recipe, "
                              "epoch chosen on a validation split")
    assert cells[2] == "0.510" and cells[-1] == "2"
    assert sweep.main(argv) == 0 and len(ran) == 1  # done: not run again
    # A third seed: the 2-seed ensemble's records are set aside, the 3-seed one runs.
    _fake_run(tmp_path / "best-val-seed2", [0.42, 0.46])
    assert sweep.main(argv[:-2] + ["--seeds=0,1,2", "--ensemble"]) == 0
    assert len(ran) == 2 and ran[1][4].count(",") == 2
    ens = sweep_ensemble.workdir_of(tmp_path, "best-val")
    assert json.loads((ens / "eval-ensemble.json.1").read_text())["members"][1].endswith("seed1")
    assert (ens / "sweep.json.1").exists()
    capsys.readouterr()
    assert sweep.main(argv + ["--dry-run"]) == 0
    assert "--mode=eval --ensemble=" in capsys.readouterr().out


def test_an_ensemble_reads_the_seeds_saved_outputs_where_they_are(tmp_path):
    from experiments import sweep_ensemble

    a, b = tmp_path / "best-val", tmp_path / "best-val-seed1"
    a.mkdir()
    b.mkdir()
    (a / workdir_format.OUTPUTS_FILE).write_bytes(b"")
    assert sweep_ensemble.member(a) == a / workdir_format.OUTPUTS_FILE
    assert sweep_ensemble.member(b) == b  # no file: its best checkpoint
    ens = sweep_ensemble.workdir_of(tmp_path, "best-val")
    ens.mkdir()
    (ens / "eval-ensemble.json").write_text(json.dumps({"members": [str(a), str(b)]}))
    # Scored from checkpoints before; the same seeds read from their files: done already.
    assert sweep_ensemble.is_done(ens, [a / workdir_format.OUTPUTS_FILE, b])
    assert not sweep_ensemble.is_done(
        ens, [a / workdir_format.OUTPUTS_FILE, tmp_path / "best-val-seed2"])


def _three_task_run(workdir, sst, quora, sts):
    """A finished one-epoch multi-task run's files."""
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"train": {"num_epochs": 1}}))
    workdir_format.append_metrics(workdir, {
        "epoch": 1, "step": 10, "dev/sst": sst, "dev/quora": quora,
        "dev/sts": sts, "dev/average": (sst + quora + sts) / 3})


def test_combiners_are_set_against_pcgrad_and_proportional_beyond_the_spread(tmp_path):
    _three_task_run(tmp_path / "best-proportional", 0.494, 0.858, 0.859)
    _three_task_run(tmp_path / "best-pcgrad", 0.480, 0.850, 0.860)
    _three_task_run(tmp_path / "best-cagrad", 0.520, 0.856, 0.840)
    rows = sweep_report.collect(tmp_path)
    assert sweep_report.against_baselines(rows)[-3].endswith("– (no spread yet) |")
    # The recipe's spread: std .010 on SST, .005 on Quora and STS.
    for seed, (sst, q, sts) in enumerate([(0.48, 0.85, 0.855), (0.49, 0.855, 0.86),
                                          (0.50, 0.86, 0.865)]):
        _three_task_run(tmp_path / ("best-val" + (f"-seed{seed}" if seed else "")), sst, q, sts)
    section = "\n".join(sweep_report.against_baselines(sweep_report.collect(tmp_path)))
    # The best-recipe rows get a figure of their own, linked from the report.
    report = sweep_report.report(tmp_path, "smoke").read_text()
    assert "![dev_per_epoch_best](dev_per_epoch_best.png)" in report
    assert (tmp_path / "dev_per_epoch_best.png").read_bytes()[:4] == b"\x89PNG"
    cells = table_row(section, "Best recipe, additive + cagrad")
    assert cells[1] == "1"
    assert cells[2] == "0.520, +4.0, +2.6"  # vs PCGrad .480, vs proportional .494
    assert cells[4] == "0.840, -2.0, -1.9"
    # One seed against one: a difference's std is sqrt(2) s, so it counts beyond
    # 2.83 points on SST and 1.41 on STS: SST +4.0 and STS -2.0 vs PCGrad, STS -1.9 vs
    # proportional count; SST +2.6 vs proportional (beyond 2 s, not 2 sqrt(2) s) does not.
    assert cells[-1] == "vs PCGrad: SST acc +4.0, STS r -2.0; vs proportional: STS r -1.9"
    assert table_row(section, "Best recipe, additive + pcgrad")[2] == "0.480, –, -1.4"
    assert table_row(section, "Best recipe, additive + pcgrad")[-1] == "none"
    assert "SST acc 0.010, Quora acc 0.005, STS r 0.005" in section
    # A row mid-run shows its figures so far, but no verdict.
    _three_task_run(tmp_path / "best-mgda", 0.40, 0.70, 0.70)
    (tmp_path / "best-mgda" / "config.json").write_text(json.dumps({"train": {"num_epochs": 3}}))
    section = "\n".join(sweep_report.against_baselines(sweep_report.collect(tmp_path)))
    assert table_row(section, "Best recipe, additive + mgda (unfinished)")[-1] == "– (unfinished)"
    assert "Best recipe, additive + famo" not in section  # not run: no row
    # The methods get a figure of their own; the best-recipe figure keeps PCGrad only.
    assert "![methods](methods.png)" in report
    assert (tmp_path / "methods.png").read_bytes()[:4] == b"\x89PNG"


def test_the_shares_section_reads_the_logged_statistics(tmp_path):
    """Runs that logged gradmtl.step_stats get a line: first -> last epoch means; a
    loss weighting (coefficients only) shows no shares; runs without any, no line."""
    _three_task_run(tmp_path / "best-pcgrad", 0.480, 0.850, 0.860)  # logged nothing
    assert sweep_shares.section(sweep_report.collect(tmp_path)) == []
    _three_task_run(tmp_path / "best-imtl_g-seed1", 0.49, 0.85, 0.86)
    (tmp_path / "best-imtl_g-seed1" / "config.json").write_text(
        json.dumps({"train": {"num_epochs": 2}}))
    stats = [{"share/sst": 0.5, "share/quora": 0.2, "share/sts": 0.3, "sum_share/sst": 0.6,
              "sum_share/quora": 0.1, "sum_share/sts": 0.3},
             {"share/sst": 0.4, "share/quora": 0.3, "share/sts": 0.3, "sum_share/sst": 0.7,
              "sum_share/quora": 0.05, "sum_share/sts": 0.25}]
    for epoch, extra in enumerate(stats, 1):
        if epoch > 1:
            workdir_format.append_metrics(tmp_path / "best-imtl_g-seed1", {
                "epoch": epoch, "step": 20, "dev/average": 0.7, **{
                    f"dev/{t}": 0.7 for t in ("sst", "quora", "sts")}})
        lines = (tmp_path / "best-imtl_g-seed1" / "metrics.jsonl").read_text().splitlines()
        lines[epoch - 1] = json.dumps({**json.loads(lines[epoch - 1]), **extra, **{
            f"coef/{t}": 0.25 * epoch for t in ("sst", "quora", "sts")}})
        (tmp_path / "best-imtl_g-seed1" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    _three_task_run(tmp_path / "best-famo", 0.49, 0.85, 0.86)
    path = tmp_path / "best-famo" / "metrics.jsonl"
    path.write_text(json.dumps({**json.loads(path.read_text()), "coef/sst": 1.2,
                                "coef/quora": 0.8, "coef/sts": 1.0}) + "\n")
    section = "\n".join(sweep_shares.section(sweep_report.collect(tmp_path)))
    assert table_row(section, "Best recipe, additive + imtl_g") == [
        "Best recipe, additive + imtl_g", "1", "0.50 → 0.40 (0.60 → 0.70)",
        "0.20 → 0.30 (0.10 → 0.05)", "0.30 → 0.30 (0.30 → 0.25)",
        "0.25 → 0.50", "0.25 → 0.50", "0.25 → 0.50"]
    assert table_row(section, "Best recipe, additive + famo")[2:] == [
        "–", "–", "–", "1.20", "0.80", "1.00"]
    assert "Best recipe, additive + pcgrad" not in section
    report = sweep_report.report(tmp_path, "smoke").read_text()
    assert "## How the combiners split the shared update" in report
    assert "![shares](shares.png)" in report  # imtl_g's shares: drawn
    assert (tmp_path / "shares.png").read_bytes()[:4] == b"\x89PNG"


def test_the_methods_figure_draws_each_method_against_the_baselines(tmp_path):
    """methods.png: per task a dot per method run, the proportional row's line with the
    band of twice the recipe's spread, PCGrad's line; a method not run keeps its label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _three_task_run(tmp_path / "best-proportional", 0.494, 0.858, 0.859)
    _three_task_run(tmp_path / "best-pcgrad", 0.480, 0.850, 0.860)
    _three_task_run(tmp_path / "best-cagrad", 0.520, 0.856, 0.840)
    for seed, (sst, q, sts) in enumerate([(0.48, 0.85, 0.855), (0.49, 0.855, 0.86),
                                          (0.50, 0.86, 0.865)]):
        _three_task_run(tmp_path / ("best-val" + (f"-seed{seed}" if seed else "")), sst, q, sts)
    _three_task_run(tmp_path / "best-dwa", 0.47, 0.85, 0.86)
    (tmp_path / "best-dwa" / "config.json").write_text(json.dumps({"train": {"num_epochs": 3}}))
    rows = sweep_report.collect(tmp_path)
    drawn = []
    real_savefig = plt.Figure.savefig

    def keep(fig, path, **kw):
        drawn.append(fig)
        return real_savefig(fig, path, **kw)

    plt.Figure.savefig = keep
    try:
        sweep_plots.methods_figure(rows, tmp_path / "methods.png")
    finally:
        plt.Figure.savefig = real_savefig
    sst_panel = drawn[0].axes[0]
    at = {round(t.get_position()[1]): t.get_text() for t in sst_panel.get_yticklabels()}
    assert at[max(at)] == "sum (not run)"  # the first method (the control), on top
    # _three_task_run writes one epoch of a one-epoch run: finished, so no mark.
    assert "cagrad" in at.values() and "pcgrad" not in " ".join(at.values())
    dots = [line.get_xydata()[0] for line in sst_panel.lines if line.get_marker() == "o"]
    assert sorted((x, at[round(y)]) for x, y in dots) == [(0.47, "dwa (unfinished)"),
                                                          (0.520, "cagrad")]
    verticals = sorted(line.get_xdata()[0] for line in sst_panel.lines
                       if line.get_marker() != "o")
    assert verticals == [0.480, 0.494]  # PCGrad, proportional
    hollow = {at[round(line.get_xydata()[0][1])]: line.get_markerfacecolor()
              for line in sst_panel.lines if line.get_marker() == "o"}
    assert hollow == {"dwa (unfinished)": "white", "cagrad": "black"}
    band = sst_panel.patches[0].get_extents().transformed(sst_panel.transData.inverted())
    # twice the std of a one-seed row's difference from the one-seed baseline: 2 sqrt(2) s
    assert band.x0 == pytest.approx(0.494 - 2 * 2 ** 0.5 * 0.010, abs=1e-6)
    assert band.x1 == pytest.approx(0.494 + 2 * 2 ** 0.5 * 0.010, abs=1e-6)


def test_the_std_of_a_difference_adds_the_variances():
    # Var(a - b) = s^2 / n + s^2 / m for independent means of n and m seeds.
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.01, size=(200_000, 3)).mean(1)
    b = rng.normal(0, 0.01, size=200_000)
    assert sweep_common.difference_std(0.01, 3, 1) == pytest.approx(np.std(a - b), rel=0.01)
    assert sweep_common.difference_std(0.01, 1, 1) == pytest.approx(0.01 * 2 ** 0.5)


def test_rows_started_without_an_epoch_and_unfinished_separate_models_say_so(tmp_path):
    (tmp_path / "best-imtl_g").mkdir()
    (tmp_path / "best-imtl_g" / "config.json").write_text(
        json.dumps({"train": {"num_epochs": 3}}))
    rows = sweep_report.collect(tmp_path)
    assert table_row(sweep_report.table(rows), "Best recipe, additive + imtl_g")[1] == \
        "started, no epoch yet"
    assert table_row(sweep_report.table(rows), "PAL + PCGrad")[1] == "not run yet"
    separate = [_row("separate", "separate-sst", {"sst": 0.48}),
                _row("separate", "separate-sts", {"sts": 0.85}, done=False)]
    assert not sweep_report.combined_separate(separate)["done"]
    assert sweep_report.combined_separate(separate[:1])["done"]


def test_every_combiner_and_loss_weighting_has_a_best_recipe_row():
    from flaxpals.config_lib import COMBINERS, LOSS_WEIGHTINGS

    rows = {r.slug: r for r in sweep_common.ROWS}
    cpu = sweep_common.BUDGETS["cpu"]
    for key, names in (("combiner", COMBINERS), ("loss_weighting", LOSS_WEIGHTINGS)):
        for name in names if key == "combiner" else names[1:]:  # the sum too; not "none"
            c = sweep.build_config(rows[f"best-{name}"], cpu, {})
            assert (c.train.method, c.train[key], c.train.num_epochs) == ("additive", name, 3)
            assert (c.model.pooling, c.model.pair_encoding) == ("mean", "cross")


def test_report_shows_ensemble_members_relative(tmp_path, monkeypatch):
    """A recorded ensemble command lists absolute member paths; the report shows each
    relative to where it was written, as it does workdirs (not the writer's own tree)."""
    monkeypatch.chdir(tmp_path)
    members = [tmp_path / "docs/results/best-val/best-outputs.npz",
               tmp_path / "docs/results/best-val-seed1/best-outputs.npz"]
    arg = "--ensemble=" + ",".join(str(m) for m in members)
    assert sweep_report._shown_arg(arg) == ("--ensemble=docs/results/best-val/best-outputs.npz,"
                                            "docs/results/best-val-seed1/best-outputs.npz")
    assert sweep_report._shown_arg(f"--workdir={tmp_path}/runs/a") == "--workdir=runs/a"
    assert sweep_report._shown_arg("--ensemble=/elsewhere/a,/elsewhere/b") == (
        "--ensemble=/elsewhere/a,/elsewhere/b")


def test_machine_records_the_vector_extensions():
    """Row timings depend on AVX2 against AVX-512: each row's machine record names them,
    as /proc/cpuinfo lists them (an empty string where it lists none)."""
    from pathlib import Path

    info = host.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        listed = set(re.findall(r"\b(avx2|avx512[a-z0-9_]*)\b", cpuinfo.read_text()))
        assert listed <= set(info["cpu_flags"].split())
