"""Seed -> Gaussian noise, specified exactly so any implementation (a teacher server in PyTorch, a
later version of this package) can regenerate the same numbers without JAX.

    z = seeded_normal(seed, stream, shape)

* bits: NumPy's Philox4x64-10 bit generator (`numpy.random.Philox`, whose raw stream NumPy keeps
  stable across versions) with the 128-bit key `seed + (stream << 64)` and counter 0; `random_raw`
  yields uint64 words u_0, u_1, ...
* value k (k = 0 .. prod(shape) - 1, C order): a = (u_{2k} >> 11) + 1, b = u_{2k+1} >> 11 (53 bits each),
  z_k = sqrt(-2 ln(a / 2^53)) * cos(2 pi b / 2^53) in float64 (Box-Muller), rounded to float32.

Streams: the initial noise x_T of a trajectory is stream 0; ancestral noise added after sampling step i
(0-based, in sampling order) is stream i + 1. Values are generated per trajectory in NCHW (C, H, W) order,
the layout of PyTorch teachers, and returned NHWC for kdd_jax models.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_U53 = 2.0 ** -53


def seeded_normal(seed: int, stream: int, shape: Sequence[int]) -> np.ndarray:
    """Standard normal float32 array of `shape` (C order) for (seed, stream); see the module docstring."""
    if not (0 <= int(seed) < 2 ** 64 and 0 <= int(stream) < 2 ** 64):
        raise ValueError(f"seed={seed} and stream={stream} must be in [0, 2**64)")
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.random.Philox(key=int(seed) + (int(stream) << 64)).random_raw(2 * n)
    a = ((raw[0::2] >> np.uint64(11)) + np.uint64(1)).astype(np.float64) * _U53  # (0, 1]
    b = (raw[1::2] >> np.uint64(11)).astype(np.float64) * _U53  # [0, 1)
    return (np.sqrt(-2.0 * np.log(a)) * np.cos(2.0 * np.pi * b)).astype(np.float32).reshape(tuple(shape))


def _per_seed(seeds: Sequence[int], stream: int, shape_hwc: Sequence[int]) -> np.ndarray:
    h, w, c = shape_hwc
    return np.stack([seeded_normal(s, stream, (c, h, w)).transpose(1, 2, 0) for s in seeds])


def initial_noise(seeds: Sequence[int], shape_hwc: Sequence[int]) -> np.ndarray:
    """x_T for each seed: [len(seeds), H, W, C] float32 (stream 0)."""
    return _per_seed(seeds, 0, shape_hwc)


def step_noise(seeds: Sequence[int], step: int, shape_hwc: Sequence[int]) -> np.ndarray:
    """Ancestral noise of sampling step `step` (0-based) for each seed: [len(seeds), H, W, C] (stream step + 1)."""
    return _per_seed(seeds, step + 1, shape_hwc)
