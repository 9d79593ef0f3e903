import os
import secrets

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def rng(request):
    """Fresh random inputs on every run; the seed is printed so a failure can be replayed (JETNEMO_SEED)."""
    seed = int(os.environ.get("JETNEMO_SEED", secrets.randbits(32)))
    print(f"{request.node.nodeid}: JETNEMO_SEED={seed}")
    return np.random.default_rng(seed)
