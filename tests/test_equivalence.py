"""Converted Flax models match the PyTorch reference: logits AND input-gradients.

Random weights and randomised BN running statistics, eval mode, every family and several
configurations each. Tolerances (issue #2): logits rtol 1e-5 / atol 1e-4; input-gradients of a
scalar loss likewise, with atol scaled by the gradient's magnitude (gradients of a summed
log-softmax are O(1e-2), so a fixed 1e-4 would test nothing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters import convert_student
from converters.torch_reference import build_torch_model, randomize_
from converters.verify import probe_inputs
from tests.conftest import CONFIGS, full_config


def torch_logits_and_grad(tmodel, x: np.ndarray, w: np.ndarray):
    xt = torch.from_numpy(x).requires_grad_(True)
    logits = tmodel(xt)
    (torch.log_softmax(logits, -1) * torch.from_numpy(w)).sum().backward()
    return logits.detach().numpy(), xt.grad.numpy()


def jax_logits_and_grad(model, x: np.ndarray, w: np.ndarray):
    def loss(xn):
        logits = model(xn)
        return (jax.nn.log_softmax(logits, -1) * w).sum(), logits

    # jitted, as every library path runs the model (eager op-by-op dispatch costs ~15x the compile here)
    (_, logits), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(jnp.asarray(x.transpose(0, 2, 3, 1)))
    return np.asarray(logits), np.asarray(grad).transpose(0, 3, 1, 2)


def assert_equivalent(jax_model, torch_model, config, seed=0, n=4):
    x = probe_inputs(config, n, seed)
    n_cls = config.arch.num_classes
    w = np.random.default_rng(seed).normal(size=(n, n_cls)).astype(np.float32)
    t_logits, t_grad = torch_logits_and_grad(torch_model, x, w)
    j_logits, j_grad = jax_logits_and_grad(jax_model, x, w)
    np.testing.assert_allclose(j_logits, t_logits, rtol=1e-5, atol=1e-4)
    scale = np.abs(t_grad).max()
    assert scale > 0, "degenerate test: zero input-gradient"
    np.testing.assert_allclose(j_grad, t_grad, rtol=1e-5, atol=1e-4 * scale)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_converted_model_matches_torch(name, make_student):
    d = make_student(name, seed=3)
    result = convert_student(d)
    tmodel = randomize_(build_torch_model(full_config(name)), 3)
    assert_equivalent(result.model, tmodel, result.config)


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2_cifar", "densenet_bc_small", "vgg_plain_nested"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sources(name, dtype, make_student):
    """f16/bf16 checkpoints convert to float32 exactly: compare with the torch model holding the
    same rounded weights, upcast."""
    d = make_student(name, seed=1, dtype=dtype)
    result = convert_student(d)
    assert set(result.report["dtype"]["source_dtypes"]) == {str(dtype).removeprefix("torch.")}
    tmodel = randomize_(build_torch_model(full_config(name)), 1)
    with torch.no_grad():
        for t in tmodel.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.to(dtype).float())
    assert_equivalent(result.model, tmodel, result.config)


@pytest.mark.parametrize("perturb", ["filter", "bn_running_var"])
def test_check_detects_a_wrong_conversion(perturb, make_student):
    """Guard for the test itself: errors a broken converter would make must fail the check."""
    d = make_student("resnet20", seed=0)
    result = convert_student(d)
    tmodel = randomize_(build_torch_model(full_config("resnet20")), 0)
    with torch.no_grad():
        if perturb == "filter":
            tmodel.layer2[0].conv1.weight[3] *= 1.1
        else:
            tmodel.layer3[1].bn2.running_var[5] *= 1.5
    with pytest.raises(AssertionError):
        assert_equivalent(result.model, tmodel, result.config)


@pytest.mark.parametrize("name", ["resnet20", "resnext_bottleneck", "vgg_plain_nested", "densenet_bc_small",
                                  "alexnet_gray_pool2"])
def test_inferred_config_gives_same_function(name, make_student):
    """Without config.json the architecture is inferred from keys/shapes; where the weights
    determine it, the model must be the same function."""
    d = make_student(name, seed=2, with_config=False)
    result = convert_student(d)
    assert result.report["source"]["config"] == "inferred"
    assert any("inferred" in note for note in result.report["inferred"])
    cfg = full_config(name)
    if cfg["family"] == "vgg":
        # no pooling in that config: the inferred input size must equal the real one
        assert list(result.config.preprocessing.input_size) == cfg["preprocessing"]["input_size"]
    tmodel = randomize_(build_torch_model(cfg), 2)
    # preprocessing is unknown when inferred; compare on the true config's probes
    from kdd_jax.config import parse_config

    assert_equivalent(result.model, tmodel, parse_config(cfg))


def test_alexnet_and_a_plain_vgg_with_the_same_layer_indices_are_told_apart():
    """A BN-free VGG with cfg [a, M, b, M, c, d, e, M] has its convs at features.{0,3,6,8,10}, as
    torchvision's alexnet does; the kernel sizes (11x11 first conv vs all 3x3) decide."""
    from converters.inference import infer_config, shapes_of_config

    vgg = shapes_of_config("vgg", {"cfg": [8, "M", 16, "M", 24, 16, 16, "M"], "num_classes": 10, "batch_norm": False,
                                   "avgpool": None, "classifier_hidden": [32]}, (64, 64))
    alex = shapes_of_config("alexnet", {"num_classes": 10, "widths": [8, 16, 24, 16, 16], "classifier_hidden": [32, 24]},
                            (64, 64))
    assert sorted(k for k in vgg if k.startswith("features")) == sorted(k for k in alex if k.startswith("features"))
    assert infer_config(vgg, "v")[0]["family"] == "vgg"
    cfg, notes = infer_config(alex, "a")
    assert cfg["family"] == "alexnet"
    assert cfg["arch"] == {"num_classes": 10, "widths": [8, 16, 24, 16, 16], "in_channels": 3, "avgpool": [6, 6],
                           "classifier_hidden": [32, 24]}
    assert any("224x224" in n for n in notes)


def test_verification_fails_a_wrong_conversion_and_compiles_weights_as_an_argument(make_student):
    """`verify_conversion` (the check `kdd convert` runs) rejects a model whose weights differ from the
    checkpoint, and its compiled check, shared by models of one architecture, never reuses another model's
    weights: correct, corrupted, correct again."""
    from converters.verify import verify_conversion

    result = convert_student(make_student("resnet20", seed=4))
    assert verify_conversion(result)["ok"]
    conv = result.model.conv1
    good = np.asarray(conv.kernel[...])
    conv.kernel.set_value(jnp.asarray(good).at[..., 0].multiply(1.01))  # one output filter 1% off
    bad = verify_conversion(result)
    assert not bad["ok"] and bad["max_rel_logit_diff"] > 1e-4
    conv.kernel.set_value(jnp.asarray(good))
    assert verify_conversion(result)["ok"]


def test_float64_arbiter_settles_kink_flips_and_still_catches_errors_float32_cannot_see(make_student, monkeypatch):
    """A float32 ReLU kink flip moves one probe's input-gradient while the conversion is right; the check
    re-runs both models in float64, where rounding cannot flip a kink, and passes. The same flip on a
    model with one filter 1e-6 off (below anything float32 can resolve) fails there; a gradient that
    disagrees on most probes is never a flip and fails without the arbiter."""
    import converters.verify as cv

    result = convert_student(make_student("resnet20", seed=5))
    real = cv._jax_loss_and_grad()
    flipped = [0]

    def with_flip(graphdef, x, state, w):
        (loss, logits), g = real(graphdef, x, state, w)
        if g.dtype == jnp.float32:  # only the float32 program flips
            g = g.at[np.asarray(flipped)].multiply(1.01)
        return (loss, logits), g

    monkeypatch.setattr(cv, "_jax_loss_and_grad", lambda: with_flip)
    v = cv.verify_conversion(result)
    assert v["ok"] and v["input_grad_rel_l2_per_probe"][0] > cv.GRAD_RTOL
    a = v["float64_arbiter"]
    assert a["ok"] and a["probes"] == [0] and a["max_input_grad_rel_l2"] < 1e-12

    conv = result.model.conv1
    good = np.asarray(conv.kernel[...])
    conv.kernel.set_value(jnp.asarray(good).at[..., 0].multiply(1 + 1e-6))
    v = cv.verify_conversion(result)
    assert max(v["input_grad_rel_l2_per_probe"][1:]) <= cv.GRAD_RTOL and v["max_rel_logit_diff"] < cv.LOGIT_RTOL
    assert not v["ok"] and not v["float64_arbiter"]["ok"]
    assert v["float64_arbiter"]["max_logit_diff"] > cv.FLOAT64_RTOL
    conv.kernel.set_value(jnp.asarray(good))

    flipped[:] = [0, 1, 2, 3, 4]  # five of eight probes: not a flip
    v = cv.verify_conversion(result)
    assert not v["ok"] and v["float64_arbiter"] is None


@pytest.mark.parametrize("name", ["mobilenetv2_cifar", "vgg_bn_torchvision", "densenet_bc_small"])
def test_float64_arbiter_on_every_family_with_three_flips(make_student, monkeypatch, name):
    """Three flipped probes (re-run padded to four, then sliced back) on the other families, whose
    layers (depthwise convolution with its own gradient, max-pool, concatenation) must all compute in
    float64 there: float32 arithmetic anywhere would leave ~1e-7, not ~1e-15."""
    import converters.verify as cv

    result = convert_student(make_student(name, seed=6))
    real = cv._jax_loss_and_grad()

    def with_flip(graphdef, x, state, w):
        (loss, logits), g = real(graphdef, x, state, w)
        if g.dtype == jnp.float32:
            g = g.at[np.asarray([0, 2, 5])].multiply(1.01)
        return (loss, logits), g

    monkeypatch.setattr(cv, "_jax_loss_and_grad", lambda: with_flip)
    v = cv.verify_conversion(result)
    a = v["float64_arbiter"]
    assert v["ok"] and a["probes"] == [0, 2, 5]
    assert a["max_logit_diff"] < 1e-12 and a["max_input_grad_rel_l2"] < 1e-12
