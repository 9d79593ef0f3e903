"""jetnemo_jax: Jet-Nemotron in JAX / Flax NNX."""

from jetnemo_jax.config import ConfigError, JetBlockConfig, ModelConfig, preset

__version__ = "0.1.0"
__all__ = ["ConfigError", "JetBlockConfig", "ModelConfig", "preset"]
