"""Building blocks shared by the transformers-layout vision towers used as feature networks:
CLIP's (`kdd_jax.models.clip_vision`) and ViT / DINO / DINOv2 (`kdd_jax.models.vit`).

Pure pieces only: transformers' activation names, a bare `nn.Parameter` holder (so the generic key
map in `converters/keymap.py` maps it by its torch name), LayerNorm with torch's semantics, and
multi-head self-attention as an array function, and the config fields every tower shares. Inference only; dropout is the identity.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from kdd_jax.config import ConfigError

# transformers' ACT2FN names -> functions (the ones vision towers use)
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI's CLIP checkpoints
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # ViT, DINO, DINOv2, LAION's OpenCLIP conversions
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # transformers' tanh approximation
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class Parameter(nnx.Module):
    """A bare parameter that torch stores directly on its parent module (CLIP's `class_embedding`,
    ViT's `cls_token` / `position_embeddings`, DINOv2's `layer_scale1.lambda1`): its torch key is
    this module's own path (key map rule `""`)."""

    def __init__(self, shape: tuple[int, ...] | int, rngs: nnx.Rngs, scale: float = 0.02):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.value = nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32) * scale)


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """The fields every vision tower here shares, validated (ConfigError for a config that cannot
    describe a model). Subclasses set their checkpoints' defaults and add their own fields."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12

    def __post_init__(self):
        for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                  "image_size", "patch_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{f} must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                              f"{self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and 0 < eps < math.inf):
            raise ConfigError(f"layer_norm_eps must be a finite number > 0, got {eps!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def layer_norm(size: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """torch.nn.LayerNorm(size, eps): weight -> scale, bias -> bias (key map rule). The variance is
    E[(x - mean)^2], as torch computes it: flax's default E[x^2] - mean^2 loses ~3e-3 on tokens with
    a mean of 100 (real residual streams carry such offsets)."""
    return nnx.LayerNorm(size, epsilon=eps, use_fast_variance=False, rngs=rngs)


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    """Softmax(q k^T / sqrt(head_dim)) v over `heads` heads: q, k, v [N, T, D] (already projected)
    -> [N, T, D], heads concatenated in torch's order (view(N, T, heads, head_dim))."""
    n, t, d = q.shape
    hd = d // heads
    split = lambda z: z.reshape(n, t, heads, hd).transpose(0, 2, 1, 3)  # noqa: E731
    w = jax.nn.softmax(jnp.einsum("nhqd,nhkd->nhqk", split(q) * hd ** -0.5, split(k)), axis=-1)
    return jnp.einsum("nhqk,nhkd->nhqd", w, split(v)).transpose(0, 2, 1, 3).reshape(n, t, d)


__all__ = ["ACTIVATIONS", "Parameter", "TowerConfig", "layer_norm", "self_attention"]
