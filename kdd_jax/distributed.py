"""Every device and mesh decision in one place: the mesh and the sharded map.

Score computation is embarrassingly parallel over (student, teacher) pairs, so work is laid out
along one mesh axis ("pairs") and run with `jax.jit` over inputs placed with `NamedSharding`:
XLA partitions the vmapped computation, each device scoring its slice. `jax.pmap` is not used
(maintenance mode); no per-device Python code is needed.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXIS = "pairs"


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of this process). Auto axis: shardings
    are propagated by XLA, so callers only place inputs.

    Why local by default: in a multi-process run (kdd audit --distributed) each process scores its
    own students, and a mesh spanning other hosts' devices would require every process to pass
    the same arrays in lockstep. Pass `jax.devices()` for a global SPMD computation."""
    devices = list(devices) if devices is not None else jax.local_devices()
    return jax.make_mesh((len(devices),), (AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def sharded_map(fn: Callable, *arrays, mesh: Mesh | None = None):
    """`jax.vmap(fn)` over the leading axis of `arrays`, that axis split across the mesh.

    The leading axis is padded (by repeating the last row) to a multiple of the device count and
    the padding is dropped from the result, so any count works on any mesh."""
    mesh = mesh or make_mesh()
    n = arrays[0].shape[0]
    if any(a.shape[0] != n for a in arrays):
        raise ValueError(f"leading axes differ: {[a.shape[0] for a in arrays]}")
    d = mesh.devices.size
    pad = (-n) % d
    sharding = NamedSharding(mesh, PartitionSpec(AXIS))
    placed = []
    for a in arrays:
        a = jnp.asarray(a)
        if pad:
            a = jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)])
        placed.append(jax.device_put(a, sharding))
    out = _jitted_vmap(fn)(*placed)
    return jax.tree.map(lambda x: x[:n], out)


_CACHE: dict = {}


def _jitted_vmap(fn):
    # one compiled program per function (and, inside jit, per shape): repeated audits never recompile
    if fn not in _CACHE:
        _CACHE[fn] = jax.jit(jax.vmap(fn))
    return _CACHE[fn]
