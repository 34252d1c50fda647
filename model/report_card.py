"""The measurements and the layout of `report.py`'s report card: held-out bits per character, the repetition of
greedy answers, answer lengths, and the side-by-side Markdown table and chart.

Everything here takes a model and a tokenizer (or plain numbers), so the arithmetic is tested on its own; report.py
adds the checkpoints, the benchmarks and the files.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .dataset import encode_prompt
from .errors import UsageError


class ReportInputError(UsageError):
    """A text or prompt file report.py cannot use."""


# ----------------------------------------------------------------------------------------------------------------
# the arithmetic


def bits_per_char(total_nll_nats: float, n_chars: int) -> float:
    """Bits per character: the summed negative log-likelihood (natural log) of a text's tokens, in bits, divided by
    the number of characters of that text. Per character rather than per token, so models with different
    tokenizers compare on the same footing."""
    if n_chars <= 0:
        raise ValueError("bits per character needs at least one character")
    return total_nll_nats / math.log(2) / n_chars


def repeated_ngrams(text: str, n: int) -> tuple[int, int]:
    """(n-grams that repeat an earlier n-gram of the same text, all n-grams), over characters.

    "abcabc" with n=3 has the 3-grams abc, bca, cab, abc: one of the four repeats. A text shorter than n has none.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [text[i:i + n] for i in range(len(text) - n + 1)]
    return len(grams) - len(set(grams)), len(grams)


def repetition_rate(texts: Sequence[str], n: int) -> float:
    """The share of repeated character n-grams over all the texts' n-grams together (each text counted on its
    own: an n-gram is a repeat only within its text); 0.0 when no text reaches n characters."""
    counts = [repeated_ngrams(t, n) for t in texts]
    total = sum(c[1] for c in counts)
    return sum(c[0] for c in counts) / total if total else 0.0


@dataclass
class TextScore:
    nll_nats: float  # summed over every predicted token
    tokens: int  # tokens predicted (BOS excluded: it is given, not predicted)
    chars: int  # characters of the decoded texts

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per token, in nats (what training calls the loss)."""
        return self.nll_nats / self.tokens

    @property
    def bits_per_char(self) -> float:
        return bits_per_char(self.nll_nats, self.chars)


@torch.inference_mode()
def score_texts(model, tokenizer, texts: Sequence[str], progress=None) -> TextScore:
    """Negative log-likelihood of each text as a document, the way pretraining saw them.

    Each text is <BOS> + its tokens (no EOS: the end of a document is not a character). Every text token is
    predicted once, from the tokens before it; a text longer than the model's context is cut into windows of one
    context each, and a window starts afresh (its first token's context is the previous window's last token only).
    Characters are counted on the decoded tokens, i.e. exactly the text that was scored.
    """
    device = next(model.parameters()).device
    context = model.config.context_length
    nll, tokens, chars = 0.0, 0, 0
    for text in progress(texts) if progress else texts:
        text_ids = tokenizer.encode(text, add_special_tokens=False)
        if not text_ids:
            continue
        ids = torch.tensor([tokenizer.bos_token_id, *text_ids], device=device)
        for start in range(0, len(ids) - 1, context):
            window = ids[start:start + context + 1]
            logits = model(window[None, :-1]).logits[0].float()
            nll += float(F.cross_entropy(logits, window[1:], reduction="sum"))
            tokens += len(window) - 1
        chars += len(tokenizer.decode(text_ids))
    if not tokens or not chars:
        raise ReportInputError("the held-out text has no tokens to score; pass a --text file with some text")
    return TextScore(nll, tokens, chars)


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """A chat checkpoint's prompt is a user turn in the chat template up to the reply; a pretrained one continues
    <BOS> + the plain text, as 0-eval_pretrain.py does."""
    if chat:
        return encode_prompt(tokenizer, [{"role": "user", "content": prompt}])
    return [tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]


def answer_stats(tokenizer, answers: Sequence[Sequence[int]], n: int) -> dict:
    """Texts and lengths of generated answers (EOS, when produced, ends an answer and is not counted)."""
    eos = tokenizer.eos_token_id
    kept = [[t for t in ids if t != eos] for ids in answers]
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in kept]
    return {"texts": texts, "repetition_rate": repetition_rate(texts, n),
            "answer_chars": sum(map(len, texts)) / len(texts), "answer_tokens": sum(map(len, kept)) / len(kept)}


# ----------------------------------------------------------------------------------------------------------------
# reading the inputs


def _record_texts(record: dict) -> list[str]:
    for key in ("text", "reference", "output"):
        if isinstance(record.get(key), str):
            return [record[key]]
    turns = record.get("conversations") or record.get("messages")
    if isinstance(turns, list):
        return [m["content"] for m in turns if isinstance(m, dict) and m.get("role") == "assistant"
                and isinstance(m.get("content"), str)]
    return []


def read_texts(path: str | os.PathLike) -> list[str]:
    """The documents of a held-out text file: JSON lines (`text`, `reference` or `output` fields, or the assistant
    turns of `conversations`/`messages`), or plain text split at blank lines."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ReportInputError(f"--text {path}: cannot read it ({err}); pass a UTF-8 text or JSON-lines file") from None
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ReportInputError(f"--text {path}:{number}: not JSON ({err.msg}); fix or remove the "
                                       "line") from None
            texts += [t for t in (_record_texts(record) if isinstance(record, dict) else []) if t.strip()]
    else:
        texts = [part.strip() for part in raw.split("\n\n") if part.strip()]
    if not texts:
        raise ReportInputError(f"--text {path}: no text found (JSON lines need a text, reference or output field)")
    return texts


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from JSON lines with a `prompt` field, or one prompt per line of a plain text file."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ReportInputError(f"--prompts {path}: cannot read it ({err}); pass a UTF-8 file") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line.strip())
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ReportInputError(f"--prompts {path}:{number}: not JSON ({err.msg}); fix or remove the line") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise ReportInputError(f"--prompts {path}:{number}: expected {{\"prompt\": \"...\"}}")
        prompts.append(record["prompt"])
    if not prompts:
        raise ReportInputError(f"--prompts {path}: no prompts in the file")
    return prompts


# ----------------------------------------------------------------------------------------------------------------
# the report


def _percent(result: dict | None) -> str:
    return "—" if not result else f"{100 * result['accuracy']:.1f}% ({result['correct']}/{result['total']})"


TABLE_ROWS = (
    ("stage", lambda r: r["stage"]),
    ("family", lambda r: r["family"]),
    ("parameters", lambda r: f"{r['parameters'] / 1e6:.2f} M"),
    ("prompts rendered as", lambda r: "chat template" if r["chat"] else "plain text"),
    ("held-out loss (nats/token)", lambda r: f"{r['heldout_loss']:.4f}"),
    ("held-out bits/char", lambda r: f"{r['bits_per_char']:.4f}"),
    ("C-Eval accuracy", lambda r: _percent(r.get("ceval"))),
    ("CMMLU accuracy", lambda r: _percent(r.get("cmmlu"))),
    ("repeated {n}-grams in answers", lambda r: f"{100 * r['repetition_rate']:.1f}%"),
    ("mean answer length (chars)", lambda r: f"{r['answer_chars']:.1f}"),
    ("mean answer length (tokens)", lambda r: f"{r['answer_tokens']:.1f}"),
)


def _cell(text: str) -> str:
    """A Markdown table cell: pipes escaped, runs of line breaks shown as one <br> (an untrained model's answer can
    be nothing but newlines)."""
    text = re.sub(r"\s*\n\s*", "\n", text.replace("\r", "").strip())
    return text.replace("|", "\\|").replace("\n", "<br>")


def markdown_report(rows: list[dict], settings: dict) -> str:
    """One table with the checkpoints side by side, the settings under it, then the sample answers."""
    n = settings["ngram"]
    lines = ["# Report card", "", "| | " + " | ".join(_cell(r["name"]) for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for label, value in TABLE_ROWS:
        lines.append(f"| {label.format(n=n)} | " + " | ".join(_cell(value(r)) for r in rows) + " |")
    lines += ["", f"Held-out text: `{settings['text']}` ({rows[0]['text_chars']} characters). Answers: greedy, at most "
              f"{settings['max_new_tokens']} new tokens, to the {settings['prompts_count']} prompts of "
              f"`{settings['prompts']}`. Benchmarks: 0-shot, scored as in eval_ceval.py."]
    if rows[0]["samples"]:
        lines += ["", "## Sample answers"]
        for i, sample in enumerate(rows[0]["samples"]):
            lines += ["", f"**{_cell(sample['prompt'])}**", "", "| checkpoint | answer |", "|---|---|"]
            lines += [f"| {_cell(r['name'])} | {_cell(r['samples'][i]['answer']) or '(empty)'} |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_report(rows: list[dict], path: Path) -> None:
    """Bars per checkpoint: held-out loss, bits per character, and C-Eval / CMMLU accuracy with the 25% chance line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .checkpoint import atomic_open

    names = [r["name"] for r in rows]
    x = range(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(4 + 2.2 * len(rows), 4))
    for ax, key, title in ((axes[0], "heldout_loss", "held-out loss (nats/token)"),
                           (axes[1], "bits_per_char", "held-out bits per character")):
        bars = ax.bar(x, [r[key] for r in rows], color="#4c72b0")
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_title(title, fontsize=10)
    benches = [b for b in ("ceval", "cmmlu") if any(r.get(b) for r in rows)]
    width = 0.8 / max(1, len(benches))
    for k, bench in enumerate(benches):
        values = [100 * r[bench]["accuracy"] if r.get(bench) else 0.0 for r in rows]
        bars = axes[2].bar([i + (k - (len(benches) - 1) / 2) * width for i in x], values, width,
                           label={"ceval": "C-Eval", "cmmlu": "CMMLU"}[bench])
        axes[2].bar_label(bars, fmt="%.1f", fontsize=8)
    if benches:
        axes[2].axhline(25, color="grey", linestyle="--", linewidth=1, label="chance (25%)")
        axes[2].set_ylim(0, 100)
        axes[2].legend(fontsize=8)
    else:
        axes[2].text(0.5, 0.5, "no C-Eval / CMMLU data given\n(--ceval_dir, --cmmlu_dir)", ha="center",
                     va="center", transform=axes[2].transAxes, fontsize=9, color="grey")
    axes[2].set_title("accuracy (%)", fontsize=10)
    for ax in axes:
        ax.set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
    fig.tight_layout()
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=120)
    finally:
        plt.close(fig)


def write_report(rows: list[dict], settings: dict, out_dir: Path) -> dict[str, Path]:
    """report.md, report.json and report.png in out_dir, each written atomically; returns their paths."""
    from .checkpoint import atomic_open

    paths = {"md": out_dir / "report.md", "json": out_dir / "report.json", "png": out_dir / "report.png"}
    with atomic_open(paths["md"], "w") as f:
        f.write(markdown_report(rows, settings))
    with atomic_open(paths["json"], "w") as f:
        json.dump({"settings": settings, "checkpoints": rows}, f, ensure_ascii=False, indent=2)
        f.write("\n")
    plot_report(rows, paths["png"])
    return paths

