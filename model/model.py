"""The MiniMind decoder: dense or mixture-of-experts, with MiniMind v1's parameter names.

A v1 checkpoint (`out/pretrain_512.pth`, `out/full_sft_512_moe.pth`, ...) loads into `MiniMindForCausalLM` with
`strict=True` and computes the same logits. What differs from v1 is everything around the math:
- the KV cache belongs to the caller (`KVCache`, or any transformers `Cache`), never to a module;
- RoPE angles are computed from the positions actually used, so no position can index past a table;
- the MoE layer routes tokens in whatever dtype autocast picked, and its balance loss reaches the training loss;
- every call returns a fresh output object, and `forward` never changes the module's mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # transformers 5: init helpers that skip weights already loaded from a checkpoint
    from transformers import initialization as hf_init
except ImportError:  # pragma: no cover
    hf_init = nn.init

from .grouped_mm import grouped_mm
from .LMConfig import LMConfig

try:  # torch >= 2.5: block-sparse attention for document masks on CUDA
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover
    create_block_mask = flex_attention = None

    class BlockMask:  # stands in for isinstance checks
        pass


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # the same numbers as below, without two identity conversions
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        # Normalise in float32 even under autocast: the mean of squares loses too much precision in bf16.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def _dropout(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, skipped where it is the identity (eval mode, or p = 0, where ATen returns x untouched too)."""
    return module(x) if module.training and module.p > 0 else x


_INV_FREQ: dict = {}


def _base_inv_freq(head_dim: int, theta: float, device, yarn: tuple | None) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    return inv if yarn is None else yarn_inv_freq(inv, head_dim, theta, dict(yarn))


def _inv_freq(head_dim: int, theta: float, like: torch.Tensor, yarn: tuple | None = None) -> torch.Tensor:
    """1 / theta^(2i/head_dim) (YaRN-corrected when `yarn` is given, as sorted dict items) in float32 on `like`'s
    device, computed once per (head_dim, theta, yarn, device) instead of every forward.

    A plain cache rather than a buffer: a buffer would follow `model.half()` into 16 bits (changing every angle) and
    would have to be kept out of the state dict; this tensor is never a model parameter.
    """
    device = like.device
    if torch.compiler.is_compiling() or type(like) is not torch.Tensor:
        # Traced graphs (compile, export, fake tensors) fold the constant themselves; never cache a traced tensor.
        return _base_inv_freq(head_dim, theta, device, yarn)
    key = (head_dim, float(theta), device, yarn)
    inv = _INV_FREQ.get(key)
    if inv is None:
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable later with autograd on
            inv = _base_inv_freq(head_dim, theta, device, yarn)
        _INV_FREQ[key] = inv
    return inv


def yarn_inv_freq(inv_freq: torch.Tensor, head_dim: int, theta: float, yarn: dict) -> torch.Tensor:
    """MiniMind-3's YaRN: frequencies of pairs that complete few turns over the original context are divided by
    `factor`, fast ones kept, with a linear ramp between (pair indices from beta_fast's to beta_slow's)."""
    orig, factor = yarn["original_max_position_embeddings"], yarn["factor"]

    def pair_index(turns: float) -> float:  # the pair whose wavelength fits `turns` times into the original context
        return head_dim * math.log(orig / (2 * math.pi * turns)) / (2 * math.log(theta))

    low = max(math.floor(pair_index(yarn.get("beta_fast", 32.0))), 0)
    high = min(math.ceil(pair_index(yarn.get("beta_slow", 1.0))), head_dim // 2 - 1)
    i = torch.arange(head_dim // 2, device=inv_freq.device, dtype=torch.float32)
    ramp = ((i - low) / max(high - low, 0.001)).clamp(0, 1)
    return inv_freq * (1 - ramp + ramp / factor)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, scaling: float | None,
                 yarn: dict | None = None):
    """cos/sin of shape (B, T, head_dim/2) for integer positions (B, T).

    Computed from the positions themselves rather than looked up in a table sized max_seq_len, so a long prompt
    can never index past the end. Linear scaling divides positions by `scaling`; `yarn` (MiniMind-3's YaRN dict)
    corrects the frequencies and multiplies cos/sin by its attention_factor.
    """
    inv_freq = _inv_freq(head_dim, theta, position_ids, tuple(sorted(yarn.items())) if yarn else None)
    pos = position_ids.float()
    if scaling:
        pos = pos / scaling
    angles = pos[..., None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    attention_factor = (yarn or {}).get("attention_factor", 1.0) or 1.0
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos, sin


def rope_tables(cos: torch.Tensor, sin: torch.Tensor, half: bool = False):
    """(B, T, head_dim/2) cos/sin -> (cos2, sin2, half) for `apply_rope`, (B, T, 1, head_dim) each, built once per
    forward. Interleaved (v1): cos2 = (c0, c0, c1, c1, ...), sin2 = (-s0, s0, -s1, s1, ...). Rotate-half
    (MiniMind-3): cos2 = (c0 .. c_{n-1}, c0 .. c_{n-1}), sin2 = (-s0 .. -s_{n-1}, s0 .. s_{n-1}). Pure data movement,
    no new rounding."""
    if half:
        return torch.cat((cos, cos), dim=-1).unsqueeze(2), torch.cat((-sin, sin), dim=-1).unsqueeze(2), True
    cos2 = torch.stack((cos, cos), dim=-1).flatten(-2).unsqueeze(2)
    sin2 = torch.stack((-sin, sin), dim=-1).flatten(-2).unsqueeze(2)
    return cos2, sin2, False


def apply_rope(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor, half: bool = False) -> torch.Tensor:
    """Rotate each head's pairs by the position's angles: adjacent pairs (x[2i], x[2i+1]) in v1's layout, or
    (x[i], x[i + head_dim/2]) with `half` (rotate-half, Llama/Qwen's).

    x: (B, T, H, head_dim); cos2/sin2: (B, T, 1, head_dim) from `rope_tables`.
    Interleaved: out[2i] = x[2i] c + x[2i+1] (-s) and out[2i+1] = x[2i+1] c + x[2i] s: bit for bit the textbook
    x0 c - x1 s and x0 s + x1 c (negation is exact, a + (-b) is a - b, and addition commutes), in 3 arithmetic ops
    instead of 6 plus the slicing and stacking. Rotate-half is the same with the two halves swapped instead.
    """
    xf = x if x.dtype == torch.float32 else x.float()
    if half:
        swapped = xf.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # (x_{n/2} .. x_{n-1}, x0 .. x_{n/2-1})
    else:
        swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
    out = xf * cos2 + swapped * sin2
    return out if out.dtype == x.dtype else out.type_as(x)


class KVCache:
    """Keys and values for one generation call: per layer (B, n_kv_heads, T, head_dim), after RoPE.

    It has the two methods the model uses from transformers' `Cache` (`update`, `get_seq_length`), so either kind
    can be passed as `past_key_values`. Storage grows by doubling, so decoding does not copy the cache every step.
    """

    def __init__(self, n_layers: int, capacity: int = 0):
        self.capacity = capacity
        self._k: list[torch.Tensor | None] = [None] * n_layers
        self._v: list[torch.Tensor | None] = [None] * n_layers
        self._len = [0] * n_layers

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        start, new = self._len[layer_idx], k.shape[2]
        end = start + new
        buf_k = self._k[layer_idx]
        if buf_k is None or buf_k.shape[2] < end:
            size = max(end, self.capacity, 2 * (buf_k.shape[2] if buf_k is not None else 0))
            grown_k = k.new_empty(k.shape[0], k.shape[1], size, k.shape[3])
            grown_v = v.new_empty(v.shape[0], v.shape[1], size, v.shape[3])
            if buf_k is not None:
                grown_k[:, :, :start] = buf_k[:, :, :start]
                grown_v[:, :, :start] = self._v[layer_idx][:, :, :start]
            self._k[layer_idx], self._v[layer_idx] = grown_k, grown_v
        buf_k, buf_v = self._k[layer_idx], self._v[layer_idx]
        buf_k.narrow(2, start, new).copy_(k)
        buf_v.narrow(2, start, new).copy_(v)
        self._len[layer_idx] = end
        return buf_k.narrow(2, 0, end), buf_v.narrow(2, 0, end)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._len[layer_idx]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep the rows of the chosen beams (transformers' beam search calls this after every step)."""
        for i, (k, v) in enumerate(zip(self._k, self._v)):
            if k is not None:
                self._k[i] = k.index_select(0, beam_idx.to(k.device))
                self._v[i] = v.index_select(0, beam_idx.to(v.device))


class Attention(nn.Module):
    def __init__(self, config: LMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.wo._residual_proj = True
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.use_sdpa = config.flash_attn and hasattr(F, "scaled_dot_product_attention")
        if config.qk_norm:  # MiniMind-3: q and k RMS-normed per head, before RoPE
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, rope, mask, cache):
        """rope: (cos2, sin2, half) from `rope_tables`, shared by every layer."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, *rope).transpose(1, 2)
        k = apply_rope(k, *rope).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        # mask is None means "plain causal": no padding, and the queries are the first tokens or a single new one.
        # A branch, not `mask is None and T > 1`: under torch.compile(dynamic=True) that is a SymBool SDPA refuses.
        causal = True if mask is None and T > 1 else False
        dropout_p = self.dropout if self.training else 0.0
        gqa = self.n_heads != self.n_kv_heads
        if isinstance(mask, BlockMask):  # document masks on CUDA under torch.compile (`_document_mask_and_positions`)
            out = flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
        elif self.use_sdpa:
            if mask is not None and gqa and q.device.type == "cuda":
                # On CUDA, SDPA has no fused kernel for an explicit mask together with enable_gqa and falls back to
                # the math kernel; with the KV heads repeated, the memory-efficient kernel takes the mask.
                rep = self.n_heads // self.n_kv_heads
                k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
                gqa = False
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                                                 enable_gqa=gqa)
        else:
            out = self._matmul_attention(q, k, v, mask, causal, dropout_p)
        out = out.transpose(1, 2).reshape(B, T, -1)
        return _dropout(self.resid_dropout, self.wo(out))

    def _matmul_attention(self, q, k, v, mask, causal, dropout_p):
        """Reference path for backends without SDPA: explicit scores, mask, softmax in float32."""
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if causal:
            Tq, Tk = q.shape[2], k.shape[2]
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = F.dropout(scores.float().softmax(dim=-1).type_as(q), p=dropout_p, training=dropout_p > 0)
        return probs @ v


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 is the gate, w3 the up projection, w2 the down projection."""

    def __init__(self, config: LMConfig, hidden: int | None = None):
        super().__init__()
        hidden = hidden or config.ffn_hidden_dim
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2._residual_proj = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return _dropout(self.dropout, self.w2(F.silu(self.w1(x)) * self.w3(x)))


class MoEGate(nn.Module):
    """Softmax router over the routed experts; returns top-k expert ids, their weights and the balance loss."""

    def __init__(self, config: LMConfig):
        super().__init__()
        if config.scoring_func != "softmax":
            raise ValueError(f"unsupported scoring_func {config.scoring_func!r}; only 'softmax' is implemented")
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, real: torch.Tensor | None = None):
        """real: optional (B, T) bool, True on real tokens; the balance loss then averages over those only."""
        B, T, D = x.shape
        scores = F.linear(x.reshape(-1, D), self.weight).float().softmax(dim=-1)  # (B*T, E)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.norm_topk_prob:  # top-1 renormalised routes with weight 1 (MiniMind-3); v1 is always top-2
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        aux_loss = None
        if self.training and self.alpha > 0:
            if real is None:
                aux_loss = self._balance_loss(scores, topk_idx, B, T)
            else:
                aux_loss = self._masked_balance_loss(scores, topk_idx, real.reshape(B, T).to(scores.device).float())
        return topk_idx, topk_weight, aux_loss

    def _balance_loss(self, scores, topk_idx, B: int, T: int):
        if self.seq_aux:
            # Per sequence: expected load (mean router prob) times actual load (share of top-k slots), scaled so
            # that a perfectly balanced router scores alpha.
            load = torch.zeros(B, self.n_experts, device=scores.device)
            load.scatter_add_(1, topk_idx.view(B, -1), torch.ones(B, T * self.top_k, device=scores.device))
            load = load / (T * self.top_k / self.n_experts)
            return (load * scores.view(B, T, -1).mean(dim=1)).sum(dim=1).mean() * self.alpha
        load = F.one_hot(topk_idx.view(-1), num_classes=self.n_experts).float().mean(0) * self.n_experts
        return (scores.mean(0) * load).sum() * self.alpha

    def _masked_balance_loss(self, scores, topk_idx, real: torch.Tensor):
        """`_balance_loss` over the real tokens only (real: (B, T) float 0/1): padding routes too, but its routing
        says nothing about the data, so it must not pull the router. All-real input gives `_balance_loss`'s value."""
        B, T = real.shape
        slot_real = real.reshape(-1, 1).expand(-1, self.top_k)  # (B*T, k)
        if self.seq_aux:
            n_real = real.sum(1)  # (B,)
            load = torch.zeros(B, self.n_experts, device=scores.device)
            load.scatter_add_(1, topk_idx.view(B, -1), slot_real.reshape(B, -1))
            load = load / (n_real.clamp(min=1) * self.top_k / self.n_experts)[:, None]
            mean_scores = (scores.view(B, T, -1) * real[..., None]).sum(1) / n_real.clamp(min=1)[:, None]
            has_real = (n_real > 0).float()
            per_row = (load * mean_scores).sum(dim=1)
            return (per_row * has_real).sum() / has_real.sum().clamp(min=1) * self.alpha
        n_real = real.sum().clamp(min=1)
        load = torch.zeros(self.n_experts, device=scores.device)
        load.scatter_add_(0, topk_idx.view(-1), slot_real.reshape(-1))
        load = load / (n_real * self.top_k) * self.n_experts
        mean_scores = (scores * real.reshape(-1, 1)).sum(0) / n_real
        return (mean_scores * load).sum() * self.alpha


# Up to this many tokens per forward (decoding, small batches) every expert runs on every token, weighted by its
# routing weight (0 where not chosen): no weight stacking, no sort, the same numbers. Above it, one grouped GEMM
# per projection over the tokens sorted by expert. Either way nothing depends on the routing on the host.
DENSE_MOE_TOKENS = 32


def _routing_is_free_to_read(x: torch.Tensor) -> bool:
    """Eager CPU inference: the routing already sits in host memory, so reading the per-expert counts costs no
    device sync, and looping over the busy experts only is the least work. Training (autograd: every expert must
    get a gradient), CUDA (a real sync) and traced graphs (no Python on data) use the sync-free dispatch."""
    return x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _slots_by_expert(topk_idx: torch.Tensor):
    """(expert of each (token, slot) pair, the pairs' order sorted by expert, the token of each sorted pair)."""
    flat_idx = topk_idx.reshape(-1)
    order = flat_idx.argsort(stable=True)
    return flat_idx, order, order // topk_idx.shape[1]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul in (custom ops are not autocast), else x's own."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class MoEFeedForward(nn.Module):
    """Routed experts (+ an optional shared expert), dispatched without reading the routing on the host: no
    `.tolist()`, no data-dependent Python control flow, so one graph under torch.compile and no host sync."""

    def __init__(self, config: LMConfig):
        super().__init__()
        width = config.expert_hidden_dim
        self.experts = nn.ModuleList(FeedForward(config, width) for _ in range(config.n_routed_experts))
        self.gate = MoEGate(config)
        self.shared_experts = FeedForward(config, width) if config.n_shared_experts else None

    def forward(self, x: torch.Tensor, real: torch.Tensor | None = None):
        B, T, D = x.shape
        topk_idx, topk_weight, aux_loss = self.gate(x, real)
        flat = x.reshape(-1, D)
        if _routing_is_free_to_read(flat):
            out = self._chosen_experts(flat, topk_idx, topk_weight)
        elif flat.shape[0] <= DENSE_MOE_TOKENS or not self._plain_experts():
            out = self._every_expert(flat, topk_idx, topk_weight)
        else:
            out = self._grouped(flat, topk_idx, topk_weight)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(B, T, D), aux_loss

    def _plain_experts(self) -> bool:
        """The grouped GEMM reads the experts' weight matrices directly; wrapped projections (LoRA adapters) must
        run as modules instead."""
        e = self.experts[0]
        return type(e.w1) is nn.Linear and type(e.w2) is nn.Linear and type(e.w3) is nn.Linear

    def _chosen_experts(self, flat, topk_idx, topk_weight):
        """Each expert on exactly its own tokens, idle experts skipped (CPU inference only, see
        `_routing_is_free_to_read`): half the work of `_every_expert` when decoding top-2 of 4."""
        flat_idx, order, token_of = _slots_by_expert(topk_idx)
        counts = torch.bincount(flat_idx, minlength=len(self.experts)).tolist()
        out = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
        start = 0
        for expert, count in zip(self.experts, counts):
            if count == 0:
                continue
            slots, tokens = order[start:start + count], token_of[start:start + count]
            start += count
            y = expert(flat[tokens]) * topk_weight.reshape(-1)[slots].unsqueeze(-1)
            out.index_add_(0, tokens, y if y.dtype == torch.float32 else y.float())
        return out

    def _every_expert(self, flat, topk_idx, topk_weight):
        """Σ_e weight_e(token) · expert_e(token) over every expert (weight 0 where e was not chosen). Every expert
        runs, so each gets a gradient (DDP waits for all of them), and it works with adapted experts."""
        E = len(self.experts)
        weights = torch.zeros(flat.shape[0], E, dtype=torch.float32, device=flat.device)
        weights.scatter_(1, topk_idx, topk_weight.float())
        out = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
        for e, expert in enumerate(self.experts):
            out = out + expert(flat) * weights[:, e:e + 1]
        return out

    def _grouped(self, flat, topk_idx, topk_weight):
        """(token, slot) pairs sorted by expert; each projection is one grouped GEMM over the sorted rows."""
        E = len(self.experts)
        flat_idx, order, token_of = _slots_by_expert(topk_idx)
        counts = torch.zeros(E, dtype=torch.long, device=flat.device).scatter_add_(0, flat_idx,
                                                                                 torch.ones_like(flat_idx))
        offs = counts.cumsum(0).to(torch.int32)
        dtype = _compute_dtype(flat)
        rows = flat[token_of].to(dtype)
        # (E, in, out) weights, stacked each forward: a copy of the expert weights (small next to the activations
        # of a training batch), through which autograd reaches every expert's own nn.Linear weight.
        w1, w2, w3 = (torch.stack([getattr(e, name).weight.t() for e in self.experts]).to(dtype)
                      for name in ("w1", "w2", "w3"))
        hidden = F.silu(grouped_mm(rows, w1, offs)) * grouped_mm(rows, w3, offs)
        y = _dropout(self.experts[0].dropout, grouped_mm(hidden, w2, offs))
        y = y.float() * topk_weight.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros(flat.shape, dtype=torch.float32, device=flat.device).index_add_(0, token_of, y)


class TransformerBlock(nn.Module):
    def __init__(self, layer_idx: int, config: LMConfig):
        super().__init__()
        self.attention = Attention(config, layer_idx)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = MoEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, x, rope, mask, cache, real=None):
        h = x + self.attention(self.attention_norm(x), rope, mask, cache)
        if isinstance(self.feed_forward, MoEFeedForward):
            ff, aux = self.feed_forward(self.ffn_norm(h), real)
        else:
            ff, aux = self.feed_forward(self.ffn_norm(h)), None
        return h + ff, aux


@dataclass
class MiniMindCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the MoE balance loss (already included in `loss` when training) and the z-loss
    term (included in `loss` when the forward was asked for one)."""

    aux_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None


# transformers 5.x renamed the output's `past_key_values` to `cache` (the old name warns).
_CACHE_FIELD = "cache" if "cache" in MiniMindCausalLMOutput.__dataclass_fields__ else "past_key_values"


class MiniMindForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LMConfig
    base_model_prefix = "minimind"
    _no_split_modules = ["TransformerBlock"]
    _tied_weights_keys = {"output.weight": "tok_embeddings.weight"}
    _supports_sdpa = True
    # Activation checkpointing (transformers' gradient_checkpointing_enable, trl's --gradient_checkpointing): each
    # block's activations are recomputed in the backward pass instead of kept, for long RL rollouts on small GPUs.
    supports_gradient_checkpointing = True
    supports_z_loss = True  # forward(z_loss=W): the training loop's --z_loss (peft's wrapper passes it through)

    def __init__(self, config: LMConfig):
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(TransformerBlock(i, config) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight
        self.gradient_checkpointing = False  # set by gradient_checkpointing_enable()
        self.post_init()

    def _init_weights(self, module):
        std = 0.02
        if isinstance(module, nn.Linear):
            # Residual-branch outputs start smaller so the residual stream's variance does not grow with depth.
            if getattr(module, "_residual_proj", False):
                std = 0.02 / math.sqrt(2 * self.config.n_layers)
            hf_init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            hf_init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            hf_init.ones_(module.weight)
        elif isinstance(module, MoEGate):
            hf_init.normal_(module.weight, mean=0.0, std=std)

    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value

    def get_output_embeddings(self):
        return self.output

    def set_output_embeddings(self, value):
        self.output = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = False,
        position_ids: torch.LongTensor | None = None,
        targets: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        document_ids: torch.LongTensor | None = None,
        token_mask: torch.Tensor | None = None,
        z_loss: float = 0.0,
        **kwargs,
    ) -> MiniMindCausalLMOutput:
        """Logits for every position (or the last `logits_to_keep`), and the loss when labels are given.

        labels:  transformers' convention, aligned with input_ids; the model shifts them by one.
        targets: v1's convention, already the next token for each position (no shift).
        Either way, -100 marks positions without loss.
        attention_mask: (B, past+T) with 0 for padding (any side), or a ready boolean (B, 1, T, past+T) mask where
            True means "may attend".
        document_ids: (B, T) for packed documents (no cache): a token attends only to earlier tokens with the same
            id, and RoPE positions restart at each document (unless position_ids are given); -1 marks padding.
        token_mask: (B, T), 1 on real tokens, for right-padded batches: attention stays plain causal (exact for
            every real token, as padding only follows them) and the MoE balance loss counts only real tokens.
        z_loss: W > 0 adds `_z_loss` (W x logsumexp(logits)^2 over the loss tokens) to the loss, also returned
            as `out.z_loss`; the training loop passes it, nothing else does (0: the loss is the cross-entropy alone).
        """
        # transformers 5.x's GenerationMixin passes the cache as `cache=`; 4.x (and trl/peft) as `past_key_values=`.
        if past_key_values is None:
            past_key_values = kwargs.pop("cache", None)
        h = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = h.shape[:2]
        if use_cache and past_key_values is None:
            past_key_values = KVCache(self.config.n_layers)
        cache = past_key_values
        past = cache.get_seq_length() if cache is not None else 0

        mask, position_ids, real = self._attention_inputs(document_ids, attention_mask, token_mask, position_ids,
                                                          B, T, past, h.device)
        logits, aux_total = self._layers_to_logits(h, _rope(self.config, position_ids), mask, cache, real,
                                                   logits_to_keep)
        loss = z_term = None
        if labels is not None or targets is not None:
            loss = _lm_loss(logits, labels, targets, num_items_in_batch)
            if z_loss:
                z_term = _z_loss(logits, labels, targets, num_items_in_batch, z_loss)
                loss = loss + z_term
            if aux_total is not None and self.training:
                loss = loss + aux_total
        out = MiniMindCausalLMOutput(loss=loss, logits=logits, aux_loss=aux_total, z_loss=z_term)
        if use_cache:  # under the field name this transformers declares, so no deprecation shim runs
            out[_CACHE_FIELD] = cache
        return out

    def _layers_to_logits(self, h, rope, mask, cache, real, logits_to_keep):
        """(logits at the kept positions, the MoE balance loss summed over layers or None)."""
        h = _dropout(self.dropout, h)
        aux_total = None
        recompute = self.gradient_checkpointing and self.training and cache is None
        for layer in self.layers:
            if recompute:
                h, aux = self._gradient_checkpointing_func(layer.__call__, h, rope, mask, cache, real)
            else:
                h, aux = layer(h, rope, mask, cache, real)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        h = self.norm(h)
        if isinstance(logits_to_keep, torch.Tensor):  # the positions to keep (the engine's packed prefill)
            h = h[:, logits_to_keep]
        elif logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.output(h), aux_total

    def _attention_inputs(self, document_ids, attention_mask, token_mask, position_ids, B: int, T: int, past: int,
                          device):
        """(attention mask or None, RoPE positions, the real tokens for the MoE balance loss or None)."""
        if document_ids is not None:
            if past:
                raise ValueError("document_ids describe a whole packed sequence; they cannot follow a KV cache")
            mask, position_ids = _document_mask_and_positions(document_ids.to(device), position_ids,
                                                              self.training and self.config.dropout > 0)
        else:
            mask, position_ids = _mask_and_positions(attention_mask, position_ids, B, T, past, device)
        real = real_tokens(document_ids, attention_mask, token_mask, T) if self.config.use_moe else None
        return mask, position_ids, real

    def num_parameters_unique(self) -> int:
        """Parameter count with the tied embedding counted once (the figure MiniMind v1 reports)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 x active matmul params + 12 x layers x dim x seq_len for
        attention scores (the PaLM/nanoGPT convention, which does not halve for causality)."""
        c = self.config
        n = sum(p.numel() for name, p in self.named_parameters() if p.dim() == 2 and "tok_embeddings" not in name)
        n += c.vocab_size * c.dim  # the (tied) output projection is a matmul even though it is shared
        if c.use_moe:
            expert = 3 * c.dim * c.expert_hidden_dim
            n -= c.n_layers * expert * (c.n_routed_experts - c.num_experts_per_tok)
        attn = 12 * c.n_layers * c.dim * seq_len
        return 6 * n + attn


def _rope(config, position_ids):
    """The (cos2, sin2, half) tables every layer shares for this forward's positions."""
    cos, sin = rope_cos_sin(position_ids, config.head_dim, config.rope_theta, config.rope_scaling_factor,
                            _active_yarn(config))
    return rope_tables(cos, sin, half=config.rope_layout == "half")


def _active_yarn(config) -> dict | None:
    """The YaRN dict when it applies: MiniMind-3 scales at every position whenever it is on and the model's
    max_position_embeddings exceeds the original context."""
    yarn = config.yarn
    if not yarn or config.max_position_embeddings / yarn["original_max_position_embeddings"] <= 1:
        return None
    return yarn


def _mask_and_positions(attention_mask, position_ids, B: int, T: int, past: int, device):
    """forward's attention mask (None = plain causal) and RoPE positions.

    A 4D boolean mask is used as given; a 2D padding mask becomes a padded causal mask (positions count only real
    tokens) whatever it holds: deciding "no padding here" would read the mask on the host (a sync, and a graph
    break under torch.compile). Queries after a cached prefix get an explicit causal mask.
    """
    mask = None
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask.to(device=device, dtype=torch.bool)
    elif attention_mask is not None:
        pad = attention_mask.to(device=device, dtype=torch.bool)
        if position_ids is None:
            position_ids = (pad.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        mask = _padded_causal_mask(pad, T, past)
    elif past > 0 and T > 1:
        mask = _padded_causal_mask(torch.ones(B, past + T, dtype=torch.bool, device=device), T, past)
    if position_ids is None:
        position_ids = torch.arange(past, past + T, device=device).unsqueeze(0).expand(B, T)
    return mask, position_ids


def _document_positions(doc: torch.Tensor) -> torch.Tensor:
    """(B, T) positions restarting at 0 wherever the document id changes: index minus the index of the run's first
    token (a running max of the run starts), all on the device."""
    B, T = doc.shape
    index = torch.arange(T, device=doc.device).expand(B, T)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def use_flex_attention(device: torch.device, dropout: bool) -> bool:
    """Document masks go through flex_attention's block-sparse kernel on CUDA when compiled (eager flex_attention
    is a slow reference implementation); it has no dropout. Elsewhere: SDPA with the dense boolean mask."""
    return (flex_attention is not None and device.type == "cuda" and torch.compiler.is_compiling()
            and not dropout)


def _document_mask_and_positions(doc: torch.Tensor, position_ids, dropout: bool):
    """Block-diagonal causal attention for packed documents, and positions restarting per document."""
    if position_ids is None:
        position_ids = _document_positions(doc)
    B, T = doc.shape
    if use_flex_attention(doc.device, dropout):
        def same_document(b, h, q, k):
            return (doc[b, q] == doc[b, k]) & (k <= q)

        return create_block_mask(same_document, B, None, T, T, device=doc.device), position_ids
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal).unsqueeze(1), position_ids


def real_tokens(document_ids, attention_mask, token_mask, T: int):
    """(B, T) bool of the real (non-padding) input tokens: document_ids >= 0, else a 2D attention_mask (a 4D one is
    a ready mask, not padding), else token_mask; None when all are real. The MoE balance loss and the training
    loop's tokens/s both count these."""
    if document_ids is not None:
        return document_ids >= 0
    if attention_mask is not None and attention_mask.dim() == 2:
        return attention_mask[:, -T:].bool()
    if token_mask is not None:
        return token_mask.bool()
    return None


def _lm_loss(logits, labels, targets, num_items_in_batch):
    """Cross-entropy over labels (shifted here) or targets (already shifted); -100 is ignored. With
    num_items_in_batch, the sum over tokens divided by it (so accumulated micro-batches weigh by tokens)."""
    if labels is not None:
        pred, tgt = logits[:, :-1], labels[:, 1:]
    else:
        pred, tgt = logits, targets
    tgt = tgt.to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(pred.float().reshape(-1, pred.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                           reduction=reduction)
    return loss / num_items_in_batch if num_items_in_batch is not None else loss


def _z_loss(logits, labels, targets, num_items_in_batch, weight: float) -> torch.Tensor:
    """PaLM's z-loss: weight x logsumexp(logits)^2 at the positions `_lm_loss` counts, normalised as it is (summed
    and divided by num_items_in_batch, else averaged over those positions). It pulls the softmax normaliser towards
    1 (log Z towards 0), which keeps the output logits from drifting large. The positions are weighted 0/1 rather
    than selected, so the shapes never depend on the data (no host sync, no graph break)."""
    if labels is not None:
        pred, tgt = logits[:, :-1], labels[:, 1:]
    else:
        pred, tgt = logits, targets
    keep = (tgt.to(logits.device) != -100).reshape(-1)
    log_z = torch.logsumexp(pred.float().reshape(-1, pred.shape[-1]), dim=-1)
    total = (log_z.square() * keep).sum()
    count = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
    return weight * total / count


def _padded_causal_mask(pad: torch.Tensor, T: int, past: int) -> torch.Tensor:
    """(B, 1, T, past+T) boolean mask: causal, and no attending to padded keys.

    Each query may always see itself, so a padded query row is never all -inf (which would give NaNs).
    """
    total = pad.shape[1]
    q_pos = torch.arange(past, past + T, device=pad.device)[:, None]
    k_pos = torch.arange(total, device=pad.device)[None, :]
    allowed = (k_pos <= q_pos) & pad[:, None, :]
    allowed = allowed | (k_pos == q_pos)
    return allowed.unsqueeze(1)


AutoConfig.register("minimind", LMConfig, exist_ok=True)
AutoModelForCausalLM.register(LMConfig, MiniMindForCausalLM, exist_ok=True)

# v1 called the model class `Transformer`; keep the name importable for old scripts.
Transformer = MiniMindForCausalLM
