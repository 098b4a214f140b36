"""transformers CLIP folder -> Flax `kdd_jax.models.clip_vision.CLIPVisionModel`, strictly.

    from converters.clip_vision import convert_clip_vision
    result = convert_clip_vision("weights/clip-vit-base-patch32")   # config.json + model.safetensors

A folder is what `save_pretrained(dir)` of transformers' `CLIPModel`, `CLIPVisionModel` or
`CLIPVisionModelWithProjection` writes: `config.json` (model_type `clip` or `clip_vision_model`) and
`model.safetensors`; `preprocessor_config.json`, when present, gives the preprocessing
(`image_mean`, `image_std`, `do_normalize`, `resample`; CLIPImageProcessor's defaults otherwise:
CLIP's mean/std, bicubic). Pickle weights (`pytorch_model.bin`) and sharded checkpoints are
refused. The key map is the generic one (`converters/keymap.py`): every `vision_model.*` key and
`visual_projection.weight` must be used and every parameter filled. A full `CLIPModel` checkpoint
also holds the text tower (`text_model.*`, `text_projection.weight`, `logit_scale`): those keys are
not used, and the report lists how many; `*.position_ids` buffers (older saves) are dropped.
"""

from __future__ import annotations

from pathlib import Path

from converters.transformers_folder import EncoderConversion, fill, model_type, preprocessing, read_folder
from kdd_jax.models.clip_vision import CLIPVisionConfig, abstract_clip_vision

FAMILY = "transformers_clip_vision"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIPImageProcessor's defaults
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_TEXT_TOWER = ("text_model.", "text_projection.", "logit_scale")


CLIPConversionResult = EncoderConversion  # model: CLIPVisionModel, config: CLIPVisionConfig


def is_clip_folder(path) -> bool:
    """A folder whose config.json names a CLIP model (checked before any weights are read)."""
    return model_type(path) in ("clip", "clip_vision_model")


def convert_clip_vision(path: str | Path) -> CLIPConversionResult:
    """Convert a transformers CLIP folder's vision tower. Raises ConversionError / ConfigError /
    CheckpointError (all ValueErrors) naming the file and the key or field at fault."""
    folder, weights, data, tensors = read_folder(path, "CLIP", CLIPVisionConfig.from_transformers)
    unused = sorted(k for k in tensors if k.startswith(_TEXT_TOWER))  # the text tower's buffers included
    dropped = sorted(k for k in tensors if k.endswith(".position_ids") and k not in set(unused))
    tensors = {k: v for k, v in tensors.items() if k not in set(unused) | set(dropped)}
    cfg = CLIPVisionConfig.from_transformers(data, str(folder / "config.json"),
                                             projection="visual_projection.weight" in tensors)
    pre = preprocessing(folder, CLIP_MEAN, CLIP_STD, resample=3)  # CLIPImageProcessor: bicubic
    return fill(abstract_clip_vision(cfg), tensors, weights, folder, FAMILY, pre, dropped,
                unused_text_tower_keys=len(unused))
