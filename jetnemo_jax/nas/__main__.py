"""python -m jetnemo_jax.nas --config configs/postnas_tiny.py [--config.seeds=0,1,2 ...]"""

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/postnas_tiny.py", "PostNAS config.", lock_config=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from jetnemo_jax.nas.pipeline import run

    run(_CONFIG.value)


if __name__ == "__main__":
    app.run(main)
