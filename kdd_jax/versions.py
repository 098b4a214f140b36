"""Versions of everything that can change a result, for reports (determinism: record, then compare)."""

from __future__ import annotations

import functools
import platform
import sys
from importlib import metadata


def versions() -> dict[str, str]:
    return dict(_versions())  # a copy: callers put it in reports they may edit


@functools.cache
def _versions() -> dict[str, str]:  # importlib.metadata costs ~12 ms a call
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for dist in ("kdd-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scipy", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out
