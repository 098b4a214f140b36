"""ResNet converter: recognise torchvision ResNet state dicts and infer their architecture."""

from __future__ import annotations

import re

from converters.inference import InferenceError, Inferred, count_indexed

FAMILY = "resnet"


def matches(shapes: dict[str, tuple]) -> bool:
    return "conv1.weight" in shapes and "fc.weight" in shapes and "layer1.0.conv1.weight" in shapes


def infer(shapes: dict[str, tuple]) -> Inferred:
    notes = []
    n_stages = count_indexed(shapes, "layer{}.0.conv1.weight", start=1)
    layers = [count_indexed(shapes, f"layer{k}.{{}}.conv1.weight") for k in range(1, n_stages + 1)]
    bottleneck = "layer1.0.conv3.weight" in shapes
    widths, groups_seen = [], set()
    for k in range(1, n_stages + 1):
        if bottleneck:
            planes = shapes[f"layer{k}.0.conv3.weight"][0] // 4
            width, per_group_in = shapes[f"layer{k}.0.conv2.weight"][:2]
            groups = width // per_group_in
            groups_seen.add((groups, width * 64 // (groups * planes)))
        else:
            planes = shapes[f"layer{k}.0.conv1.weight"][0]
        widths.append(planes)
    stem_width, in_channels, kh, kw = shapes["conv1.weight"]
    if (kh, kw) == (7, 7):
        stem = "imagenet"
        notes.append("stem 'imagenet' from the 7x7 conv1 (stride 2 + 3x3/2 max-pool, as torchvision)")
    elif (kh, kw) == (3, 3):
        stem = "small"
        notes.append("stem 'small' from the 3x3 conv1 (assumed stride 1 and no max-pool, as CIFAR ResNets)")
    else:
        raise InferenceError(f"conv1 kernel {kh}x{kw} matches no known ResNet stem")
    if len(groups_seen) > 1:
        raise InferenceError(f"inconsistent grouped-conv widths across stages: {sorted(groups_seen)}")
    groups, width_per_group = groups_seen.pop() if groups_seen else (1, 64)
    arch = {
        "block": "bottleneck" if bottleneck else "basic",
        "layers": layers,
        "widths": widths,
        "num_classes": shapes["fc.weight"][0],
        "stem": stem,
        "in_channels": in_channels,
        "groups": groups,
        "width_per_group": width_per_group,
    }
    if stem_width != widths[0]:
        arch["stem_width"] = stem_width
    if any(re.search(r"\.bn\d\.|^bn1\.", k) for k in shapes):
        notes.append("bn_eps assumed 1e-5 (the PyTorch default; eps is not stored in weights)")
    return Inferred(arch, (224, 224) if stem == "imagenet" else (32, 32), notes)
