"""Generation: chunked, left-padded prefill against the forward pass; batch == one by one; sampling; stops;
compilations per shape bucket; the CLI. (Token-by-token decode parity from an unpadded prompt: test_model.)"""

import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jetnemo_jax import generate as gen
from jetnemo_jax.generate import Sampling, generate, sample
from jetnemo_jax.model import JetNemotronForCausalLM
from tests.oracles import rel_err
from tests.test_model import HYBRID, model_pair

# attn, swa (window 9) and jet (conv width 4) layers; float32 for exact greedy comparisons.
CFG = HYBRID.replace(dtype="float32")


@pytest.fixture(scope="module")
def model():
    return model_pair(np.random.default_rng(1234), CFG)[0]


def forward_right_padded(model, seqs):
    """Full-forward logits of each sequence, one jitted call (right padding cannot affect a causal model)."""
    ids = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
    logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids))
    return [logits[i, :len(s)] for i, s in enumerate(seqs)]


@pytest.mark.parametrize("chunk", [5, 16])
def test_chunked_left_padded_prefill_then_decode_matches_forward(rng, model, chunk):
    """Prompts of 2 (< conv width), 13 and 30 (> window) tokens, left-padded into one batch and prefilled in
    chunks smaller and larger than the window (so some chunks are all padding); then 6 decode steps."""
    lengths, new = [2, 13, 30], 6
    seqs = [rng.integers(0, CFG.vocab_size, n + new) for n in lengths]
    padded = -(-max(lengths) // chunk) * chunk
    ids = np.zeros((3, padded), np.int32)
    for i, n in enumerate(lengths):
        ids[i, padded - n:] = seqs[i][:n]
    positions = np.arange(padded)[None] - (padded - np.array(lengths))[:, None]
    prefill = nnx.jit(lambda m, x, c, pos: m.prefill_hidden(x, c, positions=pos, valid=pos >= 0))
    step = nnx.jit(lambda m, tok, pos, c: m.decode_step(tok, pos, c))
    caches = model.init_cache(3, padded + new)
    hidden = []
    for c0 in range(0, padded, chunk):
        h, caches = prefill(model, jnp.asarray(ids[:, c0:c0 + chunk]), caches, jnp.asarray(positions[:, c0:c0 + chunk]))
        hidden.append(h)
    logits = model.logits(jnp.concatenate(hidden, 1))
    steps = []
    for t in range(new):
        out, caches = step(model, jnp.asarray([s[n + t] for s, n in zip(seqs, lengths)]), jnp.asarray(lengths) + t,
                           caches)
        steps.append(out)
    for i, (n, full) in enumerate(zip(lengths, forward_right_padded(model, seqs))):
        assert rel_err(logits[i, padded - n:], full[:n]) <= 1e-5
        assert rel_err(jnp.stack(steps, 1)[i], full[n:]) <= 1e-5


def test_left_padded_batch_equals_one_by_one_greedy(rng, model):
    prompts = [list(rng.integers(0, CFG.vocab_size, n)) for n in (1, 3, 12)]
    batch = generate(model, prompts, max_new_tokens=10, prefill_chunk_len=8)
    assert batch.tokens.shape == (3, 10) and list(batch.lengths) == [10] * 3
    for p, row in zip(prompts, batch.tokens):
        alone = generate(model, [p], max_new_tokens=10, prefill_chunk_len=8)
        np.testing.assert_array_equal(alone.tokens[0], row)
    # Greedy tokens are the argmax of the full forward pass over prompt + generation.
    fulls = forward_right_padded(model, [p + list(row) for p, row in zip(prompts, batch.tokens)])
    for p, row, full in zip(prompts, batch.tokens, fulls):
        np.testing.assert_array_equal(np.asarray(full[len(p) - 1:-1].argmax(-1)), row)
    assert len({tuple(r) for r in batch.tokens}) > 1  # the model is not degenerate


def test_top_k_1_is_greedy(rng, model):
    prompts = [list(rng.integers(0, CFG.vocab_size, n)) for n in (4, 11)]
    greedy = generate(model, prompts, max_new_tokens=8)
    top1 = generate(model, prompts, max_new_tokens=8, sampling=Sampling(temperature=1.5, top_k=1), seed=3)
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    hot = generate(model, prompts, max_new_tokens=8, sampling=Sampling(temperature=5.0), seed=3)
    assert (hot.tokens != greedy.tokens).any()  # sampling does sample


def _draws(logits, sampling, n=4000):
    keys = jax.random.split(jax.random.key(0), n)
    draw = jax.jit(jax.vmap(lambda k: sample(logits[None], k, sampling)[0]))
    return np.bincount(np.asarray(draw(keys)), minlength=logits.shape[0]) / n


def test_sampling_respects_temperature_top_k_and_top_p():
    logits = jnp.asarray(np.random.default_rng(0).normal(0, 1.5, 40), jnp.float32)
    T = 0.8
    p = np.asarray(jax.nn.softmax(logits / T))
    order = np.argsort(-p)
    # Plain temperature sampling follows softmax(logits / T).
    assert np.abs(_draws(logits, Sampling(T)) - p).max() < 0.03
    # top-k: only the k most likely, renormalised.
    freq = _draws(logits, Sampling(T, top_k=5))
    expect = np.zeros_like(p)
    expect[order[:5]] = p[order[:5]] / p[order[:5]].sum()
    assert freq[order[5:]].sum() == 0 and np.abs(freq - expect).max() < 0.03
    # top-p: the smallest most-likely set reaching 0.6; nothing outside it is ever drawn.
    cum = np.cumsum(p[order])
    nucleus = order[:np.searchsorted(cum, 0.6) + 1]
    freq = _draws(logits, Sampling(T, top_p=0.6))
    outside = np.setdiff1d(np.arange(40), nucleus)
    assert freq[outside].sum() == 0 and (freq[nucleus] > 0).all()
    expect = np.zeros_like(p)
    expect[nucleus] = p[nucleus] / p[nucleus].sum()
    assert np.abs(freq - expect).max() < 0.03
    # Both: top-p over the renormalised top-k.
    freq = _draws(logits, Sampling(T, top_k=3, top_p=0.99))
    assert freq[order[3:]].sum() == 0


def test_stop_tokens_finish_rows_and_pad_after(rng, model):
    prompts = [list(rng.integers(0, CFG.vocab_size, n)) for n in (3, 7, 12)]
    free = generate(model, prompts, max_new_tokens=10).tokens
    stop = int(free[0, 3])
    pad = CFG.vocab_size + 5  # distinguishable from any real token
    got = generate(model, prompts, max_new_tokens=10, stop_tokens=[stop], pad_id=pad)
    for row, out, n in zip(free, got.tokens, got.lengths):
        hits = np.flatnonzero(row == stop)
        cut = hits[0] + 1 if hits.size else 10
        assert n == cut
        np.testing.assert_array_equal(out[:cut], row[:cut])
        assert (out[cut:] == pad).all()
    # Every row stopping ends the loop early (the output stays padded to max_new_tokens).
    all_stop = generate(model, prompts[:1], max_new_tokens=10, stop_tokens=[int(free[0, 0])], pad_id=pad)
    assert all_stop.lengths[0] == 1 and (all_stop.tokens[0, 1:] == pad).all()


def test_compiles_once_per_shape_bucket(rng, caplog):
    # A config no other test compiles, so jit caches from other tests do not hide compilations.
    cfg = CFG.replace(vocab_size=199)
    model = model_pair(rng, cfg)[0]
    caplog.set_level(logging.INFO, logger=gen.__name__)

    def compiles(lengths, new):
        caplog.clear()
        generate(model, [list(rng.integers(0, 199, n)) for n in lengths], max_new_tokens=new, prefill_chunk_len=8)
        return sum("compiling" in r.getMessage() for r in caplog.records)

    assert compiles((5, 7), 10) == 2  # one prefill chunk function, one decode loop
    assert compiles((6, 8), 12) == 0  # same buckets: prompt 8, new tokens 16
    assert compiles((3, 30), 9) == 2  # prompt bucket 32 (4 chunks of 8), new tokens 16: cache length changes
    assert compiles((2, 29), 16) == 0


def test_batch_generates_at_bfloat16(rng, model):
    """Two or more prompts at bfloat16 activations: XLA:CPU once had no kernel for the cached attention's
    bf16 x bf16 -> f32 batched dot, and every batch of prompts failed."""
    from jetnemo_jax.layers.attention import cached_attention

    B, T, H, kv, S, hd = 3, 4, 6, 2, 9, 16
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
               for s in ((B, T, H, hd), (B, kv, S, hd), (B, kv, S, hd)))
    qpos = jnp.asarray(np.arange(T)[None] + rng.integers(0, S - T, (B, 1)), jnp.int32)
    kpos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    attend = jax.jit(cached_attention, static_argnames=("window", "scale"))
    bf16 = lambda x: x.astype(jnp.bfloat16)
    got = attend(bf16(q), bf16(k), bf16(v), qpos, kpos, window=None, scale=0.25)
    expect = attend(*(bf16(x).astype(jnp.float32) for x in (q, k, v)), qpos, kpos, window=None, scale=0.25)
    assert got.dtype == jnp.bfloat16 and rel_err(got, expect) <= 1e-2
    half = JetNemotronForCausalLM(CFG.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(half, nnx.state(model))
    prompts = [list(rng.integers(0, CFG.vocab_size, n)) for n in (2, 9, 5)]
    out = generate(half, prompts, max_new_tokens=4, prefill_chunk_len=4)
    assert out.tokens.shape == (3, 4) and ((0 <= out.tokens) & (out.tokens < CFG.vocab_size)).all()


def test_bad_input_is_rejected(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[1, CFG.vocab_size]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], max_new_tokens=0)
    for bad in (dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            Sampling(**bad)


def run_workdir(ckpt, tokenizer_dir, root):
    """A training workdir as the trainer leaves it: final/ (the fixture's weights) holding the tokenizer."""
    from jetnemo_jax.data.tokenizer import load_tokenizer, save_tokenizer

    final = root / "run" / "final"
    final.mkdir(parents=True)
    (final / "params").symlink_to(os.path.join(ckpt, "params"))
    shutil.copy(os.path.join(ckpt, "config.json"), final)
    save_tokenizer(load_tokenizer(tokenizer_dir), final)
    return final.parent


def test_cli_generates_and_fails_cleanly(qwen_tokenizer_dir, tiny_qwen_vocab_checkpoint, tmp_path, capsys):
    ckpt, _ = tiny_qwen_vocab_checkpoint
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("The quick brown fox\n\nHello world!\n")
    gen.main(["--checkpoint", ckpt, "--tokenizer", qwen_tokenizer_dir, "--prompt", "Once upon a time",
              "--prompt-file", str(prompt_file), "--max-new-tokens", "5", "--temperature", "0.7", "--top-p", "0.9"])
    out = capsys.readouterr().out
    assert out.count("--- ") == 3 and "Hello world!" in out and "Once upon a time" in out
    # A workdir as --checkpoint: its final/ and the tokenizer saved there; the same tokens as above.
    run = run_workdir(ckpt, qwen_tokenizer_dir, tmp_path)
    argv = ["--prompt", "Hello world!", "--max-new-tokens", "4", "--dtype", "float32"]
    gen.main(["--checkpoint", str(run), *argv])
    captured = capsys.readouterr()
    assert "using its final checkpoint" in captured.err
    gen.main(["--checkpoint", ckpt, "--tokenizer", qwen_tokenizer_dir, *argv])
    assert capsys.readouterr().out == captured.out
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "workdir" / "checkpoints").mkdir(parents=True)
    final = str(run / "final")
    for argv, message in (
            (["--checkpoint", str(tmp_path / "nope"), "--tokenizer", qwen_tokenizer_dir, "--prompt", "x"],
             "no such directory"),
            (["--checkpoint", ckpt, "--tokenizer", str(tmp_path / "nope"), "--prompt", "x"],
             "--tokenizer " + str(tmp_path / "nope") + ": no such directory"),
            (["--checkpoint", ckpt, "--tokenizer", str(tmp_path), "--prompt", "x"], "no tokenizer files"),
            (["--checkpoint", ckpt, "--prompt", "x"], "holds no tokenizer: pass --tokenizer"),
            (["--checkpoint", str(tmp_path), "--tokenizer", qwen_tokenizer_dir, "--prompt", "x"],
             "neither a jetnemo_jax checkpoint"),
            (["--checkpoint", str(tmp_path / "workdir"), "--prompt", "x"], "a training workdir without final/"),
            (["--checkpoint", ckpt, "--tokenizer", qwen_tokenizer_dir], "no prompt"),
            (["--checkpoint", final, "--prompt-file", str(tmp_path / "empty.txt")], "no prompt in it"),
            (["--checkpoint", final, "--prompt-file", str(tmp_path / "nope.txt")], "--prompt-file"),
            (["--checkpoint", final, "--prompt", ""], "encodes to no tokens"),
            (["--checkpoint", final, "--prompt", "x", "--max-new-tokens", "99999"], "max_position_embeddings"),
            (["--checkpoint", ckpt, "--tokenizer", qwen_tokenizer_dir, "--prompt", "x", "--top-p", "0"], "top_p")):
        with pytest.raises(SystemExit) as exit_info:
            gen.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error:") and message in err, err


def test_real_cli_errors_are_one_line_and_verbose_shows_the_traceback(tiny_qwen_vocab_checkpoint, tmp_path):
    from jetnemo_jax.data.tokenizer import train_bpe

    ckpt, _ = tiny_qwen_vocab_checkpoint
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "params").symlink_to(os.path.join(ckpt, "params"))
    (broken / "config.json").write_text('{"vocab_size": 12,')
    train_bpe(["a small corpus for a tokenizer"] * 4, 280, broken)  # the checkpoint's own tokenizer
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # no accelerator probing on stderr
    for args, message in ((["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"], "no such directory"),
                          (["--checkpoint", str(broken), "--prompt", "x"], "config.json is not valid JSON"),
                          (["--checkpoint", str(broken), "--prompt", "x", "--verbose"], "Traceback")):
        proc = subprocess.run([sys.executable, "-m", "jetnemo_jax.generate", *args], capture_output=True, text=True,
                              env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        if "--verbose" not in args:
            assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
