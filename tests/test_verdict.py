"""The decision's statistics on synthetic scores with a known answer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdd_jax.verdict import decide, pointwise_score_fn


def scores(shift, k=3, n=60, seed=0):
    s = np.random.default_rng(seed).normal(size=(k, n)).astype(np.float32)
    s[1] += shift
    return s


def test_clear_winner_gets_small_p_value_and_intervals_cover_means():
    s = scores(1.0)
    v = decide(["a", "b", "c"], pointwise_score_fn(s), s.shape[1], n_bootstrap=2000)
    assert v.winner == "b" and v.p_value < 0.01
    for k, (lo, hi) in enumerate(v.intervals):
        assert lo < s[k].mean() < hi
    assert v.margin == pytest.approx(s[1].mean() - np.sort(s.mean(1))[-2], rel=1e-5)


def test_no_difference_gives_uniformish_p_values():
    """Under the null (identical teachers), p = P(margin <= 0) must not be small too often."""
    ps = []
    for seed in range(40):
        s = scores(0.0, k=2, seed=seed)
        ps.append(decide(["a", "b"], pointwise_score_fn(s), s.shape[1], n_bootstrap=400, seed=seed).p_value)
    ps = np.asarray(ps)
    assert (ps < 0.05).mean() <= 0.15 and np.median(ps) > 0.2  # the winner is the max of two: p leans low, not to 0


def test_set_level_score_fn_and_determinism():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    ys = jnp.asarray(np.stack([x + 0.1 * rng.normal(size=x.shape), rng.normal(size=x.shape)]), jnp.float32)
    x = jnp.asarray(x)

    def score_fn(idx):
        return jax.vmap(lambda y: -((x[idx] - y[idx]) ** 2).mean())(ys)

    a = decide(["close", "far"], score_fn, 50, n_bootstrap=300, seed=3)
    b = decide(["close", "far"], score_fn, 50, n_bootstrap=300, seed=3)
    assert a == b and a.winner == "close" and a.p_value < 0.01


def test_single_candidate_and_empty_list():
    v = decide(["only"], pointwise_score_fn(np.ones((1, 5), np.float32)), 5, n_bootstrap=10)
    assert v.winner == "only" and v.runner_up is None
    with pytest.raises(ValueError, match="no candidate"):
        decide([], pointwise_score_fn(np.ones((0, 5), np.float32)), 5)
