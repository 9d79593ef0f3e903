import os
import secrets
import shutil
import tempfile

import numpy as np
import pytest

from tests.xla_flags import BASE as XLA_TEST_FLAGS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# pytest-xdist's workers share one GPU: without this each would take 75% of its memory at start (28 tests failed
# with CUDA out-of-memory on an H100 on 2026-12-06)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Before JAX's backend starts (it reads XLA_FLAGS once): the suite's flags, kept beside the user's.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_TEST_FLAGS}".strip()


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
    # The command lines keep JAX's persistent compilation cache (jetnemo_jax/compilation_cache.py): the suite's
    # runs share one in a temporary directory, never the user's. Set after JAX's import: this process's JAX
    # caches nothing unless a command line's main() runs in it.
    global _CACHE_DIR
    _CACHE_DIR = tempfile.mkdtemp(prefix="jetnemo-jax-test-compilation-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR


_CACHE_DIR = None


def pytest_collection_modifyitems(items):
    # The tests marked slow (a minute or more on 2 CPU cores) start first, so that pytest-xdist's workers do not
    # end the run with one of them left on a single worker.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_unconfigure(config):
    if _CACHE_DIR:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)


QWEN_TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "qwen2.5-tokenizer")


@pytest.fixture(scope="session")
def qwen_tokenizer_dir():
    if not os.path.isdir(QWEN_TOKENIZER):
        pytest.skip(f"the Qwen2.5 tokenizer is not at {os.path.abspath(QWEN_TOKENIZER)} (shared/data)")
    return os.path.abspath(QWEN_TOKENIZER)


@pytest.fixture(scope="session")
def tiny_qwen_vocab_checkpoint(tmp_path_factory):
    """A small random hybrid model with the Qwen2.5 vocabulary, saved as a jetnemo_jax checkpoint:
    (directory, model)."""
    from flax import nnx

    from jetnemo_jax import config
    from jetnemo_jax.checkpoint.orbax_params import save_params
    from jetnemo_jax.model import JetNemotronForCausalLM

    cfg = config.tiny(vocab_size=151936, hidden_size=64, intermediate_size=96, num_attention_heads=2,
                      num_key_value_heads=1, layer_types=("jet", "swa", "attn", "jet"), sliding_window=16,
                      jet=config.JetBlockConfig(num_heads=2, head_dim=16, head_v_dim=32), eos_token_id=151643)
    model = JetNemotronForCausalLM(cfg, rngs=nnx.Rngs(7))
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny_qwen_vocab")
    save_params(model, path)
    return path, model
