"""diffusers' `UNet2DModel` (DDPM-style pixel-space UNet) in Flax NNX, with diffusers' parameter names.

The NNX graph paths are diffusers' state-dict prefixes ("down_blocks", 0, "resnets", 1, "norm1" is
`down_blocks.0.resnets.1.norm1.weight/bias`), so a diffusers checkpoint converts key for key through
the generic key map (`converters/keymap.py`, `converters/diffusers_unet.py`). Activations are NHWC
inside; the model maps a noisy NHWC sample, timesteps and (optionally) class labels to the model
output (noise, v or x0 prediction, as the scheduler config says), NHWC.

Supported: the config fields of `UNet2DConfig` below, with block types DownBlock2D / AttnDownBlock2D,
UpBlock2D / AttnUpBlock2D, the UNetMidBlock2D (with or without attention), positional (sinusoidal)
time embeddings and `num_class_embeds` class conditioning. Everything else (Fourier or learned time
embeddings, cross-attention blocks, resnet up/down samplers, "timestep"/"identity" class embeddings)
is refused with an error naming the config field and value: a variant must never be silently mis-built.

Class conditioning and classifier-free guidance. `class_embedding` is an `nn.Embedding(num_class_embeds,
time_embed_dim)` row added to the time embedding. diffusers has no built-in "null class"; the convention
used here (and by `kdd_jax.generative`) is the common one for class-conditional DDPMs trained with label
dropout: the table has one extra row, `num_class_embeds = num_classes + 1`, and the LAST row
(`num_class_embeds - 1`) is the null / unconditional class. A diffusers user expresses it as
`UNet2DModel(..., num_class_embeds=num_classes + 1)`, trains with labels replaced by `num_classes` with
probability p_uncond, and samples with `unet(x, t, class_labels=torch.full((n,), num_classes))` for the
unconditional branch. Another index can be passed explicitly (`null_class=`) to the samplers.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from kdd_jax.config import ConfigError, parse_dataclass, to_json_dict
from kdd_jax.models.layers import Dropout, conv2d, conv_general_dilated, he_uniform_init, linear

DIFFUSERS_CLASS_NAME = "UNet2DModel"
DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch nn.GELU is the exact erf form
    "relu": jax.nn.relu,
}
# field -> the only values this implementation builds (others exist in diffusers and are refused)
ONLY = {
    "time_embedding_type": ("positional",),
    "mid_block_type": ("UNetMidBlock2D", None),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "resnet_time_scale_shift": ("default", "scale_shift"),
    "class_embed_type": (None,),
    "act_fn": tuple(ACTIVATIONS),
}


@dataclasses.dataclass(frozen=True)
class UNet2DConfig:
    """`UNet2DModel`'s config.json fields, with diffusers' names and defaults (diffusers 0.42)."""

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    freq_shift: int | float = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: int | float = 1
    downsample_padding: int = 1
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    dropout: int | float = 0.0  # inference only: dropout is the identity whatever its rate
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int | None = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    num_train_timesteps: int | None = None  # only read by time_embedding_type="learned"

    def __post_init__(self):
        problems = []
        for name, allowed in ONLY.items():
            value = getattr(self, name)
            if value not in allowed:
                problems.append(f"{name}={value!r} is not supported (supported: {list(allowed)})")
        for name, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
            for i, block in enumerate(getattr(self, name)):
                if _block_name(block) not in allowed:
                    problems.append(f"{name}[{i}]={block!r} is not supported (supported: {list(allowed)})")
        n = len(self.block_out_channels)
        if n == 0 or len(self.down_block_types) != n or len(self.up_block_types) != n:
            problems.append(f"block_out_channels, down_block_types and up_block_types need the same non-zero length, "
                            f"got {n}, {len(self.down_block_types)}, {len(self.up_block_types)}")
        positive = {"in_channels": self.in_channels, "out_channels": self.out_channels,
                    "layers_per_block": self.layers_per_block, "time_embedding_dim": self.time_embedding_dim,
                    "num_class_embeds": self.num_class_embeds, "attention_head_dim": self.attention_head_dim,
                    "attn_norm_num_groups": self.attn_norm_num_groups}
        for name, value in positive.items():
            if value is not None and value < 1:
                problems.append(f"{name}={value!r} must be >= 1")
        if any(c < 1 for c in self.block_out_channels):
            problems.append(f"block_out_channels={list(self.block_out_channels)} must be >= 1")
        if self.norm_num_groups is None or self.norm_num_groups < 1:
            # diffusers builds its blocks with GroupNorm(None) and fails too
            problems.append(f"norm_num_groups={self.norm_num_groups!r} is not supported (need an integer >= 1)")
        elif any(c % self.norm_num_groups for c in self.block_out_channels):
            problems.append(f"norm_num_groups={self.norm_num_groups} does not divide every block_out_channels "
                            f"{list(self.block_out_channels)} (GroupNorm needs channels % groups == 0)")
        last = self.block_out_channels[-1] if self.block_out_channels else 0
        if self.attn_norm_num_groups and last % self.attn_norm_num_groups:
            problems.append(f"attn_norm_num_groups={self.attn_norm_num_groups} does not divide "
                            f"block_out_channels[-1]={self.block_out_channels[-1]}")
        if self.attention_head_dim is not None and self.block_out_channels:
            for i, (block, ch) in enumerate(zip(self.down_block_types, self.block_out_channels)):
                if _block_name(block) == "AttnDownBlock2D" and self.attention_head_dim > ch:
                    problems.append(f"attention_head_dim={self.attention_head_dim} exceeds block_out_channels[{i}]={ch} "
                                    "(an attention block would have 0 heads)")
        if self.norm_eps <= 0:
            problems.append(f"norm_eps={self.norm_eps!r} must be > 0")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout={self.dropout!r} must be in [0, 1)")
        if self.downsample_padding < 0:
            problems.append(f"downsample_padding={self.downsample_padding!r} must be >= 0")
        if self.mid_block_scale_factor <= 0:
            problems.append(f"mid_block_scale_factor={self.mid_block_scale_factor!r} must be > 0")
        if self.sample_size is not None:
            sizes = (self.sample_size,) * 2 if isinstance(self.sample_size, int) else self.sample_size
            if min(sizes) < 1:
                problems.append(f"sample_size={self.sample_size!r} must be >= 1")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    @property
    def input_hw(self) -> tuple[int, int] | None:
        if self.sample_size is None:
            return None
        return (self.sample_size,) * 2 if isinstance(self.sample_size, int) else tuple(self.sample_size)

    def to_dict(self) -> dict:
        return {"_class_name": DIFFUSERS_CLASS_NAME, **to_json_dict(self)}

    @classmethod
    def from_diffusers(cls, data, source: str = "config") -> "UNet2DConfig":
        """Parse a diffusers `config.json` dict. Keys starting with "_" (`_class_name`, `_diffusers_version`,
        `_name_or_path`, ...) are metadata; `_class_name`, when present, must be "UNet2DModel". Unknown
        fields are refused (diffusers would ignore them with a warning)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        name = data.get("_class_name", DIFFUSERS_CLASS_NAME)
        if name != DIFFUSERS_CLASS_NAME:
            raise ConfigError(f"{source}._class_name: {name!r} is not supported (supported: {DIFFUSERS_CLASS_NAME!r})")
        fields = {k: v for k, v in data.items() if not k.startswith("_")}
        return parse_dataclass(cls, fields, source)


def _block_name(block: str) -> str:
    # diffusers' get_down_block / get_up_block strip a "UNetRes" prefix
    return block[7:] if block.startswith("UNetRes") else block


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """diffusers' `get_timestep_embedding`: [N] (possibly fractional) timesteps -> [N, dim] float32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def group_norm(channels: int, groups: int, eps: float, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """torch.nn.GroupNorm(groups, channels, eps) on channels-last input. Two-pass variance, as torch."""
    return nnx.GroupNorm(channels, num_groups=groups, epsilon=eps, use_fast_variance=False, rngs=rngs)


class TimestepEmbedding(nnx.Module):
    """linear_1 -> SiLU -> linear_2 (the UNet always builds it with the default "silu")."""

    def __init__(self, in_features: int, dim: int, rngs: nnx.Rngs):
        self.linear_1 = linear(in_features, dim, rngs=rngs)
        self.linear_2 = linear(dim, dim, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class ResnetBlock2D(nnx.Module):
    """GroupNorm-act-conv, + time-embedding projection, GroupNorm-act-(dropout)-conv, shortcut,
    (x + h) / output_scale_factor. `scale_shift`: norm2(h) * (1 + scale) + shift instead of h + temb."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, *, eps: float, groups: int, act: str,
                 time_scale_shift: str, output_scale_factor: float, dropout: float, rngs: nnx.Rngs):
        self.act = ACTIVATIONS[act]
        self.time_scale_shift = time_scale_shift
        self.output_scale_factor = output_scale_factor
        self.norm1 = group_norm(in_ch, groups, eps, rngs)
        self.conv1 = conv2d(in_ch, out_ch, 3, padding=1, rngs=rngs)
        self.time_emb_proj = linear(temb_ch, out_ch * (2 if time_scale_shift == "scale_shift" else 1), rngs=rngs)
        self.norm2 = group_norm(out_ch, groups, eps, rngs)
        self.dropout = Dropout(dropout)
        self.conv2 = conv2d(out_ch, out_ch, 3, padding=1, rngs=rngs)
        self.conv_shortcut = conv2d(in_ch, out_ch, 1, rngs=rngs) if in_ch != out_ch else None

    def __call__(self, x, temb):
        h = self.conv1(self.act(self.norm1(x)))
        t = self.time_emb_proj(self.act(temb))[:, None, None, :]
        if self.time_scale_shift == "scale_shift":
            scale, shift = jnp.split(t, 2, axis=-1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + t)
        h = self.conv2(self.dropout(self.act(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Attention(nnx.Module):
    """diffusers' spatial self-attention (`Attention(..., _from_deprecated_attn_block=True)`):
    optional GroupNorm, multi-head softmax(q k^T / sqrt(d)) v over the H*W positions, to_out.0,
    + residual, / rescale_output_factor. Heads are channel-major, as diffusers splits them."""

    def __init__(self, channels: int, head_dim: int, *, groups: int | None, eps: float, rescale: float,
                 rngs: nnx.Rngs):
        self.heads = channels // head_dim
        self.head_dim = head_dim
        self.rescale = rescale
        inner = self.heads * head_dim
        self.group_norm = group_norm(channels, groups, eps, rngs) if groups is not None else None
        self.to_q = linear(channels, inner, rngs=rngs)
        self.to_k = linear(channels, inner, rngs=rngs)
        self.to_v = linear(channels, inner, rngs=rngs)
        self.to_out = nnx.List([linear(inner, channels, rngs=rngs), Dropout(0.0)])

    def __call__(self, x):
        n, h, w, c = x.shape
        residual = x
        if self.group_norm is not None:
            x = self.group_norm(x)
        x = x.reshape(n, h * w, c)
        split = lambda a: a.reshape(n, h * w, self.heads, self.head_dim)  # noqa: E731
        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k) * (self.head_dim ** -0.5)
        out = jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(scores, axis=-1), v)
        out = self.to_out[0](out.reshape(n, h * w, self.heads * self.head_dim)).reshape(n, h, w, c)
        return (out + residual) / self.rescale


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv (`downsamplers.0.conv`). padding=0 pads one zero row/column at the bottom/right
    first, as diffusers does (the original DDPM's asymmetric "SAME"-like downsampling)."""

    def __init__(self, channels: int, padding: int, rngs: nnx.Rngs):
        pad = ((0, 1), (0, 1)) if padding == 0 else ((padding, padding), (padding, padding))
        self.conv = nnx.Conv(channels, channels, (3, 3), strides=(2, 2), padding=pad,
                             conv_general_dilated=conv_general_dilated, kernel_init=he_uniform_init, rngs=rngs)

    def __call__(self, x):
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2 (F.interpolate(scale_factor=2, mode="nearest")) then a 3x3 conv."""

    def __init__(self, channels: int, rngs: nnx.Rngs):
        self.conv = conv2d(channels, channels, 3, padding=1, rngs=rngs)

    def __call__(self, x):
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


def _resnet(cfg: UNet2DConfig, in_ch: int, out_ch: int, rngs, scale: float = 1.0) -> ResnetBlock2D:
    return ResnetBlock2D(in_ch, out_ch, cfg.time_embed_dim, eps=cfg.norm_eps, groups=cfg.norm_num_groups,
                         act=cfg.act_fn, time_scale_shift=cfg.resnet_time_scale_shift,
                         output_scale_factor=scale, dropout=cfg.dropout, rngs=rngs)


def _attention(cfg: UNet2DConfig, ch: int, groups: int | None, rngs, rescale: float = 1.0) -> Attention:
    head_dim = cfg.attention_head_dim if cfg.attention_head_dim is not None else ch
    return Attention(ch, head_dim, groups=groups, eps=cfg.norm_eps, rescale=rescale, rngs=rngs)


class DownBlock(nnx.Module):
    """DownBlock2D / AttnDownBlock2D: resnets (each followed by an attention in the Attn variant),
    then an optional stride-2 downsampler. Returns the output and every intermediate (the skips)."""

    def __init__(self, cfg: UNet2DConfig, kind: str, in_ch: int, out_ch: int, add_downsample: bool, rngs):
        self.resnets = nnx.List([_resnet(cfg, in_ch if i == 0 else out_ch, out_ch, rngs)
                                 for i in range(cfg.layers_per_block)])
        self.attentions = nnx.List([_attention(cfg, out_ch, cfg.norm_num_groups, rngs)
                                    for _ in range(cfg.layers_per_block)] if kind == "AttnDownBlock2D" else [])
        self.downsamplers = nnx.List([Downsample2D(out_ch, cfg.downsample_padding, rngs)]) if add_downsample else None

    def __call__(self, x, temb):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if len(self.attentions):
                x = self.attentions[i](x)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nnx.Module):
    """UpBlock2D / AttnUpBlock2D: layers_per_block + 1 resnets, each on [x, skip] concatenated along
    channels (skips popped last-first), attention after each in the Attn variant, optional upsampler."""

    def __init__(self, cfg: UNet2DConfig, kind: str, in_ch: int, prev_out: int, out_ch: int, add_upsample: bool, rngs):
        n = cfg.layers_per_block + 1
        resnets = []
        for i in range(n):
            skip_ch = in_ch if i == n - 1 else out_ch
            resnets.append(_resnet(cfg, (prev_out if i == 0 else out_ch) + skip_ch, out_ch, rngs))
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List([_attention(cfg, out_ch, cfg.norm_num_groups, rngs)
                                    for _ in range(n)] if kind == "AttnUpBlock2D" else [])
        self.upsamplers = nnx.List([Upsample2D(out_ch, rngs)]) if add_upsample else None

    def __call__(self, x, skips: list, temb):
        for i, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips.pop()], axis=-1), temb)
            if len(self.attentions):
                x = self.attentions[i](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nnx.Module):
    """resnet, (attention, resnet); every piece scaled by mid_block_scale_factor. The attention has a
    GroupNorm with attn_norm_num_groups, or norm_num_groups when that is unset and the time embedding is
    "default"; with "scale_shift" and no attn_norm_num_groups diffusers builds it without a GroupNorm."""

    def __init__(self, cfg: UNet2DConfig, rngs):
        ch, scale = cfg.block_out_channels[-1], cfg.mid_block_scale_factor
        groups = cfg.attn_norm_num_groups
        if groups is None and cfg.resnet_time_scale_shift == "default":
            groups = cfg.norm_num_groups
        self.resnets = nnx.List([_resnet(cfg, ch, ch, rngs, scale), _resnet(cfg, ch, ch, rngs, scale)])
        self.attentions = nnx.List([_attention(cfg, ch, groups, rngs, scale)] if cfg.add_attention else [])

    def __call__(self, x, temb):
        x = self.resnets[0](x, temb)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x, temb)


class UNet2DModel(nnx.Module):
    """diffusers.UNet2DModel. `__call__(sample [N,H,W,C], timesteps scalar or [N], class_labels [N] int)`."""

    def __init__(self, config: UNet2DConfig, *, rngs: nnx.Rngs):
        cfg = self.config = config
        boc = cfg.block_out_channels
        self.conv_in = conv2d(cfg.in_channels, boc[0], 3, padding=1, rngs=rngs)
        self.time_embedding = TimestepEmbedding(boc[0], cfg.time_embed_dim, rngs)
        self.class_embedding = (nnx.Embed(cfg.num_class_embeds, cfg.time_embed_dim, rngs=rngs)
                                if cfg.num_class_embeds is not None else None)
        down, out_ch = [], boc[0]
        for i, kind in enumerate(cfg.down_block_types):
            in_ch, out_ch = out_ch, boc[i]
            down.append(DownBlock(cfg, _block_name(kind), in_ch, out_ch, i < len(boc) - 1, rngs))
        self.down_blocks = nnx.List(down)
        self.mid_block = UNetMidBlock2D(cfg, rngs) if cfg.mid_block_type is not None else None
        rev = boc[::-1]
        up, out_ch = [], rev[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev_out, out_ch = out_ch, rev[i]
            in_ch = rev[min(i + 1, len(boc) - 1)]
            up.append(UpBlock(cfg, _block_name(kind), in_ch, prev_out, out_ch, i < len(boc) - 1, rngs))
        self.up_blocks = nnx.List(up)
        self.conv_norm_out = group_norm(boc[0], cfg.norm_num_groups, cfg.norm_eps, rngs)
        self.conv_out = conv2d(boc[0], cfg.out_channels, 3, padding=1, rngs=rngs)

    def __call__(self, sample, timesteps, class_labels=None):
        cfg = self.config
        n, h, w, c = sample.shape
        if c != cfg.in_channels:
            raise ValueError(f"sample has {c} channels, the model takes in_channels={cfg.in_channels} (NHWC input)")
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if h % factor or w % factor:
            raise ValueError(f"sample size {h}x{w} is not a multiple of {factor} (2 ** (len(block_out_channels) - 1)); "
                             "the skip connections would not line up (diffusers fails the same way)")
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (n,))
        emb = self.time_embedding(timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels are required: the model is class-conditional (num_class_embeds="
                                 f"{cfg.num_class_embeds})")
            emb = emb + self.class_embedding(jnp.broadcast_to(jnp.asarray(class_labels).reshape(-1), (n,)))
        elif class_labels is not None:
            raise ValueError("class_labels given to an unconditional model (num_class_embeds is null)")
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, res = block(x, emb)
            skips.extend(res)
        if self.mid_block is not None:
            x = self.mid_block(x, emb)
        for block in self.up_blocks:
            x = block(x, skips, emb)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


@functools.partial(jax.jit, static_argnums=(0,))
def _apply(graphdef, state, sample, timesteps, class_labels):
    return nnx.merge(graphdef, state)(sample, timesteps, class_labels)


def unet_forward(model: UNet2DModel, sample, timesteps, class_labels=None) -> jax.Array:
    """The model's output for NHWC `sample`, jitted: compiled once per architecture and input shapes
    (the weights are an argument, not constants)."""
    graphdef, state = nnx.split(model)
    return _apply(graphdef, state, jnp.asarray(sample, jnp.float32), jnp.asarray(timesteps, jnp.float32),
                  None if class_labels is None else jnp.asarray(class_labels, jnp.int32))


def build_unet(config: UNet2DConfig, *, seed: int = 0) -> UNet2DModel:
    """A randomly initialised UNet (the converters fill it from a checkpoint)."""
    return UNet2DModel(config, rngs=nnx.Rngs(seed))


def abstract_unet(config: UNet2DConfig) -> UNet2DModel:
    """The UNet's structure with ShapeDtypeStruct leaves: no memory, no random init."""
    return nnx.eval_shape(lambda: UNet2DModel(config, rngs=nnx.Rngs(0)))
