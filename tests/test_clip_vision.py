"""CLIP's vision tower: a transformers-layout checkpoint (written by a PyTorch re-implementation of
transformers' CLIPVisionModelWithProjection forward, tiny and random) converts strictly and gives
the same image embeddings; as a feature network it drives the set scores, also from the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from converters import ConversionError  # noqa: E402
from converters.clip_vision import CLIP_MEAN, convert_clip_vision, is_clip_folder  # noqa: E402
from kdd_jax.config import ConfigError  # noqa: E402
from kdd_jax.scores.images import clip_feature_net  # noqa: E402
from tests.conftest import assert_matches_torch  # noqa: E402

VISION = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, num_channels=3,
              image_size=12, patch_size=4, layer_norm_eps=1e-5)


class _Attn(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, h):
        n, t, d = h.shape
        hd = d // self.heads
        split = lambda z: z.view(n, t, self.heads, hd).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(h) * hd ** -0.5), split(self.k_proj(h)), split(self.v_proj(h))
        w = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return self.out_proj((w @ v).transpose(1, 2).reshape(n, t, d))


class _Layer(nn.Module):
    def __init__(self, c, act):
        super().__init__()
        d = c["hidden_size"]
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(d, eps=c["layer_norm_eps"]), nn.LayerNorm(d, eps=c["layer_norm_eps"])
        self.self_attn = _Attn(d, c["num_attention_heads"])
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, c["intermediate_size"]), nn.Linear(c["intermediate_size"], d)
        self.act = act

    def forward(self, h):
        h = h + self.self_attn(self.layer_norm1(h))
        return h + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(h))))


class TorchCLIPVision(nn.Module):
    """transformers' CLIPVisionModelWithProjection: module names, buffers and forward."""

    def __init__(self, c, projection_dim=10, act="quick_gelu"):
        super().__init__()
        d, p = c["hidden_size"], c["patch_size"]
        n_pos = (c["image_size"] // p) ** 2 + 1
        self.vision_model = nn.Module()
        emb = self.vision_model.embeddings = nn.Module()
        emb.class_embedding = nn.Parameter(torch.randn(d))
        emb.patch_embedding = nn.Conv2d(c["num_channels"], d, p, stride=p, bias=False)
        emb.position_embedding = nn.Embedding(n_pos, d)
        emb.register_buffer("position_ids", torch.arange(n_pos)[None])  # older saves hold it
        self.vision_model.pre_layrnorm = nn.LayerNorm(d, eps=c["layer_norm_eps"])
        self.vision_model.encoder = nn.Module()
        fn = (lambda x: x * torch.sigmoid(1.702 * x)) if act == "quick_gelu" else nn.functional.gelu
        self.vision_model.encoder.layers = nn.ModuleList(_Layer(c, fn) for _ in range(c["num_hidden_layers"]))
        self.vision_model.post_layernorm = nn.LayerNorm(d, eps=c["layer_norm_eps"])
        self.visual_projection = nn.Linear(d, projection_dim, bias=False)

    def forward(self, x):  # NCHW, normalised
        emb = self.vision_model.embeddings
        p = emb.patch_embedding(x).flatten(2).transpose(1, 2)
        h = torch.cat([emb.class_embedding.expand(len(x), 1, -1), p], dim=1) + emb.position_embedding(emb.position_ids)
        h = self.vision_model.pre_layrnorm(h)
        for layer in self.vision_model.encoder.layers:
            h = layer(h)
        return self.visual_projection(self.vision_model.post_layernorm(h[:, 0]))


def write_clip(path, seed=0, *, act="quick_gelu", full_clip=True):
    """A transformers-style folder; `full_clip`: a CLIPModel config and a text tower in the weights."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = TorchCLIPVision(VISION, act=act).eval()
    with torch.no_grad():  # LayerNorm affine away from 1/0 so the test sees them
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    vision = {**VISION, "hidden_act": act, "model_type": "clip_vision_model", "dropout": 0.0}
    if full_clip:
        sd.update({"text_model.embeddings.token_embedding.weight": torch.randn(7, 8), "logit_scale": torch.tensor(2.6),
                   "text_projection.weight": torch.randn(10, 8),
                   "text_model.embeddings.position_ids": torch.arange(7)[None]})
        config = {"model_type": "clip", "projection_dim": 10, "vision_config": vision, "text_config": {"hidden_size": 8}}
    else:
        config = {**vision, "projection_dim": 10}
    path.mkdir(parents=True)
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("act, full_clip", [("quick_gelu", True), ("gelu", False)])
def test_converted_clip_vision_gives_transformers_embeddings(tmp_path, act, full_clip):
    ref = write_clip(tmp_path / "clip", act=act, full_clip=full_clip)
    assert is_clip_folder(tmp_path / "clip")
    r = convert_clip_vision(tmp_path / "clip")
    assert r.config.hidden_act == act and r.config.projection_dim == 10 and r.mean == CLIP_MEAN
    assert r.report["unused_text_tower_keys"] == (4 if full_clip else 0)  # counted once, not also as dropped
    assert r.report["dtype"]["dropped_keys"] == ["vision_model.embeddings.position_ids"]
    assert_matches_torch(r.model, ref, np.random.default_rng(0).normal(size=(3, 3, 12, 12)).astype(np.float32))


def test_clip_feature_net_embeds_images_of_any_size(tmp_path):
    from kdd_jax.scores import SCORES

    write_clip(tmp_path / "clip")
    r = convert_clip_vision(tmp_path / "clip")
    net = clip_feature_net(r.model, r.mean, r.std)
    assert net.layers == ("image_embeds",) and net.channels == (10,)
    grey = np.random.default_rng(1).uniform(0, 1, (5, 28, 28, 1)).astype(np.float32)
    e = np.asarray(net.embedding(grey))
    assert e.shape == (5, 10) and np.all(np.isfinite(e))
    np.testing.assert_allclose(net.embedding(np.repeat(grey, 3, -1)), e, rtol=1e-5, atol=1e-6)  # grey = repeated RGB
    same = float(SCORES["linear_cka"].fn(net.embedding(grey), net.embedding(grey)))
    other = float(SCORES["linear_cka"].fn(net.embedding(grey), net.embedding(grey[::-1] * 0.5)))
    assert same == pytest.approx(1.0, abs=1e-5) and other < same
    write_clip(tmp_path / "clip2", seed=1)
    r2 = convert_clip_vision(tmp_path / "clip2")
    assert clip_feature_net(r2.model, r2.mean, r2.std).fingerprint != net.fingerprint


def test_bad_clip_folders_are_clear_errors(tmp_path):
    d = tmp_path / "clip"
    write_clip(d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="pickle weights .*refused"):
        convert_clip_vision(d)
    from safetensors.torch import load_file, save_file

    (d / "pytorch_model.bin").rename(d / "model.safetensors")
    sd = load_file(str(d / "model.safetensors"))
    del sd["vision_model.post_layernorm.bias"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ConversionError, match="missing keys.*post_layernorm.bias"):
        convert_clip_vision(d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    assert not is_clip_folder(d)
    with pytest.raises(ConfigError, match="model_type"):
        convert_clip_vision(d)
    cfg["vision_config"]["hidden_act"] = "relu"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="vision_config: hidden_act 'relu'"):
        convert_clip_vision(d)
    cfg["vision_config"]["hidden_act"] = ["gelu"]  # not even a string: still a ConfigError, not a TypeError
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="hidden_act"):
        convert_clip_vision(d)
    cfg["vision_config"]["hidden_act"] = "quick_gelu"
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5], "image_std": [0.2] * 3}))
    with pytest.raises(ConfigError, match="preprocessor_config.json.image_mean"):
        convert_clip_vision(d)


def test_transformers_configs_fall_back_and_override_as_transformers_does():
    """save_pretrained omits fields equal to their defaults (ViT-B/32's), and older hub configs carry a
    `vision_config_dict` that transformers lets override `vision_config`."""
    from kdd_jax.models.clip_vision import CLIPVisionConfig

    c = CLIPVisionConfig.from_transformers({"model_type": "clip"}, projection=True)
    assert (c.hidden_size, c.patch_size, c.image_size, c.projection_dim, c.hidden_act) == (768, 32, 224, 512, "quick_gelu")
    large = {"model_type": "clip", "projection_dim": 768, "vision_config": {"hidden_size": 768, "patch_size": 32},
             "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                                    "num_hidden_layers": 24, "patch_size": 14}}
    c = CLIPVisionConfig.from_transformers(large, projection=True)
    assert (c.hidden_size, c.patch_size, c.num_hidden_layers, c.num_patches, c.projection_dim) == (1024, 14, 24, 256, 768)
    assert CLIPVisionConfig.from_transformers({"model_type": "clip_vision_model"}, projection=False).projection_dim is None
    with pytest.raises(ConfigError, match="image_size 224 is not a multiple of patch_size 15"):
        CLIPVisionConfig.from_transformers({"model_type": "clip_vision_model", "patch_size": 15})


def test_vision_only_folders_custom_normalisation_and_chunked_batches(tmp_path):
    """A CLIPVisionModel folder (no visual_projection) gives the pooled class token; the folder's
    preprocessor_config.json normalisation is applied and fingerprinted; non-finite values are
    refused; embeddings do not depend on how the batch is chunked."""
    import dataclasses

    import jax
    from safetensors.torch import load_file, save_file

    d = tmp_path / "vision"
    ref = write_clip(d, full_clip=False)
    sd = load_file(str(d / "model.safetensors"))
    del sd["visual_projection.weight"]
    save_file(sd, str(d / "model.safetensors"))
    r = convert_clip_vision(d)
    assert r.config.projection_dim is None
    x = np.random.default_rng(2).normal(size=(2, 3, 12, 12)).astype(np.float32)
    with torch.no_grad():
        emb = ref.vision_model.embeddings
        h = torch.cat([emb.class_embedding.expand(2, 1, -1), emb.patch_embedding(torch.from_numpy(x)).flatten(2).transpose(1, 2)], 1)
        h = ref.vision_model.pre_layrnorm(h + emb.position_embedding(emb.position_ids))
        for layer in ref.vision_model.encoder.layers:
            h = layer(h)
        want = ref.vision_model.post_layernorm(h[:, 0]).numpy()
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(np.asarray(r.model(x.transpose(0, 2, 3, 1))), want, rtol=1e-5, atol=1e-5)
    net = clip_feature_net(r.model, r.mean, r.std)
    assert net.layers == ("pooler_output",) and net.channels == (16,)

    imgs = np.random.default_rng(3).uniform(0, 1, (7, 12, 12, 3)).astype(np.float32)
    small = dataclasses.replace(net, batch=3)  # 3 + 3 + 1
    np.testing.assert_allclose(small.embedding(imgs), net.embedding(imgs), rtol=1e-5, atol=1e-6)

    (d / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    r2 = convert_clip_vision(d)
    assert r2.mean == (0.5, 0.5, 0.5) and r2.report["source"]["preprocessing"].endswith("preprocessor_config.json")
    net2 = clip_feature_net(r2.model, r2.mean, r2.std)
    assert net2.fingerprint != net.fingerprint
    assert not np.allclose(net2.embedding(imgs), net.embedding(imgs), atol=1e-3)
    (d / "preprocessor_config.json").write_text('{"image_mean": [NaN, 0.5, 0.5]}')
    with pytest.raises(ConfigError, match="image_mean: expected 3 finite numbers"):
        convert_clip_vision(d)
