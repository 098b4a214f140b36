"""An eager PyTorch reference for kdd-jax's hot paths, for side-by-side benchmarks.

What a paper author would write in PyTorch for the same work as our engine:

- `synthesis`: pixel synthesis of probes through a frozen student (forward hooks capture each
  BatchNorm layer's input statistics while the model runs in eval mode; BN-statistics loss with
  standard deviations, mixed-label soft cross-entropy, TV and l2 priors; Adam; clipping to the
  valid pixel range), the same loop over many students (a Python loop, and `torch.func.vmap` over
  stacked weights), and the end-to-end detection (synthesis + teacher forward + scores + bootstrap).
- `scores`: teacher log-probabilities from an API's answer, -KL per probe, the dark-knowledge
  correlation and linear CKA, numerically the same as `kdd_jax.scores`.

Benchmarks and tests only (`benchmarks/throughput.py`, `tests/test_throughput_smoke.py`); the
kdd_jax library never imports torch.
"""

from benchmarks.reference_torch.scores import (
    dark_knowledge_corr,
    kl_per_probe,
    linear_cka,
    log_probs_from,
    neg_kl_scores,
)
from benchmarks.reference_torch.synthesis import (
    BNStatisticsHooks,
    detect_torch,
    load_torch_student,
    synthesis_loss,
    synthesize_pixels_torch,
    synthesize_pixels_torch_vmap,
)

__all__ = [
    "BNStatisticsHooks",
    "dark_knowledge_corr",
    "detect_torch",
    "kl_per_probe",
    "linear_cka",
    "load_torch_student",
    "log_probs_from",
    "neg_kl_scores",
    "synthesis_loss",
    "synthesize_pixels_torch",
    "synthesize_pixels_torch_vmap",
]
