"""Probe synthesis from the student alone (data-free): the paper's stage 1."""

from kdd_jax.synthesis.losses import bn_statistics_loss, mixed_label_targets, soft_cross_entropy, total_variation
from kdd_jax.synthesis.generator import synthesize_generator
from kdd_jax.synthesis.pixel import synthesize_pixels
from kdd_jax.synthesis.probes import ProbeSet, SynthesisConfig, SynthesisError

METHODS = {"pixel": synthesize_pixels, "generator": synthesize_generator}


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
