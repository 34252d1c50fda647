"""Datasets over the files `data_process.py` writes, and the on-disk format they share.

Token files (pretrain and SFT) are one binary each: a small JSON header, then flat numpy arrays that training
memory-maps, so a 10 GB corpus costs page cache, not RAM:

    bytes 0-7    b"MINIMIND"
    bytes 8-15   header length (little-endian uint64)
    bytes 16-    header JSON: {"kind", "version", "arrays": {name: {"dtype", "offset", "length"}}, "meta": {...}}
    offset ...   each array, 64-byte aligned

The header is written last, after every array is on disk, and the file is renamed into place only then; a
reader also checks every array lies inside the file. So a killed or truncated run never yields a file that
training accepts.

- pretrain: `tokens` (each document as <s> ... </s>, back to back) and `doc_offsets` (uint64, n_docs + 1).
- sft: `tokens`, `answer_mask` (uint8, 1 on assistant-answer tokens), `sample_offsets` (uint64, n + 1), and the
  turn boundaries used to re-truncate: `turn_bounds` (uint32, per sample [system_end, pair_1_end, ...], relative to
  the sample start) with `turn_offsets` (uint64, n + 1) into it.

`tokens` is uint16 when the vocabulary fits, else uint32 (`token_dtype`); readers take the dtype from the header.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .errors import UsageError

MAGIC = b"MINIMIND"
FORMAT_VERSION = 1
HEADER_RESERVED = 1 << 16  # room for the JSON header in front of the first array
ALIGN = 64
IGNORE_INDEX = -100


class DataFileError(UsageError):
    """A data file that is missing, of the wrong kind, truncated or corrupt; the message says how to rebuild it."""


# ----------------------------------------------------------------------------------------------------------------
# the token file format


def token_dtype(vocab_size: int) -> str:
    """The dtype of a token file's `tokens` for ids 0..vocab_size-1: uint16 halves the file when it is enough."""
    if not 0 < vocab_size <= 1 << 32:
        raise ValueError(f"vocab_size {vocab_size} is outside 1..{1 << 32}, which a token file can hold")
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


# ----------------------------------------------------------------------------------------------------------------
# raw JSON-lines input (shared by data_process.py, train_tokenizer.py and the DPO loader)

BLANK = "blank line"


def parse_json_line(line: bytes | str) -> tuple[dict | None, str | None]:
    """One raw line -> (JSON object, None), or (None, why it is unusable). Blank lines give (None, BLANK)."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid UTF-8"
    if not line.strip():
        return None, BLANK
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None, "invalid JSON"
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    return obj, None


def iter_json_lines(path: str | os.PathLike):
    """Stream a .jsonl or .jsonl.gz file as (line number, object or None, reason or None); blank lines are skipped."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            obj, why = parse_json_line(line)
            if why != BLANK:
                yield lineno, obj, why


class TokenFileWriter:
    """Streams named arrays into a token file: the first array straight into the output's temp file, the others
    into side temp files appended at the end. `close()` writes the header and renames; `abort()` leaves nothing.

        with TokenFileWriter(path, "pretrain") as w:
            w.append("tokens", np.array([...], np.uint16)); w.append("doc_offsets", ...)
            w.close(meta={...})   # without close (an exception), the temp files are removed
    """

    def __init__(self, path: str | os.PathLike, kind: str, arrays: dict[str, str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.kind = kind
        self.dtypes = {name: np.dtype(dt) for name, dt in arrays.items()}
        self.lengths = dict.fromkeys(arrays, 0)
        self.files, self.tmp_paths = {}, {}
        for name in arrays:
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.{name}.", suffix=".tmp")
            self.files[name] = os.fdopen(fd, "wb")
            self.tmp_paths[name] = tmp
        self.main = next(iter(arrays))
        self.files[self.main].seek(HEADER_RESERVED)
        self.done = False

    def append(self, name: str, values) -> None:
        dtype = self.dtypes[name]
        arr = np.asarray(values)
        if arr.size and arr.dtype.kind in "iu" and dtype.kind in "iu":  # numpy's cast would wrap silently
            lo, hi, low, high = np.iinfo(dtype).min, np.iinfo(dtype).max, arr.min(), arr.max()
            if low < lo or high > hi:
                bad = high if high > hi else low
                raise DataFileError(f"{self.path}: {name} value {bad} does not fit {dtype} ({lo}..{hi}); "
                                 f"the file was declared with too small a dtype")
        arr = arr.astype(dtype, copy=False)
        self.files[name].write(arr.tobytes())
        self.lengths[name] += arr.size

    def close(self, meta: dict | None = None) -> Path:
        out = self.files[self.main]
        layout = {self.main: {"dtype": self.dtypes[self.main].name, "offset": HEADER_RESERVED,
                              "length": self.lengths[self.main]}}
        for name, f in self.files.items():
            if name == self.main:
                continue
            f.close()
            pos = out.tell()
            pad = (-pos) % ALIGN
            out.write(b"\0" * pad)
            layout[name] = {"dtype": self.dtypes[name].name, "offset": pos + pad, "length": self.lengths[name]}
            with open(self.tmp_paths[name], "rb") as side:
                shutil.copyfileobj(side, out, 1 << 24)
        header = json.dumps({"kind": self.kind, "version": FORMAT_VERSION, "arrays": layout, "meta": meta or {}},
                            ensure_ascii=False).encode()
        if 16 + len(header) > HEADER_RESERVED:
            raise ValueError(f"token file header too large ({len(header)} bytes)")
        out.seek(0)
        out.write(MAGIC + len(header).to_bytes(8, "little") + header)
        out.flush()
        os.fsync(out.fileno())
        out.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp_paths[self.main], 0o666 & ~umask)  # mkstemp made it owner-only
        os.replace(self.tmp_paths[self.main], self.path)
        self.done = True
        self._cleanup()
        return self.path

    def abort(self) -> None:
        self._cleanup()

    def _cleanup(self):
        for name, f in self.files.items():
            if not f.closed:
                f.close()
            if not (self.done and name == self.main) and os.path.exists(self.tmp_paths[name]):
                os.unlink(self.tmp_paths[name])

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.done:
            self.abort()


def read_token_file_header(path: str | os.PathLike, kind: str | None = None) -> dict:
    """The header of a token file, after checking magic, version, kind and that every array fits in the file."""
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"{path} not found; make it with `python data_process.py {kind or 'pretrain'} ...`")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
        if len(head) < 16 or head[:8] != MAGIC:
            raise DataFileError(f"{path} is not a MiniMind token file (bad magic); make it with data_process.py")
        try:
            header = json.loads(f.read(int.from_bytes(head[8:16], "little")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict) or not isinstance(header.get("arrays"), dict):
        raise DataFileError(f"{path} has a corrupt header; re-run data_process.py to rebuild it")
    if header.get("version") != FORMAT_VERSION:
        raise DataFileError(f"{path}: token file version {header.get('version')}, expected {FORMAT_VERSION}")
    if kind is not None and header.get("kind") != kind:
        raise DataFileError(f"{path} holds {header.get('kind')!r} data, expected {kind!r} "
                         f"(make it with `python data_process.py {kind} ...`)")
    for name, a in header["arrays"].items():
        end = a["offset"] + a["length"] * np.dtype(a["dtype"]).itemsize
        if end > size:
            raise DataFileError(f"{path} is truncated: array {name!r} ends at byte {end}, file has {size}")
    return header


def open_token_file(path: str | os.PathLike, kind: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, {name: read-only memory-mapped array})."""
    header = read_token_file_header(path, kind)
    arrays = {}
    for name, a in header["arrays"].items():
        if a["length"] == 0:
            arrays[name] = np.zeros(0, dtype=a["dtype"])
        else:
            arrays[name] = np.memmap(path, dtype=a["dtype"], mode="r", offset=a["offset"], shape=(a["length"],))
    return header, arrays


class _MappedFile:
    """Opens its arrays lazily in each process, so DataLoader workers map the file instead of pickling it."""

    def __init__(self, path, kind):
        self.path, self.kind = str(path), kind
        self.header = read_token_file_header(path, kind)
        self._arrays = None

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = open_token_file(self.path, self.kind)[1]
        return self._arrays

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"] = None
        return state


# ----------------------------------------------------------------------------------------------------------------
# pretraining


class PretrainDataset(Dataset):
    """Packed windows over the document stream: item i is tokens[i*T : i*T + T + 1], no padding anywhere.

    Windows overlap by one token, so every token after the first is a prediction target exactly once per epoch
    (the last `< T` tokens of the corpus are left out). Items: `input_ids` and `targets` (already shifted, v1's
    convention), each (T,).

    Documents are separated by their <s> ... </s> tokens. By default attention runs causally across the whole
    window (one fused flash-attention call; the model learns that <s> starts afresh). With `doc_mask=True` each
    item also gets `position_ids` counting from each document's start and `document_ids` (0, 1, ... per document in
    the window), so the model attends block-diagonally and no token attends across a document boundary (on CUDA
    under torch.compile through flex_attention's block-sparse kernel, elsewhere SDPA with a dense mask).
    """

    def __init__(self, path: str | os.PathLike, seq_len: int, doc_mask: bool = False):
        self.file = _MappedFile(path, "pretrain")
        self.seq_len = seq_len
        self.doc_mask = doc_mask
        arrays = self.file.header["arrays"]
        self.n_tokens = arrays["tokens"]["length"]
        self.n_docs = max(arrays["doc_offsets"]["length"] - 1, 0)
        self.n_windows = max((self.n_tokens - 1) // seq_len, 0)
        if self.n_windows == 0:
            raise DataFileError(f"{path} has {self.n_tokens} tokens: not enough for one window of {seq_len + 1}")

    def __len__(self) -> int:
        return self.n_windows

    def window_bounds(self, index: int) -> tuple[int, int]:
        start = index * self.seq_len
        return start, start + self.seq_len + 1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.n_windows:
            raise IndexError(index)
        start, end = self.window_bounds(index)
        window = torch.from_numpy(self.file.arrays["tokens"][start:end].astype(np.int64))
        item = {"input_ids": window[:-1], "targets": window[1:]}
        if self.doc_mask:
            offsets = self.file.arrays["doc_offsets"]
            positions = np.arange(start, end - 1)
            doc = np.searchsorted(offsets, positions, side="right") - 1
            item["position_ids"] = torch.from_numpy(positions - offsets[doc].astype(np.int64))
            item["document_ids"] = torch.from_numpy(doc - doc[0])
        return item


class ShardedSampler(Sampler[int]):
    """Deterministic per-epoch shuffle, split across ranks without overlap (a DistributedSampler that can start
    mid-epoch, for exact resume).

    Epoch e's order is a permutation seeded by (seed, e), the same on every rank; rank r takes positions
    r, r + W, r + 2W, ... of it, after dropping the last `n % W` so every rank gets the same count.
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start = 0, 0
        self.per_rank = num_samples // world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch, and skip this rank's first `start` samples of it (those already trained on)."""
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        order = order[: self.per_rank * self.world_size]
        return order[self.rank::self.world_size][self.start:].tolist()

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        return max(self.per_rank - self.start, 0)


# ----------------------------------------------------------------------------------------------------------------
# SFT: chat-template rendering with an answer-only mask


def validate_messages(messages, last_role: str = "assistant") -> None:
    """Raise ValueError unless `messages` is an optional system message, then user/assistant turns alternating
    from a user turn, ending with a `last_role` message ("assistant" for training data, "user" for a prompt)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError("each message must be a dict with string 'role' and 'content'")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns or len(turns) % 2 != (last_role == "user"):
        raise ValueError("after an optional system message, messages must alternate user/assistant and end with "
                         f"a{'n' if last_role == 'assistant' else ''} {last_role} message")
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"message {i} should be role {want!r}, got {m['role']!r}")


def _render(tokenizer, messages) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(list(messages), tokenize=False)


def _encode_text(tokenizer, text: str, literal: bool) -> list[int]:
    """Token ids of `text`. literal=True never turns '<s>' etc. inside user data into special tokens."""
    if not text:
        return []
    return tokenizer(text, add_special_tokens=False, split_special_tokens=literal)["input_ids"]


_PROBE = "\x00MINIMIND-CONTENT\x00"  # stands in for a message's content to find the template text around it


def _encode_messages(tokenizer, messages):
    """Yield (message, pre, body, post) for each message: the token ids of the template text before its content,
    of the content itself (special-token strings in it stay literal) and of the template text after it.

    Each message's text is the difference between the renderings of consecutive prefixes, so any template that
    renders messages one after another works. Where the content sits in that text is found by rendering the
    message once more with a placeholder content, so content that also occurs in the template text (e.g. "<s>")
    is never mistaken for it.
    """
    rendered = ""
    for k, message in enumerate(messages):
        full = _render(tokenizer, messages[: k + 1])
        if not full.startswith(rendered):
            raise ValueError("the chat template does not render messages incrementally; cannot mark answer tokens")
        piece, content = full[len(rendered):], message["content"]
        probe = _render(tokenizer, [*messages[:k], {**message, "content": _PROBE}])[len(rendered):]
        if content and probe.count(_PROBE) == 1 and probe.replace(_PROBE, content) == piece:
            before, after = probe.split(_PROBE)
        else:  # the template changes the content (or it is empty): fall back to its first occurrence
            at = piece.find(content) if content else -1
            before, after = (piece[:at], piece[at + len(content):]) if at >= 0 else (piece, "")
            content = content if at >= 0 else ""
        rendered = full
        yield (message, _encode_text(tokenizer, before, False), _encode_text(tokenizer, content, True),
               _encode_text(tokenizer, after, False))


def conversation_segments(tokenizer, messages) -> tuple[list[int], list[bool], list[int]]:
    """(ids, answer_mask, turn_bounds) of the whole conversation, untruncated.

    Each message is encoded in three parts (see `_encode_messages`): the template text before the content, the
    content itself (special-token strings in it stay literal), and the template text after it. The answer mask is
    True on an assistant message's content tokens and on the `</s>` that closes it; the template glue
    ('<s>user\\n', '<s>assistant\\n', the newline after '</s>') and every system/user token are False.

    turn_bounds = [end of the system prompt (0 if none), end of user/assistant pair 1, end of pair 2, ...].
    """
    validate_messages(messages)
    eos_id = tokenizer.eos_token_id
    ids: list[int] = []
    mask: list[bool] = []
    bounds: list[int] = []
    has_system = messages[0]["role"] == "system"
    for k, (message, pre, body, post) in enumerate(_encode_messages(tokenizer, messages)):
        is_answer = message["role"] == "assistant"
        ids += pre + body
        mask += [False] * len(pre) + [is_answer] * len(body)
        if is_answer and post and post[0] == eos_id:  # the closing </s> is part of the answer
            ids.append(post[0])
            mask.append(True)
            post = post[1:]
        ids += post
        mask += [False] * len(post)
        if k == 0 and has_system:
            bounds.append(len(ids))
        elif is_answer:
            if not bounds:
                bounds.append(0)
            bounds.append(len(ids))
    return ids, mask, bounds


def encode_prompt(tokenizer, messages) -> list[int]:
    """Token ids of a conversation that ends with a user message, up to where the assistant's reply starts.

    Encoded exactly as `conversation_segments` encodes training data, so for a conversation C ending with an
    assistant message, encode_prompt(C[:-1]) is a prefix of conversation_segments(C)[0]; and '<s>'/'</s>' typed
    in a message stay literal text, so a user cannot fake a turn. Any generation prompt the template adds
    (add_generation_prompt=True) after the last message is appended as template text.
    """
    validate_messages(messages, last_role="user")
    ids: list[int] = []
    for _, pre, body, post in _encode_messages(tokenizer, messages):
        ids += pre + body + post
    rendered = _render(tokenizer, messages)
    with_header = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    if not with_header.startswith(rendered):
        raise ValueError("the chat template's generation prompt does not follow the rendered messages")
    return ids + _encode_text(tokenizer, with_header[len(rendered):], False)


def truncate_turns_with_bounds(ids, mask, bounds, max_len: int):
    """`truncate_turns`, also returning the turn bounds of the shortened conversation."""
    total = len(ids)
    if total <= max_len:
        return (ids, mask, list(bounds)) if any(mask) else None
    system_end, pair_ends = int(bounds[0]), [int(b) for b in bounds[1:]]
    pair_starts = [system_end] + pair_ends[:-1]
    first = len(pair_starts) - 1
    for j, start in enumerate(pair_starts):
        if system_end + total - start <= max_len:
            first = j
            break
    keep_from = pair_starts[first] if pair_starts else system_end
    if isinstance(ids, np.ndarray):
        new_ids = np.concatenate([ids[:system_end], ids[keep_from:]])[:max_len]
        new_mask = np.concatenate([mask[:system_end], mask[keep_from:]])[:max_len]
    else:
        new_ids = (list(ids[:system_end]) + list(ids[keep_from:]))[:max_len]
        new_mask = (list(mask[:system_end]) + list(mask[keep_from:]))[:max_len]
    shift = keep_from - system_end
    new_bounds = [min(system_end, len(new_ids))] + [min(b - shift, len(new_ids)) for b in pair_ends[first:]]
    return (new_ids, new_mask, new_bounds) if any(new_mask) else None


def truncate_turns(ids: Sequence[int], mask: Sequence[bool], bounds: Sequence[int], max_len: int):
    """Fit a conversation into max_len tokens: drop the oldest user/assistant pairs first (the system prompt stays),
    then, if the newest pair alone is still too long, cut its end (its answer then has no closing </s>).
    (ids, mask), or None if no answer token is left. Works on lists or numpy arrays.
    """
    fitted = truncate_turns_with_bounds(ids, mask, bounds, max_len)
    return None if fitted is None else fitted[:2]


def encode_conversation(tokenizer, messages, max_len: int):
    """Render `messages` with the chat template; (ids, answer_mask) with at most max_len tokens, or None if no
    assistant token survives truncation. See `conversation_segments` for the mask and `truncate_turns` for the
    truncation rules. Raises ValueError on a malformed conversation."""
    ids, mask, bounds = conversation_segments(tokenizer, messages)
    return truncate_turns(ids, mask, bounds, max_len)


class SFTDataset(Dataset):
    """Items {"input_ids", "labels"}, each LongTensor[max_seq_len], over `data_process.py sft` output.

    Right-padded with 0 in input_ids and -100 in labels. labels follow transformers' convention (aligned with
    input_ids; the model shifts): the token id on answer tokens, -100 everywhere else. Samples stored longer than
    max_seq_len are re-truncated with `truncate_turns`; those left with no answer token are skipped, and counted in
    `self.skipped`.
    """

    def __init__(self, path: str | os.PathLike, max_seq_len: int):
        self.file = _MappedFile(path, "sft")
        self.max_seq_len = max_seq_len
        arrays = self.file.arrays
        offsets = np.asarray(arrays["sample_offsets"], dtype=np.int64)
        lengths = np.diff(offsets)
        keep = lengths <= max_seq_len
        for i in np.nonzero(~keep)[0]:  # only the long ones need the (slower) turn-aware check
            keep[i] = self._sample(int(i)) is not None
        self.indices = np.nonzero(keep)[0]
        self.skipped = int(len(lengths) - len(self.indices))
        if len(self.indices) == 0:
            raise DataFileError(f"{path}: none of its {len(lengths)} samples has an answer token within "
                                f"max_seq_len={max_seq_len}")
        self.file._arrays = None  # reopen lazily in each DataLoader worker

    def _sample(self, i: int):
        a = self.file.arrays
        s, e = int(a["sample_offsets"][i]), int(a["sample_offsets"][i + 1])
        ts, te = int(a["turn_offsets"][i]), int(a["turn_offsets"][i + 1])
        ids = np.asarray(a["tokens"][s:e], dtype=np.int64)
        mask = np.asarray(a["answer_mask"][s:e], dtype=bool)
        return truncate_turns(ids, mask, np.asarray(a["turn_bounds"][ts:te]), self.max_seq_len)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, mask = self._sample(int(self.indices[index]))
        n = len(ids)
        input_ids = torch.zeros(self.max_seq_len, dtype=torch.long)
        labels = torch.full((self.max_seq_len,), IGNORE_INDEX, dtype=torch.long)
        input_ids[:n] = torch.from_numpy(ids)
        labels[:n] = torch.where(torch.from_numpy(mask), input_ids[:n], IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels}


# ----------------------------------------------------------------------------------------------------------------
# DPO


def load_dpo_records(path: str | os.PathLike) -> list[dict]:
    """The {"prompt", "chosen", "rejected"} records `data_process.py dpo` wrote (.jsonl or .jsonl.gz).

    Lines that are not such a record (bad JSON, missing or non-string fields) are skipped and reported on stderr;
    a file with none usable raises ValueError."""
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"{path} not found; make it with `python data_process.py dpo ...`")
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) == MAGIC:
            raise DataFileError(f"{path} is a token file from data_process.py, not DPO records; make those with "
                                f"`python data_process.py dpo ... --output dataset/dpo_data.jsonl`")
    records, bad = [], []
    for lineno, rec, _ in iter_json_lines(path):
        if not (rec is not None and all(isinstance(rec.get(k), str) and rec[k] for k in ("prompt", "chosen", "rejected"))):
            bad.append(lineno)
            continue
        records.append({"prompt": rec["prompt"], "chosen": rec["chosen"], "rejected": rec["rejected"]})
    if not records:
        raise DataFileError(f"{path} has no usable DPO records (need string 'prompt', 'chosen', 'rejected'; "
                            f"{len(bad)} malformed line(s), first: {bad[:5]})")
    if bad:
        print(f"{path}: skipped {len(bad)} malformed line(s), first: {bad[:10]}", file=sys.stderr)
    return records
