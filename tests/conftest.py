"""Shared fixtures: tiny students of every family, written to disk as PyTorch would publish them.

Tests build their own models and data; nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

# Fake devices must be configured before jax initialises (multi-device tests use them).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest

PRE_RGB32 = {"input_size": [32, 32], "channels": 3, "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}

# Small members of each family, covering the structural variants each family supports.
CONFIGS: dict[str, dict] = {
    "resnet20": {"family": "resnet", "arch": {"block": "basic", "layers": [3, 3, 3], "widths": [16, 32, 64], "stem": "small", "num_classes": 10}},
    "resnet_imagenet_stem": {"family": "resnet", "arch": {"block": "basic", "layers": [1, 1, 1, 1], "widths": [8, 16, 24, 32], "stem": "imagenet", "num_classes": 5}},
    "resnext_bottleneck": {"family": "resnet", "arch": {"block": "bottleneck", "layers": [2, 1], "widths": [16, 32], "groups": 4, "width_per_group": 8, "stem_width": 12, "num_classes": 7, "in_channels": 1}},
    "vgg_bn_torchvision": {"family": "vgg", "arch": {"cfg": [16, "M", 32, 32, "M", 32, "M"], "num_classes": 10, "avgpool": [2, 2], "classifier_hidden": [48, 40]}},
    "vgg_plain_nested": {"family": "vgg", "arch": {"cfg": [8, 8, "M", 16, "M"], "num_classes": 10, "batch_norm": False, "avgpool": None, "classifier_hidden": [32], "dropout": "before_linear", "nested_blocks": True}},
    "vgg_odd_avgpool": {"family": "vgg", "arch": {"cfg": [8, "M", 16, "M"], "num_classes": 3, "avgpool": [3, 3], "classifier_hidden": [], "dropout": "none"}},
    "mobilenetv2_cifar": {"family": "mobilenetv2", "arch": {"num_classes": 10, "width_mult": 0.35, "stem_stride": 1, "inverted_residual_setting": [[1, 16, 1, 1], [6, 24, 2, 2], [4, 32, 2, 2]], "last_channel": 128}},
    "mobilenetv2_wide": {"family": "mobilenetv2", "arch": {"num_classes": 4, "width_mult": 1.4, "inverted_residual_setting": [[1, 8, 1, 1], [6, 16, 2, 2]]}},
    "densenet_bc_small": {"family": "densenet", "arch": {"num_classes": 10, "growth_rate": 8, "block_config": [2, 3, 2], "num_init_features": 16, "stem": "small"}},
    "alexnet_small": {"family": "alexnet", "arch": {"num_classes": 10, "widths": [8, 16, 24, 16, 16], "classifier_hidden": [32, 24]},
                      "input_size": [64, 64]},
    "alexnet_gray_pool2": {"family": "alexnet", "arch": {"num_classes": 5, "widths": [6, 12, 16, 12, 8], "in_channels": 1,
                                                          "avgpool": [2, 2], "classifier_hidden": [16]}, "input_size": [96, 96]},
    "densenet_imagenet_stem": {"family": "densenet", "arch": {"num_classes": 6, "growth_rate": 6, "block_config": [2, 2], "num_init_features": 12, "bn_size": 2, "compression": 0.4}},
    "vit_tiny": {"family": "vit", "arch": {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 16, "patch_size": 4, "num_classes": 7},
                 "input_size": [16, 16]},
    "deit_distilled": {"family": "vit", "arch": {"variant": "deit", "head": "cls_distill", "hidden_size": 12, "intermediate_size": 20, "num_hidden_layers": 1, "num_attention_heads": 3, "image_size": 12, "patch_size": 6, "num_classes": 4, "hidden_act": "gelu_new", "layer_norm_eps": 1e-6},
                       "input_size": [12, 12]},
}


def full_config(name: str) -> dict:
    cfg = copy.deepcopy(CONFIGS[name])
    channels = cfg["arch"].get("in_channels", 3)
    pre = copy.deepcopy(PRE_RGB32)
    if "input_size" in cfg:  # AlexNet's strides need at least 63x63; a ViT takes its image_size
        pre["input_size"] = cfg.pop("input_size")
    pre["channels"] = channels
    pre["mean"], pre["std"] = pre["mean"][:channels], pre["std"][:channels]
    return {"format_version": 1, **cfg, "preprocessing": pre}


@pytest.fixture
def make_student(tmp_path):
    """make_student(name, seed=0, dtype=torch.float32, with_config=True, dirname=None) -> student dir.

    Writes model.safetensors (torch state_dict names/layouts, randomised weights AND BN running
    statistics) and config.json, exactly as a PyTorch user would publish a student.
    """
    import torch
    from safetensors.torch import save_file

    from converters.torch_reference import build_torch_model, randomize_

    def make(name, seed=0, dtype=None, with_config=True, dirname=None, config=None):
        cfg = config or full_config(name)
        model = randomize_(build_torch_model(cfg), seed)
        d = tmp_path / (dirname or f"{name}-{seed}")
        d.mkdir(parents=True)
        sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
              for k, v in model.state_dict().items()}
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        if with_config:
            (d / "config.json").write_text(json.dumps(cfg))
        return d

    return make


@pytest.fixture(autouse=True)
def _highest_precision():
    """Equivalence tests compare with float32 PyTorch: pin JAX matmuls to full precision."""
    import jax

    with jax.default_matmul_precision("highest"):
        yield


def assert_matches_torch(flax_model, torch_model, x_nchw, *, tol: float = 1e-5):
    """The Flax model's output on NCHW inputs (given NHWC) equals the PyTorch module's, to `tol`
    relative and absolute (matmuls at full precision: the autouse fixture above)."""
    import numpy as np
    import torch

    with torch.no_grad():
        want = torch_model(torch.from_numpy(x_nchw)).numpy()
    got = np.asarray(flax_model(x_nchw.transpose(0, 2, 3, 1)))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def tree_paths(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(scope="session")
def toy_zoo(tmp_path_factory):
    """Two trained teachers, a student distilled from teacher-a, three independent references
    (tests/toyzoo.py); trained once per session."""
    from tests.toyzoo import build_toy_zoo

    return build_toy_zoo(tmp_path_factory.mktemp("toy_zoo"))
