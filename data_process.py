"""Turn raw MiniMind data into the files training reads. One command per stage:

    python data_process.py pretrain --input ../shared/data/pretrain_zh-0*.jsonl.gz --output dataset/pretrain_data.bin
    python data_process.py pretrain --input seq_monkey.jsonl --output dataset/pretrain_data.bin --dedup
    python data_process.py sft      --input sft_data_zh.jsonl --output dataset/sft_data.bin --max_seq_len 512
    python data_process.py sft      --input dataset/sft_minimind3_sample.jsonl --output dataset/sft3_data.bin \
                                    --tokenizer model/minimind3_tokenizer
    python data_process.py dpo      --input dpo_zh.jsonl.gz --output dataset/dpo_data.jsonl
    python data_process.py arithmetic                  # GRPO prompts + SFT cold start (model/arithmetic.py)
    python data_process.py arithmetic --task tools     # tool-use problems for 6-grpo_train.py --task tools

Inputs are .jsonl or .jsonl.gz (pretrain also takes .csv/.csv.gz with a `text` column):
- pretrain: Seq-Monkey {"text": ...}; each document becomes <s> tokens </s>, kept whole however long, with its
  input file's name and its length in characters recorded beside it (for 1-pretrain.py --mix / --max_doc_chars).
- sft: deepctrl {"history": [[q, a], ...], "input"/"q", "output"/"a"} (an "instruction" is put before the input,
  an optional "system" becomes the system prompt), or {"messages"/"conversations": [{"role", "content"}, ...]}.
  MiniMind-3's conversations may also have "tool" messages and, on assistant messages, "reasoning_content" and
  "tool_calls"; a "tools" list sits on the system or first message (or beside "conversations"). Render those with
  `--tokenizer model/minimind3_tokenizer`: v1's template shows none of them, so such lines are reported malformed.
- dpo: {"chosen": [messages], "rejected": [messages]} -> JSONL {"prompt", "chosen", "rejected"} strings.

Files are read as a stream in chunks of lines and tokenized by a pool of worker processes, with at most a few
chunks in flight, so memory stays flat whatever the input size. Malformed lines are skipped, counted and listed;
an input with no usable record exits non-zero. Output goes to a temp file renamed at the end.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import os
import sys
import time
from collections import deque
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from model.arithmetic import KINDS, write_sets
from model.checkpoint import TOKENIZER_DIR, vocab_fingerprint
from model.dataset import (
    BLANK,
    TokenFileWriter,
    conversation_segments,
    parse_json_line,
    token_dtype,
    truncate_turns_with_bounds,
    validate_messages,
)
from model.errors import exit_on_usage_error

ROOT = Path(__file__).resolve().parent

csv.field_size_limit(sys.maxsize)

# ----------------------------------------------------------------------------------------------------------------
# reading: (file, first line number, raw lines) chunks, streamed


def _open_binary(path: Path):
    raw = open(path, "rb")
    stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.suffix == ".gz" else raw
    return raw, stream


def read_chunks(paths: list[Path], chunk_lines: int, progress: tqdm):
    """Yield (path, first_line_no, lines) with lines as raw bytes (decoded in the workers, so bad UTF-8 is counted
    per line). CSV rows come as already-parsed dicts."""
    done_bytes = 0
    for path in paths:
        raw, stream = _open_binary(path)
        with raw, stream:
            is_csv = path.name.removesuffix(".gz").endswith(".csv")
            if is_csv:
                text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="")
                rows = ({"text": row.get("text")} for row in csv.DictReader(text))
                lines = (json.dumps(row, ensure_ascii=False).encode() for row in rows)
                first_line = 2  # after the header row; numbers are CSV records, not physical lines
            else:
                lines, first_line = stream, 1
            chunk, lineno = [], first_line
            for line in lines:
                chunk.append(line)
                if len(chunk) == chunk_lines:
                    yield path.name, lineno, chunk
                    lineno += len(chunk)
                    chunk = []
                    progress.update(done_bytes + raw.tell() - progress.n)
            if chunk:
                yield path.name, lineno, chunk
            done_bytes += path.stat().st_size
            progress.update(done_bytes - progress.n)


def bounded_imap(pool, fn, items, max_pending: int):
    """Like pool.imap (results in order) but never reads more than max_pending items ahead: Pool.imap itself
    drains the whole input iterator into its task queue, which would load a big corpus into memory."""
    if pool is None:
        yield from map(fn, items)
        return
    pending = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= max_pending:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# ----------------------------------------------------------------------------------------------------------------
# workers: one tokenizer per process, loaded by the pool initializer

_worker = {}


def document_markers(tokenizer_dir: str) -> tuple[str, str]:
    """The tokens around each pretraining document: the tokenizer's own bos/eos (v1: <s> </s>; MiniMind-3:
    <|im_start|> <|im_end|>), from its tokenizer_config.json."""
    config_file = Path(tokenizer_dir) / "tokenizer_config.json"
    settings = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    return settings.get("bos_token") or "<s>", settings.get("eos_token") or "</s>"


def init_worker(stage: str, tokenizer_dir: str, dedup: bool, num_perm: int, max_seq_len: int | None):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the process pool
    _worker.update(stage=stage, dedup=dedup, num_perm=num_perm, max_seq_len=max_seq_len)
    if stage == "pretrain":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        tok.encode_special_tokens = True  # a literal "</s>" in a document is text, not a document boundary
        bos, eos = document_markers(tokenizer_dir)
        _worker.update(tok=tok, bos=tok.token_to_id(bos), eos=tok.token_to_id(eos))
    else:
        from model.checkpoint import load_tokenizer

        _worker["tok"] = load_tokenizer(tokenizer_dir)
    if dedup:
        import logging

        import jieba

        jieba.setLogLevel(logging.WARNING)
        jieba.initialize()


def minhash_signature(text: str, num_perm: int, shingle: int = 3):
    """MinHash over jieba word shingles: near-duplicate documents share most of their word 3-grams."""
    import jieba
    from datasketch import LeanMinHash, MinHash

    words = [w for w in jieba.lcut(text) if w.strip()]
    grams = {"".join(words[i:i + shingle]) for i in range(max(len(words) - shingle + 1, 1))}
    m = MinHash(num_perm=num_perm, seed=1)
    m.update_batch([g.encode("utf-8") for g in grams])
    return LeanMinHash(m)  # compact and picklable, to send back to the main process


def pretrain_chunk(chunk):
    name, first, lines = chunk
    texts, bad = [], []
    for i, line in enumerate(lines):
        obj, why = parse_json_line(line)
        if obj is not None:
            text = obj.get("text")
            if not isinstance(text, str):
                why = "missing or non-string 'text'"
            elif not text.strip():
                why = "empty 'text'"
            else:
                texts.append(text)
                continue
        if why != BLANK:
            bad.append((name, first + i, why))
    tok = _worker["tok"]
    docs = [np.array([_worker["bos"], *enc.ids, _worker["eos"]], dtype=np.uint32)
            for enc in tok.encode_batch(texts, add_special_tokens=False)]
    sigs = None
    if _worker["dedup"]:
        sigs = [(hashlib.md5(" ".join(t.split()).encode()).digest(), minhash_signature(t, _worker["num_perm"]))
                for t in texts]
    return dict(docs=docs, chars=[len(t) for t in texts], source=name, bad=bad,
                n_bytes=sum(len(x) for x in lines), sigs=sigs)


def sft_messages(obj: dict):
    """The conversation in a deepctrl-style or messages-style record, or a reason string if it has none."""
    msgs = obj.get("messages", obj.get("conversations"))
    if msgs is not None:
        return msgs if isinstance(msgs, list) else "'messages' is not a list"
    question = obj.get("input", obj.get("q"))
    answer = obj.get("output", obj.get("a"))
    instruction = obj.get("instruction") or ""
    if not isinstance(question, str) or not isinstance(answer, str) or not isinstance(instruction, str):
        return "missing or non-string 'input'/'q' or 'output'/'a'"
    question = "\n".join(p for p in (instruction, question) if p)
    if not question.strip() or not answer.strip():
        return "empty question or answer"
    history = obj.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 and
                                                all(isinstance(x, str) for x in h) for h in history):
        return "'history' must be a list of [question, answer] string pairs"
    msgs = []
    if isinstance(obj.get("system"), str) and obj["system"].strip():
        msgs.append({"role": "system", "content": obj["system"]})
    for q, a in history:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def sft_chunk(chunk):
    name, first, lines = chunk
    samples, bad, too_long = [], [], 0
    for i, line in enumerate(lines):
        obj, why = parse_json_line(line)
        if obj is not None:
            msgs = sft_messages(obj)
            if isinstance(msgs, str):
                why = msgs
            else:
                try:
                    ids, mask, bounds = conversation_segments(_worker["tok"], msgs, tools=obj.get("tools"))
                except ValueError as err:
                    why = str(err)
                else:
                    fitted = truncate_turns_with_bounds(ids, mask, bounds, _worker["max_seq_len"])
                    if fitted is None:
                        too_long += 1
                        continue
                    ids, mask, bounds = fitted
                    samples.append((np.array(ids, np.uint32), np.array(mask, np.uint8), np.array(bounds, np.uint32)))
                    continue
        if why != BLANK:
            bad.append((name, first + i, why))
    return dict(samples=samples, bad=bad, n_bytes=sum(len(x) for x in lines), too_long=too_long)


def dpo_prompt(tok, messages) -> str:
    """The shared prompt of a preference pair, up to where the answers differ: the conversation before the last
    message plus the template's generation prompt (MiniMind-3: `<|im_start|>assistant\n<think>\n\n</think>\n\n`;
    v1's template has none, its user turn already ends with `<s>assistant\n`), so the answers hold only the reply."""
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False)
    with_header = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(messages, tokenize=False)
    return with_header if full.startswith(with_header) else prompt


def dpo_chunk(chunk):
    name, first, lines = chunk
    records, bad, skipped = [], [], {"identical": 0, "prompt differs": 0}
    tok = _worker["tok"]
    for i, line in enumerate(lines):
        obj, why = parse_json_line(line)
        if obj is not None:
            chosen, rejected = obj.get("chosen"), obj.get("rejected")
            try:
                if not isinstance(chosen, list) or not isinstance(rejected, list):
                    raise ValueError("'chosen' and 'rejected' must be message lists")
                for msgs in (chosen, rejected):
                    validate_messages(msgs)
                if chosen[:-1] != rejected[:-1]:
                    skipped["prompt differs"] += 1
                    continue
                prompt = dpo_prompt(tok, chosen)
                good = tok.apply_chat_template(chosen, tokenize=False)[len(prompt):]
                worse = tok.apply_chat_template(rejected, tokenize=False)[len(prompt):]
                if good == worse:
                    skipped["identical"] += 1
                    continue
                records.append({"prompt": prompt, "chosen": good, "rejected": worse})
                continue
            except ValueError as err:
                why = str(err)
        if why != BLANK:
            bad.append((name, first + i, why))
    return dict(records=records, bad=bad, n_bytes=sum(len(x) for x in lines), skipped=skipped)


# ----------------------------------------------------------------------------------------------------------------
# sinks: collect worker results into the output file


def read_tokenizer_file(tokenizer_dir: str):
    """The folder's tokenizer.json through the tokenizers library (quicker than transformers, enough here)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))


def tokenizer_vocab_size(tokenizer_dir: str) -> int:
    """How many token ids the tokenizer can produce (added tokens included), which sizes the `tokens` dtype."""
    return read_tokenizer_file(tokenizer_dir).get_vocab_size(with_added_tokens=True)


class PretrainSink:
    """Writes `tokens` and `doc_offsets`, and per document its input file (`doc_source`, an index into the header's
    meta["source_names"]) and its length in characters (`doc_chars`), which 1-pretrain.py's --mix and
    --max_doc_chars read."""

    def __init__(self, out: Path, vocab_size: int, dedup_threshold: float | None, num_perm: int):
        self.writer = TokenFileWriter(out, "pretrain", {"tokens": token_dtype(vocab_size), "doc_offsets": "uint64",
                                                        "doc_source": "uint16", "doc_chars": "uint32"})
        self.writer.append("doc_offsets", [0])
        self.source_names: list[str] = []
        self.n_tokens = self.kept = self.duplicates = 0
        self.lsh = self.seen = None
        if dedup_threshold is not None:
            from datasketch import MinHashLSH

            self.lsh, self.seen, self.num_perm = MinHashLSH(threshold=dedup_threshold, num_perm=num_perm), set(), num_perm

    def is_duplicate(self, exact_key, m) -> bool:
        if exact_key in self.seen:
            return True
        if self.lsh.query(m):
            return True
        self.seen.add(exact_key)
        self.lsh.insert(str(len(self.seen)), m, check_duplication=False)
        return False

    def add(self, result):
        docs, chars = result["docs"], result["chars"]
        if self.lsh is not None:
            keep = [not self.is_duplicate(*sig) for sig in result["sigs"]]
            self.duplicates += keep.count(False)
            docs = [d for d, k in zip(docs, keep) if k]
            chars = [c for c, k in zip(chars, keep) if k]
        if not docs:
            return
        if result["source"] not in self.source_names:  # inputs with the same file name count as one source
            self.source_names.append(result["source"])
        lengths = np.array([len(d) for d in docs], dtype=np.uint64)
        self.writer.append("tokens", np.concatenate(docs))
        self.writer.append("doc_offsets", self.n_tokens + np.cumsum(lengths))
        self.writer.append("doc_source", np.full(len(docs), self.source_names.index(result["source"])))
        self.writer.append("doc_chars", np.array(chars, dtype=np.int64))
        self.n_tokens += int(lengths.sum())
        self.kept += len(docs)

    def summary(self):
        s = f"{self.kept:,} documents, {self.n_tokens:,} tokens"
        if self.lsh is not None:
            s += f"; dedup dropped {self.duplicates:,} exact/near-duplicate documents"
        return s


class SFTSink:
    def __init__(self, out: Path, vocab_size: int):
        self.writer = TokenFileWriter(out, "sft", {"tokens": token_dtype(vocab_size), "answer_mask": "uint8",
                                                   "sample_offsets": "uint64", "turn_bounds": "uint32",
                                                   "turn_offsets": "uint64"})
        self.writer.append("sample_offsets", [0])
        self.writer.append("turn_offsets", [0])
        self.kept = self.n_tokens = self.n_bounds = self.too_long = self.answer_tokens = 0

    def add(self, result):
        self.too_long += result["too_long"]
        for ids, mask, bounds in result["samples"]:
            self.writer.append("tokens", ids)
            self.writer.append("answer_mask", mask)
            self.writer.append("turn_bounds", bounds)
            self.n_tokens += len(ids)
            self.n_bounds += len(bounds)
            self.answer_tokens += int(mask.sum())
            self.writer.append("sample_offsets", [self.n_tokens])
            self.writer.append("turn_offsets", [self.n_bounds])
            self.kept += 1

    def summary(self):
        return (f"{self.kept:,} conversations, {self.n_tokens:,} tokens ({self.answer_tokens:,} answer tokens); "
                f"{self.too_long:,} dropped with no answer token left after truncation")


class DPOSink:
    def __init__(self, out: Path):
        import tempfile

        out.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        self.f, self.out = os.fdopen(fd, "w", encoding="utf-8"), out
        self.kept, self.skipped = 0, {"identical": 0, "prompt differs": 0}
        self.writer = self  # close()/abort() like the token-file writers

    def add(self, result):
        for rec in result["records"]:
            self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.kept += len(result["records"])
        for k, v in result["skipped"].items():
            self.skipped[k] += v

    def close(self, meta=None):
        self.f.close()
        os.replace(self.tmp, self.out)

    def abort(self):
        self.f.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)

    def summary(self):
        return (f"{self.kept:,} preference pairs; skipped {self.skipped['identical']:,} with identical chosen and "
                f"rejected, {self.skipped['prompt differs']:,} whose chosen and rejected prompts differ")


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    for stage in ("pretrain", "sft", "dpo"):
        p = sub.add_parser(stage)
        p.add_argument("--input", nargs="+", required=True, help=".jsonl / .jsonl.gz (pretrain: also .csv)")
        p.add_argument("--output", required=True)
        p.add_argument("--tokenizer", default=str(TOKENIZER_DIR),
                       help="tokenizer folder; its chat template renders sft/dpo data (MiniMind-3: "
                            "model/minimind3_tokenizer)")
        p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (1: inline)")
        p.add_argument("--chunk_lines", type=int, default=1000, help="lines per task sent to a worker")
        if stage == "pretrain":
            p.add_argument("--dedup", action="store_true", help="drop exact and near-duplicate documents")
            p.add_argument("--dedup_threshold", type=float, default=0.8, help="MinHash Jaccard threshold")
            p.add_argument("--num_perm", type=int, default=128, help="MinHash permutations")
        if stage == "sft":
            p.add_argument("--max_seq_len", type=int, default=512, help="truncate conversations to this many tokens")
    p = sub.add_parser("arithmetic", help="generate the GRPO arithmetic set and its SFT cold start")
    p.add_argument("--task", choices=["math", "tools"], default="math")
    p.add_argument("--n", type=int, default=2000, help="problems in each file")
    p.add_argument("--max_value", type=int, default=20, help="largest operand of sums and differences")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS), help="which operations")
    p.add_argument("--word_share", type=float, default=0.5, help="share of word problems")
    p.add_argument("--thinking", action="store_true", help="SFT replies put the working in reasoning_content")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="GRPO prompts (default dataset/grpo_arithmetic.jsonl)")
    p.add_argument("--sft_output", default=None, help="SFT dialogues (default dataset/sft_arithmetic.jsonl)")
    return parser.parse_args(argv)


def write_arithmetic(args) -> int:
    stem = "tools" if args.task == "tools" else "arithmetic"
    grpo = Path(args.output or ROOT / "dataset" / f"grpo_{stem}.jsonl")
    sft = Path(args.sft_output or ROOT / "dataset" / f"sft_{stem}.jsonl")
    n_rl, n_sft = write_sets(grpo, sft, args.n, args.seed, args.max_value, args.task, args.thinking, args.kinds,
                             args.word_share)
    print(f"wrote {grpo} ({n_rl:,} GRPO prompts with answers) and {sft} ({n_sft:,} SFT dialogues)")
    return 0


def make_sink(args, out: Path, dedup: bool, num_perm: int):
    """The stage's output writer and the worker function that feeds it."""
    if args.stage == "pretrain":
        threshold = args.dedup_threshold if dedup else None
        return PretrainSink(out, tokenizer_vocab_size(args.tokenizer), threshold, num_perm), pretrain_chunk
    if args.stage == "sft":
        return SFTSink(out, tokenizer_vocab_size(args.tokenizer)), sft_chunk
    return DPOSink(out), dpo_chunk


def tokenizer_record(tokenizer_dir) -> dict:
    """What the token file's header says made it (the training scripts compare the fingerprint with theirs)."""
    return {"path": str(tokenizer_dir), "vocab_sha256": vocab_fingerprint(read_tokenizer_file(tokenizer_dir))}


@exit_on_usage_error
def main(argv=None):
    args = parse_args(argv)
    if args.stage == "arithmetic":
        return write_arithmetic(args)

    paths = [Path(p) for p in args.input]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        sys.exit(f"error: input not found: {', '.join(missing)}")
    if not (Path(args.tokenizer) / "tokenizer.json").exists():
        sys.exit(f"error: no tokenizer at {args.tokenizer} (run train_tokenizer.py or pass --tokenizer)")
    out = Path(args.output)
    dedup = getattr(args, "dedup", False)
    num_perm = getattr(args, "num_perm", 128)

    sink, work = make_sink(args, out, dedup, num_perm)

    init_args = (args.stage, args.tokenizer, dedup, num_perm, getattr(args, "max_seq_len", None))
    bad, n_bytes, start = [], 0, time.time()
    total_bytes = sum(p.stat().st_size for p in paths)
    progress = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"{args.stage} tokenize", disable=None)
    pool = None
    try:
        if args.workers > 1:
            ctx = get_context("fork" if sys.platform.startswith("linux") else "spawn")
            pool = ctx.Pool(args.workers, initializer=init_worker, initargs=init_args)
        else:
            init_worker(*init_args)
        for result in bounded_imap(pool, work, read_chunks(paths, args.chunk_lines, progress), 2 * args.workers):
            sink.add(result)
            bad += result["bad"]
            n_bytes += result["n_bytes"]
        progress.close()
        kept = sink.kept
        if kept == 0:
            sink.writer.abort()
            where = ", ".join(f"{n}:{ln} ({why})" for n, ln, why in bad[:5]) or "the input has no records"
            sys.exit(f"error: no usable {args.stage} records in {', '.join(map(str, paths))}; "
                     f"{len(bad)} malformed line(s), first: {where}. Nothing was written.")
        meta = {"sources": [p.name for p in paths], "summary": sink.summary(), "malformed_lines": len(bad),
                "tokenizer": tokenizer_record(args.tokenizer)}
        if args.stage == "pretrain":
            meta["source_names"] = sink.source_names
        sink.writer.close(meta=meta)
    except BaseException:
        sink.writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
    elapsed = time.time() - start
    print(f"wrote {out}: {sink.summary()}")
    if bad:
        first = ", ".join(f"{n}:{ln} ({why})" for n, ln, why in bad[:10])
        print(f"skipped {len(bad):,} malformed line(s); first: {first}")
    else:
        print("skipped 0 malformed lines")
    print(f"{n_bytes / 1e6:.2f} MB of input text in {elapsed:.1f}s = {n_bytes / 1e6 / max(elapsed, 1e-9):.2f} MB/s "
          f"with {max(args.workers, 1)} worker(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
