"""train/fused_loss.py: the chunked LM head + cross-entropy / KL equals the plain path (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jetnemo_jax import sharding
from jetnemo_jax.model import JetNemotronForCausalLM
from jetnemo_jax.train.fused_loss import lm_head_losses
from jetnemo_jax.train.program import build
from jetnemo_jax.train.recipes import STAGE1_FROZEN
from jetnemo_jax.train.step import kl_per_token, make_loss_fn
from tests.train.runs import small_config


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _inputs(rng, B=2, T=24, H=16, V=97, dtype=jnp.float32):
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
    return (f(B, T, H), f(V, H) * 0.5, jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32), f(B, T, H),
            f(V, H) * 0.5, jnp.asarray(rng.uniform(size=(B, T)) > 0.2, jnp.float32))


def _plain(h, w, tg, th, tw, valid, temperature, ce_w, kl_w, dtype):
    logits = (h.astype(dtype) @ w.astype(dtype).T).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tg)
    t_logits = jax.lax.stop_gradient((th.astype(dtype) @ tw.astype(dtype).T).astype(jnp.float32))
    kl = kl_per_token(t_logits, logits, temperature)
    return ce_w * jnp.sum(ce * valid) + kl_w * jnp.sum(kl * valid)


@pytest.mark.parametrize("w_grad", [False, True])
@pytest.mark.parametrize("ce_w, kl_w", [(1.0, 0.0), (0.0, 1.0), (0.3, 0.7)])
def test_matches_the_plain_path_in_float32(rng, w_grad, ce_w, kl_w):
    h, w, tg, th, tw, valid = _inputs(rng)
    temperature = float(rng.uniform(0.5, 2.0))

    def fused(h, w):
        ce, kl = lm_head_losses(h, w, tg, chunk=8, dtype=jnp.float32, w_grad=w_grad, ce_grad=ce_w != 0,
                                t_hidden=th if kl_w else None, t_w=tw if kl_w else None, temperature=temperature)
        return ce_w * jnp.sum(ce * valid) + (kl_w * jnp.sum(kl * valid) if kl_w else 0.0)

    plain = lambda h, w: _plain(h, w, tg, th, tw, valid, temperature, ce_w, kl_w, jnp.float32)  # noqa: E731
    (v0, g0), (v1, g1) = (jax.value_and_grad(f, (0, 1))(h, w) for f in (plain, jax.jit(fused)))
    assert _rel(v1, v0) <= 1e-5
    assert _rel(g1[0], g0[0]) <= 1e-5
    if w_grad:
        assert _rel(g1[1], g0[1]) <= 1e-5
    else:
        assert not np.any(np.asarray(g1[1]))  # a frozen head gets no gradient


def test_bfloat16_is_close_to_the_plain_path(rng):
    """bf16 logits (the 2B step's): the loss agrees to bf16 rounding of the logits (XLA may keep the logits
    matmul's float32 result in one path and round it to bf16 in the other), the hidden-state gradient to bf16
    rounding of the logit gradients (the plain path rounds them after scaling, this path before)."""
    h, w, tg, th, tw, valid = _inputs(rng, T=32, H=64, V=512)
    fused = lambda h: jnp.sum(lm_head_losses(  # noqa: E731
        h, w, tg, chunk=16, dtype=jnp.bfloat16, w_grad=False, t_hidden=th, t_w=tw)[1] * valid)
    plain = lambda h: _plain(h, w, tg, th, tw, valid, 1.0, 0.0, 1.0, jnp.bfloat16)  # noqa: E731
    (v0, g0), (v1, g1) = (jax.jit(jax.value_and_grad(f))(h) for f in (plain, fused))
    assert _rel(v1, v0) <= 3e-3
    assert _rel(g1, g0) <= 2e-2


def test_chunk_must_divide_the_sequence(rng):
    h, w, tg, *_ = _inputs(rng, T=24)
    with pytest.raises(ValueError, match="does not divide"):
        lm_head_losses(h, w, tg, chunk=10, dtype=jnp.float32, w_grad=False)


def _loss_and_grads(c, rng):
    program = build(c, sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
    model = JetNemotronForCausalLM(program.model_config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    trainable, frozen = program.split.split(nnx.state(model, nnx.Param))
    teacher = {n: jnp.asarray(0.02 * rng.standard_normal(a.shape), a.dtype)
               for n, a in program.abstract_teacher.items()}
    T = c.data.seq_len
    batch = {"tokens": jnp.asarray(rng.integers(0, 512, (2, T)), jnp.int32),
             "segment_ids": jnp.asarray(np.where(np.arange(T) < 11, 1, 2)[None].repeat(2, 0), jnp.int32)}
    out = {}
    for chunk in (0, 8):
        c.train.loss_chunk = chunk
        loss_fn = make_loss_fn(program.split, c, program.teacher)
        out[chunk] = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(trainable, frozen, teacher, batch, 20.0)
    return out


@pytest.mark.parametrize("stage", ["stage1_distill", "full_finetune"])
def test_train_loss_with_loss_chunk_equals_the_plain_loss(tmp_path, rng, stage):
    """The real loss function, tiny model in float32: same loss, per-term sums and gradients."""
    overrides = ({"train.frozen": STAGE1_FROZEN, "distill.enabled": True, "distill.ce_weight": 0.5}
                 if stage == "stage1_distill" else {})
    c = small_config(tmp_path, **overrides)
    out = _loss_and_grads(c, rng)
    (l0, s0), g0 = out[0]
    (l1, s1), g1 = out[8]
    assert _rel(l1, l0) <= 1e-5
    assert set(s0) == set(s1) and all(_rel(s1[k], s0[k]) <= 1e-5 for k in s0)
    assert set(g0) == set(g1)
    for name in g0:
        assert _rel(g1[name], g0[name]) <= 1e-5, name
    if stage == "full_finetune":
        assert np.any(np.asarray(g1["model/embed_tokens/embedding"]))  # the trained tied head gets its gradient
