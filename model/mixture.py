"""Which documents a pretraining epoch holds (the data mixture) and how they are cut into windows (packing).

Mixture (`--mix NAME=WEIGHT ...`, `--max_doc_tokens N`, `--max_doc_chars N`):
- a weight is how many times, in expectation, each document of that source file appears in one epoch: 1 keeps the
  source as it is, 0.5 keeps a seeded random half of its documents, 2 repeats each of them twice, 0 drops the
  source. A document's count is floor(w), plus one when its seeded uniform draw u < frac(w); u is drawn once per
  document from --seed alone, so raising a weight from 0.5 to 0.6 only adds documents. Sources not named keep
  weight 1. A source's share of the epoch's tokens is then w * tokens / sum over sources of (w * tokens).
- the length filters keep only documents of at most N tokens (counting their <s> and </s>) or N characters of
  text (the v1-like filter; it needs a token file that records characters, i.e. written by this version's
  data_process.py). 1-pretrain.py keeps documents of <= 512 characters by default (--max_doc_chars 0: all), the
  measured recipe; on a token file without character lengths that default is skipped with a note. A hard cap is
  the design measured to help (v1's accidental <= 512 characters); softer
  down-weighting of long documents is what `--packing bos` already does: a document contributes at most one
  window's worth of tokens, its head.
- the selection is fixed for the whole run (every epoch holds the same documents, in a new window order), so epoch
  accounting and `--resume` are exactly as without a mixture: the windows are a deterministic function of the
  token file and the flags.

The epoch's document stream lists the documents in file order, then (for weights above 1) a second pass over those
repeated, and so on, so a repeated document never sits beside its own copy. Without a mixture or a length
filter (--max_doc_chars 0) the stream is the file itself, and the windows are exactly v1's.

Packing:
- `stream` (the default): window i is tokens [i*T, i*T + T + 1) of that stream; every token is a target once per
  epoch, and a window mostly starts mid-document.
- `bos`: every window starts at a document's <s>. `pack_bos` fills each window of T + 1 tokens best-fit from a
  pool of upcoming documents: the longest heads it, then whole documents while one fits, then the head of the
  shortest one; a document longer than the window is cut to its head. What is cut off (and the last window, if it cannot be
  filled) is never trained on: `cropped_tokens` counts it.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right, insort
from dataclasses import dataclass

import numpy as np

from .errors import UsageError

PACKINGS = ("stream", "bos")


class RecipeDefault(int):
    """A flag's default value as given by the measured recipe, told apart from the same number typed by the user:
    the default --max_doc_chars applies where a token file records characters and is skipped (with a note) where it
    does not, while a typed one is required to apply."""


# Measured by scripts/recipe_sweep.py (README "Recipe sweep"): at 400 steps x 16 windows of 256 on the real corpus,
# keeping documents of <= 512 characters lowered held-out bits/char by 5.9%.
DEFAULT_MAX_DOC_CHARS = RecipeDefault(512)
POOL_SIZE = 1000  # documents the bos packer chooses among: more fits tighter but moves a document further


class MixtureError(UsageError):
    """A --mix, --max_doc_* or --packing value that does not fit the token file."""


def add_mixture_args(parser) -> None:
    """The pretraining data flags (1-pretrain.py): --mix, --max_doc_tokens, --max_doc_chars, --packing."""
    g = parser.add_argument_group("data mixture and packing")
    g.add_argument("--mix", nargs="+", metavar="SOURCE=WEIGHT", default=None,
                   help="per input file of data_process.py: how many times each of its documents appears per epoch "
                        "(0.5: a seeded half; 2: twice; unnamed sources: 1)")
    g.add_argument("--max_doc_tokens", type=int, default=None,
                   help="keep only documents of at most N tokens, their <s> and </s> included")
    g.add_argument("--max_doc_chars", type=int, default=DEFAULT_MAX_DOC_CHARS,
                   help="keep only documents of at most N characters of text (default 512, as v1 kept and as "
                        "measured best; 0 keeps every document)")
    g.add_argument("--packing", choices=PACKINGS, default="stream",
                   help="stream: windows cut the document stream anywhere; bos: every window starts at a document's "
                        "<s> and is filled best-fit with whole documents, cropping only its end")


def mixture_kwargs(args) -> dict:
    """The PretrainDataset keyword arguments for the flags `add_mixture_args` defines."""
    max_doc_chars = args.max_doc_chars or None  # 0: every document
    return {"mix": parse_mix(args.mix), "max_doc_tokens": args.max_doc_tokens, "max_doc_chars": max_doc_chars,
            "packing": args.packing, "seed": args.seed}


def parse_mix(specs) -> dict[str, float] | None:
    """["a.jsonl.gz=1", "b.jsonl.gz=0.5"] -> {"a.jsonl.gz": 1.0, "b.jsonl.gz": 0.5}; None stays None."""
    if specs is None:
        return None
    weights: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.rpartition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not sep or not name or not math.isfinite(weight) or weight < 0:
            raise MixtureError(f"--mix {spec!r}: expected SOURCE=WEIGHT with a weight >= 0, e.g. "
                               f"pretrain_zh-00.jsonl.gz=0.5")
        if name in weights:
            raise MixtureError(f"--mix names {name!r} twice; give each source once")
        weights[name] = weight
    return weights


def source_table(header: dict, arrays: dict, path) -> tuple[list[str], np.ndarray | None]:
    """(source names, per-document source index or None). A token file written before sources were recorded is one
    source, named after its one input file if it lists exactly one, else after the token file itself."""
    meta = header.get("meta") or {}
    if "doc_source" not in arrays:
        inputs = meta.get("sources") or []
        return [inputs[0] if len(inputs) == 1 else str(path).replace("\\", "/").rsplit("/", 1)[-1]], None
    names = meta.get("source_names")
    if not isinstance(names, list):
        raise MixtureError(f"{path} has per-document sources but no meta source_names; rebuild it with "
                           f"`python data_process.py pretrain ...`")
    return [str(n) for n in names], np.asarray(arrays["doc_source"], dtype=np.int64)


def document_counts(n_docs: int, doc_source: np.ndarray | None, names: list[str], weights: dict[str, float] | None,
                    seed: int, path) -> np.ndarray:
    """How many times each document appears in an epoch, from the --mix weights (see the module docstring)."""
    if not weights:
        return np.ones(n_docs, dtype=np.int64)
    unknown = [name for name in weights if name not in names]
    if unknown:
        raise MixtureError(f"--mix: {path} has no source {unknown[0]!r}; its sources are: {', '.join(names)}")
    per_source = np.array([weights.get(name, 1.0) for name in names], dtype=np.float64)
    w = per_source[doc_source] if doc_source is not None else np.full(n_docs, per_source[0])
    draws = np.random.default_rng(seed).random(n_docs)  # one per document, independent of the weights
    whole = np.floor(w)
    return (whole + (draws < w - whole)).astype(np.int64)


def length_filter(lengths: np.ndarray, doc_chars: np.ndarray | None, max_doc_tokens: int | None,
                  max_doc_chars: int | None, path) -> np.ndarray:
    """Boolean per document: kept by --max_doc_tokens / --max_doc_chars (all True without them)."""
    keep = np.ones(len(lengths), dtype=bool)
    for flag, limit in (("--max_doc_tokens", max_doc_tokens), ("--max_doc_chars", max_doc_chars)):
        if limit is not None and limit < 1:
            raise MixtureError(f"{flag} {limit}: must be at least 1")
    if max_doc_tokens is not None:
        keep &= lengths <= max_doc_tokens
    if max_doc_chars is not None:
        if doc_chars is None:
            raise MixtureError(f"--max_doc_chars: {path} records no document lengths in characters (made before "
                               f"they were recorded); rebuild it with `python data_process.py pretrain ...` or use "
                               f"--max_doc_tokens")
        keep &= np.asarray(doc_chars) <= max_doc_chars
    return keep


def filter_note(kept: np.ndarray, lengths: np.ndarray, max_doc_tokens: int | None,
                max_doc_chars: int | None) -> str | None:
    """The start-up line of the length filters: how much of the file they keep."""
    limits = [f"<= {n} {unit}" for n, unit in ((max_doc_tokens, "tokens"), (max_doc_chars, "characters")) if n]
    if not limits:
        return None
    share = float(lengths[kept].sum()) / max(float(lengths.sum()), 1.0)
    return (f"documents of {' and '.join(limits)}: kept {int(kept.sum()):,} of {len(kept):,} ({share:.1%} of the "
            f"file's tokens); --max_doc_chars 0 keeps every document")


def epoch_documents(counts: np.ndarray) -> np.ndarray:
    """The epoch's document stream: pass p lists, in file order, the documents that appear more than p times."""
    passes = [np.nonzero(counts > p)[0] for p in range(int(counts.max(initial=0)))]
    return np.concatenate(passes) if passes else np.zeros(0, dtype=np.int64)


@dataclass
class BosPacking:
    """Windows as pieces: window k is pieces window_ptr[k]:window_ptr[k+1], piece j being the first piece_len[j]
    tokens of stream document piece_doc[j]. Every piece but a window's last is a whole document."""

    window_ptr: np.ndarray
    piece_doc: np.ndarray
    piece_len: np.ndarray
    total_tokens: int
    cropped_tokens: int

    @property
    def cropped_share(self) -> float:
        return self.cropped_tokens / self.total_tokens if self.total_tokens else 0.0


class _Pool:
    """Upcoming documents, kept sorted by (length, stream position) for best fit."""

    def __init__(self, lengths: list[int], size: int):
        self.lengths, self.size, self.n = lengths, size, len(lengths)
        self.sorted: list[int] = []  # keys length * n + position
        self.next = 0

    def refill(self) -> None:
        while len(self.sorted) < self.size and self.next < self.n:
            insort(self.sorted, self.lengths[self.next] * self.n + self.next)
            self.next += 1

    def _take(self, at: int) -> int:
        """Remove the document at sorted position `at`, or rather the earliest one as long as it."""
        at = bisect_left(self.sorted, self.sorted[at] // self.n * self.n)
        return self.sorted.pop(at) % self.n

    def longest(self) -> int:
        return self._take(len(self.sorted) - 1)

    def best_fit(self, room: int) -> int:
        """The longest document of at most `room` tokens, else the shortest one (to be cropped to `room`)."""
        return self._take(max(bisect_right(self.sorted, room * self.n + self.n - 1) - 1, 0))


def pack_bos(lengths, window: int, pool_size: int = POOL_SIZE) -> BosPacking:
    """Cut documents of `lengths` tokens (in stream order) into windows of exactly `window` tokens, each starting
    at a document's first token: the longest document in the pool heads it (cut to its head if longer than the
    window), then best fit fills the rest, longest first, as in `model.packing.pack_lengths`. A longest head
    wasted fewer tokens than a first-come one on ../shared/data's pretrain_zh-00/01 documents of <= 512 characters
    (windows of 513: 2.8% cropped against 7.3%)."""
    lengths = [int(n) for n in np.asarray(lengths, dtype=np.int64)]
    if window < 1 or any(n < 1 for n in lengths):
        raise ValueError("pack_bos needs window >= 1 and documents of at least one token")
    pool = _Pool(lengths, max(pool_size, 1))
    window_ptr, piece_doc, piece_len = [0], [], []
    while True:
        pool.refill()
        if not pool.sorted:
            break
        doc = pool.longest()
        pieces = [(doc, min(lengths[doc], window))]
        room = window - pieces[0][1]
        while room:
            pool.refill()
            if not pool.sorted:
                break
            doc = pool.best_fit(room)
            pieces.append((doc, min(lengths[doc], room)))
            room -= pieces[-1][1]
        if room:  # the documents ran out before this last window was full: it is left out
            break
        piece_doc += [d for d, _ in pieces]
        piece_len += [n for _, n in pieces]
        window_ptr.append(len(piece_doc))
    total = sum(lengths)
    return BosPacking(np.array(window_ptr, dtype=np.int64), np.array(piece_doc, dtype=np.int64),
                      np.array(piece_len, dtype=np.int64), total, total - sum(piece_len))


# ----------------------------------------------------------------------------------------------------------------
# the epoch's windows, as pieces of documents


class StreamWindows:
    """`--packing stream` over a selected document stream: window i is stream tokens [i*T, i*T + T + 1)."""

    def __init__(self, docs: np.ndarray, lengths: np.ndarray, seq_len: int):
        self.docs, self.seq_len = docs, seq_len
        self.doc_lengths = lengths[docs]
        self.starts = np.concatenate([[0], np.cumsum(self.doc_lengths)])
        self.total_tokens = int(self.starts[-1])
        self.n_windows = max((self.total_tokens - 1) // seq_len, 0)
        self.cropped_tokens = self.total_tokens - (self.n_windows * seq_len + 1 if self.n_windows else 0)

    def pieces(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(file document ids, first token within each, token counts) of window `index`."""
        start, end = index * self.seq_len, index * self.seq_len + self.seq_len + 1
        first = np.searchsorted(self.starts, start, side="right") - 1
        stop = np.searchsorted(self.starts, end, side="left")
        j = np.arange(first, stop)
        begin = np.maximum(start - self.starts[j], 0)
        finish = np.minimum(end - self.starts[j], self.doc_lengths[j])
        return self.docs[j], begin, finish - begin


class BosWindows:
    """`--packing bos` over a selected document stream (see `pack_bos`)."""

    def __init__(self, docs: np.ndarray, lengths: np.ndarray, seq_len: int):
        self.docs = docs
        self.packing = pack_bos(lengths[docs], seq_len + 1)
        self.n_windows = len(self.packing.window_ptr) - 1
        self.total_tokens, self.cropped_tokens = self.packing.total_tokens, self.packing.cropped_tokens

    def pieces(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo, hi = self.packing.window_ptr[index], self.packing.window_ptr[index + 1]
        return self.docs[self.packing.piece_doc[lo:hi]], np.zeros(hi - lo, dtype=np.int64), self.packing.piece_len[lo:hi]


@dataclass
class Mixture:
    """What one epoch holds: the windows (None: today's contiguous windows over the whole file), the source names,
    and per source the documents and tokens selected (repeats counted)."""

    windows: StreamWindows | BosWindows | None
    names: list[str]
    documents: np.ndarray
    tokens: np.ndarray
    filter_note: str | None = None  # what --max_doc_tokens/--max_doc_chars kept (or why the default did nothing)

    def describe(self, seq_len: int) -> list[str]:
        """Start-up lines: each source's share of the epoch, and for bos the share of tokens cropped away."""
        total = max(int(self.tokens.sum()), 1)
        lines = [f"  {name}: {int(d):,} documents, {int(t):,} tokens ({t / total:.1%})"
                 for name, d, t in zip(self.names, self.documents, self.tokens)]
        if self.windows is not None:
            w = self.windows
            kind = "bos" if isinstance(w, BosWindows) else "stream"
            lines.append(f"  packing {kind} at {seq_len}: {w.n_windows:,} windows; {w.cropped_tokens:,} of "
                         f"{w.total_tokens:,} tokens ({w.cropped_tokens / max(w.total_tokens, 1):.2%}) cropped away")
        return lines


def build_mixture(header: dict, arrays: dict, path, seq_len: int, mix: dict[str, float] | None = None,
                  max_doc_tokens: int | None = None, max_doc_chars: int | None = None, packing: str = "stream",
                  seed: int = 0) -> Mixture:
    """The epoch a pretraining token file gives under these flags (see the module docstring)."""
    if packing not in PACKINGS:
        raise MixtureError(f"--packing {packing!r}: choose one of {', '.join(PACKINGS)}")
    offsets = np.asarray(arrays["doc_offsets"], dtype=np.int64)
    lengths = np.diff(offsets)
    names, doc_source = source_table(header, arrays, path)
    counts = document_counts(len(lengths), doc_source, names, mix, seed, path)
    skipped_default = None
    if isinstance(max_doc_chars, RecipeDefault) and "doc_chars" not in arrays:
        skipped_default = (f"--max_doc_chars {max_doc_chars} (the default) not applied: {path} records no document "
                           f"lengths in characters; rebuild it with `python data_process.py pretrain ...` to apply it")
        max_doc_chars = None
    kept = length_filter(lengths, arrays.get("doc_chars"), max_doc_tokens, max_doc_chars, path)
    counts *= kept
    note = skipped_default or filter_note(kept, lengths, max_doc_tokens, max_doc_chars)
    source = doc_source if doc_source is not None else np.zeros(len(lengths), dtype=np.int64)
    documents = np.bincount(source, weights=counts, minlength=len(names)).astype(np.int64)
    tokens = np.bincount(source, weights=counts * lengths, minlength=len(names)).astype(np.int64)
    docs = epoch_documents(counts)
    if len(docs) == 0 and len(lengths):
        raise MixtureError(f"{path}: no document is left under these --mix/--max_doc_tokens/--max_doc_chars "
                           f"values; loosen them (--max_doc_chars 0 keeps every document)")
    whole_file = len(docs) == len(lengths) and offsets[:1].sum() == 0 and (docs == np.arange(len(docs))).all()
    if packing == "stream" and whole_file:
        return Mixture(None, names, documents, tokens, note)  # today's windows, read straight from the file
    windows = (BosWindows if packing == "bos" else StreamWindows)(docs, lengths, seq_len)
    return Mixture(windows, names, documents, tokens, note)
