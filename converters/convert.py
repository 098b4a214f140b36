"""Convert one student: read tensors, resolve its config, build the model, apply the key map."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import functools
import json
import math
from pathlib import Path

from flax import nnx

from converters.inference import InferenceError, infer_config
from converters.keymap import KEYMAP_VERSION, ConversionError, apply_keymap, build_keymap
from converters.student import StudentSource, read_tensors
from kdd_jax.config import ConfigError, StudentConfig, load_config, parse_config, read_json_config
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
    # Hash the source while converting: hashlib releases the GIL, and hashing costs as much as reading.
    sha256 = _HASHER.submit(sha256_file, src.weights)
    tensors, fmt = read_tensors(src, allow_pickle=allow_pickle)
    if not tensors:
        raise CheckpointError(f"{src.weights}: the checkpoint holds no tensors")
    cfg, config_source, inferred = _resolve_config(src, tensors, config)
    layers = _layer_count(cfg)
    if layers > len(tensors):  # before building it: model construction time grows faster than linearly with depth
        raise ConversionError(f"{src.weights}: the config asks for {layers} layers but the checkpoint holds only "
                              f"{len(tensors)} tensors: config and weights do not belong together")
    abstract, entries = model_structure(cfg)
    pure, facts = apply_keymap(tensors, entries, str(src.weights))
    graphdef, state = nnx.split(abstract)  # fresh state each time: the cached model stays abstract
    nnx.replace_by_pure_dict(state, pure)
    model = nnx.merge(graphdef, state)
    report = {
        "kind": "kdd_jax.conversion_report",
        "name": src.name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "weights": str(src.weights),
            "format": fmt,
            "sha256": sha256.result(),
            "bytes": src.weights.stat().st_size,
            "config": config_source,
        },
        "inferred": inferred,
        "family": cfg.family,
        "config": cfg.to_dict(),
        "parameters": sum(math.prod(e.target_shape) for e in entries if e.trainable),
        "keymap_version": KEYMAP_VERSION,
        "keymap": [[e.source, ".".join(map(str, e.target)), e.transform] for e in entries],
        "dtype": facts,
        "versions": versions(),
    }
    return ConversionResult(model, cfg, report, tensors)


def stale_reason(src: StudentSource, target: Path, *, config=None, allow_pickle: bool = False,
                 verify: bool = False) -> tuple[str | None, dict]:
    """(None, its conversion report) when `target` is what converting `src` now would publish: a `kdd
    convert` output of the same weights (sha256), by the same key map, with the same config (resolved as
    conversion resolves it: `config` override, the source's config.json, or inference) and, with
    `verify`, verified then too. Otherwise (why not, for the message that refuses to overwrite it; the
    report or {}). A source that cannot be read or configured raises as its conversion would."""
    report_path = target / "conversion_report.json"
    try:
        report = json.loads(report_path.read_text())
        converted = load_config(target / "config.json")  # parsed: fields added since then read as their defaults
    except (OSError, ValueError):
        return "is not a kdd convert output (no readable conversion_report.json and config.json)", {}
    if not isinstance(report, dict) or report.get("kind") != "kdd_jax.conversion_report":
        return f"is not a kdd convert output ({report_path} is not a conversion report)", {}
    if (report.get("source") or {}).get("sha256") != sha256_file(src.weights):
        return f"was converted from other weights than {src.weights}", report
    if report.get("keymap_version") != KEYMAP_VERSION:
        why = f"was converted by another key map (version {report.get('keymap_version')!r}, now {KEYMAP_VERSION})"
        return why, report
    if verify and (report.get("verification") or {}).get("ok") is not True:
        return "was not verified against PyTorch", report
    tensors, _ = read_tensors(src, allow_pickle=allow_pickle)
    cfg, _, _ = _resolve_config(src, tensors, config)
    if cfg != converted:
        return "was converted with another config", report
    return None, report


_HASHER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdd-sha256")


@functools.lru_cache(maxsize=32)
def model_structure(cfg: StudentConfig) -> tuple[nnx.Module, list]:
    """(abstract model, key map) per config. Tracing a model's init costs ~0.4 s on CPU and zoos
    hold many students of one architecture, so it is done once per distinct config."""
    abstract = abstract_model(cfg)
    return abstract, build_keymap(abstract)


def _layer_count(cfg: StudentConfig) -> int:
    """Layers (or blocks) the config asks for; each needs at least one tensor of the checkpoint."""
    a = cfg.arch
    return {"resnet": lambda: sum(a.layers), "vgg": lambda: sum(v != "M" for v in a.cfg),
            "mobilenetv2": lambda: sum(n for _, _, n, _ in a.inverted_residual_setting),
            "densenet": lambda: sum(a.block_config), "alexnet": lambda: 5,
            "vit": lambda: a.num_hidden_layers}.get(cfg.family, lambda: 0)()


def _resolve_config(src: StudentSource, tensors, override) -> tuple[StudentConfig, str, list[str]]:
    if isinstance(override, dict):
        return parse_config(override, "config override"), "given", []
    if override is not None:
        return load_config(override), str(override), []
    if src.config is not None:
        data = read_json_config(src.config)
        if isinstance(data, dict) and "model_type" in data and "family" not in data:
            # a transformers folder (save_pretrained): its config.json speaks transformers, not our schema
            from converters.vit import student_config

            cfg = student_config(src.config.parent, data, tensors, str(src.config), src.weights)
            return cfg, f"{src.config} (transformers {data['model_type']})", []
        return parse_config(data, str(src.config)), str(src.config), []
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    try:
        cfg_dict, notes = infer_config(shapes, str(src.weights))
    except InferenceError as e:
        raise ConversionError(str(e)) from None
    try:
        return parse_config(cfg_dict, f"{src.weights} (inferred config)"), "inferred", notes
    except ConfigError as e:
        raise ConversionError(f"{src.weights}: inferred an invalid config: {e}") from None
