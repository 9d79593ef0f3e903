"""pallas_kernels/dynamic_conv/tpu.py: the Mosaic TPU kernels (interpreted on CPU) against the float64 torch
oracle, forward and the gradients of every input, packed documents, caches, T < W."""

import pytest

from pallas_kernels.dynamic_conv import tpu
from tests.pallas_kernels.dynamic_conv.harness import check_matches_float64


@pytest.mark.parametrize("dtype,B,T,G,D,W,packed,with_cache", [
    ("float32", 2, 45, 24, 40, 4, True, True),
    ("bfloat16", 1, 130, 130, 24, 4, True, False),
    ("float32", 1, 3, 8, 16, 3, True, False),
])
def test_matches_float64(rng, dtype, B, T, G, D, W, packed, with_cache):
    check_matches_float64(rng, tpu, dtype, B, T, G, D, W, packed, with_cache)
