"""VGG / sequential-CNN converter: recognise features.{i}/classifier.{i} state dicts, infer cfg."""

from __future__ import annotations

import math
import re

from converters.inference import InferenceError, Inferred

FAMILY = "vgg"
_FLAT = re.compile(r"^features\.(\d+)\.(weight|running_mean)$")
_NESTED = re.compile(r"^features\.(\d+)\.(\d+)\.(weight|running_mean)$")
_LINEAR = re.compile(r"^classifier\.(\d+)\.weight$")


def matches(shapes: dict[str, tuple]) -> bool:
    has_features = any(_FLAT.match(k) or _NESTED.match(k) for k in shapes)
    is_mobilenet = any(".conv." in k for k in shapes)
    # every VGG conv is 3x3: this tells a plain VGG from torchvision's alexnet (same indices, 11x11/5x5)
    all_3x3 = all(tuple(s[2:]) == (3, 3) for k, s in shapes.items()
                  if (_FLAT.match(k) or _NESTED.match(k)) and k.endswith(".weight") and len(s) == 4)
    return has_features and not is_mobilenet and all_3x3 and any(_LINEAR.match(k) for k in shapes)


def _walk_block(layers: dict[int, str], widths: dict[int, int], where: str, trailing_pool: bool) -> list:
    """Rebuild cfg from the indices of convs/BNs: conv,[bn],relu then an extra index means 'M'."""
    cfg, convs = [], sorted(i for i, kind in layers.items() if kind == "conv")
    has_bn = any(kind == "bn" for kind in layers.values())
    step = 3 if has_bn else 2
    if not convs or convs[0] != 0:
        raise InferenceError(f"{where}: the first layer is not a conv at index 0")
    for a, b in zip(convs, convs[1:] + [None]):
        cfg.append(widths[a])
        if b is None:
            break
        if b == a + step:
            continue
        if b == a + step + 1:
            cfg.append("M")
            continue
        raise InferenceError(f"{where}: conv at index {a} followed by conv at {b}: layout not VGG-like")
    if trailing_pool:
        cfg.append("M")
    return cfg


def _layers(shapes, pattern, group=None):
    layers, widths = {}, {}
    for k, shape in shapes.items():
        m = pattern.match(k)
        if not m or (group is not None and int(m.group(1)) != group):
            continue
        idx = int(m.group(m.lastindex - 1))
        if m.group(m.lastindex) == "running_mean":
            layers[idx] = "bn"
        elif len(shape) == 4:
            layers[idx], widths[idx] = "conv", shape[0]
    return layers, widths


def infer(shapes: dict[str, tuple]) -> Inferred:
    notes = ["features assumed to end with a max-pool (every torchvision VGG cfg does)"]
    nested = any(_NESTED.match(k) for k in shapes)
    if nested:
        cfg = []
        n_blocks = 1 + max(int(_NESTED.match(k).group(1)) for k in shapes if _NESTED.match(k))
        for b in range(n_blocks):
            layers, widths = _layers(shapes, _NESTED, group=b)
            cfg += _walk_block(layers, widths, f"features.{b}", trailing_pool=True)
    else:
        layers, widths = _layers(shapes, _FLAT)
        cfg = _walk_block(layers, widths, "features", trailing_pool=True)
    batch_norm = any(k.endswith("running_mean") for k in shapes if k.startswith("features."))
    linears = sorted(int(_LINEAR.match(k).group(1)) for k in shapes if _LINEAR.match(k))
    hidden = [shapes[f"classifier.{i}.weight"][0] for i in linears[:-1]]
    n = len(linears)
    layouts = {
        "after_relu": [3 * i for i in range(n)],
        "before_linear": [3 * i + 1 for i in range(n)],
        "none": [2 * i for i in range(n)],
    }
    dropout = next((name for name, idx in layouts.items() if idx == linears), None)
    if dropout is None:
        raise InferenceError(f"classifier Linear indices {linears} match no known classifier layout")
    first_conv = shapes["features.0.0.weight" if nested else "features.0.weight"]
    last_ch = [c for c in cfg if c != "M"][-1]
    flat_in = shapes[f"classifier.{linears[0]}.weight"][1]
    side = math.isqrt(flat_in // last_ch) if flat_in % last_ch == 0 else 0
    if side * side * last_ch != flat_in:
        raise InferenceError(
            f"classifier input {flat_in} is not {last_ch} channels x a square feature map"
        )
    size = side * 2 ** cfg.count("M")
    notes.append(
        f"no adaptive pool assumed (avgpool null): the classifier sees a {side}x{side} map, so input "
        f"size {size}x{size}; identical to torchvision's AdaptiveAvgPool2d(({side},{side})) at that size"
    )
    arch = {
        "cfg": cfg,
        "num_classes": shapes[f"classifier.{linears[-1]}.weight"][0],
        "batch_norm": batch_norm,
        "in_channels": first_conv[1],
        "avgpool": None,
        "classifier_hidden": hidden,
        "dropout": dropout,
        "nested_blocks": nested,
    }
    return Inferred(arch, (size, size), notes)
