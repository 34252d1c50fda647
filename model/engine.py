"""The one generation engine: continuous batching over a fixed pool of KV-cache slots.

    engine = Engine(model, max_batch=16)                 # owns the model and a preallocated KV cache
    handle = engine.submit(prompt_ids, SamplingParams(max_new_tokens=64, temperature=0))
    for out in handle:                                   # StepOutput(token, logprob, top_logprobs, finish_reason)
        ...
    engine.start()                                       # or: a background thread runs the scheduler (the server)

Every scheduler step (`Engine.step`):
1. admits waiting requests into free slots (between decode steps: continuous batching);
2. prefills up to `prefill_chunk` prompt tokens: fresh short prompts packed into one row with a block-diagonal
   mask (no padding computed), long ones in chunks, so a long prompt never stalls the others for long;
3. runs ONE batched forward over every sequence that is decoding, and samples each row with its own parameters.

Slots are kept compact: decoding sequences in slots [0, n_decoding), prefilling ones right after, so a decode step
reads the cache as a plain slice (a view, no gather). A sequence that finishes or is cancelled leaves at once and
the last occupied slot moves into its place. Memory is bounded: max_batch x context per layer, allocated up front.

Each request owns a torch.Generator, and rows are processed independently, so a seeded or greedy request gives
the same tokens alone or batched with others. Without a background thread, iterating a handle runs the steps
itself, so scripts use the same engine synchronously (`generate_batch`).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .sampling import GREEDY_BELOW, SamplingParams, apply_repetition_penalty, sample_next

log = logging.getLogger("minimind.engine")


@dataclass
class StepOutput:
    """One event of a request: a new token (with its logprob when asked), or the end (finish_reason set)."""

    token: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: BaseException | None = None


class RequestHandle:
    """The caller's side of one request: iterate it for StepOutputs; `cancel()` frees its slot within one step."""

    def __init__(self, engine: Engine, prompt_tokens: int, on_event=None):
        self.engine, self.prompt_tokens, self.on_event = engine, prompt_tokens, on_event
        self.events: queue.SimpleQueue[StepOutput] = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    def cancel(self) -> None:
        self.cancelled.set()
        self.engine.wake()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _emit(self, out: StepOutput) -> None:
        if out.token is not None:
            self.completion_tokens += 1
            self.last_token_at = time.perf_counter()
            if self.first_token_at is None:
                self.first_token_at = self.last_token_at
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason
        if self.on_event is not None:
            self.on_event(out)
        else:
            self.events.put(out)

    def __iter__(self) -> Iterator[StepOutput]:
        if self.on_event is not None:
            raise RuntimeError("this request delivers its events to on_event")
        while True:
            try:
                out = self.events.get_nowait()
            except queue.Empty:
                if self.engine.running:
                    out = self.events.get()
                else:  # no background loop: drive the engine from here
                    self.engine.step()
                    continue
            yield out
            if out.finish_reason is not None:
                return

    def tokens(self) -> list[int]:
        """Run to the end; the generated tokens (EOS included when produced)."""
        return [out.token for out in self if out.token is not None]


@dataclass
class _Sequence:
    handle: RequestHandle
    params: SamplingParams
    eos: int
    top_logprobs: int | None
    generator: torch.Generator | None
    tokens: list[int]  # the visible window: prompt (cropped to the context) + generated tokens
    cached: int = 0  # how many of `tokens` have K/V in the slot
    generated: int = 0
    slot: int = -1


class SlotCache:
    """Preallocated keys/values: per layer (max_batch, n_kv_heads, capacity, head_dim), plus the tokens each slot
    has seen (for the repetition penalty). `swap` exchanges two slots' contents."""

    def __init__(self, config, max_batch: int, capacity: int, dtype, device):
        shape = (max_batch, config.n_kv_heads, capacity, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.seen = torch.zeros(max_batch, config.vocab_size, dtype=torch.bool, device=device)

    def swap(self, i: int, j: int, length: int) -> None:
        rows = torch.tensor([i, j], device=self.seen.device)
        back = rows.flip(0)
        for buf in itertools.chain(self.k, self.v):
            buf[rows, :, :length] = buf[back, :, :length]
        self.seen[rows] = self.seen[back]


class _DecodeView:
    """What the model sees as its cache in a decode step: writes one new K/V per row at that row's position and
    returns the slots' first `key_len` positions (a view of the pool; later keys are masked per row)."""

    def __init__(self, cache: SlotCache, n: int, positions: torch.Tensor, key_len: int):
        self.cache, self.n, self.positions, self.key_len = cache, n, positions, key_len
        self.rows = torch.arange(n, device=positions.device)

    def update(self, k, v, layer_idx, *args, **kwargs):
        kb, vb = self.cache.k[layer_idx], self.cache.v[layer_idx]
        kb[self.rows, :, self.positions] = k[:, :, 0]
        vb[self.rows, :, self.positions] = v[:, :, 0]
        return kb[:self.n, :, :self.key_len], vb[:self.n, :, :self.key_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.key_len - 1


class _PackedPrefillView:
    """Fresh prompts packed into one row: each segment's K/V is copied into its slot, and attention runs over the
    packed keys themselves (the block-diagonal mask keeps the prompts apart)."""

    def __init__(self, cache: SlotCache, segments: list[tuple[int, int, int]]):
        self.cache, self.segments = cache, segments  # (slot, start in the packed row, length)

    def update(self, k, v, layer_idx, *args, **kwargs):
        kb, vb = self.cache.k[layer_idx], self.cache.v[layer_idx]
        for slot, start, length in self.segments:
            kb[slot, :, :length] = k[0, :, start:start + length]
            vb[slot, :, :length] = v[0, :, start:start + length]
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class _ChunkView:
    """One prompt chunk of one slot, after `past` cached tokens: plain causal attention over the slot's prefix."""

    def __init__(self, cache: SlotCache, slot: int, past: int):
        self.cache, self.slot, self.past = cache, slot, past

    def update(self, k, v, layer_idx, *args, **kwargs):
        kb, vb = self.cache.k[layer_idx], self.cache.v[layer_idx]
        end = self.past + k.shape[2]
        kb[self.slot:self.slot + 1, :, self.past:end] = k
        vb[self.slot:self.slot + 1, :, self.past:end] = v
        return kb[self.slot:self.slot + 1, :, :end], vb[self.slot:self.slot + 1, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past


class PackedRow:
    """Token lists packed into one (1, total) row with no padding: positions restart at 0 for each list, and the
    block-diagonal causal mask keeps them apart (None for a single list: plain causal attention, SDPA's fastest
    kernel). `ends` are the positions whose logits predict each list's next token."""

    def __init__(self, token_lists: Sequence[Sequence[int]], device):
        lengths = [len(t) for t in token_lists]
        self.starts = list(itertools.accumulate([0] + lengths[:-1]))
        self.ids = torch.tensor([t for tokens in token_lists for t in tokens], device=device)[None]
        self.positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
        self.ends = torch.tensor([a + n - 1 for a, n in zip(self.starts, lengths)], device=device)
        self.mask = None
        if len(lengths) > 1:
            segment = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                              torch.tensor(lengths, device=device))
            causal = torch.ones(len(segment), len(segment), dtype=torch.bool, device=device).tril()
            self.mask = ((segment[:, None] == segment[None, :]) & causal)[None, None]


@torch.inference_mode()
def last_token_logits(model, prompts: Sequence[Sequence[int]], select: Sequence[int] | None = None,
                      max_prompts: int = 16, row_tokens: int | None = None) -> torch.Tensor:
    """(N, V) float32 logits after each prompt (only the `select`ed columns if given), in order, on the CPU.

    The engine's packed prefill without a cache, for scoring (C-Eval) rather than generating: prompts, longest
    first, are packed into rows of at most `row_tokens` tokens (default the context) and `max_prompts` prompts,
    so no position is padding and the block-diagonal attention stays within one context's worth per row.
    """
    device = next(model.parameters()).device
    row_tokens = row_tokens or model.config.context_length
    index = None if select is None else torch.tensor(list(select), device=device)
    order = deque(sorted(range(len(prompts)), key=lambda i: -len(prompts[i])))
    out: list = [None] * len(prompts)
    while order:
        rows = [order.popleft()]  # the longest prompt left opens a row
        total = len(prompts[rows[0]])
        while order and len(rows) < max_prompts and total + len(prompts[order[-1]]) <= row_tokens:
            rows.append(order.pop())  # fill the row with the shortest prompts left
            total += len(prompts[rows[-1]])
        packed = PackedRow([prompts[i] for i in rows], device)
        logits = model(packed.ids, attention_mask=packed.mask, position_ids=packed.positions,
                       logits_to_keep=packed.ends).logits[0]
        logits = (logits if index is None else logits.index_select(-1, index)).float().cpu()
        for j, i in enumerate(rows):
            out[i] = logits[j]
    return torch.stack(out) if out else torch.empty(0, 0)


@dataclass
class EngineStats:
    requests: int = 0
    tokens_generated: int = 0
    steps: int = 0


class Engine:
    """Owns the model and a slot cache; batches every active request (see the module docstring).

    max_context: tokens one sequence can see (default the model's context); a sequence that outgrows it slides
    its window: the oldest quarter is dropped and the rest prefilled again, so positions stay within training.
    capacity: cache positions per slot (default max_context); smaller is fine when every prompt plus its
    max_new_tokens is known to fit (`generate` sizes it so).
    """

    def __init__(self, model, max_batch: int = 16, max_context: int | None = None, prefill_chunk: int = 512,
                 capacity: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.config = model, model.config
        self.max_batch = max_batch
        self.max_context = max_context or self.config.context_length
        self.prefill_chunk = max(1, min(prefill_chunk, self.max_context))
        param = next(model.parameters())
        self.device = param.device
        self.capacity = min(capacity or self.max_context, self.max_context)
        self.cache = SlotCache(self.config, max_batch, self.capacity, param.dtype, param.device)
        self.slots: list[_Sequence] = []  # [0, n_decoding) decoding, the rest prefilling
        self.n_decoding = 0
        self.waiting: deque[_Sequence] = deque()
        self.stats = EngineStats()
        self._lock = threading.Condition()  # guards `waiting` (submit is called from other threads)
        self._step_lock = threading.Lock()  # without the loop thread, several consumers may drive steps at once
        self._thread: threading.Thread | None = None
        self._stop = False

    # -- the caller's side ------------------------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, eos_token_id: int | None = None,
               top_logprobs: int | None = None, on_event=None) -> RequestHandle:
        """Queue one prompt; thread-safe. top_logprobs: None = no logprobs, k >= 0 = the token's logprob and the
        k most likely alternatives. on_event: called (from the engine's thread) with each StepOutput instead of
        queueing it for iteration."""
        params = params or SamplingParams()
        params.validate()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("every prompt needs at least one token")
        if self.capacity < self.max_context and min(len(prompt), self.max_context) + params.max_new_tokens > self.capacity:
            raise ValueError(f"prompt + max_new_tokens exceed this engine's cache of {self.capacity} positions")
        if max(prompt) >= self.config.vocab_size or min(prompt) < 0:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        handle = RequestHandle(self, len(prompt), on_event)
        generator = None
        if params.temperature >= GREEDY_BELOW:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
            generator = torch.Generator(device=self.device).manual_seed(seed)
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        seq = _Sequence(handle, params, eos, top_logprobs, generator, prompt[-self.max_context:])
        with self._lock:
            self.waiting.append(seq)
            self.stats.requests += 1
            self._lock.notify()
        return handle

    def generate_batch(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None,
                       eos_token_id: int | None = None) -> list[list[int]]:
        """All prompts through the engine together; the new tokens of each, in order."""
        handles = [self.submit(p, params, eos_token_id) for p in prompts]
        return [h.tokens() for h in handles]  # the first one's iteration runs the steps that serve them all

    @property
    def num_active(self) -> int:
        return len(self.slots)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # -- the background loop (the server) ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Engine:
        if not self.running:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="minimind-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def wake(self) -> None:
        with self._lock:
            self._lock.notify()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self.waiting and not self.slots:
                    self._lock.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as err:  # a bug outside the model call: fail what is in flight, keep the loop alive
                log.exception("engine step failed")
                self._fail_everything(err)

    def _fail_everything(self, err: BaseException) -> None:
        with self._lock:
            waiting, self.waiting = list(self.waiting), deque()
        for seq in waiting:
            seq.handle._emit(StepOutput(finish_reason="error", error=err))
        for seq in list(self.slots):
            seq.handle._emit(StepOutput(finish_reason="error", error=err))
        self.slots, self.n_decoding = [], 0

    # -- one scheduler step -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """Admit, prefill, decode once. A failure fails the sequences it touched, never the engine."""
        with self._step_lock:
            self._step()

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        for phase in (self._prefill, self._decode):
            try:
                phase()
            except Exception as err:  # e.g. out of memory: report to these requests, keep serving the others
                log.exception("generation step failed")
                for seq in list(self.slots):
                    self._finish(seq, "error", err)
        self.stats.steps += 1

    def _admit(self) -> None:
        with self._lock:
            while self.waiting and len(self.slots) < self.max_batch:
                seq = self.waiting.popleft()
                seq.slot = len(self.slots)
                self.slots.append(seq)
                seen = self.cache.seen[seq.slot]
                seen.zero_()
                seen[torch.tensor(seq.tokens, device=self.device)] = True

    def _drop_cancelled(self) -> None:
        with self._lock:
            kept = deque()
            for seq in self.waiting:
                if seq.handle.cancelled.is_set():
                    seq.handle._emit(StepOutput(finish_reason="cancelled"))
                else:
                    kept.append(seq)
            self.waiting = kept
        for seq in [s for s in self.slots if s.handle.cancelled.is_set()]:
            self._finish(seq, "cancelled")

    def _prefill(self) -> None:
        """Feed up to `prefill_chunk` pending prompt tokens; sequences whose prompt is complete get their first
        token and join the decoding region."""
        budget, fresh, chunks = self.prefill_chunk, [], []
        for seq in self.slots[self.n_decoding:]:
            if budget <= 0:
                break
            todo = len(seq.tokens) - seq.cached
            if seq.cached == 0 and todo <= budget:
                fresh.append(seq)
                budget -= todo
            else:
                chunks.append((seq, min(todo, budget)))
                budget -= min(todo, budget)
        done, logits = [], []
        if fresh:
            logits.append(self._prefill_packed(fresh))
            done += fresh
        for seq, take in chunks:
            last = self._prefill_chunk(seq, take)
            if seq.cached == len(seq.tokens):
                done.append(seq)
                logits.append(last)
        if done:
            self._accept(done, torch.cat(logits), [s.slot for s in done])

    def _prefill_packed(self, seqs: list[_Sequence]) -> torch.Tensor:
        """Several whole prompts in one row: positions restart at 0 for each, attention stays within each."""
        row = PackedRow([s.tokens for s in seqs], self.device)
        view = _PackedPrefillView(self.cache, [(s.slot, a, len(s.tokens)) for s, a in zip(seqs, row.starts)])
        out = self.model(row.ids, attention_mask=row.mask, position_ids=row.positions, past_key_values=view,
                         use_cache=True, logits_to_keep=row.ends)
        for s in seqs:
            s.cached = len(s.tokens)
        return out.logits[0]

    def _prefill_chunk(self, seq: _Sequence, take: int) -> torch.Tensor:
        start = seq.cached
        ids = torch.tensor(seq.tokens[start:start + take], device=self.device)[None]
        positions = torch.arange(start, start + take, device=self.device)[None]
        out = self.model(ids, position_ids=positions, past_key_values=_ChunkView(self.cache, seq.slot, start),
                         use_cache=True, logits_to_keep=1)
        seq.cached += take
        return out.logits[:, -1]

    def _decode(self) -> None:
        n = self.n_decoding
        if n == 0:
            return
        seqs = self.slots[:n]
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)
        cached = [s.cached for s in seqs]
        positions = torch.tensor(cached, device=self.device)
        key_len = max(cached) + 1
        mask = None  # every key visible to every row: no mask needed
        if min(cached) != key_len - 1:
            mask = (torch.arange(key_len, device=self.device)[None, :] <= positions[:, None])[:, None, None, :]
        view = _DecodeView(self.cache, n, positions, key_len)
        out = self.model(ids, attention_mask=mask, position_ids=positions[:, None], past_key_values=view,
                         use_cache=True, logits_to_keep=1)
        for s in seqs:
            s.cached += 1
        self._accept(seqs, out.logits[:, -1], list(range(n)))

    # -- sampling and bookkeeping -----------------------------------------------------------------------------

    def _accept(self, seqs: list[_Sequence], logits: torch.Tensor, slots: list[int]) -> None:
        """Sample one token for each of `seqs` (rows of `logits`, which live in `slots`) and move each on."""
        tokens, logprobs = self._sample(seqs, logits.float(), slots)
        for seq, token, lp in zip(seqs, tokens, logprobs):
            seq.tokens.append(token)
            seq.generated += 1
            self.stats.tokens_generated += 1
            reason = None
            if token == seq.eos:
                reason = "stop"
            elif seq.generated >= seq.params.max_new_tokens:
                reason = "length"
            seq.handle._emit(StepOutput(token, *(lp or (None, None)), finish_reason=reason))
            if reason is not None:
                self._finish(seq, reason, emit=False)
            elif not self._is_decoding(seq):
                self._swap(seq.slot, self.n_decoding)  # prompt done: join the decoding region
                self.n_decoding += 1
            if reason is None and len(seq.tokens) > self.max_context:
                self._slide(seq)

    def _sample(self, seqs, logits: torch.Tensor, slots: list[int]):
        """Each row with its own parameters and generator; greedy rows need no per-row work."""
        rows = torch.tensor(slots, device=self.device)
        penalties = [s.params.repetition_penalty for s in seqs]
        picked = logits
        if any(p != 1.0 for p in penalties):
            penalty = torch.tensor(penalties, device=self.device)[:, None]
            picked = apply_repetition_penalty(logits, self.cache.seen[rows], penalty)
        tokens = picked.argmax(dim=-1)
        for i, seq in enumerate(seqs):
            if seq.generator is not None:
                tokens[i] = sample_next(picked[i:i + 1], seq.params, seq.generator)[0]
        self.cache.seen[rows, tokens] = True
        wants = [i for i, s in enumerate(seqs) if s.top_logprobs is not None]
        logprobs: list = [None] * len(seqs)
        if wants:  # the model's own distribution, before temperature and penalties (as OpenAI reports it)
            lp = logits[wants].log_softmax(dim=-1)
            chosen = lp.gather(1, tokens[wants, None]).squeeze(1).tolist()
            k = max(seqs[i].top_logprobs for i in wants)
            top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
            top_v, top_i = top_v.tolist(), top_i.tolist()
            for j, i in enumerate(wants):
                n = seqs[i].top_logprobs
                logprobs[i] = (chosen[j], list(zip(top_i[j][:n], top_v[j][:n])))
        return tokens.tolist(), logprobs

    def _is_decoding(self, seq: _Sequence) -> bool:
        return seq.slot < self.n_decoding

    def _slide(self, seq: _Sequence) -> None:
        """The window outgrew the context: keep the newest three quarters and prefill them again."""
        keep = self.max_context - self.max_context // 4
        seq.tokens = seq.tokens[-keep:]
        seq.cached = 0
        if self._is_decoding(seq):
            self._swap(seq.slot, self.n_decoding - 1)
            self.n_decoding -= 1

    def _finish(self, seq: _Sequence, reason: str, error: BaseException | None = None, emit: bool = True) -> None:
        if self._is_decoding(seq):
            self._swap(seq.slot, self.n_decoding - 1)
            self.n_decoding -= 1
        self._swap(seq.slot, len(self.slots) - 1)
        self.slots.pop()
        seq.slot = -1
        if emit:
            seq.handle._emit(StepOutput(finish_reason=reason, error=error))

    def _swap(self, i: int, j: int) -> None:
        if i == j:
            return
        a, b = self.slots[i], self.slots[j]
        self.cache.swap(i, j, max(a.cached, b.cached))
        self.slots[i], self.slots[j] = b, a
        a.slot, b.slot = j, i
