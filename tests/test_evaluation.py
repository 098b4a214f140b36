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
    tie_aware_accuracy,
    tie_aware_share,
    zoo_metrics,
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


def test_zoo_metrics_combines_runs_recipes_and_controls():
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 2, 0, 1, 2])
    recipes = np.array(["soft", "soft", "soft", "hard", "hard", "hard"])
    runs = []
    for _ in range(3):
        s = rng.normal(size=(6, 3))
        s[np.arange(3), labels[:3]] += 10  # the soft students are always found; the hard ones at random
        runs.append(s)
    S = np.stack(runs)
    C = rng.normal(size=(3, 4, 3))  # controls: no teacher stands out
    out = zoo_metrics(S, labels, recipes=recipes, controls=C)
    mc = multiple_choice_metrics(S, labels)
    assert {k: out[k] for k in mc} == mc
    assert list(out["per_recipe"]) == ["soft", "hard"]
    assert out["per_recipe"]["soft"] == 1.0
    assert out["per_recipe"]["hard"] == pytest.approx(np.mean([tie_aware_accuracy(s[3:], labels[3:]) for s in S]))
    rates = [binary_rates_loo(margin_statistic(s), margin_statistic(c)) for s, c in zip(S, C)]
    assert out["binary"] == {"tpr": pytest.approx(np.mean([r["tpr"] for r in rates])),
                             "fpr": pytest.approx(np.mean([r["fpr"] for r in rates])), "tpr_target": 0.9, "n_controls": 4}
    # one run given as [M, K]; no controls -> no binary block; an empty control set -> fpr nan
    single = zoo_metrics(S[0], labels, recipes=recipes)
    assert single["runs"] == 1 and "binary" not in single
    empty = zoo_metrics(S, labels, controls=np.stack([[] for _ in S]))["binary"]
    assert empty["n_controls"] == 0 and np.isnan(empty["fpr"]) and 0 < empty["tpr"] <= 1
    # ties share the credit, per recipe as overall (argmax would credit the first teacher in full)
    tied = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 0.0, 0.0]])
    t = zoo_metrics(tied, np.array([0, 2, 0]), recipes=["a", "a", "b"])
    assert t["per_recipe"] == {"a": 0.5, "b": 1.0} and t["accuracy"] == pytest.approx(2 / 3)
    # one student: no leave-one-out threshold exists, so no binary block (even with controls)
    assert "binary" not in zoo_metrics(S[:, :1], labels[:1], recipes=list(recipes[:1]), controls=C)
    with pytest.raises(ValueError, match="recipes"):
        zoo_metrics(S, labels, recipes=recipes[:5])
    with pytest.raises(ValueError, match="recipes"):
        zoo_metrics(S, labels, recipes="abcdef")
    with pytest.raises(ValueError, match="controls"):
        zoo_metrics(S, labels, controls=C[:2])


def test_tie_aware_share_splits_tied_tops_by_their_hits():
    scores = np.array([[2.0, 2.0, 0.0, 0.0],   # tie of teachers 0 and 1, only 1 a hit -> 1/2
                       [0.0, 1.0, 1.0, 1.0],   # 3-way tie, 2 hits -> 2/3
                       [5.0, 0.0, 0.0, 0.0]])  # clear top, a hit -> 1
    hits = np.array([[0, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1]], bool)
    assert tie_aware_share(scores, hits) == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert tie_aware_share(scores, ~hits) == pytest.approx(1 - (1 / 2 + 2 / 3 + 1) / 3)
    labels = np.array([1, 2, 0])  # the accuracy is the share with one-hot hits
    assert tie_aware_accuracy(scores, labels) == tie_aware_share(scores, np.eye(4, dtype=bool)[labels])
    with pytest.raises(ValueError, match="hits"):
        tie_aware_share(scores, hits[:2])
