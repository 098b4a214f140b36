"""transformers ViT / DeiT / DINO / DINOv2 folders -> Flax, strictly: image encoders for the
generative scores (`convert_vit`) and the student config of ViT / DeiT / DINOv2 classifiers (`student_config`).

    from converters.vit import convert_vit
    result = convert_vit("weights/dino-vits16")   # config.json + model.safetensors

A folder is what `save_pretrained(dir)` of transformers' `ViTModel` (model_type `vit`: DINO's
`facebook/dino-vit{s,b}{8,16}`), `DeiTModel` (`deit`) or `Dinov2Model` (model_type `dinov2`:
`facebook/dinov2-*`) writes: `config.json` and `model.safetensors`. As an encoder, a classifier's
folder converts too: the `vit.` / `deit.` / `dinov2.` prefix is stripped and the head's keys are
counted and left unused.

As a student, a `ViTForImageClassification`, `DeiTForImageClassification`,
`DeiTForImageClassificationWithTeacher` or `Dinov2ForImageClassification` folder goes through
`kdd convert` like any other checkpoint (`converters/convert.py` calls `student_config` when
config.json is a transformers one): family `vit`, the head read from the weights. ViT / DeiT probes
and image pools are at the checkpoint's `image_size`; DINOv2's at its processor's centre crop
(`crop_size`, 224x224 by default and in the released classifiers, whose checkpoints hold 518x518
position embeddings, interpolated as transformers does). A processor's resize and the crop itself
are the caller's business, as for every student.

The optional `pooler` (ViT, DeiT) and `mask_token` are converted when present and not used.
`preprocessor_config.json`, when present, gives the preprocessing (`image_mean`, `image_std`,
`do_normalize`, `do_rescale` / `rescale_factor`, and for encoders `resample`; a student never
resizes, so its `resample` is not read); otherwise the image
processors' defaults: ViTImageProcessor's mean/std 0.5 and bilinear for `vit`, DeiT's and DINOv2's
ImageNet mean/std and bicubic for `deit` and `dinov2`. Pickle weights and sharded checkpoints are
refused.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from converters.keymap import ConversionError
from converters.transformers_folder import (WEIGHTS_NAME, EncoderConversion, fill, model_type, preprocessing,
                                           processor_config, read_folder)
from kdd_jax.config import ConfigError, Preprocessing, StudentConfig
from kdd_jax.models.vit import DINOV2_VARIANTS, VARIANTS, ViTClassifierArch, ViTConfig, abstract_vit

FAMILY = "transformers_vit"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# what the model's image processor does without a preprocessor_config.json: (mean, std, PIL resample)
_PROCESSOR_DEFAULTS = {"vit": ((0.5,) * 3, (0.5,) * 3, 2), "deit": (IMAGENET_MEAN, IMAGENET_STD, 3),
                       "dinov2": (IMAGENET_MEAN, IMAGENET_STD, 3),
                       "dinov2_with_registers": (IMAGENET_MEAN, IMAGENET_STD, 3)}
STUDENT_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers")
_DINOV2_CROP = 224  # BitImageProcessor's default crop_size (DINOv2's processor)
# the head's weight key -> (head, transformers class)
_HEAD_KEYS = {"classifier.weight": ("cls", "*ForImageClassification"),  # cls_mean for dinov2
              "cls_classifier.weight": ("cls_distill", "DeiTForImageClassificationWithTeacher")}


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
    if head and not all(k.split(".")[0] in ("classifier", "cls_classifier", "distillation_classifier") for k in head):
        raise ConfigError(f"{weights}: keys outside {prefix}* other than a classifier head: {head[:5]}")
    cfg = ViTConfig.from_transformers(data, str(folder / "config.json"), pooler="pooler.dense.weight" in tensors,
                                      mask_token="embeddings.mask_token" in tensors)
    mean, std, resample = _PROCESSOR_DEFAULTS[cfg.variant]
    pre = preprocessing(folder, mean, std, resample)
    return fill(abstract_vit(cfg), tensors, weights, folder, FAMILY, pre, [], unused_classifier_keys=len(head))


def _size_pair(value) -> tuple[int, int] | None:
    """(height, width) of a processor size given as {height, width} or [h, w]; None otherwise."""
    if isinstance(value, dict) and set(value) == {"height", "width"}:
        value = (value["height"], value["width"])
    if isinstance(value, list | tuple) and len(value) == 2 and all(type(v) is int and v > 0 for v in value):
        return value[0], value[1]
    return None


def _processor_input_size(folder: Path) -> tuple[int, int]:
    """The image size DINOv2's processor (BitImageProcessor) hands the model: its centre crop
    (`crop_size`: {height, width}, [h, w] or one number; 224x224 when absent or null), or with
    `do_center_crop` false a fixed {height, width} resize. A resize by one edge (`size` as
    {shortest_edge} or one number, BitImageProcessor's default being shortest_edge 224) or no resize at
    all leaves each image its own size, which no probe set can match: refused, naming the field."""
    pre, data, flags = processor_config(folder, ("do_center_crop", "do_resize"))
    if flags["do_center_crop"]:
        value = data.get("crop_size")
        if value is None:
            return _DINOV2_CROP, _DINOV2_CROP
        if type(value) is int and value > 0:
            return value, value
        pair = _size_pair(value)
        if pair is None:
            raise ConfigError(f"{pre}.crop_size: expected a positive integer, [height, width] or {{height, width}}, "
                              f"got {value!r}")
        return pair
    if not flags["do_resize"]:
        raise ConfigError(f"{pre}: do_center_crop and do_resize are both false, so each image reaches the model at "
                          "its own size, which a probe set cannot match")
    value = data.get("size")
    pair = _size_pair(value)
    if pair is None:
        shown = f"{value!r}" if "size" in data else "absent (BitImageProcessor's default {'shortest_edge': 224})"
        raise ConfigError(f"{pre}.size: {shown}: without a centre crop (do_center_crop false) only a fixed "
                          "{height, width} resize gives every image one size; a resize by one edge keeps each "
                          "image's aspect ratio, which a probe set cannot match")
    return pair


def student_config(folder: Path, data: dict, tensors: dict, source: str, weights: Path | None = None) -> StudentConfig:
    """The student config (family `vit`) of a transformers ViT / DeiT / DINOv2 classifier folder: the
    encoder's fields from config.json (transformers' defaults where omitted), the head and its class
    count from the weights (checked against `id2label`), the preprocessing from
    `preprocessor_config.json` (the image processor's defaults where absent; for DINOv2 also the
    input size, its centre crop). Raises ConversionError / ConfigError naming the file and field."""
    kind = data.get("model_type")
    if kind not in STUDENT_TYPES:
        hint = "; image encoders (CLIP, DINO) are feature networks: pass their folder to --feature-net"
        raise ConversionError(f"{source}.model_type: {kind!r} is not a supported classifier student; supported "
                              f"transformers classifiers: {', '.join(STUDENT_TYPES)}{hint}")
    found = [k for k in _HEAD_KEYS if k in tensors]
    if not found:
        raise ConversionError(f"{source}: the weights hold no classification head ({' or '.join(_HEAD_KEYS)}): a bare "
                              f"{kind} encoder is not a classifier (use it with --feature-net)")
    head, cls_name = _HEAD_KEYS[found[0]]
    if kind in DINOV2_VARIANTS and head == "cls":
        head, cls_name = "cls_mean", f"{'Dinov2WithRegisters' if kind != 'dinov2' else 'Dinov2'}ForImageClassification"
    weights = weights or folder / WEIGHTS_NAME
    shape = tuple(tensors[found[0]].shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ConversionError(f"{weights}: {kind}'s head weight {found[0]} must be [classes, features], got shape "
                              f"{list(shape)}")
    classes = shape[0]
    labels = data.get("id2label")
    if labels is not None and not isinstance(labels, dict):
        raise ConfigError(f"{source}.id2label: expected an object mapping class ids to labels, got "
                          f"{type(labels).__name__} {labels!r}")
    if labels is not None and len(labels) != classes:
        raise ConfigError(f"{source}.id2label: {len(labels)} labels, but the {cls_name} head has {classes} outputs")
    prefix = f"{kind}."
    arch = ViTClassifierArch.from_transformers(data, source, pooler=f"{prefix}pooler.dense.weight" in tensors,
                                               mask_token=f"{prefix}embeddings.mask_token" in tensors)
    try:
        arch = dataclasses.replace(arch, num_classes=classes, head=head)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    mean, std, _ = _PROCESSOR_DEFAULTS[kind]  # a student's probes and pools come at its input size: no resize
    pre = preprocessing(folder, mean, std, None, channels=arch.num_channels)
    size = _processor_input_size(folder) if kind in DINOV2_VARIANTS else (arch.image_size,) * 2
    try:
        arch.check_input_size(size)
    except ConfigError as e:
        raise ConfigError(f"{folder / 'preprocessor_config.json'}: {e}") from None
    return StudentConfig("vit", arch, Preprocessing(input_size=size, channels=arch.num_channels,
                                                    mean=pre["mean"], std=pre["std"], value_range=pre["value_range"]))


__all__ = ["FAMILY", "STUDENT_TYPES", "convert_vit", "is_vit_folder", "student_config"]
