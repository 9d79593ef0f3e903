"""The search's result as a train.py config: the searched `layer_types` (and JetBlock shape) in a stage-1
run that starts from the original model and distils from it.

`write_config` writes a small Python config file (literal arguments to `train_config`), so
`python train.py --config <workdir>/searched_config.py` trains the hybrid PostNAS found.
"""

from __future__ import annotations

import dataclasses
import pprint

import ml_collections

from jetnemo_jax.train import recipes
from jetnemo_jax.train.config import default_config


def train_config(*, layer_types, jet: dict, init_path: str, model: dict | None = None, preset: str = "",
                 overrides: dict | None = None) -> ml_collections.ConfigDict:
    """Stage 1 (MLPs, embeddings and norms frozen; KL distillation from the original) of the hybrid with
    `layer_types` and JetBlock `jet`, initialised from the all-attention original at `init_path` (an HF
    Qwen2 directory). Full size: `preset` names a recipe preset; small: `model` gives every model field.
    `overrides`: {section: {key: value}} applied last (data source, steps, ...); keys must exist."""
    if bool(preset) == (model is not None):
        raise ValueError("give exactly one of preset (a recipes.stage1 preset) or model (a model section dict)")
    if preset:
        c = recipes.stage1(preset)
    else:
        c = default_config()
        c.model = ml_collections.ConfigDict(model)
        c.train.frozen = recipes.STAGE1_FROZEN
        c.distill.enabled = True
    c.init.mode, c.init.path = "qwen2", init_path
    c.model.layer_types = tuple(layer_types)
    c.model.jet.update(jet)
    _override(c, overrides or {}, "")
    return c


def _override(target, values: dict, prefix: str) -> None:
    for key, value in values.items():
        if key not in target:
            raise KeyError(f"handoff override {prefix}{key}: the train config has no such key")
        if isinstance(value, dict):
            _override(target[key], value, f"{prefix}{key}.")
        else:
            target[key] = value


def write_config(path, *, header: str, **kwargs) -> None:
    """A train.py config file calling `train_config(**kwargs)`; `header` becomes its docstring."""
    body = pprint.pformat(kwargs, width=100, sort_dicts=False)
    text = (f'"""{header}"""\n\nfrom jetnemo_jax.nas.handoff import train_config\n\nARGS = {body}\n\n\n'
            "def get_config():\n    return train_config(**ARGS)\n")
    with open(path, "w") as f:
        f.write(text)


def model_dict(cfg) -> dict:
    """A ModelConfig as the train config's model section (a plain dict)."""
    d = dataclasses.asdict(cfg)
    d["layer_types"] = tuple(d["layer_types"])
    return d
