"""benchmarks/confidence_profile.py's candidate scores: a teacher the student copies exactly scores
highest on every one of them, and the per-teacher z-scores measure each control against the others."""

from __future__ import annotations

import numpy as np


def test_a_copied_teacher_wins_every_confidence_score():
    from benchmarks.confidence_profile import CANDIDATES, candidate_scores, log_softmax, stats

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (3, 400, 10))  # 3 teachers
    T = stats(log_softmax(logits))
    s = stats(log_softmax(logits[1]))  # the student IS teacher 1
    out = candidate_scores(s, T)
    assert set(out) == set(CANDIDATES)
    for name, v in out.items():
        assert v.shape == (3,) and int(np.argmax(v)) == 1, (name, v)
    np.testing.assert_allclose([out[n][1] for n in ("entropy_corr", "margin_corr", "own_label_conf_corr")], 1.0)
    assert out["boundary_student10"][1] == out["boundary_teacher10"][1] == 1.0
    idx = np.arange(0, 400, 4)
    assert candidate_scores(s, T, idx)["margin_corr"].shape == (3,)


def test_zscore_leaves_each_control_out():
    from benchmarks.confidence_profile import zscore

    C = np.array([[0.0, 1.0], [1.0, 1.5], [2.0, 0.5], [3.0, 1.0]])
    S = np.array([[5.0, 1.0]])
    zs, zc = zscore(S, C)
    np.testing.assert_allclose(zs[0, 0], (5.0 - 1.5) / C[:, 0].std(ddof=1))
    rest = np.delete(C, 3, 0)
    np.testing.assert_allclose(zc[3], (C[3] - rest.mean(0)) / rest.std(0, ddof=1))
