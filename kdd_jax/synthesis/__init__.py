"""Probe synthesis from the student alone (data-free): the paper's stage 1."""

from kdd_jax.synthesis.losses import bn_statistics_loss, mixed_label_targets, soft_cross_entropy, total_variation
from kdd_jax.synthesis.generator import synthesize_generator
from kdd_jax.synthesis.pixel import synthesize_pixels
from kdd_jax.synthesis.probes import ProbeSet, SynthesisConfig, SynthesisError


def synthesize_bn_free(model, config, sc, progress=None) -> ProbeSet:
    return synthesize_pixels(model, config, sc, progress, use_bn=False)


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
}


def synthesize(model, config, sc: SynthesisConfig, progress=None) -> ProbeSet:
    """Probes for `model` (a student with its StudentConfig) by the method `sc.method` names."""
    if sc.method not in METHODS:
        raise SynthesisError(f"unknown synthesis method {sc.method!r}; available: {sorted(METHODS)}")
    return METHODS[sc.method](model, config, sc, progress)


__all__ = [
    "METHODS",
    "ProbeSet",
    "SynthesisConfig",
    "SynthesisError",
    "bn_statistics_loss",
    "mixed_label_targets",
    "soft_cross_entropy",
    "synthesize",
    "total_variation",
]
