"""transformers CLIP folder -> Flax `kdd_jax.models.clip_vision.CLIPVisionModel`, strictly.

    from converters.clip_vision import convert_clip_vision
    result = convert_clip_vision("weights/clip-vit-base-patch32")   # config.json + model.safetensors

A folder is what `save_pretrained(dir)` of transformers' `CLIPModel`, `CLIPVisionModel` or
`CLIPVisionModelWithProjection` writes: `config.json` (model_type `clip` or `clip_vision_model`) and
`model.safetensors`; `preprocessor_config.json`, when present, gives the normalisation (`image_mean`,
`image_std`; CLIP's own otherwise). Pickle weights (`pytorch_model.bin`) and sharded checkpoints are
refused. The key map is the generic one (`converters/keymap.py`): every `vision_model.*` key and
`visual_projection.weight` must be used and every parameter filled. A full `CLIPModel` checkpoint
also holds the text tower (`text_model.*`, `text_projection.weight`, `logit_scale`): those keys are
not used, and the report lists how many; `*.position_ids` buffers (older saves) are dropped.
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
from kdd_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModel, abstract_clip_vision
from kdd_jax.versions import versions

FAMILY = "transformers_clip_vision"
WEIGHTS_NAME = "model.safetensors"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIPImageProcessor's defaults
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_TEXT_TOWER = ("text_model.", "text_projection.", "logit_scale")


@dataclasses.dataclass
class CLIPConversionResult:
    model: CLIPVisionModel
    config: CLIPVisionConfig
    mean: tuple[float, ...]
    std: tuple[float, ...]
    report: dict


def is_clip_folder(path) -> bool:
    """A folder whose config.json names a CLIP model (checked before any weights are read)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return read_json_config(cfg).get("model_type") in ("clip", "clip_vision_model")
    except (ConfigError, AttributeError):
        return False


def _normalisation(folder: Path) -> tuple[tuple, tuple, str]:
    pre = folder / "preprocessor_config.json"
    if not pre.is_file():
        return CLIP_MEAN, CLIP_STD, "CLIP's defaults (no preprocessor_config.json)"
    data = read_json_config(pre, "preprocessor config")
    out = []
    for key, default in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
        v = data.get(key, default) if isinstance(data, dict) else None
        if (not isinstance(v, list | tuple) or len(v) != 3
                or not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v)
                or (key == "image_std" and min(v) <= 0)):
            raise ConfigError(f"{pre}.{key}: expected 3 finite numbers{' > 0' if key == 'image_std' else ''}, got {v!r}")
        out.append(tuple(float(x) for x in v))
    return out[0], out[1], str(pre)


def convert_clip_vision(path: str | Path) -> CLIPConversionResult:
    """Convert a transformers CLIP folder's vision tower. Raises ConversionError / ConfigError /
    CheckpointError (all ValueErrors) naming the file and the key or field at fault."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: not a directory (a transformers CLIP folder: config.json + {WEIGHTS_NAME})")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        if (folder / f"{WEIGHTS_NAME}.index.json").is_file():
            raise ConversionError(f"{folder}: sharded checkpoints ({WEIGHTS_NAME}.index.json) are not supported")
        if (folder / "pytorch_model.bin").is_file():
            raise ConversionError(f"{folder}: only pickle weights (pytorch_model.bin) found; they are refused "
                                  "(unpickling can run code). Re-save with save_pretrained(dir, safe_serialization=True)")
        raise ConversionError(f"{folder}: no {WEIGHTS_NAME}")
    tensors, _ = read_safetensors(weights)
    unused = sorted(k for k in tensors if k.startswith(_TEXT_TOWER))  # the text tower's buffers included
    dropped = sorted(k for k in tensors if k.endswith(".position_ids") and k not in set(unused))
    tensors = {k: v for k, v in tensors.items() if k not in set(unused) | set(dropped)}
    cfg = CLIPVisionConfig.from_transformers(read_json_config(folder / "config.json"), str(folder / "config.json"),
                                             projection="visual_projection.weight" in tensors)
    mean, std, norm_source = _normalisation(folder)
    if cfg.num_channels != 3:
        raise ConfigError(f"{folder / 'config.json'}: num_channels {cfg.num_channels}; CLIP feature networks take RGB")
    abstract = abstract_clip_vision(cfg)
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
                   "normalisation": norm_source},
        "family": FAMILY,
        "config": dataclasses.asdict(cfg),
        "mean": list(mean), "std": list(std),
        "parameters": sum(math.prod(e.target_shape) for e in entries),
        "unused_text_tower_keys": len(unused),
        "keymap_version": KEYMAP_VERSION,
        "keymap": [[e.source, ".".join(map(str, e.target)), e.transform] for e in entries],
        "dtype": facts,
        "versions": versions(),
    }
    return CLIPConversionResult(nnx.merge(graphdef, state), cfg, mean, std, report)
