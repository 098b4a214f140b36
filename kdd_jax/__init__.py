"""kdd-jax: knowledge distillation detection for open-weights models, in JAX.

Pipeline: models -> convert (converters/) -> synthesise probes -> query teachers (cached) ->
score -> decide -> report. This release provides the first two stages.
"""

from kdd_jax.config import ConfigError, Preprocessing, StudentConfig, load_config, parse_config
from kdd_jax.io import CheckpointError, load_converted, save_converted
from kdd_jax.models import FAMILIES, bn_running_stats, build_model, forward_with_bn_stats

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "CheckpointError",
    "ConfigError",
    "Preprocessing",
    "StudentConfig",
    "bn_running_stats",
    "build_model",
    "forward_with_bn_stats",
    "load_config",
    "load_converted",
    "parse_config",
    "save_converted",
]
