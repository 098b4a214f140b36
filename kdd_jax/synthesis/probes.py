"""Synthesis settings, the probe set it produces, and what every synthesis method shares."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import operator
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from kdd_jax.models import bn_running_stats


class SynthesisError(ValueError):
    """The student cannot be probed with the requested method; the message says why."""


SEED_LIMIT = 2**32  # JAX's PRNG keys take 32 bits of a seed: 2**32 would repeat seed 0's probes


@dataclasses.dataclass(frozen=True)
class SynthesisConfig:
    method: Literal["pixel", "generator", "confidence", "noise", "real", "ood", "mia"] = "pixel"
    n_probes: int = 100
    steps: int = 200
    lr: float | None = None  # method default: pixel 0.05, generator 1e-3
    restarts: int = 1  # pixel: independent groups optimised side by side (vmap)
    bn_weight: float = 1.0
    ce_weight: float = 1.0
    tv_weight: float = 1e-3
    l2_weight: float = 1e-4
    mix_labels: bool = True
    init: Literal["zero", "low"] = "zero"  # pixel: N(0, init_scale) around the normalised mean, or |N| above the lowest valid value
    init_scale: float = 0.5
    jitter: int = 0  # pixel: random shift (pixels) of the probes the student sees each step
    flip: bool = False  # pixel: random left-right flips too
    pixel_scale: int = 1  # pixel: optimise a grid this many times coarser, upsampled bilinearly (smoothness prior)
    # pixel/confidence/generator: std of Gaussian noise (normalised units) added to what the student sees each
    # step, so class evidence must survive it (expectation over noise) instead of resting on pixel-exact texture.
    # None: the method's default (method_default), resolved on construction: 1.0 for pixel, the best data-free
    # setting measured (benchmarks/results/detection_accuracy.md: 0.46 vs 0.30 without), 0 for every other method
    aug_noise: float | None = None
    batch_size: int = 64  # generator training batch
    z_dim: int = 100  # generator: noise dimension
    generator_width: int = 64  # generator: channels of the last hidden conv (the first two have 2x)
    seed: int = 0
    # On XLA:CPU, conv gradients inside lax.scan run 5-9x slower than a Python loop around a
    # jitted step (platform notes); GPU/TPU users may prefer "scan".
    loop: Literal["python", "scan"] = "python"

    def __post_init__(self):
        if self.n_probes < 1 or self.steps < 0 or self.restarts < 1 or self.batch_size < 1 or self.pixel_scale < 1:
            raise SynthesisError("n_probes, restarts, batch_size and pixel_scale must be >= 1 and steps >= 0")
        try:
            seed_ok = not isinstance(self.seed, bool) and 0 <= operator.index(self.seed) < SEED_LIMIT
        except TypeError:
            seed_ok = False
        if not seed_ok:
            raise SynthesisError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        object.__setattr__(self, "seed", operator.index(self.seed))  # np.int64(7) and 7: one fingerprint
        if self.aug_noise is None:
            object.__setattr__(self, "aug_noise", method_default(self.method, "aug_noise"))
        if isinstance(self.aug_noise, bool) or not (isinstance(self.aug_noise, (int, float)) and 0.0 <= self.aug_noise < float("inf")):
            raise SynthesisError(f"aug_noise must be a finite number >= 0, got {self.aug_noise!r}")
        # a setting only some methods read, changed from its default for a method that ignores it, would be
        # recorded (fingerprints, reports, calibrations) as if it had acted: refused, naming each
        defaults = {f.name: method_default(self.method, f.name) for f in dataclasses.fields(self)}
        faults = []  # one error naming every setting at fault, group by group
        for methods, names in _METHOD_SETTINGS:
            if self.method in methods:
                continue
            changed = [f"{k}={getattr(self, k)!r}" for k in names if getattr(self, k) != defaults[k]]
            if changed:
                many = len(changed) > 1
                faults.append(f"{', '.join(changed)}: {'/'.join(k.split('=')[0] for k in changed)} "
                              f"appl{'y' if many else 'ies'} to the method{'s' if len(methods) > 1 else ''} "
                              f"{_and(methods)} only")
        if faults:
            raise SynthesisError(f"{'; '.join(faults)}, not to {self.method!r}")
        object.__setattr__(self, "aug_noise", float(self.aug_noise))  # 1 and 1.0: one identity, one cache key

    def identity(self) -> dict:
        """The settings that decide the probes, for fingerprints and cache keys: every field, except
        those added after probes were first cached while they hold their NEUTRAL_DEFAULTS value (the
        behaviour from before they existed; for aug_noise 0, no longer pixel's default), so adding a
        setting keeps earlier caches valid."""
        d = dataclasses.asdict(self)
        for name, neutral in NEUTRAL_DEFAULTS.items():
            if d[name] == neutral:
                del d[name]
        return d

    def identity_sha256(self) -> str:
        """sha256 (hex) of identity() as sorted JSON: a cache key for probes made with these settings."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()


# Settings only some methods read: (those methods, the settings). Pixel-space optimisation (pixel, and
# confidence, its BN-free form): its restarts, initialisation and image priors, and what the student sees of
# the probes being optimised. The generator: its network and training batch. The BatchNorm prior: pixel and
# generator. The optimisation itself (its length, step size, class loss and labels, loop, noise on what the
# student sees): all three optimised methods; noise and the pool methods (real, ood, mia) optimise nothing.
POOL_METHODS = ("real", "ood", "mia")  # choose probes from an ImagePool the auditor supplies
OPTIMISED_METHODS = ("pixel", "confidence", "generator")  # optimise through the student: a loop to checkpoint
_METHOD_SETTINGS = (
    (("pixel", "confidence"), ("restarts", "init", "init_scale", "jitter", "flip", "pixel_scale", "tv_weight",
                               "l2_weight")),
    (("generator",), ("batch_size", "z_dim", "generator_width")),
    (("pixel", "generator"), ("bn_weight",)),
    (OPTIMISED_METHODS, ("steps", "lr", "ce_weight", "mix_labels", "loop", "aug_noise")),
)


def ignored_settings(method: str) -> frozenset[str]:
    """The SynthesisConfig fields `method` never reads (held at their defaults under `method`, as __post_init__
    requires)."""
    return frozenset(n for methods, names in _METHOD_SETTINGS if method not in methods for n in names)


def _and(names) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


# Settings whose default depends on the method (a field default of None stands for these): the method's value,
# else the "*" value. Pixel synthesis sees its probes under noise unless told otherwise (aug_noise 0 reproduces
# the pixel probes made before 2026-11-24, when noise became pixel's default).
_METHOD_DEFAULTS = {"aug_noise": {"pixel": 1.0, "*": 0.0}}
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SynthesisConfig)}


def method_default(method: str, name: str):
    """The default of SynthesisConfig field `name` under `method` (what None resolves to, for the fields
    whose default depends on the method; the field's plain default otherwise)."""
    if name in _METHOD_DEFAULTS:
        by_method = _METHOD_DEFAULTS[name]
        return by_method.get(method, by_method["*"])
    return _FIELD_DEFAULTS[name]


# Settings whose value here reproduces the probes made before the setting existed (see identity(); and the value
# a calibration or audit record made before then was made with).
NEUTRAL_DEFAULTS = {"aug_noise": 0.0}


def require_batchnorm(model, method: str) -> None:
    if not bn_running_stats(model):
        raise SynthesisError(
            f"method {method!r} matches the student's BatchNorm statistics, but this student has no "
            "BatchNorm layers (an AlexNet, a ViT or DeiT); choose a BN-free method: confidence (data-free), noise, or "
            "real/ood/mia with --pool"
        )


def normalised_bounds(pre) -> tuple[jax.Array, jax.Array]:
    """Per-channel bounds of valid pixels in the student's normalised space (broadcast on NHWC)."""
    mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
    lo, hi = pre.value_range
    return jnp.asarray((lo - mean) / std), jnp.asarray((hi - mean) / std)


class Checkpointer:
    """Periodic, atomic snapshots of a synthesis loop's whole state (the optimised parameters, the
    optimiser state, the RNG key: the carry) plus the step and the loss history, so an interrupted
    run resumes where it stopped and ends with exactly the probes an uninterrupted run makes.

    `fingerprint` names what the state belongs to (student weights + synthesis settings); a
    snapshot with another fingerprint is ignored, never resumed. The snapshot is one directory
    published by a rename (kdd_jax.io.StagingDir), saved with orbax through kdd_jax.io.
    """

    def __init__(self, directory: str | Path, fingerprint: str, every: int = 25):
        if every < 1:
            raise ValueError("checkpoint interval must be >= 1 step")
        self.directory, self.fingerprint, self.every = Path(directory), fingerprint, every
        self.resumed_from = 0  # the step a restore started from (0: fresh)

    @property
    def _latest(self) -> Path:
        return self.directory / "latest"

    def save(self, carry, step: int, history: np.ndarray) -> None:
        from kdd_jax.io import StagingDir, atomic_write_json, save_state

        leaves = [np.asarray(jax.random.key_data(x) if _is_key(x) else x) for x in jax.tree.leaves(carry)]
        with StagingDir(self._latest, overwrite=True) as tmp:
            save_state(tmp / "carry", {f"{i:05d}": a for i, a in enumerate(leaves)} | {"history": np.asarray(history, np.float32)})
            atomic_write_json(tmp / "meta.json", {"fingerprint": self.fingerprint, "step": int(step), "leaves": len(leaves)})

    def restore(self, template) -> tuple[object, int, np.ndarray] | None:
        """(carry, step, history) from the latest snapshot made for this fingerprint, else None."""
        import json

        from kdd_jax.io import StagingDir, restore_state

        StagingDir.recover(self._latest)  # a kill between an overwrite's two renames (non-Linux) left it aside
        meta_path = self._latest / "meta.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None
        leaves, treedef = jax.tree.flatten(template)
        if meta.get("fingerprint") != self.fingerprint or meta.get("leaves") != len(leaves):
            return None
        step = int(meta["step"])
        target = {f"{i:05d}": np.asarray(jax.random.key_data(x) if _is_key(x) else x) for i, x in enumerate(leaves)}
        target["history"] = np.zeros((step,), np.float32)
        try:
            restored = restore_state(self._latest / "carry", target)
        except Exception as e:  # a damaged snapshot is only lost time: start over (same probes), and say so
            from kdd_jax.io import error_summary

            warnings.warn(f"synthesis checkpoint {self._latest} cannot be restored ({error_summary(e)}); starting the "
                          "synthesis over (it ends with the same probes) and overwriting the snapshot", stacklevel=2)
            return None
        new = [jax.random.wrap_key_data(jnp.asarray(restored[f"{i:05d}"]), impl=jax.random.key_impl(x)) if _is_key(x)
               else jnp.asarray(restored[f"{i:05d}"], dtype=x.dtype) for i, x in enumerate(leaves)]
        self.resumed_from = step
        return jax.tree.unflatten(treedef, new), step, np.asarray(restored["history"], np.float32)


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def fingerprint(model, config, sc) -> str:
    """sha256 over the student's weights, its config and the synthesis settings."""
    from flax import nnx

    h = hashlib.sha256(json.dumps([config.to_dict(), sc.identity()], sort_keys=True, default=str).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]:
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()


# Compiled once per (step function, static structure, shapes): the student's weights are a
# traced argument, so auditing many students of one architecture compiles once, not per student.
@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2,))
def _jit_step(step_fn, static, carry, consts):
    return step_fn(static, carry, consts)


@functools.partial(jax.jit, static_argnums=(0, 1, 4))
def _jit_scan(step_fn, static, carry, consts, n):
    return jax.lax.scan(lambda c, _: step_fn(static, c, consts), carry, None, length=n)


def run_loop(step_fn: Callable, static, carry, consts, steps: int, loop: str, progress=None,
             checkpoint: Checkpointer | None = None):
    """Run `step_fn(static, carry, consts) -> (carry, loss)` `steps` times; returns (carry, loss history).

    `step_fn` must be a module-level function and `static` hashable (model graphdefs, flags): they
    key the compile cache. `consts` (weights, targets, bounds, loss weights) are traced arrays.
    With a `checkpoint`, resume from its latest matching snapshot and save one every
    `checkpoint.every` steps (a scan loop then runs in chunks of that length)."""
    start, history = 0, []
    if checkpoint is not None:
        restored = checkpoint.restore(carry)
        if restored is not None:
            carry, start, prev = restored
            start = min(start, steps)
            history = [prev[:start]]
    if start >= steps:
        return carry, (np.concatenate(history) if history else np.zeros((0,), np.float32))
    every = checkpoint.every if checkpoint is not None else steps
    if loop == "scan":
        i = start
        while i < steps:
            n = min(every - i % every, steps - i)
            carry, losses = _jit_scan(step_fn, static, carry, consts, n)
            history.append(np.asarray(losses))
            i += n
            if checkpoint is not None and (i % every == 0 or i == steps):
                checkpoint.save(carry, i, np.concatenate(history))
            if progress is not None:
                progress(i, float(losses[-1]))
        return carry, np.concatenate(history)
    fresh = []
    for i in range(start, steps):
        carry, loss = _jit_step(step_fn, static, carry, consts)
        fresh.append(loss)
        if checkpoint is not None and ((i + 1) % every == 0 or i + 1 == steps):
            history.append(np.asarray(jnp.stack(fresh)))
            fresh = []
            checkpoint.save(carry, i + 1, np.concatenate(history))
        if progress is not None and (i + 1) % max(1, steps // 20) == 0:
            progress(i + 1, float(loss))
    if fresh:
        history.append(np.asarray(jnp.stack(fresh)))
    return carry, np.concatenate(history)


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
