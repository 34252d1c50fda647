"""Train MiniMind's byte-level BPE tokenizer.

Reads ``.jsonl`` / ``.jsonl.gz`` files whose lines are ``{"text": "..."}`` objects (streamed,
never loaded whole), trains a byte-level BPE with the HF ``tokenizers`` library and writes
``tokenizer.json`` + ``tokenizer_config.json`` (with MiniMind's chat template) so that
``transformers.AutoTokenizer.from_pretrained(tokenizer_dir)`` loads it.

Usage::

    python train_tokenizer.py --data_path '../shared/data/pretrain_zh-0*.jsonl.gz'
    python train_tokenizer.py --data_path a.jsonl b.jsonl.gz --vocab_size 6400 \\
        --tokenizer_dir model/minimind_tokenizer --max_docs 20000

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

from model.dataset import iter_json_lines

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model", "minimind_tokenizer")

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


class Corpus:
    """Streams usable texts from jsonl(.gz) files, counting and remembering bad lines."""

    def __init__(self, files, max_docs=None, eval_every=100, eval_chars=1_000_000):
        self.files, self.max_docs = files, max_docs
        self.eval_every, self.eval_chars = eval_every, eval_chars
        self.used = self.train_docs = self.train_chars = self.skipped = 0
        self.skip_examples = []  # first few "file:line (reason)"
        self.held_out = []
        self.held_out_chars = 0

    def _skip(self, path, lineno, reason):
        self.skipped += 1
        if len(self.skip_examples) < 5:
            self.skip_examples.append(f"{path}:{lineno} ({reason})")

    def _texts(self):
        for path in self.files:
            for lineno, obj, why in iter_json_lines(path):
                if why:
                    self._skip(path, lineno, why)
                    continue
                text = obj.get("text")
                if not isinstance(text, str) or not text:
                    self._skip(path, lineno, "missing, empty or non-string 'text'")
                    continue
                yield text

    def __iter__(self):
        for text in itertools.islice(self._texts(), self.max_docs):
            self.used += 1
            if self.eval_every and self.used % self.eval_every == 0 and self.held_out_chars < self.eval_chars:
                self.held_out.append(text)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", nargs="+", required=True, help="jsonl/jsonl.gz files or glob patterns")
    parser.add_argument("--vocab_size", type=int, default=6400)
    parser.add_argument("--tokenizer_dir", default=DEFAULT_DIR)
    parser.add_argument("--max_docs", type=int, default=None, help="read at most this many usable documents")
    parser.add_argument("--eval_every", type=int, default=100, help="hold out every N-th document (0: none)")
    parser.add_argument("--eval_chars", type=int, default=1_000_000, help="cap on held-out characters")
    args = parser.parse_args()

    files = expand_paths(args.data_path)
    print(f"training on {len(files)} file(s): {', '.join(files)}")
    corpus = Corpus(files, args.max_docs, args.eval_every, args.eval_chars)

    # Peek so that a corpus with no usable text fails before training.
    stream = iter(corpus)
    first = next(stream, None)
    if first is None:
        if corpus.used:
            sys.exit(f"error: all {corpus.used} usable documents were held out; lower --eval_every")
        sys.exit(f"error: no usable 'text' found in {len(files)} file(s); skipped {corpus.skipped} bad line(s): "
                 f"{', '.join(corpus.skip_examples) or '-'}")
    stream = itertools.chain([first], stream)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any UTF-8 round-trips
        show_progress=sys.stderr.isatty(),
    )
    start = time.time()
    tokenizer.train_from_iterator(stream, trainer=trainer)
    print(f"trained in {time.time() - start:.1f}s on {corpus.train_docs} docs ({corpus.train_chars:,} chars); "
          f"held out {len(corpus.held_out)} docs")
    if corpus.skipped:
        print(f"skipped {corpus.skipped} bad line(s); first: {', '.join(corpus.skip_examples)}")
    for i, tok in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(tok) == i, f"{tok} should have id {i}"

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    os.makedirs(args.tokenizer_dir, exist_ok=True)
    write_atomic(os.path.join(args.tokenizer_dir, "tokenizer.json"), tokenizer.to_str(pretty=True))
    write_atomic(os.path.join(args.tokenizer_dir, "tokenizer_config.json"),
                 json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    print(f"saved to {args.tokenizer_dir}; vocab size {tokenizer.get_vocab_size()}")

    if corpus.held_out:
        n_tokens = sum(len(e.ids) for e in tokenizer.encode_batch(corpus.held_out, add_special_tokens=False))
        print(f"held-out sample: {corpus.held_out_chars:,} chars / {n_tokens:,} tokens = "
              f"{corpus.held_out_chars / max(n_tokens, 1):.3f} chars/token")
    else:
        print("held-out sample: none (corpus smaller than --eval_every)")


if __name__ == "__main__":
    main()
