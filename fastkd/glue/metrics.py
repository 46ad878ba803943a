"""GLUE metrics from scikit-learn and scipy; a task's score is the mean of its metrics.

Undefined correlations (a constant prediction) count as 0.0, the value of a predictor that
carries no information, instead of NaN poisoning an average.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from .tasks import TaskSpec


def _correlation(fn, predictions, labels) -> float:
    p, y = np.asarray(predictions, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if len(p) < 2 or np.all(p == p[0]) or np.all(y == y[0]):
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(fn(p, y)[0])
    return 0.0 if math.isnan(value) else value


METRICS = {
    "accuracy": lambda p, y: float(accuracy_score(y, p)),
    "f1": lambda p, y: float(f1_score(y, p, pos_label=1, zero_division=0.0)),
    "mcc": lambda p, y: float(matthews_corrcoef(y, p)),
    "pearson": lambda p, y: _correlation(pearsonr, p, y),
    "spearman": lambda p, y: _correlation(spearmanr, p, y),
}


def compute_metrics(spec: TaskSpec, predictions, labels) -> dict[str, float]:
    """predictions: class indices (or floats for STS-B), same order as labels."""
    return {name: METRICS[name](predictions, labels) for name in spec.metrics}


def task_score(metrics: dict[str, float]) -> float:
    return float(np.mean(list(metrics.values())))


def majority_baseline(spec: TaskSpec, train_labels, dev_labels) -> dict[str, float]:
    """Metrics of always predicting the most frequent training label (the training mean for STS-B)."""
    if spec.is_regression:
        constant = float(np.mean(train_labels))
    else:
        constant = Counter(train_labels).most_common(1)[0][0]
    return compute_metrics(spec, [constant] * len(dev_labels), dev_labels)


def prediction_summary(spec: TaskSpec, predictions) -> dict:
    """How spread the predictions are: label distribution, or variance for regression."""
    if spec.is_regression:
        p = np.asarray(predictions, dtype=np.float64)
        return {"prediction_mean": float(p.mean()), "prediction_variance": float(p.var())}
    counts = Counter(int(x) for x in predictions)
    dist = {label: counts.get(i, 0) for i, label in enumerate(spec.labels)}
    top = max(dist.values()) / max(len(predictions), 1)
    return {"predicted_labels": dist, "majority_prediction_fraction": round(top, 4)}
