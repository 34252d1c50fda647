"""Continue text with a pretrained checkpoint: a quick look at what pretraining learned.

    python 0-eval_pretrain.py                                  # built-in prompts, out/pretrain_512.pth, streamed
    python 0-eval_pretrain.py --prompt "长江是" --prompt "人工智能"  --max_new_tokens 100
    python 0-eval_pretrain.py --batch --prompts_file prompts.txt   # all prompts in one batched generate call
    python 0-eval_pretrain.py --ckpt out/pretrain_768.pth        # a 768-wide checkpoint: no flags, the shape is in the file

Each prompt starts with <s>, as every pretraining document does. By default the continuations stream to the
terminal one prompt at a time; --batch generates all of them together (the engine prefills them packed and decodes
them in one batch) and prints them at the end.
"""

import argparse
import time
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
from model.engine import Engine
from model.errors import exit_on_usage_error
from model.generate import SamplingParams, generate, stream_text
from model.LMConfig import add_model_args, model_flags

DEFAULT_PROMPTS = ["中国的首都是", "长江是", "人工智能是", "今天天气很好，", "学习编程的第一步是"]

parser = argparse.ArgumentParser(description="continue prompts with a pretrained MiniMind checkpoint")
add_model_args(parser)
parser.add_argument("--ckpt", type=str, default=None, help="weights (default: the newest out/pretrain_<dim>.pth)")
add_tokenizer_arg(parser)
parser.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
parser.add_argument("--prompts_file", type=str, default=None, help="a text file, one prompt per line")
parser.add_argument("--batch", action="store_true", help="generate all prompts in one batch instead of streaming")
parser.add_argument("--max_new_tokens", type=int, default=128)
parser.add_argument("--temperature", type=float, default=0.7, help="0 for greedy")
parser.add_argument("--top_k", type=int, default=0)
parser.add_argument("--top_p", type=float, default=0.9)
parser.add_argument("--repetition_penalty", type=float, default=1.1)
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--device", type=str, default=None)


@exit_on_usage_error
def main(argv=None):
    args = parser.parse_args(argv)

    ckpt = Path(args.ckpt) if args.ckpt else find_checkpoint(OUT_DIR, "pretrain", model_flags(args))
    device = args.device or default_device()
    model = load_model(ckpt, device=device, dtype=resolve_dtype(None, device, fp16_fallback=False), flags=model_flags(args))
    tokenizer = load_tokenizer(args.tokenizer, model.config)

    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = prompts or DEFAULT_PROMPTS
    prompt_ids = [[tokenizer.bos_token_id] + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    print(f"{ckpt} ({model.num_parameters_unique() / 1e6:.2f}M params) on {device}\n")

    start = time.time()
    if args.batch:
        for prompt, new in zip(prompts, generate(model, prompt_ids, params, eos_token_id=tokenizer.eos_token_id)):
            print(f"[{prompt}]{tokenizer.decode(new, skip_special_tokens=True)}\n")
    else:
        engine = Engine(model, max_batch=1)
        for prompt, ids in zip(prompts, prompt_ids):
            print(f"[{prompt}]", end="", flush=True)
            for piece in stream_text(model, tokenizer, ids, params, engine=engine):
                print(piece, end="", flush=True)
            print("\n")
    print(f"({len(prompts)} prompt(s) in {time.time() - start:.1f}s)")


if __name__ == "__main__":
    main()
