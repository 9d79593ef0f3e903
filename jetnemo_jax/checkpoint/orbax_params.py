"""The JAX checkpoint of a model: `config.json` (HF schema) + `params/` (an Orbax PyTree of parameters).

This is what `convert_torch_ckpt.py` writes and what training restores its initial weights from.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from jetnemo_jax.checkpoint.atomic import atomic_directory
from jetnemo_jax.checkpoint.hf_export import copy_tokenizer, shareable_hf_config
from jetnemo_jax.checkpoint.state_dict import CheckpointError
from jetnemo_jax.config import ModelConfig
from jetnemo_jax.model import JetNemotronForCausalLM

PARAMS_DIR = "params"


def save_params(model: JetNemotronForCausalLM, directory: str | os.PathLike, *, overwrite: bool = False,
                extra_files: dict[str, str] | None = None, tokenizer_dir: str | os.PathLike | None = None) -> None:
    """Write config.json (no auto_map: see `shareable_hf_config`), `extra_files` ({name: text}), the tokenizer
    files of `tokenizer_dir` and the parameters (in their current dtypes) atomically, readable by all."""
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(shareable_hf_config(model.config), f, indent=2)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(tmp, PARAMS_DIR), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        checkpointer.wait_until_finished()


def load_params(directory: str | os.PathLike, **config_overrides) -> JetNemotronForCausalLM:
    """Restore a model saved by `save_params`; parameters keep the dtypes they were saved with."""
    directory = os.path.abspath(os.fspath(directory))
    cfg = ModelConfig.from_hf_file(directory, **config_overrides)
    params_dir = os.path.join(directory, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{directory}: no {PARAMS_DIR}/ (not a jetnemo_jax checkpoint)")
    checkpointer = ocp.StandardCheckpointer()
    try:
        saved = checkpointer.metadata(params_dir).item_metadata.tree
    except Exception as e:
        raise CheckpointError(f"{params_dir}: cannot read the Orbax metadata ({e})") from None
    # Build the model with the saved parameter dtype so that restoring does not cast.
    dtype = _saved_param_dtype(saved)
    model = nnx.eval_shape(lambda: JetNemotronForCausalLM(cfg.replace(param_dtype=dtype), rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    target = nnx.to_pure_dict(state)
    _check_tree(target, saved, params_dir)
    # Onto this process's first device, whatever mesh saved it (a pod's checkpoint opens on one device).
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here), target)
    try:
        restored = checkpointer.restore(params_dir, target)
    except Exception as e:
        raise CheckpointError(f"{params_dir}: cannot be restored ({e})") from None
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model


def _saved_param_dtype(tree) -> str:
    emb = tree["model"]["embed_tokens"]["embedding"]
    return jnp.dtype(emb.dtype).name


def _check_tree(target, saved, where, prefix=""):
    """Name the first missing, extra or mis-shaped parameter (Orbax's own errors are hard to read)."""
    saved = {str(k): v for k, v in saved.items()}
    target_keys = {str(k) for k in target}
    for key in sorted(target_keys - set(saved)):
        raise CheckpointError(f"{where}: missing parameter {prefix}{key}")
    for key in sorted(set(saved) - target_keys):
        raise CheckpointError(f"{where}: unexpected parameter {prefix}{key} for this config")
    for key, value in target.items():
        other = saved[str(key)]
        if isinstance(value, dict):
            _check_tree(value, other, where, f"{prefix}{key}.")
        elif tuple(other.shape) != tuple(value.shape):
            raise CheckpointError(f"{where}: parameter {prefix}{key} has shape {tuple(other.shape)}, "
                                  f"expected {tuple(value.shape)}")
