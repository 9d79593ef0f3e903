"""python -m jetnemo_jax.nas --config configs/postnas_tiny.py [--config.seeds=0,1,2 ...] [--print_config] [--verbose]"""

from absl import app, flags

from jetnemo_jax import cli
from jetnemo_jax.nas.config import default_config

_CONFIG = cli.define_config_flag("configs/postnas_tiny.py", "PostNAS config (ml_collections); list every key with "
                                 "--print_config.", default_config)
_PRINT_CONFIG = flags.DEFINE_boolean("print_config", False, "Print the config (every key) and exit.")
_VERBOSE = flags.DEFINE_boolean("verbose", False, "Show the traceback of an error (or set JETNEMO_VERBOSE=1).")


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])} (config keys are set as --config.a.b=value)")
    if _PRINT_CONFIG.value:
        print(_CONFIG.value)
        return
    from jetnemo_jax import compilation_cache
    from jetnemo_jax.nas.pipeline import run

    config = _CONFIG.value
    compilation_cache.setup_from_config(config.get("compilation_cache"))  # before anything compiles
    cli.run_app(lambda: run(config), verbose_flag=_VERBOSE.value)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.config_flags_parser(_CONFIG, default_config()))
