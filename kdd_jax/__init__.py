"""kdd-jax: knowledge distillation detection for open-weights models, in JAX.

Pipeline: models -> convert (converters/) -> synthesise probes -> query teachers (cached) ->
score -> decide -> report; generative (diffusion) students in kdd_jax.generative.
"""

from kdd_jax import xla_workarounds

# before anything can run a JAX computation: the installed jaxlib may need an XLA flag (see the module)
xla_workarounds.apply()

from kdd_jax.config import ConfigError, Preprocessing, StudentConfig, load_config, parse_config  # noqa: E402
from kdd_jax.io import CheckpointError, load_converted, save_converted  # noqa: E402
from kdd_jax.models import FAMILIES, bn_running_stats, build_model, forward_with_bn_stats  # noqa: E402

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
