"""Evaluate a checkpoint on C-Eval or CMMLU multiple-choice questions: per-subject accuracy, a total, a bar chart.

    python eval_ceval.py --ckpt out/full_sft_512.pth --data_dir ../ceval-exam --split val
    python eval_ceval.py --ckpt out/full_sft_512.pth --data_dir ../ceval-exam --split val --shots 5
    python eval_ceval.py --ckpt out/full_sft_512_moe.pth --data_dir ../ceval-exam --split test
    python eval_ceval.py --ckpt out/full_sft_512.pth --benchmark cmmlu --data_dir ../cmmlu --split test
    python eval_ceval.py --harness lm_eval --model out/MiniMind-v1-small-llama --data_dir ../ceval-exam --split val

--harness lm_eval scores an exported transformers folder (export_model.py) with lm-evaluation-harness's `hf` model
instead, on the same local files and the same prompt; see model/lm_eval_tasks/harness.py.

Data layouts (the benchmarks are not bundled; see the README for where to download them):
- C-Eval: `{subject}_{split}.csv` with columns id,question,A,B,C,D,answer (the test split has no answer column),
  either directly in --data_dir or in --data_dir/{split}/ (the layout of the official ceval-exam.zip).
  An optional `subject_mapping.json` in --data_dir gives the subjects' Chinese names for the prompt.
- CMMLU: `{subject}.csv` with columns ,Question,A,B,C,D,Answer, in --data_dir/dev/ and --data_dir/test/
  (or directly in --data_dir).

Scoring: each question is rendered with the tokenizer's chat template as a user message; the few-shot examples
(the subject's first --shots dev questions) come before it as earlier user turns answered by the assistant with
their letter. The prediction is whichever of the tokens "A", "B", "C", "D" has the highest logit at the start of
the assistant's reply. Nothing is generated, so a model that would ramble instead of answering still gets scored.

Outputs in --out_dir: one predictions CSV per subject, predictions.json ({subject: {id: letter}}, the shape C-Eval's
submission site takes), summary.csv/summary.json (subject, correct, total, accuracy) and the bar chart in images/.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model.checkpoint import default_device, load_model, load_tokenizer, read_checkpoint, resolve_dtype
from model.dataset import encode_prompt
from model.engine import last_token_logits
from model.errors import exit_on_usage_error
from model.LMConfig import add_model_args, model_flags

ROOT_DIR = Path(__file__).resolve().parent
LETTERS = ("A", "B", "C", "D")
SPLITS = {"ceval": ("val", "dev", "test"), "cmmlu": ("dev", "test")}


@dataclass
class Question:
    id: str
    question: str
    options: list[str]  # the texts of A, B, C, D
    answer: str | None  # "A".."D", or None when the split has no labels
    line: int  # line in the CSV file, for messages


# ----------------------------------------------------------------------------------------------------------------
# reading the data


def split_folder(data_dir: Path, split: str) -> Path:
    """Where one split's files are: data_dir/{split}/, or a sibling of data_dir when data_dir is itself a split's
    folder (`--data_dir ceval-exam/val` still finds ceval-exam/dev for few-shot examples), or data_dir itself."""
    if (data_dir / split).is_dir():
        return data_dir / split
    if data_dir.name in ("val", "dev", "test") and (data_dir.parent / split).is_dir():
        return data_dir.parent / split
    return data_dir


def subject_files(data_dir: Path, benchmark: str, split: str) -> dict[str, Path]:
    """{subject: csv path} for one split."""
    folder = split_folder(data_dir, split)
    if benchmark == "ceval":
        suffix = f"_{split}.csv"
        return {p.name[: -len(suffix)]: p for p in sorted(folder.glob(f"*{suffix}"))}
    return {p.stem: p for p in sorted(folder.glob("*.csv"))}


def read_questions(path: Path, problems: list[str]) -> tuple[list[Question], bool]:
    """The well-formed rows of one CSV and whether the file has an answer column.

    Column names are matched case-insensitively, so C-Eval's `question,answer` and CMMLU's `Question,Answer` read
    the same way; the id is C-Eval's `id` or CMMLU's unnamed first column. Bad rows are appended to `problems` as
    "file:line: reason" and skipped; an unreadable file is reported and yields no questions.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")  # utf-8-sig: files saved by Excel start with a BOM
    except (OSError, UnicodeDecodeError) as err:
        problems.append(f"{path}: cannot read ({err}); skipped the file")
        return [], False
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as err:
        problems.append(f"{path}: malformed CSV header ({err}); skipped the file")
        return [], False
    if not header:
        problems.append(f"{path}: empty file; skipped")
        return [], False
    columns = {name.strip().lower(): i for i, name in enumerate(header)}
    missing = [c for c in ("question", "a", "b", "c", "d") if c not in columns]
    if missing:
        problems.append(f"{path}: no column(s) {', '.join(missing)} in header {header}; skipped the file")
        return [], False
    id_col = columns.get("id", 0 if header[0].strip() == "" else None)
    answer_col = columns.get("answer")

    questions = []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            problems.append(f"{path}:{reader.line_num}: malformed CSV ({err}); skipped the rest of the file")
            break
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue  # blank lines are not worth a message
        if len(row) != len(header):
            problems.append(f"{path}:{line}: expected {len(header)} fields, got {len(row)}; skipped the row")
            continue
        question = row[columns["question"]].strip()
        if not question:
            problems.append(f"{path}:{line}: empty question; skipped the row")
            continue
        answer = None
        if answer_col is not None:
            answer = row[answer_col].strip().upper()
            if answer not in LETTERS:
                problems.append(f"{path}:{line}: answer {row[answer_col]!r} is not one of A/B/C/D; skipped the row")
                continue
        qid = row[id_col].strip() if id_col is not None else ""
        questions.append(Question(id=qid or str(len(questions)), question=question,
                                  options=[row[columns[c]].strip() for c in ("a", "b", "c", "d")],
                                  answer=answer, line=line))
    return questions, answer_col is not None


def subject_titles(data_dir: Path) -> dict[str, str]:
    """C-Eval's subject_mapping.json ({subject: [English, 中文, category]}) gives Chinese names; optional."""
    path = data_dir / "subject_mapping.json"
    if not path.exists():
        path = data_dir.parent / "subject_mapping.json"  # --data_dir pointed at a split's folder
    if not path.exists():
        return {}
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
        return {k: v[1] for k, v in mapping.items() if isinstance(v, list) and len(v) > 1 and isinstance(v[1], str)}
    except (OSError, ValueError, AttributeError) as err:
        print(f"warning: ignoring {path} ({err})")
        return {}


# ----------------------------------------------------------------------------------------------------------------
# prompts and scoring


def subject_title(titles: dict[str, str], subject: str) -> str:
    """The subject's name in the prompt: its Chinese name from subject_mapping.json, else the file's name."""
    return titles.get(subject, subject.replace("_", " "))


def format_question(q: Question) -> str:
    return q.question + "\n" + "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, q.options))


def build_messages(title: str, q: Question, shots: list[Question]) -> list[dict]:
    """Chat messages for one question: the instruction, the few-shot turns (question -> letter), the question."""
    header = f"以下是关于{title}的单项选择题，请直接给出正确答案的选项。\n\n"
    messages = []
    for shot in shots:
        messages.append({"role": "user", "content": format_question(shot)})
        messages.append({"role": "assistant", "content": shot.answer})
    messages.append({"role": "user", "content": format_question(q)})
    messages[0] = {"role": "user", "content": header + messages[0]["content"]}
    return messages


def build_prompt(tokenizer, title: str, q: Question, shots: list[Question], max_tokens: int):
    """Token ids of the prompt, the number of shots that fit, and whether the prompt had to be cut.

    A prompt longer than the model's context first loses few-shot examples (the last ones); a zero-shot prompt
    that is still too long keeps its last `max_tokens` tokens, so the options and the answer slot stay in view.
    """
    n = len(shots)
    while True:
        ids = encode_prompt(tokenizer, build_messages(title, q, shots[:n]))
        if len(ids) <= max_tokens:
            return ids, n, False
        if n == 0:
            return ids[-max_tokens:], 0, True
        n -= 1


def letter_token_ids(tokenizer) -> list[int]:
    """The ids of "A".."D"; each letter must be a single token, or comparing four logits would not make sense."""
    ids = []
    for letter in LETTERS:
        encoded = tokenizer.encode(letter, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"the tokenizer splits {letter!r} into {len(encoded)} tokens {encoded}; "
                             "letter scoring needs one token per answer letter")
        ids.append(encoded[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"the answer letters share token ids {ids}")
    return ids


def letter_logits(model, prompts: list[list[int]], letter_ids: list[int], batch_size: int) -> torch.Tensor:
    """(N, 4) float32 logits of A..D at the position after each prompt, in the order of `prompts`: the engine's
    packed prefill (no padding), up to `batch_size` prompts and one context of tokens per forward."""
    return last_token_logits(model, prompts, select=letter_ids, max_prompts=batch_size)


# ----------------------------------------------------------------------------------------------------------------
# writing results


def publish(tmp: str, path: Path):
    """Rename a finished temp file into place with the usual permissions (mkstemp makes files private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def csv_text(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def plot_accuracy(summary: list[dict], overall: float, title: str, path: Path):
    """Horizontal bars of per-subject accuracy, sorted, with the 25% chance level and the overall accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(summary, key=lambda r: r["accuracy"])
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.28 * len(rows) + 1.5)))
    bars = ax.barh([r["subject"] for r in rows], [100 * r["accuracy"] for r in rows], color="#4c72b0")
    ax.bar_label(bars, labels=[f"{r['correct']}/{r['total']}" for r in rows], padding=3, fontsize=7)
    ax.axvline(25, color="grey", linestyle="--", linewidth=1, label="chance (25%)")
    ax.axvline(100 * overall, color="#c44e52", linewidth=1.5, label=f"overall ({100 * overall:.1f}%)")
    ax.set_xlim(0, 100)
    ax.margins(y=0.01)
    ax.set_xlabel("accuracy (%)")
    ax.set_title(title)
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120)
        publish(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def print_problems(problems: list[str], limit: int = 30):
    if not problems:
        return
    print(f"\n{len(problems)} problem(s) in the data (reported and skipped):")
    for msg in problems[:limit]:
        print(f"  {msg}")
    if len(problems) > limit:
        print(f"  ... and {len(problems) - limit} more")


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a MiniMind checkpoint on C-Eval / CMMLU.")
    parser.add_argument("--ckpt", default=None, help="a .pth state dict, e.g. out/full_sft_512.pth")
    parser.add_argument("--harness", choices=("minimind", "lm_eval"), default="minimind",
                        help="minimind: this script scores --ckpt; lm_eval: lm-evaluation-harness scores --model")
    parser.add_argument("--model", default=None, help="--harness lm_eval: an export_model.py folder")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="--harness lm_eval: run the model code a --format minimind folder ships")
    parser.add_argument("--data_dir", required=True, help="the benchmark folder (see the layouts above)")
    parser.add_argument("--benchmark", choices=sorted(SPLITS), default="ceval")
    parser.add_argument("--split", default="val", help="ceval: val|dev|test; cmmlu: dev|test")
    parser.add_argument("--shots", type=int, default=0, choices=range(6), help="few-shot examples from dev (0..5)")
    parser.add_argument("--subjects", nargs="*", default=None, help="only these subjects (default: all)")
    parser.add_argument("--batch_size", type=int, default=16, help="questions scored per forward (packed, no padding)")
    parser.add_argument("--out_dir", default=None,
                        help="default: eval_results/{benchmark}_{split} (with --harness lm_eval: ..._lm_eval)")
    parser.add_argument("--chart", default=None,
                        help="default: images/{benchmark}_{split}_accuracy.png (lm_eval: ..._lm_eval_accuracy.png)")
    parser.add_argument("--tokenizer_dir", default=None, help="default: the bundled tokenizer of the model's family")
    parser.add_argument("--device", default=None, help="default: cuda, then mps, then cpu")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="auto: bfloat16 on CUDA, float32 elsewhere")
    add_model_args(parser)
    args = parser.parse_args(argv)
    if args.split not in SPLITS[args.benchmark]:
        parser.error(f"--split {args.split!r}: {args.benchmark} has the splits {', '.join(SPLITS[args.benchmark])}")
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    if args.harness == "minimind" and not args.ckpt:
        parser.error("--ckpt is required (or --harness lm_eval with --model FOLDER)")
    if args.harness == "lm_eval" and not args.model:
        parser.error("--harness lm_eval needs --model, a folder written by export_model.py")
    if args.harness == "lm_eval" and args.benchmark == "ceval" and args.split == "test":
        parser.error("--harness lm_eval scores labelled splits only; C-Eval's test split has no answers (use the "
                     "default harness for its predictions)")
    return args


def load_scored_model(args):
    """(model, tokenizer, device, dtype); the shape comes from the checkpoint, the tokenizer by default from the
    model's family, and the tokenizer must fit the model's vocabulary."""
    device = args.device or default_device()
    dtype = resolve_dtype(args.dtype, device, fp16_fallback=False)
    ckpt = read_checkpoint(args.ckpt, model_flags(args))
    tokenizer = load_tokenizer(args.tokenizer_dir, ckpt.config)
    if len(tokenizer) > ckpt.config.vocab_size:
        sys.exit(f"error: the tokenizer has {len(tokenizer)} tokens but the model only {ckpt.config.vocab_size}")
    return load_model(ckpt, device=device, dtype=dtype), tokenizer, device, dtype


def dev_examples(subject: str, dev_files: dict[str, Path], shots: int, problems: list[str]) -> list[Question]:
    """The answered dev questions of a subject, for few-shot prompts (too few is recorded as a problem)."""
    if not shots:
        return []
    pool = [q for q in read_questions(dev_files[subject], problems)[0] if q.answer] if subject in dev_files else []
    if len(pool) < shots:
        problems.append(f"{subject}: only {len(pool)} dev example(s) for {shots} shots")
    return pool


def selected_subjects(args, data_dir: Path) -> dict[str, Path]:
    """The split's subject files, narrowed to --subjects (unknown names are warned about); exits if none."""
    files = subject_files(data_dir, args.benchmark, args.split)
    if args.subjects:
        unknown = sorted(set(args.subjects) - set(files))
        if unknown:
            print(f"warning: no {args.split} file for subject(s) {', '.join(unknown)}; skipped")
        files = {s: p for s, p in files.items() if s in args.subjects}
    if not files:
        expected = "{subject}_" + args.split + ".csv" if args.benchmark == "ceval" else "{subject}.csv"
        sys.exit(f"error: no {expected} files in {split_folder(data_dir, args.split)}")
    return files


def subject_prompts(tokenizer, title: str, questions: list[Question], shots_pool: list[Question], args,
                    max_tokens: int) -> tuple[list[list[int]], list[int], int, int]:
    """(prompt ids, shots used per question, prompts cut, prompts with fewer shots than asked)."""
    prompts, used_shots, n_cut, n_fewer = [], [], 0, 0
    for q in questions:
        # On the dev split a question must not be its own example.
        pool = [s for s in shots_pool if not (args.split == "dev" and s.id == q.id)][: args.shots]
        ids, n, cut = build_prompt(tokenizer, title, q, pool, max_tokens)
        prompts.append(ids)
        used_shots.append(n)
        n_cut += cut
        n_fewer += n < len(pool)
    return prompts, used_shots, n_cut, n_fewer


def prediction_rows(questions, predicted, probs, used_shots, prompts, labelled: bool) -> tuple[list, list]:
    """The per-subject CSV: header and rows (answer and correctness only where the split has answers)."""
    probs_text = [[f"{x:.4f}" for x in row] for row in probs.tolist()]
    extra = [[n, len(ids)] for n, ids in zip(used_shots, prompts)]
    if labelled:
        header = ["id", "answer", "prediction", "correct", *(f"p_{c}" for c in LETTERS), "shots", "prompt_tokens"]
        rows = [[q.id, q.answer, pred, int(pred == q.answer), *p, *e]
                for q, pred, p, e in zip(questions, predicted, probs_text, extra)]
    else:
        header = ["id", "prediction", *(f"p_{c}" for c in LETTERS), "shots", "prompt_tokens"]
        rows = [[q.id, pred, *p, *e] for q, pred, p, e in zip(questions, predicted, probs_text, extra)]
    return header, rows


def write_summary(summary: list[dict], unlabelled: list[str], problems: list[str], args, out_dir: Path,
                  chart: Path) -> None:
    """Print the accuracy table; write summary.csv, summary.json and the chart."""
    total_correct = sum(r["correct"] for r in summary)
    total = sum(r["total"] for r in summary)
    overall = total_correct / total
    macro = sum(r["accuracy"] for r in summary) / len(summary)
    width = max(len("TOTAL"), *(len(r["subject"]) for r in summary))
    print(f"\n{'subject':<{width}}  {'correct':>7}  {'total':>6}  accuracy")
    for r in summary:
        print(f"{r['subject']:<{width}}  {r['correct']:>7}  {r['total']:>6}  {r['accuracy']:.4f}")
    print(f"{'TOTAL':<{width}}  {total_correct:>7}  {total:>6}  {overall:.4f}")
    print(f"mean of the {len(summary)} subject accuracies: {macro:.4f}")

    rows = [[r["subject"], r["correct"], r["total"], f"{r['accuracy']:.4f}"] for r in summary]
    rows.append(["TOTAL", total_correct, total, f"{overall:.4f}"])
    write_text_atomic(out_dir / "summary.csv", csv_text(["subject", "correct", "total", "accuracy"], rows))
    source = args.ckpt or args.model
    report = {"benchmark": args.benchmark, "split": args.split, "shots": args.shots, "ckpt": str(source),
              "harness": args.harness,
              "subjects": summary, "total": {"correct": total_correct, "total": total, "accuracy": overall},
              "macro_accuracy": macro, "unlabelled_subjects": unlabelled, "problems": problems}
    write_text_atomic(out_dir / "summary.json", json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    plot_accuracy(summary, overall, f"{args.benchmark} {args.split}, {args.shots}-shot: {Path(source).name}", chart)


def score_subject(model, letter_ids, args, subject: str, questions, labelled: bool, prompts, used_shots, out_dir):
    """(predicted letters, its summary row or None when the split has no answers); writes {subject}.csv."""
    logits = letter_logits(model, prompts, letter_ids, args.batch_size)
    predicted = [LETTERS[i] for i in logits.argmax(dim=-1).tolist()]
    header, rows = prediction_rows(questions, predicted, logits.softmax(dim=-1), used_shots, prompts, labelled)
    write_text_atomic(out_dir / f"{subject}.csv", csv_text(header, rows))
    if not labelled:
        return predicted, None
    correct = sum(q.answer == p for q, p in zip(questions, predicted))
    return predicted, {"subject": subject, "correct": correct, "total": len(questions),
                       "accuracy": correct / len(questions)}


def print_prompt_notes(n_fewer_shots: int, n_cut: int, max_tokens: int) -> None:
    if n_fewer_shots:
        print(f"{n_fewer_shots} prompt(s) used fewer shots than asked, to fit the {max_tokens}-token context")
    if n_cut:
        print(f"{n_cut} prompt(s) were longer than {max_tokens} tokens even zero-shot and lost their beginning")


def run_lm_eval(args, data_dir: Path, files: dict[str, Path], out_dir: Path, chart: Path) -> int:
    """--harness lm_eval: the same subjects and questions (read here first, so bad rows are reported the same way),
    scored by lm-evaluation-harness on an exported folder; writes what the default harness writes, plus
    lm-eval's results (lm_eval_results.json), its per-question prompts and scores (lm_eval_samples.json) and the
    task files (lm_eval_tasks/)."""
    from model.lm_eval_tasks.harness import check_model_folder, evaluate_folder

    model_dir = Path(args.model)
    check_model_folder(model_dir, args.trust_remote_code)
    problems: list[str] = []
    dev_files = subject_files(data_dir, args.benchmark, "dev") if args.shots else {}
    shots = {}
    for subject, path in files.items():
        if not read_questions(path, problems)[0]:
            problems.append(f"{path}: no usable questions; skipped the subject")
            continue
        pool = dev_examples(subject, dev_files, args.shots, problems)
        # lm-eval asks its sampler for exactly n examples; ours takes what there is (on dev, minus the question)
        shots[subject] = max(0, min(args.shots, len(pool) - (args.split == "dev")))
    if not shots:
        sys.exit("error: no subject had usable questions; nothing evaluated")
    device = args.device or default_device()
    dtype = str(resolve_dtype(args.dtype, device, fp16_fallback=False)).removeprefix("torch.")
    print(f"{args.benchmark} {args.split}: {len(shots)} subject(s), {args.shots}-shot, lm-eval on {model_dir} "
          f"({device}, {dtype})")
    run = evaluate_folder(model_dir, data_dir, args.benchmark, args.split, shots, out_dir / "lm_eval_tasks",
                          device, dtype, args.batch_size, args.trust_remote_code)
    for k, row in enumerate(run.summary, 1):
        print(f"[{k}/{len(run.summary)}] {row['subject']}: {row['correct']}/{row['total']} = {row['accuracy']:.4f}")
    print_problems(problems)
    for name, data in (("predictions.json", run.predictions), ("lm_eval_results.json", run.results),
                       ("lm_eval_samples.json", run.samples)):
        write_text_atomic(out_dir / name, json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    write_summary(run.summary, [], problems, args, out_dir, chart)
    print(f"summary: {out_dir / 'summary.csv'}, {out_dir / 'summary.json'}; chart: {chart}")
    print(f"lm-eval results: {out_dir / 'lm_eval_results.json'}; the same run with lm-eval's own command:\n"
          f"  {run.command}")
    return 0


@exit_on_usage_error
def main(argv=None) -> int:
    args = parse_args(argv)
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        sys.exit(f"error: --data_dir {data_dir} is not a folder; download the benchmark first (see README)")
    files = selected_subjects(args, data_dir)
    dev_files = subject_files(data_dir, args.benchmark, "dev") if args.shots else {}
    titles = subject_titles(data_dir)
    run_name = f"{args.benchmark}_{args.split}" + ("_lm_eval" if args.harness == "lm_eval" else "")
    out_dir = Path(args.out_dir) if args.out_dir else ROOT_DIR / "eval_results" / run_name
    chart = Path(args.chart) if args.chart else ROOT_DIR / "images" / f"{run_name}_accuracy.png"

    if args.harness == "lm_eval":
        return run_lm_eval(args, data_dir, files, out_dir, chart)
    model, tokenizer, device, dtype = load_scored_model(args)
    letter_ids = letter_token_ids(tokenizer)
    max_tokens = model.config.context_length
    print(f"{args.benchmark} {args.split}: {len(files)} subject(s), {args.shots}-shot, {args.ckpt} on {device} "
          f"({dtype}), context {max_tokens} tokens")

    problems: list[str] = []
    summary, unlabelled, all_predictions = [], [], {}
    n_cut, n_fewer_shots, start = 0, 0, time.time()
    for k, (subject, path) in enumerate(files.items(), 1):
        questions, labelled = read_questions(path, problems)
        if not questions:
            problems.append(f"{path}: no usable questions; skipped the subject")
            continue
        shots_pool = dev_examples(subject, dev_files, args.shots, problems)
        title = subject_title(titles, subject)
        prompts, used_shots, cut, fewer = subject_prompts(tokenizer, title, questions, shots_pool, args, max_tokens)
        n_cut, n_fewer_shots = n_cut + cut, n_fewer_shots + fewer
        predicted, row = score_subject(model, letter_ids, args, subject, questions, labelled, prompts, used_shots,
                                       out_dir)
        all_predictions[subject] = {q.id: p for q, p in zip(questions, predicted)}
        if row is not None:
            summary.append(row)
            print(f"[{k}/{len(files)}] {subject}: {row['correct']}/{row['total']} = {row['accuracy']:.4f}")
        else:
            unlabelled.append(subject)
            print(f"[{k}/{len(files)}] {subject}: {len(questions)} predictions (no answers in this split)")

    print_problems(problems)
    if not all_predictions:
        sys.exit("error: no subject had usable questions; nothing evaluated")
    write_text_atomic(out_dir / "predictions.json", json.dumps(all_predictions, ensure_ascii=False, indent=1) + "\n")
    n_questions = sum(len(p) for p in all_predictions.values())
    print(f"\n{n_questions} questions in {time.time() - start:.1f}s; predictions in {out_dir}")
    print_prompt_notes(n_fewer_shots, n_cut, max_tokens)
    if unlabelled:
        print(f"{len(unlabelled)} subject(s) have no answers in the {args.split} split, so they are predictions only "
              f"(no accuracy): {', '.join(unlabelled)}")
    if not summary:
        return 0

    write_summary(summary, unlabelled, problems, args, out_dir, chart)
    print(f"summary: {out_dir / 'summary.csv'}, {out_dir / 'summary.json'}; chart: {chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
