"""Chat with a MiniMind checkpoint in the terminal: multi-turn, answers streamed as they are generated.

    python 2-eval.py                                          # out/full_sft_512.pth, interactive
    python 2-eval.py --ckpt out/rl_512.pth --temperature 0.7 --top_p 0.85
    python 2-eval.py --ckpt out/full_sft_768.pth              # the shape is read from the file
    python 2-eval.py --ckpt out/full_sft_512.pth --lora_dir out/lora_sft_512        # base + LoRA adapter
    python 2-eval.py --prompt "你好" --prompt "你叫什么名字"    # non-interactive: the turns of one conversation
    python 2-eval.py --batch_file questions.txt               # non-interactive: one independent question a line

Inside the chat, `/reset` forgets the conversation and `/exit` (or Ctrl-D) quits.

MiniMind-3-family models (ChatML template): `--think` (or `/think` in the chat) turns the template's thinking on;
the reasoning is shown apart from the answer, each line behind a "┆ " bar (dimmed on a terminal), and tool calls
the model makes are shown as `tool call: name {arguments}` items. Only the answer goes into the history.

The conversation is rendered with the tokenizer's chat template. When it no longer fits the model's context
(leaving room for the answer), the oldest turns are dropped first; the system prompt always stays.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.checkpoint import (
    OUT_DIR,
    add_tokenizer_arg,
    default_device,
    find_checkpoint,
    load_model,
    load_tokenizer,
    resolve_dtype,
)
from model.errors import UsageError, exit_on_usage_error
from model.generate import SamplingParams, stream_text
from model.LMConfig import add_model_args, model_flags
from model.serving import ChatEngine
from model.tool_calls import ReplyParser, collect_events

DIM, RESET = "\033[2m", "\033[0m"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Chat with a MiniMind checkpoint")
    parser.add_argument("--ckpt", default=None, help="weights to load (default: the newest out/full_sft_<dim>.pth)")
    parser.add_argument("--lora_dir", default=None, help="a peft LoRA adapter (from 4-lora_sft.py) to apply on top")
    add_tokenizer_arg(parser)
    parser.add_argument("--device", default=None, help="cuda / cpu / mps (default: the best available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--system", default="", help="system prompt, kept at the start of every prompt")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 means greedy")
    parser.add_argument("--top_p", type=float, default=0.85)
    parser.add_argument("--top_k", type=int, default=0, help="0 disables")
    parser.add_argument("--repetition_penalty", type=float, default=1.0, help="1 disables")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--max_history_turns", type=int, default=None,
                        help="keep at most this many earlier turns (default: as many as fit the context)")
    parser.add_argument("--seed", type=int, default=None, help="seed the sampling for reproducible answers")
    parser.add_argument("--prompt", action="append", default=None,
                        help="answer this and exit; repeat the flag for the turns of one conversation")
    parser.add_argument("--batch_file", default=None, help="a UTF-8 text file: one independent question per line")
    parser.add_argument("--batch_size", type=int, default=8, help="questions generated together with --batch_file")
    parser.add_argument("--think", action="store_true",
                        help="MiniMind-3 family: let the model reason first (shown apart from the answer)")
    add_model_args(parser)
    return parser.parse_args(argv)


def chat_messages(system: str, history: list[tuple[str, str]], question: str, max_turns: int | None = None):
    """The conversation as chat messages: optional system prompt, the last `max_turns` (question, answer) pairs
    (all when None), and the new question."""
    if max_turns is not None:
        history = history[len(history) - max_turns:] if max_turns > 0 else []
    messages = [{"role": "system", "content": system}] if system else []
    for q, a in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages + [{"role": "user", "content": question}]


def prompt_budget(context: int, max_new_tokens: int) -> int:
    """Prompt tokens we allow: the context minus room for the answer, but never less than half the context.

    (An answer longer than the room left still works: generation slides its window over the context.)
    """
    return context - min(max_new_tokens, context // 2)


class Chat:
    """One conversation: the history of (question, answer) pairs and how to answer the next question.

    The prompt is built by the server's `ChatEngine.build_prompt`, so the CLI and the API fit a conversation into
    the context the same way: oldest turns dropped first, the system prompt kept, and a single over-long message
    cut inside its text (keeping its end), never through the chat template.
    """

    def __init__(self, model, tokenizer, params: SamplingParams, system: str = "", max_history_turns=None,
                 think: bool = False):
        self.engine = ChatEngine(model, tokenizer, max_batch=1)
        self.think = think
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.system, self.max_history_turns = system, max_history_turns
        self.history: list[tuple[str, str]] = []
        self.budget = prompt_budget(model.config.context_length, params.max_new_tokens)

    def prompt(self, question: str) -> list[int]:
        messages = chat_messages(self.system, self.history, question, self.max_history_turns)
        if self.engine.native_tools:
            return self.engine.build_prompt(messages, self.budget, enable_thinking=self.think)
        return self.engine.build_prompt(messages, self.budget)

    def reply(self, question: str, out=sys.stdout) -> str:
        if self.engine.native_tools:  # a reply format with reasoning and tool calls to show apart
            pieces = self.engine.reply(self.prompt(question), self.params)
            answer = show_reply(pieces, self.think, out).content
            self.history.append((question, answer))
            return answer
        pieces = []
        for piece in stream_text(self.model, self.tokenizer, self.prompt(question), self.params,
                                 engine=self.engine.engine):
            pieces.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        answer = "".join(pieces)
        self.history.append((question, answer))
        return answer


class ReplyView:
    """Writes a MiniMind-3 reply as it streams: reasoning behind a "┆ " bar (dimmed on a terminal), then the answer,
    then each tool call as one structured line."""

    def __init__(self, out):
        self.out = out
        self.dim = out.isatty() if hasattr(out, "isatty") else False
        self.last = None  # the kind of the last thing written, to break lines between kinds

    def write(self, kind: str, value) -> None:
        if kind == "reasoning":
            text = value.replace("\n", "\n┆ ")
            if self.last != "reasoning":
                text = "\n┆ " + text if self.last else "┆ " + text
            self.out.write(f"{DIM}{text}{RESET}" if self.dim else text)
        elif kind == "content":
            self.out.write(("\n" if self.last not in (None, "content") else "") + value)
        else:
            function = value["function"]
            self.out.write(("\n" if self.last else "") + f"tool call: {function['name']} {function['arguments']}")
        self.last = kind
        self.out.flush()


def show_reply(pieces, think: bool, out=sys.stdout):
    """Stream text pieces of a reply (its tags decoded) to `out` through `ReplyView`; the `ParsedReply`."""
    parser, view, events = ReplyParser(thinking=think), ReplyView(out), []
    for piece in pieces:
        for event in parser.push(piece):
            view.write(*event)
            events.append(event)
    for event in parser.flush():
        view.write(*event)
        events.append(event)
    out.write("\n")
    return collect_events(events)


def answer_batch(model, tokenizer, questions: list[str], params: SamplingParams, system: str, batch_size: int):
    """Independent single-turn answers through one engine that decodes `batch_size` of them at a time; printed in
    order, a few batches' worth at once."""
    chat = ChatEngine(model, tokenizer, max_batch=batch_size)
    budget = prompt_budget(model.config.context_length, params.max_new_tokens)
    for start in range(0, len(questions), 4 * batch_size):
        chunk = questions[start:start + 4 * batch_size]
        prompts = [chat.build_prompt(chat_messages(system, [], q), budget) for q in chunk]
        outputs = chat.engine.generate_batch(prompts, params, eos_token_id=tokenizer.eos_token_id)
        for question, new_ids in zip(chunk, outputs):
            yield question, tokenizer.decode(new_ids, skip_special_tokens=True)


def interactive(chat: Chat):
    print("Type a message; /reset forgets the conversation, /think toggles thinking, /exit or Ctrl-D quits.")
    while True:
        try:
            question = input("\nuser> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not question:
            continue
        if question in ("/exit", "/quit"):
            return
        if question == "/reset":
            chat.history = []
            print("(conversation cleared)")
            continue
        if question == "/think":
            chat.think = not chat.think
            print(f"(thinking {'on' if chat.think else 'off'}"
                  f"{'' if chat.engine.native_tools else '; this model has no thinking template'})")
            continue
        print("assistant> ", end="", flush=True)
        try:
            chat.reply(question)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session
            print("\n(interrupted)")


@exit_on_usage_error
def main(argv=None):
    args = parse_args(argv)
    device = args.device or default_device()
    ckpt = Path(args.ckpt) if args.ckpt else find_checkpoint(OUT_DIR, "full_sft", model_flags(args))
    if args.batch_file and not Path(args.batch_file).exists():
        raise UsageError(f"batch file not found: {args.batch_file}")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    try:
        params.validate()
    except ValueError as err:
        sys.exit(str(err))

    model = load_model(ckpt, device="cpu", flags=model_flags(args))
    config = model.config
    tokenizer = load_tokenizer(args.tokenizer, config)
    if args.lora_dir:
        from model.lora import apply_adapter
        model = apply_adapter(model, args.lora_dir)
    model = model.to(device=device, dtype=resolve_dtype(args.dtype, device)).eval()
    print(f"loaded {ckpt}{' + ' + args.lora_dir if args.lora_dir else ''} "
          f"({model.num_parameters_unique() / 1e6:.1f}M params, context {config.context_length}) on {device}",
          file=sys.stderr)

    if args.batch_file:
        with open(args.batch_file, encoding="utf-8") as f:
            questions = [line.strip() for line in f if line.strip()]
        if not questions:
            sys.exit(f"no questions in {args.batch_file}")
        for question, answer in answer_batch(model, tokenizer, questions, params, args.system, args.batch_size):
            print(f"user> {question}\nassistant> {answer}\n", flush=True)
    elif args.prompt:
        chat = Chat(model, tokenizer, params, args.system, args.max_history_turns, think=args.think)
        for question in args.prompt:
            print(f"user> {question}\nassistant> ", end="", flush=True)
            chat.reply(question)
    else:
        interactive(Chat(model, tokenizer, params, args.system, args.max_history_turns, think=args.think))


if __name__ == "__main__":
    main()
