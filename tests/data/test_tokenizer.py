"""The tokenizer loader (tokenizers only): Qwen2's slow-tokenizer files give the fast tokenizer's ids; any loaded
tokenizer saves to a directory that loads again here and in transformers; workdirs resolve; errors name the file."""

import json
import shutil
import unicodedata

import numpy as np
import pytest

from jetnemo_jax.data.tokenizer import TokenizerError, load_tokenizer, save_tokenizer, train_bpe

VARIED = ("def f(x):\n    return x**2  # ünïcödé 日本語 😀 café e\u0301\n\n\n\t\tspaces     here 1234567 3.14e-5 "
          "<|endoftext|> <|im_start|>user\nHi<|im_end|> <tool_call>{\"a\": 1}</tool_call> don't I'LL \r\n  end  ")


def random_text(rng, n=400):
    """Letters, digits, punctuation, whitespace runs, accents and CJK/emoji, in random order."""
    pieces = list("abcXYZ019 .,;:'\"()[]{}_-+*/\\") + ["  ", "\n", "\n\n", "\t", "\r\n", "é", "e\u0301", "日本", "😀",
                                                        "<|endoftext|>", "<|im_end|>", "'s", "'LL", "über"]
    return "".join(rng.choice(pieces, n))


def slow_files_dir(qwen_tokenizer_dir, tmp_path):
    """vocab.json + merges.txt + tokenizer_config.json only, as a Qwen2 slow-tokenizer directory."""
    d = tmp_path / "qwen_slow"
    d.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copyfile(f"{qwen_tokenizer_dir}/{name}", d / name)
    return d


def test_vocab_and_merges_give_the_fast_tokenizers_ids(qwen_tokenizer_dir, tmp_path, rng):
    from transformers import AutoTokenizer

    tok = load_tokenizer(slow_files_dir(qwen_tokenizer_dir, tmp_path))
    # transformers builds Qwen2's fast tokenizer (the pipeline its published tokenizer.json holds) from these files.
    ref = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    for text in (VARIED, random_text(rng), random_text(rng)):
        ids = tok.encode(text)
        assert ids.tolist() == ref.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    assert tok.encode("Hello world!").tolist() == [9707, 1879, 0]
    assert tok.vocab_size == len(ref) == 151665 and tok.eos_id == tok.pad_id == 151643
    specials = tok.special_token_ids()
    assert specials["<|endoftext|>"] == 151643 and specials["<|im_end|>"] == 151645 and "<tool_call>" not in specials
    assert tok.decode(tok.encode("a<|im_end|>b"), skip_special_tokens=True) == "ab"


def test_any_tokenizer_saves_to_a_directory_that_loads_here_and_in_transformers(qwen_tokenizer_dir, tmp_path, rng):
    from transformers import AutoTokenizer

    trained = train_bpe([random_text(rng, 200) for _ in range(50)], 400, tmp_path / "bpe")
    for source in (load_tokenizer(slow_files_dir(qwen_tokenizer_dir, tmp_path)), load_tokenizer(qwen_tokenizer_dir),
                   trained):
        out = tmp_path / f"saved_{source.vocab_size}_{len(list(tmp_path.iterdir()))}"
        save_tokenizer(source, out)
        assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
        assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
        again = load_tokenizer(out)
        assert (again.vocab_size, again.eos_id, again.pad_id) == (source.vocab_size, source.eos_id, source.pad_id)
        assert again.special_token_ids() == source.special_token_ids()
        hf = AutoTokenizer.from_pretrained(out)  # no prompt: pytest's stdin cannot answer one
        assert hf.eos_token_id == source.eos_id
        for text in (VARIED, random_text(rng)):
            ids = source.encode(text)
            np.testing.assert_array_equal(again.encode(text), ids)
            assert hf.encode(text, add_special_tokens=False) == ids.tolist()
            assert hf.decode(ids) == source.decode(ids)


def test_workdirs_resolve_and_errors_name_the_problem(tmp_path, rng):
    run = tmp_path / "run"
    trained = train_bpe([random_text(rng, 100) for _ in range(20)], 300, run / "tokenizer")
    assert load_tokenizer(run).path == run / "tokenizer"  # a training workdir: its tokenizer/
    (run / "tokenizer").rename(run / "final")
    assert load_tokenizer(run).eos_id == trained.eos_id  # else its final/
    cases = [(tmp_path / "missing", "no such directory"), (tmp_path, "no tokenizer files")]
    for name, files in (("broken_json", {"tokenizer.json": "{not json"}),
                        ("broken_config", {"tokenizer_config.json": "[1,"}),
                        ("no_eos", {"tokenizer_config.json": "{}"}),
                        ("bad_eos", {"tokenizer_config.json": '{"eos_token": "<nope>"}'}),
                        ("gpt2", {"vocab.json": "{}", "merges.txt": "", "tokenizer_config.json":
                                  '{"tokenizer_class": "GPT2Tokenizer"}'})):
        d = tmp_path / name
        shutil.copytree(run / "final", d)
        for f, text in files.items():
            (d / f).write_text(text)
        if name == "gpt2":
            (d / "tokenizer.json").unlink()
        cases.append((d, {"broken_json": "not a readable tokenizer.json", "broken_config": "not valid JSON",
                          "no_eos": "no eos_token", "bad_eos": "'<nope>' is not in the vocabulary",
                          "gpt2": "only Qwen2's"}[name]))
    for path, message in cases:
        with pytest.raises(TokenizerError, match=message):
            load_tokenizer(path)
    assert load_tokenizer(tmp_path / "no_eos", require_eos=False).eos_id is None
