"""Serve a MiniMind checkpoint behind an OpenAI-compatible chat API (FastAPI + uvicorn).

    python my_openai_api.py --ckpt out/full_sft_512.pth                      # http://127.0.0.1:8998/v1
    python my_openai_api.py --ckpt out/full_sft_512_moe.pth --api_key sk-local --port 8000

    curl http://127.0.0.1:8998/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "minimind", "messages": [{"role": "user", "content": "你好"}], "stream": true}'

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions (stream or not). Any OpenAI client or chat UI
(Open-WebUI, FastGPT, chat_openai_api.py) can use it with base URL http://HOST:PORT/v1.

Each request generates in its own worker thread with its own KV cache, at most --max_concurrent at a time (the rest
wait in line, and past --max_pending the server answers 429). A client that disconnects stops its generation before
the next token. Every error is OpenAI's JSON shape with a 4xx status. The server binds 127.0.0.1 unless told
otherwise, sends no CORS headers unless --cors_origins lists origins, and with --api_key (or $MINIMIND_API_KEY)
requires `Authorization: Bearer KEY` on /v1/.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.checkpoint import OUT_DIR, default_device, find_checkpoint, load_model, load_tokenizer, resolve_dtype
from model.errors import UsageError, exit_on_usage_error
from model.generate import SamplingParams
from model.LMConfig import add_model_args, model_flags
from model.serving import ChatEngine

log = logging.getLogger("minimind.api")


# ----------------------------------------------------------------------------------------------------------------
# Errors: always {"error": {"message", "type", "param", "code"}}, the shape OpenAI clients know how to show.

class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(err: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(error_body(err.message, err.type, err.param, err.code), status_code=err.status,
                        headers=headers)


def validation_error(err: ValidationError | RequestValidationError) -> ApiError:
    """The first pydantic complaint as a 400 (FastAPI would answer 422 with its own shape)."""
    first = err.errors()[0]
    param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return ApiError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


# ----------------------------------------------------------------------------------------------------------------
# The request: OpenAI's fields that mean something for this model. Unknown fields are ignored.

class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # "developer" is what newer OpenAI clients send instead of "system".
    role: Literal["system", "developer", "user", "assistant"]
    content: Any

    @field_validator("content", mode="before")
    @classmethod
    def content_is_text(cls, value):
        if isinstance(value, str):
            return value
        # OpenAI also allows a list of parts; text parts are just text, anything else (images) is not supported.
        if isinstance(value, list) and value and all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
            return "".join(p["text"] for p in value)
        raise ValueError("content must be a string (or a list of text parts)")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage]
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # the newer name for max_tokens
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Any = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator accepts
    n: int | None = None

    @field_validator("messages")
    @classmethod
    def has_user_turn(cls, messages):
        if not messages:
            raise ValueError("must contain at least one message")
        if messages[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        return messages

    @field_validator("stop")
    @classmethod
    def stop_strings(cls, stop) -> list[str]:
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
            raise ValueError("stop must be a string or a list of at most 4 strings")
        return stops

    @field_validator("n")
    @classmethod
    def only_one_choice(cls, n):
        if n is not None and n != 1:
            raise ValueError("only n=1 is supported")
        return n


# ----------------------------------------------------------------------------------------------------------------
# The app.

def build_app(engine: ChatEngine, args: argparse.Namespace) -> FastAPI:
    app = FastAPI(title="MiniMind OpenAI-compatible API", docs_url=None, redoc_url=None)
    executor = ThreadPoolExecutor(max_workers=args.max_concurrent, thread_name_prefix="generate")
    started = int(time.time())
    stats = {"pending": 0, "running": 0, "completion_tokens": 0, "requests": 0}
    stats_lock = threading.Lock()
    # Replies without max_tokens may use what the prompt leaves, but old turns are dropped to leave them room.
    default_reply_room = max(1, min(engine.max_reply_tokens, engine.context_length // 4))

    if args.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=args.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, err: ApiError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, err: RequestValidationError):
        return error_response(validation_error(err))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return error_response(ApiError(err.status_code, str(err.detail), code=code))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, err: Exception):  # a bug, not bad input: still a well-formed answer
        log.exception("unhandled error")
        return error_response(ApiError(500, f"internal error: {type(err).__name__}", type="server_error",
                                       code="internal_error"))

    def check_auth(request: Request):
        if not args.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), args.api_key.encode()):
            raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        """The body, refusing more than --max_body_bytes whether or not Content-Length says so (chunked)."""
        limit = args.max_body_bytes
        too_big = ApiError(413, f"request body larger than {limit} bytes", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise ApiError(400, f"the body is not valid JSON: {type(err).__name__}: {err}",
                           code="invalid_json") from None

    def model_card() -> dict:
        return {"id": args.model_name, "object": "model", "created": started, "owned_by": "minimind"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": args.model_name, **stats}

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str, request: Request):
        check_auth(request)
        if model_id != args.model_name:
            raise ApiError(404, f"model '{model_id}' does not exist (this server has '{args.model_name}')",
                           param="model", code="model_not_found")
        return model_card()

    def prepare(req: ChatRequest) -> tuple[list[int], SamplingParams]:
        """Check the numbers that depend on the model, then tokenize (in a thread: long prompts take a while)."""
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        if max_tokens is not None and max_tokens != -1:
            if max_tokens < 1:
                raise ApiError(400, f"{param} must be at least 1 (or -1 for as many as fit), got {max_tokens}",
                               param=param, code="invalid_value")
            if max_tokens > engine.max_reply_tokens:
                raise ApiError(400, f"{param} is {max_tokens}, but the model's context of {engine.context_length} "
                               f"tokens leaves at most {engine.max_reply_tokens} for a reply", param=param,
                               code="context_length_exceeded")
        auto = max_tokens is None or max_tokens == -1
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in req.messages]
        budget = engine.context_length - (default_reply_room if auto else max_tokens)
        try:
            prompt_ids = engine.build_prompt(messages, budget)
        except ValueError as err:
            raise ApiError(400, str(err), param="messages", code="invalid_value") from None
        temperature = args.temperature if req.temperature is None else req.temperature  # tiny means greedy
        params = SamplingParams(
            max_new_tokens=engine.context_length - len(prompt_ids) if auto else max_tokens,
            temperature=temperature,
            top_p=args.top_p if req.top_p is None else req.top_p,
            seed=req.seed,
        )
        return prompt_ids, params

    def start(reply, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        """Run `reply` in a worker thread, handing ("delta", text) then ("end"|"error", ...) to the event loop."""
        def put(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
                reply.cancel.set()

        def work():
            with stats_lock:
                stats["pending"] -= 1
                stats["running"] += 1
            try:
                for piece in reply:
                    put(("delta", piece))
                put(("end", None))
            except Exception as err:  # reported to the client, logged here
                log.exception("generation failed")
                put(("error", err))
            finally:
                with stats_lock:
                    stats["running"] -= 1
                    stats["completion_tokens"] += reply.completion_tokens

        with stats_lock:
            stats["pending"] += 1
            stats["requests"] += 1
        executor.submit(work)

    def usage(reply) -> dict:
        return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                "total_tokens": reply.prompt_tokens + reply.completion_tokens}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        payload = await read_json(request)
        try:
            req = ChatRequest.model_validate(payload)
        except ValidationError as err:
            raise validation_error(err) from None
        if stats["pending"] >= args.max_pending:
            raise ApiError(429, "too many requests waiting; try again shortly", type="rate_limit_error",
                           code="server_busy")
        prompt_ids, params = await run_in_threadpool(prepare, req)

        cancel = threading.Event()
        reply = engine.reply(prompt_ids, params, stop=req.stop or [], cancel=cancel)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        if not req.stream:
            async def client_gone():  # the body is read, so the next message can only be the disconnect
                while (await request.receive())["type"] != "http.disconnect":
                    pass

            start(reply, loop, queue)
            parts = []
            gone = asyncio.ensure_future(client_gone())
            try:
                while True:
                    get = asyncio.ensure_future(queue.get())
                    await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                    if not get.done():  # stop working for a client that is no longer there
                        get.cancel()
                        return JSONResponse(error_body("client disconnected", "invalid_request_error"), 499)
                    kind, value = get.result()
                    if kind != "delta":
                        break
                    parts.append(value)
            finally:
                gone.cancel()
                cancel.set()
            if kind == "error":
                raise ApiError(500, f"generation failed: {type(value).__name__}", type="server_error",
                               code="generation_failed")
            return {
                "id": completion_id, "object": "chat.completion", "created": created, "model": args.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                             "logprobs": None, "finish_reason": reply.finish_reason}],
                "usage": usage(reply),
            }

        def event(delta: dict | None, finish_reason: str | None = None, **extra) -> str:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish_reason}]
            chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                     "model": args.model_name, "choices": choices, **extra}
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def sse():
            # Starlette cancels this generator when the client disconnects; `finally` then stops the worker.
            start(reply, loop, queue)
            try:
                yield event({"role": "assistant", "content": ""})
                while True:
                    kind, value = await queue.get()
                    if kind == "delta":
                        yield event({"content": value})
                    elif kind == "end":
                        break
                    else:  # headers are already sent: report in-band, then end the stream normally
                        body = error_body(f"generation failed: {type(value).__name__}", "server_error",
                                          code="generation_failed")
                        yield f"data: {json.dumps(body)}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                # The last choice chunk carries finish_reason (and usage, which many UIs read from it).
                yield event({}, reply.finish_reason, usage=usage(reply))
                if include_usage:  # OpenAI's own way: one more chunk with no choices
                    yield event(None, usage=usage(reply))
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=str, default=None,
                        help="checkpoint to serve (default: the newest out/full_sft_<dim>.pth)")
    parser.add_argument("--tokenizer_dir", type=str, default=None, help="default: model/minimind_tokenizer")
    parser.add_argument("--model_name", type=str, default=None, help="the id /v1/models reports (default: file stem)")
    parser.add_argument("--host", type=str, default="127.0.0.1",
                        help="address to bind; 0.0.0.0 exposes the server to your network (use --api_key)")
    parser.add_argument("--port", type=int, default=8998)
    parser.add_argument("--device", type=str, default=None, help="cuda / mps / cpu (default: best available)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="auto = bfloat16 on a GPU that supports it, else float32")
    parser.add_argument("--api_key", type=str, default=os.environ.get("MINIMIND_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $MINIMIND_API_KEY, else no auth)")
    parser.add_argument("--temperature", type=float, default=0.7, help="used when a request sends none")
    parser.add_argument("--top_p", type=float, default=0.9, help="used when a request sends none")
    parser.add_argument("--max_concurrent", type=int, default=4, help="generations running at once")
    parser.add_argument("--max_pending", type=int, default=64, help="queued requests before answering 429")
    parser.add_argument("--max_body_bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    parser.add_argument("--cors_origins", type=str, default="",
                        help="comma-separated origins allowed to call from a browser (default: none)")
    parser.add_argument("--log_level", type=str, default="info")
    add_model_args(parser)
    args = parser.parse_args(argv)
    args.cors_origins = [o.strip() for o in args.cors_origins.split(",") if o.strip()]
    if args.max_concurrent < 1 or args.max_pending < 1 or args.max_body_bytes < 1:
        parser.error("--max_concurrent, --max_pending and --max_body_bytes must be positive")
    if not 0 <= args.temperature <= 2 or not 0 < args.top_p <= 1:
        parser.error("--temperature must be in [0, 2] and --top_p in (0, 1]")
    return args


@exit_on_usage_error
def main():
    args = parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ckpt = Path(args.ckpt) if args.ckpt else find_checkpoint(OUT_DIR, "full_sft", model_flags(args))
    args.model_name = args.model_name or ckpt.stem
    device = args.device or default_device()
    dtype = resolve_dtype(args.dtype, device, fp16_fallback=False)
    model = load_model(ckpt, device=device, dtype=dtype, flags=model_flags(args))  # the shape comes from the file
    config = model.config
    try:
        tokenizer = load_tokenizer(args.tokenizer_dir)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    engine = ChatEngine(model, tokenizer)
    log.info("serving %s (%s, %.1fM params, context %d) on %s", ckpt, config.file_suffix,
             model.num_parameters_unique() / 1e6, engine.context_length, device)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("binding %s without --api_key: anyone who can reach this port can use the model", args.host)

    import uvicorn
    uvicorn.run(build_app(engine, args), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
