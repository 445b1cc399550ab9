"""benchmarks.bench_e2e's summary of a side: figures summed over its runs, and dev
scores that cover every task of the side, not the last run's."""

import pytest

from benchmarks import bench_e2e


def run(wall, steps, dev):
    os_figures = {"wall_s": wall, "cpu_s": wall, "peak_rss_gb": 1.0}
    timings = {"first_step_s": 1.0, "steady_step_s": 0.5, "steps": steps,
               "steady_steps_s": steps * 0.5, "compiling_steps_s": 0.0, "eval_s": 2.0,
               "total_s": wall - 1.0}
    return os_figures, timings, dev


def test_three_single_task_runs_sum_and_average_over_all_tasks():
    # Each PyTorch run reports average/overall over its own task only.
    side = bench_e2e.side("PyTorch, 3 models", [
        run(100.0, 10, {"dev/sst": 0.46, "dev/average": 0.46, "dev/overall": 0.46}),
        run(200.0, 20, {"dev/quora": 0.83, "dev/average": 0.83, "dev/overall": 0.83}),
        run(50.0, 5, {"dev/sts": 0.82, "dev/average": 0.82, "dev/overall": 0.91}),
    ])
    assert side["wall_s"] == 350.0 and side["steps"] == 35 and side["exit_s"] == 3.0
    dev = side["dev"]
    assert dev["dev/average"] == pytest.approx((0.46 + 0.83 + 0.82) / 3)
    assert dev["dev/overall"] == pytest.approx((0.46 + 0.83 + (0.82 + 1) / 2) / 3)
    assert {k: dev[k] for k in ("dev/sst", "dev/quora", "dev/sts")} == {
        "dev/sst": 0.46, "dev/quora": 0.83, "dev/sts": 0.82}


def test_one_run_keeps_its_own_scores():
    dev = {"dev/sst": 0.45, "dev/quora": 0.83, "dev/sts": 0.83,
           "dev/average": 0.70, "dev/overall": 0.73, "train/sst": 0.6}
    side = bench_e2e.side("flaxpals", [run(100.0, 10, dev)])
    assert side["dev"] == {k: v for k, v in dev.items() if k.startswith("dev/")}
