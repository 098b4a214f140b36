"""Scoring across devices: 8 fake CPU devices (conftest) agree with one device."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from kdd_jax.distributed import make_mesh, sharded_map
from kdd_jax.scores import SCORES, log_probs_from
from kdd_jax.scores.pairs import score_pairs


def test_eight_fake_devices_are_configured():
    assert jax.device_count() == 8


def pairs(p=13, n=24, c=10, seed=0):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(p, n, c)).astype(np.float32)
    t = rng.normal(size=(p, n, c)).astype(np.float32)
    return s, np.asarray(jax.vmap(lambda z: log_probs_from("logits", z, c))(t))


@pytest.mark.parametrize("name", ["neg_kl", "inverse_kl", "top1", "dark_corr", "acs", "linear_cka", "rbf_cka"])
def test_scores_on_8_devices_equal_1_device_and_the_plain_loop(name):
    s, t = pairs()
    eight = np.asarray(score_pairs(name, s, t, mesh=make_mesh()))
    one = np.asarray(score_pairs(name, s, t, mesh=make_mesh(jax.devices()[:1])))
    fn = SCORES[name].fn
    loop = np.stack([np.asarray(fn(s[i], t[i])) for i in range(len(s))])
    np.testing.assert_allclose(eight, one, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eight, loop, rtol=1e-5, atol=1e-6)
    assert eight.shape[0] == 13  # padding to a multiple of 8 is dropped


def test_sharded_map_really_spreads_work_over_the_mesh():
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    mesh = make_mesh()
    out = sharded_map(lambda r: r * 2, x, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(out), x * 2)
    assert len(out.sharding.device_set) == 8


def test_sharded_map_rejects_mismatched_leading_axes():
    with pytest.raises(ValueError, match="leading axes differ"):
        sharded_map(lambda a, b: a + b, np.zeros((3, 2)), np.zeros((4, 2)))
