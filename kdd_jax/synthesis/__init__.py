"""Probe synthesis from the student alone (data-free): the paper's stage 1."""

from kdd_jax.synthesis.losses import bn_statistics_loss, mixed_label_targets, soft_cross_entropy, total_variation
from kdd_jax.synthesis.generator import synthesize_generator
from kdd_jax.synthesis.pixel import synthesize_pixels
from kdd_jax.synthesis.probes import (
    OPTIMISED_METHODS,
    POOL_METHODS,
    Checkpointer,
    ProbeSet,
    SynthesisConfig,
    SynthesisError,
    fingerprint,
)
from kdd_jax.synthesis.real import ImagePool, select_from_pool


def synthesize_bn_free(model, config, sc, progress=None, *, checkpoint=None) -> ProbeSet:
    return synthesize_pixels(model, config, sc, progress, use_bn=False, checkpoint=checkpoint)


def synthesize_noise(model, config, sc, progress=None) -> ProbeSet:
    """Baseline: raw pixels uniform in the value range (the paper's weakest input construction)."""
    import numpy as np

    pre = config.preprocessing
    rng = np.random.default_rng(sc.seed)
    raw = rng.uniform(*pre.value_range, size=(sc.n_probes, *pre.input_size, pre.channels)).astype(np.float32)
    x = (raw - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    c = config.arch.num_classes
    return ProbeSet.from_normalised(x, np.full((sc.n_probes, c), 1.0 / c, np.float32), pre, sc, np.zeros(0, np.float32))


# name -> (model, StudentConfig, SynthesisConfig, progress) -> ProbeSet
METHODS = {
    "pixel": synthesize_pixels,          # BN statistics + mixed-label CE + TV + l2 on probe pixels
    "generator": synthesize_generator,   # the paper's: a label-conditioned generator trained through the student
    "confidence": synthesize_bn_free,    # BN-free: mixed-label CE + TV + l2 (students without BatchNorm)
    "noise": synthesize_noise,           # baseline: uniform noise
    # not data-free: chosen from an ImagePool the auditor supplies (kdd_jax.synthesis.real)
    "real": select_from_pool,            # random real images (the paper's oracle with training data)
    "ood": select_from_pool,             # energy-score in-distribution filter of an auxiliary pool
    "mia": select_from_pool,             # membership-inference (loss / confidence) filter of a pool
}


def synthesize(model, config, sc: SynthesisConfig, progress=None, *, pool: ImagePool | None = None,
               checkpoint_dir=None, checkpoint_every: int = 25) -> ProbeSet:
    """Probes for `model` (a student with its StudentConfig) by the method `sc.method` names.
    `pool` (real images) is required by the POOL_METHODS and refused by the others.

    With `checkpoint_dir`, the optimisation state is saved there every `checkpoint_every` steps and
    an interrupted run with the same student and settings resumes from it (same final probes)."""
    if sc.method not in METHODS:
        raise SynthesisError(f"unknown synthesis method {sc.method!r}; available: {sorted(METHODS)}")
    if sc.method in POOL_METHODS:
        return select_from_pool(model, config, sc, pool, progress)
    if pool is not None:
        raise SynthesisError(f"method {sc.method!r} is data-free and takes no image pool; pool methods: {POOL_METHODS}")
    if checkpoint_dir is not None and sc.method in OPTIMISED_METHODS:
        ckpt = Checkpointer(checkpoint_dir, fingerprint(model, config, sc), checkpoint_every)
        return METHODS[sc.method](model, config, sc, progress, checkpoint=ckpt)
    return METHODS[sc.method](model, config, sc, progress)


__all__ = [
    "METHODS",
    "Checkpointer",
    "OPTIMISED_METHODS",
    "POOL_METHODS",
    "ImagePool",
    "ProbeSet",
    "SynthesisConfig",
    "SynthesisError",
    "bn_statistics_loss",
    "mixed_label_targets",
    "soft_cross_entropy",
    "synthesize",
    "total_variation",
]
