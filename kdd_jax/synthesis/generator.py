"""Generator-based probe synthesis through the frozen student (GDFQ / Qimera family):

    min_phi  bn_weight * L_BNS(student on G_phi(z, w))  +  ce_weight * sum_i w_i CE(student(G_phi(z, w)), y_i)

G_phi is a DCGAN-style generator conditioned on soft class targets w (mixed labels): the noise z is
multiplied by a linear embedding of w (the soft version of GDFQ's nn.Embedding, so label mixtures
embed as the same mixture of class codes). Its BatchNorm layers always normalise with batch
statistics (as GDFQ's generator does in train mode); their running averages are tracked as state
but never used. The output passes tanh, an affine-free BatchNorm (GDFQ's output normalisation), a
crop to the student's input size, and a clip to the student's valid normalised range, so every
probe is a valid image.

Training is a pure functional step over (generator params, generator BN state, Adam state, key),
jitted and driven by `probes.run_loop`; the student is a constant closed over as (graphdef, state).
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
from kdd_jax.synthesis.losses import bn_statistics_loss, mixed_label_targets, soft_cross_entropy
from kdd_jax.synthesis.probes import ProbeSet, SynthesisConfig, normalised_bounds, require_batchnorm, run_loop


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


def synthesize_generator(model: nnx.Module, config, sc: SynthesisConfig,
                         progress: Callable[[int, float], None] | None = None) -> ProbeSet:
    require_batchnorm(model, sc.method)
    pre = config.preprocessing
    num_classes = config.arch.num_classes
    h, w = pre.input_size
    lo, hi = normalised_bounds(pre)
    s_graphdef, s_state = nnx.split(model)
    running = bn_running_stats(model)
    bs = sc.batch_size

    k_gen, k_train, k_probe = jax.random.split(jax.random.key(sc.seed), 3)
    gen = Generator(sc.z_dim, num_classes, (h, w), pre.channels, width=sc.generator_width,
                    rngs=nnx.Rngs(params=k_gen))
    g_graphdef, g_params, g_stats = nnx.split(gen, nnx.Param, nnx.BatchStat)

    def generate(params, stats, key, n):
        """n probes (clipped to the valid range), their targets, and the generator's updated BN state."""
        kz, kw = jax.random.split(key)
        z = jax.random.normal(kz, (n, sc.z_dim))
        tg = mixed_label_targets(kw, n, num_classes, mix=sc.mix_labels)
        g = nnx.merge(g_graphdef, params, stats, copy=True)
        x = jnp.clip(g(z, tg), lo, hi)
        return x, tg, nnx.state(g, nnx.BatchStat)

    def loss_fn(params, stats, key):
        x, tg, new_stats = generate(params, stats, key, bs)
        logits, bstats = forward_with_bn_stats(nnx.merge(s_graphdef, s_state, copy=True), x)
        loss = sc.bn_weight * bn_statistics_loss(bstats, running) + sc.ce_weight * soft_cross_entropy(logits, tg)
        return loss, new_stats

    opt = optax.adam(sc.lr if sc.lr is not None else 1e-3, b1=0.5, b2=0.999)

    def step(carry):
        params, stats, opt_state, key = carry
        key, sub = jax.random.split(key)
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, sub)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, stats, opt_state, key), loss

    carry = (g_params, g_stats, opt.init(g_params), k_train)
    (g_params, g_stats, _, _), history = run_loop(step, carry, sc.steps, sc.loop, progress)

    # Probes: fresh z / targets in full batches (batch statistics; the BN state is not updated).
    n_batches = math.ceil(sc.n_probes / bs)
    gen_batch = jax.jit(lambda p, s, k: generate(p, s, k, bs)[:2])
    xs, ts = [], []
    for k in jax.random.split(k_probe, n_batches):
        x, tg = gen_batch(g_params, g_stats, k)
        xs.append(np.asarray(x))
        ts.append(np.asarray(tg))
    probes = np.concatenate(xs)[: sc.n_probes]
    targets = np.concatenate(ts)[: sc.n_probes]
    return ProbeSet.from_normalised(probes, targets, pre, sc, history)
