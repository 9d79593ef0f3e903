"""Load an HF checkpoint directory (Qwen2 / Qwen2.5 or Jet-Nemotron: config.json + safetensors) into a model."""

from __future__ import annotations

import os

from flax import nnx

from jetnemo_jax.checkpoint.safetensors_dir import SafetensorsDir
from jetnemo_jax.checkpoint.state_dict import load_state_dict
from jetnemo_jax.config import ModelConfig
from jetnemo_jax.model import JetNemotronForCausalLM


def load_hf_model(path: str | os.PathLike, **config_overrides) -> JetNemotronForCausalLM:
    """Build the model that `path/config.json` describes and fill it from the directory's safetensors.

    `config_overrides` set non-schema fields such as dtype="float32" or param_dtype="bfloat16".
    Raises ConfigError for a config we cannot represent (e.g. a non-Qwen2 model_type) and
    CheckpointError for missing, extra, mis-shaped or unreadable tensors.
    """
    cfg = ModelConfig.from_hf_file(path, **config_overrides)
    tensors = SafetensorsDir(path)
    # Abstract init: no random weights are materialised before the real ones arrive.
    model = nnx.eval_shape(lambda: JetNemotronForCausalLM(cfg, rngs=nnx.Rngs(0)))
    load_state_dict(model, tensors.get, tensors.shapes, where=os.fspath(path))
    return model
