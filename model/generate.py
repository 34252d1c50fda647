"""Text generation for every script: batched, cached, sampled, streamed.

    from model.generate import generate, stream_text
    out = generate(model, [ids_a, ids_b], max_new_tokens=64, temperature=0)      # list of new-token lists
    for piece in stream_text(model, tokenizer, ids, temperature=0.7, top_p=0.9):  # whole characters only
        print(piece, end="")

Each call owns its KV cache and its random generator, so concurrent calls (a server's requests) never share
state. Prompts are left-padded into one batch; each row stops at its own EOS. When a row would run past the
model's context (`config.context_length`), the oldest tokens are dropped and the cache is rebuilt, so positions
never go beyond what RoPE was trained for.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from .model import KVCache

# Dividing logits by a temperature this small overflows to inf; the limit of such sampling is greedy anyway.
GREEDY_BELOW = 1e-4


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 (or anything below GREEDY_BELOW) means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    repetition_penalty: float = 1.0  # 1 disables
    seed: int | None = None

    def validate(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make already-seen tokens less likely: divide positive logits by `penalty`, multiply negative ones.

    (Dividing a negative logit would raise it, which is v1's bug.) seen: bool (B, V).
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from float logits (B, V)."""
    if p.temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first token always stays.
        drop = (probs.cumsum(dim=-1) - probs) >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, attention_mask), left-padded so every row's last token is in the last column."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _crop(ids: torch.Tensor, mask: torch.Tensor, keep: int):
    """Keep the last `keep` columns and drop columns that are padding in every row."""
    ids, mask = ids[:, -keep:], mask[:, -keep:]
    first = int(mask.any(dim=0).long().argmax())
    return ids[:, first:], mask[:, first:]


@torch.inference_mode()
def stream(
    model,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    params: SamplingParams | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    max_context: int | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> Iterator[torch.Tensor]:
    """Yield one tensor (B,) of new tokens per step; rows that already finished yield -1.

    `prompts` is a list of token lists (left-padded here), or an already left-padded (B, T) tensor with its
    `attention_mask` (1 = token, 0 = padding).

    Stops when every row has produced EOS (which is yielded) or after `max_new_tokens` steps.
    Extra keyword arguments fill `SamplingParams`.
    """
    # A copy: the caller's params object is never changed by keyword overrides.
    p = replace(params or SamplingParams(), **kwargs)
    p.validate()
    config = model.config
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    max_context = max_context or config.context_length
    device = next(model.parameters()).device
    generator = None
    if p.seed is not None and p.temperature >= GREEDY_BELOW:
        generator = torch.Generator(device=device).manual_seed(p.seed)

    if torch.is_tensor(prompts):
        ids = prompts.to(device)
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device=device, dtype=torch.long)
        if ids.dim() != 2 or mask.shape != ids.shape or not bool(mask[:, -1].all()):
            raise ValueError("a prompt tensor must be (B, T), left-padded, with an attention_mask of the same shape")
    else:
        ids, mask = left_pad(prompts, pad_token_id, device)
    if ids.shape[1] > max_context:  # prompts longer than the context keep their most recent tokens
        ids, mask = _crop(ids, mask, max_context)
    seen = torch.zeros(ids.shape[0], config.vocab_size, dtype=torch.bool, device=device)
    seen.scatter_(1, ids, mask.bool())
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)

    cache, step_input = None, ids
    for _ in range(p.max_new_tokens):
        if cache is None:  # (re)build the cache from the visible window
            cache = KVCache(config.n_layers, capacity=min(max_context, ids.shape[1] + p.max_new_tokens))
            step_input = ids
        out = model(step_input, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = apply_repetition_penalty(out.logits[:, -1].float(), seen, p.repetition_penalty)
        nxt = sample_next(logits, p, generator)
        nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
        yield torch.where(finished, torch.full_like(nxt, -1), nxt)
        seen.scatter_(1, nxt[:, None], True)
        finished = finished | (nxt == eos)
        if bool(finished.all()):
            return
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step_input = nxt[:, None]
        if ids.shape[1] > max_context:
            # Slide the window: drop the oldest quarter and recompute the cache over the rest.
            ids, mask = _crop(ids, mask, max_context - max_context // 4)
            cache = None


def generate(model, prompts: Sequence[Sequence[int]] | torch.Tensor, params: SamplingParams | None = None,
             eos_token_id: int | None = None, **kwargs) -> list[list[int]]:
    """New tokens for each prompt (EOS included when produced), as lists."""
    rows: list[list[int]] = [[] for _ in prompts]
    for step in stream(model, prompts, params, eos_token_id=eos_token_id, **kwargs):
        for row, tok in zip(rows, step.tolist()):
            if tok >= 0:
                row.append(tok)
    return rows


class Utf8Detokenizer:
    """Turns a growing token list into text deltas that never split a UTF-8 character.

    Byte-level BPE tokens can end in the middle of a multi-byte character; decoding such a prefix yields U+FFFD.
    We hold those tokens back until the character completes (or until it clearly never will).
    """

    MAX_PENDING = 8  # a UTF-8 character is at most 4 bytes; beyond this the bytes are really invalid

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.pending: list[int] = []

    def push(self, token: int) -> str:
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending, skip_special_tokens=self.skip)
        if text.endswith("\ufffd") and len(self.pending) < self.MAX_PENDING:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        """What is left when generation ends. A character cut off by max_new_tokens is dropped, not shown as U+FFFD."""
        text = self.tokenizer.decode(self.pending, skip_special_tokens=self.skip) if self.pending else ""
        self.pending = []
        return text.rstrip("\ufffd")


def stream_text(model, tokenizer, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                stop_at_eos: bool = True, **kwargs) -> Iterator[str]:
    """Stream one reply as text pieces made of whole characters. EOS ends the reply and is not shown."""
    detok = Utf8Detokenizer(tokenizer)
    eos = tokenizer.eos_token_id
    for step in stream(model, [list(prompt_ids)], params, eos_token_id=eos if stop_at_eos else -1, **kwargs):
        tok = int(step[0])
        if tok < 0 or (stop_at_eos and tok == eos):
            break
        piece = detok.push(tok)
        if piece:
            yield piece
    tail = detok.flush()
    if tail:
        yield tail
