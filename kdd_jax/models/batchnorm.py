"""Inference-mode BatchNorm and the functional capture of its input statistics.

The synthesis loss (paper: L_BNS) compares, per BN layer, the batch mean/variance of the layer's
input with the stored running statistics. `forward_with_bn_stats(model, x)` returns the logits and
those batch statistics in one pass, keyed by the layer's PyTorch name ("layer1.0.bn1");
`bn_running_stats(model)` returns the stored statistics under the same keys.
`forward_with_bn_outputs(model, x)` likewise returns each BN layer's *output* (the feature maps
used by perceptual image distances, `kdd_jax.scores.images`). All are plain functions of arrays
and trace cleanly under `jax.jit` / `jax.grad` / `jax.vmap`.
"""

from __future__ import annotations

import contextvars
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


class BNStats(NamedTuple):
    """Per-channel mean and (biased) variance of a BatchNorm layer's input."""

    mean: jax.Array
    var: jax.Array


# Where BatchNorm2d layers report their input statistics during `capture_bn_stats`. A context
# variable (not module state) keeps the forward pass pure: nothing is written into the model.
_BN_SINK: contextvars.ContextVar[list | None] = contextvars.ContextVar("kdd_bn_sink", default=None)
# Where they report their outputs during `forward_with_bn_outputs` (same mechanism).
_BN_OUT_SINK: contextvars.ContextVar[list | None] = contextvars.ContextVar("kdd_bn_out_sink", default=None)


class BatchNorm2d(nnx.Module):
    """Inference-mode BatchNorm (normalises with the stored running statistics).

    The student is frozen during synthesis, so there is no training mode; batch statistics are
    only *observed* (for the BN-statistics loss), never used to normalise.
    `var` holds PyTorch's running_var as stored (torch keeps the unbiased estimate).
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5):
        self.num_features = num_features
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        sink = _BN_SINK.get()
        if sink is not None:
            axes = tuple(range(x.ndim - 1))
            mu = jnp.mean(x, axis=axes)
            # Two-pass variance: E[x^2]-E[x]^2 loses digits on large activations.
            sink.append((self, BNStats(mu, jnp.mean(jnp.square(x - mu), axis=axes))))
        mult = self.scale[...] * jax.lax.rsqrt(self.var[...] + self.eps)
        y = (x - self.mean[...]) * mult + self.bias[...]
        out_sink = _BN_OUT_SINK.get()
        if out_sink is not None:
            out_sink.append((self, y))
        return y


class _BNCapture:
    """Context manager collecting (layer, value) pairs from BatchNorm2d calls: (layer, BNStats)
    of the input with the default sink, (layer, output) with `_BN_OUT_SINK`."""

    def __init__(self, sink: contextvars.ContextVar = _BN_SINK):
        self._sink = sink

    def __enter__(self) -> list:
        self._records: list = []
        self._token = self._sink.set(self._records)
        return self._records

    def __exit__(self, *exc) -> None:
        self._sink.reset(self._token)


def _bn_layers(model: nnx.Module) -> dict[str, BatchNorm2d]:
    return {
        ".".join(map(str, path)): node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, BatchNorm2d)
    }


def bn_running_stats(model: nnx.Module) -> dict[str, BNStats]:
    """Stored running statistics per BN layer, keyed by PyTorch layer name, in graph order."""
    return {name: BNStats(bn.mean[...], bn.var[...]) for name, bn in _bn_layers(model).items()}


def _forward_capturing(model: nnx.Module, x: jax.Array, sink: contextvars.ContextVar) -> tuple[jax.Array, dict]:
    names = {id(bn): name for name, bn in _bn_layers(model).items()}
    with _BNCapture(sink) as records:
        logits = model(x)
    captured = {names[id(bn)]: v for bn, v in records}
    if len(captured) != len(records):
        raise RuntimeError("a BatchNorm layer ran more than once in one forward pass; unsupported")
    return logits, captured


def forward_with_bn_stats(model: nnx.Module, x: jax.Array) -> tuple[jax.Array, dict[str, BNStats]]:
    """Logits plus each BN layer's batch statistics of its input, keyed like `bn_running_stats`."""
    return _forward_capturing(model, x, _BN_SINK)


def forward_with_bn_outputs(model: nnx.Module, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Logits plus each BN layer's output [N, h, w, c], keyed by PyTorch layer name.

    The dict is in call order (the order the forward pass ran the layers); a `jax.jit` caller
    receives it back with sorted keys, as for any dict pytree. Outputs are taken before any
    following activation or residual add (exactly what BatchNorm2d returns)."""
    return _forward_capturing(model, x, _BN_OUT_SINK)
