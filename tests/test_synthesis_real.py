"""Real-image baselines (real / ood / mia): which images they pick, and their errors."""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest

from kdd_jax.config import parse_config
from kdd_jax.io import write_safetensors
from kdd_jax.models import build_model, predict_logits
from kdd_jax.synthesis import ImagePool, SynthesisConfig, SynthesisError, synthesize
from tests.conftest import full_config

CFG = copy.deepcopy(full_config("resnet20"))
CFG["arch"].update(layers=[1, 1, 1], widths=[8, 8, 8])
CFG["preprocessing"]["input_size"] = [8, 8]


@pytest.fixture(scope="module")
def student():
    config = parse_config(CFG)
    return build_model(config, seed=3), config


@pytest.fixture(scope="module")
def pool(student):
    _, config = student
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (40, 3, 8, 8)).astype(np.float32)
    return ImagePool(x, rng.integers(0, 10, 40), "test pool")


def normalised(pool, config):
    pre = config.preprocessing
    return (pool.images.transpose(0, 2, 3, 1) - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)


def test_real_draws_distinct_pool_images_fixed_by_the_seed(student, pool):
    model, config = student
    a = synthesize(model, config, SynthesisConfig(method="real", n_probes=10, seed=1), pool=pool)
    b = synthesize(model, config, SynthesisConfig(method="real", n_probes=10, seed=1), pool=pool)
    c = synthesize(model, config, SynthesisConfig(method="real", n_probes=10, seed=2), pool=pool)
    assert a.sha256 == b.sha256 != c.sha256
    picked = [int(np.nonzero((pool.images == p).all(axis=(1, 2, 3)))[0][0]) for p in a.raw]
    assert len(set(picked)) == 10  # exact pool pixels, without replacement
    assert np.array_equal(a.targets, np.eye(10)[pool.labels[picked]])  # labels become one-hot targets


def test_ood_keeps_the_highest_energy_images(student, pool):
    model, config = student
    energy = np.asarray(jax.nn.logsumexp(predict_logits(model, normalised(pool, config)), -1))
    probes = synthesize(model, config, SynthesisConfig(method="ood", n_probes=5), pool=pool)
    assert np.array_equal(probes.raw, pool.images[np.sort(np.argsort(-energy)[:5])])


def test_mia_uses_the_loss_with_labels_and_confidence_without(student, pool):
    model, config = student
    logp = np.asarray(jax.nn.log_softmax(predict_logits(model, normalised(pool, config)), -1))
    loss_pick = np.sort(np.argsort(-logp[np.arange(40), pool.labels])[:5])
    conf_pick = np.sort(np.argsort(-logp.max(-1))[:5])
    assert not np.array_equal(loss_pick, conf_pick)  # the two attacks differ here, so the test can tell them apart
    sc = SynthesisConfig(method="mia", n_probes=5)
    assert np.array_equal(synthesize(model, config, sc, pool=pool).raw, pool.images[loss_pick])
    unlabelled = ImagePool(pool.images)
    assert np.array_equal(synthesize(model, config, sc, pool=unlabelled).raw, pool.images[conf_pick])


def test_pool_files_uint8_nhw_and_errors(student, tmp_path):
    model, config = student
    one_channel = parse_config({**CFG, "preprocessing": {**CFG["preprocessing"], "channels": 1, "mean": [0.5], "std": [0.25]},
                                "arch": {**CFG["arch"], "in_channels": 1}})
    imgs = np.random.default_rng(1).integers(0, 256, (6, 8, 8), dtype=np.uint8)
    f = tmp_path / "pool.npz"
    np.savez(f, images=imgs, labels=np.arange(6))
    p = ImagePool.from_file(f, one_channel)
    assert p.images.shape == (6, 1, 8, 8) and np.allclose(p.images[:, 0], imgs / 255.0)
    st = tmp_path / "pool.safetensors"
    write_safetensors(st, {"images": np.zeros((4, 3, 8, 8), np.float32)})
    assert ImagePool.from_file(st, config).labels is None
    bad = [
        (ImagePool(np.zeros((4, 3, 9, 8), np.float32), source="p"), "shape \\(4, 3, 9, 8\\).*\\[N, 3, 8, 8\\]"),
        (ImagePool(np.full((4, 3, 8, 8), 2.0, np.float32), source="p"), "outside the student's value_range"),
        (ImagePool(np.full((4, 3, 8, 8), np.nan, np.float32), source="p"), "NaN"),
        (ImagePool(np.zeros((4, 3, 8, 8), np.float32), np.array([0, 1, 2, 10]), "p"), "labels must be 4 integers in \\[0, 10\\)"),
        (ImagePool(np.zeros((4, 3, 8, 8), np.float32), source="p"), "holds 4 images, fewer than the 5"),
    ]
    for pool, message in bad:
        with pytest.raises(SynthesisError, match=message):
            synthesize(model, config, SynthesisConfig(method="real", n_probes=5), pool=pool)
    with pytest.raises(SynthesisError, match="give an image pool"):
        synthesize(model, config, SynthesisConfig(method="ood", n_probes=5))
    with pytest.raises(SynthesisError, match="data-free and takes no image pool"):
        synthesize(model, config, SynthesisConfig(method="noise", n_probes=5), pool=p)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="obj.npy: cannot read"):  # never unpickled
        ImagePool.from_file(tmp_path / "obj.npy", config)
    with pytest.raises(ValueError, match="unsupported file type"):
        ImagePool.from_file(tmp_path / "x.pkl", config) if (tmp_path / "x.pkl").write_bytes(b"x") else None
