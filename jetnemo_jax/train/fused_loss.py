"""The LM head's per-token cross-entropy (and stage-1 KL against a teacher) in chunks of tokens, never holding
the float32 logits of the whole batch ([B, T, 151936] is 5 GB at B * T = 8192), with a custom VJP.

Per chunk of `chunk` tokens of every row: logits = hidden @ W^T in the model dtype (as `model.logits`), then
float32; the per-token losses are those of `train/step.py` (optax's integer-label cross-entropy and
`kl_per_token`). Gradients:
- W frozen (stage 1: the tied embedding): the forward pass also forms, per token, A = (softmax - onehot) @ W
  and B = T (softmax(s/T) - softmax(t/T)) @ W. A token's hidden-state gradient is linear in its loss
  cotangents (ct_ce A + ct_kl B), so the backward pass only scales them: no logits are recomputed, and the
  matmul count equals the unfused path's.
- W trainable (stage 2): the backward pass recomputes each chunk's logits and forms dh and dW (one extra
  logits matmul).
In float32 this equals the unfused path to rounding; in bf16 the rounding differs (the unfused path rounds
the scaled logit gradient to bf16 before its matmul, this path the unscaled one).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _chunked(x, c):
    """[B, T, ...] -> [T / c, B, c, ...] (the batch axis, and with it its sharding, stays whole)."""
    B, T = x.shape[:2]
    return jnp.moveaxis(x.reshape(B, T // c, c, *x.shape[2:]), 1, 0)


def _unchunked(x):
    n, B, c = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(B, n * c, *x.shape[3:])


def _logits(h, w):
    """h [B, c, H], w [V, H], both already in the compute dtype -> float32 logits [B, c, V]."""
    return jnp.einsum("bch,vh->bcv", h, w).astype(jnp.float32)


def _chunk_terms(h, w, targets, th, tw, temperature):
    """Per-token ce, kl and the float32 logit gradients of each (per unit cotangent) for one chunk."""
    lf = _logits(h, w)
    lse = jax.nn.logsumexp(lf, axis=-1)
    ce = lse - jnp.take_along_axis(lf, targets[..., None], axis=-1)[..., 0]
    d_ce = jnp.exp(lf - lse[..., None]) - jax.nn.one_hot(targets, lf.shape[-1], dtype=jnp.float32)
    if th is None:
        return ce, None, d_ce, None
    lt = jax.nn.log_softmax(_logits(th, tw) / temperature, axis=-1)
    ls = jax.nn.log_softmax(lf / temperature, axis=-1)
    pt = jnp.exp(lt)
    kl = temperature ** 2 * jnp.sum(pt * (lt - ls), axis=-1)
    d_kl = temperature * (jnp.exp(ls) - pt)
    return ce, kl, d_ce, d_kl


def _times_w(d, w):
    """Logit gradients [B, c, V] -> hidden-state gradients [B, c, H] (float32 accumulation)."""
    return jnp.einsum("bcv,vh->bch", d.astype(w.dtype), w, preferred_element_type=jnp.float32)


# Static: chunk, temperature, with_kl, w_grad (w is trained), ce_grad (the cross-entropy gets a gradient).
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _losses(hidden, w, targets, t_hidden, t_w, chunk, temperature, with_kl, w_grad, ce_grad):
    ce, kl, _ = _forward(hidden, w, targets, t_hidden, t_w, chunk, temperature, with_kl, None)
    return ce, kl


def _forward(hidden, w, targets, t_hidden, t_w, chunk, temperature, with_kl, hidden_grads):
    """hidden_grads: None, or which of (A, B) to form, e.g. (True, False)."""
    dt = hidden.dtype
    wc, twc = w.astype(dt), (t_w.astype(dt) if with_kl else None)  # cast once, not once per chunk

    def body(_, xs):
        h, tgt, th = xs
        ce, kl, d_ce, d_kl = _chunk_terms(h, wc, tgt, th, twc, temperature)
        grads = None
        if hidden_grads:
            grads = tuple(_times_w(d, wc) if want else None for d, want in zip((d_ce, d_kl), hidden_grads))
        return None, (ce, kl, grads)

    xs = (_chunked(hidden, chunk), _chunked(targets, chunk), _chunked(t_hidden, chunk) if with_kl else None)
    _, (ce, kl, grads) = jax.lax.scan(body, None, xs)
    unchunk = lambda x: None if x is None else _unchunked(x)  # noqa: E731
    return unchunk(ce), unchunk(kl), None if grads is None else jax.tree.map(_unchunked, grads)


def _fwd(hidden, w, targets, t_hidden, t_w, chunk, temperature, with_kl, w_grad, ce_grad):
    wanted = None if w_grad else (ce_grad, with_kl)
    ce, kl, grads = _forward(hidden, w, targets, t_hidden, t_w, chunk, temperature, with_kl, wanted)
    return (ce, kl), (hidden, w, targets, t_hidden, t_w, grads)


def _bwd(chunk, temperature, with_kl, w_grad, ce_grad, res, cts):
    hidden, w, targets, t_hidden, t_w, grads = res
    ct_ce, ct_kl = cts
    no_teacher_grads = (None, None)  # the teacher's inputs are stop_gradient'ed: zero cotangents
    if not w_grad:
        a, b = grads
        dh = _combine(((ct_ce, a, ce_grad), (ct_kl, b, with_kl)), hidden.shape)
        return (dh.astype(hidden.dtype), None, None, *no_teacher_grads)
    dt = hidden.dtype
    wc, twc = w.astype(dt), (t_w.astype(dt) if with_kl else None)

    def body(dw, xs):
        h, tgt, th, cc, ck = xs
        _, _, d_ce, d_kl = _chunk_terms(h, wc, tgt, th, twc, temperature)
        d = _combine(((cc, d_ce, ce_grad), (ck, d_kl, with_kl)), d_ce.shape).astype(dt)
        dw = dw + jnp.einsum("bcv,bch->vh", d, h, preferred_element_type=jnp.float32)
        return dw, jnp.einsum("bcv,vh->bch", d, wc, preferred_element_type=jnp.float32).astype(dt)

    c = functools.partial(_chunked, c=chunk)
    xs = (c(hidden), c(targets), c(t_hidden) if with_kl else None, c(ct_ce), c(ct_kl) if with_kl else None)
    dw, dh = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), xs)
    return (_unchunked(dh), dw.astype(w.dtype), None, *no_teacher_grads)


def _combine(terms, shape):
    """sum of ct[..., None] * g over the (ct, g, wanted) terms that are wanted (zeros if none is)."""
    out = jnp.zeros(shape, jnp.float32)
    for ct, g, wanted in terms:
        if wanted:
            out = out + ct[..., None] * g
    return out


_losses.defvjp(_fwd, _bwd)


def lm_head_losses(hidden, w, targets, *, chunk: int, dtype, w_grad: bool, ce_grad: bool = True,
                   t_hidden=None, t_w=None, temperature: float = 1.0):
    """Per-token cross-entropy [B, T], and T^2 KL(teacher || student) [B, T] with a teacher (else None), of
    the logits hidden @ w^T computed in `dtype` (the model's), w the [vocab, hidden] LM-head weight (the
    tied embedding), `chunk` tokens of every row at a time.

    w_grad: whether w is trained (its gradient costs one more logits matmul); False gives a frozen w no
    gradient. ce_grad=False: the cross-entropy is reported but carries no gradient (a KL-only loss; saves
    its hidden-state gradient matmul). The teacher's t_hidden and t_w get no gradient."""
    T = hidden.shape[1]
    if chunk < 1 or T % chunk:
        raise ValueError(f"loss chunk {chunk} does not divide the sequence length {T}")
    with_kl = t_hidden is not None
    if with_kl:
        t_hidden, t_w = jax.lax.stop_gradient(t_hidden).astype(dtype), jax.lax.stop_gradient(t_w)
    return _losses(hidden.astype(dtype), w, targets, t_hidden, t_w, chunk, float(temperature), with_kl,
                   bool(w_grad), bool(ce_grad))
