"""Write a model as an HF safetensors directory in the official schema, one shard in memory at a time."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
from safetensors.numpy import save_file

from jetnemo_jax.checkpoint.atomic import atomic_directory
from jetnemo_jax.checkpoint.safetensors_dir import INDEX_FILE
from jetnemo_jax.checkpoint.state_dict import param_entries
from jetnemo_jax.data.tokenizer import TOKENIZER_FILES, find_tokenizer_dir, load_tokenizer

# Kept float32 whatever the export dtype (the decay parametrisation; the official checkpoints do so too).
FP32_TENSORS = ("A_log", "dt_bias")
# Shards are built in host memory one at a time: their size bounds the extra memory of an export.
DEFAULT_SHARD_BYTES = 2 * 1024 ** 3


def _export_dtype(name: str, dtype: str | None, current) -> np.dtype:
    if name.rsplit(".", 1)[-1] in FP32_TENSORS:
        return np.dtype("float32")
    return np.dtype(jax.numpy.dtype(dtype)) if dtype else np.dtype(current)


def save_hf(model, directory: str | os.PathLike, *, dtype: str | None = "bfloat16", overwrite: bool = False,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer_dir: str | os.PathLike | None = None) -> None:
    """Export `model` to `directory` (config.json, model*.safetensors, index when sharded, tokenizer files).

    dtype: "bfloat16" (default), "float32", or None to keep each parameter's dtype. A tied lm_head is
    not written (the official checkpoints omit it). The directory appears only when complete, readable by all.
    """
    entries = list(param_entries(model))
    sizes = [int(np.prod(var.shape)) * _export_dtype(name, dtype, var.dtype).itemsize for name, _, var in entries]
    shards, current, current_bytes = [], [], 0
    for entry, size in zip(entries, sizes):
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(entry)
        current_bytes += size
    shards.append(current)

    cfg = shareable_hf_config(model.config)
    cfg["torch_dtype"] = np.dtype(_export_dtype("weight", dtype, model.model.embed_tokens.embedding.dtype)).name
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name, path, var in shard:
                x = np.asarray(jax.device_get(var[...]))
                x = np.ascontiguousarray(x.T) if path[-1] == "kernel" else x
                tensors[name] = x.astype(_export_dtype(name, dtype, x.dtype), copy=False)
                weight_map[name] = fname
            save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
            del tensors
        if len(shards) > 1:
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp)


def shareable_hf_config(config) -> dict:
    """config.json's content without `auto_map`: it names NVIDIA's modelling code (configuration_jet_nemotron.py,
    modeling_jet_nemotron.py), which we may not ship, and an auto_map without those files only makes
    transformers ask whether to run code it cannot find. The official way to load a Jet-Nemotron export in
    PyTorch is NVIDIA's code from their repository (trust_remote_code pointed at it, or its files copied
    beside the weights with their auto_map); jetnemo_jax and Qwen2 exports need none."""
    return {k: v for k, v in config.to_hf_dict().items() if k != "auto_map"}


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the tokenizer files of `src` (or of the workdir `src`'s tokenizer/ or final/) into `dst`, after
    checking that they load (TokenizerError otherwise)."""
    found = find_tokenizer_dir(src)
    if found is None:
        raise FileNotFoundError(f"{src}: no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...)")
    load_tokenizer(found, require_eos=False)
    for name in TOKENIZER_FILES:
        if (found / name).is_file():
            shutil.copyfile(found / name, os.path.join(dst, name))
