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


def pytest_configure(config):
    import jax

    # Parity tests compare float32 to 1e-5: no TF32 / bf16-pass matmuls on accelerators.
    jax.config.update("jax_default_matmul_precision", "highest")
