"""Training configuration (ml_collections): defaults, and the model section <-> ModelConfig.

Config files in configs/ start from `default_config()` and change what they need; every key exists here,
so a misspelt key (in a file or on the command line) fails instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import os

import ml_collections

from jetnemo_jax import config as model_config_lib
from jetnemo_jax import sharding
from jetnemo_jax.train import model_source


def model_section(preset: str, **overrides) -> ml_collections.ConfigDict:
    """Every ModelConfig field of a preset, so any of them can be set from the command line."""
    cfg = model_config_lib.preset(preset, **overrides)
    d = dataclasses.asdict(cfg)
    d["jet"] = d["jet"] or dataclasses.asdict(model_config_lib.JetBlockConfig())
    return ml_collections.ConfigDict(d)


def to_model_config(section) -> model_config_lib.ModelConfig:
    """config.model as it stands, no checkpoint read (unset fields of a recipe section: the preset's)."""
    return model_source.section_config(section)


def resolve_model_config(config) -> model_config_lib.ModelConfig:
    """The run's ModelConfig: config.model's set fields, the unset ones from init.path's config.json
    (jetnemo_jax/train/model_source.py says which, and which conflicts it refuses)."""
    return model_source.resolve(config.model, config.init.mode, config.init.path)


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "runs/tiny"  # checkpoints/, frozen/, tokenizer/, metrics.jsonl, tensorboard/, loss.png
    c.seed = 0
    c.model = model_section("tiny")

    # Initial weights: "random" (seed), "qwen2" (an HF Qwen2.5 directory, converted with
    # model.layer_types; the distillation teacher comes from it too) or "params" (a Jet-Nemotron
    # checkpoint: an HF safetensors directory or one written by convert_torch_ckpt.py / this trainer).
    c.init = ml_collections.ConfigDict(dict(mode="random", path=""))

    c.data = ml_collections.ConfigDict(dict(
        source="pydoc_data",  # comma-separated files/dirs/globs (.jsonl .txt .parquet .array_record)
        text_key="text",
        tokenizer="",  # local HF tokenizer dir; "" trains a BPE of model.vocab_size on the data (small corpora)
        eos_token="",  # "" reads tokenizer_config.json
        seq_len=128,
        global_batch=8,  # rows per optimizer step, over all processes
        shuffle=True,
        num_shards=0,  # data streams, each packed separately (0: one per process); fixing it makes the
        #               global batch independent of the process count
        worker_count=0,  # grain worker processes for tokenisation (0: in the main process)
        eval_source="",  # held-out documents for the validation loss ("" : a split of `source`, see eval_split)
        eval_split=0.05,  # with no eval_source: this fraction of `source`'s documents is held out (0: none)
        check_tokenizer=True,  # refuse a tokenizer whose vocabulary or special ids cannot be the model's
    ))

    c.optim = ml_collections.ConfigDict(dict(
        lr=3e-3, warmup_steps=20, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
        clip_norm=1.0,
        no_decay=r"(norm|bias|A_log|dt_bias)",  # regex on parameter paths: no weight decay
    ))

    c.train = ml_collections.ConfigDict(dict(
        steps=300,
        microbatches=1,  # gradient accumulation: global_batch is split into this many sequential parts
        remat="none",  # none | full | dots | dots_saveable | kernels, or per layer kind: "jet:none,attn:full,swa:full"
        loss_chunk=0,  # > 0: LM head + loss in chunks of this many tokens (no [B, T, vocab] float32 logits)
        frozen="",  # regex on parameter paths (e.g. "mlp|embed_tokens"); frozen: no grads, no optimizer state
        frozen_dtype="compute",  # compute: frozen (and teacher) matmul/embedding weights held in model.dtype,
        # bit-exact as the layers cast them to it at every use anyway; param: held in model.param_dtype
        nonfinite="stop",  # stop | skip: what a NaN/inf loss or gradient does
        log_every=10,
        sample_prompt="def ",  # printed with a short greedy sample at the end ("" to skip)
        sample_tokens=48,
        eval_every=100,  # validation loss every N steps and at the end (0: never)
        eval_batches=4,  # batches of data.global_batch rows per validation
    ))

    c.distill = ml_collections.ConfigDict(dict(
        enabled=False,  # teacher: the all-attention original, sharing the student's frozen weights
        temperature=1.0,
        kl_weight=1.0,
        ce_weight=0.0,  # next-token cross entropy alongside the KL
        mse_weight=0.0,  # MSE between student and teacher hidden states at hidden_layers
        hidden_layers=(),
    ))

    c.checkpoint = ml_collections.ConfigDict(dict(
        every=100, keep=3, async_save=True,
        # Restarting a workdir compares this config with the one saved there (run_config.json); keys that
        # change the run (model, data, optimiser, steps, ...) may differ only when listed here, comma-separated
        # (prefixes: "optim" covers optim.lr, ...). Logging, checkpoint cadence, mesh and workers may always change.
        allow_changes=""))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, context=1, tensor=1))
    c.sharding_rules = tuple(sharding.DEFAULT_RULES)
    # Multi-process GPU/CPU clusters: explicit values, else JAX's auto-detection (TPU pods, SLURM, ...).
    c.distributed = ml_collections.ConfigDict(dict(
        mode="auto",  # auto (initialise on multi-host TPU or with a coordinator address) | on | off
        coordinator_address="", num_processes=0, process_id=-1, cpu_collectives="gloo"))
    c.compilation_cache = compilation_cache_section()
    return c


def compilation_cache_section() -> ml_collections.ConfigDict:
    """JAX's persistent compilation cache (jetnemo_jax/compilation_cache.py): a restart, or another run of the
    same config, reads its compiled programs instead of compiling them."""
    return ml_collections.ConfigDict(dict(
        enabled=True,
        dir="",  # "": $JAX_COMPILATION_CACHE_DIR, else ~/.cache/jetnemo_jax/jax_compilation_cache (XDG_CACHE_HOME);
        #          shared by runs; a pod can name shared storage (gs://...)
    ))


def check_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict | None = None,
               prefix: str = "") -> None:
    """Every key of `config` must exist in the defaults; the error lists the valid keys."""
    reference = default_config() if reference is None else reference
    for key, value in config.items():
        if key not in reference:
            raise KeyError(_unknown_key(prefix, key, reference))
        if isinstance(value, ml_collections.ConfigDict) and key != "model":
            check_keys(value, reference[key], f"{prefix}{key}.")


def unknown_key(dotted: str, reference: ml_collections.ConfigDict | None = None) -> str | None:
    """The error for a dotted key (e.g. from --config.train.stpes) that the defaults lack, else None."""
    node, prefix = default_config() if reference is None else reference, ""
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            return None
        if part not in node:
            return _unknown_key(prefix, part, node)
        node, prefix = node[part], f"{prefix}{part}."
    return None


def _unknown_key(prefix: str, key: str, reference) -> str:
    close = difflib.get_close_matches(key, list(reference.keys()), n=3)
    hint = f" (did you mean {' or '.join(repr(prefix + c) for c in close)}?)" if close else ""
    return (f"unknown config key '{prefix}{key}'{hint}; valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(reference.keys()))}")


# (key, predicate, what it must be): checked before anything is built, so a bad value is one line naming it.
_RANGES = (
    ("data.global_batch", lambda v: v >= 1, "a positive integer"),
    ("data.seq_len", lambda v: v >= 2, "an integer >= 2"),
    ("data.eval_split", lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    ("train.steps", lambda v: v >= 1, "a positive integer"),
    ("train.microbatches", lambda v: v >= 1, "a positive integer"),
    ("train.loss_chunk", lambda v: v >= 0, "0 (off) or a positive integer"),
    ("train.frozen_dtype", lambda v: v in ("compute", "param"), "compute or param"),
    ("train.log_every", lambda v: v >= 1, "a positive integer"),
    ("train.eval_every", lambda v: v >= 0, "0 (off) or a positive integer"),
    ("train.eval_batches", lambda v: v >= 1, "a positive integer"),
    ("checkpoint.every", lambda v: v >= 1, "a positive integer"),
    ("checkpoint.keep", lambda v: v >= 1, "a positive integer"),
    ("optim.lr", lambda v: v > 0, "positive"),
    ("optim.warmup_steps", lambda v: v >= 0, "a non-negative integer"),
)


def check_values(config: ml_collections.ConfigDict) -> None:
    """ValueError naming the first key whose value is out of range."""
    for key, ok, what in _RANGES:
        section, name = key.split(".")
        value = config[section][name]
        if not ok(value):
            raise ValueError(f"{key}={value!r}: must be {what}")
    from jetnemo_jax.model import remat_by_kind

    try:
        remat_by_kind(config.train.remat)
    except ValueError as e:
        raise ValueError(f"train.{e}") from None
    if config.train.nonfinite not in ("stop", "skip"):
        raise ValueError(f"train.nonfinite={config.train.nonfinite!r}: expected stop or skip")


def resolve_init_path(config: ml_collections.ConfigDict) -> str | None:
    """Check init.path against init.mode before anything is built, and take a training workdir as its final/
    checkpoint (as every other command does): sets config.init.path and returns a note saying so, else None."""
    mode, path = config.init.mode, config.init.path
    if mode in ("qwen2", "params") and not path:
        raise ValueError(f"init.mode={mode!r} needs init.path (a checkpoint directory with config.json)")
    if not path or os.path.exists(os.path.join(path, "config.json")):
        return None
    final = os.path.join(path, "final")
    if os.path.isfile(os.path.join(final, "config.json")):
        config.init.path = final
        return f"init.path {path} is a training run's workdir: using its final checkpoint {final}"
    if os.path.isdir(os.path.join(path, "checkpoints")):
        raise ValueError(f"init.path {path}: a training workdir without final/ (its run has not finished)")
    return None
