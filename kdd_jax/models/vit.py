"""ViT image encoders in Hugging Face transformers' layout: `ViTModel` (DINO's published ViT-S/B
checkpoints, `facebook/dino-vit*`), `DeiTModel`, `Dinov2Model` and `Dinov2WithRegistersModel`, as
feature networks for diffusion students; and `ViTForImageClassification` /
`DeiTForImageClassification(WithTeacher)` / `Dinov2(WithRegisters)ForImageClassification` as
classifier students (family `vit`).

The paper compared a diffusion student's images with each teacher's as sets of CLIP/DINO embeddings.
A DINO image embedding is the class token of the last hidden state (after the final `layernorm`),
which is what `__call__` returns. Every variant: patch embedding (a conv with bias), `cls_token`,
learned `position_embeddings`, pre-LN encoder layers with query/key/value/dense attention, and a
final `layernorm`. They differ in the layer:

  vit     layernorm_before -> attention -> + ; layernorm_after -> intermediate.dense -> act ->
          output.dense -> +                   (an optional `pooler`, not used for the embedding)
  deit    the vit layer; the embeddings add a `distillation_token` after the class token (DeiT's
          students were trained to match a teacher through it)
  dinov2  norm1 -> attention -> layer_scale1 -> + ; norm2 -> mlp.fc1 -> act -> mlp.fc2 ->
          layer_scale2 -> +                   (an unused `mask_token`)
  dinov2_with_registers  the dinov2 layer; the embeddings insert `register_tokens` (no position
          embeddings) after the class token, once the positions are added

Module names mirror transformers' so state-dict keys map 1:1 (`converters/vit.py`). ViT and DeiT
images must be the config's `image_size`, as for transformers' ViTModel by default. DINOv2 takes
any size of at least one patch: as transformers' Dinov2Model does, the patch position embeddings
(a square grid at `image_size`) are resized to the input's patch grid by PyTorch's bicubic
interpolation (`F.interpolate(size=..., mode="bicubic", align_corners=False)` in float32, which is
what current transformers releases call; earlier ones passed a scale factor offset by 0.1, which
samples slightly different positions). DINOv2 with registers resizes with PyTorch's antialiased
bicubic instead (`antialias=True`, PIL's filter), as transformers' Dinov2WithRegistersEmbeddings
does. That is how DINOv2's released classifiers run: their checkpoints hold a 518x518 grid, their
processors crop 224x224. `kdd_jax.scores.images.vit_feature_net` still resizes images to
`image_size`, where no interpolation happens. DINOv2's SwiGLU MLP (ViT-g, `use_swiglu_ffn`) is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdd_jax.config import ConfigError
from kdd_jax.models.layers import conv2d
from kdd_jax.models.transformer import ACTIVATIONS, Parameter, TowerConfig, layer_norm, self_attention

VARIANTS = ("vit", "deit", "dinov2", "dinov2_with_registers")
DINOV2_VARIANTS = ("dinov2", "dinov2_with_registers")
# transformers' ViTConfig / DeiTConfig (the same values) / Dinov2Config defaults for the fields
# that shape the forward pass
_DEFAULTS = {
    "vit": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3,
                qkv_bias=True),
    "dinov2": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                   hidden_act="gelu", layer_norm_eps=1e-6, image_size=224, patch_size=14, num_channels=3,
                   qkv_bias=True),
}
_DEFAULTS["deit"] = dict(_DEFAULTS["vit"])
_DEFAULTS["dinov2_with_registers"] = dict(_DEFAULTS["dinov2"], patch_size=16, num_register_tokens=4)


@dataclasses.dataclass(frozen=True)
class ViTConfig(TowerConfig):
    """The fields that decide the forward pass (the shared ones at transformers' ViTConfig defaults).
    `pooler` / `mask_token`: whether the checkpoint holds those (unused) weights, so conversion
    stays strict about every key."""

    variant: str = "vit"
    qkv_bias: bool = True
    pooler: bool = False
    mask_token: bool = False
    num_register_tokens: int = 0  # dinov2_with_registers: learned tokens after the class token, no position

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant {self.variant!r} is not supported; supported: {list(VARIANTS)}")
        super().__post_init__()
        for f in ("qkv_bias", "pooler", "mask_token"):
            if not isinstance(getattr(self, f), bool):
                raise ConfigError(f"{f} must be true or false, got {getattr(self, f)!r}")
        if self.is_dinov2 and self.pooler:
            raise ConfigError("a Dinov2Model has no pooler")
        r = self.num_register_tokens
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ConfigError(f"num_register_tokens must be an integer >= 0, got {r!r}")
        if r and self.variant != "dinov2_with_registers":
            raise ConfigError(f"num_register_tokens {r}: register tokens belong to variant 'dinov2_with_registers'")

    @property
    def is_dinov2(self) -> bool:
        """DINOv2's layer (layer scales, mlp), any input size through interpolated position embeddings."""
        return self.variant in DINOV2_VARIANTS

    @property
    def prefix_tokens(self) -> int:
        """Tokens with position embeddings before the patches: the class token, and DeiT's distillation
        token (DINOv2's register tokens, inserted after the class token, have none)."""
        return 2 if self.variant == "deit" else 1

    @classmethod
    def from_transformers(cls, data, source: str = "config.json", *, pooler: bool = False,
                          mask_token: bool = False) -> "ViTConfig":
        """From a transformers config.json with model_type `vit` (ViTConfig), `deit` (DeiTConfig),
        `dinov2` (Dinov2Config) or `dinov2_with_registers` (Dinov2WithRegistersConfig); omitted fields
        take transformers' defaults, as `from_pretrained` does. The rest (dropout rates, initialisers,
        labels, versions) does not change the forward pass.
        `pooler` / `mask_token`: whether the checkpoint holds those weights."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        variant = data.get("model_type")
        if variant not in VARIANTS:
            raise ConfigError(f"{source}.model_type: {variant!r} is not a ViT/DINO model ({', '.join(VARIANTS)})")
        fields = {**_DEFAULTS[variant], **{k: data[k] for k in _DEFAULTS[variant] if k in data}}
        for key in ("image_size", "patch_size"):  # transformers also takes an [h, w] pair
            v = fields[key]
            if isinstance(v, list | tuple):
                if len(v) != 2 or v[0] != v[1]:
                    raise ConfigError(f"{source}.{key}: only square sizes are supported, got {v!r}")
                fields[key] = v[0]
        pooled = data.get("pooler_output_size")  # ViT and DeiT; null = hidden_size
        if pooler and pooled is not None and pooled != fields["hidden_size"]:
            raise ConfigError(f"{source}.pooler_output_size: only hidden_size ({fields['hidden_size']!r}) is "
                              f"supported for the pooler's weights, got {pooled!r}")
        if variant in DINOV2_VARIANTS:
            swiglu = data.get("use_swiglu_ffn", False)
            if not isinstance(swiglu, bool):
                raise ConfigError(f"{source}.use_swiglu_ffn: expected true or false, got {swiglu!r}")
            if swiglu:
                raise ConfigError(f"{source}.use_swiglu_ffn: DINOv2's SwiGLU MLP (ViT-g) is not supported")
            ratio = fields.pop("mlp_ratio")
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < math.inf:
                raise ConfigError(f"{source}.mlp_ratio: must be a finite number > 0, got {ratio!r}")
            hidden = fields["hidden_size"]
            fields["intermediate_size"] = int(hidden * ratio) if isinstance(hidden, int) else hidden
        try:
            return cls(variant=variant, **fields, pooler=pooler, mask_token=mask_token)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def _cubic(x, a):
    """Keys' cubic convolution kernel at distance x (float32 arithmetic, as PyTorch's CPU kernels):
    a = -0.75 in PyTorch's plain bicubic, -0.5 (PIL's) in its antialiased one."""
    f32 = np.float32
    x = abs(x)
    if x < 1:
        return ((a + f32(2)) * x - (a + f32(3))) * x * x + f32(1)
    if x < 2:
        return ((a * x - f32(5) * a) * x + f32(8) * a) * x - f32(4) * a
    return f32(0)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float32 weights of PyTorch's 1-D bicubic resize (`F.interpolate(mode="bicubic",
    align_corners=False)` with a target size and no antialiasing): output i samples the input at
    (i + 0.5) * n_in / n_out - 0.5 with four taps, indices clamped to the border. Applied along each
    axis it is that 2-D resize. Positions and weights are computed in float32, as PyTorch's kernel
    does for float32 tensors (float64 would sample up to ~1e-5 away from it). Read-only (cached)."""
    f32 = np.float32
    a = f32(-0.75)
    scale = f32(n_in) / f32(n_out)
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        src = scale * (f32(i) + f32(0.5)) - f32(0.5)
        f = int(np.floor(src))
        t = src - f32(f)
        u = f32(1) - t
        for k, w in enumerate((_cubic(t + f32(1), a), _cubic(t, a), _cubic(u, a), _cubic(u + f32(1), a))):
            m[i, min(max(f - 1 + k, 0), n_in - 1)] += w
    m.setflags(write=False)
    return m


@functools.lru_cache(maxsize=64)
def bicubic_aa_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float32 weights of PyTorch's antialiased 1-D bicubic resize (`F.interpolate(mode=
    "bicubic", align_corners=False, antialias=True)` with a target size), PIL's resampling: the cubic
    kernel with a = -0.5, stretched by the scale when shrinking so every input pixel under an output
    pixel counts, taps outside the input dropped and the rest renormalised to sum to 1. Arithmetic in
    float32 where PyTorch's kernel uses it for float32 tensors. Read-only (cached)."""
    f32 = np.float32
    a = f32(-0.5)
    scale = f32(n_in) / f32(n_out)
    support = f32(2 * scale) if scale >= 1 else f32(2)  # half the 4-tap window, stretched when shrinking
    invscale = f32(1.0 / scale) if scale >= 1 else f32(1)
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        center = f32(scale * (i + 0.5))
        lo = max(int(float(center - support) + 0.5), 0)  # int(): truncation toward zero, as a C cast
        hi = min(int(float(center + support) + 0.5), n_in)
        w = np.array([_cubic(f32((j - center + f32(0.5)) * invscale), a) for j in range(lo, hi)], np.float32)
        total = w.sum(dtype=np.float32)
        m[i, lo:hi] = w / total if total != 0 else w
    m.setflags(write=False)
    return m


def resize_position_grid(grid: jax.Array, out_hw: tuple[int, int], *, antialias: bool = False) -> jax.Array:
    """[g, g, D] position embeddings -> [h, w, D] by PyTorch's bicubic resize (`antialias`: its
    antialiased form, `bicubic_aa_matrix`), computed in float32 with
    full-precision matmuls (a TPU's default bfloat16 passes, or a GPU's TF32, would round the embeddings)
    and returned in the grid's dtype, as transformers casts back to the parameter's."""
    g = grid.shape[0]
    weights = bicubic_aa_matrix if antialias else bicubic_matrix
    mh, mw = weights(g, out_hw[0]), weights(g, out_hw[1])
    out = jnp.einsum("hi,ijd,wj->hwd", mh, grid.astype(jnp.float32), mw, precision=jax.lax.Precision.HIGHEST)
    return out.astype(grid.dtype)


class PatchEmbeddings(nnx.Module):
    def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
        self.projection = conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, rngs=rngs)


class Embeddings(nnx.Module):
    def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.cls_token = Parameter((1, 1, d), rngs)
        if cfg.variant == "deit":
            self.distillation_token = Parameter((1, 1, d), rngs)
        if cfg.mask_token:  # transformers: [1, 1, D] (ViT, DeiT) / [1, D] (DINOv2); used only for masked inputs
            self.mask_token = Parameter((1, d) if cfg.is_dinov2 else (1, 1, d), rngs)
        if cfg.variant == "dinov2_with_registers":  # saved even when empty ([1, 0, D]), as transformers does
            self.register_tokens = Parameter((1, cfg.num_register_tokens, d), rngs)
        self.patch_embeddings = PatchEmbeddings(cfg, rngs)
        self.position_embeddings = Parameter((1, cfg.num_patches + cfg.prefix_tokens, d), rngs)
        self.grid = cfg.image_size // cfg.patch_size  # the checkpoint's square patch grid
        # transformers resizes DINOv2-with-registers' grid with antialiasing, plain DINOv2's without
        self.antialias = cfg.variant == "dinov2_with_registers"

    def __call__(self, x):  # x [N, H, W, C] -> [N, prefix tokens + patches, D]
        p = self.patch_embeddings.projection(x)
        n, gh, gw, d = p.shape
        tokens = p.reshape(n, -1, d)  # row-major over (h, w): torch's flatten(2).transpose(1, 2)
        prefix = [self.cls_token] + ([self.distillation_token] if hasattr(self, "distillation_token") else [])
        pos = self.position_embeddings.value[...]
        if (gh, gw) != (self.grid, self.grid):  # DINOv2 only (ViTModel.last_hidden_state checks the size)
            k = len(prefix)
            patches = resize_position_grid(pos[0, k:].reshape(self.grid, self.grid, d), (gh, gw),
                                           antialias=self.antialias)
            pos = jnp.concatenate([pos[:, :k], patches.reshape(1, gh * gw, d)], axis=1)
        prefix = [jnp.broadcast_to(t.value[...], (n, 1, d)) for t in prefix]
        h = jnp.concatenate([*prefix, tokens], axis=1) + pos
        if hasattr(self, "register_tokens"):  # after the class token, after the positions (they have none)
            registers = jnp.broadcast_to(self.register_tokens.value[...], (n, *self.register_tokens.value.shape[1:]))
            h = jnp.concatenate([h[:, :1], registers, h[:, 1:]], axis=1)
        return h


class SelfAttention(nnx.Module):
    def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.query, self.key, self.value = (nnx.Linear(d, d, use_bias=cfg.qkv_bias, rngs=rngs) for _ in range(3))


class SelfOutput(nnx.Module):
    def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
        self.dense = nnx.Linear(cfg.hidden_size, cfg.hidden_size, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
        self.heads = cfg.num_attention_heads
        self.attention = SelfAttention(cfg, rngs)
        self.output = SelfOutput(cfg, rngs)

    def __call__(self, h):
        a = self.attention
        return self.output.dense(self_attention(a.query(h), a.key(h), a.value(h), self.heads))


class Dense(nnx.Module):
    """A module holding one `dense` Linear (transformers' ViTIntermediate / ViTOutput / ViTPooler)."""

    def __init__(self, d_in: int, d_out: int, rngs: nnx.Rngs):
        self.dense = nnx.Linear(d_in, d_out, rngs=rngs)


class ViTLayer(nnx.Module):
    def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
        self.act = cfg.hidden_act
        self.attention = Attention(cfg, rngs)
        self.intermediate = Dense(cfg.hidden_size, cfg.intermediate_size, rngs)
        self.output = Dense(cfg.intermediate_size, cfg.hidden_size, rngs)
        self.layernorm_before = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)
        self.layernorm_after = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)

    def __call__(self, h):
        h = h + self.attention(self.layernorm_before(h))
        return h + self.output.dense(ACTIVATIONS[self.act](self.intermediate.dense(self.layernorm_after(h))))


class LayerScale(nnx.Module):
    def __init__(self, d: int, rngs: nnx.Rngs):
        self.lambda1 = Parameter(d, rngs)


class MLP(nnx.Module):
    def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, rngs=rngs)
        self.fc2 = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, rngs=rngs)


class Dinov2Layer(nnx.Module):
    def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.act = cfg.hidden_act
        self.norm1 = layer_norm(d, cfg.layer_norm_eps, rngs)
        self.attention = Attention(cfg, rngs)
        self.layer_scale1 = LayerScale(d, rngs)
        self.norm2 = layer_norm(d, cfg.layer_norm_eps, rngs)
        self.mlp = MLP(cfg, rngs)
        self.layer_scale2 = LayerScale(d, rngs)

    def __call__(self, h):
        h = h + self.attention(self.norm1(h)) * self.layer_scale1.lambda1.value[...]
        mlp = self.mlp.fc2(ACTIVATIONS[self.act](self.mlp.fc1(self.norm2(h))))
        return h + mlp * self.layer_scale2.lambda1.value[...]


class Encoder(nnx.Module):
    def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
        layer = Dinov2Layer if cfg.is_dinov2 else ViTLayer
        self.layer = nnx.List([layer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])


class ViTModel(nnx.Module):
    """images [N, image_size, image_size, C] (DINOv2: [N, H, W, C], any size of at least one patch),
    already normalised -> the class token of the last hidden state [N, hidden_size] (DINO's image
    embedding; transformers' `last_hidden_state[:, 0]`, which for a Dinov2Model is also its `pooler_output`)."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = Embeddings(cfg, rngs)
        self.encoder = Encoder(cfg, rngs)
        self.layernorm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)
        if cfg.pooler:  # ViTModel(add_pooling_layer=True): tanh(dense(cls)); converted, not used here
            self.pooler = Dense(cfg.hidden_size, cfg.hidden_size, rngs)

    def __call__(self, x):
        return self.last_hidden_state(x, tokens=1)[:, 0]

    def last_hidden_state(self, x, tokens: int | None = None):
        """transformers' `last_hidden_state` [N, T, D] (after the final layernorm), or only its first
        `tokens` rows: LayerNorm is per token, so those rows are exact and the rest is not computed."""
        cfg = self.config
        if cfg.is_dinov2:
            if min(x.shape[1:3]) < cfg.patch_size:
                raise ValueError(f"images must be at least one patch ({cfg.patch_size}x{cfg.patch_size}), got "
                                 f"{x.shape[1:3]}")
        elif x.shape[1:3] != (cfg.image_size,) * 2:
            raise ValueError(f"images must be {cfg.image_size}x{cfg.image_size} (the checkpoint's "
                             f"image_size; position embeddings are not interpolated), got {x.shape[1:3]}")
        h = self.embeddings(x)
        for layer in self.encoder.layer:
            h = layer(h)
        return self.layernorm(h if tokens is None else h[:, :tokens])


def abstract_vit(cfg: ViTConfig) -> ViTModel:
    return nnx.eval_shape(lambda: ViTModel(cfg, rngs=nnx.Rngs(0)))


# classifier heads, by the transformers class that carries them
HEADS = {
    "cls": "classifier on the class token (ViTForImageClassification, DeiTForImageClassification)",
    "cls_distill": "mean of cls_classifier on the class token and distillation_classifier on the distillation "
                   "token (DeiTForImageClassificationWithTeacher)",
    "cls_mean": "classifier on the class token concatenated with the mean patch token, registers excluded "
                "(Dinov2ForImageClassification, Dinov2WithRegistersForImageClassification)",
}
# the head each variant's transformers classes carry
_VARIANT_HEADS = {"vit": ("cls",), "deit": ("cls", "cls_distill"), "dinov2": ("cls_mean",),
                  "dinov2_with_registers": ("cls_mean",)}


@dataclasses.dataclass(frozen=True)
class ViTClassifierArch(ViTConfig):
    """A classifier student's `arch` (family `vit`): the encoder's fields plus its head. Variants
    `vit` and `deit` run at `image_size`; the DINOv2 variants at any input size (their position
    embeddings are interpolated, as the released classifiers run at their processors' 224 crop)."""

    num_classes: int = 1000
    head: str | None = None  # None: the variant's usual head (cls; cls_mean for dinov2)

    def __post_init__(self):
        super().__post_init__()
        if self.head is None and self.variant in _VARIANT_HEADS:
            object.__setattr__(self, "head", _VARIANT_HEADS[self.variant][0])
        n = self.num_classes
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"num_classes must be a positive integer, got {n!r}")
        if self.head not in HEADS:
            raise ConfigError(f"head {self.head!r} is not supported; supported: {sorted(HEADS)}")
        if self.head not in _VARIANT_HEADS[self.variant]:
            raise ConfigError(f"head {self.head!r} does not go with variant {self.variant!r} (its transformers "
                              f"classifiers have head {' or '.join(map(repr, _VARIANT_HEADS[self.variant]))})")

    @property
    def in_channels(self) -> int:
        return self.num_channels

    def check_input_size(self, input_size) -> None:
        """ConfigError unless the input is image_size square (DINOv2: at least one patch each way), called
        by `parse_config`, so the error names the config file, and by the model."""
        if self.is_dinov2:
            if min(input_size) < self.patch_size:
                raise ConfigError(f"preprocessing.input_size {list(input_size)} must be at least one patch "
                                  f"({self.patch_size}) each way")
            return
        if tuple(input_size) != (self.image_size,) * 2:
            raise ConfigError(f"preprocessing.input_size {list(input_size)} must be the arch's image_size "
                              f"{[self.image_size] * 2} (position embeddings are not interpolated)")


class ViTForImageClassification(nnx.Module):
    """A transformers ViT / DeiT / DINOv2 image classifier: normalised [N, H, W, C] -> logits. The
    encoder sits under the checkpoint's own prefix (`vit`, `deit` or `dinov2`), so state-dict keys map 1:1."""

    def __init__(self, arch: ViTClassifierArch, *, input_size: tuple[int, int], rngs: nnx.Rngs):
        arch.check_input_size(input_size)
        self.arch = arch
        setattr(self, arch.variant, ViTModel(arch, rngs=rngs))
        d, c = arch.hidden_size, arch.num_classes
        if arch.head == "cls":
            self.classifier = nnx.Linear(d, c, rngs=rngs)
        elif arch.head == "cls_mean":
            self.classifier = nnx.Linear(2 * d, c, rngs=rngs)
        else:
            self.cls_classifier = nnx.Linear(d, c, rngs=rngs)
            self.distillation_classifier = nnx.Linear(d, c, rngs=rngs)

    def __call__(self, x):
        encoder = getattr(self, self.arch.variant)
        if self.arch.head == "cls":
            return self.classifier(encoder.last_hidden_state(x, tokens=1)[:, 0])
        if self.arch.head == "cls_mean":  # the patch tokens follow the class token and any registers
            h = encoder.last_hidden_state(x)
            patches = h[:, 1 + self.arch.num_register_tokens:]
            return self.classifier(jnp.concatenate([h[:, 0], patches.mean(axis=1)], axis=-1))
        h = encoder.last_hidden_state(x, tokens=2)
        return (self.cls_classifier(h[:, 0]) + self.distillation_classifier(h[:, 1])) / 2


__all__ = ["DINOV2_VARIANTS", "HEADS", "VARIANTS", "ViTClassifierArch", "ViTConfig", "ViTForImageClassification",
           "ViTModel", "abstract_vit", "bicubic_aa_matrix", "bicubic_matrix", "resize_position_grid"]
