"""MobileNetV2 converter: recognise torchvision MobileNetV2 state dicts, infer width multiplier.

Strides are not stored in weights, so only torchvision's inverted-residual setting (at any width
multiplier) can be inferred; a custom setting needs a config.json.
"""

from __future__ import annotations

from converters.inference import InferenceError, Inferred, shapes_of_config

FAMILY = "mobilenetv2"


def matches(shapes: dict[str, tuple]) -> bool:
    return "features.0.0.weight" in shapes and "features.1.conv.0.0.weight" in shapes


def infer(shapes: dict[str, tuple]) -> Inferred:
    stem_out, in_channels = shapes["features.0.0.weight"][:2]
    last_idx = max(int(k.split(".")[1]) for k in shapes if k.startswith("features."))
    last_channel = shapes[f"features.{last_idx}.0.weight"][0]
    num_classes = shapes["classifier.1.weight"][0]
    for wm in sorted({stem_out / 32, 0.35, 0.5, 0.75, 1.0, 1.3, 1.4}):
        arch = {"num_classes": num_classes, "width_mult": wm, "in_channels": in_channels, "last_channel": last_channel}
        if shapes_of_config("mobilenetv2", arch, (32, 32)) == shapes_without_counters(shapes):
            notes = [
                f"torchvision inverted-residual setting at width_mult {wm} (shapes match exactly)",
                "stem_stride assumed 2 (torchvision); CIFAR variants often use 1: give a config.json",
                "bn_eps assumed 1e-5",
            ]
            return Inferred(arch, (224, 224), notes)
    raise InferenceError(
        "MobileNetV2 layout does not match torchvision's inverted-residual setting at any standard "
        "width multiplier; strides cannot be read from weights, so a config.json is required"
    )


def shapes_without_counters(shapes):
    return {k: tuple(v) for k, v in shapes.items() if not k.endswith("num_batches_tracked")}
