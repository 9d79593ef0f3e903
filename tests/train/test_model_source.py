"""The stage configs take the model's sizes from init.path: stage 1 from any Qwen2 checkpoint, stage 2 from
stage 1's final/ config.json, with no model flags; conflicting flags are named."""

import dataclasses
import json
import logging

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from jetnemo_jax import config as mc
from jetnemo_jax import sharding
from jetnemo_jax.config import ConfigError
from jetnemo_jax.train.config import check_keys, resolve_model_config, to_model_config
from jetnemo_jax.train.recipes import stage1, stage2
from tests.train.runs import ROOT

TYPES = "jet,jet,attn,jet,swa,jet"


def qwen2_checkpoint(path, rng, weights=False, **sizes):
    """A Qwen2 directory made by transformers with sizes no preset has (random ones where not given)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    heads = sizes.pop("num_attention_heads", 4)
    hf = Qwen2Config(vocab_size=int(rng.integers(100, 400)), hidden_size=16 * heads, num_attention_heads=heads,
                     num_key_value_heads=2, intermediate_size=int(rng.integers(40, 120)), num_hidden_layers=6,
                     tie_word_embeddings=True, max_position_embeddings=int(rng.integers(256, 4096)),
                     rope_theta=float(rng.integers(10**4, 10**6)), bos_token_id=1, eos_token_id=2, **sizes)
    if weights:
        torch.manual_seed(int(rng.integers(1 << 30)))
        Qwen2ForCausalLM(hf).save_pretrained(path)
    else:
        hf.save_pretrained(path)
    return mc.ModelConfig.from_hf_file(path)


def parse_flags(config_file, *args):
    """What train.py's --config and --config.* flags make of `args`."""
    fv = flags.FlagValues()
    argv = ["train.py", f"--config={ROOT / 'configs' / config_file}", *args]
    config_flags.DEFINE_config_file("config", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def test_stage1_sizes_come_from_init_path_with_layer_types_from_the_command_line(tmp_path, rng):
    source = qwen2_checkpoint(tmp_path / "qwen", rng)
    c = parse_flags("jet_nemotron_2b_stage1.py", f"--config.init.path={tmp_path / 'qwen'}",
                    f"--config.model.layer_types={TYPES}")
    check_keys(c)
    cfg = resolve_model_config(c)
    assert cfg == mc.jet_layout(source, "jet_nemotron_2b", TYPES, dtype=cfg.dtype)
    assert cfg.hidden_size == source.hidden_size and cfg.vocab_size == source.vocab_size
    assert cfg.max_position_embeddings == source.max_position_embeddings and cfg.rope_theta == source.rope_theta
    assert cfg.jet.num_heads == 4 and cfg.jet.head_v_dim == 32 and cfg.sliding_window == 1152
    assert cfg.dtype == "bfloat16"  # numerics are the config's


def test_stage1_keeps_what_the_user_sets(tmp_path, rng):
    qwen2_checkpoint(tmp_path / "qwen", rng, num_attention_heads=8)
    c = stage1("jet_nemotron_4b")
    c.init.path = str(tmp_path / "qwen")
    c.model.layer_types = tuple(TYPES.split(","))
    c.model.jet.head_dim = 32
    c.model.max_position_embeddings = 1000
    c.model.num_attention_heads = 8  # the source's value: allowed
    cfg = resolve_model_config(c)
    assert cfg.jet.head_dim == 32 and cfg.jet.num_heads == 8 and cfg.max_position_embeddings == 1000
    assert cfg.sliding_window == 2048  # the 4B recipe's


def test_stage1_without_placement_asks_for_layer_types_in_one_line(tmp_path, rng):
    qwen2_checkpoint(tmp_path / "qwen", rng)
    c = stage1("jet_nemotron_2b")
    c.init.path = str(tmp_path / "qwen")
    with pytest.raises(ConfigError) as e:
        resolve_model_config(c)
    msg = str(e.value)
    assert "\n" not in msg and "6 layers" in msg and "--config.model.layer_types=jet,jet,attn,..." in msg


def test_stage1_refuses_sizes_the_source_does_not_have(tmp_path, rng):
    source = qwen2_checkpoint(tmp_path / "qwen", rng)
    c = stage1("jet_nemotron_2b")
    c.init.path = str(tmp_path / "qwen")
    c.model.layer_types = tuple(TYPES.split(","))
    c.model.hidden_size = 1536
    c.model.tie_word_embeddings = False
    with pytest.raises(ConfigError) as e:
        resolve_model_config(c)
    lines = str(e.value).splitlines()
    assert lines[1:] == [f"  hidden_size: 1536 != {source.hidden_size}", "  tie_word_embeddings: False != True"]


def test_stage2_takes_every_field_from_final_and_names_conflicts(tmp_path, rng):
    source = qwen2_checkpoint(tmp_path / "qwen", rng)
    trained = mc.jet_layout(source, layer_types=TYPES, sliding_window=int(rng.integers(8, 64)))
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text(json.dumps(trained.to_hf_dict()))
    c = parse_flags("jet_nemotron_2b_stage2.py", f"--config.init.path={tmp_path / 'final'}",
                    "--config.model.dtype=float32")
    assert resolve_model_config(c) == trained.replace(dtype="float32")
    c.model.hidden_size = trained.hidden_size  # agreeing settings are fine
    c.model.layer_types = (",".join(trained.layer_types),)  # as the command line gives it
    assert resolve_model_config(c) == trained.replace(dtype="float32")
    c.model.max_position_embeddings = trained.max_position_embeddings + 1
    c.model.jet.head_dim = trained.jet.head_dim + 16
    with pytest.raises(ConfigError) as e:
        resolve_model_config(c)
    lines = str(e.value).splitlines()
    assert "init.mode=params" in lines[0]
    assert lines[1:] == [
        f"  max_position_embeddings: {trained.max_position_embeddings + 1} != {trained.max_position_embeddings}",
        f"  jet.head_dim: {trained.jet.head_dim + 16} != {trained.jet.head_dim}"]


def test_stage1_from_a_hybrid_checkpoint_points_to_stage2(tmp_path):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text(json.dumps(mc.tiny().to_hf_dict()))
    c = stage1("jet_nemotron_2b")
    c.init.path = str(tmp_path / "final")
    with pytest.raises(ConfigError, match="not an all-attention Qwen2 model.*init.mode=params"):
        resolve_model_config(c)


def test_no_init_path_uses_the_preset_and_says_so(caplog):
    c = stage1("jet_nemotron_4b")
    with caplog.at_level(logging.WARNING, logger="jetnemo_jax"):
        assert resolve_model_config(c) == mc.jet_nemotron_4b()
    assert "no init.path" in caplog.text and "jet_nemotron_4b" in caplog.text
    assert to_model_config(c.model) == mc.jet_nemotron_4b()


def test_unset_section_has_every_model_field():
    fields = {f.name for f in dataclasses.fields(mc.ModelConfig)}
    model = stage2("jet_nemotron_2b").model
    assert set(model.keys()) - {"recipe"} == fields
    assert set(model.jet.keys()) == {f.name for f in dataclasses.fields(mc.JetBlockConfig)}


def test_stage1_from_a_random_size_checkpoint_builds_and_loads(tmp_path, rng):
    """build() resolves the sizes and initial_params converts the transformers-made weights into them."""
    from jetnemo_jax.train.loop import initial_params
    from jetnemo_jax.train.program import build

    qwen2_checkpoint(tmp_path / "qwen", rng, weights=True)
    c = stage1("jet_nemotron_2b")
    c.init.path = str(tmp_path / "qwen")
    c.model.layer_types = tuple(TYPES.split(","))
    c.model.dtype = "float32"
    c.data.seq_len, c.data.global_batch = 32, 2
    program = build(c, sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
    trainable, frozen, teacher = initial_params(c, program)
    assert program.model_config.layer_types == tuple(TYPES.split(","))
    assert "model/layers/0/self_attn/q_proj/kernel" in trainable and teacher
    assert np.isfinite(np.asarray(frozen["model/embed_tokens/embedding"])).all()
