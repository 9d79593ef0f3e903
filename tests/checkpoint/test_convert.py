"""convert_torch_ckpt.py: JAX <-> HF round trips are bit-exact; exports load into PyTorch strictly."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

import convert_torch_ckpt
from jetnemo_jax import config
from jetnemo_jax.checkpoint import load_hf_model, to_state_dict
from jetnemo_jax.checkpoint.hf_export import save_hf
from jetnemo_jax.checkpoint.orbax_params import load_params, save_params
from jetnemo_jax.data.tokenizer import find_tokenizer_dir, load_tokenizer, train_bpe
from jetnemo_jax.model import JetNemotronForCausalLM
from tests.oracles import rel_err
from tests.torch_reference import JetNemotronRef

HYBRID = config.tiny(vocab_size=150, hidden_size=64, intermediate_size=96, layer_types=("jet", "attn", "swa"),
                     sliding_window=5, jet=config.JetBlockConfig(num_heads=2, head_dim=32, head_v_dim=48))
QWEN = HYBRID.replace(layer_types=("attn", "attn"), tie_word_embeddings=False)


def random_model(cfg, rng, param_dtype="float32"):
    model = JetNemotronForCausalLM(cfg.replace(param_dtype=param_dtype), rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    # Randomise everything (the official init zeroes the conv generator) so every tensor is checked.
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    new = [jnp.asarray(rng.standard_normal(x.shape) * 0.05 + (1.0 if x.ndim == 1 else 0.0), x.dtype) for x in leaves]
    nnx.update(model, treedef.unflatten(new))
    return model


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def read_hf_tensors(directory):
    out = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, f)))
    return out


@pytest.mark.parametrize("cfg", [HYBRID, QWEN], ids=["hybrid_tied", "qwen_untied"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_jax_hf_jax_is_bit_exact(tmp_path, rng, cfg, dtype):
    model = random_model(cfg, rng, param_dtype=dtype)
    save_params(model, tmp_path / "jax")
    restored = load_params(tmp_path / "jax")
    assert_same_tensors(to_state_dict(restored), to_state_dict(model))
    save_hf(restored, tmp_path / "hf", dtype=dtype, max_shard_bytes=20_000)  # forces several shards
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = load_hf_model(tmp_path / "hf", param_dtype=dtype)
    assert_same_tensors(to_state_dict(back), to_state_dict(model))
    exported = read_hf_tensors(tmp_path / "hf")
    assert ("lm_head.weight" in exported) == (not cfg.tie_word_embeddings)
    assert exported["model.layers.0.input_layernorm.weight"].dtype == np.dtype(jnp.dtype(dtype))
    if "jet" in cfg.layer_types:
        assert exported["model.layers.0.self_attn.A_log"].dtype == np.float32
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["model_type"] == ("jet_nemotron" if "jet" in cfg.layer_types else "qwen2")


def test_hf_jax_hf_is_bit_exact_from_transformers(tmp_path, rng):
    import transformers

    torch.manual_seed(int(rng.integers(1 << 30)))
    hf_cfg = transformers.Qwen2Config(vocab_size=150, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    ref = transformers.Qwen2ForCausalLM(hf_cfg).to(torch.bfloat16)
    ref.save_pretrained(tmp_path / "src")
    assert convert_torch_ckpt.main(["hf-to-jax", str(tmp_path / "src"), str(tmp_path / "jax")]) == 0
    assert convert_torch_ckpt.main(["jax-to-hf", str(tmp_path / "jax"), str(tmp_path / "dst")]) == 0
    assert_same_tensors(read_hf_tensors(tmp_path / "dst"), read_hf_tensors(tmp_path / "src"))


def test_export_loads_into_pytorch_reference_strictly(tmp_path, rng):
    model = random_model(HYBRID.replace(dtype="float32"), rng)
    save_hf(model, tmp_path / "hf", dtype="float32")
    ref = JetNemotronRef(json.loads((tmp_path / "hf" / "config.json").read_text()))
    ref.load_state_dict({n: torch.from_numpy(x) for n, x in read_hf_tensors(tmp_path / "hf").items()}, strict=True)
    ids = rng.integers(0, HYBRID.vocab_size, (2, 21))
    with torch.no_grad():
        expect = ref.double()(torch.tensor(ids)).numpy()
    assert rel_err(model(jnp.asarray(ids)), expect) <= 1e-5


def test_qwen_export_loads_into_transformers(tmp_path, rng):
    import transformers

    model = random_model(QWEN.replace(dtype="float32"), rng)
    tok = train_bpe(["words for a tokenizer"] * 4, 280, tmp_path / "tok")
    save_hf(model, tmp_path / "hf", dtype="float32", tokenizer_dir=tmp_path / "tok")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")  # no custom code, no prompt
    assert hf_tok.encode("a tokenizer", add_special_tokens=False) == tok.encode("a tokenizer").tolist()
    ref = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    missing, unexpected = ref.load_state_dict(
        {n: torch.from_numpy(x) for n, x in read_hf_tensors(tmp_path / "hf").items()}, strict=False)
    assert not unexpected and not missing
    ids = rng.integers(0, QWEN.vocab_size, (2, 21))
    with torch.no_grad():
        expect = ref(torch.tensor(ids)).logits.numpy()
    assert rel_err(model(jnp.asarray(ids)), expect) <= 1e-5


def test_failed_export_leaves_nothing(tmp_path, rng):
    model = random_model(HYBRID, rng)
    (tmp_path / "tok").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        save_hf(model, tmp_path / "hf", tokenizer_dir=tmp_path / "tok")
    assert sorted(os.listdir(tmp_path)) == ["tok"]


def test_cli_check_and_errors(tmp_path, rng, capsys):
    model = random_model(HYBRID, rng, param_dtype="bfloat16")
    save_params(model, tmp_path / "jax")
    tok = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "qwen2.5-tokenizer")
    args = ["jax-to-hf", str(tmp_path / "jax"), str(tmp_path / "hf"), "--check"]
    if os.path.isdir(tok):
        args += ["--tokenizer", tok]
    assert convert_torch_ckpt.main(args) == 0
    assert "logits relative difference 0" in capsys.readouterr().out
    if os.path.isdir(tok):
        assert (tmp_path / "hf" / "vocab.json").exists()
    # The destination exists now: refusing to overwrite is a one-line error, exit code 2.
    assert convert_torch_ckpt.main(args) == 2
    assert "exists" in capsys.readouterr().err
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"\x00" * 64)
    assert convert_torch_ckpt.main(["hf-to-jax", str(tmp_path / "hf"), str(tmp_path / "jax2")]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "jax2").exists()
    # A destination under a file, and a bad --shard-size: one line each, naming the problem.
    (tmp_path / "a_file").write_text("")
    assert convert_torch_ckpt.main(["jax-to-hf", str(tmp_path / "jax"), str(tmp_path / "a_file" / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "its parent directory" in err and "a_file" in err and len(err.splitlines()) == 1, err
    with pytest.raises(SystemExit) as e:
        convert_torch_ckpt.main(["jax-to-hf", str(tmp_path / "jax"), str(tmp_path / "hf3"), "--shard-size", "10XB"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "'10XB': expected a positive size" in err.splitlines()[-1]


def test_exports_carry_the_tokenizer_are_readable_and_name_no_custom_code(tmp_path, rng, capsys):
    """A training workdir converts (its final/, its tokenizer); every file written is readable by all."""
    run = tmp_path / "run"
    tok = train_bpe(["a corpus for the tokenizer " * 3] * 5, 300, run / "tokenizer")
    save_params(random_model(HYBRID, rng), run / "final")
    assert convert_torch_ckpt.main(["jax-to-hf", str(run), str(tmp_path / "hf")]) == 0
    assert convert_torch_ckpt.main(["hf-to-jax", str(tmp_path / "hf"), str(tmp_path / "jax")]) == 0
    text = "the corpus, tokenized"
    for d in (tmp_path / "hf", tmp_path / "jax"):
        assert load_tokenizer(d).path == d and (load_tokenizer(d).encode(text) == tok.encode(text)).all()
        assert "auto_map" not in json.loads((d / "config.json").read_text())
        for path in [d, *d.rglob("*")]:
            want = 0o755 if path.is_dir() else 0o644
            assert path.stat().st_mode & want == want, (oct(path.stat().st_mode), path)
    (tmp_path / "bad_tok").mkdir()
    (tmp_path / "bad_tok" / "tokenizer.json").write_text("{")
    capsys.readouterr()
    assert convert_torch_ckpt.main(["jax-to-hf", str(run / "final"), str(tmp_path / "hf2"), "--tokenizer",
                                    str(tmp_path / "bad_tok")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a readable tokenizer.json" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "hf2").exists()


def test_qwen2_to_jet(tmp_path, rng):
    """Shared tensors are copied bit for bit, attention layers keep theirs, JetBlocks get the official init."""
    source = random_model(QWEN.replace(layer_types=("attn",) * 3, tie_word_embeddings=True), rng, "bfloat16")
    train_bpe(["a corpus for the source's tokenizer"] * 4, 300, tmp_path / "tok")
    save_hf(source, tmp_path / "qwen", dtype="bfloat16", tokenizer_dir=tmp_path / "tok")
    layout = HYBRID.replace(layer_types=("jet", "attn", "swa"))
    (tmp_path / "layout.json").write_text(json.dumps(layout.to_hf_dict()))
    assert convert_torch_ckpt.main(["qwen2-to-jet", str(tmp_path / "qwen"), str(tmp_path / "jet"), "--layout-config",
                                    str(tmp_path / "layout.json"), "--layer-types", "jet,swa,jet"]) == 0
    model = load_params(tmp_path / "jet")
    assert model.config.layer_types == ("jet", "swa", "jet")
    assert find_tokenizer_dir(tmp_path / "jet") is not None  # the source's tokenizer travels along
    report = json.loads((tmp_path / "jet" / "conversion_report.json").read_text())
    src, dst = to_state_dict(source), to_state_dict(model)
    for name in report["copied"]:
        np.testing.assert_array_equal(dst[name], src[name], err_msg=name)
    assert "model.layers.1.self_attn.q_proj.bias" in report["copied"]  # the swa layer keeps its attention
    assert "model.layers.0.self_attn.q_proj.weight" in report["dropped"]
    assert set(report["copied"]) | set(report["initialised"]) == set(dst)
    assert all(".self_attn." in n and n.split(".")[2] in ("0", "2") for n in report["initialised"])
    w2 = dst["model.layers.2.self_attn.dynamic_conv1d.kernel_generator.w2.weight"]
    assert not w2.any() and dst["model.layers.2.self_attn.A_log"].dtype == np.float32
    # A layout whose dimensions do not match the source is refused, naming the field.
    wrong = layout.replace(intermediate_size=64)
    (tmp_path / "wrong.json").write_text(json.dumps(wrong.to_hf_dict()))
    assert convert_torch_ckpt.main(["qwen2-to-jet", str(tmp_path / "qwen"), str(tmp_path / "jet2"),
                                    "--layout-config", str(tmp_path / "wrong.json")]) == 2
    assert not (tmp_path / "jet2").exists()


def test_qwen2_to_jet_takes_the_sizes_from_any_source(tmp_path, rng, capsys):
    """No --preset: the layout is jet_layout's for the source; a depth with no placement asks for --layer-types."""
    from tests.train.test_model_source import qwen2_checkpoint

    source = qwen2_checkpoint(tmp_path / "qwen", rng, weights=True)
    capsys.readouterr()  # transformers' progress bars
    src, dst = str(tmp_path / "qwen"), str(tmp_path / "jet")
    assert convert_torch_ckpt.main(["qwen2-to-jet", src, dst]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "6 layers" in err and "--layer-types=jet,jet,attn,..." in err
    assert not (tmp_path / "jet").exists()
    types = "swa,jet,attn,jet,jet,attn"
    assert convert_torch_ckpt.main(["qwen2-to-jet", src, dst, "--layer-types", types, "--dtype", "float32"]) == 0
    model = load_params(tmp_path / "jet")
    assert model.config == config.jet_layout(source, layer_types=types, param_dtype="float32")
    dst_tensors, src_tensors = to_state_dict(model), read_hf_tensors(tmp_path / "qwen")
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight",
                 "model.layers.2.self_attn.q_proj.bias"):
        np.testing.assert_array_equal(dst_tensors[name], src_tensors[name], err_msg=name)
    # A layout config of another model's sizes: the field and what to pass instead.
    other = config.jet_layout(source, layer_types=types).replace(intermediate_size=7)
    (tmp_path / "layout.json").write_text(json.dumps(other.to_hf_dict()))
    assert convert_torch_ckpt.main(["qwen2-to-jet", src, str(tmp_path / "jet2"), "--layout-config",
                                    str(tmp_path / "layout.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"intermediate_size: 7 != {source.intermediate_size}" in err and "drop --layout-config" in err
