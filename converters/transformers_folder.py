"""What every transformers image-encoder folder converter reads besides its weights' names: the
folder's `config.json` model type, its single safetensors weights file (pickles and shards refused),
and the image preprocessing in `preprocessor_config.json` (normalisation and resampling filter).
Used by `converters/clip_vision.py` and `converters/vit.py`.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from pathlib import Path

from flax import nnx

from converters.keymap import KEYMAP_VERSION, ConversionError, apply_keymap, build_keymap
from kdd_jax.config import ConfigError, read_json_config
from kdd_jax.io import read_safetensors, sha256_file
from kdd_jax.versions import versions

WEIGHTS_NAME = "model.safetensors"
# PIL's resampling codes (transformers' `resample`) -> jax.image.resize methods; BOX (4) and
# HAMMING (5) have no jax counterpart
RESAMPLE = {0: "nearest", 1: "lanczos3", 2: "linear", 3: "cubic"}
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def model_type(path) -> str | None:
    """`config.json`'s model_type of a folder (checked before any weights are read); None when the
    folder has no readable transformers config."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        value = read_json_config(cfg).get("model_type")
    except (ConfigError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def weights_file(folder: Path, what: str) -> Path:
    """The folder's `model.safetensors`, or a ConversionError that says what else was found."""
    if not folder.is_dir():
        raise ConversionError(f"{folder}: not a directory (a transformers {what} folder: config.json + {WEIGHTS_NAME})")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        if (folder / f"{WEIGHTS_NAME}.index.json").is_file():
            raise ConversionError(f"{folder}: sharded checkpoints ({WEIGHTS_NAME}.index.json) are not supported")
        if (folder / "pytorch_model.bin").is_file():
            raise ConversionError(f"{folder}: only pickle weights (pytorch_model.bin) found; they are refused "
                                  "(unpickling can run code). Re-save with save_pretrained(dir, safe_serialization=True)")
        raise ConversionError(f"{folder}: no {WEIGHTS_NAME}")
    return weights


def read_folder(path, what: str, parse) -> tuple[Path, Path, dict, dict]:
    """(folder, weights file, config.json data, tensors) of a transformers folder. `parse(data,
    source)` validates config.json first, so a bad field is named before a (GB-size) weights file is
    read; pickles and shards are refused (`weights_file`)."""
    folder = Path(path)
    weights = weights_file(folder, what)
    data = read_json_config(folder / "config.json")
    parse(data, str(folder / "config.json"))
    tensors, _ = read_safetensors(weights)
    return folder, weights, data, tensors


def processor_config(folder: Path, flags: tuple[str, ...]) -> tuple[Path, dict, dict[str, bool]]:
    """(path, data, {flag: value}) of the folder's `preprocessor_config.json` ({} when absent); each of
    `flags` (`do_*` switches, true unless set) must be a boolean, else a ConfigError naming the field."""
    pre = folder / "preprocessor_config.json"
    data = read_json_config(pre, "preprocessor config") if pre.is_file() else {}
    if not isinstance(data, dict):
        raise ConfigError(f"{pre}: expected a JSON object")
    values = {}
    for key in flags:
        values[key] = data.get(key, True)
        if not isinstance(values[key], bool):
            raise ConfigError(f"{pre}.{key}: expected true or false, got {values[key]!r}")
    return pre, data, values


def preprocessing(folder: Path, mean: tuple, std: tuple, resample: int | None, channels: int = 3) -> dict:
    """The folder's `preprocessor_config.json` (the given defaults where absent): `mean`, `std`
    (mean 0 / std 1 when `do_normalize` is false; then `image_mean` / `image_std` are not read),
    `resize` (a jax.image.resize method from the PIL `resample` code; None, and `resample` not
    read, when `resample` is None: a model that never resizes), `value_range` (raw pixels 0-255
    times `rescale_factor` when `do_rescale`, as the processors do) and `source` (where they came from)."""
    pre, data, flags = processor_config(folder, ("do_normalize", "do_rescale"))
    out = {"image_mean": (0.0,) * channels, "image_std": (1.0,) * channels}
    for key, default in (("image_mean", mean), ("image_std", std)) if flags["do_normalize"] else ():
        v = data.get(key, default)
        if (not isinstance(v, list | tuple) or len(v) != channels
                or not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v)
                or (key == "image_std" and min(v) <= 0)):
            where = pre if key in data else f"{pre} (absent: the processor's default)"
            raise ConfigError(f"{where}.{key}: expected {channels} finite numbers"
                              f"{' > 0' if key == 'image_std' else ''}, got {v!r}")
        out[key] = tuple(float(x) for x in v)
    factor = data.get("rescale_factor", 1 / 255) if flags["do_rescale"] else 1.0
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not 0 < factor < math.inf:
        raise ConfigError(f"{pre}.rescale_factor: expected a finite number > 0, got {factor!r}")
    code = data.get("resample", resample)
    if resample is not None and (isinstance(code, bool) or not isinstance(code, int) or code not in RESAMPLE):
        known = ", ".join(f"{k} ({v})" for k, v in RESAMPLE.items())
        name = f" ({_RESAMPLE_NAMES[code]})" if type(code) is int and code in _RESAMPLE_NAMES else ""
        raise ConfigError(f"{pre}.resample: {code!r}{name} is not supported; supported PIL codes: {known}")
    return {"mean": out["image_mean"], "std": out["image_std"],
            "resize": None if resample is None else RESAMPLE[code],
            "value_range": (0.0, 255.0 * float(factor)),
            "source": str(pre) if pre.is_file() else "defaults (no preprocessor_config.json)"}


@dataclasses.dataclass
class EncoderConversion:
    """A converted image encoder: the Flax model, its config, and the preprocessing it expects."""

    model: nnx.Module
    config: object
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str  # jax.image.resize method (the processor's resampling filter)
    report: dict


def fill(abstract: nnx.Module, tensors: dict, weights: Path, folder: Path, family: str, pre: dict,
         dropped: list[str], **extra) -> EncoderConversion:
    """Fill `abstract` (an RGB encoder) strictly from `tensors` (the generic key map: every key used,
    every parameter filled, shapes, dtypes and finiteness checked) and write the conversion report.
    `dropped`: keys removed before the key map (buffers), listed in the report; `extra`: report fields."""
    cfg = abstract.config
    if cfg.num_channels != 3:
        raise ConfigError(f"{folder / 'config.json'}: num_channels {cfg.num_channels}; image-encoder feature "
                          "networks take RGB")
    if not math.isclose(pre["value_range"][1], 1.0, rel_tol=1e-6):
        # feature nets take [0, 1] images: what the processor makes of 0-255 pixels with rescale_factor 1/255
        raise ConfigError(f"{pre['source']}: do_rescale / rescale_factor give a pixel range "
                          f"[0, {pre['value_range'][1]:g}]; image-encoder feature networks support only the "
                          "processors' default, do_rescale true with rescale_factor 1/255 ([0, 1])")
    entries = build_keymap(abstract)
    pure, facts = apply_keymap(tensors, entries, str(weights))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, pure)
    facts["dropped_keys"] = facts["dropped_keys"] + dropped
    report = {
        "kind": "kdd_jax.conversion_report",
        "name": folder.name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"weights": str(weights), "format": "safetensors", "sha256": sha256_file(weights),
                   "bytes": weights.stat().st_size, "config": str(folder / "config.json"),
                   "preprocessing": pre["source"]},
        "family": family,
        "config": dataclasses.asdict(cfg),
        "mean": list(pre["mean"]), "std": list(pre["std"]), "resize": pre["resize"],
        "parameters": sum(math.prod(e.target_shape) for e in entries),
        **extra,
        "keymap_version": KEYMAP_VERSION,
        "keymap": [[e.source, ".".join(map(str, e.target)), e.transform] for e in entries],
        "dtype": facts,
        "versions": versions(),
    }
    return EncoderConversion(nnx.merge(graphdef, state), cfg, pre["mean"], pre["std"], pre["resize"], report)


__all__ = ["RESAMPLE", "WEIGHTS_NAME", "EncoderConversion", "fill", "model_type", "preprocessing", "processor_config",
           "read_folder", "weights_file"]
