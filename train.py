"""Continued pretraining of Jet-Nemotron models.

    python train.py --config configs/tiny.py [--config.train.steps=100 ...]
    python train.py --config configs/jet_nemotron_2b_stage1.py --config.init.path=/ckpt/Qwen2.5-1.5B \
        --config.data.source=/data/*.jsonl --config.data.tokenizer=/ckpt/Qwen2.5-1.5B
    python train.py --config configs/jet_nemotron_2b_stage1.py --compile_only=v5p:4x4x4   # TPU AOT check
"""

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Run config (ml_collections).",
                                          lock_config=True)
_COMPILE_ONLY = flags.DEFINE_string(
    "compile_only", "", "Compile the train step ahead of time for a TPU topology (e.g. v5p:4x4x4) on this "
    "machine, print per-chip memory and exit.")
_SLICES = flags.DEFINE_integer("compile_only_slices", 1, "Number of TPU slices (multislice) for --compile_only.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and grain log every file they touch at INFO
    logging.getLogger("jetnemo_jax").setLevel(logging.INFO)
    if _COMPILE_ONLY.value:
        from jetnemo_jax.train.compile_only import compile_for_topology

        compile_for_topology(_CONFIG.value, _COMPILE_ONLY.value, num_slices=_SLICES.value)
        return
    from jetnemo_jax.train.loop import run

    run(_CONFIG.value)


if __name__ == "__main__":
    app.run(main)
