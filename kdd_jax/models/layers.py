"""Layers with PyTorch semantics, in NHWC.

Every parameterised layer is a standard `nnx.Conv` / `nnx.Linear` or our `BatchNorm2d`, and every
container is an `nnx.List`, so a module's graph path ("layer1", 0, "bn1") is exactly its PyTorch
state-dict prefix ("layer1.0.bn1"). The converters rely on that: see `converters/keymap.py`.
Parameterless PyTorch modules (ReLU, pools, Dropout) are kept as stateless modules in the same
lists so that list indices equal torch's `nn.Sequential` indices.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from kdd_jax.models.batchnorm import BatchNorm2d  # noqa: F401  (re-exported for the families)


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
        rngs=rngs,
    )


def linear(in_features: int, out_features: int, *, bias: bool = True, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, use_bias=bias, rngs=rngs)


class ReLU(nnx.Module):
    def __call__(self, x):
        return jax.nn.relu(x)


class ReLU6(nnx.Module):
    def __call__(self, x):
        return jnp.clip(x, 0.0, 6.0)


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
