"""diffusers UNet2DModel -> Flax: converted outputs equal diffusers' own forward; bad configs and
broken checkpoints fail naming the field or key.

Tiny random diffusers models (GroupNorm affines randomised too, so a swapped scale/bias shows) are
saved with `save_pretrained(safe_serialization=True)` in float32, float16 and bfloat16 and converted.
Tolerance: |jax - diffusers| <= 1e-4 + 1e-4 |diffusers| element-wise on O(1) outputs, both in float32
from the same (upcast) weights. Measured differences are ~1e-6 (summation order of XLA vs PyTorch
convolutions and attention over ~20 layers), so the bound leaves a 50x margin for rounding while a
semantic slip (a wrong GroupNorm eps, a missed 1/output_scale_factor, heads split the wrong way, sin/cos
order of the time embedding) moves outputs by 1e-3 or more.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converters import ConversionError, convert_unet
from converters.diffusers_unet import verify_unet_conversion
from converters.keymap import export_torch_state
from kdd_jax.config import ConfigError
from kdd_jax.io import read_safetensors, write_safetensors
from kdd_jax.models.unet import UNet2DConfig, unet_forward

RTOL = ATOL = 1e-4
TINY = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
CONFIGS = {
    # attention in a down block, its up block and the mid block; unconditional; RGB 16x16
    "attn_rgb16": dict(TINY, sample_size=16, in_channels=3, out_channels=3, attention_head_dim=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attn_norm_num_groups=4),
    # Fashion-MNIST shaped, class-conditional (10 classes + null), no attention at all, 2 layers per
    # block, the original DDPM's time embedding (sin first, freq_shift 1), asymmetric downsampling (padding 0)
    "cond_gray28": dict(TINY, sample_size=28, in_channels=1, out_channels=1, num_class_embeds=11, layers_per_block=2,
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                        add_attention=False, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
                        center_input_sample=True, mid_block_scale_factor=2 ** 0.5),
    # scale_shift time conditioning (its mid attention has no GroupNorm), exact GELU, one head per
    # attention (attention_head_dim null), own time_embedding_dim, 2 output channels
    "variants_gray16": dict(TINY, sample_size=16, in_channels=1, out_channels=2,
                            down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "AttnUpBlock2D"), resnet_time_scale_shift="scale_shift",
                            act_fn="gelu", attention_head_dim=None, time_embedding_dim=40, num_class_embeds=3,
                            norm_eps=1e-6),
}


def diffusers_unet(config: dict, seed: int = 0):
    """A random diffusers UNet2DModel, GroupNorm affines randomised (init is weight 1, bias 0)."""
    diffusers = pytest.importorskip("diffusers")
    import torch

    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def save_unet(model, path, dtype: str = "float32"):
    import torch

    model.to(getattr(torch, dtype)).save_pretrained(str(path), safe_serialization=True)
    model.to(torch.float32)
    return path


def inputs(cfg: dict, n: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    hw = cfg["sample_size"]
    x = rng.standard_normal((n, cfg["in_channels"], hw, hw)).astype(np.float32)
    t = np.asarray([3.0, 999.0, 517.25, 0.0][:n], np.float32)  # fractional: Euler feeds those
    k = cfg.get("num_class_embeds")
    labels = None if k is None else np.asarray([k - 1, 0, 1][:n])
    return x, t, labels


def diffusers_forward(model, x, t, labels):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x), torch.from_numpy(t),
                     class_labels=None if labels is None else torch.from_numpy(labels)).sample.numpy()


def jax_forward(model, x, t, labels):
    return np.asarray(unet_forward(model, x.transpose(0, 2, 3, 1), t, labels)).transpose(0, 3, 1, 2)


# variants_gray16's features are also those of the model tests/test_generative_samplers.py samples from
# (and compares with diffusers every step), so by default that run covers them at no extra compile
@pytest.mark.parametrize("name,dtype", [("attn_rgb16", "float32"), ("cond_gray28", "float16"),
                                        pytest.param("variants_gray16", "bfloat16", marks=pytest.mark.slow)])
def test_forward_equals_diffusers(tmp_path, name, dtype):
    cfg = CONFIGS[name]
    ref = diffusers_unet(cfg)
    save_unet(ref, tmp_path / name, dtype)
    result = convert_unet(tmp_path / name)
    # diffusers' own loader on the saved file (f16/bf16 upcast exactly to float32) is the reference
    import torch
    from diffusers import UNet2DModel

    ref = UNet2DModel.from_pretrained(str(tmp_path / name), torch_dtype=torch.float32).eval()
    x, t, labels = inputs(cfg)
    want = diffusers_forward(ref, x, t, labels)
    got = jax_forward(result.model, x, t, labels)
    diff = np.abs(got - want)
    print(f"{name} ({dtype}): max abs {diff.max():.3g}, max rel {(diff / np.abs(want)).max():.3g}, "
          f"output scale {np.abs(want).max():.3g}")
    assert got.shape == want.shape
    assert np.abs(want).max() > 0.1  # the comparison is not of near-zero outputs
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert result.report["dtype"]["source_dtypes"] == {dtype: len(ref.state_dict())}
    assert result.report["parameters"] == sum(p.numel() for p in ref.parameters())
    assert {k for k, _, _ in result.report["keymap"]} == set(ref.state_dict())


@pytest.mark.slow
def test_input_gradients_equal_diffusers(tmp_path):
    """Probe synthesis may back-propagate through the student: d(sum(w * out)) / d(sample) agrees too
    (relative L2 error, as converters/verify.py measures input gradients)."""
    import torch

    cfg = CONFIGS["attn_rgb16"]
    ref = diffusers_unet(cfg)
    result = convert_unet(save_unet(ref, tmp_path / "u"))
    x, t, _ = inputs(cfg)
    w = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    (ref(xt, torch.from_numpy(t)).sample * torch.from_numpy(w)).sum().backward()
    want = xt.grad.numpy()
    graphdef, state = nnx.split(result.model)
    loss = lambda s, xn: (nnx.merge(graphdef, s)(xn, jnp.asarray(t)) * w.transpose(0, 2, 3, 1)).sum()  # noqa: E731
    got = jax.jit(jax.grad(loss, argnums=1))(state, jnp.asarray(x.transpose(0, 2, 3, 1)))
    got = np.asarray(got).transpose(0, 3, 1, 2)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    print(f"input-gradient relative L2 error {rel:.3g}")
    assert rel <= 1e-4


def test_verify_reports_agreement_and_catches_a_difference(tmp_path):
    cfg = CONFIGS["cond_gray28"]
    save_unet(diffusers_unet(cfg), tmp_path / "u")
    result = convert_unet(tmp_path / "u")
    report = verify_unet_conversion(result)
    assert report["ok"] and report["max_abs_diff"] < ATOL
    # a 1% error in one GroupNorm scale of the converted model must fail the check
    result.model.conv_norm_out.scale = nnx.Param(np.asarray(result.model.conv_norm_out.scale[...]) * np.float32(1.01))
    report = verify_unet_conversion(result)
    assert not report["ok"] and report["max_abs_diff"] > ATOL


LEGACY = ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn."))


def test_legacy_attention_names_convert_to_the_same_model(tmp_path):
    cfg = CONFIGS["attn_rgb16"]
    save_unet(diffusers_unet(cfg), tmp_path / "new")
    tensors, _ = read_safetensors(tmp_path / "new" / "diffusion_pytorch_model.safetensors")
    legacy = {}
    for k, v in tensors.items():
        for new, old in LEGACY:
            k = k.replace(new, old)
        legacy[k] = np.array(v)
    (tmp_path / "old").mkdir()
    write_safetensors(tmp_path / "old" / "diffusion_pytorch_model.safetensors", legacy)
    (tmp_path / "old" / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
    a, b = convert_unet(tmp_path / "new"), convert_unet(tmp_path / "old")
    # 4 attention blocks (down_blocks.1: 1, mid: 1, up_blocks.0: 2) x 4 linears x weight/bias
    assert len(b.report["legacy_renames"]) == 32 and not a.report["legacy_renames"]
    # the inverse map gives back diffusers' own state dict (names, OIHW / (out, in) layouts, values)
    exported = export_torch_state(a.model)
    assert set(exported) == set(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(exported[k], v)
    sa, sb = nnx.to_flat_state(nnx.state(a.model)), nnx.to_flat_state(nnx.state(b.model))
    assert [p for p, _ in sa] == [p for p, _ in sb]
    for (_, va), (_, vb) in zip(sa, sb):
        np.testing.assert_array_equal(np.asarray(va[...]), np.asarray(vb[...]))


@pytest.fixture
def saved(tmp_path):
    """A converted-able tiny UNet folder and its tensors as writable numpy arrays."""
    save_unet(diffusers_unet(CONFIGS["cond_gray28"]), tmp_path / "u")
    tensors, _ = read_safetensors(tmp_path / "u" / "diffusion_pytorch_model.safetensors")
    return tmp_path / "u", {k: np.array(v) for k, v in tensors.items()}


@pytest.mark.parametrize("breakage,needle", [
    ("missing", "missing keys (1): up_blocks.0.resnets.1.conv2.weight"),
    ("shape", "down_blocks.0.resnets.0.time_emb_proj.weight: shape [16, 63], expected [16, 64]"),
    ("extra", "unexpected keys (1): mid_block.attentions.0.to_q.weight"),
    ("nan", "class_embedding.weight: 1 non-finite value"),
])
def test_broken_checkpoint_names_the_key(saved, breakage, needle):
    folder, tensors = saved
    if breakage == "missing":
        del tensors["up_blocks.0.resnets.1.conv2.weight"]
    elif breakage == "shape":
        key = "down_blocks.0.resnets.0.time_emb_proj.weight"
        tensors[key] = tensors[key][:, :63].copy()
    elif breakage == "extra":
        tensors["mid_block.attentions.0.to_q.weight"] = np.zeros((32, 32), np.float32)
    else:
        tensors["class_embedding.weight"][2, 5] = np.nan
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", tensors)
    with pytest.raises(ConversionError) as err:
        convert_unet(folder)
    assert needle in str(err.value) and "diffusion_pytorch_model.safetensors" in str(err.value)


def test_config_and_weights_that_disagree_fail_naming_the_keys(saved):
    folder, _ = saved
    cfg = json.loads((folder / "config.json").read_text())
    with pytest.raises(ConversionError, match=r"missing keys .*mid_block\.attentions\.0\.to_q\.weight"):
        convert_unet(folder, config={**cfg, "add_attention": True})
    with pytest.raises(ConversionError, match=r"unexpected keys \(1\): class_embedding\.weight"):
        convert_unet(folder, config={**cfg, "num_class_embeds": None})


@pytest.mark.parametrize("field,value,needle", [
    ("time_embedding_type", "fourier", "time_embedding_type='fourier' is not supported"),
    ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D"],
     "down_block_types[1]='CrossAttnDownBlock2D' is not supported"),
    ("up_block_types", ["UpBlock2D", "SkipUpBlock2D"], "up_block_types[1]='SkipUpBlock2D' is not supported"),
    ("class_embed_type", "timestep", "class_embed_type='timestep' is not supported"),
    ("resnet_time_scale_shift", "spatial", "resnet_time_scale_shift='spatial' is not supported"),
    ("upsample_type", "resnet", "upsample_type='resnet' is not supported"),
    ("act_fn", "tanh", "act_fn='tanh' is not supported"),
    ("norm_num_groups", 5, "norm_num_groups=5 does not divide"),
    ("norm_num_groups", None, "norm_num_groups=None is not supported"),
    ("attention_head_dim", 64, "attention_head_dim=64 exceeds block_out_channels[1]=32"),
    ("block_out_channels", [16, 32, 64], "need the same non-zero length"),
    ("cross_attention_dim", 8, "unknown field(s) ['cross_attention_dim']"),
    ("_class_name", "UNet2DConditionModel", "_class_name: 'UNet2DConditionModel' is not supported"),
])
def test_unsupported_config_is_refused_naming_the_field(tmp_path, field, value, needle):
    base = {"_class_name": "UNet2DModel", "_diffusers_version": "0.42.1", **CONFIGS["attn_rgb16"]}
    base = json.loads(json.dumps(base))  # tuples -> lists, as in a config.json
    with pytest.raises(ConfigError) as err:
        UNet2DConfig.from_diffusers({**base, field: value}, "unet/config.json")
    assert needle in str(err.value) and "unet/config.json" in str(err.value)


def test_config_file_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "time_embedding_type": "learned"}))
    write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", {"x": np.zeros(1, np.float32)})
    with pytest.raises(ConfigError, match=r"config\.json.*time_embedding_type='learned' is not supported"):
        convert_unet(tmp_path)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(ConversionError, match="pickle weights .* refused"):
        convert_unet(pickled)


def test_library_imports_neither_torch_nor_diffusers():
    code = ("import sys, kdd_jax.models, kdd_jax.generative, converters; "
            "bad = [m for m in ('torch', 'diffusers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
