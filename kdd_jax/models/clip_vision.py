"""CLIP's vision tower (Hugging Face transformers naming), as a feature network for diffusion students.

The paper compared a diffusion student's images with each teacher's as sets of CLIP embeddings (CKA,
ACS, MMD). This is transformers' `CLIPVisionModel` / `CLIPVisionModelWithProjection` (the vision half
of `CLIPModel`): patch embedding (a bias-free conv), class token and learned position embeddings,
`pre_layrnorm`, pre-LN encoder layers (self-attention with q/k/v/out projections, MLP fc1 ->
quick_gelu or gelu -> fc2), the class token through `post_layernorm`, and `visual_projection` when
the checkpoint has one. Module names mirror transformers' so state-dict keys map 1:1
(`converters/clip_vision.py`). Inference only; dropout is the identity.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from kdd_jax.config import ConfigError
from kdd_jax.models.layers import conv2d
from kdd_jax.models.transformer import ACTIVATIONS, Parameter, TowerConfig, layer_norm, self_attention


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(TowerConfig):
    """The fields of transformers' CLIPVisionConfig that decide the forward pass (its defaults:
    ViT-B/32). `projection_dim` is None for a checkpoint without `visual_projection`."""

    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.projection_dim is not None and (not isinstance(self.projection_dim, int)
                                                or isinstance(self.projection_dim, bool) or self.projection_dim < 1):
            raise ConfigError(f"projection_dim must be a positive integer or null, got {self.projection_dim!r}")

    @classmethod
    def from_transformers(cls, data, source: str = "config.json", *, projection: bool | None = None) -> "CLIPVisionConfig":
        """From a transformers config.json: a CLIPVisionConfig (model_type clip_vision_model) or a
        CLIPConfig (model_type clip, its `vision_config`). Only the fields above are read; the rest
        (ids, dropout rates, initialisers, versions, the text tower) do not change the vision forward.
        `projection`: whether the checkpoint holds `visual_projection` (decides projection_dim)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        model_type = data.get("model_type")
        if model_type == "clip":
            vision, proj = data.get("vision_config", {}), data.get("projection_dim", 512)
            override = data.get("vision_config_dict")  # older hub configs: transformers lets it win
            if not isinstance(vision, dict) or not isinstance(override or {}, dict):
                raise ConfigError(f"{source}.vision_config: not an object")
            vision = {**vision, **(override or {})}
            where = f"{source}.vision_config"
        elif model_type == "clip_vision_model":
            vision, proj, where = data, data.get("projection_dim", 512), source
        else:
            raise ConfigError(f"{source}.model_type: {model_type!r} is not a CLIP model (clip or clip_vision_model)")
        fields = {f.name for f in dataclasses.fields(cls)} - {"projection_dim"}
        kwargs = {k: vision[k] for k in fields if k in vision}
        try:
            return cls(**kwargs, projection_dim=proj if projection else None)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


class Embeddings(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.class_embedding = Parameter(cfg.hidden_size, rngs)
        self.patch_embedding = conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size,
                                      bias=False, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.num_patches + 1, cfg.hidden_size, rngs=rngs)

    def __call__(self, x):  # x [N, H, W, C] -> [N, 1 + patches, D]
        p = self.patch_embedding(x)
        n = p.shape[0]
        tokens = p.reshape(n, -1, p.shape[-1])  # row-major over (h, w): torch's flatten(2).transpose(1, 2)
        cls = jnp.broadcast_to(self.class_embedding.value[...], (n, 1, tokens.shape[-1]))
        return jnp.concatenate([cls, tokens], axis=1) + self.position_embedding.embedding[...][None]


class Attention(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nnx.Linear(d, d, rngs=rngs) for _ in range(4))

    def __call__(self, h):
        return self.out_proj(self_attention(self.q_proj(h), self.k_proj(h), self.v_proj(h), self.heads))


class MLP(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs):
        self.act = cfg.hidden_act
        self.fc1 = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, rngs=rngs)
        self.fc2 = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, rngs=rngs)

    def __call__(self, h):
        return self.fc2(ACTIVATIONS[self.act](self.fc1(h)))


def _layer_norm(cfg: CLIPVisionConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs):
        self.layer_norm1 = _layer_norm(cfg, rngs)
        self.self_attn = Attention(cfg, rngs)
        self.layer_norm2 = _layer_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, h):
        h = h + self.self_attn(self.layer_norm1(h))
        return h + self.mlp(self.layer_norm2(h))


class Encoder(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs):
        self.layers = nnx.List([EncoderLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])


class VisionTransformer(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs):
        self.embeddings = Embeddings(cfg, rngs)
        self.pre_layrnorm = _layer_norm(cfg, rngs)  # sic: transformers' name
        self.encoder = Encoder(cfg, rngs)
        self.post_layernorm = _layer_norm(cfg, rngs)


class CLIPVisionModel(nnx.Module):
    """images [N, image_size, image_size, C], already normalised -> image embedding [N, P]
    (`visual_projection` of the pooled class token; the pooled token itself, [N, D], without one)."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.vision_model = VisionTransformer(cfg, rngs)
        if cfg.projection_dim is not None:
            self.visual_projection = nnx.Linear(cfg.hidden_size, cfg.projection_dim, use_bias=False, rngs=rngs)

    def __call__(self, x):
        vm = self.vision_model
        if x.shape[1:3] != (self.config.image_size,) * 2:
            raise ValueError(f"images must be {self.config.image_size}x{self.config.image_size}, got {x.shape[1:3]}")
        h = vm.pre_layrnorm(vm.embeddings(x))
        for layer in vm.encoder.layers:
            h = layer(h)
        pooled = vm.post_layernorm(h[:, 0])
        return self.visual_projection(pooled) if self.config.projection_dim is not None else pooled


def abstract_clip_vision(cfg: CLIPVisionConfig) -> CLIPVisionModel:
    return nnx.eval_shape(lambda: CLIPVisionModel(cfg, rngs=nnx.Rngs(0)))


def embedding_dim(cfg: CLIPVisionConfig) -> int:
    return cfg.projection_dim if cfg.projection_dim is not None else cfg.hidden_size


__all__ = ["CLIPVisionConfig", "CLIPVisionModel", "abstract_clip_vision", "embedding_dim"]
