"""Chat messages -> prompt token ids that fit a token budget, in time linear in the number of messages.

    ids = build_chat_prompt(tokenizer, messages, budget=context_length - max_tokens)
    floor = min_prompt_tokens(tokenizer)     # the template around one empty user turn

The ids are exactly `model.dataset.encode_prompt`'s (how SFT encoded the training data: template markers are whole
special tokens, '<s>'/'</s>' typed in a message stay literal text). A conversation that does not fit loses whole old
turns first, starting from a user turn; the system prompt and the last user turn stay. Only if those two alone are
too long is their text shortened: the system text first (keeping its start), then the user's text (keeping its end,
where the question usually is).

Why this module exists: `encode_prompt` finds each message's text as the difference between renderings of
consecutive prefixes, so it renders every prefix of the conversation twice, and `apply_chat_template` copies and
normalises every message it is handed: O(n^2) in messages (measured on the bundled tokenizer: 200 short messages
0.16 s, 2,000 messages 15 s, almost all of it in `apply_chat_template`; the tokenizer itself is linear), and the
old truncation encoded candidate windows again (ChatEngine.build_prompt with a 512-token budget: 0.25 s -> 25 s;
this module: 6 ms -> 60 ms). Here the template is rendered once per role around a placeholder
(to learn the text around a message's content), the whole conversation is rendered once to check that messages
really render independently of each other, every distinct text is tokenized once, and the earliest turn that fits
is found from per-turn token counts. A template that fails the check is handled by rendering windows as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .dataset import _PROBE, _render, encode_prompt, validate_messages

_EMPTY_USER = [{"role": "user", "content": ""}]


def min_prompt_tokens(tokenizer) -> int:
    """The shortest possible prompt: the template around one empty user turn. Replies can use the rest."""
    return len(encode_prompt(tokenizer, _EMPTY_USER))


def _with_system(system: str | None, turns: Sequence[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + list(turns)


def _encode_batch(tokenizer, texts: list[str], literal: bool) -> dict[str, list[int]]:
    """Token ids of each distinct text, in one tokenizer call (the same ids as one call per text)."""
    unique = [t for t in dict.fromkeys(texts) if t]
    ids = tokenizer(unique, add_special_tokens=False, split_special_tokens=literal)["input_ids"] if unique else []
    return {"": [], **dict(zip(unique, ids))}


def _split_by_role(tokenizer, conversation: Sequence[dict]) -> list[tuple[str, str, str]] | None:
    """(template text before the content, content, template text after) per message, from one placeholder
    rendering per role; None where a role's placeholder does not appear exactly once (the template drops or
    repeats the content, so it cannot be located this way).

    Mirrors `_encode_messages`: an empty content leaves the message's whole text as template text.
    """
    around: dict[str, tuple[str, str] | None] = {}
    parts = []
    for message in conversation:
        role = message["role"]
        if role not in around:
            probe = _render(tokenizer, [{"role": role, "content": _PROBE}])
            around[role] = tuple(probe.split(_PROBE)) if probe.count(_PROBE) == 1 else None
        if around[role] is None:
            return None
        before, after = around[role]
        content = message["content"]
        parts.append((before, content, after) if content else (before + after, "", ""))
    return parts


def _encode_turns(tokenizer, conversation: Sequence[dict]) -> tuple[list[list[int]], list[int]] | None:
    """(token ids of each message, ids of the generation prompt after the last one), equal to what
    `encode_prompt` gives for the whole conversation and for any window of it that starts at a user turn; None if
    this template's messages do not render independently of each other.

    One full rendering checks the per-role split: a template that numbers messages, adds text at the very start
    or changes the content (strip, escape) renders something else and so falls back to rendering windows.
    """
    parts = _split_by_role(tokenizer, conversation)
    rendered = _render(tokenizer, conversation)
    if parts is None or "".join(a + b + c for a, b, c in parts) != rendered:
        return None
    with_header = tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=True)
    if not with_header.startswith(rendered):
        raise ValueError("the chat template's generation prompt does not follow the rendered messages")
    glue = _encode_batch(tokenizer, [t for a, _, c in parts for t in (a, c)] + [with_header[len(rendered):]], False)
    bodies = _encode_batch(tokenizer, [b for _, b, _ in parts], True)
    per_message = [glue[a] + bodies[b] + glue[c] for a, b, c in parts]
    return per_message, glue[with_header[len(rendered):]]


class _Windows:
    """Token ids of the system prompt followed by turns[start:], for any start that is a user turn.

    `extras` (tools, enable_thinking) go to every rendering. With extras, or turns carrying more than text (tool
    calls, tool results, reasoning), the per-role split does not apply (the tools change the system turn, a tool
    call's text is not its content), so windows are rendered whole.
    """

    def __init__(self, tokenizer, system: str | None, turns: Sequence[dict], extras: dict | None = None):
        self.tokenizer, self.system, self.turns, self.extras = tokenizer, system, list(turns), extras or {}
        conversation = _with_system(system, turns)
        validate_messages(conversation, last_role="user")  # the same ValueErrors encode_prompt raises
        plain = not self.extras and all(set(t) == {"role", "content"} and t["role"] != "tool" for t in turns)
        encoded = _encode_turns(tokenizer, conversation) if plain else None
        self._rendered: dict[int, list[int]] = {}
        if encoded is None:
            self.head = None
            return
        per_message, self.tail = encoded
        self.head, self.per_turn = (per_message[0], per_message[1:]) if system else ([], per_message)
        # suffix[i] = tokens of turns[i:]; fewer turns never means more tokens, which the search relies on
        self.suffix = [0] * (len(self.per_turn) + 1)
        for i in range(len(self.per_turn) - 1, -1, -1):
            self.suffix[i] = self.suffix[i + 1] + len(self.per_turn[i])

    def _encode_window(self, start: int) -> list[int]:
        if start not in self._rendered:
            window = _with_system(self.system, self.turns[start:])
            self._rendered[start] = encode_prompt(self.tokenizer, window, **self.extras)
        return self._rendered[start]

    def length(self, start: int) -> int:
        if self.head is None:
            return len(self._encode_window(start))
        return len(self.head) + self.suffix[start] + len(self.tail)

    def ids(self, start: int) -> list[int]:
        if self.head is None:
            return self._encode_window(start)
        return self.head + [t for turn in self.per_turn[start:] for t in turn] + self.tail


def _earliest_fit(starts: list[int], length: Callable[[int], int], budget: int) -> int | None:
    """The first of `starts` whose window fits, by binary search (lengths shrink as the start moves on), so
    the rendering fallback needs only a few renders even for long histories."""
    lo, hi, best = 0, len(starts) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if length(starts[mid]) <= budget:
            best, hi = starts[mid], mid - 1
        else:
            lo = mid + 1
    return best


def _longest_fit(length: int, render: Callable[[int], list[int]], budget: int) -> int | None:
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


def _cut_text(tokenizer, system: str, question: str, budget: int, extras: dict) -> list[int]:
    """Only the system prompt and the last user turn are left and they are still too long: shorten the system text
    (keeping its start), and if that is not enough drop it and shorten the question (keeping its end). Two short
    messages, so rendering them whole for each try is cheap."""
    def render_cut(n_system: int, n_question: int) -> list[int]:
        kept = [{"role": "user", "content": question[len(question) - n_question:]}]
        return encode_prompt(tokenizer, _with_system(system[:n_system], kept), **extras)

    n_system = _longest_fit(len(system), lambda k: render_cut(k, len(question)), budget)
    if n_system is not None:
        return render_cut(n_system, len(question))
    n_question = _longest_fit(len(question), lambda k: render_cut(0, k), budget)
    return render_cut(0, n_question or 0)


def build_chat_prompt(tokenizer, messages: Sequence[dict], budget: int | None = None, tools: list | None = None,
                      enable_thinking: bool | None = None) -> list[int]:
    """Token ids of the chat template applied to `messages`, at most `budget` tokens long (None: no limit).

    messages: {"role": "system"|"user"|"assistant", "content": str}, user and assistant turns alternating and
    ending with a user turn. System messages are joined into one at the front (the template only shows a leading
    one). For a template that knows them (MiniMind-3), assistant turns may carry tool_calls and reasoning_content,
    tool results (role "tool") may follow a turn that called tools and end the conversation, and `tools` and
    `enable_thinking` are passed to the template. ValueError if the budget is below `min_prompt_tokens` or the
    conversation has the wrong shape (or does not fit, when it ends with tool results).
    """
    if budget is not None:
        floor = min_prompt_tokens(tokenizer)
        if budget < floor:
            raise ValueError(f"a prompt needs at least {floor} tokens, the budget is {budget}")
    system = "\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"]) or None
    turns = [dict(m) for m in messages if m["role"] != "system"]
    if not turns or turns[-1]["role"] not in ("user", "tool"):
        raise ValueError("the conversation must end with a user message")  # (or tool results, where rendered)
    extras = {k: v for k, v in (("tools", tools), ("enable_thinking", enable_thinking)) if v is not None}
    windows = _Windows(tokenizer, system, turns, extras)
    if budget is None or windows.length(0) <= budget:
        return windows.ids(0)
    starts = [i for i, t in enumerate(turns) if t["role"] == "user"]
    start = _earliest_fit(starts, windows.length, budget)
    if start is not None:
        return windows.ids(start)
    if turns[-1]["role"] != "user":  # a tool result cut short would mislead the model more than a refusal
        raise ValueError(f"the conversation from the last user message on takes "
                         f"{windows.length(starts[-1] if starts else 0)} tokens, more than the {budget} the prompt "
                         f"may use")
    return _cut_text(tokenizer, system or "", turns[-1]["content"], budget, extras)
