"""Bring your own Qwen2.5: stage 1 from a random Qwen2 checkpoint of a size no preset has, then stage 2 from its
final/, through the real CLI with nothing but the paths, a layer placement and the run sizes."""

import json
import shutil

import pytest

from tests.train.runs import ROOT, env

QWEN_EOS = 151643
TYPES = "jet,attn,swa"


def _qwen2_dir(path, tokenizer_dir):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    hf = Qwen2Config(vocab_size=151936, hidden_size=48, num_attention_heads=3, num_key_value_heads=1,
                     intermediate_size=72, num_hidden_layers=3, tie_word_embeddings=True,
                     max_position_embeddings=2048, rope_theta=1e6, bos_token_id=QWEN_EOS, eos_token_id=QWEN_EOS)
    Qwen2ForCausalLM(hf).save_pretrained(path)
    for f in (tokenizer_dir).iterdir():
        shutil.copy(f, path / f.name)


def _data(tmp_path, rng):
    words = ["delta", "rule", "state", "gate", "conv", "kernel", "token", "naïve", "über", "数据", "42", "\n"]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(20, 200)))) for _ in range(60)]
    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "part.jsonl", "w", encoding="utf-8") as f:
        for d in docs[:50]:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    for i, d in enumerate(docs[50:]):
        (tmp_path / "data" / f"doc{i}.txt").write_text(d, encoding="utf-8")
    return str(tmp_path / "data")


def _train(config, *flags):
    import subprocess
    import sys

    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / config), *flags]
    return subprocess.run(cmd, env=env(JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=900, cwd=ROOT)


RUN_SIZES = ("--config.train.steps=2", "--config.data.global_batch=2", "--config.data.seq_len=64")
# The recipes' 4 grain worker processes each import JAX (~10 s of this machine's 2 cores): stage 1 keeps one, so
# the CLI's worker path runs; stage 2 reads in-process and skips the sample and validation stage 1 ran.
ONE_WORKER = "--config.data.worker_count=1"
LEAN = ("--config.data.worker_count=0", "--config.train.sample_tokens=0", "--config.train.eval_every=0")


@pytest.mark.slow
def test_stage1_then_stage2_from_any_qwen2_size(tmp_path, qwen_tokenizer_dir, rng):
    from pathlib import Path

    from jetnemo_jax.data.tokenizer import load_tokenizer

    qwen = tmp_path / "qwen"
    _qwen2_dir(qwen, Path(qwen_tokenizer_dir))
    data = _data(tmp_path, rng)
    s1 = tmp_path / "stage1"
    (s1 / "frozen").mkdir(parents=True)  # what a run that crashed before its first checkpoint leaves
    out = _train("jet_nemotron_2b_stage1.py", f"--config.workdir={s1}", f"--config.init.path={qwen}",
                 f"--config.data.tokenizer={qwen}", f"--config.data.source={data}",
                 f"--config.model.layer_types={TYPES}", ONE_WORKER, *RUN_SIZES)
    assert out.returncode == 0, out.stderr[-3000:]
    final = json.loads((s1 / "final" / "config.json").read_text())
    assert final["hidden_size"] == 48 and final["layer_types"] == TYPES.split(",")
    assert final["eos_token_id"] == QWEN_EOS and final["efficient_attention_config"]["jet"]["num_heads"] == 3
    # final/ holds a tokenizer that loads and agrees with the source's (which had only vocab.json + merges.txt)
    text = "def f(x):\n    return x ** 2  # naïve 数据 <|endoftext|>"
    assert (load_tokenizer(s1 / "final").encode(text) == load_tokenizer(qwen).encode(text)).all()

    s2 = tmp_path / "stage2"
    out = _train("jet_nemotron_2b_stage2.py", f"--config.workdir={s2}", f"--config.init.path={s1 / 'final'}",
                 f"--config.data.tokenizer={s1 / 'final'}", f"--config.data.source={data}", *LEAN, *RUN_SIZES)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((s2 / "final" / "config.json").read_text())["layer_types"] == TYPES.split(",")


def test_a_tokenizer_that_is_not_the_models_is_refused(tmp_path, qwen_tokenizer_dir, rng):
    from pathlib import Path

    from jetnemo_jax.data.tokenizer import train_bpe

    qwen = tmp_path / "qwen"
    _qwen2_dir(qwen, Path(qwen_tokenizer_dir))
    data = _data(tmp_path, rng)
    texts = [p.read_text() for p in Path(data).glob("*.txt")]
    small = train_bpe(texts, 300, tmp_path / "bpe")
    assert small.eos_id == 0
    common = (f"--config.init.path={qwen}", f"--config.data.source={data}", f"--config.model.layer_types={TYPES}",
              *RUN_SIZES)
    out = _train("jet_nemotron_2b_stage1.py", f"--config.workdir={tmp_path / 'run'}",
                 f"--config.data.tokenizer={tmp_path / 'bpe'}", *common)
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"eos_token_id is {QWEN_EOS}" in out.stderr and "data.check_tokenizer=False" in out.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_a_depth_without_a_placement_asks_for_layer_types(tmp_path, qwen_tokenizer_dir):
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=151936, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=40, num_hidden_layers=7).save_pretrained(tmp_path / "qwen")
    out = _train("jet_nemotron_2b_stage1.py", f"--config.workdir={tmp_path / 'run'}",
                 f"--config.init.path={tmp_path / 'qwen'}", f"--config.data.tokenizer={qwen_tokenizer_dir}",
                 *RUN_SIZES)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and len(lines) == 1 and "--config.model.layer_types=" in lines[0], out.stderr
    assert "7 layers" in lines[0], lines[0]
