"""Loading HF safetensors directories: round trip of names and values, sharding, and clear errors."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from jetnemo_jax import config
from jetnemo_jax.checkpoint import CheckpointError, load_hf_model, to_state_dict
from jetnemo_jax.config import ConfigError
from jetnemo_jax.model import JetNemotronForCausalLM


def write_dir(path, cfg, tensors, shards=1):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(path / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def make_saved(kind, tmp_path, rng):
    cfg = config.tiny(layer_types=("attn",) * 2, tie_word_embeddings=False) if kind == "qwen" else config.tiny()
    model = JetNemotronForCausalLM(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    return cfg, model, to_state_dict(model), tmp_path / "ckpt"


@pytest.fixture(params=["qwen", "hybrid"])
def saved(request, tmp_path, rng):
    return make_saved(request.param, tmp_path, rng)


@pytest.mark.parametrize("shards", [1, 3])
def test_load_reproduces_model(saved, shards):
    cfg, model, tensors, path = saved
    write_dir(path, cfg, tensors, shards=shards)
    loaded = load_hf_model(path, dtype=cfg.dtype)
    again = to_state_dict(loaded)
    assert sorted(again) == sorted(tensors)
    for name in tensors:
        np.testing.assert_array_equal(again[name], tensors[name], err_msg=name)
    ids = jnp.arange(24).reshape(2, 12) % cfg.vocab_size
    np.testing.assert_array_equal(loaded(ids), model(ids))


def test_official_names_for_the_2b_preset():
    model = nnx.eval_shape(lambda: JetNemotronForCausalLM(config.jet_nemotron_2b(), rngs=nnx.Rngs(0)))
    from jetnemo_jax.checkpoint.state_dict import param_entries
    shapes = {name: (tuple(var.shape[::-1]) if path[-1] == "kernel" else tuple(var.shape))
              for name, path, var in param_entries(model)}
    p = "model.layers.0.self_attn."
    expect = {"q_proj.weight": (1152, 1536), "k_proj.weight": (1152, 1536), "v_proj.weight": (3072, 1536),
              "g_proj.weight": (3072, 1536), "a_proj.weight": (12, 1536), "b_proj.weight": (12, 1536),
              "o_proj.weight": (1536, 3072), "A_log": (12,), "dt_bias": (12,), "o_norm.weight": (256,),
              "dynamic_conv1d.kernel_generator.w1.weight": (384, 1536),
              "dynamic_conv1d.kernel_generator.w2.weight": (12288, 384),
              "dynamic_conv1d.kernel_generator.w2.bias": (12288,)}
    for name, shape in expect.items():
        assert shapes.pop(p + name) == shape, name
    assert shapes["model.layers.14.self_attn.q_proj.bias"] == (1536,)
    assert shapes["model.layers.14.self_attn.k_proj.weight"] == (256, 1536)
    assert shapes["model.embed_tokens.weight"] == (151936, 1536)
    assert "lm_head.weight" not in shapes
    assert not any(n.startswith(p) for n in shapes)  # nothing else in a JetBlock


def test_tied_lm_head_in_file_is_accepted(tmp_path, rng):
    cfg, _, tensors, path = make_saved("hybrid", tmp_path, rng)
    assert cfg.tie_word_embeddings
    write_dir(path, cfg, {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]})
    load_hf_model(path)


@pytest.mark.parametrize("damage,message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor model.layers.1.mlp.up_proj.weight"),
    (lambda t: t.update({"model.layers.9.mlp.up_proj.weight": np.zeros(3, np.float32)}),
     "unexpected tensor model.layers.9.mlp.up_proj.weight"),
    (lambda t: t.update({"model.norm.weight": np.zeros(7, np.float32)}),
     r"tensor model.norm.weight has shape \(7,\), expected \(128,\)"),
    (lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype("int32")}),
     "tensor model.norm.weight has dtype I32"),
])
def test_bad_tensors_are_named(saved, damage, message):
    cfg, _, tensors, path = saved
    damage(tensors)
    write_dir(path, cfg, tensors)
    with pytest.raises(CheckpointError, match=message):
        load_hf_model(path)


def test_truncated_file(saved):
    cfg, _, tensors, path = saved
    write_dir(path, cfg, tensors)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf_model(path)


def test_missing_shard_and_empty_dir(saved):
    cfg, _, tensors, path = saved
    write_dir(path, cfg, tensors, shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_hf_model(path)
    empty = path.parent / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_hf_model(empty)


def test_non_qwen2_checkpoint(saved):
    cfg, _, tensors, path = saved
    write_dir(path, cfg, tensors)
    d = json.loads((path / "config.json").read_text())
    d["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="model_type='llama'"):
        load_hf_model(path)


def test_layer_types_disagree_with_tensors(tmp_path, rng):
    cfg, _, tensors, path = make_saved("hybrid", tmp_path, rng)
    swapped = cfg.replace(layer_types=tuple(reversed(cfg.layer_types)))
    assert swapped != cfg
    write_dir(path, swapped, tensors)
    with pytest.raises(CheckpointError, match="model.layers"):
        load_hf_model(path)
