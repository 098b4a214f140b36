"""The key map: PyTorch state-dict name -> Flax state path, with the layout transform.

kdd_jax models mirror torch module names in their NNX graph paths (`kdd_jax/models/layers.py`), so
the map is derived from the model's own structure rather than typed out by hand per family: one
rule per layer type, applied to every layer the model has. The result is an explicit table
(recorded in each conversion report) and is applied strictly: every source key must be consumed
(only `num_batches_tracked` may be dropped), every target filled, every shape and dtype checked,
every value finite. All problems are collected and raised together.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
from flax import nnx

from kdd_jax.models import BatchNorm2d
from kdd_jax.models.transformer import Parameter

KEYMAP_VERSION = 1
DROPPABLE_SUFFIXES = (".num_batches_tracked",)
FLOAT_SOURCE_DTYPES = {"float32", "float16", "bfloat16", "float64"}

# transform name -> (source -> target array, target shape -> source shape, target -> source array)
TRANSFORMS = {
    "identity": (lambda a: a, lambda s: s, lambda a: a),
    "oihw_to_hwio": (lambda a: a.transpose(2, 3, 1, 0), lambda s: (s[3], s[2], s[0], s[1]), lambda a: a.transpose(3, 2, 0, 1)),
    "transpose": (lambda a: a.T, lambda s: (s[1], s[0]), lambda a: a.T),
}
# layer type -> [(torch param name, flax variable name, transform)]
LAYER_RULES = {
    nnx.Conv: [("weight", "kernel", "oihw_to_hwio"), ("bias", "bias", "identity")],
    nnx.Linear: [("weight", "kernel", "transpose"), ("bias", "bias", "identity")],
    BatchNorm2d: [
        ("weight", "scale", "identity"),
        ("bias", "bias", "identity"),
        ("running_mean", "mean", "identity"),
        ("running_var", "var", "identity"),
    ],
    # diffusers' UNet2DModel (kdd_jax/models/unet.py): torch GroupNorm and Embedding
    nnx.GroupNorm: [("weight", "scale", "identity"), ("bias", "bias", "identity")],
    nnx.Embed: [("weight", "embedding", "identity")],
    # transformers vision towers (kdd_jax/models/clip_vision.py, vit.py); "" = the parameter IS the
    # torch key (a bare nn.Parameter on its parent module, e.g. embeddings.class_embedding)
    nnx.LayerNorm: [("weight", "scale", "identity"), ("bias", "bias", "identity")],
    Parameter: [("", "value", "identity")],
}


class ConversionError(ValueError):
    """Conversion failed; the message names the file and lists every problem found."""


@dataclasses.dataclass(frozen=True)
class Entry:
    source: str  # torch state-dict key, e.g. "layer1.0.conv1.weight"
    target: tuple  # nnx state path, e.g. ("layer1", 0, "conv1", "kernel")
    transform: str
    target_shape: tuple[int, ...]
    trainable: bool  # an nnx.Param (False: BN running statistics)

    @property
    def source_shape(self) -> tuple[int, ...]:
        return tuple(TRANSFORMS[self.transform][1](self.target_shape))


def build_keymap(abstract_model: nnx.Module) -> list[Entry]:
    """One entry per parameter/statistic of the model, in graph order."""
    entries = []
    for path, node in nnx.iter_graph(abstract_model):
        rules = next((r for cls, r in LAYER_RULES.items() if isinstance(node, cls)), None)
        if rules is None:
            continue
        prefix = ".".join(map(str, path))
        for src_name, var_name, transform in rules:
            var = getattr(node, var_name, None)
            if var is None:  # e.g. a conv without bias
                continue
            source = f"{prefix}.{src_name}" if src_name else prefix
            entries.append(Entry(source, (*path, var_name), transform, tuple(var.shape), isinstance(var, nnx.Param)))
    covered = {e.target for e in entries}
    state = nnx.state(abstract_model)
    uncovered = [p for p, _ in nnx.to_flat_state(state) if tuple(p) not in covered]
    if uncovered:  # a layer type without a rule: a bug in this package, not in the input
        raise RuntimeError(f"key map does not cover {uncovered[:5]}")
    return entries


def dtype_name(a: np.ndarray) -> str:
    return "bfloat16" if a.dtype.name == "bfloat16" else a.dtype.name


def apply_keymap(tensors: dict[str, np.ndarray], entries: list[Entry], source: str) -> tuple[dict, dict]:
    """Map torch tensors onto the model's state as float32 arrays.

    Returns (nested pure dict for `nnx.replace_by_pure_dict`, facts for the report).
    Raises ConversionError naming `source` and listing every missing, unexpected, misshapen,
    non-float or non-finite key.
    """
    problems: list[str] = []
    expected = {e.source for e in entries}
    dropped = sorted(k for k in tensors if k not in expected and k.endswith(DROPPABLE_SUFFIXES))
    unexpected = sorted(k for k in tensors if k not in expected and k not in dropped)
    missing = [e.source for e in entries if e.source not in tensors]
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    pure: dict = {}
    source_dtypes: Counter = Counter()
    for e in entries:
        if e.source not in tensors:
            continue
        a = tensors[e.source]
        dt = dtype_name(a)
        source_dtypes[dt] += 1
        if dt not in FLOAT_SOURCE_DTYPES:
            problems.append(f"{e.source}: dtype {dt} is not a floating-point weight type")
            continue
        if tuple(a.shape) != e.source_shape:
            problems.append(f"{e.source}: shape {list(a.shape)}, expected {list(e.source_shape)}")
            continue
        value = np.asarray(TRANSFORMS[e.transform][0](a), dtype=np.float32)
        if not np.isfinite(value).all():
            bad = int((~np.isfinite(value)).sum())
            problems.append(f"{e.source}: {bad} non-finite value(s) (NaN/Inf)")
            continue
        node = pure
        for part in e.target[:-1]:
            node = node.setdefault(part, {})
        node[e.target[-1]] = value
    if problems:
        raise ConversionError(f"{source}: cannot convert ({len(problems)} problem(s)):\n  " + "\n  ".join(problems))
    facts = {"source_dtypes": dict(source_dtypes), "target_dtype": "float32", "dropped_keys": dropped}
    return pure, facts


def export_torch_state(model: nnx.Module) -> dict[str, np.ndarray]:
    """The inverse map: a Flax model's weights as a PyTorch state dict (names and layouts), float32.

    `num_batches_tracked` is not stored by kdd_jax and is not emitted (torch restores it as 0)."""
    state = dict(nnx.to_flat_state(nnx.state(model)))
    return {
        e.source: np.ascontiguousarray(TRANSFORMS[e.transform][2](np.asarray(state[e.target][...])))
        for e in build_keymap(model)
    }


def _listing(keys: list[str], limit: int = 12) -> str:
    more = f", ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    # names come from strangers: escape control and bidi characters before they reach a terminal
    return ", ".join(k if k.isprintable() else repr(k) for k in keys[:limit]) + more
