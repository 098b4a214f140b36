"""DenseNet with torchvision naming (densenet121/169/201 and CIFAR DenseNet-BC).

features.conv0/norm0/relu0/pool0, features.denseblock{i}.denselayer{j}.norm1/conv1/norm2/conv2,
features.transition{i}.norm/conv/pool, features.norm5, classifier. Pre-activation (BN before
conv) makes its BN statistics a different prior from ResNet/VGG: useful diversity for synthesis.
The "small" stem (CIFAR DenseNet-BC) is a single 3x3 stride-1 conv0.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from kdd_jax.config import ConfigError
from kdd_jax.models.layers import AvgPool2d, BatchNorm2d, MaxPool2d, conv2d, linear


@dataclasses.dataclass(frozen=True)
class DenseNetArch:
    num_classes: int
    growth_rate: int = 32
    block_config: tuple[int, ...] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    stem: Literal["imagenet", "small"] = "imagenet"
    compression: float = 0.5
    in_channels: int = 3
    bn_eps: float = 1e-5

    def __post_init__(self):
        if not self.block_config or min(self.block_config) < 1:
            raise ConfigError("block_config must be a non-empty list of positive layer counts")
        if min(self.growth_rate, self.num_init_features, self.bn_size, self.num_classes, self.in_channels) < 1:
            raise ConfigError("growth_rate, num_init_features, bn_size, num_classes, in_channels must be >= 1")
        if not 0 < self.compression <= 1 or self.bn_eps <= 0:
            raise ConfigError("compression must be in (0, 1], bn_eps > 0")


class DenseLayer(nnx.Module):
    def __init__(self, in_features: int, arch: DenseNetArch, rngs: nnx.Rngs):
        mid = arch.bn_size * arch.growth_rate
        self.norm1 = BatchNorm2d(in_features, eps=arch.bn_eps)
        self.conv1 = conv2d(in_features, mid, 1, bias=False, rngs=rngs)
        self.norm2 = BatchNorm2d(mid, eps=arch.bn_eps)
        self.conv2 = conv2d(mid, arch.growth_rate, 3, padding=1, bias=False, rngs=rngs)

    def __call__(self, x):
        out = self.conv1(jax.nn.relu(self.norm1(x)))
        return self.conv2(jax.nn.relu(self.norm2(out)))


class DenseBlock(nnx.Module):
    def __init__(self, num_layers: int, in_features: int, arch: DenseNetArch, rngs: nnx.Rngs):
        self.num_layers = num_layers
        for j in range(num_layers):
            setattr(self, f"denselayer{j + 1}", DenseLayer(in_features + j * arch.growth_rate, arch, rngs))

    def __call__(self, x):
        # torchvision concatenates [input, new_1, new_2, ...] in that order along channels.
        for j in range(self.num_layers):
            x = jnp.concatenate([x, getattr(self, f"denselayer{j + 1}")(x)], axis=-1)
        return x


class Transition(nnx.Module):
    def __init__(self, in_features: int, out_features: int, eps: float, rngs: nnx.Rngs):
        self.norm = BatchNorm2d(in_features, eps=eps)
        self.conv = conv2d(in_features, out_features, 1, bias=False, rngs=rngs)
        self.pool = AvgPool2d(2, 2)

    def __call__(self, x):
        return self.pool(self.conv(jax.nn.relu(self.norm(x))))


class DenseFeatures(nnx.Module):
    def __init__(self, arch: DenseNetArch, rngs: nnx.Rngs):
        self.arch = arch
        nf = arch.num_init_features
        if arch.stem == "imagenet":
            self.conv0 = conv2d(arch.in_channels, nf, 7, stride=2, padding=3, bias=False, rngs=rngs)
            self.norm0 = BatchNorm2d(nf, eps=arch.bn_eps)
            self.pool0 = MaxPool2d(3, 2, 1)
        else:
            self.conv0 = conv2d(arch.in_channels, nf, 3, stride=1, padding=1, bias=False, rngs=rngs)
            self.norm0 = None
            self.pool0 = None
        for i, n_layers in enumerate(arch.block_config):
            setattr(self, f"denseblock{i + 1}", DenseBlock(n_layers, nf, arch, rngs))
            nf += n_layers * arch.growth_rate
            if i != len(arch.block_config) - 1:
                out = int(nf * arch.compression)
                setattr(self, f"transition{i + 1}", Transition(nf, out, arch.bn_eps, rngs))
                nf = out
        self.norm5 = BatchNorm2d(nf, eps=arch.bn_eps)
        self.num_features = nf

    def __call__(self, x):
        x = self.conv0(x)
        if self.norm0 is not None:
            x = self.pool0(jax.nn.relu(self.norm0(x)))
        n_blocks = len(self.arch.block_config)
        for i in range(n_blocks):
            x = getattr(self, f"denseblock{i + 1}")(x)
            if i != n_blocks - 1:
                x = getattr(self, f"transition{i + 1}")(x)
        return self.norm5(x)


class DenseNet(nnx.Module):
    def __init__(self, arch: DenseNetArch, *, input_size: tuple[int, int], rngs: nnx.Rngs):
        del input_size  # global pooling: any input size works
        self.features = DenseFeatures(arch, rngs)
        self.classifier = linear(self.features.num_features, arch.num_classes, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.features(x))
        return self.classifier(x.mean(axis=(1, 2)))
