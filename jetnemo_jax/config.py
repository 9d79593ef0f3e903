"""Model configuration: a frozen dataclass, presets, and HF `config.json` read/write.

Two HF schemas are understood: Qwen2 (`model_type: "qwen2"`, every layer full attention unless
`use_sliding_window`) and Jet-Nemotron (`model_type: "jet_nemotron"`, `layer_types` of "attn", "swa",
"jet" plus `efficient_attention_config`). Any key we do not know, and any value that would change the
model in a way we do not implement, raises `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

LAYER_TYPES = ("attn", "swa", "jet")


class ConfigError(ValueError):
    """A configuration field is unknown, missing or inconsistent (the message names it)."""


@dataclasses.dataclass(frozen=True)
class JetBlockConfig:
    num_heads: int = 12
    head_dim: int = 96  # dk, the key dim per head
    head_v_dim: int = 256  # dv, the value dim per head (HF stores expand_v = dv / dk)
    conv_size: int = 4  # W, taps of the generated causal convolution
    generator_reduction: int = 8  # generator hidden = Dv / reduction
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("num_heads", "head_dim", "head_v_dim", "conv_size", "generator_reduction"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"jet.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.value_dim % self.generator_reduction:
            raise ConfigError(
                f"jet.generator_reduction={self.generator_reduction} does not divide the value dim {self.value_dim}")

    @property
    def expand_v(self) -> float:
        return self.head_v_dim / self.head_dim

    @property
    def key_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def value_dim(self) -> int:
        return self.num_heads * self.head_v_dim

    @property
    def generator_dim(self) -> int:
        return self.value_dim // self.generator_reduction


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    layer_types: tuple[str, ...]
    head_dim: int | None = None  # attention head dim; None means hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    sliding_window: int | None = None  # W keys including the query's own, for "swa" layers
    jet: JetBlockConfig | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # Numerics and op selection (not part of the HF schema).
    dtype: str = "bfloat16"  # activation / matmul dtype
    param_dtype: str = "float32"  # master weights; A_log and dt_bias are always float32
    gdr_impl: str = "auto"  # gated delta rule: auto | pallas (TPU) | pallas_triton (GPU) | chunked | reference
    conv_impl: str = "auto"  # dynamic conv: auto | pallas | reference

    def __post_init__(self):
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.layer_types:
            raise ConfigError("layer_types is empty")
        for i, t in enumerate(self.layer_types):
            if t not in LAYER_TYPES:
                raise ConfigError(f"layer_types[{i}]={t!r}: expected one of {LAYER_TYPES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_key_value_heads={self.num_key_value_heads} does not divide "
                              f"num_attention_heads={self.num_attention_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"num_attention_heads={self.num_attention_heads} does not divide "
                                  f"hidden_size={self.hidden_size}; set head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if "swa" in self.layer_types and (self.sliding_window is None or self.sliding_window < 1):
            raise ConfigError("layer_types has 'swa' layers but sliding_window is not a positive integer")
        if "jet" in self.layer_types and self.jet is None:
            raise ConfigError("layer_types has 'jet' layers but the jet block config is missing")
        for name, allowed in (("dtype", ("float32", "bfloat16", "float16")),
                              ("param_dtype", ("float32", "bfloat16")),
                              ("gdr_impl", ("auto", "pallas", "pallas_triton", "chunked", "reference")),
                              ("conv_impl", ("auto", "pallas", "reference"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected one of {allowed}")

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layer_types)

    def replace(self, **changes) -> ModelConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------------- HF schema
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], **overrides) -> ModelConfig:
        return _from_hf(dict(d), overrides)

    @classmethod
    def from_hf_file(cls, path: str | os.PathLike, **overrides) -> ModelConfig:
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} does not hold a JSON object")
        return _from_hf(d, overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        return _to_hf(self)


# Keys of HF config.json that carry no information for this model (bookkeeping, generation defaults).
_IGNORED_HF_KEYS = frozenset({
    "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "pad_token_id", "max_window_layers", "use_mrope", "_name_or_path", "model_type", "output_attentions",
    "output_hidden_states", "return_dict", "is_decoder", "is_encoder_decoder", "tokenizer_class",
    "bos_token_id", "eos_token_id", "layer_types", "efficient_attention_config", "use_sliding_window",
    "sliding_window", "rope_scaling", "rope_parameters", "rope_theta", "attention_dropout", "hidden_act",
    "attention_bias", "chunk_size_feed_forward", "id2label", "label2id", "problem_type",
    "tie_word_embeddings", "head_dim",
})
_REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads")
_JET_KEYS = {"mode", "expand_v", "num_heads", "head_dim", "norm_eps", "conv_size",
             "dconv_generator_reduction", "dconv_implementation"}


def _from_hf(d: dict[str, Any], overrides: Mapping[str, Any]) -> ModelConfig:
    model_type = d.get("model_type")
    if model_type not in ("qwen2", "jet_nemotron"):
        raise ConfigError(f"model_type={model_type!r}: expected 'qwen2' or 'jet_nemotron'")
    known = _IGNORED_HF_KEYS | set(_REQUIRED_HF_KEYS) | {
        "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "initializer_range"}
    for key in d:
        if key not in known:
            raise ConfigError(f"config.json field {key!r} is not understood by jetnemo_jax "
                              f"(model_type {model_type!r})")
    for key in _REQUIRED_HF_KEYS:
        if key not in d:
            raise ConfigError(f"config.json lacks required field {key!r}")
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={d['hidden_act']!r}: only 'silu' is implemented")
    if d.get("attention_dropout", 0.0):
        raise ConfigError(f"attention_dropout={d['attention_dropout']}: dropout is not implemented")
    if d.get("attention_bias", True) is not True:
        raise ConfigError("attention_bias=false: Qwen2 attention always has q/k/v biases here")
    rope_theta = _rope_theta(d)
    n = d["num_hidden_layers"]

    jet = None
    window = None
    if model_type == "qwen2":
        sliding = d.get("use_sliding_window", False)
        hf_types = d.get("layer_types")
        if hf_types is None:
            first_swa = d.get("max_window_layers", n) if sliding else n
            hf_types = ["sliding_attention" if sliding and i >= first_swa else "full_attention"
                        for i in range(n)]
        mapping = {"full_attention": "attn", "sliding_attention": "swa"}
        layer_types = []
        for i, t in enumerate(hf_types):
            if t not in mapping:
                raise ConfigError(f"layer_types[{i}]={t!r}: a qwen2 config allows {sorted(mapping)}")
            layer_types.append(mapping[t] if sliding else "attn")
        if "swa" in layer_types:
            window = d.get("sliding_window")
    else:
        layer_types = d.get("layer_types")
        if layer_types is None:
            raise ConfigError("config.json (jet_nemotron) lacks 'layer_types'")
        eff = d.get("efficient_attention_config") or {}
        for key in eff:
            if key not in ("jet", "swa"):
                raise ConfigError(f"efficient_attention_config.{key} is not a known layer type")
        if "jet" in layer_types:
            if "jet" not in eff:
                raise ConfigError("layer_types has 'jet' layers but efficient_attention_config.jet is missing")
            jet = _jet_from_hf(eff["jet"])
        if "swa" in layer_types:
            if "swa" not in eff or "window_size" not in eff["swa"]:
                raise ConfigError("layer_types has 'swa' layers but efficient_attention_config.swa.window_size "
                                  "is missing")
            extra = set(eff["swa"]) - {"window_size"}
            if extra:
                raise ConfigError(f"efficient_attention_config.swa.{sorted(extra)[0]} is not understood")
            window = eff["swa"]["window_size"]
    if len(layer_types) != n:
        raise ConfigError(f"layer_types has {len(layer_types)} entries but num_hidden_layers={n}")

    fields = dict(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
        layer_types=tuple(layer_types), head_dim=d.get("head_dim"),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", model_type == "jet_nemotron")),
        max_position_embeddings=d.get("max_position_embeddings", 32768),
        initializer_range=d.get("initializer_range", 0.02), sliding_window=window, jet=jet,
        bos_token_id=d.get("bos_token_id"), eos_token_id=_first(d.get("eos_token_id")))
    fields.update(overrides)
    return ModelConfig(**fields)


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) and x else x


def _rope_theta(d: Mapping[str, Any]) -> float:
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"rope scaling type {rope_type!r} is not implemented (only 'default' RoPE)")
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    return float(theta)


def _jet_from_hf(j: Mapping[str, Any]) -> JetBlockConfig:
    for key in j:
        if key not in _JET_KEYS:
            raise ConfigError(f"efficient_attention_config.jet.{key} is not understood")
    if j.get("mode", "chunk") not in ("chunk", "fused_recurrent"):
        raise ConfigError(f"efficient_attention_config.jet.mode={j['mode']!r}: expected 'chunk'")
    for key in ("num_heads", "head_dim"):
        if key not in j:
            raise ConfigError(f"efficient_attention_config.jet.{key} is missing")
    head_dim = int(j["head_dim"])
    dv = head_dim * float(j.get("expand_v", 2.0))
    if abs(dv - round(dv)) > 1e-4:
        raise ConfigError(f"efficient_attention_config.jet.expand_v={j['expand_v']} gives a non-integer value "
                          f"head dim {dv} (head_dim={head_dim})")
    return JetBlockConfig(
        num_heads=int(j["num_heads"]), head_dim=head_dim, head_v_dim=int(round(dv)),
        conv_size=int(j.get("conv_size", 4)), generator_reduction=int(j.get("dconv_generator_reduction", 8)),
        norm_eps=float(j.get("norm_eps", 1e-5)))


def _format_eps(x: float) -> str:
    """The official schema writes norm_eps as a string such as "1e-5"."""
    mantissa, exp = f"{x:e}".split("e")
    return f"{float(mantissa):g}e{int(exp)}"


def _format_expand_v(x: float) -> float | int:
    if float(x).is_integer():
        return int(x)
    return round(x, 10)


def _to_hf(c: ModelConfig) -> dict[str, Any]:
    common = {
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings, "initializer_range": c.initializer_range,
        "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "rope_scaling": None,
        "tie_word_embeddings": c.tie_word_embeddings, "attention_dropout": 0.0, "use_cache": True,
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "torch_dtype": "bfloat16",
    }
    if c.head_dim != c.hidden_size // c.num_attention_heads:
        common["head_dim"] = c.head_dim
    if set(c.layer_types) == {"attn"}:
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **common,
                "use_sliding_window": False, "sliding_window": None,
                "max_window_layers": c.num_hidden_layers}
    eff: dict[str, Any] = {}
    if c.jet is not None and "jet" in c.layer_types:
        j = c.jet
        eff["jet"] = {"mode": "chunk", "expand_v": _format_expand_v(j.expand_v), "num_heads": j.num_heads,
                      "head_dim": j.head_dim, "norm_eps": _format_eps(j.norm_eps), "conv_size": j.conv_size,
                      "dconv_generator_reduction": j.generator_reduction, "dconv_implementation": "triton"}
    if "swa" in c.layer_types:
        eff["swa"] = {"window_size": c.sliding_window}
    return {
        "architectures": ["JetNemotronForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_jet_nemotron.JetNemotronConfig",
                     "AutoModelForCausalLM": "modeling_jet_nemotron.JetNemotronForCausalLM"},
        "model_type": "jet_nemotron", **common, "layer_types": list(c.layer_types),
        "efficient_attention_config": eff, "max_window_layers": c.num_hidden_layers, "use_mrope": False,
    }


# ------------------------------------------------------------------------------------------- presets
def _layout(n: int, attn: tuple[int, ...], swa: tuple[int, ...]) -> tuple[str, ...]:
    return tuple("attn" if i in attn else "swa" if i in swa else "jet" for i in range(n))


_QWEN_VOCAB = 151936
_QWEN_EOS = 151643


def jet_nemotron_2b(**overrides) -> ModelConfig:
    return ModelConfig(
        vocab_size=_QWEN_VOCAB, hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
        num_key_value_heads=2, layer_types=_layout(28, (14, 19), (20, 21)), sliding_window=1152,
        jet=JetBlockConfig(num_heads=12, head_dim=96, head_v_dim=256), max_position_embeddings=131072,
        bos_token_id=_QWEN_EOS, eos_token_id=_QWEN_EOS).replace(**overrides)


def jet_nemotron_4b(**overrides) -> ModelConfig:
    return ModelConfig(
        vocab_size=_QWEN_VOCAB, hidden_size=2048, intermediate_size=11008, num_attention_heads=16,
        num_key_value_heads=2, layer_types=_layout(36, (17, 20, 32), (5, 16, 19, 21, 22, 25, 27)),
        sliding_window=2048, jet=JetBlockConfig(num_heads=16, head_dim=128, head_v_dim=256),
        max_position_embeddings=32768, bos_token_id=_QWEN_EOS, eos_token_id=_QWEN_EOS).replace(**overrides)


def qwen2_5_1_5b(**overrides) -> ModelConfig:
    return ModelConfig(
        vocab_size=_QWEN_VOCAB, hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
        num_key_value_heads=2, layer_types=("attn",) * 28, max_position_embeddings=131072,
        bos_token_id=_QWEN_EOS, eos_token_id=_QWEN_EOS).replace(**overrides)


def qwen2_5_3b(**overrides) -> ModelConfig:
    return ModelConfig(
        vocab_size=_QWEN_VOCAB, hidden_size=2048, intermediate_size=11008, num_attention_heads=16,
        num_key_value_heads=2, layer_types=("attn",) * 36, max_position_embeddings=32768,
        bos_token_id=_QWEN_EOS, eos_token_id=_QWEN_EOS).replace(**overrides)


def tiny(**overrides) -> ModelConfig:
    """A few-million-parameter hybrid with every layer type, for CPU demos and tests."""
    return ModelConfig(
        vocab_size=512, hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2,
        layer_types=("jet", "jet", "attn", "jet", "swa", "jet"), sliding_window=64,
        jet=JetBlockConfig(num_heads=4, head_dim=32, head_v_dim=64), max_position_embeddings=4096,
        dtype="float32").replace(**overrides)


PRESETS = {
    "jet_nemotron_2b": jet_nemotron_2b, "jet_nemotron_4b": jet_nemotron_4b,
    "qwen2_5_1_5b": qwen2_5_1_5b, "qwen2_5_3b": qwen2_5_3b, "tiny": tiny,
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
