"""Image-pair scores for generative students: the student and a teacher get the SAME initial
noise, and image i of the student is compared with image i of the teacher.

Images are float32 NHWC in [0, 1] (any H, W, C). As everywhere in `kdd_jax.scores`, higher =
closer and the functions are pure arrays-in, arrays-out, jittable.

Pair scores (`IMAGE_PAIR_SCORES`, uniform signature `fn(a, b, *, net=None) -> [N]`):
  neg_pixel_mse  -mean squared error per image pair.
  ssim           mean SSIM (Wang et al. 2004) per pair; scikit-image's `structural_similarity`
                 defaults (7x7 uniform window, sample covariance, mean over the 'valid' region
                 the window fits in), Gaussian window optional.
  neg_lpips      -LPIPS-style perceptual distance (Zhang et al. 2018) over a `FeatureNet`.

Set scores: the existing `SCORES["linear_cka" | "rbf_cka" | "acs" | "neg_mmd2"]` applied to
`net.embedding(student_images)` and `net.embedding(teacher_images)` ([N, d] each).

Honest note on the backbone. The paper used AlexNet-LPIPS for pairs and CLIP/DINO embeddings for
sets. This package works offline, so the default `FeatureNet` is a classifier from our own zoo
(`classifier_feature_net`: the outputs of its BatchNorm layers). Its distances are LPIPS-*style*,
not the published LPIPS numbers: without learned heads every channel weighs 1. CLIP's and DINO's
image embeddings, for the set scores, come from `clip_feature_net` / `vit_feature_net` over a
converted transformers CLIP / ViT (DINO) / DINOv2 checkpoint (`converters/clip_vision.py`,
`converters/vit.py`), for users who hold one.

AlexNet-LPIPS itself, for users who hold its weights (none ship with this package): convert
torchvision's ImageNet AlexNet as a student of family `alexnet` with LPIPS' input scaling as its
preprocessing (`examples/feature_nets/alexnet-lpips.json`), build `classifier_feature_net` on it
(an AlexNet has no BatchNorm: its features are the five ReLU outputs LPIPS compares) and add the
learned heads with `load_lpips_heads` (LPIPS' `alex.pth`, its own key names). On images of the
config's input size that is LPIPS v0.1 (`lpips.LPIPS(net="alex")`) to float32 rounding
(tests/test_image_scores.py checks it against a PyTorch reimplementation); smaller images, e.g.
28x28 Fashion-MNIST, are resized up first (AlexNet needs at least 63x63).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from typing import Callable, Sequence

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from kdd_jax.config import MAX_INPUT_SIDE
from kdd_jax.models.batchnorm import forward_with_bn_outputs

_LPIPS_EPS = 1e-10  # LPIPS' normalize_tensor eps


def _image_pair(a, b) -> tuple[jax.Array, jax.Array]:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    for name, x in (("a", a), ("b", b)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be images [N, H, W, C], got shape {x.shape}")
    if a.shape != b.shape:
        raise ValueError(f"a and b must be image pairs of one shape: {a.shape} != {b.shape}")
    return a, b


# ------------------------------------------------------------------------------- pixel MSE
@jax.jit
def neg_pixel_mse(a, b) -> jax.Array:
    """-mean((a - b)^2) per image pair -> [N]; 0 for identical images, negative otherwise."""
    a, b = _image_pair(a, b)
    return -jnp.mean(jnp.square(a - b), axis=(1, 2, 3))


# ------------------------------------------------------------------------------------ SSIM
def _window_1d(win_size: int, gaussian_sigma: float | None) -> np.ndarray:
    if gaussian_sigma is None:
        return np.full(win_size, 1.0 / win_size)
    if gaussian_sigma <= 0:
        raise ValueError(f"gaussian_sigma must be > 0, got {gaussian_sigma}")
    r = np.arange(win_size) - (win_size - 1) / 2
    g = np.exp(-0.5 * (r / gaussian_sigma) ** 2)
    return g / g.sum()


def _valid_filter(x: jax.Array, g: np.ndarray) -> jax.Array:
    """Separable 'valid' filtering of [N, H, W, C] along H then W with the 1-D window g."""
    k = len(g)
    ho, wo = x.shape[1] - k + 1, x.shape[2] - k + 1
    x = sum(float(g[i]) * x[:, i: i + ho] for i in range(k))
    return sum(float(g[i]) * x[:, :, i: i + wo] for i in range(k))


@functools.partial(jax.jit, static_argnames=("win_size", "gaussian_sigma", "use_sample_covariance"))
def ssim(a, b, *, data_range=1.0, win_size: int = 7, gaussian_sigma: float | None = None,
         k1=0.01, k2=0.03, use_sample_covariance: bool = True) -> jax.Array:
    """Mean SSIM per image pair -> [N], per channel then averaged over channels.

    Local statistics come from a win_size x win_size window: uniform by default, Gaussian with
    `gaussian_sigma` (Wang et al.: sigma 1.5, win_size 11, use_sample_covariance=False). Local
    (co)variances are scaled by NP / (NP - 1), NP = win_size^2, when `use_sample_covariance`
    (scikit-image's default, also with its Gaussian window). The mean is over the positions where
    the whole window fits (scikit-image crops (win_size - 1) // 2 pixels per border, which is
    the same region), so no padding convention enters. C1 = (k1 R)^2, C2 = (k2 R)^2, R =
    `data_range`. 1 for identical images; in [-1, 1].
    """
    a, b = _image_pair(a, b)
    if win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be a positive odd integer, got {win_size}")
    h, w = a.shape[1:3]
    if h < win_size or w < win_size:
        raise ValueError(f"images are {h}x{w}, smaller than the {win_size}x{win_size} SSIM window; "
                         f"pass a smaller odd win_size")
    c = a.shape[-1]
    # Why shift by each image's mean first: (co)variances are shift-invariant, and E[x^2] - E[x]^2
    # on small centred values loses far fewer float32 digits (C2 ~ 1e-3 R^2 magnifies the loss).
    ma, mb = jnp.mean(a, axis=(1, 2), keepdims=True), jnp.mean(b, axis=(1, 2), keepdims=True)
    a0, b0 = a - ma, b - mb
    stats = _valid_filter(jnp.concatenate([a0, b0, a0 * a0, b0 * b0, a0 * b0], axis=-1),
                          _window_1d(win_size, gaussian_sigma))
    ux0, uy0, uxx, uyy, uxy = (stats[..., i * c: (i + 1) * c] for i in range(5))
    n_px = win_size * win_size
    cov_norm = n_px / (n_px - 1) if use_sample_covariance else 1.0
    vx, vy = cov_norm * (uxx - ux0 * ux0), cov_norm * (uyy - uy0 * uy0)
    vxy = cov_norm * (uxy - ux0 * uy0)
    ux, uy = ux0 + ma, uy0 + mb
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return jnp.mean(s, axis=(1, 2, 3))  # = mean over channels of each channel's mean


# ------------------------------------------------------------------------------ FeatureNet
@dataclasses.dataclass(frozen=True, eq=False)
class FeatureNet:
    """A frozen feature extractor for perceptual distances and image embeddings.

    `apply(params, images)` is a jitted callable: images NHWC in [0, 1] -> list of feature maps
    [N, h_l, w_l, c_l], one per entry of `layers` (`channels[l]` = c_l). `params` are device
    arrays passed as an argument (jit compiles once per input shape, never per call). `heads`:
    optional per-layer non-negative channel weights used by `neg_lpips` when none are passed.
    `spec`: whatever else decides the features that `params` do not hold, as text (for a
    classifier: its config, preprocessing included); part of `fingerprint`.
    Build one from a kdd-jax classifier with `classifier_feature_net`, or from any jitted function.
    """

    name: str
    apply: Callable
    params: object
    layers: tuple[str, ...]
    channels: tuple[int, ...]
    heads: tuple[jax.Array, ...] | None = None
    spec: str = ""
    batch: int = 256  # images per call of `apply`: bounds activation memory for large probe sets

    def __post_init__(self):
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"batch must be a positive integer, got {self.batch!r}")

    def features(self, images) -> list[jax.Array]:
        """Feature maps [N, h, w, c] of the layers in `layers`, in that order (computed `batch`
        images at a time: at most two compiled shapes)."""
        images = jnp.asarray(images, jnp.float32)
        if images.ndim < 1 or len(images) <= self.batch:
            return list(self.apply(self.params, images))
        parts = [self.apply(self.params, images[i: i + self.batch]) for i in range(0, len(images), self.batch)]
        return [jnp.concatenate(layer) for layer in zip(*parts)]

    def embedding(self, images) -> jax.Array:
        """[N, c_last]: the LAST layer of `layers`, global-average-pooled over space."""
        return jnp.mean(self.features(images)[-1], axis=(1, 2))

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of what decides the features: `spec` (a classifier's config: architecture and
        preprocessing), layer names, parameters and LPIPS heads (not `name`, a label). Calibrations
        and audit records store it to refuse another network."""
        h = hashlib.sha256(json.dumps([self.spec, list(self.layers), list(self.channels)]).encode())
        for leaf in jax.tree.leaves(self.params) + list(self.heads or ()):
            a = np.asarray(leaf)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(b"heads" if self.heads is not None else b"no-heads")
        return h.hexdigest()

    def with_heads(self, heads: Sequence) -> "FeatureNet":
        """The same net (same compiled forward) with LPIPS heads, one [c_l] array per layer."""
        heads = tuple(jnp.asarray(w, jnp.float32) for w in heads)
        _check_weights(heads, self.channels)
        return dataclasses.replace(self, heads=heads)


def _bn_output_shapes(graphdef, state, shape) -> tuple[list[str], dict]:
    """BN layer names in call order and their output shapes, shape-only (no compute)."""
    order: list[str] = []

    def probe(st, x):
        _, outs = forward_with_bn_outputs(nnx.merge(graphdef, st), x)
        order.extend(outs)  # trace time: the dict is still in call order here
        return outs

    shapes = jax.eval_shape(probe, state, jax.ShapeDtypeStruct(shape, jnp.float32))
    return order, shapes


def default_feature_layers(order: Sequence[str], shapes: dict) -> list[str]:
    """The last BN layer run at each spatial resolution (consecutive runs of one [h, w], in call
    order), skipping ResNet projection shortcuts ("downsample") where the run has another BN:
    e.g. the last block's final BN of every ResNet stage, the BN before each VGG max-pool, the
    transition BN of each DenseNet stage and its final norm."""
    runs: list[list[str]] = []
    for name in order:
        if runs and shapes[runs[-1][-1]].shape[1:3] == shapes[name].shape[1:3]:
            runs[-1].append(name)
        else:
            runs.append([name])
    return [([n for n in run if "downsample" not in n.split(".")] or run)[-1] for run in runs]


def _to_model_input(images: jax.Array, pre) -> jax.Array:
    """[0, 1] NHWC images -> the classifier's normalised input: bilinear resize to input_size
    (jax.image.resize, antialiased when shrinking), grey -> C channels by repetition, mapped to
    value_range, then (x - mean) / std as the predict paths do."""
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
    n, h, w, c = images.shape
    if c not in (1, pre.channels):
        raise ValueError(f"images have {c} channels; the feature net's model takes {pre.channels} (or 1)")
    size = tuple(pre.input_size)
    if (h, w) != size:
        images = jax.image.resize(images, (n, *size, c), method="bilinear")
    images = jnp.broadcast_to(images, (n, *size, pre.channels))
    lo, hi = pre.value_range
    x = lo + images * (hi - lo)
    return (x - jnp.asarray(pre.mean, jnp.float32)) / jnp.asarray(pre.std, jnp.float32)


def _feature_map_shapes(graphdef, state, shape) -> tuple[list[str], dict]:
    """For a model with its own `feature_maps` (AlexNet): its layer names in call order and
    output shapes, shape-only."""
    order: list[str] = []

    def probe(st, x):
        outs = nnx.merge(graphdef, st).feature_maps(x)
        order.extend(outs)
        return outs

    shapes = jax.eval_shape(probe, state, jax.ShapeDtypeStruct(shape, jnp.float32))
    return order, shapes


def classifier_feature_net(model: nnx.Module, config, layers: Sequence[str] | None = None, *,
                           name: str | None = None) -> FeatureNet:
    """A `FeatureNet` over a kdd-jax classifier: the OUTPUTS of its BatchNorm2d layers, or, for a
    family without BatchNorm that defines `feature_maps` (AlexNet), those maps (its five ReLU
    outputs, AlexNet-LPIPS' layers).

    `layers`: layer names (PyTorch naming, e.g. "layer2.0.bn2", "features.4"), in the order
    wanted; None = `default_feature_layers` (last BN of each resolution stage) or every map
    `feature_maps` returns. Input images of any size are resized to the config's input_size (see
    `_to_model_input`)."""
    pre = config.preprocessing
    graphdef, state = nnx.split(model)
    shape = (1, *pre.input_size, pre.channels)
    order, shapes = _bn_output_shapes(graphdef, state, shape)
    kind = "BatchNorm"
    if not order and hasattr(model, "feature_maps"):
        order, shapes = _feature_map_shapes(graphdef, state, shape)
        kind = "feature-map"
        default = list(order)
    elif not order:
        raise ValueError(f"model ({config.family}) has no BatchNorm2d layers; build a FeatureNet "
                         f"from another network")
    else:
        default = default_feature_layers(order, shapes)
    layers = tuple(default if layers is None else layers)
    if not layers:
        raise ValueError(f"layers must name at least one {kind} layer")
    unknown = [n for n in layers if n not in shapes]
    if unknown:
        raise ValueError(f"layers: unknown {kind} layer(s) {unknown}; known: {order}")

    def apply(st, images):
        # full float32 on every device (GPUs may otherwise run f32 matmuls/convs in TF32): a score's
        # value, and a calibration made on one device and used on another, must not depend on it
        with jax.default_matmul_precision("highest"):
            m, x = nnx.merge(graphdef, st), _to_model_input(images, pre)
            outs = m.feature_maps(x) if kind == "feature-map" else forward_with_bn_outputs(m, x)[1]
            return [outs[n] for n in layers]

    tag = "bn" if kind == "BatchNorm" else "relu"
    return FeatureNet(name=name or f"{config.family}-{tag}{len(layers)}", apply=jax.jit(apply),
                      params=state, layers=layers, channels=tuple(int(shapes[n].shape[-1]) for n in layers),
                      spec=json.dumps(config.to_dict(), sort_keys=True))


def _encoder_feature_net(model: nnx.Module, mean: Sequence[float], std: Sequence[float], resize: str, *,
                         layer: str, channels: int, kind: str, name: str, size: int | None = None) -> FeatureNet:
    """A `FeatureNet` over an image encoder whose `__call__` maps normalised RGB images of
    `model.config.image_size` to one embedding [N, P]: a single layer [N, 1, 1, P], so `embedding` is
    that vector. Images [0, 1] of any size and 1 or 3 channels are resized with `resize` (a
    jax.image.resize method; antialiased when shrinking), repeated to RGB and normalised."""
    cfg = model.config
    native = size is None
    size = cfg.image_size if native else size
    mean_a, std_a = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    graphdef, state = nnx.split(model)

    def apply(st, images):
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"images must be [N, H, W, 1 or 3], got shape {images.shape}")
        n, h, w, c = images.shape
        with jax.default_matmul_precision("highest"):  # as classifier_feature_net: no TF32 on GPUs
            if (h, w) != (size, size):
                images = jax.image.resize(images, (n, size, size, c), method=resize)
            x = (jnp.broadcast_to(images, (n, size, size, 3)) - mean_a) / std_a
            return [nnx.merge(graphdef, st)(x)[:, None, None, :]]

    spec = {kind: dataclasses.asdict(cfg), "mean": list(map(float, mean)), "std": list(map(float, std))}
    if (kind, resize) != ("clip_vision", "cubic"):  # CLIP's nets made before `resize` existed keep their fingerprint
        spec["resize"] = resize
    if not native:  # another embedding than the native size's: another fingerprint (nets at image_size keep theirs)
        spec["size"] = size
    spec = json.dumps(spec, sort_keys=True)
    return FeatureNet(name=name, apply=jax.jit(apply), params=state, layers=(layer,), channels=(channels,),
                      spec=spec, batch=64)


def clip_feature_net(model: nnx.Module, mean: Sequence[float], std: Sequence[float], *,
                     name: str | None = None, resize: str = "cubic") -> FeatureNet:
    """A `FeatureNet` over CLIP's vision tower (`kdd_jax.models.clip_vision.CLIPVisionModel`, e.g.
    from `converters.clip_vision.convert_clip_vision`, whose result gives `mean`, `std`, `resize`):
    one layer [N, 1, 1, P], "image_embeds" (the projected class token, CLIP's image embedding) or, for
    a checkpoint without `visual_projection` (a CLIPVisionModel), "pooler_output" (the class token
    after post_layernorm), so the set scores compare the sets as the paper did. Images of any size
    are resized to the tower's image_size (CLIP's processor resizes the short side with PIL and
    center-crops: the same for square images up to the resampling filter's rounding)."""
    from kdd_jax.models.clip_vision import embedding_dim

    cfg = model.config
    return _encoder_feature_net(model, mean, std, resize, kind="clip_vision", channels=embedding_dim(cfg),
                                layer="image_embeds" if cfg.projection_dim is not None else "pooler_output",
                                name=name or f"clip-vit-p{cfg.patch_size}")


def vit_feature_net(model: nnx.Module, mean: Sequence[float], std: Sequence[float], *,
                    name: str | None = None, resize: str | None = None, size: int | None = None) -> FeatureNet:
    """A `FeatureNet` over a ViT / DINO / DINOv2 encoder (`kdd_jax.models.vit.ViTModel`, e.g. from
    `converters.vit.convert_vit`, whose result gives `mean`, `std`, `resize`): one layer
    "cls_token" [N, 1, 1, hidden_size], the class token of the last hidden state (DINO's image
    embedding). Images of any size are resized to the checkpoint's own image_size (224 for DINO,
    518 for the released DINOv2 checkpoints), where transformers' forward needs no position-embedding
    interpolation; transformers' DINOv2 processor would instead crop to 224 and interpolate (the
    encoder can: `ViTModel` interpolates DINOv2's position embeddings for other sizes, as DINOv2
    classifier students use; this feature net keeps the native size its embeddings were measured at).
    `resize` None = the image processor's default filter: bilinear for ViT (DINO), bicubic for DINOv2
    (`convert_vit` reads the folder's own). `size` (DINOv2 only): embed at size x size instead, through
    interpolated position embeddings, e.g. 224 (the released processors' crop; 257 tokens for ViT-S/14
    against 1,370 at 518: 8.5x faster on 2 CPU cores, benchmarks/results/encoder_cost.md). Images are
    resized to it whole, not cropped; the size is part of the fingerprint."""
    cfg = model.config
    resize = resize or ("linear" if cfg.variant == "vit" else "cubic")
    if size is not None:
        if not cfg.is_dinov2:
            raise ValueError(f"size {size}: only DINOv2 encoders interpolate their position embeddings; a "
                             f"{cfg.variant} encoder embeds at its image_size {cfg.image_size}")
        if isinstance(size, bool) or not isinstance(size, int) or not cfg.patch_size <= size <= MAX_INPUT_SIDE:
            raise ValueError(f"size must be an integer from the patch size {cfg.patch_size} to {MAX_INPUT_SIDE}, "
                             f"got {size!r}")
    return _encoder_feature_net(model, mean, std, resize, kind="vit", channels=cfg.hidden_size, layer="cls_token",
                                name=name or f"{cfg.variant}-p{cfg.patch_size}", size=size)


# ----------------------------------------------------------------------------------- LPIPS
def _check_weights(weights: Sequence, channels: Sequence[int]) -> None:
    if len(weights) != len(channels):
        raise ValueError(f"weights: {len(weights)} arrays for {len(channels)} layers")
    for i, (wt, c) in enumerate(zip(weights, channels)):
        if tuple(wt.shape) != (c,):
            raise ValueError(f"weights[{i}] must be [{c}] (the layer's channels), got shape {tuple(wt.shape)}")


def _unit(f: jax.Array) -> jax.Array:
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + _LPIPS_EPS)


@jax.jit
def lpips_distance(feats_a, feats_b, *, weights=None) -> jax.Array:
    """LPIPS (Zhang et al. 2018) between feature lists -> [N]; 0 for identical, >= 0.

    Per layer l: unit-normalise each spatial position's channel vector, square the difference,
    weight channel c by weights[l][c] (the learned linear heads; non-negative; None = all 1),
    sum over channels, average over space; then sum over layers."""
    if len(feats_a) != len(feats_b) or not feats_a:
        raise ValueError(f"feats_a and feats_b must list the same layers: {len(feats_a)} != {len(feats_b)}")
    for i, (fa, fb) in enumerate(zip(feats_a, feats_b)):
        if fa.ndim != 4:
            raise ValueError(f"feats_a[{i}] must be [N, h, w, c], got shape {fa.shape}")
        if fa.shape != fb.shape:
            raise ValueError(f"feats_b[{i}] shape {fb.shape} != feats_a[{i}] shape {fa.shape}")
    if weights is not None:
        _check_weights(weights, [f.shape[-1] for f in feats_a])
    total = 0.0
    for i, (fa, fb) in enumerate(zip(feats_a, feats_b)):
        d = jnp.square(_unit(fa.astype(jnp.float32)) - _unit(fb.astype(jnp.float32)))
        if weights is not None:
            d = d * weights[i]
        total = total + jnp.mean(jnp.sum(d, axis=-1), axis=(1, 2))
    return total


def neg_lpips(net: FeatureNet, a, b, weights=None) -> jax.Array:
    """-LPIPS over `net.features` per image pair -> [N] (one forward of the 2N images).
    `weights` default to `net.heads` (None: unweighted)."""
    a, b = _image_pair(a, b)
    feats = net.features(jnp.concatenate([a, b]))
    n = a.shape[0]
    return -lpips_distance([f[:n] for f in feats], [f[n:] for f in feats],
                           weights=net.heads if weights is None else weights)


_LPIPS_KEY = re.compile(r"^lin(\d+)\.model\.[01]\.weight$")  # LPIPS' own names (with/without dropout)


def load_lpips_heads(path, net: FeatureNet, *, allow_pickle: bool = False) -> list[jax.Array]:
    """Per-layer LPIPS heads -> one [c_i] array per layer of `net`, checked against `net.channels`;
    finite and non-negative.

    `path`: a safetensors file with keys `lin{i}` ([c_i] or LPIPS' [1, c_i, 1, 1] conv layout) or
    LPIPS' own state-dict names `lin{i}.model.1.weight`; or, only with `allow_pickle=True`, LPIPS'
    released `.pth` file itself, read with torch.load(weights_only=True) (needs PyTorch)."""
    from pathlib import Path

    from kdd_jax.io import read_safetensors

    path = Path(path)
    if path.suffix == ".safetensors":
        tensors, _ = read_safetensors(path)  # the strict reader: a damaged file is an error naming it
    else:
        from converters.student import PICKLE_SUFFIXES, read_pickle  # same distribution; torch only here

        if path.suffix not in PICKLE_SUFFIXES:
            raise ValueError(f"{path}: LPIPS heads must be a .safetensors file (or a .pth with allow_pickle)")
        if not allow_pickle:
            raise ValueError(f"{path}: pickle file refused (unpickling can run arbitrary code); convert it to "
                             "safetensors once (examples/feature_nets/README.md), or in Python pass "
                             "allow_pickle=True to read it with torch.load(weights_only=True)")
        tensors = read_pickle(path)
    renamed = {}
    for k, v in tensors.items():
        m = _LPIPS_KEY.match(k)
        key = f"lin{m.group(1)}" if m else k
        if key in renamed:
            raise ValueError(f"{path}: key {k!r} gives head {key!r} twice")
        renamed[key] = v
    tensors = renamed
    expected = {f"lin{i}" for i in range(len(net.channels))}
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ValueError(f"{path}: unexpected key(s) {extra}; {net.name} has {len(net.channels)} layers "
                         f"(lin0..lin{len(net.channels) - 1})")
    heads = []
    for i, c in enumerate(net.channels):
        key = f"lin{i}"
        if key not in tensors:
            raise ValueError(f"{path}: missing key {key!r} (layer {net.layers[i]}, {c} channels)")
        wt = np.asarray(tensors[key], np.float32)
        if wt.shape not in ((c,), (1, c, 1, 1)):
            raise ValueError(f"{path}: key {key!r} has shape {wt.shape}, but layer {net.layers[i]} has {c} channels")
        if not np.all(np.isfinite(wt)) or np.any(wt < 0):
            raise ValueError(f"{path}: key {key!r} must hold finite non-negative weights")
        heads.append(jnp.asarray(wt.reshape(c)))
    return heads


# ---------------------------------------------------------------- consensus-residual scores
@jax.jit
def residual_corr(student, teachers) -> jax.Array:
    """Consensus-residual correlation -> [K, N]: per probe n and teacher k, the Pearson correlation
    over pixels of (student_n - c_n) and (teacher_kn - c_n), c_n the mean of the K teachers' images.

    Why: diffusion models trained on the same data map the same x_T to nearly the same image (on the
    Fashion-MNIST zoo teacher-teacher SSIM is 0.68-0.70, above most student-teacher pairs), so
    plain distances mostly measure image quality. What a distilled student inherits is its teacher's
    *departure* from what every model would draw; the consensus takes out the shared part (the image
    analogue of dropping the shared top-1 in `dark_corr`). Needs K >= 2 candidates (with K = 2 the two
    residuals are opposite, so the score is antisymmetric). student [N, H, W, C], teachers [K, N, H, W, C]."""
    s = jnp.asarray(student, jnp.float32)
    t = jnp.asarray(teachers, jnp.float32)
    if t.ndim != 5 or t.shape[1:] != s.shape:
        raise ValueError(f"teachers must be [K, *student.shape] = [K, {', '.join(map(str, s.shape))}], got {t.shape}")
    if t.shape[0] < 2:
        raise ValueError("residual_corr needs at least 2 teachers (the consensus of one teacher is itself)")
    c = t.mean(axis=0)
    a = (s - c).reshape(s.shape[0], -1)
    b = (t - c).reshape(t.shape[0], t.shape[1], -1)
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    num = jnp.sum(a[None] * b, axis=-1)
    den = jnp.sqrt(jnp.sum(a * a, axis=-1)[None] * jnp.sum(b * b, axis=-1))
    return num / jnp.maximum(den, 1e-12)


# Scores of the student against ALL teachers at once: fn(student [N,...], teachers [K, N, ...]) -> [K, N]
IMAGE_CONSENSUS_SCORES: dict[str, Callable] = {"resid_corr": residual_corr}


# ------------------------------------------------------------------------------ registry
def _pair_neg_lpips(a, b, *, net: FeatureNet | None = None) -> jax.Array:
    if net is None:
        raise ValueError("neg_lpips needs net= (a FeatureNet, e.g. classifier_feature_net(model, config))")
    return neg_lpips(net, a, b)


def _pair_ssim(a, b, *, net=None) -> jax.Array:
    return ssim(a, b)


def _pair_neg_pixel_mse(a, b, *, net=None) -> jax.Array:
    return neg_pixel_mse(a, b)


IMAGE_PAIR_SCORES: dict[str, Callable] = {
    "neg_lpips": _pair_neg_lpips,
    "ssim": _pair_ssim,
    "neg_pixel_mse": _pair_neg_pixel_mse,
}

__all__ = [
    "FeatureNet", "IMAGE_CONSENSUS_SCORES", "IMAGE_PAIR_SCORES", "classifier_feature_net", "default_feature_layers",
    "clip_feature_net", "load_lpips_heads", "lpips_distance", "neg_lpips", "neg_pixel_mse", "residual_corr", "ssim",
    "vit_feature_net",
]
