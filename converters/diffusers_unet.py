"""diffusers `UNet2DModel` folder -> Flax `kdd_jax.models.unet.UNet2DModel`, strictly.

    from converters import convert_unet
    result = convert_unet("students/ddpm-fashion")     # config.json + diffusion_pytorch_model.safetensors
    eps = result.model(x_nhwc, t, class_labels)

A UNet folder is what `UNet2DModel.save_pretrained(dir, safe_serialization=True)` writes: `config.json`
(`_class_name: "UNet2DModel"`) and `diffusion_pytorch_model.safetensors` (float32/float16/bfloat16; a
`variant="fp16"` save is `diffusion_pytorch_model.fp16.safetensors`). A pipeline folder (`model_index.json`
and a `unet/` subfolder), or a folder holding `unet/` and no config.json of its own, is accepted too. Pickle weights (`.bin`) and sharded checkpoints are refused.

The key map is the generic one (`converters/keymap.py`): the Flax model mirrors diffusers' module names,
so every key maps 1:1 (conv OIHW -> HWIO, linear transposed, GroupNorm weight -> scale, Embedding
weight -> embedding). Attention weights saved by diffusers before 0.15 (`query`, `key`, `value`,
`proj_attn`) are renamed to `to_q`, `to_k`, `to_v`, `to_out.0` first, as diffusers itself does on load;
the renames are listed in the report. Every key must be used, every parameter filled, every shape right.

Torch and diffusers are imported only by `verify_unet_conversion`, on demand.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math
from pathlib import Path

import numpy as np
from flax import nnx

from converters.keymap import KEYMAP_VERSION, ConversionError, apply_keymap, build_keymap
from kdd_jax.config import read_json_config
from kdd_jax.io import read_safetensors, sha256_file
from kdd_jax.models.unet import UNet2DConfig, UNet2DModel, abstract_unet, unet_forward
from kdd_jax.versions import versions

FAMILY = "diffusers_unet2d"
WEIGHTS_STEM = "diffusion_pytorch_model"
CONFIG_NAME = "config.json"
# diffusers < 0.15 attention parameter names -> current ones (diffusers' _fix_state_dict_keys_on_load)
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

# Tolerance of `verify_unet_conversion` (whole model, float32 on both sides, O(1) outputs).
OUTPUT_RTOL = 1e-4
OUTPUT_ATOL = 1e-4


@dataclasses.dataclass
class UNetConversionResult:
    model: UNet2DModel
    config: UNet2DConfig
    report: dict
    tensors: dict  # source tensors after the legacy renames (for verification against diffusers)


def find_unet(path: str | Path, variant: str | None = None) -> tuple[Path, Path]:
    """(weights, config.json) of a UNet folder, a pipeline folder (its `unet/`), or a weights file."""
    path = Path(path)
    if path.is_file():
        weights, folder = path, path.parent
    elif path.is_dir():
        # a pipeline folder (model_index.json), or any folder holding unet/ + scheduler/ and no config.json of its own
        nested = (path / "unet" / CONFIG_NAME).is_file() and not (path / CONFIG_NAME).is_file()
        folder = path / "unet" if nested or ((path / "model_index.json").is_file() and (path / "unet").is_dir()) else path
        name = f"{WEIGHTS_STEM}.{variant}.safetensors" if variant else f"{WEIGHTS_STEM}.safetensors"
        weights = folder / name
        if not weights.is_file():
            if (folder / f"{name}.index.json").is_file():
                raise ConversionError(f"{folder}: sharded checkpoints ({name}.index.json) are not supported")
            pickles = sorted(p.name for p in folder.glob(f"{WEIGHTS_STEM}*.bin"))
            if pickles:
                raise ConversionError(f"{folder}: only pickle weights ({', '.join(pickles)}) found; they are refused "
                                      "(unpickling can run code). Re-save with save_pretrained(safe_serialization=True)")
            others = sorted(p.name for p in folder.glob(f"{WEIGHTS_STEM}*.safetensors"))
            hint = f" (found {', '.join(others)}: pass variant=)" if others else ""
            raise ConversionError(f"{folder}: no {name}{hint}")
    else:
        raise ConversionError(f"{path}: no such file or directory")
    config = folder / CONFIG_NAME
    if not config.is_file():
        raise ConversionError(f"{folder}: no {CONFIG_NAME} next to {weights.name} "
                              "(a diffusers UNet2DModel folder has both)")
    return weights, config


def load_unet_config(path: str | Path) -> UNet2DConfig:
    """Read and validate a diffusers UNet2DModel config.json; errors name the file and field."""
    return UNet2DConfig.from_diffusers(read_json_config(path), str(path))


@functools.lru_cache(maxsize=16)
def unet_structure(config: UNet2DConfig) -> tuple[UNet2DModel, list]:
    """(abstract model, key map) per config, traced once per distinct config."""
    abstract = abstract_unet(config)
    return abstract, build_keymap(abstract)


def rename_legacy_attention(tensors: dict, entries: list) -> tuple[dict, list[list[str]]]:
    """Rename pre-0.15 attention keys (query/key/value/proj_attn) of the model's attention modules.
    A legacy key whose new name is also present is left alone (and then refused as unexpected)."""
    attn_prefixes = {e.source[: -len(".to_q.weight")] for e in entries if e.source.endswith(".to_q.weight")}
    out, renamed = dict(tensors), []
    for key in tensors:
        prefix, _, rest = key.rpartition(".")  # rest: weight / bias
        module, _, old = prefix.rpartition(".")
        if old in LEGACY_ATTENTION and module in attn_prefixes:
            new = f"{module}.{LEGACY_ATTENTION[old]}.{rest}"
            if new not in tensors:
                out[new] = out.pop(key)
                renamed.append([key, new])
    return out, renamed


def convert_unet(path: str | Path, *, variant: str | None = None,
                 config: UNet2DConfig | dict | str | Path | None = None) -> UNetConversionResult:
    """Convert a diffusers UNet2DModel checkpoint. `config` overrides the folder's config.json (a
    UNet2DConfig, a decoded config.json dict, or a path). Raises ConversionError / ConfigError /
    CheckpointError (all ValueErrors) naming the file and the key or field at fault."""
    weights, config_path = find_unet(path, variant)
    if isinstance(config, UNet2DConfig):
        cfg, config_source = config, "given"
    elif isinstance(config, dict):
        cfg, config_source = UNet2DConfig.from_diffusers(config, "config override"), "given"
    elif config is not None:
        cfg, config_source = load_unet_config(config), str(config)
    else:
        cfg, config_source = load_unet_config(config_path), str(config_path)
    tensors, _ = read_safetensors(weights)
    abstract, entries = unet_structure(cfg)
    tensors, renamed = rename_legacy_attention(tensors, entries)
    pure, facts = apply_keymap(tensors, entries, str(weights))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, pure)
    model = nnx.merge(graphdef, state)
    report = {
        "kind": "kdd_jax.conversion_report",
        "name": weights.parent.name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"weights": str(weights), "format": "safetensors", "sha256": sha256_file(weights),
                   "bytes": weights.stat().st_size, "config": config_source},
        "inferred": [],
        "family": FAMILY,
        "config": cfg.to_dict(),
        "parameters": sum(math.prod(e.target_shape) for e in entries),
        "keymap_version": KEYMAP_VERSION,
        "keymap": [[e.source, ".".join(map(str, e.target)), e.transform] for e in entries],
        "legacy_renames": renamed,
        "dtype": facts,
        "versions": versions(),
    }
    return UNetConversionResult(model, cfg, report, tensors)


def verify_unet_conversion(result: UNetConversionResult, *, n: int = 2, seed: int = 0) -> dict:
    """Compare the converted model with diffusers' own UNet2DModel built from the same config and
    weights (float32 on both sides; f16/bf16 -> f32 is exact), on random samples, timesteps spread over
    [0, 1000) and (for class-conditional models) random labels. Needs torch and diffusers."""
    try:
        import torch
        from diffusers import UNet2DModel as TorchUNet
    except ImportError as e:
        from converters.verify import VerificationUnavailable

        raise VerificationUnavailable(f"torch/diffusers not importable ({e}); pip install diffusers torch") from None
    import jax

    cfg = result.config
    ref = TorchUNet.from_config({k: v for k, v in cfg.to_dict().items() if k != "_class_name"}).eval()
    ref.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in result.tensors.items()},
                        strict=True)
    rng = np.random.default_rng(seed)
    hw = cfg.input_hw or (2 ** (len(cfg.block_out_channels) - 1) * 4,) * 2
    x = rng.standard_normal((n, cfg.in_channels, *hw)).astype(np.float32)
    t = rng.uniform(0, 1000, n).astype(np.float32)
    labels = rng.integers(0, cfg.num_class_embeds, n) if cfg.num_class_embeds else None
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(t),
                   class_labels=None if labels is None else torch.from_numpy(labels)).sample.numpy()
    # jitted, unlike the classifiers' eager check: op-by-op dispatch of a UNet compiles each op once and
    # took 12 s against 3.5 s here; fused and eager outputs differed by 1.5e-6 on a random 16x16 UNet.
    with jax.default_matmul_precision("highest"):
        got = np.asarray(unet_forward(result.model, x.transpose(0, 2, 3, 1), t, labels)).transpose(0, 3, 1, 2)
    diff = np.abs(got - want)
    return {
        "ok": bool(np.all(diff <= OUTPUT_ATOL + OUTPUT_RTOL * np.abs(want))),
        "samples": n,
        "seed": seed,
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff / np.maximum(np.abs(want), 1e-12)).max()),
        "output_scale": float(np.abs(want).max()),
        "tolerances": {"rtol": OUTPUT_RTOL, "atol": OUTPUT_ATOL},
    }
