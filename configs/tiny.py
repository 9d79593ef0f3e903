"""The embedded default: a 6-layer hybrid (JetBlock, attention and sliding window) trained from scratch on
the Python documentation topics that ship with Python, with a BPE tokenizer trained on them. A few minutes
on 2 CPU cores: python train.py --config configs/tiny.py"""

from jetnemo_jax.train.config import default_config


def get_config():
    return default_config()  # the defaults are this run
