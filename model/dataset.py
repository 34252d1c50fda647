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

- pretrain: `tokens` (each document as <s> ... </s>, back to back) and `doc_offsets` (uint64, n_docs + 1); since
  the data mixture (model/mixture.py) also `doc_source` (uint16 per document: its input file, an index into
  meta["source_names"]) and `doc_chars` (uint32 per document: its text's length in characters). Files without
  those two load as before: one source, and no --max_doc_chars.
- sft: `tokens`, `answer_mask` (uint8, 1 on assistant-answer tokens), `sample_offsets` (uint64, n + 1), and the
  turn boundaries used to re-truncate: `turn_bounds` (uint32, per sample [system_end, pair_1_end, ...], relative to
  the sample start) with `turn_offsets` (uint64, n + 1) into it.

`tokens` is uint16 when the vocabulary fits, else uint32 (`token_dtype`); readers take the dtype from the header.
meta["tokenizer"] = {"path", "vocab_sha256"} names the tokenizer that made the file (model.checkpoint's
`vocab_fingerprint`); the training loop refuses the file under another tokenizer. Older files have none.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .errors import UsageError
from .mixture import build_mixture

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

    `mix`, `max_doc_tokens`, `max_doc_chars` select which documents (and how often) the epoch holds, and
    `packing="bos"` starts every window at a document's <s> (model/mixture.py); `seed` makes the selection
    reproducible. With their defaults the windows are exactly the above. `self.mixture.describe(T)` says what the
    epoch holds.
    """

    def __init__(self, path: str | os.PathLike, seq_len: int, doc_mask: bool = False,
                 mix: dict[str, float] | None = None, max_doc_tokens: int | None = None,
                 max_doc_chars: int | None = None, packing: str = "stream", seed: int = 0):
        self.file = _MappedFile(path, "pretrain")
        self.seq_len = seq_len
        self.doc_mask = doc_mask
        arrays = self.file.header["arrays"]
        self.n_tokens = arrays["tokens"]["length"]
        self.n_docs = max(arrays["doc_offsets"]["length"] - 1, 0)
        self.mixture = build_mixture(self.file.header, self.file.arrays, path, seq_len, mix, max_doc_tokens,
                                     max_doc_chars, packing, seed)
        self.file._arrays = None  # reopen lazily in each DataLoader worker
        self.windows = self.mixture.windows
        if self.windows is None:
            self.n_windows = max((self.n_tokens - 1) // seq_len, 0)
        else:
            self.n_windows = self.windows.n_windows
        if self.n_windows == 0:
            raise DataFileError(f"{path} has {self.n_tokens} tokens: not enough for one window of {seq_len + 1}"
                                f"{'' if self.windows is None else ' under the --mix/--max_doc_*/--packing flags'}")

    def __len__(self) -> int:
        return self.n_windows

    def window_bounds(self, index: int) -> tuple[int, int]:
        """Token range of window `index` in the file (today's contiguous windows only)."""
        start = index * self.seq_len
        return start, start + self.seq_len + 1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.n_windows:
            raise IndexError(index)
        if self.windows is not None:
            return self._pieced_item(index)
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

    def _pieced_item(self, index: int) -> dict[str, torch.Tensor]:
        """A window made of pieces of documents (a mixture, or bos packing): the same keys as a contiguous one."""
        docs, firsts, counts = self.windows.pieces(index)
        tokens, offsets = self.file.arrays["tokens"], self.file.arrays["doc_offsets"]
        starts = offsets[docs].astype(np.int64) + firsts
        window = torch.from_numpy(np.concatenate([tokens[s:s + n] for s, n in zip(starts, counts)]).astype(np.int64))
        item = {"input_ids": window[:-1], "targets": window[1:]}
        if self.doc_mask:
            positions = np.concatenate([np.arange(f, f + n) for f, n in zip(firsts, counts)])
            document = np.repeat(np.arange(len(counts)), counts)
            item["position_ids"] = torch.from_numpy(positions[:-1])
            item["document_ids"] = torch.from_numpy(document[:-1])
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
#
# Messages: {"role": "system"|"user"|"assistant"|"tool", "content": str}; an assistant message may also carry
# "reasoning_content" (str) and "tool_calls" (OpenAI's {"type": "function", "function": {"name", "arguments"}} or a
# flat {"name", "arguments"}; arguments an object or JSON text). A "tools" list (the functions the assistant may
# call) is passed to the template; MiniMind-3's data carries it on the system message or the first message.

ROLES = ("system", "user", "assistant", "tool")


def _parse_json_field(value, what: str):
    """MiniMind-3's data sometimes stores tools/tool_calls as JSON text rather than as lists."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"'{what}' is a string but not valid JSON") from None
    return value


def _tool_call_parts(call) -> tuple[str, str | dict]:
    """(name, arguments) of one tool call in either accepted form; ValueError if it is neither."""
    inner = call.get("function") if isinstance(call, dict) and isinstance(call.get("function"), dict) else call
    if not isinstance(inner, dict) or not isinstance(inner.get("name"), str) or not inner["name"]:
        raise ValueError("each tool call needs a non-empty string 'name'")
    if not isinstance(inner.get("arguments"), (str, dict)):
        raise ValueError("a tool call's 'arguments' must be an object or a JSON string")
    return inner["name"], inner["arguments"]


def _prepare(messages, tools):
    """(messages as the template takes them, tools or None). A `tools` list carried on the system message or the
    first message moves to the template's `tools` argument; JSON-text tools/tool_calls are parsed; an assistant
    message that only calls tools may leave its content null. Copies; the caller's messages are not changed."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list")
    if not all(isinstance(m, dict) for m in messages):
        raise ValueError("each message must be a dict with string 'role' and 'content'")
    carriers = {0, 1} if messages[0].get("role") == "system" else {0}
    prepared = []
    for i, m in enumerate(messages):
        m = dict(m)
        if "tools" in m:
            if i not in carriers:
                raise ValueError(f"message {i}: 'tools' may only sit on the system message or the first message")
            if tools is not None:
                raise ValueError("'tools' is given twice")
            tools = m.pop("tools")
        if m.get("tool_calls") is not None:
            m["tool_calls"] = _parse_json_field(m["tool_calls"], "tool_calls")
        if m.get("role") == "assistant" and m.get("tool_calls") and m.get("content") is None:
            m["content"] = ""
        prepared.append(m)
    tools = _parse_json_field(tools, "tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError("'tools' must be a list of function descriptions (objects)")
    return prepared, tools or None


def _check_message(i: int, m: dict) -> None:
    if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
        raise ValueError(f"message {i}: each message must be a dict with a 'role' in {ROLES} and string 'content'")
    if m.get("reasoning_content") is not None and not isinstance(m["reasoning_content"], str):
        raise ValueError(f"message {i}: 'reasoning_content' must be a string")
    calls = m.get("tool_calls")
    if calls is not None:
        if m["role"] != "assistant" or not isinstance(calls, list):
            raise ValueError(f"message {i}: 'tool_calls' must be a list, on an assistant message")
        for call in calls:
            _tool_call_parts(call)


def _check_order(messages, last_role: str) -> None:
    """After an optional system message: a user turn first; user -> assistant; assistant -> user, or tool when
    it called tools; tool -> tool or assistant. Training data ends with an assistant message, a prompt
    (last_role="user") with a user message or tool results."""
    start = 1 if messages[0]["role"] == "system" else 0
    allowed = ("user",)
    for i in range(start, len(messages)):
        m = messages[i]
        if m["role"] not in allowed:
            raise ValueError(f"message {i} should be role {' or '.join(map(repr, allowed))}, got {m['role']!r}")
        allowed = {"user": ("assistant",), "tool": ("tool", "assistant"),
                   "assistant": ("user", "tool") if m.get("tool_calls") else ("user",)}[m["role"]]
    ends = ("assistant",) if last_role == "assistant" else ("user", "tool")
    if len(messages) == start or messages[-1]["role"] not in ends:
        raise ValueError("after an optional system message, messages must alternate user/assistant (tool results "
                         "answering an assistant's tool calls) and end with "
                         + ("an assistant message" if last_role == "assistant" else "a user message or tool results"))


def _checked(messages, tools, last_role: str):
    messages, tools = _prepare(messages, tools)
    for i, m in enumerate(messages):
        _check_message(i, m)
    _check_order(messages, last_role)
    return messages, tools


def validate_messages(messages, last_role: str = "assistant") -> None:
    """Raise ValueError unless `messages` is a well-formed conversation (see `_check_order`) ending with an
    assistant message (last_role="assistant", training data) or, for a prompt (last_role="user"), with a user
    message or tool results."""
    _checked(messages, None, last_role)


def _render(tokenizer, messages, tools=None, **kwargs) -> str:
    if not messages:
        return ""
    if tools:
        kwargs["tools"] = tools
    return tokenizer.apply_chat_template(list(messages), tokenize=False, **kwargs)


def _encode_text(tokenizer, text: str, literal: bool) -> list[int]:
    """Token ids of `text`. literal=True never turns '<s>' etc. inside user data into special tokens."""
    if not text:
        return []
    return tokenizer(text, add_special_tokens=False, split_special_tokens=literal)["input_ids"]


_PROBE = "\x00MINIMIND-CONTENT\x00"  # model/chat_prompt.py's stand-in for a content, in its per-role split
# Stands in for the i-th text field of a message group. Private-use characters rather than _PROBE's NULs because
# tool-call names go through the template's tojson, which would escape a NUL.
_FIELD_PROBE = "\ue000MINIMIND-FIELD-{}\ue001"


def _probe_message(message: dict, j: int, fields: dict) -> dict:
    """`message` with each non-empty text field (content, reasoning, each tool call's name and arguments) replaced
    by a new probe, recorded in `fields` as probe -> ((j, field name), the field's text). Tool calls are probed
    too, though encoded as template text, to notice a template that drops them."""
    def probe(name: str, text: str) -> str:
        p = _FIELD_PROBE.format(len(fields))
        fields[p] = ((j, name), text)
        return p

    probed = dict(message)
    for key in ("content", "reasoning_content"):
        if isinstance(message.get(key), str) and message[key]:
            probed[key] = probe(key, message[key])
    calls = []
    for call in message.get("tool_calls") or []:
        name, args = _tool_call_parts(call)
        text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)  # what tojson gives
        inner = call["function"] if isinstance(call.get("function"), dict) else call
        new = {**inner, "name": probe("tool_call", name), "arguments": probe("tool_call", text) if text else text}
        calls.append({**call, "function": new} if inner is not call else new)
    if calls:
        probed["tool_calls"] = calls
    return probed


def _probe_variants(group: list[dict]) -> list[tuple[list[dict], dict]]:
    """Probed copies of a message group to try in turn. The second, for an assistant with its reasoning written
    inline ('<think>...</think>' before the answer), probes that reasoning as reasoning_content: a template that
    splits such content (MiniMind-3's) finds no '</think>' to split at in a probe."""
    variants = [group]
    m = group[0]
    content = m.get("content") or ""
    if m["role"] == "assistant" and not isinstance(m.get("reasoning_content"), str) and "</think>" in content:
        reasoning, _, answer = content.partition("</think>")
        variants.append([{**m, "reasoning_content": reasoning.split("<think>")[-1], "content": answer}])
    probed = []
    for variant in variants:
        fields: dict = {}
        probed.append(([_probe_message(m, j, fields) for j, m in enumerate(variant)], fields))
    return probed


def _align(piece: str, probe_piece: str, fields: dict):
    """Split `piece` into [(text, (j, field) or None for template text)], given the same text rendered with
    probes: the template text around the probes must match exactly, and each field's text is what lies between
    (as rendered, so a template may strip or escape it). None where `piece` does not fit."""
    found = re.findall("|".join(map(re.escape, fields)), probe_piece) if fields else []
    if len(set(found)) != len(found):
        return None
    glue = re.split("|".join(map(re.escape, found)), probe_piece) if found else [probe_piece]
    parts, pos = [], 0
    for i, p in enumerate(found):
        before, after = glue[i], glue[i + 1]
        if not piece.startswith(before, pos):
            return None
        pos += len(before)
        tag, text = fields[p]
        if i + 1 == len(found):  # the last field runs up to the closing template text
            end = len(piece) - len(after) if piece.endswith(after) else -1
        elif piece.startswith(text + after, pos):  # the field as given: no search, so no false match inside it
            end = pos + len(text)
        else:
            end = piece.find(after, pos) if after else -1
        if end < pos:
            return None
        parts += [(before, None), (piece[pos:end], tag)]
        pos = end
    if piece[pos:] != glue[-1]:
        return None
    return parts + [(glue[-1], None)]


def _first_occurrences(piece: str, group: list[dict]):
    """The split when no probing fits (the template rewrites the text): each content at its first occurrence."""
    parts, pos = [], 0
    for j, m in enumerate(group):
        content = m.get("content") or ""
        at = piece.find(content, pos) if content else -1
        if at >= 0:
            parts += [(piece[pos:at], None), (content, (j, "content"))]
            pos = at + len(content)
    return parts + [(piece[pos:], None)]


def _group_parts(tokenizer, messages, start: int, end: int, rendered: str, tools):
    """(rendering of messages[:end], [(text, (j, field) or None)] of what messages[start:end] add to `rendered`)."""
    full = _render(tokenizer, messages[:end], tools)
    if not full.startswith(rendered):
        raise ValueError("the chat template does not render messages incrementally; cannot mark answer tokens")
    piece, group = full[len(rendered):], list(messages[start:end])
    for probed, fields in _probe_variants(group):
        probe_piece = _render(tokenizer, [*messages[:start], *probed], tools)
        parts = _align(piece, probe_piece[len(rendered):], fields) if probe_piece.startswith(rendered) else None
        if parts is None:
            continue
        dropped = [fields[p][0] for p in fields if p not in probe_piece]
        if dropped:  # e.g. v1's template shows no tool messages, tool calls or reasoning
            j, name = dropped[0]
            raise ValueError(f"the chat template does not render the {name} of {group[j]['role']} messages; use a "
                             f"tokenizer whose template does (model/minimind3_tokenizer)")
        return full, _merge_tool_calls(parts)
    return full, _first_occurrences(piece, group)


def _merge_tool_calls(parts):
    """Tool-call names and arguments rejoin the template text around them: encoded whole, a call gets the tokens a
    model emitting it produces (split at the probes, BPE would cut '"get_weather"' differently)."""
    merged = []
    for text, tag in parts:
        tag = None if tag is not None and tag[1] == "tool_call" else tag
        if tag is None and merged and merged[-1][1] is None:
            merged[-1] = (merged[-1][0] + text, None)
        else:
            merged.append((text, tag))
    return merged


def _groups(messages):
    """(start, end) of each message, except that a run of tool messages is one group: a template may render the
    run as one turn closed only at its end (MiniMind-3: one user turn of <tool_response> blocks), so only the
    rendering at the run's end is a prefix of what follows."""
    start = 0
    while start < len(messages):
        end = start + 1
        while messages[start]["role"] == "tool" and end < len(messages) and messages[end]["role"] == "tool":
            end += 1
        yield start, end
        start = end


def _opening(tokenizer, messages, tools) -> str:
    """Template text before the first message when that is not a system message (MiniMind-3's system turn
    describing the tools). Kept apart so that truncation treats it as the system prompt, not as the first turn."""
    if not tools or messages[0]["role"] == "system":
        return ""
    with_tools, without = _render(tokenizer, messages[:1], tools), _render(tokenizer, messages[:1])
    return with_tools[: len(with_tools) - len(without)] if with_tools.endswith(without) else ""


def _message_parts(tokenizer, messages, tools=None):
    """Yield (message, [(ids, field or None)]) per message, in order, with (None, ...) first for an `_opening`.

    Each group's text is the difference between renderings of consecutive prefixes, so any template that renders
    messages one after another works. Within it, the text fields are found by rendering once more with probes in
    their place (`_align`), so text that also occurs in the template (e.g. "<s>") is never mistaken for a field.
    Fields (field = "content" or "reasoning_content") are encoded literally: special-token strings typed in them
    stay text; template text (field None, tool calls included, see `_merge_tool_calls`) with its special tokens.
    """
    rendered = _opening(tokenizer, messages, tools)
    if rendered:
        yield None, [(_encode_text(tokenizer, rendered, False), None)]
    for start, end in _groups(messages):
        rendered, parts = _group_parts(tokenizer, messages, start, end, rendered, tools)
        # template text goes with the message whose field follows it; the text after the last field, with the last
        per_message = [[] for _ in range(start, end)]
        owner = end - start - 1
        for text, tag in reversed(parts):
            owner = owner if tag is None else tag[0]
            if text:
                per_message[owner].append((_encode_text(tokenizer, text, tag is not None), tag and tag[1]))
        for j, message_parts in enumerate(per_message):
            yield messages[start + j], message_parts[::-1]


def _encode_messages(tokenizer, messages, tools=None):
    """Yield (message, pre, body, post) for each message: the token ids of what the template renders before its
    content, of the content itself (special-token strings in it stay literal) and of what it renders after it
    (for an assistant: its reasoning is in pre, its tool calls in post). See `_message_parts`."""
    for message, parts in _message_parts(tokenizer, messages, tools):
        at = next((i for i, (_, field) in enumerate(parts) if field == "content"), len(parts))
        pre, body, post = parts[:at], parts[at:at + 1], parts[at + 1:]
        yield message, *([i for ids, _ in chunk for i in ids] for chunk in (pre, body, post))


_ROLE_HEADERS: dict[str, str] = {}


def _role_header(tokenizer) -> str:
    """The first line of the template's generation prompt: ChatML's '<|im_start|>assistant\\n' (v1's user turn
    already ends with it, so there it is empty). The prompt supplies it, so it is never an answer token."""
    key = str(tokenizer.chat_template)
    if key not in _ROLE_HEADERS:
        probe = [{"role": "user", "content": "x"}]
        rendered = _render(tokenizer, probe)
        prompt = _render(tokenizer, probe, add_generation_prompt=True)
        prompt = prompt[len(rendered):] if prompt.startswith(rendered) else ""
        _ROLE_HEADERS[key] = prompt[: prompt.find("\n") + 1] if "\n" in prompt else prompt
    return _ROLE_HEADERS[key]


def _assistant_mask(parts, header: list[int], eos_id) -> tuple[list[int], list[bool]]:
    """ids and answer mask of one assistant message: True on everything the template renders for it (reasoning
    and its <think> tags, answer, tool calls) from after the role header through its last end token; the text
    after that (the newline between turns) is glue that no reply has to produce."""
    if not parts:
        return [], []
    ids = [i for chunk, _ in parts for i in chunk]
    first, last = parts[0], parts[-1]
    start = len(header) if first[1] is None and header and first[0][: len(header)] == header else 0
    end = len(ids)
    if last[1] is None and eos_id in last[0]:
        end -= last[0][::-1].index(eos_id)
    return ids, [start <= i < end for i in range(len(ids))]


def conversation_segments(tokenizer, messages, tools=None) -> tuple[list[int], list[bool], list[int]]:
    """(ids, answer_mask, turn_bounds) of the whole conversation, untruncated.

    The answer mask is True on every assistant message's rendering between its role header and the newline after
    its end token: for v1 the content and its '</s>'; for MiniMind-3 '<think>\\n{reasoning}\\n</think>\\n\\n',
    the answer, its '<tool_call>...</tool_call>' blocks and the '<|im_end|>'. The role header ('<|im_start|>
    assistant\\n', v1's '<s>assistant\\n'), that newline, every system, user and tool token, and an assistant
    message with no content, reasoning or tool calls are False.

    turn_bounds = [end of the system prompt (a system message, or the template's tools description; 0 if none),
    end of pair 1, end of pair 2, ...], a pair being the user or tool turns and the assistant message that
    answers them. `tools` (the template's tools argument) may instead sit on the system or first message.
    """
    messages, tools = _checked(messages, tools, "assistant")
    header = _encode_text(tokenizer, _role_header(tokenizer), False)
    ids: list[int] = []
    mask: list[bool] = []
    bounds: list[int] = []
    for message, parts in _message_parts(tokenizer, messages, tools):
        role = "system" if message is None else message["role"]
        # an empty assistant message teaches nothing but stopping at once, and v1 never trained on one
        if role == "assistant" and any(message.get(k) for k in ("content", "reasoning_content", "tool_calls")):
            piece, answer = _assistant_mask(parts, header, tokenizer.eos_token_id)
        else:
            piece = [i for chunk, _ in parts for i in chunk]
            answer = [False] * len(piece)
        ids += piece
        mask += answer
        if role == "system":
            bounds = [len(ids)]
        elif role == "assistant":
            bounds = (bounds or [0]) + [len(ids)]
    return ids, mask, bounds


def encode_prompt(tokenizer, messages, tools=None, enable_thinking: bool | None = None) -> list[int]:
    """Token ids of a conversation that ends with a user message (or tool results), up to where the assistant's
    reply starts.

    Encoded exactly as `conversation_segments` encodes training data, so for a conversation C ending with an
    assistant message, encode_prompt(C[:-1]) is a prefix of conversation_segments(C)[0] (MiniMind-3: with
    enable_thinking on when that reply has reasoning, off when it has none); and special-token strings typed in
    a message stay literal text, so a user cannot fake a turn. The generation prompt the template adds
    (add_generation_prompt=True, with `enable_thinking` passed on when given) is appended as template text.
    """
    messages, tools = _checked(messages, tools, "user")
    ids = [i for _, parts in _message_parts(tokenizer, messages, tools) for chunk, _ in parts for i in chunk]
    rendered = _render(tokenizer, messages, tools)
    switch = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    with_header = _render(tokenizer, messages, tools, add_generation_prompt=True, **switch)
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
