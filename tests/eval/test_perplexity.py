"""Perplexity against direct computations from the model's logits."""

import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jetnemo_jax.eval import perplexity as ppl
from tests.test_generate import CFG, forward_right_padded, run_workdir


@pytest.fixture(scope="module")
def model():
    from tests.test_model import model_pair

    return model_pair(np.random.default_rng(99), CFG)[0]


def direct_logprobs(model, seqs):
    """Per sequence: log p(ids[t+1] | ids[:t+1]) from the model's full-forward logits."""
    out = []
    for ids, logits in zip(seqs, forward_right_padded(model, seqs)):
        lp = np.asarray(jax.nn.log_softmax(logits[:-1], -1), np.float64)
        out.append(lp[np.arange(len(ids) - 1), ids[1:]])
    return out


def test_windows_score_every_token_once():
    for n, seq_len, stride in ((10, 4, 2), (37, 8, 3), (5, 8, 4), (2, 2, 1), (100, 16, 15)):
        spans = ppl.windows(n, seq_len, stride)
        scored = np.concatenate([np.arange(first, end) for _, end, first in spans])
        np.testing.assert_array_equal(scored, np.arange(1, n))
        for begin, end, first in spans:
            assert end - begin <= seq_len and first > begin
            assert first - begin >= min(seq_len - stride, first)  # context of at least seq_len - stride
    for seq_len, stride in ((4, 4), (4, 0), (1, 1)):
        with pytest.raises(ValueError):
            ppl.windows(10, seq_len, stride)


def test_single_window_equals_the_full_forward(rng, model):
    ids = rng.integers(0, CFG.vocab_size, 40)
    got = ppl.perplexity(model, ids, seq_len=64, stride=32)
    (lp,) = direct_logprobs(model, [ids])
    assert got.tokens == 39 and got.windows == 1
    assert abs(got.nll + lp.sum()) <= 1e-4 and abs(got.perplexity - math.exp(-lp.mean())) <= 1e-5 * got.perplexity


def test_sliding_windows_equal_a_direct_computation(rng, model):
    ids = rng.integers(0, CFG.vocab_size, 45)
    seq_len, stride = 16, 6
    spans, begin, prev_end = [], 0, 1
    while True:  # each window scores the tokens after the previous window's end, from its own context only
        end = min(begin + seq_len, len(ids))
        spans.append((begin, end, prev_end))
        if end == len(ids):
            break
        prev_end, begin = end, begin + stride
    lps = direct_logprobs(model, [ids[b:e] for b, e, _ in spans])
    expect = -sum(lp[first - b - 1:].sum() for lp, (b, _, first) in zip(lps, spans))
    count = sum(e - first for _, e, first in spans)
    for batch_size in (1, 3):
        got = ppl.perplexity(model, ids, seq_len=seq_len, stride=stride, batch_size=batch_size)
        assert got.tokens == count == 44
        assert abs(got.nll - expect) <= 1e-4 * abs(expect)


def test_cli(qwen_tokenizer_dir, tiny_qwen_vocab_checkpoint, tmp_path, capsys):
    ckpt, model = tiny_qwen_vocab_checkpoint
    from transformers import AutoTokenizer

    text = "The quick brown fox jumps over the lazy dog. " * 4
    (tmp_path / "t.txt").write_text(text)
    ppl.main(["--checkpoint", ckpt, "--tokenizer", qwen_tokenizer_dir, "--text-file", str(tmp_path / "t.txt"),
              "--seq-len", "16", "--stride", "8", "--batch-size", "2", "--dtype", "float32"])
    captured = capsys.readouterr()
    ids = AutoTokenizer.from_pretrained(qwen_tokenizer_dir).encode(text, add_special_tokens=False)
    expect = ppl.perplexity(model, ids, seq_len=16, stride=8).perplexity
    assert f"perplexity {expect:.4f}" in captured.out and "window" in captured.err  # progress on stderr
    assert "\r" not in captured.err and captured.err.count("\n") <= 3  # not a terminal: lines, not redraws
    # A --seq-len longer than the text: one window of the whole text (no padding to the longer shape).
    ppl.main(["--checkpoint", ckpt, "--tokenizer", qwen_tokenizer_dir, "--text-file", str(tmp_path / "t.txt"),
              "--seq-len", "1000", "--stride", "500", "--dtype", "float32"])
    whole = ppl.perplexity(model, ids, seq_len=len(ids), stride=len(ids) - 1).perplexity
    captured = capsys.readouterr()
    assert f"perplexity {whole:.4f}" in captured.out and "one window" in captured.err
    # A training workdir as --checkpoint: its final/ and the tokenizer saved there.
    ppl.main(["--checkpoint", str(run_workdir(ckpt, qwen_tokenizer_dir, tmp_path)), "--text-file",
              str(tmp_path / "t.txt"), "--seq-len", "16", "--stride", "8", "--dtype", "float32"])
    assert f"perplexity {expect:.4f}" in capsys.readouterr().out
    for argv, message in ((["--tokenizer", qwen_tokenizer_dir, "--text-file", str(tmp_path / "no.txt")], "--text-file"),
                          (["--text-file", str(tmp_path / "t.txt")], "holds no tokenizer"),
                          (["--tokenizer", str(tmp_path), "--text-file", str(tmp_path / "t.txt")],
                           "no tokenizer files"),
                          (["--tokenizer", qwen_tokenizer_dir, "--text-file", str(tmp_path / "t.txt"), "--seq-len",
                            str(model.config.max_position_embeddings + 1)], "max_position_embeddings")):
        with pytest.raises(SystemExit) as e:
            ppl.main(["--checkpoint", ckpt, *argv])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err


def test_real_cli_error_is_one_line(tmp_path):
    (tmp_path / "t.txt").write_text("some text")
    proc = subprocess.run([sys.executable, "-m", "jetnemo_jax.eval.perplexity", "--checkpoint", str(tmp_path),
                           "--tokenizer", str(tmp_path / "missing"), "--text-file", str(tmp_path / "t.txt")],
                          capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert proc.returncode == 2 and proc.stderr.startswith("error: --tokenizer"), proc.stderr
    assert "no such directory" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


_CONTEXT = """
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from flax import nnx
from jetnemo_jax.eval import perplexity as ppl
from jetnemo_jax.model import JetNemotronForCausalLM
from tests.test_generate import CFG
model = JetNemotronForCausalLM(CFG, rngs=nnx.Rngs({seed}))
ids = np.random.default_rng({seed}).integers(0, CFG.vocab_size, 300)
one = ppl.perplexity(model, ids, seq_len=64, stride=24, batch_size=2)
four = ppl.perplexity(model, ids, seq_len=64, stride=24, batch_size=2, context=4)
print("RESULT", one.nll, four.nll, one.tokens, four.tokens)
"""


def test_context_parallel_windows_equal_one_device(rng):
    """--context 4: every window split over 4 simulated devices scores the same (fp32)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", _CONTEXT.format(seed=int(rng.integers(1 << 20)))], cwd=root,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    one, four, n1, n4 = out.stdout.split("RESULT", 1)[1].split()
    assert n1 == n4 and abs(float(four) / float(one) - 1) <= 1e-5, out.stdout
