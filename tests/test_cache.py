"""Decode-cache accounting against a hand count for the 2B preset."""

from jetnemo_jax import config
from jetnemo_jax.cache import cache_bytes


def test_2b_cache_at_64k_matches_hand_count():
    cfg = config.jet_nemotron_2b()  # bf16 activations
    got = cache_bytes(cfg, 65536)
    kv = 2 * 2 * 128 * 2  # (k, v) x kv heads x head dim x bf16
    assert got["attn"] == 2 * (65536 * kv + 65536 * 4)  # 2 layers; plus an int32 position per slot
    assert got["swa"] == 2 * (1152 * kv + 1152 * 4)  # 2 layers, W = 1152 slots
    assert got["jet"] == 24 * (12 * 96 * 256 * 4 + 3 * 3072 * 2)  # fp32 state + W-1 conv taps (bf16)
    assert got["total"] == got["attn"] + got["swa"] + got["jet"]
    print({k: f"{v / 1e6:.1f} MB" for k, v in got.items()}, "(paper: 154 MB)")
