"""AlexNet with torchvision naming: features.{0,3,6,8,10} convs, classifier.{1,4,6} linears.

torchvision's `alexnet` (the "one weird trick" variant: 64-192-384-256-256 channels), whose
ImageNet weights are the backbone of AlexNet-LPIPS (Zhang et al. 2018), the paper's perceptual
distance for generative students. The family exists so that users holding those weights can
convert them like any student (`kdd convert --allow-pickle alexnet-owt-*.pth`) and use them as a
feature network (`kdd_jax.scores.images.classifier_feature_net`); it has no BatchNorm, so the
BN-statistics synthesis methods refuse it as a student.

`widths` and `classifier_hidden` generalise the layer sizes (small AlexNets; tests); kernel
sizes, strides and padding are torchvision's: 11/4/2, 5/1/2, then 3/1/1 three times, each conv
followed by a ReLU, with 3x3 stride-2 max-pools after the first, second and fifth.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from kdd_jax.config import ConfigError
from kdd_jax.models.layers import (
    Dropout,
    MaxPool2d,
    ReLU,
    adaptive_avg_pool2d,
    conv2d,
    flatten_nchw,
    linear,
    run_sequential,
)

# (kernel, stride, padding) of the five convs, and whether a max-pool follows each
_CONVS = ((11, 4, 2), (5, 1, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1))
_POOL_AFTER = (True, True, False, False, True)


@dataclasses.dataclass(frozen=True)
class AlexNetArch:
    num_classes: int
    widths: tuple[int, int, int, int, int] = (64, 192, 384, 256, 256)
    in_channels: int = 3
    avgpool: tuple[int, int] | None = (6, 6)
    classifier_hidden: tuple[int, ...] = (4096, 4096)
    dropout_p: float = 0.5

    def __post_init__(self):
        if len(self.widths) != 5:
            raise ConfigError(f"widths must list the 5 conv widths, got {len(self.widths)}")
        if min(self.widths) < 1 or self.num_classes < 1 or self.in_channels < 1:
            raise ConfigError("widths, num_classes and in_channels must be >= 1")
        if self.classifier_hidden and min(self.classifier_hidden) < 1:
            raise ConfigError("classifier_hidden sizes must be >= 1")
        if self.avgpool is not None and (len(self.avgpool) != 2 or min(self.avgpool) < 1):
            raise ConfigError("avgpool must be [h, w] with sizes >= 1, or null")
        if not 0 <= self.dropout_p < 1:
            raise ConfigError("dropout_p must be in [0, 1)")

    def check_input_size(self, input_size) -> None:
        """ConfigError when the five strided stages and pools leave no pixel (called by
        `parse_config`, so the error names the config file, and by the model)."""
        if min(min(s) for s in feature_map_sizes(tuple(input_size))) < 1:
            raise ConfigError(f"preprocessing.input_size {list(input_size)} is too small for AlexNet's strides and "
                              "pools (at least 63x63)")


def feature_map_sizes(input_size: tuple[int, int]) -> list[tuple[int, int]]:
    """[h, w] after each of the five conv+ReLU stages (before the pool that may follow), then
    after the last pool: torch's floor-mode arithmetic."""
    h, w = input_size
    sizes = []
    for (k, s, p), pool in zip(_CONVS, _POOL_AFTER):
        h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        sizes.append((h, w))
        if pool:
            h, w = (h - 3) // 2 + 1, (w - 3) // 2 + 1
    sizes.append((h, w))
    return sizes


# torchvision indices of the layers in `features`: conv i at CONV_INDICES[i], its ReLU one later
CONV_INDICES = (0, 3, 6, 8, 10)
RELU_LAYERS = tuple(f"features.{i + 1}" for i in CONV_INDICES)  # LPIPS' relu1..relu5


class AlexNet(nnx.Module):
    def __init__(self, arch: AlexNetArch, *, input_size: tuple[int, int], rngs: nnx.Rngs):
        self.arch = arch
        arch.check_input_size(input_size)
        sizes = feature_map_sizes(tuple(input_size))
        layers, in_ch = [], arch.in_channels
        for (k, s, p), pool, c in zip(_CONVS, _POOL_AFTER, arch.widths):
            layers += [conv2d(in_ch, c, k, stride=s, padding=p, bias=True, rngs=rngs), ReLU()]
            if pool:
                layers.append(MaxPool2d(3, 2))
            in_ch = c
        self.features = nnx.List(layers)
        h, w = arch.avgpool if arch.avgpool is not None else sizes[-1]
        flat, head = in_ch * h * w, []
        for hidden in arch.classifier_hidden:
            head += [Dropout(arch.dropout_p), linear(flat, hidden, rngs=rngs), ReLU()]
            flat = hidden
        head.append(linear(flat, arch.num_classes, rngs=rngs))
        self.classifier = nnx.List(head)

    def feature_maps(self, x: jax.Array) -> dict[str, jax.Array]:
        """The five ReLU outputs [N, h, w, c] of `features`, keyed by torchvision layer name
        (`RELU_LAYERS`, in call order): the layers AlexNet-LPIPS compares. The classifier is not run."""
        out = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            name = f"features.{i}"
            if name in RELU_LAYERS:
                out[name] = x
                if len(out) == len(RELU_LAYERS):
                    break
        return out

    def __call__(self, x):
        x = run_sequential(self.features, x)
        if self.arch.avgpool is not None:
            x = adaptive_avg_pool2d(x, self.arch.avgpool)
        return run_sequential(self.classifier, flatten_nchw(x))
