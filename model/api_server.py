"""The OpenAI-compatible HTTP API: thin routes over one `ChatEngine`, whose batched engine runs in the background.

    app = build_app(ChatEngine(model, tokenizer, max_batch=16).start(), ServerOptions(model_name="minimind"))
    uvicorn.run(app, host="127.0.0.1", port=8998)

Routes: GET /health, GET /metrics (Prometheus), GET /v1/models[/{id}], POST /v1/chat/completions,
POST /v1/completions. Request parsing and validation live in `model/api_schema.py`; this module turns a valid
request into prompt ids and sampling parameters, submits it, and shapes the engine's events into OpenAI's JSON or
server-sent events. Every error is OpenAI's error object with a 4xx status (5xx only for a failed generation).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api_metrics import ServerMetrics
from .api_schema import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    check_origin,
    error_body,
    parse_request,
    resolve_max_tokens,
    validation_error,
)
from .generate import SamplingParams
from .serving import ChatEngine, ReplyText, token_bytes
from .tool_calls import ParsedReply, ReplyParser, as_delta, collect_events

log = logging.getLogger("minimind.api")


@dataclass
class ServerOptions:
    model_name: str = "minimind"
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_pending: int = 64  # requests waiting for a slot before the server answers 429
    max_body_bytes: int = 1 << 20
    temperature: float = 0.7  # defaults for requests that send none
    top_p: float = 0.9


class Admission:
    """Counts requests from arrival to their last byte; past the limit they get 429 at once.

    Exact under bursts: the check and the count happen with no `await` between them, and every route runs on the
    one event-loop thread, so no two requests can both pass the check for the last place.
    """

    def __init__(self, limit: int):
        self.limit, self.in_flight = limit, 0

    def enter(self) -> None:
        if self.in_flight >= self.limit:
            raise ApiError(429, f"the server is busy ({self.in_flight} requests in progress); try again shortly",
                           type="rate_limit_error", code="server_busy")
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1


def error_response(err: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(error_body(err.message, err.type, err.param, err.code), status_code=err.status,
                        headers=headers)


# ---- the bridge from the engine's thread to the event loop ---------------------------------------------------------

class Generation:
    """One submitted request. `pieces()` yields (text, logprob events) as the engine produces them."""

    def __init__(self, chat: ChatEngine, prompt_ids: list[int], params: SamplingParams, stop: list[str],
                 top_logprobs: int | None, on_done=None, hidden_ids: frozenset[int] | None = None):
        self.loop, self.on_done = asyncio.get_running_loop(), on_done
        self.queue: asyncio.Queue = asyncio.Queue()
        self.text = ReplyText(chat.tokenizer, chat.eos_token_id, stop, hidden_ids=hidden_ids)
        self.prompt_tokens = len(prompt_ids)
        self.handle = None
        self.handle = chat.submit(prompt_ids, params, top_logprobs=top_logprobs, on_event=self._on_event)

    def _on_event(self, out) -> None:  # runs in the engine's thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, out)
            if out.finish_reason is not None and self.on_done is not None:
                self.loop.call_soon_threadsafe(self.on_done, self)
        except RuntimeError:  # the event loop is gone (shutting down): nobody is listening
            if self.handle is not None:
                self.handle.cancel()

    async def pieces(self):
        held = []  # logprob events whose text is still held back (a partial character, a possible stop string)
        try:
            while True:
                out = await self.queue.get()
                if out.finish_reason == "error":
                    raise ApiError(500, f"generation failed: {type(out.error).__name__}", type="server_error",
                                   code="generation_failed")
                if out.token is not None and out.logprob is not None:
                    held.append(out)
                piece, over = self.text.push(out)
                if piece or over:
                    yield piece, held
                    held = []
                if over:
                    return
        finally:
            self.handle.cancel()  # a no-op after the end; frees the slot when the client went away

    @property
    def finish_reason(self) -> str:
        return self.text.finish_reason or "cancelled"

    def usage(self) -> dict:
        done = self.text.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}


# ---- request -> prompt + sampling ---------------------------------------------------------------------------------

def chat_prompt(chat: ChatEngine, options: ServerOptions, req: ChatRequest) -> tuple[list[int], SamplingParams]:
    """Tokenize (called in a thread: a long conversation takes a while) and size the reply.

    A max_tokens that cannot fit beside the shortest possible prompt is refused with how many fit. Otherwise the
    prompt keeps what fits beside min(max_tokens, a quarter of the context), and the reply is capped at what the
    context has left (finish_reason "length").
    """
    if req.tools and not chat.native_tools:  # dropping them silently would answer as if no tools were offered
        raise ApiError(400, "this model's chat template does not support tools (a MiniMind-3 model and tokenizer "
                       "do)", param="tools", code="unsupported_parameter")
    max_tokens = resolve_max_tokens(req, limit=chat.max_reply_tokens, context_length=chat.context_length)
    room = chat.default_reply_room if max_tokens is None else min(max_tokens, chat.default_reply_room)
    native = chat.native_tools
    try:
        prompt_ids = chat.build_prompt(req.prompt_messages(native), chat.context_length - room,
                                       tools=req.prompt_tools() if native else None,
                                       enable_thinking=req.enable_thinking if native else None)
    except ValueError as err:
        raise ApiError(400, str(err), param="messages", code="invalid_value") from None
    left = chat.context_length - len(prompt_ids)
    if left < 1:  # what cannot be cut (the system turn with the tools description) already fills the context
        raise ApiError(400, f"the prompt needs {len(prompt_ids)} tokens even with the oldest turns dropped (the "
                       f"system turn and the tools description stay whole), but the model's context is "
                       f"{chat.context_length}; send fewer or shorter tools or a shorter system prompt",
                       param="tools" if req.tools else "messages", code="context_length_exceeded")
    return prompt_ids, sampling(options, req, left if max_tokens is None else min(max_tokens, left))


def completion_prompt(chat: ChatEngine, req: CompletionRequest) -> tuple[list[int], int]:
    """Plain text continuation (pretrain checkpoints): <s> + the text, whose oldest tokens go if it is too long."""
    max_tokens = req.max_tokens
    if max_tokens > chat.context_length - 2:
        raise ApiError(400, f"max_tokens is {max_tokens}, but the model's context of {chat.context_length} tokens "
                       f"leaves at most {chat.context_length - 2} beside a prompt", param="max_tokens",
                       code="context_length_exceeded")
    text = req.prompt
    keep = chat.context_length - max_tokens - 1  # >= 1, checked above
    ids = chat.tokenizer.encode(text)[-keep:] if text else []
    return [chat.tokenizer.bos_token_id] + ids, max_tokens


def sampling(options: ServerOptions, req, max_new_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=options.temperature if req.temperature is None else req.temperature,
        top_p=options.top_p if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        repetition_penalty=getattr(req, "repetition_penalty", None) or 1.0,
        seed=req.seed,
    )


# ---- response shapes ----------------------------------------------------------------------------------------------

@dataclass
class Envelope:
    """What every response object and chunk of one request carries."""

    object: str
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or f"{'chatcmpl' if self.object.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}"

    def wrap(self, choices: list, **extra) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, **extra}


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def chat_logprobs(tokenizer, events) -> dict:
    def entry(token_id, logprob):
        raw = token_bytes(tokenizer, token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {"content": [entry(e.token, e.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in e.top_logprobs]}
                        for e in events]}


def completion_logprobs(tokenizer, events, offset: int) -> dict:
    """The legacy completions shape: parallel lists, text offsets counted from the start of the returned text."""
    tokens, offsets = [], []
    for e in events:
        tokens.append(token_bytes(tokenizer, e.token).decode("utf-8", errors="replace"))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in events], "text_offset": offsets,
            "top_logprobs": [{token_bytes(tokenizer, t).decode("utf-8", errors="replace"): lp
                              for t, lp in e.top_logprobs} for e in events]}


async def until_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body is already read, so the next message can only be that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(gen: Generation, request: Request) -> tuple[str, list] | None:
    """The whole reply, or None when the client disconnected first (the generation is then cancelled)."""
    parts, events = [], []

    async def read_all():
        async for piece, evs in gen.pieces():
            parts.append(piece)
            events.extend(evs)

    reader, gone = asyncio.ensure_future(read_all()), asyncio.ensure_future(until_disconnect(request))
    try:
        await asyncio.wait({reader, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not reader.done():  # the client left: stop working for it
        reader.cancel()
        gen.handle.cancel()
        return None
    reader.result()  # re-raises a failed generation
    return "".join(parts), events


def chat_choice(key: str, piece, tokenizer, events, want_logprobs: bool, finish_reason=None) -> dict:
    """A choice of a response ("message") or of a chunk ("delta"; piece None for the finish chunk)."""
    if key == "message":
        body = {"role": "assistant", "content": piece}
    else:
        body = {} if piece is None else {"content": piece}
    return {"index": 0, key: body, "logprobs": chat_logprobs(tokenizer, events) if want_logprobs else None,
            "finish_reason": finish_reason}


def parse_reply(text: str, parser: ReplyParser) -> ParsedReply:
    return collect_events([*parser.push(text), *parser.flush()])


def parsed_choice(reply: ParsedReply, tokenizer, events, want_logprobs: bool, finish_reason: str) -> dict:
    """A MiniMind-3 reply as OpenAI's message: content null when the reply only called tools (as OpenAI's)."""
    message = {"role": "assistant", "content": reply.content or (None if reply.tool_calls else ""),
               "reasoning_content": reply.reasoning or None}
    if reply.tool_calls:
        message["tool_calls"] = reply.tool_calls
    return {"index": 0, "message": message, "logprobs": chat_logprobs(tokenizer, events) if want_logprobs else None,
            "finish_reason": "tool_calls" if reply.tool_calls else finish_reason}


class PlainChunks:
    """Stream choices for plain text: one per piece, then the finish choice."""

    def __init__(self, make_choice):
        self.make_choice = make_choice

    def pieces(self, piece: str, events) -> list[dict]:
        return [self.make_choice(piece, events, None)] if piece or events else []

    def final(self, finish_reason: str) -> list[dict]:
        return [self.make_choice(None, [], finish_reason)]


class ParsedChunks:
    """Stream choices for a MiniMind-3 reply: reasoning_content and content deltas as they come, each tool call
    whole once its block closes (a half-written call cannot be told from text), then the finish choice."""

    def __init__(self, parser: ReplyParser, tokenizer, want_logprobs: bool):
        self.parser, self.tokenizer, self.want = parser, tokenizer, want_logprobs

    def _choice(self, delta: dict, events=(), finish_reason=None) -> dict:
        logprobs = chat_logprobs(self.tokenizer, events) if self.want and events else None
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    def pieces(self, piece: str, events) -> list[dict]:
        deltas = [as_delta(e) for e in self.parser.push(piece)]
        if not deltas:  # text held back (a possible tag): its logprobs still go out now
            return [self._choice({}, events)] if self.want and events else []
        return [self._choice(d, events if i == 0 else ()) for i, d in enumerate(deltas)]

    def final(self, finish_reason: str) -> list[dict]:
        tail = [self._choice(as_delta(e)) for e in self.parser.flush()]
        return tail + [self._choice({}, (), "tool_calls" if self.parser.calls else finish_reason)]


async def stream_events(gen: Generation, envelope: Envelope, shaper, include_usage: bool, first=None):
    """Server-sent events: (an opening chunk), the shaper's chunks per text piece, the finish chunk, usage once,
    [DONE].

    Starlette cancels this generator when the client disconnects; `gen.pieces()` then cancels the request.
    """
    if first is not None:
        yield sse(envelope.wrap([first]))
    try:
        async for piece, events in gen.pieces():
            for choice in shaper.pieces(piece, events):
                yield sse(envelope.wrap([choice]))
    except ApiError as err:  # the headers are sent: report in-band, then end the stream normally
        yield sse(error_body(err.message, err.type, err.param, err.code))
        yield "data: [DONE]\n\n"
        return
    *body, last = shaper.final(gen.finish_reason)
    for choice in body:
        yield sse(envelope.wrap([choice]))
    final = envelope.wrap([last])
    if include_usage:  # OpenAI's way: one more chunk with no choices
        yield sse(final)
        yield sse(envelope.wrap([], usage=gen.usage()))
    else:  # many UIs read usage from the last choice chunk
        yield sse(final | {"usage": gen.usage()})
    yield "data: [DONE]\n\n"


def event_stream(body) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- routes -------------------------------------------------------------------------------------------------------

@dataclass
class ServerState:
    chat: ChatEngine
    options: ServerOptions
    admission: Admission
    metrics: ServerMetrics
    started: int = field(default_factory=lambda: int(time.time()))

    def finished(self, gen: Generation) -> None:  # on the event loop, once per submitted request
        self.admission.leave()
        self.metrics.observe_generation(gen.handle)


router = APIRouter()


def server_of(request: Request) -> ServerState:
    return request.app.state.server


def guard(request: Request, auth: bool = True) -> ServerState:
    """Browser pages from other origins are refused (CSRF / DNS rebinding), then the API key is checked."""
    st = server_of(request)
    check_origin(request.headers.get("origin"), st.options.cors_origins, request.headers.get("host"))
    key = st.options.api_key
    if auth and key:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")
    return st


async def read_request(request: Request, limit: int, schema):
    """The body (at most `limit` bytes, whether or not Content-Length says so), parsed and validated."""
    too_big = ApiError(413, f"request body larger than {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return parse_request(schema, bytes(body))


def requested_top_logprobs(req) -> int | None:
    """None: no logprobs; k: the chosen token's logprob and the k likeliest (chat: logprobs + top_logprobs;
    legacy completions: logprobs is the count)."""
    if isinstance(req, ChatRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.logprobs


async def admit(request: Request, schema, prepare):
    """Count the request (429 past the limit), read it, tokenize it in a thread, submit it."""
    st = guard(request)
    st.admission.enter()
    try:
        req = await read_request(request, st.options.max_body_bytes, schema)
        prompt_ids, params = await run_in_threadpool(prepare, st, req)
        hidden = st.chat.hidden_special_ids if schema is ChatRequest else None  # chat replies show <think> etc.
        gen = Generation(st.chat, prompt_ids, params, req.stop, requested_top_logprobs(req), on_done=st.finished,
                         hidden_ids=hidden)
    except BaseException:
        st.admission.leave()
        raise
    return st, req, gen


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    st, req, gen = await admit(request, ChatRequest, lambda st, req: chat_prompt(st.chat, st.options, req))
    tok, want = st.chat.tokenizer, req.logprobs
    # MiniMind-3 replies are split into reasoning, content and tool calls; v1 replies are plain content
    parser = ReplyParser(thinking=bool(req.enable_thinking), parse_tools=req.parse_tool_calls) \
        if st.chat.native_tools else None
    if req.stream:
        envelope = Envelope("chat.completion.chunk", st.options.model_name)
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        shaper = ParsedChunks(parser, tok, want) if parser else \
            PlainChunks(lambda p, ev, fr: chat_choice("delta", p, tok, ev, want, fr))
        return event_stream(stream_events(gen, envelope, shaper, req.include_usage, first))
    result = await collect(gen, request)
    if result is None:
        return JSONResponse(error_body("client disconnected", "invalid_request_error"), status_code=499)
    text, events = result
    envelope = Envelope("chat.completion", st.options.model_name)
    if parser is None:
        choice = chat_choice("message", text, tok, events, want, gen.finish_reason)
    else:
        choice = parsed_choice(parse_reply(text, parser), tok, events, want, gen.finish_reason)
    return envelope.wrap([choice], usage=gen.usage())


def completion_choice(tokenizer, piece, events, want: bool, finish_reason, offset: int = 0) -> dict:
    return {"index": 0, "text": piece or "", "finish_reason": finish_reason,
            "logprobs": completion_logprobs(tokenizer, events, offset) if want else None}


@router.post("/v1/completions")
async def completions(request: Request):
    def prepare(st, req):
        ids, max_tokens = completion_prompt(st.chat, req)
        return ids, sampling(st.options, req, max_tokens)

    st, req, gen = await admit(request, CompletionRequest, prepare)
    tok, want = st.chat.tokenizer, req.logprobs is not None
    envelope = Envelope("text_completion", st.options.model_name)
    if req.stream:
        shaper = PlainChunks(lambda p, ev, fr: completion_choice(tok, p, ev, want, fr))
        return event_stream(stream_events(gen, envelope, shaper, req.include_usage))
    result = await collect(gen, request)
    if result is None:
        return JSONResponse(error_body("client disconnected", "invalid_request_error"), status_code=499)
    text, events = result
    return envelope.wrap([completion_choice(tok, text, events, want, gen.finish_reason)], usage=gen.usage())


@router.get("/health")
async def health(request: Request):
    st = server_of(request)
    engine = st.chat.engine
    return {"status": "ok", "model": st.options.model_name, "running": engine.num_active,
            "pending": engine.num_waiting, "in_flight": st.admission.in_flight,
            "requests": engine.stats.requests, "completion_tokens": engine.stats.tokens_generated,
            "steps": engine.stats.steps}


@router.get("/metrics")
async def metrics(request: Request):
    st = guard(request, auth=False)  # counts only; scrapers rarely send keys
    return Response(st.metrics.render(), media_type=st.metrics.content_type)


def model_card(st: ServerState) -> dict:
    return {"id": st.options.model_name, "object": "model", "created": st.started, "owned_by": "minimind"}


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [model_card(guard(request))]}


@router.get("/v1/models/{model_id}")
async def get_model(model_id: str, request: Request):
    st = guard(request)
    if model_id != st.options.model_name:
        raise ApiError(404, f"model '{model_id}' does not exist (this server has '{st.options.model_name}')",
                       param="model", code="model_not_found")
    return model_card(st)


# ---- the app ------------------------------------------------------------------------------------------------------

def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, err: ApiError):
        return error_response(err)

    async def on_validation_error(request: Request, err: RequestValidationError):
        return error_response(validation_error(err))

    async def on_http_error(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return error_response(ApiError(err.status_code, str(err.detail), code=code))

    async def on_crash(request: Request, err: Exception):  # a bug, not bad input: still a well-formed answer
        log.exception("unhandled error")
        return error_response(ApiError(500, f"internal error: {type(err).__name__}", type="server_error",
                                       code="internal_error"))

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_crash)


class RequestCounter:
    """Counts answered requests by path and status. Plain ASGI (not BaseHTTPMiddleware), so streaming responses
    and disconnect detection pass through untouched."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


KNOWN_PATHS = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}


def build_app(chat: ChatEngine, options: ServerOptions) -> FastAPI:
    """The app over a started ChatEngine. Admission: the engine's batch plus `max_pending` waiting requests."""
    app = FastAPI(title="MiniMind OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    state = ServerState(chat, options, Admission(chat.engine.max_batch + options.max_pending),
                        ServerMetrics(chat.engine))
    app.state.server = state
    install_error_handlers(app)
    if options.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=options.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    app.add_middleware(RequestCounter, metrics=state.metrics)
    app.include_router(router)
    return app
