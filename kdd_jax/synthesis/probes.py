"""Synthesis settings, the probe set it produces, and what every synthesis method shares."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from kdd_jax.models import bn_running_stats


class SynthesisError(ValueError):
    """The student cannot be probed with the requested method; the message says why."""


@dataclasses.dataclass(frozen=True)
class SynthesisConfig:
    method: Literal["pixel", "generator", "confidence", "noise"] = "pixel"
    n_probes: int = 100
    steps: int = 200
    lr: float | None = None  # method default: pixel 0.05, generator 1e-3
    restarts: int = 1  # pixel: independent groups optimised side by side (vmap)
    bn_weight: float = 1.0
    ce_weight: float = 1.0
    tv_weight: float = 1e-3
    l2_weight: float = 1e-4
    mix_labels: bool = True
    batch_size: int = 64  # generator training batch
    z_dim: int = 100  # generator: noise dimension
    generator_width: int = 64  # generator: channels of the last hidden conv (the first two have 2x)
    seed: int = 0
    # On XLA:CPU, conv gradients inside lax.scan run 5-9x slower than a Python loop around a
    # jitted step (platform notes); GPU/TPU users may prefer "scan".
    loop: Literal["python", "scan"] = "python"

    def __post_init__(self):
        if self.n_probes < 1 or self.steps < 0 or self.restarts < 1 or self.batch_size < 1:
            raise SynthesisError("n_probes, restarts and batch_size must be >= 1 and steps >= 0")


def require_batchnorm(model, method: str) -> None:
    if not bn_running_stats(model):
        raise SynthesisError(
            f"method {method!r} matches the student's BatchNorm statistics, but this student has no "
            "BatchNorm layers; choose a BN-free method"
        )


def normalised_bounds(pre) -> tuple[jax.Array, jax.Array]:
    """Per-channel bounds of valid pixels in the student's normalised space (broadcast on NHWC)."""
    mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
    lo, hi = pre.value_range
    return jnp.asarray((lo - mean) / std), jnp.asarray((hi - mean) / std)


def run_loop(step: Callable, carry, steps: int, loop: str, progress=None):
    """Run `step(carry) -> (carry, loss)` `steps` times; returns (carry, loss history)."""
    if steps == 0:
        return carry, np.zeros((0,), np.float32)
    if loop == "scan":
        carry, losses = jax.jit(lambda c: jax.lax.scan(lambda c, _: step(c), c, None, length=steps))(carry)
        return carry, np.asarray(losses)
    jstep = jax.jit(step, donate_argnums=0)
    history = []
    for i in range(steps):
        carry, loss = jstep(carry)
        history.append(loss)
        if progress is not None and (i + 1) % max(1, steps // 20) == 0:
            progress(i + 1, float(loss))
    return carry, np.asarray(jnp.stack(history))


@dataclasses.dataclass
class ProbeSet:
    """Probes in the student's raw input space (NCHW float32 in value_range) and normalised
    space (NHWC), with the soft targets they were made for and the loss trajectory."""

    raw: np.ndarray
    normalised: np.ndarray
    targets: np.ndarray
    config: SynthesisConfig
    loss_history: np.ndarray

    @staticmethod
    def from_normalised(x: np.ndarray, targets, pre, sc, history) -> ProbeSet:
        mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
        raw = np.clip(x * std + mean, *pre.value_range).transpose(0, 3, 1, 2).astype(np.float32)
        return ProbeSet(np.ascontiguousarray(raw), x.astype(np.float32), np.asarray(targets, np.float32), sc,
                        np.asarray(history, np.float32))

    @property
    def sha256(self) -> str:
        """Identity of the probe set: the exact bytes sent (after mapping) derive from these."""
        return hashlib.sha256(np.ascontiguousarray(self.raw).tobytes()).hexdigest()
