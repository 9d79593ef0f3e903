r"""Continued pretraining of Jet-Nemotron models.

    python train.py --config configs/tiny.py [--config.train.steps=100 ...]
    python train.py --config configs/jet_nemotron_2b_stage1.py --config.init.path=/ckpt/Qwen2.5-1.5B \
        --config.data.source=/data/*.jsonl --config.data.tokenizer=/ckpt/Qwen2.5-1.5B
    python train.py --config configs/tiny.py --print_config          # every key with its value, then exit
    python train.py --config configs/jet_nemotron_2b_stage1.py --compile_only=v5p:4x4x4   # TPU AOT check
    python train.py --config configs/tiny.py --export=out/step200 --export_step=200   # a checkpoint as final/ is

Exit status: 0 when the run reaches train.steps; 128 + the signal's number (143 SIGTERM, 130 SIGINT) when a
signal stopped it after saving a checkpoint (the run is resumable, not finished); 2 for a mistake in the
config, data or checkpoints (one line; --verbose shows the traceback).
"""

import logging

from absl import app, flags
from absl import logging as absl_logging

from jetnemo_jax import cli

_CONFIG = cli.define_config_flag(
    "configs/tiny.py", "Run config (ml_collections); set any key with --config.a.b=value, list every key and its "
    "value with --print_config.")
_PRINT_CONFIG = flags.DEFINE_boolean("print_config", False, "Print the resolved config (every key) and exit.")
_VERBOSE = flags.DEFINE_boolean("verbose", False, "Show the traceback of an error (or set JETNEMO_VERBOSE=1).")
_COMPILE_ONLY = flags.DEFINE_string(
    "compile_only", "", "Compile the train step ahead of time for a TPU topology (e.g. v5p:4x4x4) on this "
    "machine, print per-chip memory and exit.")
_SLICES = flags.DEFINE_integer("compile_only_slices", 1, "Number of TPU slices (multislice) for --compile_only.")
_WARM = flags.DEFINE_boolean("compile_only_warm", False, "With --compile_only: compile a second time after "
                             "clearing JAX's in-memory caches, to time the compile the persistent cache serves.")

_EXPORT = flags.DEFINE_string(
    "export", "", "Write the run's checkpoint (the newest, or --export_step's) to this new directory as final/ is "
    "written (config.json, params/, tokenizer): for generation, evaluation and convert_torch_ckpt.py; then exit.")
_EXPORT_STEP = flags.DEFINE_integer("export_step", None, "With --export: the checkpoint's step.")


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])} (config keys are set as --config.a.b=value)")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and grain log every file they touch at INFO
    logging.getLogger("jetnemo_jax").setLevel(logging.INFO)
    config = _CONFIG.value
    if _PRINT_CONFIG.value:
        print(config)
        return

    def body():
        from jetnemo_jax import compilation_cache

        compilation_cache.setup_from_config(config.get("compilation_cache"))  # before anything compiles
        if _COMPILE_ONLY.value:
            from jetnemo_jax.train.compile_only import compile_for_topology

            compile_for_topology(config, _COMPILE_ONLY.value, num_slices=_SLICES.value, warm=_WARM.value)
            return {}
        if _EXPORT.value:
            from jetnemo_jax.train.loop import export_checkpoint

            print(f"exported to {export_checkpoint(config, _EXPORT_STEP.value, _EXPORT.value)}")
            return {}
        if _EXPORT_STEP.value is not None:
            raise cli.UserError("--export_step needs --export=DIR")
        from jetnemo_jax.train.loop import run

        return run(config)

    result = cli.run_app(body, verbose_flag=_VERBOSE.value)
    if result.get("signal"):
        raise SystemExit(128 + result["signal"])


if __name__ == "__main__":
    app.run(main, flags_parser=cli.config_flags_parser(_CONFIG))
