"""ModelConfig: presets, HF config.json in both schemas, the hybrid of any Qwen2 source, and errors that name
the field."""

import dataclasses
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


# ----------------------------------------------------------------------- the hybrid of any Qwen2 source
def qwen_source(layers, hidden, heads, kv, inter, tied, vocab=151936, **kw):
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                       num_key_value_heads=kv, layer_types=("attn",) * layers, tie_word_embeddings=tied, **kw)


QWEN25 = {  # Qwen2.5 shapes: layers, hidden, heads, kv heads, MLP, tied
    "0.5B": (24, 896, 14, 2, 4864, True), "1.5B": (28, 1536, 12, 2, 8960, True),
    "3B": (36, 2048, 16, 2, 11008, True), "7B": (28, 3584, 28, 4, 18944, False),
}


def assert_keeps_source_sizes(hybrid, source):
    for f in dataclasses.fields(ModelConfig):
        if f.name not in ("layer_types", "jet", "sliding_window"):
            assert getattr(hybrid, f.name) == getattr(source, f.name), f.name


def test_jet_layout_of_the_released_sources_is_the_released_models():
    q15 = config.qwen2_5_1_5b(max_position_embeddings=32768)
    assert config.jet_layout(q15) == config.jet_nemotron_2b(max_position_embeddings=32768)
    assert config.jet_layout(config.qwen2_5_3b(), "jet_nemotron_4b") == config.jet_nemotron_4b()


@pytest.mark.parametrize("name", sorted(QWEN25))
def test_jet_layout_of_qwen25_shapes(name):
    source = qwen_source(*QWEN25[name], rope_theta=1e6, bos_token_id=151643, eos_token_id=151645)
    n = source.num_hidden_layers
    types = ("jet",) * (n - 3) + ("attn", "swa", "attn") if name == "0.5B" else None
    hybrid = config.jet_layout(source, layer_types=types)
    assert_keeps_source_sizes(hybrid, source)
    expect = {"0.5B": (14, 48, 128), "1.5B": (12, 96, 256), "3B": (16, 128, 256), "7B": (28, 96, 256)}[name]
    assert (hybrid.jet.num_heads, hybrid.jet.head_dim, hybrid.jet.head_v_dim) == expect
    assert (hybrid.jet.conv_size, hybrid.jet.generator_reduction) == (4, 8)
    placement = {28: ((14, 19), (20, 21)), 36: ((17, 20, 32), (5, 16, 19, 21, 22, 25, 27))}
    if n in placement:
        attn, swa = placement[n]
        assert [i for i, t in enumerate(hybrid.layer_types) if t == "attn"] == list(attn)
        assert [i for i, t in enumerate(hybrid.layer_types) if t == "swa"] == list(swa)
        assert hybrid.sliding_window == (1152 if n == 28 else 2048)
    else:
        assert hybrid.layer_types == types and hybrid.sliding_window == 1152
    # It writes and reads back as an HF Jet-Nemotron config.
    assert ModelConfig.from_hf_dict(hybrid.to_hf_dict()) == hybrid


def test_jet_layout_rule_for_random_sizes(rng):
    heads = int(rng.integers(1, 9))
    head_dim = 2 * int(rng.integers(4, 81))
    kv = int(rng.choice([d for d in range(1, heads + 1) if heads % d == 0]))
    source = qwen_source(int(rng.integers(1, 12)), heads * head_dim, heads, kv, int(rng.integers(8, 500)),
                         bool(rng.integers(2)), vocab=int(rng.integers(10, 1000)), rms_norm_eps=1e-5,
                         rope_theta=float(rng.integers(1000, 10**6)),
                         max_position_embeddings=int(rng.integers(64, 10**5)))
    n = source.num_hidden_layers
    types = tuple(rng.choice(["attn", "swa", "jet"], n).tolist())
    hybrid = config.jet_layout(source, layer_types=",".join(types))  # the command line's form
    assert hybrid.layer_types == types
    assert_keeps_source_sizes(hybrid, source)
    if "jet" in types:
        j = hybrid.jet
        assert j.num_heads == heads and j.head_v_dim == 2 * head_dim
        # dk: 3/4 of the head dim rounded to a multiple of 16, at least 16 (head dims under 11 get 16)
        assert j.head_dim % 16 == 0 and abs(j.head_dim - max(16, 0.75 * head_dim)) <= 8
    else:
        assert hybrid.jet is None
    assert hybrid.sliding_window == (1152 if "swa" in types else None)


def test_jet_layout_overrides_are_kept():
    source = qwen_source(6, 64, 4, 2, 96, True, vocab=300)
    hybrid = config.jet_layout(source, "jet_nemotron_4b", ["jet", "attn", "swa"] * 2, jet={"head_dim": 64},
                               max_position_embeddings=512, dtype="float32", hidden_size=64)
    assert hybrid.jet.head_dim == 64 and hybrid.jet.head_v_dim == 32 and hybrid.jet.num_heads == 4
    assert hybrid.sliding_window == 2048 and hybrid.max_position_embeddings == 512 and hybrid.dtype == "float32"
    block = config.JetBlockConfig(num_heads=2, head_dim=16, head_v_dim=16)
    assert config.jet_layout(source, layer_types="jet," * 6, jet=block, sliding_window=7).jet == block


def test_jet_layout_errors_are_one_line_naming_what_to_pass():
    source = qwen_source(24, 896, 14, 2, 4864, True)
    with pytest.raises(ConfigError) as e:
        config.jet_layout(source)
    msg = str(e.value)
    assert "\n" not in msg and "24 layers" in msg and "--config.model.layer_types=jet,jet,attn,..." in msg
    assert "attn, swa, jet" in msg
    with pytest.raises(ConfigError, match="--layer-types=jet"):
        config.jet_layout(source, layer_types_flag="--layer-types")
    with pytest.raises(ConfigError, match="placement is for 28 layers but the source has 36: use the jet_nemotron_4b"):
        config.jet_layout(config.qwen2_5_3b(), "jet_nemotron_2b")
    with pytest.raises(ConfigError, match="3 entries but the source has 24"):
        config.jet_layout(source, layer_types="jet,attn,jet")
    with pytest.raises(ConfigError, match=r"layer_types\[1\]='mamba'"):
        config.jet_layout(source, layer_types="jet,mamba")
    with pytest.raises(ConfigError, match="hidden_size: 1024 != 896"):
        config.jet_layout(source, layer_types="jet," * 24, hidden_size=1024)
    with pytest.raises(ConfigError, match="unknown layout recipe 'tiny'"):
        config.jet_layout(source, "tiny")
    with pytest.raises(ConfigError, match="all-attention"):
        config.jet_layout(config.jet_nemotron_2b())


def test_config_diff_names_each_field():
    a = config.jet_nemotron_2b()
    assert config.config_diff(a, a) == []
    b = a.replace(max_position_embeddings=4096, layer_types=("jet",) * 28,
                  jet=dataclasses.replace(a.jet, head_dim=64))
    assert config.config_diff(a, b) == [
        f"layer_types: {','.join(a.layer_types)} != {','.join(('jet',) * 28)}",
        "max_position_embeddings: 131072 != 4096", "jet.head_dim: 96 != 64"]
    assert config.config_diff({"jet": None}, {"jet": {"head_dim": 1}}) == ["jet: None != {'head_dim': 1}"]
