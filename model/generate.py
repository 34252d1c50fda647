"""Text generation for every script, through the one batched engine (`model/engine.py`).

    from model.generate import generate, stream_text
    out = generate(model, [ids_a, ids_b], max_new_tokens=64, temperature=0)      # list of new-token lists
    for piece in stream_text(model, tokenizer, ids, temperature=0.7, top_p=0.9):  # whole characters only
        print(piece, end="")

`generate` submits every prompt to an `Engine` at once, so they are prefilled packed and decoded together; each
row stops at its own EOS, and a row that would run past the model's context (`config.context_length`) drops its
oldest tokens and is prefilled again, so positions never go beyond what RoPE was trained for. A seeded request
gives the same tokens alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch

from .engine import Engine
from .sampling import GREEDY_BELOW, SamplingParams, apply_repetition_penalty, sample_next

__all__ = ["GREEDY_BELOW", "SamplingParams", "Utf8Detokenizer", "apply_repetition_penalty", "generate",
           "sample_next", "stream_text", "unpad"]

MAX_BATCH = 64  # more prompts than this wait for a free slot; the cache is sized for this many at most


def unpad(ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """A left-padded (B, T) batch back to token lists (the engine packs prompts; it never needs padding)."""
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(ids.device)
    if ids.dim() != 2 or mask.shape != ids.shape or not bool(mask[:, -1].all()):
        raise ValueError("a prompt tensor must be (B, T), left-padded, with an attention_mask of the same shape")
    return [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]


def generate(model, prompts: Sequence[Sequence[int]] | torch.Tensor, params: SamplingParams | None = None,
             eos_token_id: int | None = None, max_context: int | None = None,
             attention_mask: torch.Tensor | None = None, **kwargs) -> list[list[int]]:
    """New tokens for each prompt (EOS included when produced), as lists.

    `prompts` is a list of token lists, or a left-padded (B, T) tensor with its `attention_mask`. Keyword
    arguments override fields of `params` (a copy: the caller's object is never changed).
    """
    p = replace(params or SamplingParams(), **kwargs)
    p.validate()
    if torch.is_tensor(prompts):
        prompts = unpad(prompts, attention_mask)
    prompts = [list(x) for x in prompts]
    if not prompts or any(len(x) == 0 for x in prompts):
        raise ValueError("every prompt needs at least one token")
    context = max_context or model.config.context_length
    capacity = min(context, max(len(x) for x in prompts) + p.max_new_tokens)
    engine = Engine(model, max_batch=min(len(prompts), MAX_BATCH), max_context=context, capacity=capacity)
    return engine.generate_batch(prompts, p, eos_token_id)


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
                stop_at_eos: bool = True, engine: Engine | None = None, **kwargs) -> Iterator[str]:
    """Stream one reply as text pieces made of whole characters. EOS ends the reply and is not shown.

    Pass a long-lived `engine` to reuse its cache across calls (the chat CLI); otherwise one is made for the call.
    """
    p = replace(params or SamplingParams(), **kwargs)
    engine = engine or Engine(model, max_batch=1)
    eos = tokenizer.eos_token_id if stop_at_eos else -1
    detok = Utf8Detokenizer(tokenizer)
    handle = engine.submit(list(prompt_ids), p, eos_token_id=eos)
    try:
        for out in handle:
            if out.token is None or (stop_at_eos and out.token == eos):
                break
            piece = detok.push(out.token)
            if piece:
                yield piece
    finally:
        handle.cancel()  # a consumer that stops early frees the slot
    tail = detok.flush()
    if tail:
        yield tail
