"""experiments/pair_threshold.py: the fitted threshold, and its errors before any compute."""

import numpy as np
import pytest


@pytest.fixture(scope="module")
def script():
    from experiments import pair_threshold

    return pair_threshold


def test_best_threshold_separates_shifted_logits(script):
    # Every logit is positive (the bias-free dot-product head's failure): threshold 0
    # gets only the positives right, 3 of 6; a cut between 0.3 and 0.5 gets all 6.
    logits = np.array([0.1, 0.2, 0.3, 0.5, 0.6, 0.9])
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert ((logits > 0) == labels).mean() == pytest.approx(3 / 6)
    threshold, accuracy = script.best_threshold(logits, labels)
    assert accuracy == 1.0
    assert 0.3 <= threshold < 0.5


def test_best_threshold_reports_the_best_it_can(script):
    # Not separable: labels 1,0,1,1 over rising logits. All predicted 1 (a cut below
    # the smallest logit) and a cut between 2 and 3 both get 3 of 4; no cut gets 4.
    threshold, accuracy = script.best_threshold(np.array([1.0, 2.0, 3.0, 4.0]),
                                                np.array([1, 0, 1, 1]))
    assert accuracy == 0.75
    assert threshold < 1.0 or 2.0 <= threshold < 3.0
    # All positive: only the cut below the smallest logit gets every pair right.
    assert script.best_threshold(np.array([1.0, 2.0, 3.0]), np.array([1, 1, 1])) == (
        -np.inf, 1.0)


def test_unknown_row_and_missing_run_are_named(script, tmp_path, capsys):
    with pytest.raises(SystemExit):
        script.main(["--row=no-such-row"])
    assert "no-such-row" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--row=pal-annealed", f"--results={tmp_path}"])
    assert "no best checkpoint" in capsys.readouterr().err
