"""Evaluation protocol: our AUC equals sklearn's (the authors' score2detect.py uses it), accuracy
and the leave-one-out binary rates behave as documented."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from kdd_jax.evaluation import (
    binary_auc,
    binary_rates_loo,
    margin_statistic,
    multiple_choice_metrics,
    ovr_auc,
    softmax_over_teachers,
)


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn_including_ties(seed):
    rng = np.random.default_rng(seed)
    m, k = 40, 4
    labels = np.concatenate([np.arange(k), rng.integers(0, k, m - k)])
    scores = np.round(rng.normal(size=(m, k)), 1)  # rounding makes ties
    probs = softmax_over_teachers(scores)
    assert ovr_auc(labels, probs) == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"), abs=1e-12)
    pos = rng.integers(0, 2, m).astype(bool)
    assert binary_auc(pos, scores[:, 0]) == pytest.approx(roc_auc_score(pos, scores[:, 0]), abs=1e-12)


def test_multiple_choice_metrics_per_run():
    labels = np.array([0, 1, 2, 0])
    perfect = np.eye(3)[labels] * 5
    wrong = np.roll(perfect, 1, axis=-1)
    m = multiple_choice_metrics(np.stack([perfect, wrong]), labels)
    assert m["accuracy_per_run"] == [1.0, 0.0] and m["accuracy"] == 0.5 and m["accuracy_std"] == 0.5
    assert m["auc_per_run"][0] == 1.0 and m["auc_per_run"][1] < 0.5
    assert m["auc_per_run"][1] == pytest.approx(roc_auc_score(labels, softmax_over_teachers(wrong), multi_class="ovr"))
    with pytest.raises(ValueError, match="students"):
        multiple_choice_metrics(perfect, labels[:3])


def test_ties_earn_fractional_credit_not_argmax_luck():
    labels = np.array([0, 1])
    tied = np.array([[1.0, 1.0, 0.0], [2.0, 2.0, 2.0]])  # 2-way tie incl. truth; 3-way tie
    assert multiple_choice_metrics(tied, labels)["accuracy"] == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_margin_statistic_ignores_per_student_offsets():
    s = np.array([[1.0, 3.0, 2.0]])
    assert margin_statistic(s) == pytest.approx([1.5])
    assert margin_statistic(s - 10) == pytest.approx(margin_statistic(s))


def test_binary_rates_loo():
    d = np.linspace(5, 6, 20)
    sep = binary_rates_loo(d, np.linspace(0, 1, 10))
    assert sep["fpr"] == 0.0 and sep["tpr"] >= 0.85
    same = binary_rates_loo(d, d[::2].copy())
    assert same["fpr"] >= 0.8  # indistinguishable controls are flagged as often as students
    with pytest.raises(ValueError):
        binary_rates_loo([1.0], [0.0])
