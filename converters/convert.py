"""Convert one student: read tensors, resolve its config, build the model, apply the key map."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import jax
from flax import nnx

from converters.inference import InferenceError, infer_config
from converters.keymap import KEYMAP_VERSION, ConversionError, apply_keymap, build_keymap
from converters.student import StudentSource, read_tensors
from kdd_jax.config import ConfigError, StudentConfig, load_config, parse_config
from kdd_jax.io import CheckpointError, sha256_file
from kdd_jax.models import abstract_model
from kdd_jax.versions import versions


@dataclasses.dataclass
class ConversionResult:
    model: nnx.Module
    config: StudentConfig
    report: dict
    tensors: dict  # the source tensors (for verification against PyTorch)


def convert_student(
    src: StudentSource | str | Path,
    *,
    config: str | Path | dict | None = None,
    allow_pickle: bool = False,
) -> ConversionResult:
    """Convert a student checkpoint into a Flax model.

    `config` overrides the student's own config.json: a path, or an already-decoded dict.
    Raises ConversionError (or CheckpointError / ConfigError, both ValueErrors) naming the file.
    """
    if not isinstance(src, StudentSource):
        from converters.student import discover

        found = discover([src])
        if len(found) != 1:
            raise ConversionError(f"{src}: holds {len(found)} students; convert them one at a time or in bulk")
        src = found[0]
    tensors, fmt = read_tensors(src, allow_pickle=allow_pickle)
    if not tensors:
        raise CheckpointError(f"{src.weights}: the checkpoint holds no tensors")
    cfg, config_source, inferred = _resolve_config(src, tensors, config)
    abstract = abstract_model(cfg)
    entries = build_keymap(abstract)
    pure, facts = apply_keymap(tensors, entries, str(src.weights))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, pure)
    model = nnx.merge(graphdef, state)
    report = {
        "kind": "kdd_jax.conversion_report",
        "name": src.name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "weights": str(src.weights),
            "format": fmt,
            "sha256": sha256_file(src.weights),
            "bytes": src.weights.stat().st_size,
            "config": config_source,
        },
        "inferred": inferred,
        "family": cfg.family,
        "config": cfg.to_dict(),
        "parameters": int(sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))),
        "keymap_version": KEYMAP_VERSION,
        "keymap": [[e.source, ".".join(map(str, e.target)), e.transform] for e in entries],
        "dtype": facts,
        "versions": versions(),
    }
    return ConversionResult(model, cfg, report, tensors)


def _resolve_config(src: StudentSource, tensors, override) -> tuple[StudentConfig, str, list[str]]:
    if isinstance(override, dict):
        return parse_config(override, "config override"), "given", []
    if override is not None:
        return load_config(override), str(override), []
    if src.config is not None:
        return load_config(src.config), str(src.config), []
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    try:
        cfg_dict, notes = infer_config(shapes, str(src.weights))
    except InferenceError as e:
        raise ConversionError(str(e)) from None
    try:
        return parse_config(cfg_dict, f"{src.weights} (inferred config)"), "inferred", notes
    except ConfigError as e:
        raise ConversionError(f"{src.weights}: inferred an invalid config: {e}") from None
