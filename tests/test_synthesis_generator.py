"""Generator synthesis (GDFQ / Qimera family): a generator trained through the frozen student.

Thresholds were measured on the TINY student (seed 0, 150 steps, lr 1e-2, bn_weight 0.05) and set
with margin: BN-statistics loss 25.2 trained vs 78.3 untrained (assert < 0.5x); loss history mean of
the last 10 steps 3.48 vs first 10 steps 5.21 (assert < 0.8x); student argmax among the two mixed
classes 0.44 of 64 probes trained vs 0.19 untrained, chance 0.2 (assert > 0.3); soft CE against
the probes' own targets 2.17 vs 2.44 against shuffled targets (assert lower).
"""

from __future__ import annotations

import numpy as np
import pytest

from kdd_jax.config import parse_config
from kdd_jax.models import build_model
from kdd_jax.synthesis import SynthesisConfig, SynthesisError, soft_cross_entropy, synthesize
from tests.conftest import full_config
from tests.test_synthesis import bns, student  # noqa: F401  (module fixture: tiny BN student)

SMALL = dict(method="generator", batch_size=32, z_dim=32, generator_width=16, lr=1e-2, bn_weight=0.05)


@pytest.fixture(scope="module")
def trained(student):  # noqa: F811
    model, cfg = student
    return synthesize(model, cfg, SynthesisConfig(n_probes=64, steps=150, seed=0, **SMALL))


def mean_bns(model, x):
    return np.mean([bns(model, x[i: i + 32]) for i in range(0, len(x), 32)])


def test_generator_probes_match_bn_statistics_and_are_valid_images(student, trained):  # noqa: F811
    model, cfg = student
    untrained = synthesize(model, cfg, SynthesisConfig(n_probes=64, steps=0, seed=0, **SMALL))
    assert trained.raw.shape == (64, 3, 16, 16) and trained.normalised.shape == (64, 16, 16, 3)
    assert trained.targets.shape == (64, 10)
    np.testing.assert_allclose(trained.targets.sum(-1), 1, rtol=1e-5)
    lo, hi = cfg.preprocessing.value_range
    assert np.isfinite(trained.raw).all() and trained.raw.min() >= lo and trained.raw.max() <= hi
    assert trained.raw.std() > 0.01  # not a constant image
    assert mean_bns(model, trained.normalised) < 0.5 * mean_bns(model, untrained.normalised)
    h = trained.loss_history
    assert h.shape == (150,) and h[-10:].mean() < 0.8 * h[:10].mean()


def test_student_predictions_follow_the_mixed_targets(student, trained):  # noqa: F811
    model, _ = student
    logits = np.asarray(model(trained.normalised))
    top2 = np.argsort(-trained.targets, -1)[:, :2]
    am = logits.argmax(-1)
    assert ((am == top2[:, 0]) | (am == top2[:, 1])).mean() > 0.3  # chance: 0.2
    shuffled = trained.targets[np.random.default_rng(0).permutation(len(am))]
    assert float(soft_cross_entropy(logits, trained.targets)) < float(soft_cross_entropy(logits, shuffled))


def test_seed_fixes_the_generator_probes(student):  # noqa: F811
    model, cfg = student
    kw = dict(SMALL, batch_size=8, n_probes=10, steps=3)  # 10 probes: two batches, truncated
    a = synthesize(model, cfg, SynthesisConfig(seed=7, **kw))
    b = synthesize(model, cfg, SynthesisConfig(seed=7, **kw))
    c = synthesize(model, cfg, SynthesisConfig(seed=8, **kw))
    assert a.raw.shape == (10, 3, 16, 16)
    assert a.sha256 == b.sha256 and a.sha256 != c.sha256
    np.testing.assert_array_equal(a.loss_history, b.loss_history)


def test_aug_noise_trains_the_generator_on_noisy_views_and_keeps_clean_probes(student):  # noqa: F811
    """aug_noise=s: the student sees each training batch plus fresh N(0, s^2) noise, so the generator
    learns other weights, deterministically per seed; the probes it then makes are clean, valid images."""
    from kdd_jax.synthesis.probes import normalised_bounds

    model, cfg = student
    kw = dict(SMALL, batch_size=8, n_probes=10, steps=3, seed=7)
    plain = synthesize(model, cfg, SynthesisConfig(**kw))
    noisy = [synthesize(model, cfg, SynthesisConfig(aug_noise=0.5, **kw)) for _ in range(2)]
    assert noisy[0].sha256 == noisy[1].sha256 != plain.sha256
    # the noise itself acts: any aug_noise > 0 takes the same key path (the generator's batch is drawn with the
    # same key), so a negligible std reproduces the batch and only the noise added to it changes the loss
    faint = synthesize(model, cfg, SynthesisConfig(aug_noise=1e-9, **kw))
    assert abs(faint.loss_history[0] - noisy[0].loss_history[0]) > 1e-3
    lo, hi = (np.asarray(b).reshape(-1) for b in normalised_bounds(cfg.preprocessing))
    x = noisy[0].normalised
    assert np.isfinite(x).all() and (x >= lo - 1e-6).all() and (x <= hi + 1e-6).all()  # NHWC, bounds per channel
    # the same generator weights at step 0: identical probes, noise or not (noise only acts in training)
    at0 = [synthesize(model, cfg, SynthesisConfig(**{**kw, "steps": 0}, aug_noise=a)) for a in (0.0, 0.5)]
    assert at0[0].sha256 == at0[1].sha256


def test_generator_refuses_a_student_without_batchnorm():
    cfg = parse_config(full_config("vgg_plain_nested"))
    with pytest.raises(SynthesisError, match="no BatchNorm"):
        synthesize(build_model(cfg), cfg, SynthesisConfig(method="generator", n_probes=2, steps=1))
