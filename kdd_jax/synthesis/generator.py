"""Generator-based probe synthesis through the frozen student (GDFQ / Qimera family):

    min_phi  bn_weight * L_BNS(student on G_phi(z, w))  +  ce_weight * sum_i w_i CE(student(G_phi(z, w)), y_i)

With `aug_noise` > 0 the student sees every generated batch plus fresh Gaussian noise of that std
(normalised units) during training, as pixel synthesis does: the generator must produce class evidence
that survives the noise; the probes it then makes are clean.

G_phi is a DCGAN-style generator conditioned on soft class targets w (mixed labels): the noise z is
multiplied by a linear embedding of w (the soft version of GDFQ's nn.Embedding, so label mixtures
embed as the same mixture of class codes). Its BatchNorm layers always normalise with batch
statistics (as GDFQ's generator does in train mode); their running averages are tracked as state
but never used. The output passes tanh, an affine-free BatchNorm (GDFQ's output normalisation), a
crop to the student's input size, and a clip to the student's valid normalised range, so every
probe is a valid image.

Training is a pure functional step over (generator params, generator BN state, Adam state, key),
jitted and driven by `probes.run_loop`; the student (graphdef static, weights traced) is never baked in as a constant.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kdd_jax.models import bn_running_stats, forward_with_bn_stats
from kdd_jax.synthesis.losses import bn_statistics_loss, mixed_label_targets, soft_cross_entropy
from kdd_jax.synthesis.probes import (
    Checkpointer,
    ProbeSet,
    SynthesisConfig,
    normalised_bounds,
    require_batchnorm,
    run_loop,
)


def _upsample2(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2 upsampling of NHWC."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Generator(nnx.Module):
    """z [B, z_dim], soft targets w [B, C] -> images [B, H, W, channels] in normalised space
    (before the student's range clip, which `synthesize_generator` applies)."""

    def __init__(self, z_dim: int, num_classes: int, out_hw: tuple[int, int], channels: int, *,
                 width: int = 64, rngs: nnx.Rngs):
        self.out_hw = (int(out_hw[0]), int(out_hw[1]))
        self.h0, self.w0 = math.ceil(self.out_hw[0] / 4), math.ceil(self.out_hw[1] / 4)
        self.c0 = 2 * width
        # Soft label embedding: w @ E, E initialised N(0, 1) like torch nn.Embedding.
        self.embed = nnx.Linear(num_classes, z_dim, use_bias=False,
                                kernel_init=nnx.initializers.normal(1.0), rngs=rngs)
        self.fc = nnx.Linear(z_dim, self.h0 * self.w0 * self.c0, rngs=rngs)
        self.bn0 = nnx.BatchNorm(self.c0, momentum=0.9, rngs=rngs)
        self.conv1 = nnx.Conv(self.c0, self.c0, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.bn1 = nnx.BatchNorm(self.c0, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(self.c0, width, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.bn2 = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
        self.conv3 = nnx.Conv(width, channels, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.bn_out = nnx.BatchNorm(channels, use_bias=False, use_scale=False, momentum=0.9, rngs=rngs)

    def __call__(self, z: jax.Array, w: jax.Array) -> jax.Array:
        h = z * self.embed(w)
        h = self.fc(h).reshape(z.shape[0], self.h0, self.w0, self.c0)
        h = self.bn0(h, use_running_average=False)
        h = self.conv1(_upsample2(h))
        h = jax.nn.leaky_relu(self.bn1(h, use_running_average=False), 0.2)
        h = self.conv2(_upsample2(h))
        h = jax.nn.leaky_relu(self.bn2(h, use_running_average=False), 0.2)
        h = jnp.tanh(self.conv3(h))
        h = self.bn_out(h, use_running_average=False)
        return h[:, : self.out_hw[0], : self.out_hw[1]]


# The generator's static structure: (generator graphdef, student graphdef, z_dim, classes, batch, mix,
# aug_noise).
# Module-level pure functions keyed on it compile once per architecture, not once per student.


def _generate(static, params, stats, key, lo, hi, n):
    """n probes (clipped to the valid range), their targets, and the generator's updated BN state."""
    g_graphdef, _, z_dim, num_classes, _, mix, _ = static
    kz, kw = jax.random.split(key)
    z = jax.random.normal(kz, (n, z_dim))
    tg = mixed_label_targets(kw, n, num_classes, mix=mix)
    g = nnx.merge(g_graphdef, params, stats, copy=True)
    x = jnp.clip(g(z, tg), lo, hi)
    return x, tg, nnx.state(g, nnx.BatchStat)


def _adam(lr):
    return optax.adam(lr, b1=0.5, b2=0.999)


def _step(static, carry, consts):
    _, s_graphdef, _, _, bs, _, noise = static
    params, stats, opt_state, key = carry
    key, sub = jax.random.split(key)

    def loss_fn(params, stats):
        if noise:  # the student sees each batch under fresh Gaussian noise (as pixel's aug_noise)
            k_gen, k_noise = jax.random.split(sub)
            x, tg, new_stats = _generate(static, params, stats, k_gen, consts["lo"], consts["hi"], bs)
            x = x + noise * jax.random.normal(k_noise, x.shape, x.dtype)
        else:  # the key stream of generators trained before aug_noise existed
            x, tg, new_stats = _generate(static, params, stats, sub, consts["lo"], consts["hi"], bs)
        logits, bstats = forward_with_bn_stats(nnx.merge(s_graphdef, consts["state"], copy=True), x)
        w = consts["w"]
        return w[0] * bn_statistics_loss(bstats, consts["running"]) + w[1] * soft_cross_entropy(logits, tg), new_stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats)
    updates, opt_state = _adam(consts["lr"]).update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, stats, opt_state, key), loss


@functools.partial(jax.jit, static_argnums=(0,))
def _probe_batch(static, params, stats, key, lo, hi):
    x, tg, _ = _generate(static, params, stats, key, lo, hi, static[4])
    return x, tg


def synthesize_generator(model: nnx.Module, config, sc: SynthesisConfig,
                         progress: Callable[[int, float], None] | None = None, *,
                         checkpoint: Checkpointer | None = None) -> ProbeSet:
    require_batchnorm(model, sc.method)
    pre = config.preprocessing
    num_classes = config.arch.num_classes
    h, w = pre.input_size
    lo, hi = normalised_bounds(pre)
    s_graphdef, s_state = nnx.split(model)
    bs = sc.batch_size

    k_gen, k_train, k_probe = jax.random.split(jax.random.key(sc.seed), 3)
    gen = Generator(sc.z_dim, num_classes, (h, w), pre.channels, width=sc.generator_width,
                    rngs=nnx.Rngs(params=k_gen))
    g_graphdef, g_params, g_stats = nnx.split(gen, nnx.Param, nnx.BatchStat)
    static = (g_graphdef, s_graphdef, sc.z_dim, num_classes, bs, sc.mix_labels, sc.aug_noise)
    consts = {"state": s_state, "running": bn_running_stats(model), "lo": lo, "hi": hi,
              "w": jnp.asarray([sc.bn_weight, sc.ce_weight], jnp.float32),
              "lr": jnp.float32(sc.lr if sc.lr is not None else 1e-3)}
    carry = (g_params, g_stats, _adam(consts["lr"]).init(g_params), k_train)
    (g_params, g_stats, _, _), history = run_loop(_step, static, carry, consts, sc.steps, sc.loop, progress, checkpoint)

    # Probes: fresh z / targets in full batches (batch statistics; the BN state is not updated).
    n_batches = math.ceil(sc.n_probes / bs)
    xs, ts = [], []
    for k in jax.random.split(k_probe, n_batches):
        x, tg = _probe_batch(static, g_params, g_stats, k, lo, hi)
        xs.append(np.asarray(x))
        ts.append(np.asarray(tg))
    probes = np.concatenate(xs)[: sc.n_probes]
    targets = np.concatenate(ts)[: sc.n_probes]
    return ProbeSet.from_normalised(probes, targets, pre, sc, history)
