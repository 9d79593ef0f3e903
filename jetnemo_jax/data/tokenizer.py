"""Tokenizers from a local HF tokenizer directory (tokenizer.json), and a small BPE trained locally.

Only the `tokenizers` library is needed (no transformers); the directories we write load with
`transformers.AutoTokenizer` too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"


class Tokenizer:
    def __init__(self, tok: tokenizers.Tokenizer, eos_id: int, path: Path | None = None):
        self._tok, self.eos_id, self.path = tok, eos_id, path

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(directory: str | Path, eos_token: str | None = None) -> Tokenizer:
    """tokenizer.json from `directory`; EOS from `eos_token`, else tokenizer_config.json's eos_token."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if path.is_file():
        tok = tokenizers.Tokenizer.from_file(str(path))
    elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        tok = _from_vocab_and_merges(directory)
    else:
        raise FileNotFoundError(f"{directory}: no tokenizer.json, nor vocab.json + merges.txt (a local HF "
                                "tokenizer directory is expected)")
    if eos_token is None:
        cfg_path = directory / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        eos_token = cfg.get("eos_token")
        eos_token = eos_token.get("content") if isinstance(eos_token, dict) else eos_token
    if eos_token is None:
        raise ValueError(f"{directory}: no eos_token in tokenizer_config.json; set data.eos_token")
    eos_id = tok.token_to_id(eos_token)
    if eos_id is None:
        raise ValueError(f"{directory}: eos token {eos_token!r} is not in the vocabulary")
    return Tokenizer(tok, eos_id, directory)


def _from_vocab_and_merges(directory: Path) -> tokenizers.Tokenizer:
    """A directory with only the slow-tokenizer files: transformers converts it (as AutoTokenizer does)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ImportError(f"{directory} has vocab.json + merges.txt but no tokenizer.json; converting it needs "
                          "transformers (pip install transformers), or save a tokenizer.json") from e
    fast = AutoTokenizer.from_pretrained(str(directory), use_fast=True)
    if not getattr(fast, "is_fast", False):
        raise ValueError(f"{directory}: transformers could not build a fast tokenizer from these files")
    return fast.backend_tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Tokenizer:
    """Byte-level BPE with `vocab_size` entries (EOS included), saved to `out_dir` as an HF tokenizer."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "model_max_length": 1 << 20},
        indent=2))
    return Tokenizer(tok, tok.token_to_id(EOS_TOKEN), out_dir)
