"""The search's hand-off: a written config file that train.py's program builds, converting the original
all-attention checkpoint to the searched layer types and distilling from it."""

import importlib.util

import jax
import numpy as np
import pytest

from jetnemo_jax import config as model_config
from jetnemo_jax import sharding
from jetnemo_jax.checkpoint.hf_export import save_hf
from jetnemo_jax.nas import handoff, search
from jetnemo_jax.train.config import check_keys, to_model_config
from jetnemo_jax.train.loop import initial_params
from jetnemo_jax.train.program import build
from tests.checkpoint.test_convert import random_model

ORIGINAL = model_config.tiny(layer_types=("attn",) * 5, dtype="float32", sliding_window=None)


def _load(path):
    spec = importlib.util.spec_from_file_location("searched_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_written_config_trains_the_searched_placement(tmp_path, rng):
    original = tmp_path / "original"
    save_hf(random_model(ORIGINAL, rng), original, dtype="float32")
    placement = search.uniform_placement(5, 2)
    layer_types = tuple("attn" if i in placement else "jet" for i in range(5))
    jet = {"num_heads": 2, "head_dim": 16, "head_v_dim": 32}
    path = tmp_path / "searched_config.py"
    handoff.write_config(path, header="test", layer_types=layer_types, jet=jet, init_path=str(original),
                         model=handoff.model_dict(ORIGINAL),
                         overrides={"workdir": str(tmp_path / "run"), "data": {"seq_len": 32, "global_batch": 4}})
    c = _load(path)
    check_keys(c)
    cfg = to_model_config(c.model)
    assert cfg.layer_types == layer_types and "attn" in layer_types and cfg.jet.head_v_dim == 32
    assert c.init.mode == "qwen2" and c.distill.enabled and c.train.frozen
    program = build(c, sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
    trainable, frozen, teacher = initial_params(c, program)
    jet_layers = [i for i, t in enumerate(layer_types) if t == "jet"]
    assert any(n.startswith(f"model/layers/{jet_layers[0]}/self_attn/") for n in trainable)
    batch = {"tokens": rng.integers(0, 512, (4, 32)).astype(np.int32), "segment_ids": np.ones((4, 32), np.int32)}
    _, metrics = program.step_fn(program.init_state(trainable), frozen, teacher, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["kl"]) > 0


def test_unknown_override_fails(tmp_path):
    with pytest.raises(KeyError, match="data.seq_lenn"):
        handoff.train_config(layer_types=("attn",), jet={}, init_path="x", model=handoff.model_dict(ORIGINAL),
                             overrides={"data": {"seq_lenn": 3}})
    with pytest.raises(ValueError):
        handoff.train_config(layer_types=("attn",), jet={}, init_path="x")
