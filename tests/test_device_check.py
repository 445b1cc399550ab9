"""The prepared accelerator check, run on the CPU at tiny shapes so that it cannot rot
before a session with a GPU needs it (benchmarks/device_check.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # two tiny flaxpals runs and three PyTorch ones in subprocesses: ~3 min
def test_the_device_check_runs_every_section_at_tiny_shapes(tmp_path):
    out = tmp_path / "check.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.device_check", "--tiny",
                             f"--out={out}", "--reps=2"], cwd=ROOT, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["tiny"] and report["environment"]["backend"] == "cpu"
    cold, warm, torch = report["e2e"]["sides"]
    assert (cold["side"], warm["side"], torch["side"]) == (
        "flaxpals, cold", "flaxpals, warm", "PyTorch, 3 models")
    # The task is data: the 3-task run compiles one train and one predict program (cross-
    # encoded pairs, one length), and the warm run loads them from the cache.
    programs = {k: v["programs"] for k, v in cold["compile_by_function"].items()}
    assert programs["jit(train_step)"] == 1 and programs["jit(predict_step)"] == 1
    assert warm["compile_programs"] == 0 and warm["cache_hits"] >= 2
    assert set(report["e2e"]["wall_over_pytorch"]) == {s["side"] for s in (cold, warm, torch)}
    for side in (cold, warm, torch):
        assert {"dev/sst", "dev/quora", "dev/sts"} <= set(side["dev"])
    (row,) = report["steps"]["shapes"]
    assert report["steps"]["encoder"] == "tiny" and report["steps"]["weights"] == "random"
    assert row["flops_per_step"] > 0 and row["step_s"] > 0
    assert row["mfu"] is None  # no peak for a CPU: never a made-up figure
    outputs = report["packing"]["outputs"]
    assert {k.split("/")[0] for k in outputs} == {"sst", "quora", "sts"}
    for key, row in outputs.items():  # packed outputs are the padded ones
        assert row["max_abs_diff"] <= (1e-5 if key.endswith("float32") else 1e-2), key
    assert {"fixed", "packed"} <= set(report["packing"]["steps"])
