"""DenseNet converter: recognise torchvision DenseNet state dicts and infer their architecture."""

from __future__ import annotations

from converters.inference import InferenceError, Inferred, count_indexed

FAMILY = "densenet"


def matches(shapes: dict[str, tuple]) -> bool:
    return "features.conv0.weight" in shapes and "features.denseblock1.denselayer1.conv1.weight" in shapes


def infer(shapes: dict[str, tuple]) -> Inferred:
    n_blocks = count_indexed(shapes, "features.denseblock{}.denselayer1.conv1.weight", start=1)
    block_config = [
        count_indexed(shapes, f"features.denseblock{b}.denselayer{{}}.conv1.weight", start=1)
        for b in range(1, n_blocks + 1)
    ]
    init, in_channels, kh, _ = shapes["features.conv0.weight"]
    growth = shapes["features.denseblock1.denselayer1.conv2.weight"][0]
    mid = shapes["features.denseblock1.denselayer1.conv1.weight"][0]
    if kh == 7 and "features.norm0.weight" in shapes:
        stem = "imagenet"
    elif kh == 3 and "features.norm0.weight" not in shapes:
        stem = "small"
    else:
        has_norm0 = "features.norm0.weight" in shapes
        raise InferenceError(f"conv0 {kh}x{kh} (norm0 present: {has_norm0}) matches no known DenseNet stem")
    compression = 0.5
    if n_blocks > 1:
        out_ch, in_ch = shapes["features.transition1.conv.weight"][:2]
        compression = out_ch / in_ch
    arch = {
        "num_classes": shapes["classifier.weight"][0],
        "growth_rate": growth,
        "block_config": block_config,
        "num_init_features": init,
        "bn_size": mid // growth,
        "stem": stem,
        "compression": compression,
        "in_channels": in_channels,
    }
    return Inferred(arch, (224, 224) if stem == "imagenet" else (32, 32), ["bn_eps assumed 1e-5"])
