"""Probe synthesis: the loss it minimises falls, probes are valid images, seeds fix the probes."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json

import jax
import numpy as np
import pytest

from converters import convert_student
from kdd_jax.config import parse_config
from kdd_jax.models import bn_running_stats, build_model, forward_with_bn_stats
from kdd_jax.synthesis import SynthesisConfig, SynthesisError, bn_statistics_loss, mixed_label_targets, synthesize
from tests.conftest import full_config

TINY = copy.deepcopy(full_config("resnet20"))
TINY["arch"].update(layers=[1, 1, 1], widths=[8, 8, 8])
TINY["preprocessing"]["input_size"] = [16, 16]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny ResNet with randomised BN statistics, converted from torch like a real student."""
    import json

    import torch
    from safetensors.torch import save_file

    from converters.torch_reference import build_torch_model, randomize_

    d = tmp_path_factory.mktemp("student")
    m = randomize_(build_torch_model(TINY), 0)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(TINY))
    r = convert_student(d)
    return r.model, r.config


def bns(model, x):
    _, stats = forward_with_bn_stats(model, x)
    return float(bn_statistics_loss(stats, bn_running_stats(model)))


def test_pixel_synthesis_lowers_bn_loss_and_yields_valid_images(student):
    model, cfg = student
    # aug_noise 0: the BN prior is then matched on the probes themselves (under pixel's default noise it is
    # matched on noisy views of them, which this test does not measure)
    sc = SynthesisConfig(method="pixel", n_probes=12, steps=40, restarts=2, seed=0, aug_noise=0.0)
    probes = synthesize(model, cfg, sc)
    assert probes.raw.shape == (12, 3, 16, 16) and probes.normalised.shape == (12, 16, 16, 3)
    lo, hi = cfg.preprocessing.value_range
    assert probes.raw.min() >= lo and probes.raw.max() <= hi
    start = np.clip(np.asarray(jax.random.normal(jax.random.key(0), (6, 16, 16, 3))) * 0.5, -2, 2)
    assert bns(model, probes.normalised[:6]) < 0.5 * bns(model, start)
    assert probes.loss_history[-1] < probes.loss_history[0]
    np.testing.assert_allclose(probes.targets.sum(-1), 1, rtol=1e-5)


def test_seed_fixes_the_probes(student):
    model, cfg = student
    a = synthesize(model, cfg, SynthesisConfig(n_probes=4, steps=5, seed=7))
    b = synthesize(model, cfg, SynthesisConfig(n_probes=4, steps=5, seed=7))
    c = synthesize(model, cfg, SynthesisConfig(n_probes=4, steps=5, seed=8))
    assert a.sha256 == b.sha256 and a.sha256 != c.sha256


def test_scan_and_python_loops_agree(student):
    model, cfg = student
    a = synthesize(model, cfg, SynthesisConfig(n_probes=4, steps=6, seed=1, loop="python"))
    b = synthesize(model, cfg, SynthesisConfig(n_probes=4, steps=6, seed=1, loop="scan"))
    np.testing.assert_allclose(a.normalised, b.normalised, rtol=1e-4, atol=1e-4)


def test_jitter_flip_and_low_init(student):
    """DeepInversion augmentation changes what the student sees, not the probes' validity or
    determinism; init='low' starts every pixel at or above the lowest valid value, near it."""
    from kdd_jax.synthesis.pixel import _augment
    from kdd_jax.synthesis.probes import normalised_bounds

    model, cfg = student
    lo, hi = (np.asarray(b) for b in normalised_bounds(cfg.preprocessing))
    start = synthesize(model, cfg, SynthesisConfig(n_probes=6, steps=0, init="low", init_scale=0.1, seed=3))
    assert np.all(start.normalised >= lo - 1e-6) and np.mean(start.normalised - lo) < 0.15
    plain = synthesize(model, cfg, SynthesisConfig(n_probes=6, steps=8, seed=3, aug_noise=0))
    aug = [synthesize(model, cfg, SynthesisConfig(n_probes=6, steps=8, seed=3, jitter=2, flip=True, aug_noise=0))
           for _ in range(2)]  # no noise on either side: only jitter/flip can tell them apart
    assert aug[0].sha256 == aug[1].sha256 != plain.sha256
    assert aug[0].raw.min() >= cfg.preprocessing.value_range[0] and aug[0].raw.max() <= cfg.preprocessing.value_range[1]
    # _augment: a per-group roll and mirror, so it preserves each image's pixel multiset
    x = jax.random.normal(jax.random.key(0), (3, 2, 8, 8, 1))
    y = np.asarray(_augment(jax.random.key(1), x, 2, True))
    np.testing.assert_allclose(np.sort(y.reshape(3, 2, -1), -1), np.sort(np.asarray(x).reshape(3, 2, -1), -1))
    assert not np.allclose(y, np.asarray(x))
    np.testing.assert_array_equal(np.asarray(_augment(jax.random.key(1), x, 0, False)), np.asarray(x))


def test_aug_noise_is_seeded_valid_and_keeps_earlier_fingerprints(student):
    """aug_noise=s shows the student its probes plus fresh N(0, s^2) noise each step (on top of any
    jitter/flip): deterministic per seed, valid images, other probes than without it. Pixel's default is
    1.0, every other method's 0; at 0 it is left out of the settings' identity, so fingerprints and cache
    keys made before the setting existed (and before it became pixel's default) still match."""
    from kdd_jax.synthesis.pixel import _augment
    from kdd_jax.synthesis.probes import fingerprint

    model, cfg = student
    x = jax.random.normal(jax.random.key(0), (2, 64, 8, 8, 1))
    k = jax.random.key(1)
    np.testing.assert_array_equal(np.asarray(_augment(k, x, 2, True, 0.0)), np.asarray(_augment(k, x, 2, True)))
    d = np.asarray(_augment(k, x, 0, False, 0.5)) - np.asarray(x)
    assert abs(d.std() - 0.5) < 0.03 and abs(d.mean()) < 0.03
    plain = synthesize(model, cfg, SynthesisConfig(n_probes=6, steps=8, seed=3, aug_noise=0))
    noisy = [synthesize(model, cfg, SynthesisConfig(n_probes=6, steps=8, seed=3, aug_noise=0.5)) for _ in range(2)]
    assert noisy[0].sha256 == noisy[1].sha256 != plain.sha256
    lo, hi = cfg.preprocessing.value_range
    assert noisy[0].raw.min() >= lo and noisy[0].raw.max() <= hi
    assert "aug_noise" not in SynthesisConfig(aug_noise=0).identity() and SynthesisConfig(aug_noise=0.5).identity()["aug_noise"] == 0.5
    assert fingerprint(model, cfg, SynthesisConfig(aug_noise=0)) != fingerprint(model, cfg, SynthesisConfig(aug_noise=0.5))
    # the method's default: noise for pixel, none for the others (whose identities keep their keys of before)
    assert SynthesisConfig().aug_noise == SynthesisConfig(aug_noise=None).aug_noise == 1.0
    assert SynthesisConfig().identity()["aug_noise"] == 1.0
    for method in ("confidence", "generator", "noise", "real", "ood", "mia"):
        sc = SynthesisConfig(method=method)
        assert sc.aug_noise == 0.0 and "aug_noise" not in sc.identity()
        assert SynthesisConfig(method=method, aug_noise=0).identity() == sc.identity()  # its default, said aloud
    for bad in (-0.1, float("nan"), float("inf"), "1", True):
        with pytest.raises(SynthesisError, match="aug_noise"):
            SynthesisConfig(aug_noise=bad)
    for method in ("noise", "real"):
        with pytest.raises(SynthesisError, match=f"aug_noise=0.5: aug_noise applies to the methods pixel, confidence "
                                                 f"and generator only, not to '{method}'"):
            SynthesisConfig(method=method, aug_noise=0.5)
    # every method-specific setting: a method that does not read it would ignore it silently
    for method in ("generator", "noise", "mia"):
        with pytest.raises(SynthesisError, match=f"jitter=2, flip=True, pixel_scale=2: jitter/flip/pixel_scale "
                                                 f"apply to the methods pixel and confidence only, not to '{method}'"):
            SynthesisConfig(method=method, jitter=2, flip=True, pixel_scale=2)
        with pytest.raises(SynthesisError, match=f"restarts=2, init='low': restarts/init apply to the methods pixel "
                                                 f"and confidence only, not to '{method}'"):
            SynthesisConfig(method=method, restarts=2, init="low")
    for method in ("pixel", "confidence", "real"):
        with pytest.raises(SynthesisError, match=f"z_dim=8: z_dim applies to the method generator only, not to '{method}'"):
            SynthesisConfig(method=method, z_dim=8)
    # the optimisation's own settings: noise and the pool methods optimise nothing
    for method in ("noise", "real", "ood", "mia"):
        with pytest.raises(SynthesisError, match=f"steps=60, lr=0.1, loop='scan': steps/lr/loop apply to the methods "
                                                 f"pixel, confidence and generator only, not to '{method}'"):
            SynthesisConfig(method=method, steps=60, lr=0.1, loop="scan")
        with pytest.raises(SynthesisError, match=f"ce_weight=2.0, mix_labels=False: ce_weight/mix_labels apply to "
                                                 f"the methods pixel, confidence and generator only, not to '{method}'"):
            SynthesisConfig(method=method, ce_weight=2.0, mix_labels=False)
    # the BatchNorm prior: not the BN-free confidence method; the pixel-space priors: not the generator
    with pytest.raises(SynthesisError, match="bn_weight=0.5: bn_weight applies to the methods pixel and generator "
                                             "only, not to 'confidence'"):
        SynthesisConfig(method="confidence", bn_weight=0.5)
    with pytest.raises(SynthesisError, match="tv_weight=0.0, l2_weight=0.0: tv_weight/l2_weight apply to the "
                                             "methods pixel and confidence only, not to 'generator'"):
        SynthesisConfig(method="generator", tv_weight=0.0, l2_weight=0.0)
    # settings of several groups at fault: one error names them all
    with pytest.raises(SynthesisError, match="jitter=2: jitter applies to the methods pixel and confidence only; "
                                             "aug_noise=0.5: aug_noise applies to the methods pixel, confidence and "
                                             "generator only, not to 'noise'"):
        SynthesisConfig(method="noise", jitter=2, aug_noise=0.5)
    # at their defaults they are accepted by every method, and each method takes its own
    assert SynthesisConfig(method="generator", jitter=0, flip=False, pixel_scale=1, restarts=1).method == "generator"
    assert SynthesisConfig(method="confidence", restarts=2, init="low", aug_noise=1.0).restarts == 2
    assert SynthesisConfig(method="generator", z_dim=8, batch_size=16, generator_width=8).z_dim == 8
    assert SynthesisConfig(method="generator", steps=5, lr=1e-2, bn_weight=2.0, ce_weight=0.5, mix_labels=False).steps == 5
    assert SynthesisConfig(method="confidence", steps=5, tv_weight=0.0, l2_weight=0.0, loop="scan").loop == "scan"
    assert SynthesisConfig(method="mia", steps=200, lr=None, bn_weight=1.0).method == "mia"  # defaults pass
    assert SynthesisConfig(method="confidence", aug_noise=1).identity() == SynthesisConfig(method="confidence", aug_noise=1.0).identity()
    # the cache key the benchmarks use: one per identity, so the neutral default keeps the key of before
    before = {k: v for k, v in dataclasses.asdict(SynthesisConfig(aug_noise=0)).items() if k != "aug_noise"}
    assert SynthesisConfig(aug_noise=0).identity_sha256() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    # pinned: the keys of probes cached before identity_sha256 existed (benchmarks/_work); a new setting
    # without a neutral default would change them and orphan every cache. Pixel's default since noise became
    # it is the key of the benchmarks' pixel-robust probes.
    assert SynthesisConfig(aug_noise=0.0).identity_sha256()[:8] == "6d220cdf"
    assert SynthesisConfig(method="pixel", n_probes=100, steps=200, seed=0, aug_noise=1.0).identity_sha256()[:8] == "73a80435"
    assert SynthesisConfig(aug_noise=1).identity_sha256() == SynthesisConfig().identity_sha256() \
        != SynthesisConfig(aug_noise=0).identity_sha256()


def test_coarse_pixel_grid_gives_smooth_valid_probes(student):
    """pixel_scale=s optimises an (H/s x W/s) grid and shows the student its bilinear upsampling:
    at s = H every probe is one flat colour; at s = 2 the probes are smoother than at s = 1; all
    stay valid and deterministic."""
    model, cfg = student
    h, w = cfg.preprocessing.input_size
    lo, hi = cfg.preprocessing.value_range
    flat = synthesize(model, cfg, SynthesisConfig(n_probes=4, steps=5, pixel_scale=max(h, w), seed=1))
    assert flat.raw.shape[-2:] == (h, w)
    np.testing.assert_allclose(flat.raw, flat.raw[..., :1, :1] * np.ones_like(flat.raw), atol=1e-6)
    fine, coarse = (synthesize(model, cfg, SynthesisConfig(n_probes=4, steps=5, pixel_scale=s, seed=1)) for s in (1, 2))
    tv = lambda x: np.abs(np.diff(x, axis=-1)).mean() + np.abs(np.diff(x, axis=-2)).mean()  # noqa: E731
    assert tv(coarse.raw) < 0.7 * tv(fine.raw)
    again = synthesize(model, cfg, SynthesisConfig(n_probes=4, steps=5, pixel_scale=2, seed=1))
    assert again.sha256 == coarse.sha256 != fine.sha256
    assert coarse.raw.min() >= lo and coarse.raw.max() <= hi
    with pytest.raises(SynthesisError, match="pixel_scale"):
        SynthesisConfig(pixel_scale=0)


def test_student_without_batchnorm_is_refused_with_a_reason():
    cfg = parse_config(full_config("vgg_plain_nested"))
    with pytest.raises(SynthesisError, match="no BatchNorm"):
        synthesize(build_model(cfg), cfg, SynthesisConfig(n_probes=2, steps=1))


def test_mixed_targets_pair_two_distinct_classes():
    w = np.asarray(mixed_label_targets(jax.random.key(0), 200, 10))
    np.testing.assert_allclose(w.sum(-1), 1, rtol=1e-6)
    assert ((w > 0).sum(-1) <= 2).all() and ((w > 0).sum(-1) == 2).mean() > 0.95


def test_bn_free_method_probes_a_student_without_batchnorm():
    """The "confidence" method needs no BN: on a BN-free student it must make the student agree
    with the mixed targets far more than at the start."""
    cfg = parse_config(full_config("vgg_plain_nested"))
    model = build_model(cfg, seed=2)
    from kdd_jax.synthesis import soft_cross_entropy

    start = synthesize(model, cfg, SynthesisConfig(method="confidence", n_probes=8, steps=0, seed=0))
    done = synthesize(model, cfg, SynthesisConfig(method="confidence", n_probes=8, steps=40, seed=0))
    ce = [float(soft_cross_entropy(model(p.normalised), p.targets)) for p in (start, done)]
    assert ce[1] < 0.5 * ce[0], ce
    lo, hi = cfg.preprocessing.value_range
    assert done.raw.min() >= lo and done.raw.max() <= hi


def test_noise_baseline_is_seeded_and_in_range(student):
    model, cfg = student
    a = synthesize(model, cfg, SynthesisConfig(method="noise", n_probes=5, seed=1))
    b = synthesize(model, cfg, SynthesisConfig(method="noise", n_probes=5, seed=1))
    assert a.sha256 == b.sha256 and a.raw.shape == (5, 3, 16, 16)
    assert 0.0 <= a.raw.min() and a.raw.max() <= 1.0 and a.raw.std() > 0.2
