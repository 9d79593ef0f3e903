"""layers/mlp.py: the SwiGLU product's hand-written VJP against JAX's autodiff of silu(gate) * up."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jetnemo_jax.layers.mlp import swiglu


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_matches_autodiff(rng, dtype):
    """Jitted, the same ops in the same order: bit for bit, forward and both gradients (gates up to +-12, where
    sigmoid saturates, and zeros)."""
    gate = rng.standard_normal((33, 130)) * 4
    gate[0] = 0.0
    gate, up, dh = (jnp.asarray(x, dtype) for x in (gate, rng.standard_normal((33, 130)),
                                                     rng.standard_normal((33, 130))))

    def vjp(f):
        return jax.jit(lambda g, u, d: (lambda y, back: (y, *back(d)))(*jax.vjp(f, g, u)))(gate, up, dh)

    ours, theirs = vjp(swiglu), vjp(lambda g, u: jax.nn.silu(g) * u)
    for name, a, b in zip(("h", "dgate", "dup"), ours, theirs):
        assert a.dtype == dtype, name
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=name)
