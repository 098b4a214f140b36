"""Layers with PyTorch semantics, in NHWC.

Every parameterised layer is a standard `nnx.Conv` / `nnx.Linear` or our `BatchNorm2d`, and every
container is an `nnx.List`, so a module's graph path ("layer1", 0, "bn1") is exactly its PyTorch
state-dict prefix ("layer1.0.bn1"). The converters rely on that: see `converters/keymap.py`.
Parameterless PyTorch modules (ReLU, pools, Dropout) are kept as stateless modules in the same
lists so that list indices equal torch's `nn.Sequential` indices.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdd_jax.models.batchnorm import BatchNorm2d  # noqa: F401  (re-exported for the families)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_shifted(x, w, strides, padding):
    """Depthwise conv (NHWC, HWIO kernel [kh, kw, 1, C]) as a sum of kh*kw strided slices times
    per-channel weights: elementwise ops that XLA fuses.

    The backward pass is written out (custom VJP) in the same form: autodiff of the slices
    produced kh*kw padded copies of the cotangent, summed, which took ~55% of a MobileNetV2
    synthesis step on XLA:CPU; with the explicit form (and ReLU6 as relu6) steps run 2.8-3.4x
    faster (benchmarks/results/throughput.md)."""
    return _depthwise_forward(x, w, strides, padding)


def _depthwise_fwd(x, w, strides, padding):
    return _depthwise_forward(x, w, strides, padding), (x, w)


def _depthwise_bwd(strides, padding, res, g):
    """Input gradient: the cotangent dilated by the stride and padded by k - 1, correlated with the
    flipped kernel (k*k shifted slices); weight gradient: per tap, sum of input slice x cotangent."""
    x, w = res
    (pt, pb), (pl, pr) = padding
    sh, sw = strides
    kh, kw = w.shape[:2]
    n, h, wd, c = x.shape
    ho, wo = g.shape[1], g.shape[2]
    hp, wp = h + pt + pb, wd + pl + pr
    zero = jnp.zeros((), g.dtype)
    gd = jax.lax.pad(g, zero, ((0, 0, 0), (kh - 1, hp - (ho - 1) * sh - 1, sh - 1),
                               (kw - 1, wp - (wo - 1) * sw - 1, sw - 1), (0, 0, 0)))
    gx = None
    for i in range(kh):
        for j in range(kw):
            oi, oj = kh - 1 - i + pt, kw - 1 - j + pl
            term = jax.lax.slice(gd, (0, oi, oj, 0), (n, oi + h, oj + wd, c)) * w[i, j, 0]
            gx = term if gx is None else gx + term
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    rows = []
    for i in range(kh):
        cols = []
        for j in range(kw):
            tap = jax.lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c), (1, sh, sw, 1))
            cols.append(jnp.sum(tap * g, axis=(0, 1, 2)))
        rows.append(jnp.stack(cols))
    gw = jnp.stack(rows)[:, :, None, :]
    return gx.astype(x.dtype), gw.astype(w.dtype)


_depthwise_shifted.defvjp(_depthwise_fwd, _depthwise_bwd)


def _depthwise_forward(x, w, strides, padding):
    (pt, pb), (pl, pr) = padding
    sh, sw = strides
    kh, kw = w.shape[:2]
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    n, hp, wp, c = xp.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = jax.lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c), (1, sh, sw, 1))
            term = tap * w[i, j, 0]
            out = term if out is None else out + term
    return out


def _computes_on_cpu() -> bool:
    """Whether the computation being traced runs on XLA:CPU: the device `jax.default_device` names
    (e.g. verification's float64 re-run on the CPU of a GPU/TPU host), else the default backend."""
    dev = jax.config.jax_default_device
    if dev is None:
        return jax.default_backend() == "cpu"
    return (dev if isinstance(dev, str) else dev.platform) == "cpu"


_NHWC_HWIO = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))
# A float64 convolution goes the im2col way from this many multiply-adds per sample
# (Ho*Wo*kh*kw*C_in/G*C_out; per sample because compile time does not grow with the batch, so the
# check's re-run of 1, 2 or 4 probes takes the same path). Below it XLA's loop runs in less time than
# the matmul form takes to compile (its gradient is kh*kw pads): on 2 CPU cores, a CIFAR ResNet-20's
# float64 re-run of 2 probes compiled and ran in 3.8 s with XLA's convolution and 6.8 s with im2col
# everywhere, while an ImageNet ResNet-18's took 15.8 s against 6.4 s with this threshold
# (benchmarks/results/convert_bench.md, float64_conv).
F64_IM2COL_MIN_MACS_PER_SAMPLE = 1 << 22
# ... and as long as its patches (kh*kw shifted copies of the input, kept for the gradient) fit in this.
F64_IM2COL_MAX_PATCH_BYTES = 1 << 30


def _conv_as_matmuls(x, w, strides, padding, rhs_dilation, groups):
    """NHWC x HWIO convolution as one matmul: the kh*kw strided slices of the padded input stacked
    into patches [N, Ho, Wo, kh*kw, C_in] (im2col), contracted with the kernel as [kh*kw, C_in, C_out]
    (grouped: per group). For float64 on XLA:CPU, whose convolution is a slow reference loop there
    (~75x float32 for a 3x3, 64-channel layer) while its float64 matmul is ~2x float32."""
    (pt, pb), (pl, pr) = padding
    sh, sw = strides
    dh, dw = rhs_dilation
    kh, kw, cin_g, cout = w.shape
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    n, hp, wp, c = xp.shape
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    taps = [jax.lax.slice(xp, (0, i * dh, j * dw, 0), (n, i * dh + sh * (ho - 1) + 1, j * dw + sw * (wo - 1) + 1, c),
                          (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]
    patches = jnp.stack(taps, axis=3)  # [N, Ho, Wo, kh*kw, C_in]
    if groups == 1:
        return jnp.einsum("nhwtc,tco->nhwo", patches, w.reshape(kh * kw, cin_g, cout))
    wg = w.reshape(kh * kw, cin_g, groups, cout // groups)  # HWIO: output channels grouped in order
    out = jnp.einsum("nhwtgc,tcgo->nhwgo", patches.reshape(n, ho, wo, kh * kw, groups, cin_g), wg)
    return out.reshape(n, ho, wo, cout)


def _im2col_worth_it(x, w, strides, padding, rhs_dilation) -> bool:
    """Whether a float64 NHWC x HWIO convolution is large enough per sample for the im2col form, and
    its patches small enough (the two F64_IM2COL_* bounds)."""
    kh, kw, cin_g, cout = w.shape
    dh, dw = rhs_dilation or (1, 1)
    ho = (x.shape[1] + sum(padding[0]) - dh * (kh - 1) - 1) // strides[0] + 1
    wo = (x.shape[2] + sum(padding[1]) - dw * (kw - 1) - 1) // strides[1] + 1
    if ho <= 0 or wo <= 0:
        return False
    per_sample_macs = ho * wo * kh * kw * cin_g * cout
    patch_bytes = x.shape[0] * ho * wo * kh * kw * x.shape[3] * 8
    return per_sample_macs >= F64_IM2COL_MIN_MACS_PER_SAMPLE and patch_bytes <= F64_IM2COL_MAX_PATCH_BYTES


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """lax.conv_general_dilated, except two cases on XLA:CPU, computed in another form that gives
    the same results to float rounding (other backends always keep lax's kernel):

    - depthwise 3x3-style convolutions: XLA:CPU runs the gradient of a grouped (depthwise)
      convolution 16x (stride 1) to 11x (stride 2) slower than the same computation written as
      shifted multiply-adds (measured on [100, 14, 14, 96]: 287 vs 18 ms, 518 vs 47 ms), and
      synthesis back-propagates through every MobileNetV2 block;
    - float64 convolutions (conversion checks settle float32 rounding flips in float64,
      `converters/verify.py`): XLA:CPU has only a slow reference loop for them, so the large ones
      run as one im2col matmul (`_conv_as_matmuls`; bounds `F64_IM2COL_*`)."""
    c = lhs.shape[-1]
    plain = (
        lhs.ndim == 4 and not isinstance(padding, str) and all(d in (None, 1) for d in (lhs_dilation or (1,)))
        and kwargs.get("out_sharding") is None and _computes_on_cpu()
    )
    depthwise = (
        plain and feature_group_count > 1 and feature_group_count == c and rhs.shape[2] == 1 and rhs.shape[3] == c
        and all(d in (None, 1) for d in (rhs_dilation or (1,)))
    )
    if depthwise:
        return _depthwise_shifted(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding))
    if (plain and lhs.dtype == jnp.float64 and rhs.dtype == jnp.float64 and dimension_numbers == _NHWC_HWIO
            and kwargs.get("preferred_element_type") is None and all(p >= 0 for pair in padding for p in pair)
            and _im2col_worth_it(lhs, rhs, window_strides, padding, rhs_dilation)):
        return _conv_as_matmuls(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding),
                                tuple(rhs_dilation or (1, 1)), feature_group_count)
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count, precision=precision, **kwargs)


def he_uniform_init(key, shape, dtype=jnp.float32):
    """He (kaiming) uniform init, U(+-sqrt(6 / fan_in)), fan_in counting the kernel window and one group's
    input channels (all but the last axis of a flax kernel): keeps activations' scale through ReLU layers,
    as the kaiming init torchvision gives its ResNets and VGG convolutions does (theirs is normal, over
    fan_out); torch's bare layer default, a sixth of this variance, leaves a random BN-free VGG with
    near-constant logits. Drawn on the host from a numpy generator
    seeded by the JAX key: only random models (`build_model`, `build_unet`) use it, and jax.random would
    compile once per weight shape (0.3-1 s each on XLA:CPU: 12 s to build one ResNet-20); converted students
    carry their own weights. Under a trace (`abstract_model`'s eval_shape, or a jitted constructor) the
    same distribution is drawn by jax.random."""
    bound = math.sqrt(6.0 / math.prod(shape[:-1]))
    if isinstance(key, jax.core.Tracer):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    seed = np.asarray(jax.random.key_data(key)).astype(np.uint32).ravel().tolist()
    return jnp.asarray(np.random.default_rng(seed).uniform(-bound, bound, shape), dtype)


def conv2d(
    in_ch: int,
    out_ch: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    bias: bool = True,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """torch.nn.Conv2d. Padding is always explicit: "SAME" differs from torch at stride 2."""
    return nnx.Conv(
        in_ch,
        out_ch,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        feature_group_count=groups,
        use_bias=bias,
        conv_general_dilated=conv_general_dilated,
        kernel_init=he_uniform_init,
        rngs=rngs,
    )


def linear(in_features: int, out_features: int, *, bias: bool = True, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, use_bias=bias, kernel_init=he_uniform_init, rngs=rngs)


class ReLU(nnx.Module):
    def __call__(self, x):
        return jax.nn.relu(x)


class ReLU6(nnx.Module):
    def __call__(self, x):
        # not jnp.clip: its tie-handling gradient (selects and divides) is recomputed per use
        # and cost 1.37x on MobileNetV2 synthesis steps on XLA:CPU; relu6's gradient is 0 at 0
        # and 6, as torch's
        return jax.nn.relu6(x)


class Dropout(nnx.Module):
    """Identity: students are only ever evaluated. Kept so Sequential indices match torch."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, x):
        return x


class MaxPool2d(nnx.Module):
    """torch.nn.MaxPool2d (floor mode): padded cells are -inf, never picked."""

    def __init__(self, kernel: int, stride: int | None = None, padding: int = 0):
        self.kernel, self.stride, self.padding = kernel, stride or kernel, padding

    def __call__(self, x):
        k, s, p = self.kernel, self.stride, self.padding
        if k == s and p == 0:
            # non-overlapping windows (VGG's 2x2/2): a reshape and a max. Same values (floor mode
            # crops the remainder); its gradient runs 1.4-2.1x faster than reduce_window's on
            # XLA:CPU (benchmarks/results/throughput.md). Ties share the gradient where torch
            # picks one element; after a ReLU such ties are zeros whose input gradient is 0 anyway.
            n, h, w, c = x.shape
            x = x[:, : h // k * k, : w // k * k]
            return x.reshape(n, h // k, k, w // k, k, c).max(axis=(2, 4))
        return jax.lax.reduce_window(
            x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, s, s, 1), ((0, 0), (p, p), (p, p), (0, 0))
        )


class AvgPool2d(nnx.Module):
    """torch.nn.AvgPool2d without padding (the only form the families use)."""

    def __init__(self, kernel: int, stride: int | None = None):
        self.kernel, self.stride = kernel, stride or kernel

    def __call__(self, x):
        k, s = self.kernel, self.stride
        summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, k, k, 1), (1, s, s, 1), "VALID")
        return summed / (k * k)


def adaptive_avg_pool2d(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """torch.nn.AdaptiveAvgPool2d: bin i spans [floor(i*H/o), ceil((i+1)*H/o))."""
    n, h, w, c = x.shape
    oh, ow = out_hw
    if h % oh == 0 and w % ow == 0:
        return x.reshape(n, oh, h // oh, ow, w // ow, c).mean(axis=(2, 4))
    rows = []
    for i in range(oh):
        r0, r1 = (i * h) // oh, math.ceil((i + 1) * h / oh)
        cols = []
        for j in range(ow):
            c0, c1 = (j * w) // ow, math.ceil((j + 1) * w / ow)
            cols.append(x[:, r0:r1, c0:c1, :].mean(axis=(1, 2)))
        rows.append(jnp.stack(cols, axis=1))
    return jnp.stack(rows, axis=1)


def flatten_nchw(x: jax.Array) -> jax.Array:
    """torch.flatten(x, 1) of the NCHW tensor, so the next Linear keeps torch's row order."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def run_sequential(layers: nnx.List, x: jax.Array) -> jax.Array:
    for layer in layers:
        x = layer(x)
    return x
