"""What a run's ConfigDict means: defaults and presets (:mod:`.defaults`), resolution into the
typed model and head spec (:mod:`.resolve`) and every value check (:mod:`.checks`).

Config files (``configs/*.py``) build on :func:`base_config` and :func:`model_config`."""

from guided_jax.config.checks import check_config
from guided_jax.config.defaults import MODEL_PRESETS, base_config, load_config, model_config
from guided_jax.config.resolve import ConfigError

__all__ = [
    "MODEL_PRESETS",
    "ConfigError",
    "base_config",
    "check_config",
    "load_config",
    "model_config",
]
