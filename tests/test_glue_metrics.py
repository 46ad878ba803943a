import math

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from fastkd.glue.metrics import compute_metrics, majority_baseline, prediction_summary, task_score
from fastkd.glue.tasks import task_spec


def test_agree_with_sklearn_and_scipy_on_random_predictions():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 500), rng.integers(0, 2, 500)
    m = compute_metrics(task_spec("mrpc"), p, y)
    assert m["f1"] == pytest.approx(f1_score(y, p)) and m["accuracy"] == pytest.approx((y == p).mean())
    assert compute_metrics(task_spec("cola"), p, y)["mcc"] == pytest.approx(matthews_corrcoef(y, p))
    ys, ps = rng.uniform(0, 5, 300), rng.uniform(0, 5, 300)
    s = compute_metrics(task_spec("stsb"), ps, ys)
    assert s["pearson"] == pytest.approx(pearsonr(ps, ys)[0]) and s["spearman"] == pytest.approx(spearmanr(ps, ys)[0])


def test_hand_checked_small_cases():
    # Confusion matrix tp=3, tn=2, fp=1, fn=1: MCC = (3*2 - 1*1) / sqrt(4*4*3*3) = 5/12.
    y = [1, 1, 1, 1, 0, 0, 0]
    p = [1, 1, 1, 0, 1, 0, 0]
    assert compute_metrics(task_spec("cola"), p, y)["mcc"] == pytest.approx(5 / 12)
    # F1 = 2*3 / (2*3 + 1 + 1) = 0.75, accuracy 5/7.
    m = compute_metrics(task_spec("mrpc"), p, y)
    assert m["f1"] == pytest.approx(0.75) and m["accuracy"] == pytest.approx(5 / 7)
    assert task_score(m) == pytest.approx((0.75 + 5 / 7) / 2)
    # Spearman with a tie: ranks of p = [1, 2.5, 2.5, 4] against [1, 2, 3, 4].
    ranks_p, ranks_y = np.array([1, 2.5, 2.5, 4]), np.array([1, 2, 3, 4])
    expected = np.corrcoef(ranks_p, ranks_y)[0, 1]
    assert compute_metrics(task_spec("stsb"), [0.1, 0.5, 0.5, 0.9], [1.0, 2.0, 3.0, 4.0])["spearman"] == pytest.approx(expected)


def test_degenerate_predictions_score_zero_not_nan():
    y = [0, 1, 1, 0, 1]
    assert compute_metrics(task_spec("cola"), [1] * 5, y)["mcc"] == 0.0
    s = compute_metrics(task_spec("stsb"), [2.5] * 5, [0.0, 1.0, 2.0, 3.0, 4.0])
    assert s == {"pearson": 0.0, "spearman": 0.0}
    assert compute_metrics(task_spec("mrpc"), [0] * 5, y)["f1"] == 0.0
    assert all(not math.isnan(v) for v in s.values())


def test_majority_baseline_and_prediction_summary():
    spec = task_spec("sst2")
    base = majority_baseline(spec, train_labels=[1, 1, 0], dev_labels=[1, 0, 0, 0])
    assert base == {"accuracy": 0.25}
    assert majority_baseline(task_spec("stsb"), [1.0, 3.0], [0.0, 4.0]) == {"pearson": 0.0, "spearman": 0.0}
    summary = prediction_summary(spec, np.array([1, 1, 1, 0]))
    assert summary == {"predicted_labels": {"0": 1, "1": 3}, "majority_prediction_fraction": 0.75}
    assert prediction_summary(task_spec("stsb"), [1.0, 3.0])["prediction_variance"] == pytest.approx(1.0)
