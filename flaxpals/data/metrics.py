"""Task metrics and the summary scores of a multi-task run.

- accuracy for classification tasks, Pearson's r for regression tasks;
- `average`: the seed's mean of the task metrics (SST acc, Quora acc, STS r);
- `overall`: the CS224N leaderboard score, with r mapped to (r + 1) / 2 so
  that every term lies in [0, 1]: (SST + Quora + (r + 1) / 2) / 3.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """predictions, labels: [n] class ids."""
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set")
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson's r of [n] scores; 0.0 when either side is constant (r is undefined)."""
    x = np.asarray(predictions, np.float64)
    y = np.asarray(labels, np.float64)
    if len(x) < 2:
        raise ValueError("Pearson's r needs at least two examples")
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


METRICS = {"accuracy": accuracy, "pearson": pearson}


def task_metric(metric: str, predictions: np.ndarray, labels: np.ndarray) -> float:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(METRICS)}")
    return METRICS[metric](predictions, labels)


def summary(scores: Mapping[str, float], metrics: Mapping[str, str]) -> dict[str, float]:
    """scores: task -> metric value; metrics: task -> metric name.

    Returns {'average': mean of the scores, 'overall': mean with r -> (r + 1) / 2}.
    """
    if not scores:
        return {}
    values = list(scores.values())
    mapped = [(v + 1) / 2 if metrics[t] == "pearson" else v for t, v in scores.items()]
    return {"average": float(np.mean(values)), "overall": float(np.mean(mapped))}
