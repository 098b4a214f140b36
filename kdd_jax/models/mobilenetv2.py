"""MobileNetV2 with torchvision naming.

features.0.{0,1} stem; features.{i}.conv.{j} inverted residuals (expand 1x1 ConvBNReLU6 unless
t == 1, depthwise 3x3 ConvBNReLU6, linear 1x1 conv, BN); features.{n}.{0,1} final 1x1 block;
classifier.0 Dropout, classifier.1 Linear. Width multiplier rounding follows `_make_divisible`.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from kdd_jax.config import ConfigError
from kdd_jax.models.layers import BatchNorm2d, Dropout, ReLU6, conv2d, linear, run_sequential

TORCHVISION_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """torchvision's channel rounding: nearest multiple of `divisor`, never below 90% of v."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


@dataclasses.dataclass(frozen=True)
class MobileNetV2Arch:
    num_classes: int
    width_mult: float = 1.0
    round_nearest: int = 8
    inverted_residual_setting: tuple[tuple[int, int, int, int], ...] = TORCHVISION_SETTING
    stem_stride: int = 2
    last_channel: int | None = None
    dropout_p: float = 0.2
    in_channels: int = 3
    bn_eps: float = 1e-5

    def __post_init__(self):
        if self.width_mult <= 0 or self.round_nearest < 1 or self.stem_stride not in (1, 2):
            raise ConfigError("width_mult must be > 0, round_nearest >= 1, stem_stride 1 or 2")
        if not self.inverted_residual_setting:
            raise ConfigError("inverted_residual_setting must not be empty")
        for i, (t, c, n, s) in enumerate(self.inverted_residual_setting):
            if t < 1 or c < 1 or n < 1 or s not in (1, 2):
                raise ConfigError(f"inverted_residual_setting[{i}] = {[t, c, n, s]}: need t,c,n >= 1 and s in (1, 2)")
        if self.last_channel is not None and self.last_channel < 1:
            raise ConfigError(f"last_channel must be >= 1, got {self.last_channel}")
        if self.num_classes < 1 or self.in_channels < 1 or self.bn_eps <= 0:
            raise ConfigError("num_classes and in_channels must be >= 1, bn_eps > 0")

    @property
    def resolved_last_channel(self) -> int:
        if self.last_channel is not None:
            return self.last_channel
        return make_divisible(1280 * max(1.0, self.width_mult), self.round_nearest)


def conv_bn_relu6(in_ch, out_ch, kernel, stride, groups, eps, rngs) -> nnx.List:
    """torchvision Conv2dNormActivation(..., activation_layer=ReLU6): indices 0 conv, 1 BN, 2 act."""
    return nnx.List(
        [
            conv2d(in_ch, out_ch, kernel, stride=stride, padding=(kernel - 1) // 2, groups=groups, bias=False, rngs=rngs),
            BatchNorm2d(out_ch, eps=eps),
            ReLU6(),
        ]
    )


class InvertedResidual(nnx.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, eps: float, rngs: nnx.Rngs):
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if expand_ratio != 1:
            layers.append(conv_bn_relu6(inp, hidden, 1, 1, 1, eps, rngs))
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride, hidden, eps, rngs),
            conv2d(hidden, oup, 1, bias=False, rngs=rngs),
            BatchNorm2d(oup, eps=eps),
        ]
        self.conv = nnx.List(layers)

    def __call__(self, x):
        out = x
        for layer in self.conv:
            out = run_sequential(layer, out) if isinstance(layer, nnx.List) else layer(out)
        return x + out if self.use_res_connect else out


class MobileNetV2(nnx.Module):
    def __init__(self, arch: MobileNetV2Arch, *, input_size: tuple[int, int], rngs: nnx.Rngs):
        del input_size  # global pooling: any input size works
        self.arch = arch
        eps, rn = arch.bn_eps, arch.round_nearest
        input_channel = make_divisible(32 * arch.width_mult, rn)
        features = [conv_bn_relu6(arch.in_channels, input_channel, 3, arch.stem_stride, 1, eps, rngs)]
        for t, c, n, s in arch.inverted_residual_setting:
            out_ch = make_divisible(c * arch.width_mult, rn)
            for i in range(n):
                features.append(InvertedResidual(input_channel, out_ch, s if i == 0 else 1, t, eps, rngs))
                input_channel = out_ch
        last = arch.resolved_last_channel
        features.append(conv_bn_relu6(input_channel, last, 1, 1, 1, eps, rngs))
        self.features = nnx.List(features)
        self.classifier = nnx.List([Dropout(arch.dropout_p), linear(last, arch.num_classes, rngs=rngs)])

    def __call__(self, x):
        for layer in self.features:
            x = run_sequential(layer, x) if isinstance(layer, nnx.List) else layer(x)
        return run_sequential(self.classifier, x.mean(axis=(1, 2)))
