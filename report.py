"""A report card for one or more checkpoints, side by side: held-out loss and bits per character, C-Eval / CMMLU
accuracy, and how often greedy answers repeat themselves and how long they are, with a few sample answers.

    python report.py out/pretrain_128.pth out/full_sft_128.pth out/rl_128.pth
    python report.py out/pretrain_512.pth out/full_sft_512.pth out/rl_512.pth --ceval_dir ceval-exam --cmmlu_dir cmmlu
    python report.py out/full_sft_768.pth --text my_held_out.txt --prompts my_prompts.jsonl --ngram 3

Checkpoints are anything the other scripts load (a .pth with its .json, or a MiniMind-3 folder), of either family;
each gets its family's bundled tokenizer. Prompts are rendered with the chat template, except for checkpoints whose
file name starts with `pretrain_`, which continue the plain prompt text. Answers come from the batched engine,
greedy. The benchmarks are C-Eval's val split and CMMLU's test split, 0-shot, scored as eval_ceval.py scores them.

Writes report.md (also printed), report.json and report.png to --out_dir (default out/report/), each atomically.
No network access is needed.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from tqdm import tqdm

import eval_ceval
from model.checkpoint import (
    TOKENIZER3_DIR,
    default_device,
    family_tokenizer_dir,
    load_model,
    load_tokenizer,
    read_checkpoint,
    resolve_dtype,
)
from model.errors import UsageError, exit_on_usage_error
from model.generate import SamplingParams, generate
from model.report_card import (
    answer_stats,
    markdown_report,
    prompt_ids,
    read_prompts,
    read_texts,
    score_texts,
    write_report,
)

ROOT = Path(__file__).resolve().parent
DEFAULT_PROMPTS = ROOT / "dataset" / "report_prompts.jsonl"
BENCHMARK_SPLITS = {"ceval": "val", "cmmlu": "test"}  # the labelled split each benchmark is scored on


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Compare MiniMind checkpoints side by side.")
    parser.add_argument("checkpoints", nargs="+", help="e.g. out/pretrain_512.pth out/full_sft_512.pth out/rl_512.pth")
    parser.add_argument("--text", default=str(DEFAULT_PROMPTS),
                        help="held-out text: JSON lines (text/reference/output, or conversations' answers) or plain "
                             "text; default: the reference answers of the bundled prompt file")
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS),
                        help="JSON lines with a prompt field, or one prompt per line")
    parser.add_argument("--ceval_dir", default=None, help="C-Eval folder (its val split is scored)")
    parser.add_argument("--cmmlu_dir", default=None, help="CMMLU folder (its test split is scored)")
    parser.add_argument("--ngram", type=int, default=4, help="n of the repeated-n-gram rate (characters)")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--samples", type=int, default=3, help="sample answers shown per checkpoint")
    parser.add_argument("--batch_size", type=int, default=16, help="benchmark questions scored per forward")
    parser.add_argument("--out_dir", default=str(ROOT / "out" / "report"))
    parser.add_argument("--device", default=None, help="default: cuda, then mps, then cpu")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="auto: bfloat16 on CUDA, float32 elsewhere")
    args = parser.parse_args(argv)
    for name in ("ngram", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.samples < 0:
        parser.error("--samples must be >= 0")
    for flag, folder in (("--ceval_dir", args.ceval_dir), ("--cmmlu_dir", args.cmmlu_dir)):
        if folder and not Path(folder).is_dir():
            parser.error(f"{flag} {folder} is not a folder; download the benchmark first (see the README)")
    return args


def stage_of(path: Path) -> str:
    """The training stage a checkpoint's name says: out/full_sft_512_moe.pth -> full_sft."""
    return re.sub(r"_\d+(_moe)?$", "", path.stem if path.suffix == ".pth" else path.name)


def benchmark_total(model, tokenizer, data_dir: Path, benchmark: str, batch_size: int) -> dict:
    """Correct, total and accuracy over all labelled questions of the benchmark's split, 0-shot, with
    eval_ceval.py's prompts and letter scoring."""
    split = BENCHMARK_SPLITS[benchmark]
    files = eval_ceval.subject_files(data_dir, benchmark, split)
    titles = eval_ceval.subject_titles(data_dir)
    letter_ids = eval_ceval.letter_token_ids(tokenizer)
    correct = total = 0
    for subject, path in tqdm(files.items(), desc=f"  {benchmark}", leave=False):
        questions, labelled = eval_ceval.read_questions(path, [])
        if not (labelled and questions):
            continue
        title = eval_ceval.subject_title(titles, subject)
        prompts = [eval_ceval.build_prompt(tokenizer, title, q, [], model.config.context_length)[0] for q in questions]
        predicted = eval_ceval.letter_logits(model, prompts, letter_ids, batch_size).argmax(dim=-1).tolist()
        correct += sum(eval_ceval.LETTERS[p] == q.answer for p, q in zip(predicted, questions))
        total += len(questions)
    if not total:
        raise UsageError(f"no labelled {benchmark} questions in {eval_ceval.split_folder(data_dir, split)}; "
                         f"check the folder's layout (see the README)")
    return {"split": split, "correct": correct, "total": total, "accuracy": correct / total}


def report_row(path: Path, args, texts: list[str], prompts: list[str], device: str, dtype) -> dict:
    """Every measurement of one checkpoint."""
    ckpt = read_checkpoint(path)
    tokenizer = load_tokenizer(None, ckpt.config)
    if len(tokenizer) > ckpt.config.vocab_size:
        raise UsageError(f"{path}: the model has {ckpt.config.vocab_size} token ids but its family's tokenizer "
                         f"{len(tokenizer)}; pass a checkpoint trained with the bundled tokenizer")
    model = load_model(ckpt, device=device, dtype=dtype)
    stage = stage_of(path)
    chat = not stage.startswith("pretrain")
    score = score_texts(model, tokenizer, texts, progress=lambda it: tqdm(it, desc="  held-out text", leave=False))
    row = {"name": path.name, "checkpoint": str(path), "stage": stage, "chat": chat,
           "family": "minimind-3" if family_tokenizer_dir(ckpt.config) == TOKENIZER3_DIR else "v1",
           "parameters": sum(p.numel() for p in model.parameters()),
           "heldout_loss": score.loss, "bits_per_char": score.bits_per_char, "text_tokens": score.tokens,
           "text_chars": score.chars}
    for bench, folder in (("ceval", args.ceval_dir), ("cmmlu", args.cmmlu_dir)):
        row[bench] = benchmark_total(model, tokenizer, Path(folder), bench, args.batch_size) if folder else None
    encoded = [prompt_ids(tokenizer, p, chat) for p in prompts]
    answers = generate(model, encoded, SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0),
                       eos_token_id=tokenizer.eos_token_id)
    stats = answer_stats(tokenizer, answers, args.ngram)
    row.update(repetition_rate=stats["repetition_rate"], answer_chars=stats["answer_chars"],
               answer_tokens=stats["answer_tokens"],
               samples=[{"prompt": p, "answer": a} for p, a in zip(prompts, stats["texts"])][: args.samples])
    return row


@exit_on_usage_error
def main(argv=None) -> int:
    args = parse_args(argv)
    texts, prompts = read_texts(args.text), read_prompts(args.prompts)
    device = args.device or default_device()
    dtype = resolve_dtype(args.dtype, device, fp16_fallback=False)
    rows = []
    for path in tqdm([Path(p) for p in args.checkpoints], desc="checkpoints"):
        rows.append(report_row(path, args, texts, prompts, device, dtype))
    settings = {"text": args.text, "prompts": args.prompts, "prompts_count": len(prompts), "ngram": args.ngram,
                "max_new_tokens": args.max_new_tokens, "benchmark_splits": BENCHMARK_SPLITS, "device": device,
                "dtype": str(dtype).removeprefix("torch.")}
    paths = write_report(rows, settings, Path(args.out_dir))
    print(markdown_report(rows, settings))
    print(f"report: {paths['md']}, {paths['json']}, {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
