"""VGG (with or without BatchNorm) with torchvision naming: features.{idx}, classifier.{idx}.

Indices count Conv2d, BatchNorm2d, ReLU and MaxPool2d exactly as torchvision's `make_layers`
builds them. The same family covers the plain sequential CNNs that small-image zoos publish
(e.g. the MNIST/USPS/SVHN nets of the `ccexam` package): no adaptive pool (`avgpool: null`),
other classifier layouts (`dropout`), and features grouped per pooling stage (`nested_blocks`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from flax import nnx

from kdd_jax.config import ConfigError
from kdd_jax.models.layers import (
    BatchNorm2d,
    Dropout,
    MaxPool2d,
    ReLU,
    adaptive_avg_pool2d,
    conv2d,
    flatten_nchw,
    linear,
    run_sequential,
)


@dataclasses.dataclass(frozen=True)
class VGGArch:
    cfg: tuple[int | Literal["M"], ...]
    num_classes: int
    batch_norm: bool = True
    in_channels: int = 3
    avgpool: tuple[int, int] | None = (7, 7)
    classifier_hidden: tuple[int, ...] = (4096, 4096)
    # where Dropout sits in the classifier: torchvision's Linear,ReLU,Dropout ("after_relu"),
    # Dropout,Linear,ReLU ("before_linear"), or no Dropout at all ("none").
    dropout: Literal["after_relu", "before_linear", "none"] = "after_relu"
    dropout_p: float = 0.5
    nested_blocks: bool = False
    bn_eps: float = 1e-5

    def __post_init__(self):
        convs = [c for c in self.cfg if c != "M"]
        if not convs:
            raise ConfigError("cfg must contain at least one conv width")
        if min(convs) < 1 or self.num_classes < 1 or self.in_channels < 1:
            raise ConfigError("conv widths, num_classes and in_channels must be >= 1")
        if self.classifier_hidden and min(self.classifier_hidden) < 1:
            raise ConfigError("classifier_hidden sizes must be >= 1")
        if self.avgpool is not None and min(self.avgpool) < 1:
            raise ConfigError("avgpool sizes must be >= 1")
        if self.nested_blocks and self.cfg[-1] != "M":
            raise ConfigError("nested_blocks needs cfg to end with 'M' (blocks end at each pool)")
        if self.bn_eps <= 0:
            raise ConfigError("bn_eps must be > 0")


def _feature_layers(arch: VGGArch, rngs: nnx.Rngs) -> list:
    layers, in_ch = [], arch.in_channels
    for c in arch.cfg:
        if c == "M":
            layers.append(MaxPool2d(2, 2))
            continue
        layers.append(conv2d(in_ch, c, 3, padding=1, bias=True, rngs=rngs))
        if arch.batch_norm:
            layers.append(BatchNorm2d(c, eps=arch.bn_eps))
        layers.append(ReLU())
        in_ch = c
    return layers


def feature_map_size(arch: VGGArch, input_size: tuple[int, int]) -> tuple[int, int]:
    h, w = input_size
    for c in arch.cfg:
        if c == "M":
            h, w = h // 2, w // 2
    return h, w


class VGG(nnx.Module):
    def __init__(self, arch: VGGArch, *, input_size: tuple[int, int], rngs: nnx.Rngs):
        self.arch = arch
        flat = _feature_layers(arch, rngs)
        if arch.nested_blocks:
            blocks, current = [], []
            for layer in flat:
                current.append(layer)
                if isinstance(layer, MaxPool2d):
                    blocks.append(nnx.List(current))
                    current = []
            self.features = nnx.List(blocks)
        else:
            self.features = nnx.List(flat)
        last_ch = [c for c in arch.cfg if c != "M"][-1]
        h, w = arch.avgpool if arch.avgpool is not None else feature_map_size(arch, input_size)
        if h < 1 or w < 1:
            raise ConfigError(f"input_size {list(input_size)} is too small for {arch.cfg.count('M')} pools")
        self.classifier = nnx.List(self._classifier(last_ch * h * w, rngs))

    def _classifier(self, in_features: int, rngs) -> list:
        arch, layers = self.arch, []
        for hidden in arch.classifier_hidden:
            if arch.dropout == "before_linear":
                layers.append(Dropout(arch.dropout_p))
            layers += [linear(in_features, hidden, rngs=rngs), ReLU()]
            if arch.dropout == "after_relu":
                layers.append(Dropout(arch.dropout_p))
            in_features = hidden
        if arch.dropout == "before_linear":
            layers.append(Dropout(arch.dropout_p))
        layers.append(linear(in_features, arch.num_classes, rngs=rngs))
        return layers

    def __call__(self, x):
        if self.arch.nested_blocks:
            for block in self.features:
                x = run_sequential(block, x)
        else:
            x = run_sequential(self.features, x)
        if self.arch.avgpool is not None:
            x = adaptive_avg_pool2d(x, self.arch.avgpool)
        return run_sequential(self.classifier, flatten_nchw(x))
