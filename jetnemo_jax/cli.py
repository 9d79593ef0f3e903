"""What the command-line tools share: a user's mistake ends in one line on stderr and exit status 2 (the
traceback with --verbose or JETNEMO_VERBOSE=1), and every directory the project writes is accepted where a
checkpoint or a tokenizer is asked for (a training workdir, its final/, an HF export)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

VERBOSE_ENV = "JETNEMO_VERBOSE"


class UserError(Exception):
    """A mistake in a command line or its inputs; the message says what is wrong and what to do."""


def _user_errors() -> tuple[type[Exception], ...]:
    from jetnemo_jax.checkpoint.state_dict import CheckpointError
    from jetnemo_jax.config import ConfigError
    from jetnemo_jax.data.sources import DataError
    from jetnemo_jax.data.tokenizer import TokenizerError

    return UserError, CheckpointError, ConfigError, TokenizerError, DataError


def train_user_errors() -> tuple[type[BaseException], ...]:
    """What train.py reports in one line: the above, and the run's checks of its config, data and checkpoints
    (ValueError, KeyError for a misspelt key, OSError for a path that is not there)."""
    from jetnemo_jax.train.loop import NonFiniteLoss

    return (*_user_errors(), ValueError, KeyError, OSError, NonFiniteLoss)


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help=f"show the traceback of an error (or set {VERBOSE_ENV}=1)")


def add_compilation_cache_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compilation-cache", default="", metavar="DIR|off",
                        help="JAX's persistent compilation cache (default: $JAX_COMPILATION_CACHE_DIR, else "
                             "~/.cache/jetnemo_jax/jax_compilation_cache); off to compile everything afresh")


def setup_compilation_cache(args) -> None:
    """The cache --compilation-cache names (jetnemo_jax/compilation_cache.py), before anything compiles."""
    from jetnemo_jax import compilation_cache

    compilation_cache.setup(getattr(args, "compilation_cache", ""))


def verbose_env() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def verbose(args) -> bool:
    return getattr(args, "verbose", False) or verbose_env()


def run(body, args):
    """body(args); a user error ends the process with its one-line message (or traceback) and status 2."""
    try:
        return body(args)
    except _user_errors() as e:
        if verbose(args):
            traceback.print_exc()
        else:
            print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        raise SystemExit(2) from None


def resolve_checkpoint(path: str, flag: str = "--checkpoint") -> str:
    """`path`, or the final/ checkpoint of a training workdir (with a note on stderr)."""
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: no such directory")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    final = os.path.join(path, "final")
    if os.path.isfile(os.path.join(final, "config.json")):
        print(f"note: {path} is a training run's workdir; using its final checkpoint {final}", file=sys.stderr)
        return final
    if os.path.isdir(os.path.join(path, "checkpoints")):
        raise UserError(f"{flag} {path}: a training workdir without final/ (its run has not finished; final/ "
                        "is written at the last step)")
    return path


def open_checkpoint(path: str, dtype: str | None, flag: str = "--checkpoint"):
    """The model of a checkpoint directory (resolve_checkpoint's), activations in `dtype` if given."""
    from jetnemo_jax.checkpoint.auto import load_model

    try:
        return load_model(path, **({"dtype": dtype} if dtype else {}))
    except _user_errors() as e:
        raise UserError(f"{flag} {e}") from e


def open_tokenizer(tokenizer: str | None, checkpoint: str, flags: tuple[str, str] = ("--tokenizer", "--checkpoint")):
    """--tokenizer's tokenizer, else the checkpoint's own (a checkpoint or workdir holding tokenizer files);
    `flags`: how the two are named in messages."""
    from jetnemo_jax.data.tokenizer import TokenizerError, find_tokenizer_dir, load_tokenizer

    flag, path = (flags[0], tokenizer) if tokenizer is not None else (flags[1], checkpoint)
    if tokenizer is None and find_tokenizer_dir(checkpoint) is None:
        raise UserError(f"{flags[1]} {checkpoint} holds no tokenizer: pass {flags[0]} DIR (a local HF tokenizer "
                        "directory)")
    try:
        return load_tokenizer(path, require_eos=False)
    except TokenizerError as e:
        raise UserError(f"{flag} {e}") from e


def check_tokenizer_fits(tokenizer, model) -> None:
    """Refuse a tokenizer whose ids run past the model's embedding rows (not this model's tokenizer)."""
    rows = model.config.vocab_size
    if tokenizer.vocab_size > rows:
        raise UserError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size:,} tokens but the model has "
                        f"{rows:,} embedding rows: pass the tokenizer the model was trained with (--tokenizer)")


# ------------------------------------------------------------------------- absl + ml_collections apps
def fail(message: str, status: int = 2):
    """The one line, then exit without the interpreter's teardown: after a failed checkpoint read, Orbax's
    abandoned asyncio tasks would log tracebacks as they are collected (the run has closed its files)."""
    print(f"error: {message.strip()}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(status)


def define_config_flag(default: str, help_text: str, reference=None):
    """ml_collections' --config flag. Its default file is loaded, and --config.* overrides applied, as the flag is
    defined (at import): a mistake there is one line too. `reference` as for `config_flags_parser`."""
    from ml_collections import config_flags

    try:
        return config_flags.DEFINE_config_file("config", default, help_text, lock_config=True)
    except (AttributeError, KeyError, ValueError, TypeError, OSError) as e:
        if verbose_env():
            raise
        fail(_flag_error(e, sys.argv, reference() if callable(reference) else reference))


def config_flags_parser(config_flag, reference=None):
    """A `flags_parser` for absl's app.run: --help on stdout with status 0, and a misspelt --config.* key, a bad
    value or a config file that does not load as one line (ml_collections raises tracebacks). `reference`:
    the default config whose keys a misspelt one is matched against (train's defaults if None)."""
    from absl import app, flags

    def parse(argv):
        if any(a in ("-h", "--help", "-?", "--helpshort") for a in argv[1:]):
            app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)  # absl's own --help exits 1
        try:
            rest = flags.FLAGS(argv)
            config_flag.value.keys()  # a config file that failed to load raises on first use: use it here
        except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
            if verbose_env():
                raise
            fail(_flag_error(e, argv, reference))
        return rest

    return parse


def _flag_error(e: Exception, argv, reference) -> str:
    if isinstance(e, (AttributeError, KeyError)):  # ml_collections names only a part of a misspelt key: find it
        from jetnemo_jax.train.config import unknown_key

        for arg in argv[1:]:
            if arg.startswith("--config."):
                message = unknown_key(arg[len("--config."):].split("=", 1)[0], reference)
                if message:
                    return f"{message} (--print_config lists every key)"
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)  # a KeyError's str is its repr
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(e, OSError) and "config file" in str(e):  # the last line is the reason (no such file, ...)
        return f"--config: cannot load the config file ({lines[-1]})"
    return " ".join(lines)


def run_app(body, *, verbose_flag: bool):
    """body() for train.py-like apps: a user error (train_user_errors) is one line and status 2, Ctrl-C before
    anything was saved is one line and status 130."""
    try:
        return body()
    except KeyboardInterrupt:
        fail("interrupted before a checkpoint could be saved (the newest saved one is kept)", 130)
    except train_user_errors() as e:
        if verbose_flag or verbose_env():
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        fail(message + ("" if "\n" in message else "  (--verbose for the traceback)"))
