"""Equal-compute pretraining recipes side by side, scored in bits per character on held-out general text.

    python scripts/recipe_sweep.py --corpus ../shared/data/pretrain_zh-0*.jsonl.gz --heldout ../shared/data/sft_zh.jsonl.gz
    python scripts/recipe_sweep.py --corpus ... --heldout ... --runs "recipe:" "all-documents:--max_doc_chars 0" \\
        "bos:--packing bos" "muon:--optimizer muon" "cosine:--lr_schedule cosine --learning_rate 5e-4"
    python scripts/recipe_sweep.py ... --runs "v0-tokenizer:tokenizer=model/minimind_tokenizer_v0"   # retokenizes
    python scripts/recipe_sweep.py ... --steps 400 --batch_size 16 --dim 256 --n_layers 4 --max_seq_len 256

Every run is `1-pretrain.py` with the same shape and budget (--steps x --batch_size windows of --max_seq_len) plus
its own flags (`name:flags`; a leading `tokenizer=DIR` tokenizes the corpus with that tokenizer first). Each
checkpoint then scores the held-out text with report_card.score_texts: bits per character, which compares across
tokenizers. The held-out text is the last --heldout_n answers of an SFT file (general Chinese no pretraining
document contains) or any jsonl/txt file report.py reads. Writes {out}/sweep.md, sweep.json and sweep.png (each
run's validation bits/char curve from its metrics file). Runs already in {out}/sweep.json with the same budget
and held-out text stay in the table (a run of the same name is measured again), so a sweep can grow in steps.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.checkpoint import (  # noqa: E402
    TOKENIZER_DIR,
    atomic_open,
    load_model,
    load_tokenizer,
    read_checkpoint,
    vocab_fingerprint,
)
from model.errors import UsageError, exit_on_usage_error  # noqa: E402
from model.report_card import read_texts, score_texts  # noqa: E402


def script_main(filename: str):
    spec = importlib.util.spec_from_file_location(filename.removesuffix(".py").replace("-", "_"), ROOT / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", nargs="+", required=True, help="raw pretraining jsonl(.gz), as data_process.py reads")
    p.add_argument("--heldout", required=True, help="SFT jsonl(.gz) (its last answers are held out) or a text file")
    p.add_argument("--heldout_n", type=int, default=500, help="SFT answers held out")
    p.add_argument("--runs", nargs="+", default=["recipe:", "all-documents:--max_doc_chars 0"], help="name:flags ...")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--n_heads", type=int, default=8)
    p.add_argument("--n_kv_heads", type=int, default=4)
    p.add_argument("--max_seq_len", type=int, default=256)
    p.add_argument("--val_fraction", type=float, default=0.001, help="pretraining windows held out for val_bpc curves")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=str(ROOT / "out" / "sweep"))
    return p.parse_args(argv)


def parse_run(spec: str) -> tuple[str, Path, list[str]]:
    """"name:[tokenizer=DIR] flags" -> (name, tokenizer folder, 1-pretrain.py flags)."""
    name, sep, rest = spec.partition(":")
    if not sep or not name:
        raise UsageError(f"--runs {spec!r}: write each run as name:flags (flags may be empty, e.g. 'base:')")
    words = rest.split()
    tokenizer = TOKENIZER_DIR
    if words and words[0].startswith("tokenizer="):
        tokenizer = Path(words.pop(0).split("=", 1)[1])
    return name, tokenizer, words


def heldout_texts(path: str, n: int) -> list[str]:
    """The last n answers of an SFT file (deepctrl `output` or the last assistant message), else report.py's reader."""
    opener = gzip.open if path.endswith(".gz") else open
    answers = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("output"), str) and record["output"].strip():
                answers.append(record["output"])
    return answers[-n:] if answers else read_texts(path)


def tokenized_corpus(args, tokenizer: Path, out: Path) -> Path:
    """The corpus as a token file for one tokenizer (made once per tokenizer: named by its vocabulary, so a
    retrained tokenizer in the same folder gets its own)."""
    path = out / f"corpus_{tokenizer.name}_{vocab_fingerprint(load_tokenizer(tokenizer))[:12]}.bin"
    if not path.exists():
        import data_process  # a real module (not loaded from a path): its worker processes pickle its functions

        data_process.main(["pretrain", "--input", *args.corpus, "--output", str(path), "--tokenizer", str(tokenizer)])
    return path


def run_one(args, spec: str, texts: list[str], out: Path) -> dict:
    name, tokenizer, flags = parse_run(spec)
    data, run_dir = tokenized_corpus(args, tokenizer, out), out / name
    shape = ["--dim", args.dim, "--n_layers", args.n_layers, "--n_heads", args.n_heads, "--n_kv_heads",
             args.n_kv_heads, "--max_seq_len", args.max_seq_len]
    argv = [*shape, "--data_path", data, "--out_dir", run_dir, "--images_dir", run_dir, "--max_steps", args.steps,
            "--batch_size", args.batch_size, "--val_fraction", args.val_fraction,
            "--tokenizer", tokenizer, *(["--device", args.device] if args.device else []), *flags]
    start = time.time()
    script_main("1-pretrain.py")([str(a) for a in argv])
    seconds = time.time() - start
    weights = next(run_dir.glob("pretrain_*.pth"))
    model = load_model(read_checkpoint(weights), device=args.device or "cpu").eval()
    with torch.no_grad():
        score = score_texts(model, load_tokenizer(tokenizer), texts)
    metrics_path = weights.with_name(f"{weights.stem}_metrics.jsonl")
    metrics = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    curve = [(m["step"], m["val_bpc"]) for m in metrics if m.get("val_bpc") is not None]
    return {"name": name, "flags": " ".join(flags), "tokenizer": str(tokenizer), "heldout_bpc": score.bits_per_char,
            "heldout_chars_per_token": score.chars / score.tokens, "train_seconds": seconds, "val_bpc_curve": curve}


def markdown(rows: list[dict], args) -> str:
    head = (f"{args.steps} steps x {args.batch_size} windows of {args.max_seq_len}, dim {args.dim}, {args.n_layers} "
            "layers; held-out general text in bits per character (lower is better)\n\n")
    lines = ["| run | flags | tokenizer | held-out bits/char | chars/token | train s |", "| --- | --- | --- | --- | --- | --- |"]
    best = min(r["heldout_bpc"] for r in rows)
    for r in rows:
        mark = " **best**" if r["heldout_bpc"] == best else ""
        lines.append(f"| {r['name']} | `{r['flags'] or '(defaults)'}` | {Path(r['tokenizer']).name} | "
                     f"{r['heldout_bpc']:.3f}{mark} | {r['heldout_chars_per_token']:.3f} | {r['train_seconds']:.0f} |")
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # distinct colours for up to 20 runs (the default cycle has 10)
    for r in rows:
        if r["val_bpc_curve"]:
            ax.plot(*zip(*r["val_bpc_curve"]), marker="o", markersize=3, label=f"{r['name']} ({r['heldout_bpc']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation bits per character")
    ax.set_title("recipe sweep: validation bits/char (legend: held-out general text)", loc="left")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def write_outputs(rows: list[dict], args, out: Path) -> str:
    table = markdown(rows, args)
    with atomic_open(out / "sweep.md", "w") as f:
        f.write(table)
    with atomic_open(out / "sweep.json", "w") as f:
        json.dump({"settings": vars(args), "runs": rows}, f, ensure_ascii=False, indent=2)
    plot(rows, out / "sweep.png")
    return table


BUDGET_KEYS = ("corpus", "heldout", "heldout_n", "steps", "batch_size", "dim", "n_layers", "n_heads", "n_kv_heads",
               "max_seq_len", "val_fraction")


def earlier_rows(args, out: Path) -> list[dict]:
    """Rows of an earlier sweep in the same --out folder, kept so a sweep grows run by run; only when its budget and
    held-out text are this one's, since otherwise the figures would not compare."""
    path = out / "sweep.json"
    if not path.exists():
        return []
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
        settings, rows = earlier["settings"], earlier["runs"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UsageError(f"{path}: not a recipe_sweep.py result ({e}); move it away or pick another --out") from None
    differ = [k for k in BUDGET_KEYS if settings.get(k) != vars(args)[k]]
    if differ:
        raise UsageError(f"{path} was measured with other {', '.join('--' + k for k in differ)}; its rows would not "
                         "compare with this sweep's: use the same settings or another --out")
    return rows


@exit_on_usage_error
def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for spec in args.runs:
        parse_run(spec)  # every spec checked before the first run starts
    texts = heldout_texts(args.heldout, args.heldout_n)
    names = [parse_run(spec)[0] for spec in args.runs]
    rows = [r for r in earlier_rows(args, out) if r["name"] not in names]
    for spec in args.runs:  # the files are rewritten after every run: a long sweep stopped early keeps its rows
        rows.append(run_one(args, spec, texts, out))
        table = write_outputs(rows, args, out)
    print(table)
    print(f"wrote {out / 'sweep.md'}, {out / 'sweep.json'}, {out / 'sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
