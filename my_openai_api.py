"""Serve a MiniMind checkpoint behind an OpenAI-compatible API (FastAPI + uvicorn).

    python my_openai_api.py --ckpt out/full_sft_512.pth                      # http://127.0.0.1:8998/v1
    python my_openai_api.py --ckpt out/full_sft_512_moe.pth --api_key sk-local --port 8000
    python my_openai_api.py --ckpt out/pretrain_512.pth                      # /v1/completions continues text

    curl http://127.0.0.1:8998/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "minimind", "messages": [{"role": "user", "content": "你好"}], "stream": true}'

Endpoints: GET /health, GET /metrics (Prometheus), GET /v1/models, POST /v1/chat/completions and
POST /v1/completions (streamed or not, with logprobs). Any OpenAI client or chat UI (Open-WebUI, FastGPT,
chat_openai_api.py) can use it with base URL http://HOST:PORT/v1.

One engine (model/engine.py) owns the model and decodes every active request in one batched forward per step, up
to --max_batch at once; up to --max_pending more wait, and past that the server answers 429 at once. A client that
disconnects frees its slot within one step. Every error is OpenAI's JSON shape with a 4xx status. The server binds
127.0.0.1 unless told otherwise, refuses browser pages from origins not in --cors_origins (403), and with
--api_key (or $MINIMIND_API_KEY) requires `Authorization: Bearer KEY` on /v1/.
"""

import argparse
import logging
import os
from pathlib import Path

from model.api_server import ServerOptions, build_app
from model.checkpoint import OUT_DIR, default_device, find_checkpoint, load_model, load_tokenizer, resolve_dtype
from model.errors import UsageError, exit_on_usage_error
from model.LMConfig import add_model_args, model_flags
from model.serving import ChatEngine

log = logging.getLogger("minimind.api")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=str, default=None,
                        help="checkpoint to serve (default: the newest out/full_sft_<dim>.pth)")
    parser.add_argument("--tokenizer_dir", type=str, default=None, help="default: the bundled tokenizer of the model's family")
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
    parser.add_argument("--max_batch", "--max_concurrent", dest="max_batch", type=int, default=16,
                        help="sequences decoded together in one batch (their KV cache is allocated at start)")
    parser.add_argument("--max_pending", type=int, default=64,
                        help="requests waiting for a free slot; more get 429 at once")
    parser.add_argument("--prefill_chunk", type=int, default=512,
                        help="prompt tokens prefilled per step, so long prompts do not stall the others")
    parser.add_argument("--max_body_bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    parser.add_argument("--cors_origins", type=str, default="",
                        help="comma-separated browser origins allowed to call the API, or * for any "
                             "(default: none; requests without an Origin header, like curl and SDKs, always pass)")
    parser.add_argument("--log_level", type=str, default="info")
    add_model_args(parser)
    args = parser.parse_args(argv)
    args.cors_origins = [o.strip() for o in args.cors_origins.split(",") if o.strip()]
    if min(args.max_batch, args.max_pending, args.max_body_bytes, args.prefill_chunk) < 1:
        parser.error("--max_batch, --max_pending, --max_body_bytes and --prefill_chunk must be positive")
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
        tokenizer = load_tokenizer(args.tokenizer_dir, config)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    chat = ChatEngine(model, tokenizer, max_batch=args.max_batch, prefill_chunk=args.prefill_chunk).start()
    log.info("serving %s (%s, %.1fM params, context %d, batch %d) on %s", ckpt, config.file_suffix,
             model.num_parameters_unique() / 1e6, chat.context_length, args.max_batch, device)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("binding %s without --api_key: anyone who can reach this port can use the model", args.host)

    import uvicorn
    options = ServerOptions(model_name=args.model_name, api_key=args.api_key, cors_origins=args.cors_origins,
                            max_pending=args.max_pending, max_body_bytes=args.max_body_bytes,
                            temperature=args.temperature, top_p=args.top_p)
    try:
        uvicorn.run(build_app(chat, options), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        chat.engine.stop()


if __name__ == "__main__":
    main()
