"""bench/step_profile.py: HLO ops are charged to the model's named scopes and to forward / recompute / backward."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

_spec = importlib.util.spec_from_file_location(
    "step_profile", Path(__file__).resolve().parents[1] / "bench" / "step_profile.py")
step_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_profile)


@pytest.mark.parametrize("opcode, op_name, expected", [
    ("fusion", "jit(train_step)/jvp(mixer_jet)/jet_gdr/jit(prepare)/pallas_call",
     ("JetBlock gated delta rule", "forward")),
    ("fusion", "jit(train_step)/transpose(jvp(jvp()))/checkpoint/rematted_computation/mixer_swa/attn_core/dot",
     ("sliding-window attention core", "recompute")),
    ("fusion", "jit(train_step)/transpose(jvp(jvp()))/checkpoint/mixer_attn/attn_core/dot",
     ("full attention core", "backward")),
    ("custom-call", "jit(train_step)/transpose(jvp(jvp()))/checkpoint/mlp/dot_general", ("MLP (frozen)", "backward")),
    ("fusion", "jit(train_step)/jvp(mixer_jet)/jet_proj/o_norm_like/mul", ("JetBlock projections, gates, out norm",
                                                                           "forward")),
    ("fusion", "jit(train_step)/optimizer/add", ("optimizer update", "forward")),
    ("all-gather-start", "jit(train_step)/jvp(mlp)/all_gather", ("collectives", "forward")),
    ("fusion", "jit(train_step)/jvp(normalize)/mul", ("other", "forward")),  # "norm" only as a whole scope
])
def test_classify(opcode, op_name, expected):
    assert step_profile.classify(opcode, op_name) == expected


def test_breakdown_of_a_traced_remat_function(tmp_path):
    """A real CPU trace: the scoped matmuls land in their components, and the remat's recompute is found."""
    def layer(w, x):
        with jax.named_scope("mlp"):
            return jnp.tanh(x @ w) @ w.T

    def objective(w, x):
        y = jax.checkpoint(layer)(w, x)
        with jax.named_scope("loss"):
            return jnp.sum(jnp.sin(y) ** 2)

    key = jax.random.key(0)
    w, x = jax.random.normal(key, (256, 256)), jax.random.normal(jax.random.key(1), (128, 256))
    compiled = jax.jit(jax.grad(objective)).lower(w, x).compile()
    jax.block_until_ready(compiled(w, x))
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(2):
            jax.block_until_ready(compiled(w, x))
    xplane = next(tmp_path.rglob("*.xplane.pb"))
    result = step_profile.breakdown(step_profile.load_xspace(str(xplane)), compiled.as_text(), 2,
                                    module_hint="")
    rows = {r["component"]: r for r in result["rows"]}
    assert rows["MLP (frozen)"]["total"] > 0
    assert rows["MLP (frozen)"]["backward"] > 0 and rows["LM head + loss"]["total"] > 0
    assert result["kernel_sum_ms"] > 0 and result["unmatched_ms"] <= result["kernel_sum_ms"]
    assert "MLP (frozen)" in step_profile.format_table(result, step_ms=1.0)
