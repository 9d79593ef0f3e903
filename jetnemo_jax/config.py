"""Model configuration: a frozen dataclass, presets, and HF `config.json` read/write.

Two HF schemas are understood: Qwen2 (`model_type: "qwen2"`, every layer full attention unless
`use_sliding_window`) and Jet-Nemotron (`model_type: "jet_nemotron"`, `layer_types` of "attn", "swa",
"jet" plus `efficient_attention_config`). Any key we do not know, and any value that would change the
model in a way we do not implement, raises `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
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
    gdr_impl: str = "auto"  # gated delta rule: auto | tpu | triton (GPU) | fla (GPU, [fla] extra) | xla | reference
    conv_impl: str = "auto"  # dynamic conv: auto | mosaic_gpu | triton (GPU) | tpu | xla | reference (ops.conv)
    attn_impl: str = "xla"  # attention core: xla (masked, the reference) | cudnn (flash, NVIDIA GPUs; opt-in)
    # | blocked (XLA in query blocks, no [T, T] mask or scores: long sequences)
    # | splash (the TPU flash-attention kernel; T a multiple of 128; opt-in)
    # Training/prefill forward: each run of consecutive layers of one kind is a lax.scan over its stacked
    # weights (one compiled layer body per run) instead of unrolled layers; parameters and numerics unchanged.
    scan_layers: bool = False

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
                              ("gdr_impl", ("auto", "tpu", "triton", "fla", "xla", "reference")),
                              ("conv_impl", ("auto", "mosaic_gpu", "triton", "tpu", "xla", "reference")),
                              ("attn_impl", ("xla", "cudnn", "blocked", "splash"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected one of {allowed}")
        if not isinstance(self.scan_layers, bool):
            raise ConfigError(f"scan_layers={self.scan_layers!r}: expected True or False")

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


# ------------------------------------------------------------------------- the hybrid of a Qwen2 source
# Fields the hybrid takes from its all-attention source that shape or give meaning to the weights it
# inherits: neither a run nor a conversion may change them. (It also takes max_position_embeddings,
# initializer_range and the bos/eos ids, which shape no weight: those a run may set.)
SOURCE_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                       "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "tie_word_embeddings")
# Numerics and op selection: the run's choice, never a checkpoint's (config.json does not hold them).
NUMERICS_FIELDS = ("dtype", "param_dtype", "gdr_impl", "conv_impl", "attn_impl", "scan_layers")
# The PostNAS results (section 4 of the paper): presets whose placement and window a hybrid can reuse.
JET_RECIPES = ("jet_nemotron_2b", "jet_nemotron_4b")


def parse_layer_types(value) -> tuple[str, ...]:
    """layer_types from a tuple or a comma-separated string ("jet,jet,attn,swa"; a command line gives one)."""
    items = [value] if isinstance(value, str) else list(value)
    types = tuple(t.strip() for item in items for t in str(item).split(",") if t.strip())
    for i, t in enumerate(types):
        if t not in LAYER_TYPES:
            raise ConfigError(f"layer_types[{i}]={t!r}: expected one of {', '.join(LAYER_TYPES)}")
    return types


def jet_block_for(source: ModelConfig) -> JetBlockConfig:
    """The JetBlock that replaces `source`'s attention. A source with a released model's attention shape
    (hidden, heads, head dim of Qwen2.5-1.5B or -3B) gets that model's searched block (12/96/256,
    16/128/256). Any other: one JetBlock head per attention head, value dim dv = 2 x the attention head dim
    (both released models), key dim dk = 3/4 of the head dim rounded to a multiple of 16 (the 2B's ratio,
    the one the paper's hardware-aware search picked: a smaller state [dk, dv] decodes faster), generator
    reduction 8 (or the largest power of two dividing the value dim Dv = heads x dv, if 8 does not)."""
    for name in JET_RECIPES:
        p = preset(name)
        if (p.hidden_size, p.num_attention_heads, p.head_dim) == (
                source.hidden_size, source.num_attention_heads, source.head_dim):
            return p.jet
    dk = max(16, 16 * int(0.75 * source.head_dim / 16 + 0.5))
    dv = 2 * source.head_dim
    return JetBlockConfig(num_heads=source.num_attention_heads, head_dim=dk, head_v_dim=dv,
                          generator_reduction=math.gcd(8, source.num_attention_heads * dv))


def jet_layout(source: ModelConfig, recipe: str | None = None, layer_types=None, *,
               layer_types_flag: str = "--config.model.layer_types", **overrides) -> ModelConfig:
    """The Jet-Nemotron hybrid of an all-attention Qwen2 `source`: every size from the source; from the
    recipe what PostNAS decides.

    - Sizes (vocab, hidden, MLP, heads, kv heads, head dim, eps, RoPE theta, tying, max positions, bos/eos):
      the source's. Overriding a SOURCE_SHAPE_FIELDS one with another value is an error.
    - Placement (`layer_types`, a tuple or "jet,jet,attn,..."): given, else the recipe's when the source has
      its depth (jet_nemotron_2b: 28 layers, jet_nemotron_4b: 36). `recipe` None picks the recipe of the
      source's depth. Any other depth is not guessed: ConfigError asking for layer_types.
    - Sliding window: the recipe's (2B 1152, 4B 2048; jet_nemotron_2b's where no recipe fits).
    - JetBlock: `jet_block_for(source)`, conv_size 4, norm eps 1e-5.
    `overrides`: any other ModelConfig field; `jet` as a JetBlockConfig or a mapping of some of its fields
    (the rest by the rule). `layer_types_flag` names the option that sets layer_types in the error.
    """
    if set(source.layer_types) != {"attn"}:
        raise ConfigError(f"the source must be an all-attention Qwen2 model, it has layer types "
                          f"{sorted(set(source.layer_types))}")
    n = source.num_hidden_layers
    depth = {preset(name).num_hidden_layers: name for name in JET_RECIPES}
    if recipe is not None and recipe not in JET_RECIPES:
        raise ConfigError(f"unknown layout recipe {recipe!r}; choose from {', '.join(JET_RECIPES)}")
    ref = preset(recipe or depth.get(n, JET_RECIPES[0]))
    if layer_types is not None:
        layer_types = parse_layer_types(layer_types)
    elif ref.num_hidden_layers == n:
        layer_types = ref.layer_types
    else:
        ask = (f"pass {layer_types_flag}=jet,jet,attn,... with {n} entries, each one of "
               f"{', '.join(LAYER_TYPES)}")
        if n in depth:  # a recipe was named whose placement is for another depth
            raise ConfigError(f"the {recipe} placement is for {ref.num_hidden_layers} layers but the source has "
                              f"{n}: use the {depth[n]} recipe, or {ask}")
        known = " or ".join(f"{k} ({v})" for k, v in depth.items())
        raise ConfigError(f"the source has {n} layers and the Jet-Nemotron placements are for {known} layers: "
                          f"{ask}")
    if len(layer_types) != n:
        raise ConfigError(f"layer_types has {len(layer_types)} entries but the source has {n} layers")
    conflicts = config_diff({k: v for k, v in overrides.items() if k in SOURCE_SHAPE_FIELDS},
                            {k: getattr(source, k) for k in SOURCE_SHAPE_FIELDS if k in overrides})
    if conflicts:
        raise ConfigError(f"the hybrid keeps the source's sizes: {'; '.join(conflicts)} (given != source)")
    jet = overrides.pop("jet", None)
    if not isinstance(jet, JetBlockConfig):
        jet = dataclasses.replace(jet_block_for(source), **dict(jet or {}))
    window = overrides.pop("sliding_window", None) or ref.sliding_window
    return source.replace(
        layer_types=layer_types, jet=jet if "jet" in layer_types else None,
        sliding_window=window if "swa" in layer_types else None, **overrides)


def config_diff(a, b) -> list[str]:
    """One "field: a != b" line per field where two configs differ (ModelConfigs, JetBlockConfigs or
    mappings of their fields), JetBlock fields as "jet.name"; layer types written as the flag takes them."""
    da = a if isinstance(a, Mapping) else dataclasses.asdict(a)
    db = b if isinstance(b, Mapping) else dataclasses.asdict(b)
    lines = []
    for key in list(da) + [k for k in db if k not in da]:
        va, vb = da.get(key, "<unset>"), db.get(key, "<unset>")
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            lines += [f"{key}.{line}" for line in config_diff(va, vb)]
        elif va != vb:
            lines.append(f"{key}: {_show(va)} != {_show(vb)}")
    return lines


def _show(value) -> str:
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, str) for v in value):
        return ",".join(value)
    return repr(value)
