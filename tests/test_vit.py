"""ViT (DINO) and DINOv2 image encoders: transformers-layout checkpoints (written by PyTorch
re-implementations of transformers' ViTModel and Dinov2Model forwards, tiny and random) convert
strictly and give the same class-token embeddings; as feature networks they embed images of any
size with the folder's preprocessing."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from converters import ConversionError  # noqa: E402
from converters.torch_reference import TorchViTModel  # noqa: E402
from converters.vit import convert_vit, is_vit_folder  # noqa: E402
from kdd_jax.config import ConfigError  # noqa: E402
from kdd_jax.scores.images import vit_feature_net  # noqa: E402
from tests.conftest import assert_matches_torch  # noqa: E402

# layer_norm_eps left out on purpose: the converter must fall back to transformers' default per model type
BASE = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_channels=3, image_size=12, patch_size=4)
EPS = {"vit": 1e-12, "deit": 1e-12, "dinov2": 1e-6, "dinov2_with_registers": 1e-6}


class TorchViT(nn.Module):
    """The class-token embedding of transformers' ViTModel / Dinov2Model (the shared reference's
    encoder), with tokens, position embeddings, layer scales and LayerNorm affine drawn away from
    their 0/1 initialisation so the comparison sees them."""

    def __init__(self, variant, c, inter, *, pooler=False, mask_token=False, eps=None, registers=0):
        super().__init__()
        self.model = TorchViTModel({**c, "intermediate_size": inter, "hidden_act": "gelu", "qkv_bias": True,
                                    "variant": variant, "layer_norm_eps": EPS[variant] if eps is None else eps,
                                    "pooler": pooler, "mask_token": mask_token, "num_register_tokens": registers})
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)
            for name, p in self.named_parameters():
                if name.split(".")[-1] in ("cls_token", "distillation_token", "register_tokens", "position_embeddings",
                                           "lambda1"):
                    p.copy_(torch.rand_like(p) + 0.5 if name.endswith("lambda1") else torch.randn_like(p))

    def forward(self, x):
        return self.model(x)[:, 0]


def write_vit(path, variant="vit", seed=0, *, pooler=False, mask_token=False, classifier=False, preprocessor=None,
              registers=0):
    """A transformers-style folder (`classifier`: a *ForImageClassification checkpoint, prefixed)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    inter = 24
    model = TorchViT(variant, BASE, inter, pooler=pooler, mask_token=mask_token, registers=registers).eval()
    sd = {k.removeprefix("model."): v.contiguous() for k, v in model.state_dict().items()}
    if classifier:
        sd = {f"{variant}.{k}": v for k, v in sd.items()}
        sd.update({"classifier.weight": torch.randn(5, 16), "classifier.bias": torch.randn(5)})
    config = {**BASE, "model_type": variant, "hidden_act": "gelu", "hidden_dropout_prob": 0.0}
    config.update({"mlp_ratio": inter / BASE["hidden_size"]} if variant.startswith("dinov2") else
                  {"intermediate_size": inter})
    if variant == "dinov2_with_registers":
        config["num_register_tokens"] = registers
    path.mkdir(parents=True)
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    if preprocessor is not None:
        (path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return model


@pytest.mark.parametrize("variant, extras", [("vit", dict(pooler=True)), ("vit", dict(classifier=True)),
                                             ("deit", dict(classifier=True)), ("dinov2", dict(mask_token=True)),
                                             ("dinov2", dict(classifier=True)),
                                             ("dinov2_with_registers", dict(mask_token=True, registers=2))])
def test_converted_vit_gives_transformers_embeddings(tmp_path, variant, extras):
    ref = write_vit(tmp_path / "m", variant, **extras)
    assert is_vit_folder(tmp_path / "m")
    r = convert_vit(tmp_path / "m")
    assert r.config.variant == variant and r.config.layer_norm_eps == EPS[variant] and r.config.intermediate_size == 24
    assert r.config.pooler == extras.get("pooler", False) and r.config.mask_token == extras.get("mask_token", False)
    assert r.report["unused_classifier_keys"] == (2 if extras.get("classifier") else 0)
    assert r.report["family"] == "transformers_vit" and r.report["parameters"] > 0
    # the image processors' defaults without a preprocessor_config.json
    assert (r.mean, r.resize) == (((0.5,) * 3, "linear") if variant == "vit" else ((0.485, 0.456, 0.406), "cubic"))
    assert r.model.embeddings.position_embeddings.value.shape[1] == 9 + (2 if variant == "deit" else 1)
    assert_matches_torch(r.model, ref, np.random.default_rng(0).normal(size=(3, 3, 12, 12)).astype(np.float32))
    if variant.startswith("dinov2"):  # Dinov2Model interpolates its position embeddings to any input's patch grid
        assert_matches_torch(r.model, ref, np.random.default_rng(1).normal(size=(2, 3, 16, 8)).astype(np.float32))
        with pytest.raises(ValueError, match=r"at least one patch \(4x4\)"):
            r.model(np.zeros((1, 3, 12, 3), np.float32))
    else:
        with pytest.raises(ValueError, match="must be 12x12"):
            r.model(np.zeros((1, 16, 16, 3), np.float32))


def test_dinov2_feature_net_can_embed_at_another_size(tmp_path):
    """`size` (CLI --feature-size): a DINOv2 net embeds images resized to size x size through interpolated
    position embeddings, as the reference does; another size is another fingerprint, the native one keeps
    its fingerprint, and encoders that cannot interpolate refuse it."""
    import jax

    pre = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3}
    ref = write_vit(tmp_path / "d2", "dinov2", preprocessor=pre)
    r = convert_vit(tmp_path / "d2")
    native = vit_feature_net(r.model, r.mean, r.std, resize=r.resize)
    net = vit_feature_net(r.model, r.mean, r.std, resize=r.resize, size=20)
    assert "size" not in json.loads(native.spec) and net.fingerprint != native.fingerprint
    grey = np.random.default_rng(1).uniform(0, 1, (3, 28, 28, 1)).astype(np.float32)
    x = jax.image.resize(np.repeat(grey, 3, -1), (3, 20, 20, 3), "cubic")
    x = (np.asarray(x) - np.array(pre["image_mean"], np.float32)) / np.array(pre["image_std"], np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(np.asarray(net.embedding(grey)), want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.asarray(native.embedding(grey)), want, atol=1e-3)  # the size changed the embedding
    with pytest.raises(ValueError, match="size must be an integer from the patch size 4 to 8192, got 2"):
        vit_feature_net(r.model, r.mean, r.std, size=2)
    write_vit(tmp_path / "dino", "vit")
    v = convert_vit(tmp_path / "dino")
    with pytest.raises(ValueError, match="only DINOv2 encoders interpolate their position embeddings"):
        vit_feature_net(v.model, v.mean, v.std, size=20)


def test_vit_feature_net_uses_the_folders_preprocessing(tmp_path):
    import jax

    from kdd_jax.scores import SCORES

    pre = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3}
    ref = write_vit(tmp_path / "dino", preprocessor=pre)
    r = convert_vit(tmp_path / "dino")
    assert r.mean == (0.485, 0.456, 0.406) and r.resize == "cubic"
    assert r.report["source"]["preprocessing"].endswith("preprocessor_config.json")
    net = vit_feature_net(r.model, r.mean, r.std, resize=r.resize)
    assert net.layers == ("cls_token",) and net.channels == (16,)
    # without a filter given, the ViT (DINO) processor's bilinear: another net than this bicubic one
    assert vit_feature_net(r.model, r.mean, r.std).spec == vit_feature_net(r.model, r.mean, r.std, resize="linear").spec
    assert vit_feature_net(r.model, r.mean, r.std).fingerprint != net.fingerprint
    grey = np.random.default_rng(1).uniform(0, 1, (5, 28, 28, 1)).astype(np.float32)
    e = np.asarray(net.embedding(grey))
    assert e.shape == (5, 16) and np.all(np.isfinite(e))
    np.testing.assert_allclose(net.embedding(np.repeat(grey, 3, -1)), e, rtol=1e-5, atol=1e-6)  # grey = repeated RGB
    # what the net computes is the reference's forward on the resized, normalised images
    x = jax.image.resize(np.repeat(grey, 3, -1), (5, 12, 12, 3), "cubic")
    x = (np.asarray(x) - np.array(pre["image_mean"], np.float32)) / np.array(pre["image_std"], np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(e, want, rtol=1e-4, atol=1e-5)
    assert float(SCORES["linear_cka"].fn(net.embedding(grey), net.embedding(grey))) == pytest.approx(1.0, abs=1e-5)

    # preprocessing is part of what the net is: another filter or do_normalize=false is another fingerprint
    (tmp_path / "dino" / "preprocessor_config.json").write_text(json.dumps({**pre, "resample": 2}))
    r2 = convert_vit(tmp_path / "dino")
    assert r2.resize == "linear"
    assert vit_feature_net(r2.model, r2.mean, r2.std, resize=r2.resize).fingerprint != net.fingerprint
    (tmp_path / "dino" / "preprocessor_config.json").write_text(json.dumps({**pre, "do_normalize": False}))
    r3 = convert_vit(tmp_path / "dino")
    assert (r3.mean, r3.std) == ((0.0,) * 3, (1.0,) * 3)
    assert vit_feature_net(r3.model, r3.mean, r3.std, resize=r3.resize).fingerprint != net.fingerprint


def test_bad_vit_folders_are_clear_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "dino"
    write_vit(d, "dinov2")
    cfg = json.loads((d / "config.json").read_text())
    for field, value, match in (("use_swiglu_ffn", True, "SwiGLU"), ("use_swiglu_ffn", "false", "expected true or false"),
                                ("mlp_ratio", -1, "mlp_ratio: must be a finite number > 0"),
                                ("mlp_ratio", float("inf"), "mlp_ratio: must be a finite"),
                                ("layer_norm_eps", float("nan"), "layer_norm_eps must be a finite"),
                                ("hidden_act", "relu", "hidden_act 'relu'"),
                                ("num_channels", 1, "num_channels 1; image-encoder feature networks take RGB"),
                                ("patch_size", 5, "image_size 12 is not a multiple of patch_size 5")):
        (d / "config.json").write_text(json.dumps({**cfg, field: value}))
        with pytest.raises(ConfigError, match=match):
            convert_vit(d)
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    assert not is_vit_folder(d)
    with pytest.raises(ConfigError, match="model_type: 'bert' is not a ViT/DINO model"):
        convert_vit(d)
    (d / "config.json").write_text(json.dumps(cfg))
    good = (d / "model.safetensors").read_bytes()  # a bad config is named before the (large) weights are read
    (d / "model.safetensors").write_bytes(b"not safetensors")
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": "big"}))
    with pytest.raises(ConfigError, match="hidden_size must be a positive integer"):
        convert_vit(d)
    (d / "model.safetensors").write_bytes(good)
    (d / "config.json").write_text(json.dumps(cfg))
    for code, match in ((4, r"resample: 4 \(box\) is not supported"), ("bicubic", "resample: 'bicubic'"),
                        (True, r"resample: True is not supported; supported PIL codes")):
        (d / "preprocessor_config.json").write_text(json.dumps({"resample": code}))
        with pytest.raises(ConfigError, match=match):
            convert_vit(d)
    (d / "preprocessor_config.json").unlink()

    sd = load_file(str(d / "model.safetensors"))
    save_file({**sd, "head.weight": torch.zeros(2, 16)}, str(d / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"unexpected keys \(1\): head.weight"):
        convert_vit(d)
    del sd["encoder.layer.1.layer_scale2.lambda1"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ConversionError, match="missing keys.*layer.1.layer_scale2.lambda1"):
        convert_vit(d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="pickle weights .*refused"):
        convert_vit(d)


def test_layer_norm_is_torchs_on_offset_activations():
    """Residual streams of trained ViTs carry large per-token offsets; the variance must be computed
    as torch does (E[(x - mean)^2]), not as E[x^2] - mean^2, which loses ~3e-3 at an offset of 100."""
    from flax import nnx

    from kdd_jax.models.transformer import layer_norm

    x = np.random.default_rng(0).normal(100.0, 1.0, (4, 7, 64)).astype(np.float32)
    ln = layer_norm(64, 1e-6, nnx.Rngs(0))
    want = nn.functional.layer_norm(torch.from_numpy(x), (64,), eps=1e-6).numpy()
    np.testing.assert_allclose(np.asarray(ln(x)), want, atol=1e-4)
