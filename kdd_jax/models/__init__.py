"""Model families (Flax NNX) with PyTorch/torchvision semantics and naming.

Every model maps an NHWC float32 batch, already normalised as the config's preprocessing says,
to logits. `build_model` makes a randomly initialised model; the converters fill it from a
PyTorch checkpoint. BatchNorm statistics for synthesis: `forward_with_bn_stats`, `bn_running_stats`.
Generative students: `UNet2DModel` (diffusers' UNet2DModel, its own `UNet2DConfig`; not a classifier
family, so not in FAMILIES). Feature networks for their image scores: any family here (AlexNet for
LPIPS), CLIP's vision tower (`kdd_jax.models.clip_vision`) or a ViT / DeiT / DINO / DINOv2 encoder
(`kdd_jax.models.vit`), each with its own config and not in FAMILIES either. The `vit` family is
transformers' ViT / DeiT image classifiers (no BatchNorm: data-free synthesis uses the BN-free method).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from kdd_jax.models.alexnet import AlexNet, AlexNetArch
from kdd_jax.models.batchnorm import BatchNorm2d, BNStats, bn_running_stats, forward_with_bn_stats
from kdd_jax.models.densenet import DenseNet, DenseNetArch
from kdd_jax.models.mobilenetv2 import MobileNetV2, MobileNetV2Arch
from kdd_jax.models.resnet import ResNet, ResNetArch
from kdd_jax.models.unet import UNet2DConfig, UNet2DModel, abstract_unet, build_unet
from kdd_jax.models.vgg import VGG, VGGArch
from kdd_jax.models.vit import ViTClassifierArch, ViTForImageClassification


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    arch_cls: type
    module_cls: type


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("resnet", ResNetArch, ResNet),
        Family("vgg", VGGArch, VGG),
        Family("mobilenetv2", MobileNetV2Arch, MobileNetV2),
        Family("densenet", DenseNetArch, DenseNet),
        Family("alexnet", AlexNetArch, AlexNet),
        Family("vit", ViTClassifierArch, ViTForImageClassification),  # transformers ViT / DeiT classifiers
    )
}


def build_model(config, *, seed: int = 0) -> nnx.Module:
    """A randomly initialised model for a `StudentConfig`."""
    family = FAMILIES[config.family]
    return family.module_cls(config.arch, input_size=config.preprocessing.input_size, rngs=nnx.Rngs(seed))


def abstract_model(config) -> nnx.Module:
    """The model's structure with ShapeDtypeStruct leaves: no memory, no random init."""
    family = FAMILIES[config.family]
    return nnx.eval_shape(
        lambda: family.module_cls(config.arch, input_size=config.preprocessing.input_size, rngs=nnx.Rngs(0))
    )


@functools.partial(jax.jit, static_argnums=(0,))
def _forward(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def predict_logits(model: nnx.Module, x_nhwc, batch: int = 256):
    """Logits [N, C] for normalised NHWC inputs, in jitted batches of `batch` (the last one smaller).
    Compiled once per architecture and batch shape: the weights are an argument, not a constant."""
    graphdef, state = nnx.split(model)
    return jnp.concatenate([_forward(graphdef, state, jnp.asarray(x_nhwc[i: i + batch]))
                            for i in range(0, len(x_nhwc), batch)])


__all__ = [
    "FAMILIES",
    "AlexNet",
    "BNStats",
    "BatchNorm2d",
    "DenseNet",
    "MobileNetV2",
    "ResNet",
    "UNet2DConfig",
    "UNet2DModel",
    "VGG",
    "abstract_model",
    "abstract_unet",
    "bn_running_stats",
    "build_model",
    "build_unet",
    "forward_with_bn_stats",
    "predict_logits",
]
