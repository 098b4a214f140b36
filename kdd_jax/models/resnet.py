"""ResNet with torchvision naming: torchvision resnet18/34/50, ResNeXt, and CIFAR ResNet-20/56.

conv1, bn1, [maxpool], layer{k}.{i}.conv1/bn1/conv2/bn2[/conv3/bn3], layer{k}.{i}.downsample.0/1, fc.
Bottleneck puts the stride on conv2 (torchvision's "ResNet v1.5").
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
from flax import nnx

from kdd_jax.config import ConfigError
from kdd_jax.models.layers import BatchNorm2d, MaxPool2d, conv2d, linear


@dataclasses.dataclass(frozen=True)
class ResNetArch:
    block: Literal["basic", "bottleneck"]
    layers: tuple[int, ...]
    widths: tuple[int, ...]
    num_classes: int
    stem: Literal["imagenet", "small"] = "imagenet"
    stem_width: int | None = None
    in_channels: int = 3
    groups: int = 1
    width_per_group: int = 64
    bn_eps: float = 1e-5

    def __post_init__(self):
        if not self.layers or len(self.layers) != len(self.widths):
            raise ConfigError("layers and widths must be non-empty lists of the same length")
        ints = [*self.layers, *self.widths, self.num_classes, self.in_channels, self.groups, self.width_per_group]
        if min(ints) < 1 or (self.stem_width is not None and self.stem_width < 1):
            raise ConfigError("layers, widths, num_classes, in_channels, groups, width_per_group must be >= 1")
        if self.block == "basic" and (self.groups != 1 or self.width_per_group != 64):
            raise ConfigError("basic blocks support only groups=1 and width_per_group=64 (as torchvision)")
        if self.bn_eps <= 0:
            raise ConfigError("bn_eps must be > 0")

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1


class BasicBlock(nnx.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, arch: ResNetArch, rngs: nnx.Rngs):
        self.conv1 = conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False, rngs=rngs)
        self.bn1 = BatchNorm2d(planes, eps=arch.bn_eps)
        self.conv2 = conv2d(planes, planes, 3, padding=1, bias=False, rngs=rngs)
        self.bn2 = BatchNorm2d(planes, eps=arch.bn_eps)
        self.downsample = _downsample(inplanes, planes, stride, arch, rngs)

    def __call__(self, x):
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
        return jax.nn.relu(out + identity)


class Bottleneck(nnx.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, arch: ResNetArch, rngs: nnx.Rngs):
        width = int(planes * (arch.width_per_group / 64.0)) * arch.groups
        self.conv1 = conv2d(inplanes, width, 1, bias=False, rngs=rngs)
        self.bn1 = BatchNorm2d(width, eps=arch.bn_eps)
        self.conv2 = conv2d(width, width, 3, stride=stride, padding=1, groups=arch.groups, bias=False, rngs=rngs)
        self.bn2 = BatchNorm2d(width, eps=arch.bn_eps)
        self.conv3 = conv2d(width, planes * 4, 1, bias=False, rngs=rngs)
        self.bn3 = BatchNorm2d(planes * 4, eps=arch.bn_eps)
        self.downsample = _downsample(inplanes, planes, stride, arch, rngs)

    def __call__(self, x):
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = jax.nn.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
        return jax.nn.relu(out + identity)


def _downsample(inplanes, planes, stride, arch: ResNetArch, rngs):
    out = planes * arch.expansion
    if stride == 1 and inplanes == out:
        return None
    return nnx.List(
        [conv2d(inplanes, out, 1, stride=stride, bias=False, rngs=rngs), BatchNorm2d(out, eps=arch.bn_eps)]
    )


class ResNet(nnx.Module):
    def __init__(self, arch: ResNetArch, *, input_size: tuple[int, int], rngs: nnx.Rngs):
        del input_size  # global pooling: any input size works
        self.arch = arch
        stem_width = arch.stem_width or arch.widths[0]
        if arch.stem == "imagenet":
            self.conv1 = conv2d(arch.in_channels, stem_width, 7, stride=2, padding=3, bias=False, rngs=rngs)
            self.maxpool = MaxPool2d(3, 2, 1)
        else:
            self.conv1 = conv2d(arch.in_channels, stem_width, 3, stride=1, padding=1, bias=False, rngs=rngs)
            self.maxpool = None
        self.bn1 = BatchNorm2d(stem_width, eps=arch.bn_eps)
        block_cls = Bottleneck if arch.block == "bottleneck" else BasicBlock
        inplanes = stem_width
        for k, (n_blocks, planes) in enumerate(zip(arch.layers, arch.widths)):
            blocks = []
            for i in range(n_blocks):
                stride = 2 if (k > 0 and i == 0) else 1
                blocks.append(block_cls(inplanes, planes, stride, arch, rngs))
                inplanes = planes * arch.expansion
            setattr(self, f"layer{k + 1}", nnx.List(blocks))
        self.fc = linear(inplanes, arch.num_classes, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        for k in range(len(self.arch.layers)):
            for block in getattr(self, f"layer{k + 1}"):
                x = block(x)
        return self.fc(x.mean(axis=(1, 2)))
