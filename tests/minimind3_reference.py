"""An independent, plain re-statement of MiniMind-3's forward (issue 13's architecture notes), for parity tests.

It reads a published-layout state dict (`model.layers.{i}.self_attn.q_proj.weight`, ...) and config.json fields
directly, so a test also checks our key mapping and config translation. Written for clarity, not speed: explicit
loops over heads' halves, experts and positions, float64 where asked.
"""

import math

import torch


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def inv_frequencies(cfg: dict) -> torch.Tensor:
    head_dim, theta = cfg["head_dim"], cfg["rope_theta"]
    freqs = torch.tensor([theta ** (-2 * i / head_dim) for i in range(head_dim // 2)], dtype=torch.float64)
    yarn = cfg.get("rope_scaling")
    if yarn and cfg["max_position_embeddings"] / yarn["original_max_position_embeddings"] > 1:
        orig = yarn["original_max_position_embeddings"]

        def d(b):
            return head_dim * math.log(orig / (2 * math.pi * b)) / (2 * math.log(theta))

        low = max(math.floor(d(yarn["beta_fast"])), 0)
        high = min(math.ceil(d(yarn["beta_slow"])), head_dim // 2 - 1)
        for i in range(head_dim // 2):
            ramp = min(max((i - low) / max(high - low, 0.001), 0.0), 1.0)
            freqs[i] = freqs[i] * (1 - ramp + ramp / yarn["factor"])
    return freqs


def rotate(x, positions, cfg):
    """Rotate-half RoPE on (T, H, head_dim): frequencies duplicated over both halves."""
    angles = positions[:, None].double() * inv_frequencies(cfg)[None, :]  # (T, head_dim/2)
    factor = (cfg.get("rope_scaling") or {}).get("attention_factor", 1.0)
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None, :] * factor
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None, :] * factor
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def attention(h, sd, p, cfg, positions):
    T = h.shape[0]
    nh, nkv, hd, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["rms_norm_eps"]
    q = (h @ sd[p + "q_proj.weight"].T).view(T, nh, hd)
    k = (h @ sd[p + "k_proj.weight"].T).view(T, nkv, hd)
    v = (h @ sd[p + "v_proj.weight"].T).view(T, nkv, hd)
    q = rotate(rms_norm(q, sd[p + "q_norm.weight"], eps), positions, cfg)
    k = rotate(rms_norm(k, sd[p + "k_norm.weight"], eps), positions, cfg)
    out = torch.empty(T, nh, hd, dtype=h.dtype)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for head in range(nh):
        kv = head // (nh // nkv)
        scores = (q[:, head] @ k[:, kv].T) / math.sqrt(hd)
        out[:, head] = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, kv]
    return out.reshape(T, nh * hd) @ sd[p + "o_proj.weight"].T


def swiglu(x, sd, p):
    gate = x @ sd[p + "gate_proj.weight"].T
    return (torch.nn.functional.silu(gate) * (x @ sd[p + "up_proj.weight"].T)) @ sd[p + "down_proj.weight"].T


def moe(x, sd, p, cfg):
    scores = (x @ sd[p + "gate.weight"].T).softmax(-1)
    weights, experts = scores.topk(cfg["num_experts_per_tok"], dim=-1)
    if cfg.get("norm_topk_prob", True):
        weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t], experts[t]):
            out[t] += w * swiglu(x[t:t + 1], sd, f"{p}experts.{int(e)}.")[0]
    return out


def forward(sd: dict, cfg: dict, ids: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """Logits (T, vocab) for one sequence of token ids (T,)."""
    sd = {k: v.to(dtype) for k, v in sd.items()}
    eps = cfg["rms_norm_eps"]
    h = sd["model.embed_tokens.weight"][ids]
    positions = torch.arange(len(ids))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = h + attention(rms_norm(h, sd[p + "input_layernorm.weight"], eps), sd, p + "self_attn.", cfg, positions)
        x = rms_norm(h, sd[p + "post_attention_layernorm.weight"], eps)
        h = h + (moe(x, sd, p + "mlp.", cfg) if cfg.get("use_moe") else swiglu(x, sd, p + "mlp."))
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return rms_norm(h, sd["model.norm.weight"], eps) @ head.T
