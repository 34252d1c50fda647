"""An independent, deliberately plain re-statement of MiniMind v1's forward math, for parity tests.

It reads a v1-layout state dict and computes logits the way v1 does: RoPE as complex multiplication of adjacent
pairs (torch.polar table), GQA by expanding key/value heads, explicit causal softmax attention, SwiGLU, and for
MoE a softmax router whose top-k weights are renormalised, experts applied token by token, plus a shared expert.
"""

import torch
import torch.nn.functional as F


def _rms(x, w, eps):
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def _swiglu(x, sd, prefix):
    return F.linear(F.silu(F.linear(x, sd[prefix + "w1.weight"])) * F.linear(x, sd[prefix + "w3.weight"]),
                    sd[prefix + "w2.weight"])


def v1_logits(sd: dict, cfg, tokens: torch.Tensor) -> torch.Tensor:
    B, T = tokens.shape
    hd = cfg.dim // cfg.n_heads
    rep = cfg.n_heads // cfg.n_kv_heads
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    table = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))  # (T, hd/2) complex

    def rope(x):  # x: (B, T, H, hd)
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * table[None, :, None, :]).flatten(3).type_as(x)

    h = sd["tok_embeddings.weight"][tokens]
    causal = torch.full((T, T), float("-inf")).triu(1)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        x = _rms(h, sd[p + "attention_norm.weight"], cfg.norm_eps)
        q = rope(F.linear(x, sd[p + "attention.wq.weight"]).view(B, T, cfg.n_heads, hd))
        k = rope(F.linear(x, sd[p + "attention.wk.weight"]).view(B, T, cfg.n_kv_heads, hd))
        v = F.linear(x, sd[p + "attention.wv.weight"]).view(B, T, cfg.n_kv_heads, hd)
        # expand each kv head to the `rep` query heads that share it (kv head j serves q heads j*rep..j*rep+rep-1)
        k = k[:, :, :, None, :].expand(B, T, cfg.n_kv_heads, rep, hd).reshape(B, T, cfg.n_heads, hd)
        v = v[:, :, :, None, :].expand(B, T, cfg.n_kv_heads, rep, hd).reshape(B, T, cfg.n_heads, hd)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(2, 3) / hd**0.5 + causal).float().softmax(-1).type_as(q)
        h = h + F.linear((att @ v).transpose(1, 2).reshape(B, T, -1), sd[p + "attention.wo.weight"])
        x = _rms(h, sd[p + "ffn_norm.weight"], cfg.norm_eps)
        if not cfg.use_moe:
            h = h + _swiglu(x, sd, p + "feed_forward.")
            continue
        flat = x.reshape(-1, cfg.dim)
        scores = F.linear(flat, sd[p + "feed_forward.gate.weight"]).softmax(-1)
        w, idx = torch.topk(scores, cfg.num_experts_per_tok, dim=-1)
        if cfg.num_experts_per_tok > 1 and cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        y = torch.zeros_like(flat)
        for t in range(flat.shape[0]):
            for slot in range(cfg.num_experts_per_tok):
                e = int(idx[t, slot])
                y[t] += w[t, slot] * _swiglu(flat[t:t + 1], sd, p + f"feed_forward.experts.{e}.")[0]
        if cfg.n_shared_experts:
            y = y + _swiglu(flat, sd, p + "feed_forward.shared_experts.")
        h = h + y.view(B, T, -1)
    return F.linear(_rms(h, sd["norm.weight"], cfg.norm_eps), sd["output.weight"])
