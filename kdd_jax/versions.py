"""Versions of everything that can change a result, for reports (determinism: record, then compare)."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
from importlib import metadata
from pathlib import Path


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
    from kdd_jax import xla_workarounds

    out["xla_workaround"] = f"{xla_workarounds.FLAG} {xla_workarounds.apply()}"
    return out


def machine() -> dict:
    """What a benchmark ran on: CPU model, CPUs (all and usable), memory, platform; the host name
    only as a hash (reports get shared)."""
    def proc_field(path: str, key: str) -> str | None:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return None

    mem = proc_field("/proc/meminfo", "MemTotal")
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu_model": proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
            "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "memory_gib": round(int(mem.split()[0]) / 2**20, 1) if mem else None,
            "platform": platform.platform(), "python": platform.python_version(),
            "hostname_hash": hashlib.sha256(platform.node().encode()).hexdigest()[:12]}
