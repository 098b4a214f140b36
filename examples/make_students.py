"""Regenerate the bundled example students (examples/students/): deterministic, torch only.

    python examples/make_students.py

They are randomly initialised (with randomised BatchNorm statistics), not trained: they exist so
`kdd convert` has something real-shaped to convert on a fresh machine with nothing downloaded.
Trained students come from the benchmark zoo (benchmarks/zoo/).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from converters.torch_reference import build_torch_model, randomize_

CIFAR = {"input_size": [32, 32], "channels": 3, "layout": "NCHW", "value_range": [0.0, 1.0],
         "mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.2435, 0.2616]}
FASHION = {"input_size": [28, 28], "channels": 1, "layout": "NCHW", "value_range": [0.0, 1.0],
           "mean": [0.286], "std": [0.353]}

STUDENTS = {
    # name: (config, dtype, ship config.json?)
    "resnet20-cifar": ({"family": "resnet", "arch": {"block": "basic", "layers": [3, 3, 3], "widths": [16, 32, 64],
                                                      "stem": "small", "num_classes": 10}, "preprocessing": CIFAR},
                       torch.float32, True),
    "vgg8-fashion-bf16": ({"family": "vgg", "arch": {"cfg": [16, "M", 32, 32, "M", 64, "M"], "num_classes": 10,
                                                      "in_channels": 1, "avgpool": None, "classifier_hidden": [64],
                                                      "dropout": "before_linear"}, "preprocessing": FASHION},
                          torch.bfloat16, True),
    "mobilenetv2-cifar": ({"family": "mobilenetv2", "arch": {"num_classes": 10, "width_mult": 0.35, "stem_stride": 1,
                                                              "inverted_residual_setting": [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 2]],
                                                              "last_channel": 256}, "preprocessing": CIFAR},
                          torch.float32, True),
    # no config.json: the architecture is inferred from the weights, and the report says what was assumed
    "densenet-bc-noconfig": ({"family": "densenet", "arch": {"num_classes": 10, "growth_rate": 8, "block_config": [3, 3, 3],
                                                              "num_init_features": 16, "stem": "small"}, "preprocessing": CIFAR},
                             torch.float16, False),
}


def main(out: Path = Path(__file__).parent / "students") -> None:
    shutil.rmtree(out, ignore_errors=True)
    for seed, (name, (cfg, dtype, ship_config)) in enumerate(STUDENTS.items()):
        cfg = {"format_version": 1, **cfg}
        model = randomize_(build_torch_model(cfg), seed)
        d = out / name
        d.mkdir(parents=True)
        sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        if ship_config:
            (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        print(f"{d}: {sum(v.numel() for v in sd.values()):,} values, {dtype}")


if __name__ == "__main__":
    main()
