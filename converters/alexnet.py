"""AlexNet converter: recognise torchvision's alexnet state dict (an 11x11 first conv at
features.0, convs at features.{0,3,6,8,10}, no BatchNorm) and infer widths and head sizes."""

from __future__ import annotations

import math
import re

from converters.inference import InferenceError, Inferred
from kdd_jax.models.alexnet import CONV_INDICES

FAMILY = "alexnet"
_CONV = re.compile(r"^features\.(\d+)\.weight$")
_LINEAR = re.compile(r"^classifier\.(\d+)\.weight$")


def _conv_indices(shapes) -> list[int]:
    return sorted(int(m.group(1)) for k, s in shapes.items() if (m := _CONV.match(k)) and len(s) == 4)


def matches(shapes: dict[str, tuple]) -> bool:
    first = shapes.get("features.0.weight", ())
    return (tuple(_conv_indices(shapes)) == CONV_INDICES and len(first) == 4 and tuple(first[2:]) == (11, 11)
            and not any(k.endswith("running_mean") for k in shapes))


def infer(shapes: dict[str, tuple]) -> Inferred:
    widths = [shapes[f"features.{i}.weight"][0] for i in CONV_INDICES]
    linears = sorted(int(m.group(1)) for k in shapes if (m := _LINEAR.match(k)))
    if linears != [3 * i + 1 for i in range(len(linears) - 1)] + [3 * (len(linears) - 1)]:
        raise InferenceError(f"classifier Linear indices {linears} are not torchvision's alexnet layout "
                             f"(Dropout, Linear, ReLU per hidden layer, then Linear)")
    hidden = [shapes[f"classifier.{i}.weight"][0] for i in linears[:-1]]
    flat_in = shapes[f"classifier.{linears[0]}.weight"][1]
    side = math.isqrt(flat_in // widths[-1]) if flat_in % widths[-1] == 0 else 0
    if side * side * widths[-1] != flat_in:
        raise InferenceError(f"classifier input {flat_in} is not {widths[-1]} channels x a square pooled map")
    notes = [f"adaptive average pool to {side}x{side} assumed (torchvision's avgpool is 6x6)",
             "input size 224x224 assumed (torchvision's; any size from 63x63 runs through the adaptive pool)"]
    arch = {"num_classes": shapes[f"classifier.{linears[-1]}.weight"][0], "widths": widths,
            "in_channels": shapes["features.0.weight"][1], "avgpool": [side, side], "classifier_hidden": hidden}
    return Inferred(arch, (224, 224), notes)
