"""The HTTP API's requests: JSON parsing, OpenAI-shaped errors, request models and their checks.

    req = parse_request(ChatRequest, body_bytes)       # ApiError (4xx) for anything malformed
    messages = req.prompt_messages()                   # roles mapped, merged, ending with a user turn
    max_tokens = resolve_max_tokens(req, limit=max_reply_tokens, context_length=context_length)
    check_origin(request.headers.get("origin"), args.cors_origins, host=request.headers.get("host"))

Every refusal is an ApiError whose `body()` is OpenAI's {"error": {"message", "type", "param", "code"}}, so any
OpenAI client shows it. Nothing a client sends should reach the model code in a shape that can raise later (a lone
surrogate breaks the tokenizer, NaN breaks sampling, a 10,000-deep array breaks the JSON parser's recursion), so
the parser refuses all of it up front.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from itertools import accumulate
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

MAX_JSON_DEPTH = 64  # real requests nest 4-5 levels (body > messages > message > content parts > part)
MAX_INT_DIGITS = 100  # far beyond any real field (seeds are < 2**64: 20 digits); int() of huge text is slow

# ----------------------------------------------------------------------------------------------------------------
# Errors


class ApiError(Exception):
    """A refusal with its HTTP status, in OpenAI's error vocabulary (param names the offending field)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error(err: ValidationError) -> ApiError:
    """The first pydantic complaint as a 400 naming its field path, e.g. "messages.0.content" (FastAPI would answer
    422 with its own shape). Also takes FastAPI's RequestValidationError, whose paths start with "body"."""
    errors = err.errors()
    first = errors[0] if errors else {}
    param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
    message = str(first.get("msg", "invalid request"))
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return ApiError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


# ----------------------------------------------------------------------------------------------------------------
# JSON

class _Refused(ValueError):
    """Raised from inside json.loads by the number hooks; its text is the whole client-facing message."""


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)  # an unterminated string runs to the end
_BRACKET = re.compile(r"[\[\]{}]")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # the only way valid UTF-8 JSON can carry one


def _nesting_depth(text: str) -> int:
    """How deep arrays/objects nest, counted without parsing: json.loads recurses per level and would hit
    RecursionError (or worse, a C stack overflow) long before it could report the depth itself."""
    brackets = _BRACKET.findall(_STRING.sub('""', text))
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def _refuse_constant(name: str):
    raise _Refused(f"the body is not valid JSON: {name} is not a JSON number")


def _parse_int(text: str) -> int:
    if len(text) - text.startswith("-") > MAX_INT_DIGITS:
        raise _Refused(f"the body has an integer with more than {MAX_INT_DIGITS} digits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf, as bad as the Infinity literal
        raise _Refused(f"the body has a number out of range: {text[:40]}")
    return value


def _printable(text: str) -> str:
    """`text` with lone surrogates written as \\udXXX escapes: an error message must itself encode as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _lone_surrogate_path(value: Any) -> str | None:
    """The path ("messages.0.content") of the first string or key holding a lone surrogate, else None. Walked
    with a stack, not recursion, though the depth is already bounded."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return path or "(the body)"
        elif isinstance(item, (dict, list)):
            pairs = list(item.items()) if isinstance(item, dict) else list(enumerate(item))
            for key, _ in pairs:
                if isinstance(key, str) and _printable(key) != key:
                    return f"{path}.{_printable(key)}" if path else _printable(key)
            stack.extend((child, f"{path}.{key}" if path else str(key)) for key, child in reversed(pairs))
    return None


def parse_json_body(body: bytes) -> Any:
    """The parsed body, or ApiError 400 code "invalid_json" for invalid UTF-8 or JSON, NaN/Infinity, integers
    over MAX_INT_DIGITS digits, nesting deeper than MAX_JSON_DEPTH, or a lone surrogate ("\\ud800") in any string,
    which json.loads accepts but no tokenizer can encode."""
    def refuse(message: str, param: str | None = None) -> ApiError:
        return ApiError(400, message, param=param, code="invalid_json")

    try:
        text = bytes(body).decode("utf-8-sig")  # a leading BOM is allowed (RFC 8259 says parsers may ignore it)
    except UnicodeDecodeError as err:
        raise refuse(f"the body is not valid JSON: it is not UTF-8 text (bad byte at offset {err.start})") from None
    depth = _nesting_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise refuse(f"the body nests arrays/objects {depth} levels deep; at most {MAX_JSON_DEPTH} are allowed")
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_int=_parse_int, parse_float=_parse_float)
    except _Refused as err:
        raise refuse(str(err)) from None
    except json.JSONDecodeError as err:
        raise refuse(f"the body is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    except ValueError as err:  # e.g. Python's own int-size limit, should a hook above ever let one through
        raise refuse(f"the body is not valid JSON: {err}") from None
    if _SURROGATE_ESCAPE.search(text):
        path = _lone_surrogate_path(value)
        if path is not None:
            raise refuse(f"{path}: the text contains a lone UTF-16 surrogate escape (like \\ud800), which is not "
                         "a character", param=path if path != "(the body)" else None)
    return value


# ----------------------------------------------------------------------------------------------------------------
# Request models. Unknown fields are ignored (clients send many); known ones are typed strictly: "1" or true is
# not a number (pydantic would coerce them), but an integer is a fine float, as in OpenAI's API.

class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _text_content(value: Any) -> str:
    """A message's content as text: a string, or OpenAI's list of parts when every part is text (joined as is)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else None
                got = f" (got a part of type {kind!r})" if isinstance(kind, str) else ""
                raise ValueError(f"content parts must be {{'type': 'text', 'text': str}}; only text is supported{got}")
        return "".join(part["text"] for part in value)
    raise ValueError("content must be a string or a non-empty list of text parts")


class FunctionCall(_Strict):
    name: str = Field(strict=True, min_length=1)
    arguments: str | dict = "{}"  # OpenAI sends JSON text; an object is accepted too (the template takes both)


class ToolCall(_Strict):
    """An assistant message's earlier call, as the client got it from this server (or any OpenAI API)."""
    id: str | None = Field(None, strict=True)
    type: Literal["function"] = "function"
    # Optional here because a template without tools ignores calls; one that renders them refuses a call
    # without a function when the prompt is encoded
    function: FunctionCall | None = None


class FunctionDef(_Strict):
    name: str = Field(strict=True, pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
    description: str | None = Field(None, strict=True)
    parameters: dict | None = None  # a JSON schema, shown to the model as is
    strict: bool | None = Field(None, strict=True)


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class ChatMessage(_Strict):
    # "developer" is what newer OpenAI clients send instead of "system"; "tool" results become user turns
    # (for a template without tool support, see prompt_messages)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = Field(None, validate_default=True)
    reasoning_content: str | None = Field(None, strict=True)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(None, strict=True)

    @field_validator("content", mode="before")
    @classmethod
    def content_is_text(cls, value: Any, info: ValidationInfo) -> str | None:
        if value is None:
            if info.data.get("role") == "assistant":  # an assistant turn that only called tools
                return None
            raise ValueError("content is required: a string or a list of text parts")
        return _text_content(value)


class StreamOptions(_Strict):
    include_usage: bool | None = Field(None, strict=True)


def _stop_strings(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise ValueError("stop must be a string or a list of at most 4 strings")
    return stops


def _only_one(name: str, value: int | None) -> int | None:
    if value is not None and value != 1:
        raise ValueError(f"only {name}=1 is supported")
    return value


class _SamplingRequest(_Strict):
    """Fields both endpoints share. top_k and repetition_penalty are extensions (as in vLLM): top_k 0 and
    repetition_penalty 1 mean off. frequency_penalty and presence_penalty are OpenAI's and only range-checked here:
    whether the sampler applies them is the server's choice (MiniMind's sampler has none, so they are ignored)."""
    model: str | None = Field(None, strict=True)
    temperature: float | None = Field(None, strict=True, ge=0, le=2)
    top_p: float | None = Field(None, strict=True, gt=0, le=1)
    top_k: int | None = Field(None, strict=True, ge=0)
    repetition_penalty: float | None = Field(None, strict=True, gt=0)
    frequency_penalty: float | None = Field(None, strict=True, ge=-2, le=2)
    presence_penalty: float | None = Field(None, strict=True, ge=-2, le=2)
    stream: bool | None = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    stop: Any = Field(None, validate_default=True)  # normalised to a list of strings
    seed: int | None = Field(None, strict=True, ge=-(2**63), lt=2**64)  # what torch.Generator accepts
    n: int | None = Field(None, strict=True)
    user: str | None = Field(None, strict=True)  # OpenAI's end-user id; accepted and ignored

    @field_validator("stop", mode="before")
    @classmethod
    def stop_strings(cls, stop: Any) -> list[str]:
        return _stop_strings(stop)

    @field_validator("n")
    @classmethod
    def only_one_choice(cls, n: int | None) -> int | None:
        return _only_one("n", n)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _merge(messages: Sequence[dict]) -> list[dict]:
    """`merge_consecutive_messages`, raising ValueError (what pydantic validators must raise)."""
    systems: list[str] = []
    turns: list[dict] = []
    for message in messages:
        role = {"developer": "system", "tool": "user"}.get(message["role"], message["role"])
        content = message.get("content") or ""
        if role == "system":
            systems += [content] if content else []
        elif turns and turns[-1]["role"] == role:
            if content:  # empty pieces would only add blank lines
                previous = turns[-1]["content"]
                turns[-1]["content"] = f"{previous}\n{content}" if previous else content
        else:
            turns.append({"role": role, "content": content})
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("the last message must have role 'user'")
    return ([{"role": "system", "content": "\n".join(systems)}] if systems else []) + turns


def merge_consecutive_messages(messages: Sequence[dict]) -> list[dict]:
    """OpenAI-style messages ({"role", "content": str | None}) as the chat template wants them: one leading system
    message collecting every system/developer message in order (the template shows only a leading one), then
    user/assistant turns, consecutive same-role messages joined with "\\n" (as other OpenAI-compatible servers do).
    Tool results become user turns: the model was never trained on a tool role, and a tool's output is input for
    the next reply. A null content (an assistant turn that only called tools) counts as empty.

    ApiError 400 (param "messages") unless the result ends with a user turn.
    """
    try:
        return _merge(messages)
    except ValueError as err:
        raise ApiError(400, f"messages: {err}", param="messages", code="invalid_value") from None


class ChatRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, strict=True)
    max_completion_tokens: int | None = Field(None, strict=True)  # the newer name for max_tokens; wins
    logprobs: bool | None = Field(None, strict=True)
    top_logprobs: int | None = Field(None, strict=True, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Any = Field(None, validate_default=True)
    enable_thinking: bool | None = Field(None, strict=True)  # MiniMind-3's template switch (off by default)

    @field_validator("messages")
    @classmethod
    def ends_with_user_turn(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not messages:
            raise ValueError("must contain at least one message")
        _merge([m.model_dump() for m in messages])
        return messages

    @field_validator("tool_choice", mode="before")
    @classmethod
    def supported_tool_choice(cls, value: Any) -> str | None:
        # "required" and a named function need constrained decoding, which this server does not do: refusing
        # them is better than a reply that silently ignores the constraint
        if value is None or value in ("auto", "none"):
            return value
        raise ValueError("only 'auto' and 'none' are supported")

    @field_validator("top_logprobs")
    @classmethod
    def needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("logprobs") is not True:
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    def prompt_messages(self, native_tools: bool = False) -> list[dict]:
        """The messages for the chat template: for one that renders tool calls, tool results and reasoning
        (native_tools), in that structure (`native_messages`); otherwise merged as text
        (see merge_consecutive_messages)."""
        if native_tools:
            return native_messages(self.messages)
        return merge_consecutive_messages([m.model_dump() for m in self.messages])

    def prompt_tools(self) -> list[dict] | None:
        """The tools to describe in the prompt. None with tool_choice "none": a model that is not told about
        tools cannot call one, and its reply is then never parsed as calls anyway."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    @property
    def parse_tool_calls(self) -> bool:
        return self.tool_choice != "none"


def _native_message(message: ChatMessage) -> dict:
    out = {"role": "system" if message.role == "developer" else message.role, "content": message.content or ""}
    if message.role == "assistant":
        if message.reasoning_content is not None:
            out["reasoning_content"] = message.reasoning_content
        if message.tool_calls:
            out["tool_calls"] = [c.model_dump(exclude_none=True) for c in message.tool_calls]
    if message.role == "tool" and message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def native_messages(messages: Sequence[ChatMessage]) -> list[dict]:
    """Messages for a template that knows tools: one leading system message (every system/developer message,
    in order: the template shows only a leading one), consecutive user messages joined with "\\n", and assistant
    tool calls, reasoning and tool results kept as fields. The order itself is checked where the prompt is
    encoded (model.dataset.validate_messages)."""
    systems = [m.content for m in messages if m.role in ("system", "developer") and m.content]
    turns: list[dict] = []
    for message in messages:
        if message.role in ("system", "developer"):
            continue
        out = _native_message(message)
        if out["role"] == "user" and turns and turns[-1]["role"] == "user":
            turns[-1]["content"] = "\n".join(t for t in (turns[-1]["content"], out["content"]) if t)
        else:
            turns.append(out)
    return ([{"role": "system", "content": "\n".join(systems)}] if systems else []) + turns


def _prompt(value: Any) -> str:
    # Token-id prompts are refused rather than supported: text is what every client sends, and ids would need
    # checking against the vocabulary the schema does not know.
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, str) for p in value):
        raise ValueError("only one prompt per request is supported")
    if isinstance(value, list) and value and all(type(t) is int for t in value):
        raise ValueError("token-id prompts are not supported; send the text")
    raise ValueError("prompt must be a string or a list of one string")


class CompletionRequest(_SamplingRequest):
    """/v1/completions (legacy): plain text in, text out. prompt is normalised to one string; max_tokens defaults
    to 16 as in OpenAI's API (also when sent as null) and must be at least 1."""
    prompt: Any
    max_tokens: int = Field(16, strict=True, ge=1)
    logprobs: int | None = Field(None, strict=True, ge=0, le=5)  # here: how many top logprobs per token
    echo: bool | None = Field(False, strict=True)
    suffix: Any = None
    best_of: int | None = Field(None, strict=True)

    @field_validator("prompt", mode="before")
    @classmethod
    def one_prompt(cls, value: Any) -> str:
        return _prompt(value)

    @field_validator("max_tokens", mode="before")
    @classmethod
    def default_when_null(cls, value: Any) -> Any:
        return 16 if value is None else value

    @field_validator("echo")
    @classmethod
    def no_echo(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("echo=true is not supported")
        return value

    @field_validator("suffix", mode="before")
    @classmethod
    def no_suffix(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("suffix is not supported (this model does not fill in the middle)")
        return None

    @field_validator("best_of")
    @classmethod
    def only_best_of_one(cls, value: int | None) -> int | None:
        return _only_one("best_of", value)


Request = TypeVar("Request", bound=BaseModel)


def parse_request(model: type[Request], body: bytes) -> Request:
    """The body parsed and validated as `model`, or ApiError 400 (the first complaint, naming its field)."""
    payload = parse_json_body(body)
    if not isinstance(payload, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(payload), "a number")
        raise ApiError(400, f"the body must be a JSON object, got {kind}", code="invalid_value")
    try:
        return model.model_validate(payload)
    except ValidationError as err:
        raise validation_error(err) from None


def max_tokens_param(req: BaseModel) -> str:
    """Which field sets the reply length: max_completion_tokens (the newer name) wins over max_tokens."""
    return "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"


def resolve_max_tokens(req: BaseModel, limit: int | None = None, context_length: int | None = None) -> int | None:
    """The reply length asked for: max_completion_tokens if given, else max_tokens; None (or -1) means as many as
    fit. ApiError 400 naming the field if it is below 1, or above `limit` (the most the context leaves)."""
    param = max_tokens_param(req)
    value = getattr(req, param, None)
    if value is None or value == -1:
        return None
    if value < 1:
        raise ApiError(400, f"{param} must be at least 1 (or -1 for as many as fit), got {value}", param=param,
                       code="invalid_value")
    if limit is not None and value > limit:
        context = f"the model's context of {context_length} tokens" if context_length else "the model's context"
        raise ApiError(400, f"{param} is {value}, but {context} leaves at most {limit} for a reply", param=param,
                       code="context_length_exceeded")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Browser origins

def check_origin(origin: str | None, allowed: Sequence[str], host: str | None = None) -> None:
    """ApiError 403 for a request whose Origin header is not in `allowed` ("*" allows any); no Origin header (curl,
    SDKs) and a page served by this server itself (Origin http(s)://{Host}) are fine.

    CORS headers alone are not enough: they only stop a foreign page from *reading* the answer, while its
    "simple" cross-site POST (text/plain, no preflight) still reaches the server and starts a generation, and a
    DNS-rebinding page can reach a server bound to 127.0.0.1. Refusing unknown origins stops both.
    """
    if origin is None:
        return
    allowed_set = {a.strip().rstrip("/") for a in allowed}
    if "*" in allowed_set or origin in allowed_set:
        return
    if host and origin.lower() in (f"http://{host.lower()}", f"https://{host.lower()}"):
        return
    raise ApiError(403, f"requests from origin {origin!r} are not allowed; start the server with "
                        f"--cors_origins {origin} to allow it", code="origin_not_allowed")
