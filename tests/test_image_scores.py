"""Image-pair scores: SSIM against a plain NumPy loop, pixel MSE, LPIPS-style distances over a
tiny classifier's BatchNorm outputs, and the BN-output capture they rely on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdd_jax.config import parse_config
from kdd_jax.models import BatchNorm2d, abstract_model, forward_with_bn_stats
from kdd_jax.models.batchnorm import forward_with_bn_outputs
from kdd_jax.scores import IMAGE_PAIR_SCORES, SCORES, lpips_distance, neg_lpips, neg_pixel_mse, ssim
from kdd_jax.scores.images import classifier_feature_net, default_feature_layers, load_lpips_heads

# A 28x28 grey ResNet, two stages (28 and 14), values in [0, 255] so the mapping is exercised.
TINY = {
    "format_version": 1, "family": "resnet",
    "arch": {"block": "basic", "layers": [1, 1], "widths": [4, 8], "stem": "small", "num_classes": 3,
             "in_channels": 1},
    "preprocessing": {"input_size": [28, 28], "channels": 1, "mean": [120.0], "std": [60.0],
                      "value_range": [0, 255]},
}


def _random_model(config, seed):
    """Random weights and non-trivial BN statistics, filled from NumPy into the abstract model:
    `build_model`'s initialisers compile once per weight shape (slow on a busy 2-core machine)."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(abstract_model(config))
    state = jax.tree.map(lambda s: jnp.asarray(
        rng.normal(0, 1 / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.2, s.shape), s.dtype), state)
    model = nnx.merge(graphdef, state)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, BatchNorm2d):
            c = node.num_features
            node.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
            node.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
    return model


@pytest.fixture(scope="module")
def tiny():
    config = parse_config(TINY)
    return _random_model(config, 1), config


@pytest.fixture(scope="module")
def net(tiny):
    return classifier_feature_net(*tiny)


def _images(seed, n=3, h=12, w=12, c=2):
    return np.random.default_rng(seed).uniform(0, 1, (n, h, w, c)).astype(np.float32)


# ------------------------------------------------------------------------------------ SSIM
def ssim_reference(a, b, win, sigma=None, data_range=1.0, k1=0.01, k2=0.03, sample_cov=True):
    """Wang et al. (2004) SSIM from the formula, one window at a time, float64."""
    r = np.arange(win) - (win - 1) / 2
    g = np.ones(win) if sigma is None else np.exp(-0.5 * (r / sigma) ** 2)
    wts = np.outer(g, g) / np.outer(g, g).sum()
    norm = win * win / (win * win - 1) if sample_cov else 1.0
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    n, h, w, c = a.shape
    out = np.zeros(n)
    for i in range(n):
        per_channel = []
        for ch in range(c):
            vals = []
            for y in range(h - win + 1):
                for x in range(w - win + 1):
                    p = a[i, y:y + win, x:x + win, ch].astype(np.float64)
                    q = b[i, y:y + win, x:x + win, ch].astype(np.float64)
                    mp, mq = (wts * p).sum(), (wts * q).sum()
                    vp = norm * (wts * (p - mp) ** 2).sum()
                    vq = norm * (wts * (q - mq) ** 2).sum()
                    cov = norm * (wts * (p - mp) * (q - mq)).sum()
                    vals.append((2 * mp * mq + c1) * (2 * cov + c2) / ((mp ** 2 + mq ** 2 + c1) * (vp + vq + c2)))
            per_channel.append(np.mean(vals))
        out[i] = np.mean(per_channel)
    return out


@pytest.mark.parametrize("win,sigma,sample_cov", [(7, None, True), (11, 1.5, False), (5, 1.0, True)])
def test_ssim_matches_numpy_reference(win, sigma, sample_cov):
    a = _images(0, h=13, w=14)
    b = np.clip(a + np.random.default_rng(1).normal(0, 0.2, a.shape), 0, 1).astype(np.float32)
    got = ssim(a, b, win_size=win, gaussian_sigma=sigma, use_sample_covariance=sample_cov)
    np.testing.assert_allclose(got, ssim_reference(a, b, win, sigma, sample_cov=sample_cov), atol=2e-5)


def test_ssim_uniform_is_sample_variance():
    # Uniform window + sample covariance = np.var(ddof=1) on a single window.
    a, b = _images(2, n=1, h=7, w=7, c=1), _images(3, n=1, h=7, w=7, c=1)
    p, q = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    want = ((2 * p.mean() * q.mean() + c1) * (2 * np.cov(p, q)[0, 1] + c2)
            / ((p.mean() ** 2 + q.mean() ** 2 + c1) * (p.var(ddof=1) + q.var(ddof=1) + c2)))
    np.testing.assert_allclose(ssim(a, b), [want], rtol=1e-5)


def test_ssim_properties():
    a = _images(4, n=2, h=16, w=16, c=1)
    np.testing.assert_allclose(ssim(a, a), [1.0, 1.0], atol=1e-6)
    b = _images(5, n=2, h=16, w=16, c=1)
    np.testing.assert_allclose(ssim(a, b), ssim(b, a), atol=1e-6)
    assert np.all(np.abs(np.asarray(ssim(a, b))) <= 1.0)
    np.testing.assert_allclose(ssim(a, 1.0 - a), ssim(1.0 - a, a), atol=1e-6)
    noise = np.random.default_rng(6).normal(size=a.shape).astype(np.float32)
    vals = [float(ssim(a, a + s * noise)[0]) for s in (0.01, 0.05, 0.2, 0.5)]
    assert vals == sorted(vals, reverse=True) and vals[0] < 1.0


def test_ssim_constant_images_closed_form():
    a, b = np.full((1, 8, 8, 1), 0.2, np.float32), np.full((1, 8, 8, 1), 0.7, np.float32)
    c1 = 0.01 ** 2
    np.testing.assert_allclose(ssim(a, b), [(2 * 0.2 * 0.7 + c1) / (0.2 ** 2 + 0.7 ** 2 + c1)], rtol=1e-5)


def test_ssim_errors():
    a = _images(7, h=6, w=10, c=1)
    with pytest.raises(ValueError, match="smaller than the 7x7"):
        ssim(a, a)
    with pytest.raises(ValueError, match="odd"):
        ssim(a, a, win_size=4)
    with pytest.raises(ValueError, match="same shape|one shape"):
        ssim(a, a[:, :5])
    with pytest.raises(ValueError, match="a must be images"):
        ssim(a[0], a[0])


# ------------------------------------------------------------------------------- pixel MSE
def test_neg_pixel_mse():
    a, b = _images(8), _images(9)
    np.testing.assert_allclose(neg_pixel_mse(a, a), 0.0)
    got = np.asarray(neg_pixel_mse(a, b))
    np.testing.assert_allclose(got, -((a - b) ** 2).mean(axis=(1, 2, 3)), rtol=1e-6)
    assert np.all(got < 0)
    with pytest.raises(ValueError, match="b must be images"):
        neg_pixel_mse(a, b[..., 0])


# ----------------------------------------------------------------------- BN output capture
def test_forward_with_bn_outputs(tiny):
    model, config = tiny
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 28, 28, 1)), jnp.float32)
    logits, outs = forward_with_bn_outputs(model, x)
    np.testing.assert_allclose(logits, model(x), atol=1e-6)
    assert list(outs) == ["bn1", "layer1.0.bn1", "layer1.0.bn2", "layer2.0.bn1", "layer2.0.bn2",
                          "layer2.0.downsample.1"]
    assert outs["layer1.0.bn2"].shape == (2, 28, 28, 4) and outs["layer2.0.bn2"].shape == (2, 14, 14, 8)
    # The output is what the layer returns for the captured input.
    _, stats = forward_with_bn_stats(model, x)
    assert set(stats) == set(outs)
    np.testing.assert_allclose(outs["bn1"], model.bn1(model.conv1(x)), atol=1e-6)

    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda st, x: forward_with_bn_outputs(nnx.merge(graphdef, st), x))
    jl, jo = jitted(state, x)
    np.testing.assert_allclose(jl, logits, atol=1e-5)
    for k in outs:
        np.testing.assert_allclose(jo[k], outs[k], atol=1e-5)


# ---------------------------------------------------------------------------------- LPIPS
def test_feature_net_layers_resize_and_preprocessing(tiny, net):
    model, config = tiny
    assert net.layers == ("layer1.0.bn2", "layer2.0.bn2") and net.channels == (4, 8)
    imgs = _images(10, n=2, h=32, w=32, c=1)
    feats = net.features(imgs)
    assert [f.shape for f in feats] == [(2, 28, 28, 4), (2, 14, 14, 8)]
    assert net.embedding(imgs).shape == (2, 8)
    # Same as resizing, mapping to [0, 255] and normalising by hand.
    x = (jax.image.resize(jnp.asarray(imgs), (2, 28, 28, 1), "bilinear") * 255.0 - 120.0) / 60.0
    _, outs = forward_with_bn_outputs(model, x)
    np.testing.assert_allclose(feats[1], outs["layer2.0.bn2"], atol=1e-4)
    with pytest.raises(ValueError, match="3 channels"):
        net.features(_images(11, n=1, h=28, w=28, c=3))
    with pytest.raises(ValueError, match="unknown BatchNorm layer"):
        classifier_feature_net(model, config, layers=["nope"])
    assert classifier_feature_net(model, config, layers=["bn1"]).channels == (4,)


def test_default_feature_layers_skip_downsample():
    shapes = {n: jax.ShapeDtypeStruct(s, jnp.float32) for n, s in
              [("a", (1, 8, 8, 2)), ("b", (1, 8, 8, 2)), ("l.0.bn2", (1, 4, 4, 2)), ("l.0.downsample.1", (1, 4, 4, 2))]}
    assert default_feature_layers(list(shapes), shapes) == ["b", "l.0.bn2"]


def test_lpips_properties(net):
    a = _images(12, n=2, h=28, w=28, c=1)
    noise = np.random.default_rng(13).normal(size=a.shape).astype(np.float32)
    np.testing.assert_allclose(neg_lpips(net, a, a), 0.0, atol=1e-6)
    d = [np.asarray(-neg_lpips(net, a, a + s * noise)) for s in (0.02, 0.1, 0.5)]
    assert np.all(d[0] > 0) and np.all(d[0] < d[1]) and np.all(d[1] < d[2])
    b = a + 0.1 * noise
    compiled = net.apply._cache_size()
    np.testing.assert_allclose(neg_lpips(net, a, b), neg_lpips(net, b, a), rtol=1e-5)
    assert net.apply._cache_size() == compiled  # same shapes: no re-jit
    assert np.allclose(IMAGE_PAIR_SCORES["neg_lpips"](a, b, net=net), neg_lpips(net, a, b))
    with pytest.raises(ValueError, match="needs net="):
        IMAGE_PAIR_SCORES["neg_lpips"](a, b)
    # Set scores on embeddings: the existing set functions.
    assert np.isfinite(float(SCORES["linear_cka"].fn(net.embedding(a), net.embedding(b))))


def test_lpips_distance_hand_computed_and_invariance():
    fa = [jnp.asarray([[[[3.0, 4.0]]]]), jnp.asarray([[[[1.0], [2.0]]]])]  # [1,1,1,2], [1,1,2,1]
    fb = [jnp.asarray([[[[1.0, 0.0]]]]), jnp.asarray([[[[-1.0], [5.0]]]])]
    # layer 0: (0.6-1)^2 + 0.8^2 = 0.8; layer 1: mean over 2 positions of (2^2, 0) = 2.
    np.testing.assert_allclose(lpips_distance(fa, fb), [2.8], rtol=1e-6)
    w = [jnp.asarray([2.0, 0.5]), jnp.asarray([0.25])]
    np.testing.assert_allclose(lpips_distance(fa, fb, weights=w), [2 * 0.16 + 0.5 * 0.64 + 0.5], rtol=1e-6)
    rng = np.random.default_rng(14)
    ga = [jnp.asarray(rng.normal(size=(2, 3, 4, 5)), jnp.float32)]
    gb = [jnp.asarray(rng.normal(size=(2, 3, 4, 5)), jnp.float32)]
    scale = jnp.asarray(rng.uniform(0.1, 10, (2, 3, 4, 1)), jnp.float32)
    np.testing.assert_allclose(lpips_distance([ga[0] * scale], gb), lpips_distance(ga, gb), rtol=1e-5)
    assert np.all(np.asarray(lpips_distance(ga, gb)) >= 0)
    with pytest.raises(ValueError, match=r"weights\[0\]"):
        lpips_distance(ga, gb, weights=[jnp.ones(4)])
    with pytest.raises(ValueError, match=r"feats_b\[0\]"):
        lpips_distance(ga, [gb[0][:1]])
    with pytest.raises(ValueError, match="same layers"):
        lpips_distance(ga, gb + gb)


def test_lpips_heads_file(net, tmp_path):
    from safetensors.numpy import save_file

    good = tmp_path / "heads.safetensors"
    save_file({"lin0": np.full(4, 2.0, np.float32), "lin1": np.ones((1, 8, 1, 1), np.float32)}, str(good))
    heads = load_lpips_heads(good, net)
    assert [h.shape for h in heads] == [(4,), (8,)]
    a = _images(15, n=2, h=28, w=28, c=1)
    b = np.clip(a + 0.1, 0, 1)
    fa, fb = net.features(a), net.features(b)
    want = 2 * lpips_distance(fa[:1], fb[:1]) + lpips_distance(fa[1:], fb[1:])
    np.testing.assert_allclose(neg_lpips(net, a, b, weights=heads), -want, rtol=1e-5)
    np.testing.assert_allclose(neg_lpips(net.with_heads(heads), a, b), -want, rtol=1e-5)

    bad = tmp_path / "bad.safetensors"
    save_file({"lin0": np.ones(4, np.float32), "lin1": np.ones(7, np.float32)}, str(bad))
    with pytest.raises(ValueError, match="'lin1'"):
        load_lpips_heads(bad, net)
    save_file({"lin0": np.ones(4, np.float32)}, str(bad))
    with pytest.raises(ValueError, match="missing key 'lin1'"):
        load_lpips_heads(bad, net)
    save_file({"lin0": -np.ones(4, np.float32), "lin1": np.ones(8, np.float32)}, str(bad))
    with pytest.raises(ValueError, match="'lin0'.*non-negative"):
        load_lpips_heads(bad, net)
    bad.write_bytes(good.read_bytes()[:40])  # truncated: the strict reader names the file
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_lpips_heads(bad, net)
    save_file({"lin0": np.ones(4, np.float32), "lin0.model.1.weight": np.ones((1, 4, 1, 1), np.float32),
               "lin1": np.ones(8, np.float32)}, str(bad))
    with pytest.raises(ValueError, match="twice"):
        load_lpips_heads(bad, net)
    with pytest.raises(ValueError, match="must be a .safetensors"):
        load_lpips_heads(tmp_path / "heads.npz", net)


def test_image_pair_registry():
    a, b = _images(16, c=1), _images(17, c=1)
    assert set(IMAGE_PAIR_SCORES) == {"neg_lpips", "ssim", "neg_pixel_mse"}
    np.testing.assert_allclose(IMAGE_PAIR_SCORES["ssim"](a, b), ssim(a, b))
    np.testing.assert_allclose(IMAGE_PAIR_SCORES["neg_pixel_mse"](a, b), neg_pixel_mse(a, b))


def test_residual_corr_finds_the_teacher_whose_departure_from_the_consensus_the_student_shares():
    from kdd_jax.scores.images import residual_corr

    rng = np.random.default_rng(0)
    common = rng.uniform(0, 1, (5, 8, 8, 1))  # what every model draws from this x_T
    teachers = np.stack([np.clip(common + 0.1 * rng.standard_normal(common.shape), 0, 1) for _ in range(3)])
    # the student: teacher 1's image, degraded (noise + a global contrast change)
    student = 0.8 * teachers[1] + 0.1 + 0.05 * rng.standard_normal(common.shape)
    r = np.asarray(residual_corr(student, teachers))
    assert r.shape == (3, 5) and np.all(np.abs(r) <= 1 + 1e-5)
    assert np.all(r.argmax(0) == 1)
    # a shift shared by every teacher cancels in the consensus
    shifted = np.asarray(residual_corr(student, teachers + 0.2))
    np.testing.assert_allclose(shifted, np.asarray(residual_corr(student - 0.2, teachers)), atol=1e-5)
    with pytest.raises(ValueError, match="at least 2 teachers"):
        residual_corr(student, teachers[:1])
    with pytest.raises(ValueError, match="teachers must be"):
        residual_corr(student, teachers[:, :4])


# ------------------------------------------------------------------------ AlexNet-LPIPS
def _torch_lpips(tmodel, heads, a, b):
    """LPIPS v0.1 (`lpips.LPIPS(net="alex")`, Zhang et al. 2018) re-implemented in PyTorch on a
    torchvision-layout AlexNet: images in [0, 1] (its normalize=True path) -> [-1, 1] -> scaling
    layer -> the five ReLU outputs -> unit-normalised over channels -> squared difference ->
    1x1 conv heads -> spatial mean -> sum over layers."""
    import torch

    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def feats(x):
        x = (2 * torch.from_numpy(x).permute(0, 3, 1, 2) - 1 - shift) / scale
        out = []
        for i, layer in enumerate(tmodel.features):
            x = layer(x)
            if i in (1, 4, 7, 9, 11):
                out.append(x)
        return out

    with torch.no_grad():
        total = 0
        for fa, fb, w in zip(feats(a), feats(b), heads):
            na = fa / (torch.sqrt(torch.sum(fa ** 2, dim=1, keepdim=True)) + 1e-10)
            nb = fb / (torch.sqrt(torch.sum(fb ** 2, dim=1, keepdim=True)) + 1e-10)
            d = torch.nn.functional.conv2d((na - nb) ** 2, torch.from_numpy(w))
            total = total + d.mean(dim=(2, 3), keepdim=True)
    return total.flatten().numpy()


def test_alexnet_feature_net_with_lpips_heads_is_lpips(make_student, tmp_path):
    """A torchvision-layout AlexNet converted with examples/feature_nets/alexnet-lpips.json's
    preprocessing, plus heads in LPIPS' own key names, computes LPIPS v0.1 to float32 rounding.
    The heads also load from LPIPS' .pth format, but only when pickles are allowed."""
    import json
    from pathlib import Path

    import torch
    from safetensors.numpy import save_file

    from converters import convert_student
    from converters.torch_reference import build_torch_model, randomize_

    cfg = json.loads((Path(__file__).parents[1] / "examples/feature_nets/alexnet-lpips.json").read_text())
    cfg["arch"] = {"num_classes": 10, "widths": [8, 16, 24, 16, 12], "classifier_hidden": [32]}
    student = make_student("alexnet_small", seed=4, config=cfg)
    converted = convert_student(student)
    net = classifier_feature_net(converted.model, converted.config)
    assert net.layers == ("features.1", "features.4", "features.7", "features.9", "features.11")
    assert net.channels == (8, 16, 24, 16, 12) and net.name == "alexnet-relu5"

    rng = np.random.default_rng(0)
    heads = {f"lin{i}.model.1.weight": rng.uniform(0, 1, (1, c, 1, 1)).astype(np.float32)
             for i, c in enumerate(net.channels)}
    save_file(heads, str(tmp_path / "alex.safetensors"))
    net = net.with_heads(load_lpips_heads(tmp_path / "alex.safetensors", net))

    a = _images(21, n=3, h=64, w=64, c=3)
    b = np.clip(a + 0.15 * _images(22, n=3, h=64, w=64, c=3) - 0.075, 0, 1).astype(np.float32)
    tmodel = randomize_(build_torch_model(cfg), 4)
    want = _torch_lpips(tmodel, [heads[f"lin{i}.model.1.weight"] for i in range(5)], a, b)
    assert np.all(want > 1e-3)  # a distance worth comparing
    np.testing.assert_allclose(-np.asarray(neg_lpips(net, a, b)), want, rtol=2e-5)

    pth = tmp_path / "alex.pth"
    torch.save({k: torch.from_numpy(v) for k, v in heads.items()}, pth)
    with pytest.raises(ValueError, match="alex.pth: pickle file refused"):
        load_lpips_heads(pth, net)
    for got, k in zip(load_lpips_heads(pth, net, allow_pickle=True), heads):
        np.testing.assert_array_equal(got, heads[k].reshape(-1))

    # 28x28 grey images (the diffusion zoo's) are resized up and repeated to RGB; identical -> 0
    g = _images(23, n=2, h=28, w=28, c=1)
    np.testing.assert_allclose(neg_lpips(net, g, g), 0.0, atol=1e-6)
    assert np.all(np.asarray(-neg_lpips(net, g, g[::-1])) > 0)
    with pytest.raises(ValueError, match="unknown feature-map layer"):
        classifier_feature_net(converted.model, converted.config, layers=["features.2"])


def test_feature_net_fingerprint_follows_weights_preprocessing_and_heads(tiny, net):
    """The fingerprint calibrations and audit records are bound to: it changes with anything that
    changes the features (weights, preprocessing, layers, heads) and with nothing else (the label)."""
    import dataclasses

    model, cfg = tiny
    again = classifier_feature_net(model, cfg, name="another-label")
    assert again.fingerprint == net.fingerprint and len(net.fingerprint) == 64
    assert net.with_heads([np.ones(c, np.float32) for c in net.channels]).fingerprint != net.fingerprint
    assert classifier_feature_net(model, cfg, layers=net.layers[:1]).fingerprint != net.fingerprint
    pre = dataclasses.replace(cfg.preprocessing, mean=tuple(m + 0.1 for m in cfg.preprocessing.mean))
    assert classifier_feature_net(model, dataclasses.replace(cfg, preprocessing=pre)).fingerprint != net.fingerprint
    moved = nnx.clone(model)
    leaf = next(v for _, v in nnx.iter_graph(moved) if isinstance(v, nnx.Param))
    leaf[...] = leaf[...].at[(0,) * leaf[...].ndim].add(1e-3)
    assert classifier_feature_net(moved, cfg).fingerprint != net.fingerprint
