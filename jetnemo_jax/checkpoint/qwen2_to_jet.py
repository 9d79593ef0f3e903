"""Initialise a Jet-Nemotron from a pre-trained Qwen2 / Qwen2.5 checkpoint (the start of PostNAS training).

Copied from the source: embeddings, final norm, lm_head (if untied), and in every layer both RMSNorms and
the MLP; attention ("attn") and sliding-window ("swa") layers keep their attention weights. JetBlock layers
are initialised as the official block initialises itself (Linear weights N(0, initializer_range), kernel
generator W2 = 0 with W1, b2 ~ N(0, initializer_range), Mamba2-style A_log / dt_bias): the paper leaves
open whether JetBlock projections start from the attention weights they replace; we do not, and the
source attention weights of those layers are reported as dropped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

from jetnemo_jax.checkpoint.safetensors_dir import SafetensorsDir
from jetnemo_jax.checkpoint.state_dict import CheckpointError, param_entries
from jetnemo_jax.config import SOURCE_SHAPE_FIELDS, ConfigError, ModelConfig, config_diff
from jetnemo_jax.model import JetNemotronForCausalLM


def target_config(source: ModelConfig, layout: ModelConfig, *,
                  layer_types: Sequence[str] | None = None) -> ModelConfig:
    """`layout` (the hybrid's config, e.g. `jet_layout(source)`) with `layer_types` if given, after checking
    that it keeps every size of `source` that its weights carry (SOURCE_SHAPE_FIELDS)."""
    diff = config_diff({k: getattr(layout, k) for k in SOURCE_SHAPE_FIELDS},
                       {k: getattr(source, k) for k in SOURCE_SHAPE_FIELDS})
    if diff:
        raise ConfigError(f"the target config does not fit the source: {'; '.join(diff)} (target != source); "
                          "derive it from the source with jetnemo_jax.config.jet_layout")
    layer_types = layout.layer_types if layer_types is None else tuple(layer_types)
    if len(layer_types) != source.num_hidden_layers:
        raise ConfigError(f"layer_types has {len(layer_types)} entries but the source has "
                          f"{source.num_hidden_layers} layers")
    return layout.replace(layer_types=tuple(layer_types))


def qwen2_to_jet(src: str | os.PathLike, layout: ModelConfig, *,
                 layer_types: Sequence[str] | None = None, seed: int = 0,
                 param_dtype: str = "bfloat16") -> tuple[JetNemotronForCausalLM, dict]:
    """Returns (hybrid model, report) where report lists what was copied, initialised and dropped.
    `layout`: the hybrid's config, `jet_layout(ModelConfig.from_hf_file(src))` for the rule's."""
    source_cfg = ModelConfig.from_hf_file(src)
    if set(source_cfg.layer_types) != {"attn"}:
        raise ConfigError(f"{src}: the source must be an all-attention Qwen2 model, it has layer types "
                          f"{sorted(set(source_cfg.layer_types))}")
    cfg = target_config(source_cfg, layout, layer_types=layer_types).replace(param_dtype=param_dtype)
    tensors = SafetensorsDir(src)
    model = JetNemotronForCausalLM(cfg, rngs=nnx.Rngs(seed))
    copied, initialised = [], []
    for name, path, var in param_entries(model):
        layer = int(path[2]) if path[:2] == ("model", "layers") else None
        from_source = layer is None or cfg.layer_types[layer] != "jet" or path[3] != "self_attn"
        if not from_source:
            initialised.append(name)
            continue
        if name not in tensors.shapes:
            raise CheckpointError(f"{src}: missing tensor {name}")
        want = tuple(var.shape[::-1] if path[-1] == "kernel" else var.shape)
        if tuple(tensors.shapes[name][0]) != want:
            raise CheckpointError(f"{src}: tensor {name} has shape {tuple(tensors.shapes[name][0])}, expected {want}")
        x = tensors.get(name)
        var.set_value(jnp.asarray(x.T if path[-1] == "kernel" else x, dtype=var.dtype))
        copied.append(name)
    used = set(copied) | ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    dropped = sorted(n for n in tensors.shapes if n not in used)
    unexpected = [n for n in dropped if not _is_jet_layer_attention(n, cfg)]
    if unexpected:
        raise CheckpointError(f"{src}: unexpected tensor {unexpected[0]} for a Qwen2 model")
    report = {
        "source": os.path.abspath(os.fspath(src)), "seed": seed, "param_dtype": param_dtype,
        "layer_types": list(cfg.layer_types), "copied": copied, "initialised": initialised, "dropped": dropped,
        "jet_block_init": "official: Linear N(0, initializer_range); kernel generator W2 = 0, "
                          "W1 and b2 ~ N(0, initializer_range) (the official W1 = 0 never trains); A = U(0, 16), "
                          "A_log = log A; dt log-uniform "
                          "[1e-3, 1e-1] clamped >= 1e-4, dt_bias = softplus^-1(dt); o_norm weight 1",
    }
    return model, report


def _is_jet_layer_attention(name: str, cfg: ModelConfig) -> bool:
    parts = name.split(".")
    return (len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
            and int(parts[2]) < cfg.num_hidden_layers and cfg.layer_types[int(parts[2])] == "jet"
            and parts[3] == "self_attn")
