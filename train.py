r"""Continued pretraining of Jet-Nemotron models.

    python train.py --config configs/tiny.py [--config.train.steps=100 ...]
    python train.py --config configs/jet_nemotron_2b_stage1.py --config.init.path=/ckpt/Qwen2.5-1.5B \
        --config.data.source=/data/*.jsonl --config.data.tokenizer=/ckpt/Qwen2.5-1.5B
    python train.py --config configs/tiny.py --print_config          # every key with its value, then exit
    python train.py --config configs/jet_nemotron_2b_stage1.py --compile_only=v5p:4x4x4   # TPU AOT check

Exit status: 0 when the run reaches train.steps; 128 + the signal's number (143 SIGTERM, 130 SIGINT) when a
signal stopped it after saving a checkpoint (the run is resumable, not finished); 2 for a mistake in the
config, data or checkpoints (one line; --verbose shows the traceback).
"""

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/tiny.py", "Run config (ml_collections); set any key with --config.a.b=value, list every key "
    "and its value with --print_config.", lock_config=True)
_PRINT_CONFIG = flags.DEFINE_boolean("print_config", False, "Print the resolved config (every key) and exit.")
_VERBOSE = flags.DEFINE_boolean("verbose", False, "Show the traceback of an error (or set JETNEMO_VERBOSE=1).")
_COMPILE_ONLY = flags.DEFINE_string(
    "compile_only", "", "Compile the train step ahead of time for a TPU topology (e.g. v5p:4x4x4) on this "
    "machine, print per-chip memory and exit.")
_SLICES = flags.DEFINE_integer("compile_only_slices", 1, "Number of TPU slices (multislice) for --compile_only.")


def _fail(message: str, status: int = 2):
    """The one line, then exit without the interpreter's teardown: after a failed checkpoint read, Orbax's
    abandoned asyncio tasks would log tracebacks as they are collected (the run already closed its files)."""
    print(f"error: {message.strip()}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(status)


def _parse_flags(argv):
    """absl's parser, with a misspelt key or a bad value as one line (ml_collections raises tracebacks)."""
    from jetnemo_jax.cli import verbose_env

    if any(a in ("-h", "--help", "-?", "--helpshort") for a in argv[1:]):
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)  # absl's own --help exits 1
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.keys()  # a config file that failed to load raises on first use: use it here
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
        if verbose_env():
            raise
        _fail(_flag_error(e))
    return rest


def _flag_error(e: Exception) -> str:
    if isinstance(e, AttributeError):  # ml_collections names only the last part of a misspelt key: find it
        from jetnemo_jax.train.config import unknown_key

        for arg in sys.argv[1:]:
            if arg.startswith("--config."):
                message = unknown_key(arg[len("--config."):].split("=", 1)[0])
                if message:
                    return f"{message} (--print_config lists every key)"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if isinstance(e, OSError) and "config file" in str(e):  # the last line is the reason (no such file, ...)
        return f"--config: cannot load the config file ({lines[-1]})"
    return " ".join(lines)


def main(argv):
    from jetnemo_jax.cli import train_user_errors, verbose_env

    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])} (config keys are set as --config.a.b=value)")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and grain log every file they touch at INFO
    logging.getLogger("jetnemo_jax").setLevel(logging.INFO)
    config = _CONFIG.value
    if _PRINT_CONFIG.value:
        print(config)
        return
    try:
        if _COMPILE_ONLY.value:
            from jetnemo_jax.train.compile_only import compile_for_topology

            compile_for_topology(config, _COMPILE_ONLY.value, num_slices=_SLICES.value)
            return
        from jetnemo_jax.train.loop import run

        result = run(config)
    except KeyboardInterrupt:
        _fail("interrupted before a checkpoint could be saved (the newest saved one is kept)", 130)
    except train_user_errors() as e:
        if _VERBOSE.value or verbose_env():
            raise
        _fail(f"{e.args[0] if isinstance(e, KeyError) and e.args else e}"
              + ("" if "\n" in str(e) else "  (--verbose for the traceback)"))
    if result.get("signal"):
        raise SystemExit(128 + result["signal"])


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
