"""Chat serving helpers shared by my_openai_api.py (HTTP) and fast_inference.py (streamlit).

    engine = ChatEngine(load_model(ckpt, config), load_tokenizer())
    prompt_ids = engine.build_prompt(messages, budget=engine.context_length - 256)
    reply = engine.reply(prompt_ids, SamplingParams(max_new_tokens=256, temperature=0.7), stop=["\\n\\n"])
    for piece in reply:           # text deltas made of whole characters
        print(piece, end="")
    reply.finish_reason, reply.completion_tokens    # "stop" | "length" | "cancelled", tokens generated

A prompt that does not fit is cut by tokens: whole old turns go first (the system prompt and the last user turn
stay), and only if those two alone are still too long is their text shortened. The prompt is always re-encoded
with `model.dataset.encode_prompt` (as SFT encoded the training data: template markers are whole special tokens,
'<s>'/'</s>' typed in a message stay literal text), so its markers are never cut in half.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

from .dataset import encode_prompt
from .generate import SamplingParams, Utf8Detokenizer, stream


class LockedTokenizer:
    """A tokenizer whose encode/decode calls are serialised.

    HF fast tokenizers keep mutable truncation/padding state in Rust; two threads touching it at once can fail with
    "Already borrowed". Server requests run in parallel threads, so every call goes through one lock (calls are
    short next to a model step). Anything else is passed through.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._lock = threading.Lock()

    def encode(self, text: str, **kwargs) -> list[int]:
        with self._lock:
            return self._tokenizer.encode(text, add_special_tokens=False, **kwargs)

    def __call__(self, text, **kwargs):
        with self._lock:
            return self._tokenizer(text, **kwargs)

    def decode(self, ids, **kwargs) -> str:
        with self._lock:
            return self._tokenizer.decode(ids, **kwargs)

    def apply_chat_template(self, messages, **kwargs):
        with self._lock:
            return self._tokenizer.apply_chat_template(messages, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


class StopMatcher:
    """Cuts a stream of text at the first occurrence of any stop string, which itself is never emitted.

    Text that could be the start of a stop string is held back until the next piece shows whether it is.
    """

    def __init__(self, stops: Sequence[str] | None = ()):
        self.stops = [s for s in stops or () if s]
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = 0  # the longest tail of buf that is a proper prefix of some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


class Reply:
    """One generated reply. Iterate it for text deltas; afterwards `finish_reason` and `completion_tokens` are set.

    `completion_tokens` counts every token the model produced, the final EOS included, so it never exceeds
    `max_new_tokens` and equals it when `finish_reason` is "length". Setting `cancel` (a threading.Event) stops
    generation before the next token: the server does this when the client goes away.
    """

    def __init__(self, engine: ChatEngine, prompt_ids: Sequence[int], params: SamplingParams,
                 stop: Sequence[str] = (), cancel: threading.Event | None = None):
        self.engine, self.prompt_ids, self.params = engine, list(prompt_ids), params
        self.stop, self.cancel = list(stop), cancel
        self.finish_reason: str | None = None
        self.completion_tokens = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def _cancelled(self) -> bool:
        if self.cancel is not None and self.cancel.is_set():
            self.finish_reason = "cancelled"
            return True
        return False

    def __iter__(self) -> Iterator[str]:
        engine = self.engine
        detok = Utf8Detokenizer(engine.tokenizer)
        stopper = StopMatcher(self.stop)
        self.finish_reason, self.completion_tokens = "length", 0
        if self._cancelled():
            return
        steps = stream(engine.model, [self.prompt_ids], self.params, eos_token_id=engine.eos_token_id,
                       pad_token_id=engine.pad_token_id, max_context=engine.context_length)
        try:
            for step in steps:
                if self._cancelled():
                    return
                token = int(step[0])
                self.completion_tokens += 1
                if token == engine.eos_token_id:
                    self.finish_reason = "stop"
                    break
                text, hit = stopper.push(detok.push(token))
                if text:
                    yield text
                if hit:
                    self.finish_reason = "stop"
                    return
        finally:
            steps.close()  # frees the KV cache now, also when the consumer stops early
        text, hit = stopper.push(detok.flush())
        if hit:
            self.finish_reason = "stop"
        else:
            text += stopper.flush()
        if text:
            yield text


class ChatEngine:
    """A loaded model + tokenizer that turns chat messages into prompts and replies.

    Stateless between calls: every `reply` owns its KV cache and random generator, so one engine can serve many
    threads at once.
    """

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer if isinstance(tokenizer, LockedTokenizer) else LockedTokenizer(tokenizer)
        self.config = model.config
        self.context_length = self.config.context_length
        self.eos_token_id = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = 0 if pad is None else pad
        # The shortest possible prompt: the template around one empty user turn. Replies can use the rest.
        self.min_prompt_tokens = len(self.render(None, [{"role": "user", "content": ""}]))
        self.max_reply_tokens = self.context_length - self.min_prompt_tokens

    @property
    def device(self):
        return next(self.model.parameters()).device

    def render(self, system: str | None, turns: Sequence[dict]) -> list[int]:
        messages = ([{"role": "system", "content": system}] if system else []) + list(turns)
        return encode_prompt(self.tokenizer, messages)

    def build_prompt(self, messages: Sequence[dict], budget: int | None = None) -> list[int]:
        """Token ids of the chat template applied to `messages`, at most `budget` tokens long.

        messages: {"role": "system"|"user"|"assistant", "content": str}, ending with a user turn. System messages
        are joined into one at the front (the template only shows a leading one).
        """
        budget = self.context_length if budget is None else budget
        if budget < self.min_prompt_tokens:
            raise ValueError(f"a prompt needs at least {self.min_prompt_tokens} tokens, the budget is {budget}")
        system = "\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"]) or None
        turns = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
        if not turns or turns[-1]["role"] != "user":
            raise ValueError("the conversation must end with a user message")
        ids = self.render(system, turns)
        if len(ids) <= budget:
            return ids

        # Drop whole old turns: start at the earliest user turn that still fits. Fewer turns never means more
        # tokens, so a binary search over the possible starts needs only a few renders even for long histories.
        starts = [i for i, t in enumerate(turns) if t["role"] == "user"]
        lo, hi = 0, len(starts) - 1  # is there a fitting start in starts[lo:]? try the earliest
        best = None
        while lo <= hi:
            mid = (lo + hi) // 2
            candidate = self.render(system, turns[starts[mid]:])
            if len(candidate) <= budget:
                best, hi = candidate, mid - 1
            else:
                lo = mid + 1
        if best is not None:
            return best

        # Only the system prompt and the last user turn are left and they are still too long. The question matters
        # most, so the system prompt is shortened first (keeping its start), then the user's text (keeping its end,
        # where the question usually is).
        system_text, question = system or "", turns[-1]["content"]

        def render_cut(n_system: int, n_question: int) -> list[int]:
            kept_question = question[len(question) - n_question:]
            return self.render(system_text[:n_system], [{"role": "user", "content": kept_question}])

        n_system = self._longest_fit(len(system_text), lambda k: render_cut(k, len(question)), budget)
        if n_system is not None:
            return render_cut(n_system, len(question))
        n_question = self._longest_fit(len(question), lambda k: render_cut(0, k), budget)
        return render_cut(0, n_question or 0)

    @staticmethod
    def _longest_fit(length: int, render, budget: int) -> int | None:
        """The largest k in [0, length] with len(render(k)) <= budget (None if not even 0 fits)."""
        if len(render(0)) > budget:
            return None
        lo, hi = 0, length
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(render(mid)) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def reply(self, prompt_ids: Sequence[int], params: SamplingParams, stop: Sequence[str] = (),
              cancel: threading.Event | None = None) -> Reply:
        return Reply(self, prompt_ids, params, stop=stop, cancel=cancel)
