"""A MiniMind-3 reply split into reasoning, answer text and tool calls, the way OpenAI's API returns them.

    parser = ReplyParser(thinking=True, parse_tools=True)
    for piece in reply:                      # text deltas, special tokens decoded
        for event in parser.push(piece):     # ("reasoning", str) | ("content", str) | ("tool_call", dict)
            ...
    events = parser.flush()                  # what was held back at the end
    whole = parse_reply(text, thinking=True) # the same result for a whole text: ParsedReply

The format is the chat template's (model/chat_template3.py): ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}``, then
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks. With thinking on the prompt already ends
with ``<think>\\n``, so the reply starts inside the block. A block whose JSON is not a call (bad JSON, no name, an
unclosed block) is kept as answer text: a small model's slip must reach the client, never fail the request.

Streaming and whole-text parsing are one code path (`parse_reply` feeds the parser once), so a streamed reply
always adds up to the non-streamed one.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
TAGS = (THINK_OPEN, THINK_CLOSE, CALL_OPEN, CALL_CLOSE)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_call(body: str) -> dict | None:
    """The OpenAI tool call ({"id", "type", "function": {"name", "arguments": JSON text}}) in one block's body,
    or None if it is not one."""
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    args = value.get("arguments", {})
    if isinstance(args, str):  # already JSON text (some models write it so): kept only if it is JSON
        try:
            json.loads(args)
        except json.JSONDecodeError:
            return None
    elif isinstance(args, dict):
        args = json.dumps(args, ensure_ascii=False)
    else:
        return None
    return {"id": new_call_id(), "type": "function", "function": {"name": value["name"], "arguments": args}}


def _partial_tag(text: str, tags) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `tags` (held back: the next piece
    may complete the tag)."""
    best = 0
    for tag in tags:
        for k in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:k]):
                best = k
                break
    return best


class ReplyParser:
    """Incremental splitter. States: "reasoning" (inside <think>), "content", "call" (inside <tool_call>).

    Whitespace the template puts around its tags (the newlines after <think>, before </think>, between the answer
    and the calls) is not part of any field, so leading/trailing newlines of reasoning and answer are held back
    until text follows them, and dropped at a tag or at the end.
    """

    def __init__(self, thinking: bool = False, parse_tools: bool = True):
        self.state = "reasoning" if thinking else "content"
        self.parse_tools = parse_tools
        self.buf = ""  # text not yet emitted: a possible partial tag, held whitespace, or a call's body
        self.started = {"reasoning": False, "content": False}  # whether the field has shown any text yet
        self.calls: list[dict] = []

    def _tags(self) -> tuple[str, ...]:
        if self.state == "reasoning":
            return (THINK_CLOSE,)
        if self.state == "call":
            return (CALL_CLOSE,)
        return (THINK_OPEN, CALL_OPEN) if self.parse_tools else (THINK_OPEN,)

    def push(self, text: str) -> list[tuple[str, object]]:
        self.buf += text
        events: list[tuple[str, object]] = []
        while True:
            hits = [(i, tag) for tag in self._tags() if (i := self.buf.find(tag)) >= 0]
            if not hits:
                break
            at, tag = min(hits)
            before, self.buf = self.buf[:at], self.buf[at + len(tag):]
            self._at_tag(before, tag, events)
        if self.state != "call":
            partial = _partial_tag(self.buf, self._tags())
            rest = self.buf[:len(self.buf) - partial]
            keep = partial + len(rest) - len(rest.rstrip("\n"))  # newlines right before a tag are the template's
            self._emit(self.buf[:len(self.buf) - keep], events)
            self.buf = self.buf[len(self.buf) - keep:]
        return events

    def _at_tag(self, before: str, tag: str, events: list) -> None:
        if tag == CALL_CLOSE:
            call = parse_call(before.strip("\n"))
            if call is None:  # not a call after all: the block stays visible as text
                self.state = "content"
                self._emit(CALL_OPEN + before + CALL_CLOSE, events)
            else:
                call["index"] = len(self.calls)
                self.calls.append(call)
                events.append(("tool_call", call))
                self.state = "content"
            return
        self._emit(before.rstrip("\n"), events)  # the template's newlines before a tag belong to neither field
        self.state = {THINK_OPEN: "reasoning", THINK_CLOSE: "content", CALL_OPEN: "call"}[tag]

    def _emit(self, text: str, events: list) -> None:
        kind = self.state if self.state != "call" else "content"
        if not self.started[kind]:
            text = text.lstrip("\n")
        if text:
            self.started[kind] = True
            events.append((kind, text))

    def flush(self) -> list[tuple[str, object]]:
        """The end of the reply: an unclosed call block is answer text; trailing newlines go."""
        events: list[tuple[str, object]] = []
        if self.state == "call":
            self.state = "content"
            self._emit(CALL_OPEN + self.buf, events)
        else:
            self._emit(self.buf.rstrip("\n"), events)
        self.buf = ""
        return events


@dataclass
class ParsedReply:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)


def collect_events(events, into: ParsedReply | None = None) -> ParsedReply:
    into = into or ParsedReply()
    for kind, value in events:
        if kind == "reasoning":
            into.reasoning += value
        elif kind == "content":
            into.content += value
        else:
            into.tool_calls.append(public_call(value))
    return into


def public_call(call: dict) -> dict:
    """A parsed call as a message's tool_calls entry (the streaming index stays in the delta)."""
    return {k: v for k, v in call.items() if k != "index"}


def parse_reply(text: str, thinking: bool = False, parse_tools: bool = True) -> ParsedReply:
    parser = ReplyParser(thinking=thinking, parse_tools=parse_tools)
    return collect_events([*parser.push(text), *parser.flush()])


def as_delta(event: tuple[str, object]) -> dict:
    """One parser event as a streamed chunk's delta."""
    kind, value = event
    if kind == "reasoning":
        return {"reasoning_content": value}
    if kind == "content":
        return {"content": value}
    return {"tool_calls": [value]}  # index, id, type, function: the whole call at once, when its block closed
