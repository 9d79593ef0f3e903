"""Convert checkpoints between PyTorch (HF safetensors directories) and jetnemo_jax (Orbax).

    python convert_torch_ckpt.py hf-to-jax SRC_HF_DIR DST_JAX_DIR [--dtype bfloat16] [--tokenizer DIR] [--check]
    python convert_torch_ckpt.py jax-to-hf SRC_JAX_DIR DST_HF_DIR [--dtype bfloat16] [--tokenizer DIR] [--check]
    python convert_torch_ckpt.py qwen2-to-jet SRC_QWEN_DIR DST_JAX_DIR [--preset jet_nemotron_2b]
        [--layer-types jet,jet,...,attn] [--seed 0] [--dtype bfloat16]   (or --layout-config CONFIG.json)

qwen2-to-jet reads every size from SRC's config.json (any Qwen2.5-architecture model); the layout follows
jetnemo_jax.config.jet_layout: the placement of the recipe of SRC's depth (--preset names one), the
JetBlock by its rule; --layer-types sets the placement (needed for depths other than 28 and 36). SRC's
tokenizer files, if any, travel to the destination.

Both Qwen2 (all attention) and Jet-Nemotron checkpoints are understood. A_log and dt_bias stay float32.
The destination appears only when complete (written under a temporary name, then renamed).
hf-to-jax and jax-to-hf: SRC may be a training workdir (its final/ is read); SRC's tokenizer files travel to
the destination unless --tokenizer names others; --verbose shows an error's traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import numpy as np


def _parse_size(text: str) -> int:
    units = {"KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3}
    try:
        for unit, factor in units.items():
            if text.upper().endswith(unit):
                size = int(float(text[:-2]) * factor)
                break
        else:
            size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive size in bytes, or with KB, MB or GB (2GB)")
    return size


def check_logits(src, dst, vocab_size: int, seed: int = 0) -> float:
    """Relative RMS difference of the two models' logits on random tokens."""
    import jax.numpy as jnp

    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, vocab_size, (2, 24)))
    a, b = np.asarray(src(tokens), np.float64), np.asarray(dst(tokens), np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("hf-to-jax", "HF safetensors directory -> jetnemo_jax Orbax checkpoint"),
                            ("jax-to-hf", "jetnemo_jax Orbax checkpoint -> HF safetensors directory")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("src")
        p.add_argument("dst")
        p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                       help="dtype of the written weights (A_log and dt_bias are always float32)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
        p.add_argument("--check", action="store_true", help="reload the destination and compare logits")
        p.add_argument("--tokenizer", help="directory whose tokenizer files are copied to the destination "
                       "(default: SRC's own, if it holds one)")
        p.add_argument("--verbose", action="store_true", help="show the traceback of an error")
        if name == "jax-to-hf":
            p.add_argument("--shard-size", default="2GB", type=_parse_size, help="largest safetensors shard")
    p = sub.add_parser("qwen2-to-jet", help="HF Qwen2.5 directory -> Jet-Nemotron initialisation (Orbax)")
    p.add_argument("src")
    p.add_argument("dst")
    layout = p.add_mutually_exclusive_group()
    layout.add_argument("--preset", help="layout recipe (placement, sliding window): jet_nemotron_2b (28 layers) or "
                        "jet_nemotron_4b (36); default: the one of the source's depth")
    layout.add_argument("--layout-config", help="a Jet-Nemotron config.json of the source's sizes whose layout "
                        "(layer_types, jet, swa) to use")
    p.add_argument("--layer-types", help="comma-separated attn/swa/jet per layer, overriding the layout's")
    p.add_argument("--seed", type=int, default=0, help="seed of the JetBlock initialisation")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    args = parser.parse_args(argv)

    from jetnemo_jax import cli
    from jetnemo_jax.checkpoint import CheckpointError, load_hf_model
    from jetnemo_jax.checkpoint.hf_export import save_hf
    from jetnemo_jax.checkpoint.orbax_params import load_params, save_params
    from jetnemo_jax.config import ConfigError
    from jetnemo_jax.data.tokenizer import TokenizerError, find_tokenizer_dir

    t0 = time.perf_counter()
    try:
        if args.command == "qwen2-to-jet":
            return _qwen2_to_jet(args, t0)
        src = cli.resolve_checkpoint(args.src, flag="SRC")  # a training workdir: its final/
        tokenizer = args.tokenizer or (args.src if find_tokenizer_dir(args.src) else None)
        if args.command == "hf-to-jax":
            model = load_hf_model(src, dtype="float32", param_dtype=args.dtype)
            save_params(model, args.dst, overwrite=args.overwrite, tokenizer_dir=tokenizer)
            reload = lambda: load_params(args.dst, dtype="float32")
        else:
            model = load_params(src, dtype="float32")
            save_hf(model, args.dst, dtype=args.dtype, overwrite=args.overwrite, max_shard_bytes=args.shard_size,
                    tokenizer_dir=tokenizer)
            reload = lambda: load_hf_model(args.dst, dtype="float32", param_dtype=args.dtype)
        print(f"{args.command}: wrote {args.dst} in {time.perf_counter() - t0:.1f} s")
        if args.check:
            err = check_logits(model, reload(), model.config.vocab_size)
            print(f"check: logits relative difference {err:.3g} (source vs. reloaded destination)")
            if err > (1e-6 if args.dtype == "float32" else 2e-2):
                print("check FAILED", file=sys.stderr)
                return 1
    except (CheckpointError, ConfigError, TokenizerError, cli.UserError, OSError) as e:
        if cli.verbose(args):
            traceback.print_exc()
        else:
            print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _qwen2_to_jet(args, t0) -> int:
    import json

    from jetnemo_jax import config
    from jetnemo_jax.checkpoint.orbax_params import save_params
    from jetnemo_jax.checkpoint.qwen2_to_jet import qwen2_to_jet

    source = config.ModelConfig.from_hf_file(args.src)
    if args.layout_config:
        given = config.ModelConfig.from_hf_file(args.layout_config)
        diff = config.config_diff({k: getattr(given, k) for k in config.SOURCE_SHAPE_FIELDS},
                                  {k: getattr(source, k) for k in config.SOURCE_SHAPE_FIELDS})
        if diff:
            raise config.ConfigError(f"--layout-config {args.layout_config} is for another model than {args.src}: "
                                     f"{'; '.join(diff)} (layout != source); drop --layout-config to derive the "
                                     "layout from the source (--preset, --layer-types)")
        layout = config.jet_layout(source, layer_types=args.layer_types or given.layer_types,
                                   layer_types_flag="--layer-types", jet=given.jet,
                                   sliding_window=given.sliding_window)
    else:
        layout = config.jet_layout(source, args.preset, args.layer_types, layer_types_flag="--layer-types")
    model, report = qwen2_to_jet(args.src, layout, seed=args.seed, param_dtype=args.dtype)
    from jetnemo_jax.data.tokenizer import find_tokenizer_dir

    save_params(model, args.dst, overwrite=args.overwrite, tokenizer_dir=args.src if find_tokenizer_dir(args.src)
                else None, extra_files={"conversion_report.json": json.dumps(report, indent=2)})
    print(f"qwen2-to-jet: wrote {args.dst} in {time.perf_counter() - t0:.1f} s: {len(report['copied'])} tensors "
          f"copied, {len(report['initialised'])} initialised, {len(report['dropped'])} dropped "
          f"(see {args.dst}/conversion_report.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
