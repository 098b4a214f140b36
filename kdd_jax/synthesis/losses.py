"""Synthesis losses: pure functions of arrays (paper: L = sum_i w_i CE(g(x), y_i) + L_BNS).

The student is frozen: every loss is differentiated with respect to the probes (or the
generator that makes them), never the student's weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdd_jax.models import BNStats


def bn_statistics_loss(batch: dict[str, BNStats], running: dict[str, BNStats]) -> jax.Array:
    """L_BNS = sum_l ||mu_l(batch) - mu_l^run||^2 + ||sigma_l(batch) - sigma_l^run||^2.

    sigma is the standard deviation (as the paper and DeepInversion write it); comparing standard
    deviations rather than variances keeps wide layers from dominating the sum."""
    total = jnp.zeros((), jnp.float32)
    for name, s in batch.items():
        r = running[name]
        total += jnp.sum((s.mean - r.mean) ** 2)
        total += jnp.sum((jnp.sqrt(s.var + 1e-8) - jnp.sqrt(r.var + 1e-8)) ** 2)
    return total


def mixed_label_targets(key: jax.Array, n: int, num_classes: int, *, mix: bool = True) -> jax.Array:
    """Soft targets w [n, C]: lambda e_i + (1 - lambda) e_j for random classes i != j and
    lambda ~ U(0, 1), so probes sit near the student's decision boundaries (paper). Without
    `mix`, one-hot targets over classes in round-robin order (DeepInversion)."""
    if not mix:
        return jax.nn.one_hot(jnp.arange(n) % num_classes, num_classes)
    k1, k2, k3 = jax.random.split(key, 3)
    first = jax.random.randint(k1, (n,), 0, num_classes)
    # a different second class: shift by 1..C-1
    second = (first + jax.random.randint(k2, (n,), 1, max(num_classes, 2))) % num_classes
    lam = jax.random.uniform(k3, (n, 1))
    return lam * jax.nn.one_hot(first, num_classes) + (1 - lam) * jax.nn.one_hot(second, num_classes)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over probes of -sum_c w_c log softmax(logits)_c."""
    return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, -1), -1))


def total_variation(x: jax.Array) -> jax.Array:
    """Mean absolute difference between neighbouring pixels (NHWC): a smoothness prior."""
    return jnp.mean(jnp.abs(x[:, 1:] - x[:, :-1])) + jnp.mean(jnp.abs(x[:, :, 1:] - x[:, :, :-1]))
