"""PostNAS end to end at tiny scale on CPU: a 6-layer all-attention teacher trained here on Python docs
plus associative recall, then supernet, placement search (budget 2), block selection and the hardware
grid, 3 seeds.   python -m jetnemo_jax.nas --config configs/postnas_tiny.py"""

from jetnemo_jax.nas.config import default_config


def get_config():
    return default_config()
