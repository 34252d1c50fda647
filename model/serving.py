"""Chat serving helpers shared by my_openai_api.py (HTTP) and fast_inference.py (streamlit).

    engine = ChatEngine(load_model(ckpt, config), load_tokenizer())
    prompt_ids = engine.build_prompt(messages, budget=engine.context_length - 256)
    reply = engine.reply(prompt_ids, SamplingParams(max_new_tokens=256, temperature=0.7), stop=["\\n\\n"])
    for piece in reply:           # text deltas made of whole characters
        print(piece, end="")
    reply.finish_reason, reply.completion_tokens    # "stop" | "length" | "cancelled", tokens generated

A prompt that does not fit is cut by tokens (`model/chat_prompt.py`): whole old turns go first (the system prompt and
the last user turn stay), and only if those two alone are still too long is their text shortened. Prompts are
encoded as SFT encoded the training data (template markers are whole special tokens, '<s>'/'</s>' typed in a
message stay literal text), so their markers are never cut in half.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

from .chat_prompt import build_chat_prompt, min_prompt_tokens
from .engine import Engine, RequestHandle, StepOutput
from .generate import SamplingParams, Utf8Detokenizer
from .tool_calls import TAGS as REPLY_TAGS


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


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE shows each byte as one printable character: bytes that are printable Latin-1 stand for
    themselves, the other 68 are moved to U+0100 onwards in byte order. Returns character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(moved)}


BYTE_OF_CHAR = _byte_level_alphabet()


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The raw bytes a token stands for (a special token: its text), for OpenAI's logprobs `bytes` field."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if piece is None:
        return b""
    if int(token_id) in tokenizer.all_special_ids or any(ch not in BYTE_OF_CHAR for ch in piece):
        return piece.encode("utf-8")
    return bytes(BYTE_OF_CHAR[ch] for ch in piece)


def template_supports_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders tool calls (MiniMind-3's does, v1's shows only content)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tool_call" in template


def special_ids_except(tokenizer, shown: Sequence[str]) -> frozenset[int]:
    """Ids of the tokenizer's special tokens, except those spelled as in `shown`."""
    keep = {tokenizer.convert_tokens_to_ids(t) for t in shown}
    return frozenset(int(i) for i in tokenizer.all_special_ids if i not in keep) | frozenset(
        int(i) for i, tok in tokenizer.added_tokens_decoder.items() if tok.special and int(i) not in keep)


class ReplyText:
    """Turns a request's StepOutputs into text deltas: whole UTF-8 characters, EOS hidden, cut at stop strings.

    After the last push, `finish_reason` ("stop" | "length" | "cancelled" | "error") and `completion_tokens` (every
    token the model produced, the final EOS included) are set. A stop-string hit ends the text: the caller then
    cancels the request so its slot is freed.
    """

    def __init__(self, tokenizer, eos_token_id: int, stop: Sequence[str] = (),
                 hidden_ids: frozenset[int] | None = None):
        # hidden_ids: special tokens never shown, the rest decoded as their text (MiniMind-3's <think> and
        # <tool_call> are special tokens that the reply parser must see); None: every special token is hidden
        keep_special = hidden_ids is not None
        self.detok = Utf8Detokenizer(tokenizer, skip_special_tokens=not keep_special)
        self.stopper, self.eos, self.hidden = StopMatcher(stop), eos_token_id, hidden_ids or frozenset()
        self.finish_reason: str | None = None
        self.completion_tokens = 0

    def push(self, out: StepOutput) -> tuple[str, bool]:
        """(text to show now, whether the reply is over)."""
        text, hit = "", False
        if out.token is not None:
            self.completion_tokens += 1
            if out.token != self.eos and out.token not in self.hidden:
                text, hit = self.stopper.push(self.detok.push(out.token))
        if hit:
            self.finish_reason = "stop"
            return text, True
        if out.finish_reason is None:
            return text, False
        self.finish_reason = out.finish_reason
        tail, hit = self.stopper.push(self.detok.flush())
        return text + tail + ("" if hit else self.stopper.flush()), True


class Reply:
    """One generated reply. Iterate it for text deltas; afterwards `finish_reason` and `completion_tokens` are set.

    `completion_tokens` never exceeds `max_new_tokens` and equals it when `finish_reason` is "length". Setting
    `cancel` (a threading.Event) stops generation before the next token and frees the slot.
    """

    def __init__(self, chat: ChatEngine, prompt_ids: Sequence[int], params: SamplingParams,
                 stop: Sequence[str] = (), cancel: threading.Event | None = None):
        self.chat, self.prompt_ids, self.params = chat, list(prompt_ids), params
        self.stop, self.cancel = list(stop), cancel
        self.finish_reason: str | None = None
        self.completion_tokens = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def __iter__(self) -> Iterator[str]:
        # A chat reply shows the reply format's tags (MiniMind-3's <think>, <tool_call>) for the parser to split on
        text = ReplyText(self.chat.tokenizer, self.chat.eos_token_id, self.stop, hidden_ids=self.chat.hidden_special_ids)
        handle = self.chat.submit(self.prompt_ids, self.params)
        try:
            for out in handle:
                if self.cancel is not None and self.cancel.is_set():
                    text.finish_reason = "cancelled"
                    return
                piece, over = text.push(out)
                if piece:
                    yield piece
                if over:
                    return
        finally:
            handle.cancel()  # no-op when it already ended; frees the slot when the consumer stopped early
            self.finish_reason, self.completion_tokens = text.finish_reason or "cancelled", text.completion_tokens


class ChatEngine:
    """A loaded model + tokenizer that turns chat messages into prompts, and prompts into replies generated by the
    one batched `Engine` (started in the background with `start()` for a server; otherwise each reply drives it).
    """

    def __init__(self, model, tokenizer, max_batch: int = 16, prefill_chunk: int = 512):
        self.model = model
        self.tokenizer = tokenizer if isinstance(tokenizer, LockedTokenizer) else LockedTokenizer(tokenizer)
        self.config = model.config
        self.context_length = self.config.context_length
        self.eos_token_id = self.tokenizer.eos_token_id
        # The shortest possible prompt: the template around one empty user turn. Replies can use the rest.
        self.min_prompt_tokens = min_prompt_tokens(self.tokenizer)
        self.max_reply_tokens = self.context_length - self.min_prompt_tokens
        # Replies without max_tokens may use what the prompt leaves, but old turns are dropped to leave them room.
        self.default_reply_room = max(1, min(self.max_reply_tokens, self.context_length // 4))
        self.engine = Engine(model, max_batch=max_batch, prefill_chunk=prefill_chunk)
        self.native_tools = template_supports_tools(self.tokenizer)
        # Which special tokens a chat reply shows: the reply format's tags, for a template that uses them
        self.hidden_special_ids = special_ids_except(self.tokenizer, REPLY_TAGS) if self.native_tools else None

    def start(self) -> ChatEngine:
        self.engine.start()
        return self

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, top_logprobs: int | None = None,
               on_event=None) -> RequestHandle:
        return self.engine.submit(prompt_ids, params, eos_token_id=self.eos_token_id, top_logprobs=top_logprobs,
                                  on_event=on_event)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def build_prompt(self, messages: Sequence[dict], budget: int | None = None, tools: list | None = None,
                     enable_thinking: bool | None = None) -> list[int]:
        """Token ids of the chat template applied to `messages`, at most `budget` tokens (default the context);
        see `model.chat_prompt.build_chat_prompt` for what is cut first."""
        return build_chat_prompt(self.tokenizer, messages, self.context_length if budget is None else budget,
                                 tools=tools, enable_thinking=enable_thinking)

    def reply(self, prompt_ids: Sequence[int], params: SamplingParams, stop: Sequence[str] = (),
              cancel: threading.Event | None = None) -> Reply:
        return Reply(self, prompt_ids, params, stop=stop, cancel=cancel)
