"""Small, readable PyTorch reference of Jet-Nemotron (JetBlock + hybrid decoder), written from
/work/shared/spec/jet_nemotron.md; used as an oracle in parity tests. Plain torch only (no fla, einops,
triton, transformers modeling code); token-by-token recurrence and explicit attention masks, so keep
sizes tiny. Modules take an HF config.json dict (Jet-Nemotron or Qwen2 schema); parameter names match the
official checkpoints, so weights load with load_state_dict(strict=True).

Precision: projections run in the module dtype; norms, gates, the dynamic conv, the delta-rule recurrence
and attention softmax run in float32 (float64 when the input is float64) and are cast back to the input
dtype before each output projection."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _cdt(x: torch.Tensor) -> torch.dtype:
    """Compute dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def doc_positions(segment_ids, B: int, T: int, device):
    """(position within document [B,T], document index [B,T]). A change of id starts a new document."""
    ar = torch.arange(T, device=device).expand(B, T)
    if segment_ids is None:
        return ar, torch.zeros(B, T, dtype=torch.long, device=device)
    seg = torch.as_tensor(segment_ids, device=device)
    start = torch.ones(B, T, dtype=torch.bool, device=device)
    start[:, 1:] = seg[:, 1:] != seg[:, :-1]
    first = torch.where(start, ar, torch.zeros_like(ar)).cummax(dim=1).values  # start of own document
    return ar - first, start.long().cumsum(dim=1)


@torch.no_grad()
def fill_random_(module: nn.Module, generator: torch.Generator, std: float = 0.02):
    """Deterministic random weights (CPU generator): linears/embeddings ~ N(0, std), norm weights
    ~ 1 + N(0, 0.1), A_log = log U(1, 16), dt_bias = softplus^-1(dt), dt log-uniform in [1e-3, 1e-1]."""
    for name, p in module.named_parameters():
        shape, last = p.shape, name.rsplit(".", 1)[-1]
        if last == "A_log":
            new = torch.log(1 + 15 * torch.rand(shape, generator=generator, dtype=torch.float64))
        elif last == "dt_bias":
            r = torch.rand(shape, generator=generator, dtype=torch.float64)
            dt = torch.exp(r * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3)).clamp_min(1e-4)
            new = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
        elif "norm" in name:
            new = 1 + 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64)
        else:
            new = std * torch.randn(shape, generator=generator, dtype=torch.float64)
        p.copy_(new.to(p.dtype))
    return module


class RMSNormRef(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps) * weight, computed in fp32 (fp64), cast back to the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = float(eps)

    def forward(self, x):
        xf = x.to(_cdt(x))
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(xf.dtype)
        return y.to(x.dtype)


class _KernelGenerator(nn.Module):
    """Per-token conv kernels from x: w2(silu(w1 x)) + b2, flat [Dv*W] channel-major."""

    def __init__(self, hidden: int, value_dim: int, conv_size: int, reduction: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, value_dim // reduction, bias=False)
        self.w2 = nn.Linear(value_dim // reduction, value_dim * conv_size, bias=True)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)))


class JetBlockRef(nn.Module):
    def __init__(self, hidden_size, num_heads, head_dim, expand_v, conv_size=4, generator_reduction=8,
                 norm_eps=1e-5):
        super().__init__()
        self.num_heads, self.head_dim, self.conv_size = num_heads, head_dim, conv_size
        self.head_v_dim = int(round(head_dim * float(expand_v)))
        kd, vd = num_heads * head_dim, num_heads * self.head_v_dim
        self.key_dim, self.value_dim = kd, vd
        self.q_proj = nn.Linear(hidden_size, kd, bias=False)
        self.k_proj = nn.Linear(hidden_size, kd, bias=False)
        self.v_proj = nn.Linear(hidden_size, vd, bias=False)
        self.g_proj = nn.Linear(hidden_size, vd, bias=False)
        self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.o_proj = nn.Linear(vd, hidden_size, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 16.0, num_heads)))  # deterministic init
        self.dt_bias = nn.Parameter(torch.zeros(num_heads))
        self.o_norm = RMSNormRef(self.head_v_dim, float(norm_eps))
        self.dynamic_conv1d = nn.Module()
        self.dynamic_conv1d.kernel_generator = _KernelGenerator(hidden_size, vd, conv_size, generator_reduction)

    def reset_parameters_randomly(self, generator: torch.Generator, std: float = 0.02):
        return fill_random_(self, generator, std)

    def forward(self, x, segment_ids=None):
        """x [B,T,hidden] (already normalised) -> [B,T,hidden]."""
        B, T, _ = x.shape
        H, dk, dv, W = self.num_heads, self.head_dim, self.head_v_dim, self.conv_size
        cdt = _cdt(x)
        pos, _ = doc_positions(segment_ids, B, T, x.device)
        q = F.silu(self.q_proj(x)).to(cdt).view(B, T, H, dk)
        k = F.silu(self.k_proj(x)).to(cdt).view(B, T, H, dk)
        # Dynamic causal depthwise conv on u = Wv x; tap w reads u_{t-(W-1-w)} of the same document only.
        u = self.v_proj(x).to(cdt)
        kern = self.dynamic_conv1d.kernel_generator(x).to(cdt).view(B, T, self.value_dim, W)
        c = torch.zeros_like(u)
        for w in range(W):
            s = W - 1 - w
            u_s = F.pad(u, (0, 0, s, 0))[:, :T] * (pos >= s).unsqueeze(-1).to(cdt)
            c = c + kern[..., w] * u_s
        v = F.silu(c).view(B, T, H, dv)
        # Gates: beta in (0,1), g <= 0 the log decay.
        beta = torch.sigmoid(self.b_proj(x).to(cdt))
        g = -self.A_log.to(cdt).exp() * F.softplus(self.a_proj(x).to(cdt) + self.dt_bias.to(cdt))
        # Gated delta rule, token by token; q, k L2-normalised; state resets at document starts.
        q = q / torch.sqrt(q.pow(2).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt(k.pow(2).sum(-1, keepdim=True) + 1e-6)
        scale = dk ** -0.5
        S = torch.zeros(B, H, dk, dv, dtype=cdt, device=x.device)
        outs = []
        for t in range(T):
            S = S * (pos[:, t] > 0).to(cdt).view(B, 1, 1, 1)
            S = S * g[:, t].exp()[..., None, None]  # exp(g) S
            kt, bt = k[:, t], beta[:, t][..., None]
            # exp(g)(I - b k k^T) S + b k v^T  ==  S' + k (b (v - S'^T k))^T  with S' = exp(g) S
            delta = bt * (v[:, t] - torch.einsum("bhk,bhkv->bhv", kt, S))
            S = S + kt[..., :, None] * delta[..., None, :]
            outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
        o = torch.stack(outs, dim=1)  # [B,T,H,dv] in cdt
        # Gated output norm per head (weight shared across heads), then back to the input dtype.
        gate = F.silu(self.g_proj(x).to(cdt)).view(B, T, H, dv)
        y = (self.o_norm(o) * gate).to(x.dtype).reshape(B, T, self.value_dim)
        return self.o_proj(y)


class AttentionRef(nn.Module):
    """Causal softmax attention with GQA and RoPE (HF rotate_half layout); optional sliding window."""

    def __init__(self, cfg: dict, window=None):
        super().__init__()
        hid = cfg["hidden_size"]
        self.nh = cfg["num_attention_heads"]
        self.nkv = cfg.get("num_key_value_heads") or self.nh
        self.hd = cfg.get("head_dim") or hid // self.nh
        self.theta = float(_rope_theta(cfg))
        self.window = window
        self.q_proj = nn.Linear(hid, self.nh * self.hd, bias=True)
        self.k_proj = nn.Linear(hid, self.nkv * self.hd, bias=True)
        self.v_proj = nn.Linear(hid, self.nkv * self.hd, bias=True)
        self.o_proj = nn.Linear(self.nh * self.hd, hid, bias=False)

    def _rope(self, x, pos):
        d = self.hd
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, device=x.device).to(x.dtype) / d))
        freqs = pos.to(x.dtype)[..., None] * inv_freq  # [B,T,d/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B,1,T,d]
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()

    def forward(self, x, pos, doc):
        B, T, _ = x.shape
        cdt = _cdt(x)
        q = self.q_proj(x).to(cdt).view(B, T, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).to(cdt).view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).to(cdt).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = self._rope(q, pos), self._rope(k, pos)
        rep = self.nh // self.nkv  # query head h uses kv head h // rep
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        i = torch.arange(T, device=x.device)[:, None]
        j = torch.arange(T, device=x.device)[None, :]
        allowed = (j <= i)[None] & (doc[:, :, None] == doc[:, None, :])  # [B,T,T]
        if self.window is not None:
            allowed = allowed & (j > i - self.window)[None]
        scores = (q @ k.transpose(-1, -2)) * self.hd ** -0.5
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        o = torch.softmax(scores, dim=-1) @ v  # [B,nh,T,hd]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.nh * self.hd).to(x.dtype))


class MLPRef(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _rope_theta(cfg: dict) -> float:
    if cfg.get("rope_theta") is not None:
        return cfg["rope_theta"]
    return (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)


def layer_types(cfg: dict) -> list:
    """Per-layer "attn" / "swa" / "jet"; Qwen2 schema (absent or "full_attention") -> all "attn"."""
    n = cfg["num_hidden_layers"]
    lt = cfg.get("layer_types")
    if not lt or cfg.get("model_type") == "qwen2" or any(t == "full_attention" for t in lt):
        return ["attn"] * n
    assert len(lt) == n and all(t in ("attn", "swa", "jet") for t in lt), lt
    return list(lt)


class DecoderLayerRef(nn.Module):
    def __init__(self, cfg: dict, kind: str):
        super().__init__()
        hid, eps = cfg["hidden_size"], float(cfg["rms_norm_eps"])
        self.kind = kind
        eff = cfg.get("efficient_attention_config") or {}
        if kind == "jet":
            j = eff["jet"]
            self.self_attn = JetBlockRef(hid, j["num_heads"], j["head_dim"], j["expand_v"],
                                         j.get("conv_size", 4), j.get("dconv_generator_reduction", 8),
                                         float(j.get("norm_eps", 1e-5)))
        else:
            self.self_attn = AttentionRef(cfg, eff["swa"]["window_size"] if kind == "swa" else None)
        self.input_layernorm = RMSNormRef(hid, eps)
        self.post_attention_layernorm = RMSNormRef(hid, eps)
        self.mlp = MLPRef(hid, cfg["intermediate_size"])

    def forward(self, x, pos, doc, segment_ids):
        h_in = self.input_layernorm(x)
        mix = self.self_attn(h_in, segment_ids) if self.kind == "jet" else self.self_attn(h_in, pos, doc)
        h = x + mix
        return h + self.mlp(self.post_attention_layernorm(h))


class JetNemotronRef(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        self.layer_types = layer_types(config)
        self.tied = bool(config.get("tie_word_embeddings", False))
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config["vocab_size"], config["hidden_size"])
        self.model.layers = nn.ModuleList(DecoderLayerRef(config, t) for t in self.layer_types)
        self.model.norm = RMSNormRef(config["hidden_size"], float(config["rms_norm_eps"]))
        if not self.tied:
            self.lm_head = nn.Linear(config["hidden_size"], config["vocab_size"], bias=False)

    def forward(self, input_ids, segment_ids=None):
        """input_ids [B,T] -> logits [B,T,vocab] in the module dtype."""
        B, T = input_ids.shape
        pos, doc = doc_positions(segment_ids, B, T, input_ids.device)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, pos, doc, segment_ids)
        x = self.model.norm(x)
        w = self.model.embed_tokens.weight if self.tied else self.lm_head.weight
        return F.linear(x, w)

    def reset_parameters_randomly(self, generator: torch.Generator, std: float = 0.02):
        return fill_random_(self, generator, std)
