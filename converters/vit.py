"""transformers ViT / DINO / DINOv2 folder -> Flax `kdd_jax.models.vit.ViTModel`, strictly.

    from converters.vit import convert_vit
    result = convert_vit("weights/dino-vits16")   # config.json + model.safetensors

A folder is what `save_pretrained(dir)` of transformers' `ViTModel` (model_type `vit`: DINO's
`facebook/dino-vit{s,b}{8,16}`) or `Dinov2Model` (model_type `dinov2`: `facebook/dinov2-*`) writes:
`config.json` and `model.safetensors`. The `*ForImageClassification` heads' folders convert too: the
`vit.` / `dinov2.` prefix is stripped and the `classifier.*` keys are counted and left unused. The
optional `pooler` (ViT) and `mask_token` are converted when present and not used by the embedding.
`preprocessor_config.json`, when present, gives the preprocessing (`image_mean`, `image_std`,
`do_normalize`, `resample`); otherwise the image processors' defaults: ViTImageProcessor's mean/std
0.5 and bilinear for `vit`, DINOv2's ImageNet mean/std and bicubic for `dinov2`. Pickle weights and
sharded checkpoints are refused.
"""

from __future__ import annotations

from pathlib import Path

from converters.transformers_folder import EncoderConversion, fill, model_type, preprocessing, read_folder
from kdd_jax.config import ConfigError
from kdd_jax.models.vit import VARIANTS, ViTConfig, abstract_vit

FAMILY = "transformers_vit"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# what the model's image processor does without a preprocessor_config.json: (mean, std, PIL resample)
_PROCESSOR_DEFAULTS = {"vit": ((0.5,) * 3, (0.5,) * 3, 2), "dinov2": (IMAGENET_MEAN, IMAGENET_STD, 3)}


def is_vit_folder(path) -> bool:
    """A folder whose config.json names a ViT or DINOv2 model (checked before any weights are read)."""
    return model_type(path) in VARIANTS


def convert_vit(path: str | Path) -> EncoderConversion:
    """Convert a transformers ViT / DINOv2 folder. Raises ConversionError / ConfigError /
    CheckpointError (all ValueErrors) naming the file and the key or field at fault."""
    folder, weights, data, tensors = read_folder(path, "ViT/DINO", ViTConfig.from_transformers)
    variant = data["model_type"]  # validated by read_folder
    prefix = f"{variant}."
    if any(k.startswith(prefix) for k in tensors):  # a *ForImageClassification checkpoint
        head = sorted(k for k in tensors if not k.startswith(prefix))
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    else:
        head = []
    if head and not all(k.startswith("classifier.") for k in head):
        raise ConfigError(f"{weights}: keys outside {prefix}* other than a classifier head: {head[:5]}")
    cfg = ViTConfig.from_transformers(data, str(folder / "config.json"), pooler="pooler.dense.weight" in tensors,
                                      mask_token="embeddings.mask_token" in tensors)
    mean, std, resample = _PROCESSOR_DEFAULTS[cfg.variant]
    pre = preprocessing(folder, mean, std, resample)
    return fill(abstract_vit(cfg), tensors, weights, folder, FAMILY, pre, [], unused_classifier_keys=len(head))


__all__ = ["FAMILY", "convert_vit", "is_vit_folder"]
