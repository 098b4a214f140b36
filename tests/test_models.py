"""Model families: BN-statistics capture is exact, functional and transformable."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from converters import convert_student
from converters.torch_reference import build_torch_model, randomize_
from converters.verify import probe_inputs
from kdd_jax.config import ConfigError, parse_config
from kdd_jax.models import bn_running_stats, build_model, forward_with_bn_stats
from tests.conftest import full_config


def bns_loss(stats, running):
    return sum(jnp.sum((s.mean - running[k].mean) ** 2) + jnp.sum((s.var - running[k].var) ** 2) for k, s in stats.items())


def torch_bns_loss_and_grad(tmodel, x):
    """DeepInversion-style L_BNS in PyTorch via forward hooks (biased batch variance)."""
    terms = []

    def hook(mod, inp, _):
        a = inp[0]
        mu = a.mean(dim=(0, 2, 3))
        var = a.var(dim=(0, 2, 3), unbiased=False)
        terms.append(((mu - mod.running_mean) ** 2).sum() + ((var - mod.running_var) ** 2).sum())

    handles = [m.register_forward_hook(hook) for m in tmodel.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    xt = torch.from_numpy(x).requires_grad_(True)
    tmodel(xt)
    loss = sum(terms)
    loss.backward()
    for h in handles:
        h.remove()
    return float(loss.detach()), xt.grad.numpy(), len(terms)


@pytest.mark.parametrize("name", ["resnet20", "vgg_bn_torchvision", "mobilenetv2_cifar", "densenet_imagenet_stem"])
def test_bn_statistics_loss_matches_torch_hooks(name, make_student):
    d = make_student(name, seed=4)
    result = convert_student(d)
    tmodel = randomize_(build_torch_model(full_config(name)), 4)
    x = probe_inputs(result.config, 6, seed=0)
    t_loss, t_grad, n_bn = torch_bns_loss_and_grad(tmodel, x)

    graphdef, state = nnx.split(result.model)

    @jax.jit
    def loss_fn(xn):
        model = nnx.merge(graphdef, state)
        _, stats = forward_with_bn_stats(model, xn)
        return bns_loss(stats, bn_running_stats(model))

    j_loss, j_grad = jax.value_and_grad(loss_fn)(jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert len(bn_running_stats(result.model)) == n_bn
    np.testing.assert_allclose(float(j_loss), t_loss, rtol=1e-4)
    j_grad = np.asarray(j_grad).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(j_grad, t_grad, rtol=1e-4, atol=1e-4 * np.abs(t_grad).max())


def test_bn_stats_keys_are_torch_layer_names_in_order():
    model = build_model(parse_config(full_config("resnet20")))
    running = bn_running_stats(model)
    _, stats = nnx.jit(forward_with_bn_stats)(model, jnp.zeros((2, 32, 32, 3)))  # eager dispatch: ~10x the compile
    assert list(running)[:3] == ["bn1", "layer1.0.bn1", "layer1.0.bn2"]
    assert set(stats) == set(running)
    assert "layer2.0.downsample.1" in running


def test_forward_with_bn_stats_leaves_model_untouched_and_matches_plain_forward():
    model = build_model(parse_config(full_config("densenet_bc_small")), seed=1)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    x = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
    # nnx.jit writes any state the call mutates back into `model`, so "untouched" is still checked
    logits, stats = nnx.jit(forward_with_bn_stats)(model, x)
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    jax.tree.map(np.testing.assert_array_equal, before, after)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(nnx.jit(lambda m, x: m(x))(model, x)), rtol=1e-6, atol=1e-6)
    first = stats["features.denseblock1.denselayer1.norm1"]  # input of the first BN is conv0's output
    conv_out = np.asarray(model.features.conv0(x))
    np.testing.assert_allclose(np.asarray(first.mean), conv_out.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(first.var), conv_out.var((0, 1, 2)), rtol=1e-4, atol=1e-6)


def test_bn_stats_vmap_over_independent_batches():
    """Restarts are vmapped over batches with shared weights: per-batch stats must equal separate calls."""
    model = build_model(parse_config(full_config("resnet20")))
    graphdef, state = nnx.split(model)
    xs = jax.random.normal(jax.random.key(1), (3, 4, 32, 32, 3))

    def f(x):
        return forward_with_bn_stats(nnx.merge(graphdef, state), x)[1]["layer3.2.bn2"].mean

    batched = jax.jit(jax.vmap(f))(xs)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(f(xs[i])), rtol=1e-5, atol=1e-6)


def test_vgg_without_avgpool_rejects_too_small_input():
    cfg = full_config("vgg_plain_nested")
    cfg["preprocessing"]["input_size"] = [2, 2]
    with pytest.raises(ConfigError, match="too small"):
        build_model(parse_config(cfg))


@pytest.mark.parametrize("name, size, match", [
    ("alexnet_small", [40, 40], r"input_size \[40, 40\] is too small for AlexNet"),
    ("vit_tiny", [32, 32], r"input_size \[32, 32\] must be the arch's image_size \[16, 16\]"),
])
def test_input_size_the_family_cannot_take_is_refused_naming_the_config(name, size, match):
    cfg = full_config(name)
    cfg["preprocessing"]["input_size"] = size
    with pytest.raises(ConfigError, match=f"student/config.json: preprocessing.{match}"):
        parse_config(cfg, "student/config.json")


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"arch": {"block": "basic", "layers": [1], "widths": [8, 16], "num_classes": 2}}, "same length"),
        ({"arch": {"block": "triple", "layers": [1], "widths": [8], "num_classes": 2}}, "arch.block"),
        ({"arch": {"block": "basic", "layers": [1], "widths": [8], "num_classes": 2, "depth": 3}}, "unknown field"),
        ({"preprocessing": {"input_size": [32, 32], "channels": 3, "mean": [0.5], "std": [0.5] * 3}}, "mean has 1"),
        ({"family": "swin"}, "not a known family"),
        ({"format_version": 7}, "format_version"),
    ],
)
def test_config_errors_name_the_field(patch, field):
    cfg = full_config("resnet20")
    cfg.update(patch)
    with pytest.raises(ConfigError, match=field):
        parse_config(cfg, "student/config.json")


@pytest.mark.parametrize("kernel, stride, pad", [(3, 1, 1), (3, 2, 1), (5, 2, 2), (3, 1, 0), (1, 1, 0), (3, 2, 0)])
def test_depthwise_fast_path_matches_lax_forward_and_gradient(kernel, stride, pad):
    """layers.conv_general_dilated computes depthwise convs on CPU as shifted multiply-adds (much
    faster gradients on XLA:CPU); it must equal lax's grouped convolution, value and gradient."""
    import jax
    import jax.numpy as jnp

    from kdd_jax.models.layers import conv_general_dilated

    c = 6
    x = jax.random.normal(jax.random.key(0), (2, 9, 10, c))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, 1, c))
    args = dict(window_strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)

    def ours(x, w):
        return conv_general_dilated(x, w, **args)

    def ref(x, w):
        return jax.lax.conv_general_dilated(x, w, **args)

    assert "conv_general_dilated" not in str(jax.make_jaxpr(ours)(x, w))  # the fast path was taken
    np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
    g_ours = jax.grad(lambda x, w: jnp.sum(jnp.sin(ours(x, w))), argnums=(0, 1))(x, w)
    g_ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(ref(x, w))), argnums=(0, 1))(x, w)
    for a, b in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel, stride, pad, groups, dilation",
                         [(3, 1, (1, 1), 1, 1), (3, 2, (1, 1), 1, 1), (1, 1, (0, 0), 1, 1), (7, 2, (3, 3), 1, 1),
                          (3, 2, (1, 2), 2, 1), (3, 1, (2, 2), 4, 2), (5, 2, (2, 0), 1, 1)])
def test_float64_cpu_path_matches_lax_forward_and_gradient(kernel, stride, pad, groups, dilation, monkeypatch):
    """In float64 on XLA:CPU (the conversion check's float64 re-run), layers.conv_general_dilated
    runs large convolutions as one im2col matmul instead of XLA's slow reference loop; it must equal
    lax's convolution to float64 rounding, value and both gradients, for strides, asymmetric padding,
    groups and dilation. Small ones (below F64_IM2COL_MIN_MACS_PER_SAMPLE), ones whose patches would
    exceed F64_IM2COL_MAX_PATCH_BYTES, and float32 keep lax's kernel."""
    import jax
    import jax.numpy as jnp

    from kdd_jax.models import layers
    from kdd_jax.models.layers import _NHWC_HWIO, conv_general_dilated

    cin, cout = 8, 12
    rng = np.random.default_rng(kernel * 100 + stride * 10 + groups)
    args = dict(window_strides=(stride, stride), padding=(pad, pad[::-1]), lhs_dilation=(1, 1),
                rhs_dilation=(dilation, dilation), dimension_numbers=_NHWC_HWIO, feature_group_count=groups)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, 11, 10, cin)))
        w = jnp.asarray(rng.normal(size=(kernel, kernel, cin // groups, cout)))

        def ours(x, w):
            return conv_general_dilated(x, w, **args)

        def ref(x, w):
            return jax.lax.conv_general_dilated(x, w, **{k: v for k, v in args.items() if k != "lhs_dilation"})

        assert "conv_general_dilated" in str(jax.make_jaxpr(ours)(x, w))  # small: XLA's loop is cheaper
        monkeypatch.setattr(layers, "F64_IM2COL_MIN_MACS_PER_SAMPLE", 0)  # treat this test's convolution as a large one
        # (a new function: make_jaxpr caches traces by function)
        assert "conv_general_dilated" not in str(jax.make_jaxpr(lambda x, w: ours(x, w))(x, w))  # matmul path
        monkeypatch.setattr(layers, "F64_IM2COL_MAX_PATCH_BYTES", 1000)  # patches too large: lax again
        assert "conv_general_dilated" in str(jax.make_jaxpr(lambda x, w: ours(x, w))(x, w))
        monkeypatch.setattr(layers, "F64_IM2COL_MAX_PATCH_BYTES", 1 << 30)
        assert "conv_general_dilated" in str(jax.make_jaxpr(ours)(x.astype(jnp.float32), w.astype(jnp.float32)))
        np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-12, atol=1e-12)
        g_ours = jax.grad(lambda x, w: jnp.sum(jnp.sin(ours(x, w))), argnums=(0, 1))(x, w)
        g_ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(ref(x, w))), argnums=(0, 1))(x, w)
        for a, b in zip(g_ours, g_ref):
            assert a.dtype == jnp.float64
            np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("kernel, stride, pad, hw", [(2, 2, 0, (9, 10)), (2, 2, 0, (8, 8)), (3, 3, 0, (10, 7)),
                                                     (3, 2, 1, (9, 10))])
def test_maxpool_matches_reduce_window_value_and_gradient(kernel, stride, pad, hw):
    """MaxPool2d's reshape fast path (non-overlapping windows) equals lax.reduce_window, floor
    mode included (odd sizes crop), value and input gradient (inputs without ties)."""
    import jax
    import jax.numpy as jnp

    from kdd_jax.models.layers import MaxPool2d

    pool = MaxPool2d(kernel, stride, pad)
    x = jax.random.normal(jax.random.key(2), (2, *hw, 3))

    def ref(x):
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, kernel, kernel, 1), (1, stride, stride, 1),
                                     ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    np.testing.assert_array_equal(np.asarray(pool(x)), np.asarray(ref(x)))
    g = jax.grad(lambda x: jnp.sum(jnp.sin(pool(x))))(x)
    g_ref = jax.grad(lambda x: jnp.sum(jnp.sin(ref(x))))(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-7)


def test_relu6_value_and_gradient_match_torch_conventions():
    import jax

    from kdd_jax.models.layers import ReLU6

    x = np.array([-1.0, 0.0, 3.0, 6.0, 7.0], np.float32)
    np.testing.assert_array_equal(np.asarray(ReLU6()(x)), [0.0, 0.0, 3.0, 6.0, 6.0])
    g = jax.grad(lambda x: ReLU6()(x).sum())(x)
    np.testing.assert_array_equal(np.asarray(g), [0.0, 0.0, 1.0, 0.0, 0.0])  # torch: 0 at both kinks


def test_build_model_draws_he_uniform_init_fixed_by_the_seed():
    """Random models use He uniform init, U(+-sqrt(6/fan_in)) per weight tensor (fan_in over one group's
    input channels and the window); the seed fixes every draw and different layers differ."""
    cfg = parse_config(full_config("mobilenetv2_cifar"))
    a, b, c = build_model(cfg, seed=0), build_model(cfg, seed=0), build_model(cfg, seed=1)
    leaves = lambda m: {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}  # noqa: E731
    la, lb, lc = leaves(a), leaves(b), leaves(c)
    kernels = [k for k in la if k[-1] == "kernel"]
    assert len(kernels) > 10
    assert any(la[k].ndim == 4 and la[k].shape[2] == 1 for k in kernels)  # depthwise convs are included
    for k in kernels:
        w = la[k]
        bound = np.sqrt(6.0 / np.prod(w.shape[:-1]))
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound, k
        if w.size >= 1000:  # He uniform's spread, not flax's truncated normal (0.71x) nor torch's bare default
            assert abs(w.std() / (bound / np.sqrt(3)) - 1) < 0.1, k
        np.testing.assert_array_equal(w, lb[k])
        assert not np.array_equal(w, lc[k]), k
    flat = [la[k].ravel()[:8] for k in kernels if la[k].size >= 8]
    assert len({tuple(np.round(f / np.abs(f).max(), 6)) for f in flat}) == len(flat)  # no two layers share a draw


def test_cpu_fast_paths_follow_the_default_device(monkeypatch):
    """The CPU-only forms (depthwise shifted adds, float64 im2col) are chosen for the device the
    computation runs on: on a GPU/TPU host, inside jax.default_device(cpu) (the conversion check's
    float64 re-run there), as a Device or the string 'cpu'; not on the accelerator itself."""
    import jax

    from kdd_jax.models import layers

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # pretend to be an accelerator host
    assert not layers._computes_on_cpu()
    with jax.default_device(jax.devices("cpu")[0]):
        assert layers._computes_on_cpu()
    with jax.default_device("cpu"):
        assert layers._computes_on_cpu()
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert layers._computes_on_cpu()
