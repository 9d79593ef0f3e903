"""config.model -> ModelConfig, with the fields a config leaves unset (None) read from the run's checkpoint.

The stage configs (recipes.py) leave unset every field a checkpoint decides, so one config trains from any
Qwen2.5-architecture model:
- init.mode="qwen2" (stage 1): the sizes are those of init.path's config.json, the hybrid's layout comes from
  `jet_layout` (the recipe's placement and window, the JetBlock rule). Fields the config sets are kept; a
  set size that the source's weights do not have is refused.
- init.mode="params" (stage 2): every field from init.path's config.json (stage 1's final/); a set field
  that differs from it is refused, each named on its own line.
- no init.path (random init, train.py --compile_only): the recipe preset's sizes, with a warning.
Numerics (dtype, param_dtype, gdr_impl, conv_impl) are always the config's: config.json does not hold them.
"""

from __future__ import annotations

import dataclasses
import logging

import ml_collections
from ml_collections import config_dict

from jetnemo_jax import config as mc

log = logging.getLogger(__name__)

# The type of each field a checkpoint or the layout rule decides (the placeholders' types).
_TYPES = {
    "vocab_size": int, "hidden_size": int, "intermediate_size": int, "num_attention_heads": int,
    "num_key_value_heads": int, "head_dim": int, "rms_norm_eps": float, "rope_theta": float,
    "tie_word_embeddings": bool, "max_position_embeddings": int, "initializer_range": float,
    "bos_token_id": int, "eos_token_id": int, "layer_types": tuple, "sliding_window": int,
}
_JET_TYPES = {"num_heads": int, "head_dim": int, "head_v_dim": int, "conv_size": int, "generator_reduction": int,
              "norm_eps": float}


def unset_section(recipe: str) -> ml_collections.ConfigDict:
    """A model section for a run from a checkpoint: `recipe` (one of jetnemo_jax.config.JET_RECIPES) names
    the layout, every field a checkpoint or the layout rule decides is an unset placeholder that the
    command line can set (layer_types also as "jet,jet,attn,..."), numerics are ModelConfig's defaults."""
    if recipe not in mc.JET_RECIPES:
        raise mc.ConfigError(f"unknown layout recipe {recipe!r}; choose from {', '.join(mc.JET_RECIPES)}")
    defaults = {f.name: f.default for f in dataclasses.fields(mc.ModelConfig)}
    c = ml_collections.ConfigDict({"recipe": recipe})
    for name, kind in _TYPES.items():
        c[name] = config_dict.placeholder(kind)
    c.jet = ml_collections.ConfigDict({name: config_dict.placeholder(kind) for name, kind in _JET_TYPES.items()})
    for name in mc.NUMERICS_FIELDS:
        c[name] = defaults[name]
    return c


def _fields(section) -> tuple[str | None, dict, dict]:
    """(recipe, the set top-level fields, the set JetBlock fields) of a model section."""
    d = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    recipe = d.pop("recipe", None)
    jet = {k: v for k, v in dict(d.pop("jet", None) or {}).items() if v is not None}
    top = {k: v for k, v in d.items() if v is not None}
    if "layer_types" in top:
        top["layer_types"] = mc.parse_layer_types(top["layer_types"])
    return recipe, top, jet


def _build(top: dict, jet: dict) -> mc.ModelConfig:
    required = [f.name for f in dataclasses.fields(mc.ModelConfig) if f.default is dataclasses.MISSING]
    missing = [name for name in required if name not in top]
    if missing:
        raise mc.ConfigError(f"config.model.{missing[0]} is unset: set it, or init.path to read it from a checkpoint")
    # The JetBlock section is always present in the config; the model gets it where it has JetBlocks.
    block = mc.JetBlockConfig(**jet) if "jet" in top["layer_types"] else None
    return mc.ModelConfig(**top, jet=block)


def section_config(section) -> mc.ModelConfig:
    """The section's ModelConfig without reading any checkpoint: unset fields of a recipe section take the
    recipe preset's values."""
    recipe, top, jet = _fields(section)
    if recipe:
        base = mc.preset(recipe)
        top = {**{f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.name != "jet"}, **top}
        jet = {**dataclasses.asdict(base.jet), **jet}
    return _build(top, jet)


def resolve(section, mode: str, path: str) -> mc.ModelConfig:
    """The run's ModelConfig (see the module docstring); ConfigError naming each conflicting field."""
    recipe, top, jet = _fields(section)
    if not path or mode not in ("qwen2", "params"):
        if recipe and set(_TYPES) - set(top):
            log.warning("config.model: no init.path, so its unset fields take the %s preset's values (set "
                        "init.path to read them from a checkpoint)", recipe)
        return section_config(section)
    numerics = {k: top.pop(k) for k in mc.NUMERICS_FIELDS if k in top}
    ckpt = mc.ModelConfig.from_hf_file(path)
    if mode == "params":
        theirs = dataclasses.asdict(ckpt)
        if ckpt.jet is not None and jet:
            top["jet"] = jet
        if "swa" not in ckpt.layer_types:
            top.pop("sliding_window", None)  # no effect on this model
        diff = mc.config_diff(top, {k: _restrict(theirs.get(k), top[k]) for k in top})
        if diff:
            raise mc.ConfigError(
                f"config.model differs from the model at init.path={path}, and init.mode=params takes every model "
                "field from it: drop these settings or give the checkpoint's values (config != checkpoint):\n  "
                + "\n  ".join(diff))
        return ckpt.replace(**numerics)
    if set(ckpt.layer_types) != {"attn"}:
        raise mc.ConfigError(
            f"init.path={path} holds layer types {sorted(set(ckpt.layer_types))}, not an all-attention Qwen2 model: "
            "init.mode=qwen2 (stage 1) starts from Qwen2.5; to continue from a Jet-Nemotron checkpoint use "
            "init.mode=params (the stage-2 configs)")
    shape = {k: top.pop(k) for k in mc.SOURCE_SHAPE_FIELDS if k in top}
    diff = mc.config_diff(shape, {k: getattr(ckpt, k) for k in shape})
    if diff:
        raise mc.ConfigError(
            f"config.model sets sizes that the model at init.path={path} does not have, and init.mode=qwen2 takes "
            "them from it: drop these settings (config != checkpoint):\n  " + "\n  ".join(diff))
    layer_types = top.pop("layer_types", None)
    return mc.jet_layout(ckpt, recipe, layer_types, jet=jet, **top, **numerics)


def _restrict(theirs, mine):
    """The checkpoint's value, reduced to the JetBlock fields the config sets."""
    return {k: theirs[k] for k in mine} if isinstance(mine, dict) else theirs
