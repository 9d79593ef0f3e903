"""ModelConfig: presets, HF config.json in both schemas, and errors that name the field."""

import json
import os

import pytest

from jetnemo_jax import config
from jetnemo_jax.config import ConfigError, ModelConfig

OFFICIAL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "official_configs")


def official(name):
    path = os.path.join(OFFICIAL, f"jet_nemotron_{name}_config.json")
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("name", ["2b", "4b"])
def test_official_configs_match_presets(name):
    d = official(name)
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg == config.preset(f"jet_nemotron_{name}").replace(max_position_embeddings=cfg.max_position_embeddings)
    # Writing it back gives the official schema, field for field, for everything that defines the model.
    out = cfg.to_hf_dict()
    for key in ("model_type", "architectures", "auto_map", "layer_types", "hidden_size", "intermediate_size",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
                "vocab_size", "num_hidden_layers"):
        assert out[key] == d[key], key
    eff, eff_ref = out["efficient_attention_config"], d["efficient_attention_config"]
    assert eff["swa"] == eff_ref["swa"]
    for key in ("num_heads", "head_dim", "norm_eps", "conv_size", "dconv_generator_reduction", "mode"):
        assert eff["jet"][key] == eff_ref["jet"][key], key
    assert abs(eff["jet"]["expand_v"] - eff_ref["jet"]["expand_v"]) < 1e-9
    assert isinstance(eff["jet"]["norm_eps"], str)
    assert ModelConfig.from_hf_dict(out) == cfg


def test_preset_layouts():
    c2, c4 = config.jet_nemotron_2b(), config.jet_nemotron_4b()
    assert [i for i, t in enumerate(c2.layer_types) if t == "attn"] == [14, 19]
    assert [i for i, t in enumerate(c2.layer_types) if t == "swa"] == [20, 21]
    assert [i for i, t in enumerate(c4.layer_types) if t == "attn"] == [17, 20, 32]
    assert [i for i, t in enumerate(c4.layer_types) if t == "swa"] == [5, 16, 19, 21, 22, 25, 27]
    assert (c2.jet.head_dim, c2.jet.head_v_dim, c2.jet.num_heads) == (96, 256, 12)
    assert (c4.jet.head_dim, c4.jet.head_v_dim, c4.jet.num_heads) == (128, 256, 16)
    assert set(config.qwen2_5_1_5b().layer_types) == {"attn"}


def test_qwen2_schema_round_trip_and_transformers_output():
    from transformers import Qwen2Config

    hf = Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False).to_diff_dict()
    cfg = ModelConfig.from_hf_dict(hf)
    assert cfg.layer_types == ("attn",) * 3 and cfg.rope_theta == 10000.0 and not cfg.tie_word_embeddings
    out = cfg.to_hf_dict()
    assert out["model_type"] == "qwen2"
    again = Qwen2Config(**{k: v for k, v in out.items() if k != "model_type"})
    assert ModelConfig.from_hf_dict(again.to_diff_dict()) == cfg


def test_qwen25_style_config_with_disabled_sliding_window():
    d = {"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
         "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "rope_theta": 1e6,
         "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 21, "torch_dtype": "bfloat16",
         "tie_word_embeddings": True}
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.layer_types == ("attn", "attn") and cfg.rope_theta == 1e6


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d.update(model_type="llama"), "model_type"),
    (lambda d: d.update(hidden_sise=5), "hidden_sise"),
    (lambda d: d.pop("vocab_size"), "vocab_size"),
    (lambda d: d.update(num_hidden_layers=27), "layer_types"),
    (lambda d: d["layer_types"].__setitem__(3, "mamba"), "layer_types\\[3\\]"),
    (lambda d: d["efficient_attention_config"].pop("swa"), "swa"),
    (lambda d: d["efficient_attention_config"]["jet"].update(expand_v=2.01), "expand_v"),
    (lambda d: d["efficient_attention_config"]["jet"].update(head_size=3), "head_size"),
    (lambda d: d.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    (lambda d: d.update(num_key_value_heads=5), "num_key_value_heads"),
    (lambda d: d.update(hidden_act="gelu"), "hidden_act"),
])
def test_bad_fields_are_named(mutate, field):
    d = official("2b")
    mutate(d)
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf_dict(d)


def test_bad_presets_and_fields():
    with pytest.raises(ConfigError, match="unknown preset"):
        config.preset("jet_nemotron_3b")
    with pytest.raises(ConfigError, match="unknown ModelConfig field"):
        config.tiny(hidden_sise=3)
    with pytest.raises(ConfigError, match="gdr_impl"):
        config.tiny(gdr_impl="fast")
    with pytest.raises(ConfigError, match="sliding_window"):
        config.tiny(sliding_window=None)


def test_from_hf_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_hf_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf_file(tmp_path)
