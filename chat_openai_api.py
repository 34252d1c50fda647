"""Chat with a running my_openai_api.py (or any OpenAI-compatible server) in the terminal.

    python my_openai_api.py --ckpt out/full_sft_512.pth          # in one terminal
    python chat_openai_api.py                                    # in another
    python chat_openai_api.py --base_url http://127.0.0.1:8998/v1 --api_key KEY --system "你是MiniMind。" --temperature 0.7

Replies stream as they are generated, and every turn is sent with the whole conversation so far, so the model sees
the context (the server drops the oldest turns when they no longer fit). Type /clear to forget the conversation,
/exit (or Ctrl-D) to quit. Lines can also come from a pipe: `printf '你好\\n再见\\n' | python chat_openai_api.py`.
"""

import argparse
import os
import sys

import openai
from openai import OpenAI


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base_url", default="http://127.0.0.1:8998/v1")
    parser.add_argument("--api_key", default=os.environ.get("MINIMIND_API_KEY") or "none",
                        help="the server's --api_key (default: $MINIMIND_API_KEY)")
    parser.add_argument("--model", default=None, help="model id (default: the first one the server lists)")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--max_tokens", type=int, default=None, help="default: as many as the context allows")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=args.timeout, max_retries=0)
    try:
        model = args.model or client.models.list().data[0].id
    except openai.APIConnectionError:
        print(f"error: no server at {args.base_url} (start one with `python my_openai_api.py`)", file=sys.stderr)
        return 1
    except openai.APIStatusError as err:
        print(f"error: {err.status_code} {err.message}", file=sys.stderr)
        return 1

    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    options = {"temperature": args.temperature, **{key: value for key, value in (
        ("top_p", args.top_p), ("max_tokens", args.max_tokens)) if value is not None}}
    interactive = sys.stdin.isatty()
    print(f"chatting with {model} at {args.base_url}; /clear forgets the conversation, /exit quits")
    while True:
        try:
            line = input("\n👶: " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/clear":
            history.clear()
            print("(conversation cleared)")
            continue
        if not interactive:
            print(f"\n👶: {text}")

        history.append({"role": "user", "content": text})
        print("🤖: ", end="", flush=True)
        pieces, stream = [], None
        try:
            stream = client.chat.completions.create(model=model, messages=system + history, stream=True, **options)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                    print(pieces[-1], end="", flush=True)
            print()
        except KeyboardInterrupt:  # stop this reply, keep what arrived, carry on chatting
            if stream is not None:
                stream.close()
            print(" [interrupted]")
        except openai.APIStatusError as err:
            print(f"\nerror: {err.status_code} {err.message}", file=sys.stderr)
            history.pop()  # the server refused this turn: do not keep it in the context
            continue
        except openai.APIConnectionError as err:
            print(f"\nerror: lost the server ({err})", file=sys.stderr)
            return 1
        history.append({"role": "assistant", "content": "".join(pieces)})


if __name__ == "__main__":
    sys.exit(main())
