"""Tokenizers from a local HF tokenizer directory, and a small BPE trained locally: the `tokenizers` library only.

A directory is read from its tokenizer.json, or, without one, from Qwen2's slow-tokenizer files (vocab.json +
merges.txt, with the added tokens of tokenizer_config.json / added_tokens.json / special_tokens_map.json),
built here as the byte-level BPE that Qwen2's tokenizer.json describes. `save_tokenizer` writes any loaded
tokenizer as tokenizer.json + tokenizer_config.json, which this module and `transformers.AutoTokenizer` load.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

EOS_TOKEN = "<|endoftext|>"
# Files an HF tokenizer directory may hold (an export copies those present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json", "chat_template.jinja")
# Qwen2's pre-tokenizer split (its tokenizer.json's Split pattern): letters, single digits, punctuation runs,
# newlines and spaces apart, as GPT-4's regex but with one digit per piece.
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# tokenizer_config.json / special_tokens_map.json keys that name a special token.
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TokenizerError(ValueError):
    """A tokenizer directory is missing, incomplete or unreadable (the message names the file and the fix)."""


class Tokenizer:
    """Text <-> token ids. `eos_id` ends documents (None if the directory names no EOS and none was asked);
    `pad_id` is the directory's pad token's id, if any."""

    def __init__(self, tok: tokenizers.Tokenizer, eos_id: int | None, path: Path | None = None,
                 pad_id: int | None = None):
        self._tok, self.eos_id, self.path, self.pad_id = tok, eos_id, path, pad_id

    @functools.cached_property
    def vocab_size(self) -> int:
        """Ids run from 0 to vocab_size - 1, added tokens included: a model needs at least this many rows."""
        return max(self._tok.get_vocab(with_added_tokens=True).values()) + 1

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self._tok.id_to_token(self.eos_id)

    def special_token_ids(self) -> dict[str, int]:
        """The special tokens (EOS, chat markers, ...: never produced from ordinary text) by text -> id."""
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def has_tokenizer_files(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / "tokenizer.json").is_file() or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file())


def find_tokenizer_dir(path: str | Path) -> Path | None:
    """`path` if it holds a tokenizer, else that of a training workdir (its tokenizer/, else its final/)."""
    path = Path(path)
    return next((d for d in (path, path / "tokenizer", path / "final") if has_tokenizer_files(d)), None)


def load_tokenizer(directory: str | Path, eos_token: str | None = None, *, require_eos: bool = True) -> Tokenizer:
    """The tokenizer of `directory` (an HF tokenizer directory, or a training workdir / checkpoint holding
    one, see `find_tokenizer_dir`). EOS is `eos_token`, else tokenizer_config.json's or
    special_tokens_map.json's eos_token; without one, TokenizerError if `require_eos`, else eos_id None."""
    path = Path(directory)
    if not path.is_dir():
        raise TokenizerError(f"{path}: no such directory")
    found = find_tokenizer_dir(path)
    if found is None:
        raise TokenizerError(f"{path}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt): pass a local "
                             "HF tokenizer directory")
    config = _read_json(found / "tokenizer_config.json")
    special_map = _read_json(found / "special_tokens_map.json")
    if (found / "tokenizer.json").is_file():
        try:
            tok = tokenizers.Tokenizer.from_file(str(found / "tokenizer.json"))
        except Exception as e:  # the Rust side raises a plain Exception
            raise TokenizerError(f"{found / 'tokenizer.json'}: not a readable tokenizer.json "
                                 f"({_first_line(e)})") from None
    else:
        tok = _from_vocab_and_merges(found, config, special_map)

    def token_id(key: str, text: str | None = None) -> int | None:
        text = text or _token_text(config.get(key)) or _token_text(special_map.get(key))
        if text is None:
            return None
        if tok.token_to_id(text) is None:
            raise TokenizerError(f"{found}: {key} {text!r} is not in the vocabulary")
        return tok.token_to_id(text)

    eos_id = token_id("eos_token", eos_token)
    if eos_id is None and require_eos:
        raise TokenizerError(f"{found}: no eos_token in tokenizer_config.json; name the token that ends documents "
                             "(data.eos_token)")
    return Tokenizer(tok, eos_id, found, pad_id=token_id("pad_token"))


def tokenizer_files(tok: Tokenizer) -> dict[str, str]:
    """{file name: text} of a directory holding `tok`: tokenizer.json + tokenizer_config.json. The class is
    PreTrainedTokenizerFast (transformers reads tokenizer.json as it is: no custom code, no auto_map)."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for key, i in (("eos_token", tok.eos_id), ("pad_token", tok.pad_id)):
        if i is not None:
            config[key] = tok._tok.id_to_token(i)
    return {"tokenizer.json": tok._tok.to_str(pretty=True), "tokenizer_config.json": json.dumps(config, indent=2)}


def save_tokenizer(tok: Tokenizer, directory: str | Path) -> None:
    """Write `tok` (however it was loaded) into `directory` (created if needed) as `tokenizer_files` says."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer_files(tok).items():
        (directory / name).write_text(text, encoding="utf-8")


def _from_vocab_and_merges(directory: Path, config: dict, special_map: dict) -> tokenizers.Tokenizer:
    """Qwen2's byte-level BPE as its tokenizer.json has it: NFC, the regex split, then bytes as characters."""
    cls = config.get("tokenizer_class")
    if cls not in (None, "Qwen2Tokenizer", "Qwen2TokenizerFast"):
        raise TokenizerError(f"{directory}: vocab.json + merges.txt of a {cls}; only Qwen2's are read without a "
                             "tokenizer.json (write one: transformers.AutoTokenizer.from_pretrained(DIR)"
                             ".save_pretrained(DIR))")
    try:
        bpe = models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"), dropout=None,
                                   unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                                   fuse_unk=False, byte_fallback=False)
    except Exception as e:
        raise TokenizerError(f"{directory}: vocab.json / merges.txt cannot be read ({_first_line(e)})") from None
    tok = tokenizers.Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    _add_declared_tokens(tok, directory, config, special_map)
    return tok


def _add_declared_tokens(tok: tokenizers.Tokenizer, directory: Path, config: dict, special_map: dict) -> None:
    """The added tokens at the ids the directory gives them (tokenizer_config.json's added_tokens_decoder, then
    added_tokens.json), then any named special token not among them (as transformers adds them)."""
    specials = set()
    for source in (config, special_map):
        specials.update(t for t in map(_token_text, (source.get(k) for k in _SPECIAL_TOKEN_KEYS)) if t)
        specials.update(t for t in map(_token_text, source.get("additional_special_tokens") or ()) if t)
    declared = {int(i): dict(d) for i, d in (config.get("added_tokens_decoder") or {}).items()}
    for text, i in _read_json(directory / "added_tokens.json").items():
        declared.setdefault(int(i), {"content": text})
    for i in sorted(declared):
        d = declared[i]
        special = bool(d.get("special", d["content"] in specials))
        token = AddedToken(d["content"], single_word=d.get("single_word", False), lstrip=d.get("lstrip", False),
                           rstrip=d.get("rstrip", False), normalized=d.get("normalized", not special), special=special)
        if special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
        if tok.token_to_id(d["content"]) != i:
            raise TokenizerError(f"{directory}: added token {d['content']!r} is declared with id {i} but gets id "
                                 f"{tok.token_to_id(d['content'])} after the {tok.get_vocab_size(False)} of vocab.json")
    for text in sorted(specials - {d["content"] for d in declared.values()}):
        tok.add_special_tokens([AddedToken(text, special=True, normalized=False)])


def _read_json(path: Path) -> dict:
    """A JSON object file's content; {} if the file is absent."""
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise TokenizerError(f"{path}: not a JSON object")
    return d


def _token_text(value) -> str | None:
    """A special-token entry: a string, or an AddedToken dict {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Tokenizer:
    """Byte-level BPE with `vocab_size` entries (EOS included), saved to `out_dir` as an HF tokenizer."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    out = Tokenizer(tok, tok.token_to_id(EOS_TOKEN), Path(out_dir))
    save_tokenizer(out, out_dir)
    return out
