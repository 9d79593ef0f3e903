"""Float64 oracles: the gated delta rule token recurrence (NumPy, and PyTorch for gradients) and the
generated causal convolution; plus relative-error helpers."""

from __future__ import annotations

import numpy as np


def rel_err(a, b) -> float:
    """Relative RMS error ||a - b|| / ||b|| in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _l2n(x):
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-6)


def doc_starts(segment_ids, B, T):
    if segment_ids is None:
        return np.zeros((B, T), bool)
    s = np.asarray(segment_ids)
    return np.concatenate([np.zeros((B, 1), bool), s[:, 1:] != s[:, :-1]], axis=1)


def gdr_numpy(q, k, v, g, beta, *, scale=None, initial_state=None, segment_ids=None, l2norm=True):
    """S_t = exp(g_t)(I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = scale S_t^T q_t, in float64."""
    q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    if l2norm:
        q, k = _l2n(q), _l2n(k)
    scale = dk ** -0.5 if scale is None else scale
    S = np.zeros((B, H, dk, dv)) if initial_state is None else np.array(initial_state, np.float64)
    starts = doc_starts(segment_ids, B, T)
    o = np.zeros((B, T, H, dv))
    eye = np.eye(dk)
    for t in range(T):
        S[starts[:, t]] = 0.0
        kt = k[:, t]
        decay = np.exp(g[:, t])[..., None, None]
        proj = eye - beta[:, t][..., None, None] * kt[..., :, None] * kt[..., None, :]
        S = decay * (proj @ S) + beta[:, t][..., None, None] * kt[..., :, None] * v[:, t][..., None, :]
        o[:, t] = scale * np.einsum("bhk,bhkv->bhv", q[:, t], S)
    return o, S


def gdr_torch_grads(q, k, v, g, beta, do, *, initial_state=None, segment_ids=None, dS=None):
    """Float64 gradients of sum(o * do) (+ sum(S_T * dS)) through the token recurrence, by torch autograd."""
    import torch

    t64 = lambda x: torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    q_, k_, v_, g_, b_ = map(t64, (q, k, v, g, beta))
    B, T, H, dk = q_.shape
    h0 = t64(initial_state) if initial_state is not None else None
    S = h0.clone() if h0 is not None else torch.zeros(B, H, dk, v_.shape[-1], dtype=torch.float64)
    qn = q_ / torch.sqrt((q_ * q_).sum(-1, keepdim=True) + 1e-6)
    kn = k_ / torch.sqrt((k_ * k_).sum(-1, keepdim=True) + 1e-6)
    starts = torch.tensor(doc_starts(segment_ids, B, T))
    outs = []
    for t in range(T):
        S = torch.where(starts[:, t, None, None, None], torch.zeros_like(S), S)
        S = S * torch.exp(g_[:, t])[..., None, None]
        err = v_[:, t] - torch.einsum("bhk,bhkv->bhv", kn[:, t], S)
        S = S + kn[:, t][..., :, None] * (b_[:, t][..., None] * err)[..., None, :]
        outs.append(dk ** -0.5 * torch.einsum("bhk,bhkv->bhv", qn[:, t], S))
    o = torch.stack(outs, 1)
    loss = (o * torch.tensor(np.asarray(do, np.float64))).sum()
    if dS is not None:
        loss = loss + (S * torch.tensor(np.asarray(dS, np.float64))).sum()
    loss.backward()
    grads = {"q": q_.grad, "k": k_.grad, "v": v_.grad, "g": g_.grad, "beta": b_.grad}
    if h0 is not None:
        grads["initial_state"] = h0.grad
    return {n: x.numpy() for n, x in grads.items()}


def dynamic_conv_numpy(x, kernels, *, segment_ids=None, cache=None):
    """silu(sum_w K_t[d, w] x_{t-W+1+w}[d]) in float64; taps never cross documents."""
    x = np.asarray(x, np.float64)
    kernels = np.asarray(kernels, np.float64)
    B, T, D, W = kernels.shape
    hist = np.zeros((B, W - 1, D)) if cache is None else np.asarray(cache, np.float64)
    xp = np.concatenate([hist, x], axis=1)
    starts = doc_starts(segment_ids, B, T)
    y = np.zeros((B, T, D))
    for b in range(B):
        doc_start = -(W - 1)  # the cache continues the first document
        for t in range(T):
            if starts[b, t]:
                doc_start = t
            for w in range(W):
                src = t - W + 1 + w
                if src >= doc_start:
                    y[b, t] += kernels[b, t, :, w] * xp[b, src + W - 1]
    return y / (1.0 + np.exp(-y))


def generated_conv_torch(u, h, w2, b2, seg, cache, dy):
    """float64 torch: y = silu(conv(u, h @ w2 + b2)) and the gradients of sum(y * dy) (of u, h, w2, b2 and the
    cache, if any): the oracle of the fused generated-conv kernels."""
    import torch

    t64 = lambda a: torch.tensor(np.asarray(a, np.float64), requires_grad=True)
    u_, h_, w2_, b2_ = map(t64, (u, h, w2, b2))
    B, T, D = u_.shape
    W = w2_.shape[1] // D
    c_ = t64(np.zeros((B, W - 1, D)) if cache is None else cache)
    k = (h_ @ w2_ + b2_).reshape(B, T, D, W)
    up = torch.cat([c_, u_], 1)
    starts = doc_starts(seg, B, T)
    rows = []
    for b in range(B):
        doc_start, out = -(W - 1), []
        for t in range(T):
            doc_start = t if starts[b, t] else doc_start
            taps = [k[b, t, :, w] * up[b, t + w] for w in range(W) if t - W + 1 + w >= doc_start]
            out.append(sum(taps))
        rows.append(torch.stack(out))
    y = torch.nn.functional.silu(torch.stack(rows))
    (y * torch.tensor(np.asarray(dy, np.float64))).sum().backward()
    grads = [x.grad.numpy() for x in (u_, h_, w2_, b2_)] + ([c_.grad.numpy()] if cache is not None else [])
    return y.detach().numpy(), grads
