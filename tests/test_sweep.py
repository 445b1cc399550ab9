"""The sweep on the smoke budget (tiny config): rows run, the report fills, a rerun resumes.

Each row is a real `python -m flaxpals.main` subprocess on the tiny config and
the real CS224N files; it is killed mid-run (the trainer's fault injection)
to exercise resumption.
"""

import json
import re

import pytest

from flaxpals import sweep
from flaxpals.train import KILL_AFTER_STEP_ENV

ROW = "separate-sst"  # one task: the cheapest row to compile (a cold compile dominates)


def epochs(workdir):
    return [json.loads(line)["epoch"] for line in
            (workdir / "metrics.jsonl").read_text().splitlines()]


def table_row(markdown: str, name: str) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == name:
            return cells
    raise AssertionError(f"no table row {name!r} in\n{markdown}")


def test_smoke_sweep_reports_and_resumes(tmp_path, monkeypatch):
    argv = [f"--results={tmp_path}", "--budget=smoke", f"--only={ROW}"]
    workdir = tmp_path / ROW

    # 1. The row is killed after step 5 of 8 (epoch 1 is complete and checkpointed).
    monkeypatch.setenv(KILL_AFTER_STEP_ENV, "5")
    assert sweep.main(argv) == 1
    assert epochs(workdir) == [1]
    runs = json.loads((workdir / "sweep.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["failed (exit code -9)"]
    monkeypatch.delenv(KILL_AFTER_STEP_ENV)

    # 2. The same command resumes it from its checkpoint.
    assert sweep.main(argv) == 0
    assert epochs(workdir) == [1, 2], "the resumed row repeated or lost an epoch"
    record = json.loads((workdir / "sweep.json").read_text())
    assert [r["status"] for r in record["runs"]] == ["failed (exit code -9)", "finished"]
    assert record["seconds"] == pytest.approx(sum(r["seconds"] for r in record["runs"]))
    assert all(r["seconds"] > 0 for r in record["runs"])

    report = (tmp_path / "RESULTS.md").read_text()
    logged = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
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
