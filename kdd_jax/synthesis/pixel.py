"""Direct pixel optimisation of probes through the frozen student (DeepInversion-style):
L = bn_weight * L_BNS + ce_weight * CE(mixed labels) + tv_weight * TV + l2_weight * ||x||^2,
with the student's terms (BN statistics, CE) taken on what it sees: the probes plus fresh Gaussian noise of
std `aug_noise` each step (by default 1.0 for this method: an expectation over noise, so the class evidence
cannot rest on pixel-exact texture), after any jitter/flip.

Probes live in the student's normalised input space and are clipped after every step to the
range that `preprocessing.value_range` maps to, so they are always valid images. Independent
restarts are a leading axis handled by `jax.vmap` (shared student weights: fast on every
backend); each restart's BN statistics come from its own group of probes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kdd_jax.models import bn_running_stats, forward_with_bn_stats
from kdd_jax.synthesis.losses import bn_statistics_loss, mixed_label_targets, soft_cross_entropy, total_variation
from kdd_jax.synthesis.probes import (
    Checkpointer,
    ProbeSet,
    SynthesisConfig,
    normalised_bounds,
    require_batchnorm,
    run_loop,
)


def _adam(lr):
    return optax.adam(lr)


def _group_loss(graphdef, use_bn, consts, xg, tg):
    logits, stats = forward_with_bn_stats(nnx.merge(graphdef, consts["state"]), xg)
    w = consts["w"]
    bn_term = w[0] * bn_statistics_loss(stats, consts["running"]) if use_bn else 0.0
    return bn_term + w[1] * soft_cross_entropy(logits, tg) + w[2] * total_variation(xg) + w[3] * jnp.mean(xg**2)


def _augment(key, xs, jitter: int, flip: bool, noise: float = 0.0):
    """DeepInversion's jitter: the student sees each restart's probes shifted by a random
    (dy, dx) in [-jitter, jitter] (wrapping) and, with `flip`, mirrored left-right, so the probes
    cannot rely on pixel-exact high-frequency patterns (the main source of unnatural, adversarial
    texture). xs: [G, n, H, W, C]; one transform per restart group. With `noise`, then Gaussian
    noise of that std on every pixel (fresh each step), so the loss is an expectation over noise
    and the class evidence must survive it; every loss term sees the noisy view."""
    if noise:
        key, k_noise = jax.random.split(key)
        return _shift_flip(key, xs, jitter, flip) + noise * jax.random.normal(k_noise, xs.shape, xs.dtype)
    return _shift_flip(key, xs, jitter, flip)


def _shift_flip(key, xs, jitter: int, flip: bool):
    if jitter == 0 and not flip:
        return xs
    k_shift, k_flip = jax.random.split(key)
    g = xs.shape[0]
    shifts = jax.random.randint(k_shift, (g, 2), -jitter, jitter + 1)
    flips = jax.random.bernoulli(k_flip, 0.5, (g,)) & flip

    def one(x, sh, fl):
        x = jnp.roll(x, (sh[0], sh[1]), axis=(1, 2))
        return jnp.where(fl, x[:, :, ::-1], x)

    return jax.vmap(one)(xs, shifts, flips)


def _render(xs, hw: tuple[int, int]):
    """Probes at the student's resolution from parameters at a coarser one: bilinear upsampling
    (a convex combination of valid pixels, so clipped parameters give valid probes). Optimising a
    coarse grid is a smoothness prior: the probes cannot carry pixel-level adversarial texture."""
    if xs.shape[-3:-1] == hw:
        return xs
    return jax.image.resize(xs, (*xs.shape[:-3], *hw, xs.shape[-1]), "linear", antialias=False)


def _step(static, carry, consts):
    """One Adam step on every restart's probes (restarts vmapped, shared student weights)."""
    graphdef, use_bn, jitter, flip, hw, noise = static
    xs, opt_state, key = carry
    key, sub = jax.random.split(key)

    def total(xs):
        seen = _augment(sub, _render(xs, hw), jitter, flip, noise)
        losses = jax.vmap(lambda xg, tg: _group_loss(graphdef, use_bn, consts, xg, tg))(seen, consts["targets"])
        return losses.sum(), losses

    (_, losses), grads = jax.value_and_grad(total, has_aux=True)(xs)
    updates, opt_state = _adam(consts["lr"]).update(grads, opt_state, xs)
    xs = jnp.clip(optax.apply_updates(xs, updates), consts["lo"], consts["hi"])
    return (xs, opt_state, key), jnp.mean(losses)


def synthesize_pixels(model: nnx.Module, config, sc: SynthesisConfig,
                      progress: Callable[[int, float], None] | None = None, *, use_bn: bool = True,
                      checkpoint: Checkpointer | None = None) -> ProbeSet:
    """`use_bn=False` is the BN-free method ("confidence"): the student's confident agreement
    with mixed-label targets under smoothness and magnitude priors, for students without
    BatchNorm (LayerNorm nets, plain CNNs). Without the BN prior probes drift further from
    natural images, so prefer the BN methods whenever the student has BatchNorm."""
    if use_bn:
        require_batchnorm(model, sc.method)
    pre = config.preprocessing
    num_classes = config.arch.num_classes
    h, w = pre.input_size
    groups = sc.restarts
    per_group = math.ceil(sc.n_probes / groups)
    graphdef, state = nnx.split(model)
    lo, hi = normalised_bounds(pre)

    k_init, k_lab, k_aug = jax.random.split(jax.random.key(sc.seed), 3)
    ph, pw = math.ceil(h / sc.pixel_scale), math.ceil(w / sc.pixel_scale)
    x = jax.random.normal(k_init, (groups, per_group, ph, pw, pre.channels)) * sc.init_scale
    if sc.init == "low":  # start near the darkest valid pixel (e.g. a black background)
        x = lo + jnp.abs(x)
    x = jnp.clip(x, lo, hi)
    targets = jax.vmap(lambda k: mixed_label_targets(k, per_group, num_classes, mix=sc.mix_labels))(
        jax.random.split(k_lab, groups)
    )
    consts = {"state": state, "running": bn_running_stats(model), "targets": targets, "lo": lo, "hi": hi,
              "w": jnp.asarray([sc.bn_weight, sc.ce_weight, sc.tv_weight, sc.l2_weight], jnp.float32),
              "lr": jnp.float32(sc.lr if sc.lr is not None else 0.05)}
    (x, _, _), history = run_loop(_step, (graphdef, use_bn, sc.jitter, sc.flip, (h, w), sc.aug_noise),
                               (x, _adam(consts["lr"]).init(x), k_aug), consts, sc.steps,
                               sc.loop, progress, checkpoint)
    probes = np.asarray(_render(x, (h, w))).reshape(groups * per_group, h, w, pre.channels)[: sc.n_probes]
    return ProbeSet.from_normalised(probes, np.asarray(targets).reshape(-1, num_classes)[: sc.n_probes], pre, sc, history)
