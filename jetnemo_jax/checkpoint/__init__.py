"""Checkpoint formats: the PyTorch state-dict view, HF safetensors directories."""

from jetnemo_jax.checkpoint.hf import load_hf_model
from jetnemo_jax.checkpoint.state_dict import (
    CheckpointError,
    load_state_dict,
    to_state_dict,
)

__all__ = ["CheckpointError", "load_hf_model", "load_state_dict", "to_state_dict"]
