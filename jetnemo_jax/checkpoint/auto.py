"""Open a checkpoint directory of either kind: our Orbax checkpoint (config.json + params/) or an HF
safetensors directory (config.json + *.safetensors)."""

from __future__ import annotations

import glob
import os

from jetnemo_jax.checkpoint.hf import load_hf_model
from jetnemo_jax.checkpoint.orbax_params import PARAMS_DIR, load_params
from jetnemo_jax.checkpoint.state_dict import CheckpointError
from jetnemo_jax.model import JetNemotronForCausalLM


def checkpoint_kind(path: str | os.PathLike) -> str:
    """"orbax" or "hf"; CheckpointError naming what is missing otherwise."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such directory")
    if os.path.isdir(os.path.join(path, PARAMS_DIR)):
        return "orbax"
    if glob.glob(os.path.join(path, "*.safetensors")):
        return "hf"
    raise CheckpointError(f"{path}: neither a jetnemo_jax checkpoint ({PARAMS_DIR}/) nor an HF directory "
                          f"(*.safetensors)")


def load_model(path: str | os.PathLike, **config_overrides) -> JetNemotronForCausalLM:
    """Load either kind of checkpoint; `config_overrides` as for `load_hf_model` / `load_params`."""
    if checkpoint_kind(path) == "orbax":
        return load_params(path, **config_overrides)
    return load_hf_model(path, **config_overrides)
