"""Train MiniMind's byte-level BPE tokenizer.

Reads ``.jsonl`` / ``.jsonl.gz`` files (streamed, never loaded whole) whose lines are ``{"text": "..."}`` objects
or SFT dialogues (deepctrl ``{"history", "input", "output"}`` or ``{"messages"/"conversations": [...]}``, whose
turns are joined into one text), trains a byte-level BPE with the HF ``tokenizers`` library and writes
``tokenizer.json`` + ``tokenizer_config.json`` (with the family's chat template) so that
``transformers.AutoTokenizer.from_pretrained(tokenizer_dir)`` loads it.

Two families: ``v1`` (the default: ``<unk>``/``<s>``/``</s>`` and v1's chat format) and ``minimind-3`` (Qwen-style
specials ``<|endoftext|>``=0, ``<|im_start|>``=1, ``<|im_end|>``=2, ..., ``<think>``=25, ``</think>``=26 and the
ChatML template with thinking and tool calls, see model/chat_template3.py).

Usage::

    python train_tokenizer.py --data_path '../shared/data/pretrain_zh-0*.jsonl.gz'
    python train_tokenizer.py --data_path a.jsonl b.jsonl.gz --vocab_size 6400 \\
        --tokenizer_dir model/minimind_tokenizer --max_docs 20000
    python train_tokenizer.py --family minimind-3 --max_docs 40000 \\
        --data_path ../shared/data/pretrain_zh-00.jsonl.gz ../shared/data/sft_zh.jsonl.gz

Every ``--eval_every``-th usable document is held out of training (up to ``--eval_chars``
characters) and used to report characters per token at the end.
"""

import argparse
import glob
import itertools
import json
import os
import sys
import time

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model import chat_template3
from model.dataset import iter_json_lines

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")
DEFAULT_DIR = os.path.join(MODEL_DIR, "minimind_tokenizer")
DEFAULT_DIR_3 = os.path.join(MODEL_DIR, "minimind3_tokenizer")

# MiniMind v1 chat format: an optional leading system prompt verbatim, then
# "<s>user\n{q}</s>\n<s>assistant\n" per user turn and "{a}</s>\n" per assistant turn.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] }}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '<s>user\\n' + message['content'] + '</s>\\n<s>assistant\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ message['content'] + '</s>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def tokenizer_config(bos, eos, unk, pad, chat_template, **extra):
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        **extra,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template,
    }


# family -> (special tokens, in id order; default output folder; tokenizer_config.json)
FAMILIES = {
    "v1": (SPECIAL_TOKENS, DEFAULT_DIR, tokenizer_config("<s>", "</s>", "<unk>", "<unk>", CHAT_TEMPLATE)),
    # As MiniMind-3 publishes it: <|im_end|> ends every turn, so generation stops there and the SFT answer mask
    # (which trains the eos token after an answer) teaches it; <|endoftext|> pads. The byte-level BPE never
    # produces an unknown token; unk_token is named only because some tools expect one.
    "minimind-3": (chat_template3.SPECIAL_TOKENS, DEFAULT_DIR_3, tokenizer_config(
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|endoftext|>", chat_template3.CHAT_TEMPLATE,
        additional_special_tokens=chat_template3.SPECIAL_TOKENS[1:])),
}


def record_text(obj):
    """The text one record contributes: its "text", or the turns of an SFT dialogue (deepctrl history/instruction/
    input/output, or a messages/conversations list) joined by newlines. None if it has none."""
    if "text" in obj:
        return obj["text"] if isinstance(obj["text"], str) and obj["text"] else None
    messages = obj.get("messages", obj.get("conversations"))
    if isinstance(messages, list):
        parts = [m.get(key) for m in messages if isinstance(m, dict) for key in ("reasoning_content", "content")]
    else:
        history = obj.get("history") if isinstance(obj.get("history"), list) else []
        parts = [x for pair in history if isinstance(pair, (list, tuple)) for x in pair]
        parts += [obj.get("instruction"), obj.get("input", obj.get("q")), obj.get("output", obj.get("a"))]
    return "\n".join(p for p in parts if isinstance(p, str) and p) or None


class Corpus:
    """Streams usable texts from jsonl(.gz) files, counting and remembering bad lines."""

    def __init__(self, files, max_docs=None, eval_every=100, eval_chars=1_000_000, max_docs_per_file=None,
                 max_chars_per_file=None):
        self.files, self.max_docs, self.max_docs_per_file = files, max_docs, max_docs_per_file
        self.max_chars_per_file = max_chars_per_file
        self.eval_every, self.eval_chars = eval_every, eval_chars
        self.used = self.train_docs = self.train_chars = self.skipped = 0
        self.skip_examples = []  # first few "file:line (reason)"
        self.held_out = []  # (file, text)
        self.held_out_chars = 0

    def _skip(self, path, lineno, reason):
        self.skipped += 1
        if len(self.skip_examples) < 5:
            self.skip_examples.append(f"{path}:{lineno} ({reason})")

    def _file_texts(self, path):
        for lineno, obj, why in iter_json_lines(path):
            if why:
                self._skip(path, lineno, why)
                continue
            text = record_text(obj)
            if text is None:
                self._skip(path, lineno, "no non-empty string 'text' or dialogue")
                continue
            yield path, text

    def _texts(self):
        for path in self.files:
            chars = 0
            for path_text in itertools.islice(self._file_texts(path), self.max_docs_per_file):
                if self.max_chars_per_file is not None and chars >= self.max_chars_per_file:
                    break
                chars += len(path_text[1])
                yield path_text

    def __iter__(self):
        for path, text in itertools.islice(self._texts(), self.max_docs):
            self.used += 1
            if self.eval_every and self.used % self.eval_every == 0 and self.held_out_chars < self.eval_chars:
                self.held_out.append((path, text))
                self.held_out_chars += len(text)
                continue
            self.train_docs += 1
            self.train_chars += len(text)
            yield text


def expand_paths(patterns):
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) or ([pattern] if os.path.isfile(pattern) else [])
        if not matches:
            sys.exit(f"error: --data_path {pattern!r} matches no file")
        files += [m for m in matches if m not in files]
    return files


def write_atomic(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", nargs="+", required=True, help="jsonl/jsonl.gz files or glob patterns")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="v1",
                        help="special tokens and chat template: v1's or MiniMind-3's (Qwen-style ChatML)")
    parser.add_argument("--vocab_size", type=int, default=6400)
    parser.add_argument("--tokenizer_dir", default=None, help="output folder (default: the family's bundled one)")
    parser.add_argument("--max_docs", type=int, default=None, help="read at most this many usable documents")
    parser.add_argument("--max_docs_per_file", type=int, default=None,
                        help="read at most this many usable documents from each file (to mix sources)")
    parser.add_argument("--max_chars_per_file", type=int, default=None,
                        help="read documents from each file until it has given this many characters (to balance "
                             "sources of different sizes by text, not by document count)")
    parser.add_argument("--eval_every", type=int, default=100, help="hold out every N-th document (0: none)")
    parser.add_argument("--eval_chars", type=int, default=1_000_000, help="cap on held-out characters")
    return parser.parse_args()


def first_text_or_exit(corpus, n_files):
    """The corpus stream, checked to yield something, so that a corpus with no usable text fails before training."""
    stream = iter(corpus)
    first = next(stream, None)
    if first is None:
        if corpus.used:
            sys.exit(f"error: all {corpus.used} usable documents were held out; lower --eval_every")
        sys.exit(f"error: no usable 'text' found in {n_files} file(s); skipped {corpus.skipped} bad line(s): "
                 f"{', '.join(corpus.skip_examples) or '-'}")
    return itertools.chain([first], stream)


def train(stream, special_tokens, vocab_size):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,  # given ids 0, 1, ... in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any UTF-8 round-trips
        show_progress=sys.stderr.isatty(),
    )
    tokenizer.train_from_iterator(stream, trainer=trainer)
    for i, tok in enumerate(special_tokens):
        assert tokenizer.token_to_id(tok) == i, f"{tok} should have id {i}"
    return tokenizer


def report_held_out(tokenizer, held_out):
    """Characters per token on the held-out documents: overall, and per file when there are several."""
    if not held_out:
        print("held-out sample: none (corpus smaller than --eval_every)")
        return
    groups = {"held-out sample": [text for _, text in held_out]}
    files = sorted({path for path, _ in held_out})
    if len(files) > 1:
        groups.update({f"  {path}": [text for p, text in held_out if p == path] for path in files})
    for label, texts in groups.items():
        chars = sum(map(len, texts))
        n_tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
        print(f"{label}: {chars:,} chars / {n_tokens:,} tokens = {chars / max(n_tokens, 1):.3f} chars/token")


def main():
    args = parse_args()
    special_tokens, default_dir, config = FAMILIES[args.family]
    tokenizer_dir = args.tokenizer_dir or default_dir
    files = expand_paths(args.data_path)
    print(f"training a {args.family} tokenizer on {len(files)} file(s): {', '.join(files)}")
    corpus = Corpus(files, args.max_docs, args.eval_every, args.eval_chars, args.max_docs_per_file,
                    args.max_chars_per_file)
    stream = first_text_or_exit(corpus, len(files))

    start = time.time()
    tokenizer = train(stream, special_tokens, args.vocab_size)
    print(f"trained in {time.time() - start:.1f}s on {corpus.train_docs} docs ({corpus.train_chars:,} chars); "
          f"held out {len(corpus.held_out)} docs")
    if corpus.skipped:
        print(f"skipped {corpus.skipped} bad line(s); first: {', '.join(corpus.skip_examples)}")

    os.makedirs(tokenizer_dir, exist_ok=True)
    write_atomic(os.path.join(tokenizer_dir, "tokenizer.json"), tokenizer.to_str(pretty=True))
    write_atomic(os.path.join(tokenizer_dir, "tokenizer_config.json"),
                 json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    print(f"saved to {tokenizer_dir}; vocab size {tokenizer.get_vocab_size()}")
    report_held_out(tokenizer, corpus.held_out)


if __name__ == "__main__":
    main()
