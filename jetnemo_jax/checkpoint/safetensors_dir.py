"""Read an HF safetensors directory (single file or sharded with model.safetensors.index.json) lazily."""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors import safe_open

from jetnemo_jax.checkpoint.state_dict import CheckpointError

INDEX_FILE = "model.safetensors.index.json"


class SafetensorsDir:
    """Tensor names, shapes and dtypes without reading data; `get(name)` reads one tensor to host memory."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        index = os.path.join(self.path, INDEX_FILE)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"{self.path}: no *.safetensors files and no {INDEX_FILE}")
            weight_map = None
        self._handles = {}
        self.file_of: dict[str, str] = {}
        self.shapes: dict[str, tuple[tuple[int, ...], str]] = {}
        for fname in files:
            handle = self._open(fname)
            for name in handle.keys():
                if weight_map is not None and weight_map.get(name) != fname:
                    continue
                sl = handle.get_slice(name)
                self.file_of[name] = fname
                self.shapes[name] = (tuple(sl.get_shape()), sl.get_dtype())
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self.file_of))
            if absent:
                raise CheckpointError(f"{self.path}: tensor {absent[0]} is listed in {INDEX_FILE} but not in "
                                      f"{weight_map[absent[0]]}")

    def _open(self, fname: str):
        full = os.path.join(self.path, fname)
        if not os.path.exists(full):
            raise CheckpointError(f"{full}: file named in {INDEX_FILE} does not exist")
        try:
            handle = safe_open(full, framework="numpy")
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise CheckpointError(f"{full}: cannot be read as safetensors ({e})") from None
        self._handles[fname] = handle
        return handle

    def get(self, name: str) -> np.ndarray:
        try:
            return self._handles[self.file_of[name]].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{self.path}/{self.file_of[name]}: tensor {name} cannot be read ({e})") from None
