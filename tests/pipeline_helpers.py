"""Helpers shared by the data-pipeline and pretraining tests (not a test module itself)."""

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_TOKENIZER = ROOT / "model" / "minimind_tokenizer"


def tokenizer_dir(tmp_root: Path) -> Path:
    """The bundled tokenizer; if this checkout has none yet, a throwaway byte-level BPE with the same special tokens
    and chat template, trained in a second on the bundled sample."""
    if (SHIPPED_TOKENIZER / "tokenizer.json").exists():
        return SHIPPED_TOKENIZER
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sys.path.insert(0, str(ROOT))
    from train_tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS

    out = tmp_root / "tokenizer"
    if (out / "tokenizer.json").exists():
        return out
    texts = [json.loads(line)["text"] for line in (ROOT / "dataset" / "pretrain_sample.jsonl").open(encoding="utf-8")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL_TOKENS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<unk>", "add_bos_token": False, "add_eos_token": False, "chat_template": CHAT_TEMPLATE}))
    return out


def write_jsonl(path: Path, records, raw_lines=()) -> Path:
    """Write records as JSON lines, then any raw byte lines (for malformed input)."""
    with open(path, "wb") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False).encode() + b"\n")
        for line in raw_lines:
            f.write(line + b"\n")
    return path


def write_token_file(path: Path, docs: list[list[int]]) -> Path:
    """A pretrain token file holding `docs` (each already including its <s>/</s>), without a tokenizer."""
    from model.dataset import TokenFileWriter

    with TokenFileWriter(path, "pretrain", {"tokens": "uint16", "doc_offsets": "uint64"}) as w:
        w.append("tokens", np.concatenate([np.array(d, np.uint16) for d in docs]))
        w.append("doc_offsets", np.concatenate([[0], np.cumsum([len(d) for d in docs])]))
        w.close()
    return path


def script_main(filename: str, module_name: str | None = None):
    """The `main` of a numbered script at the repository root (their names are not importable as modules)."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    name = module_name or filename.removesuffix(".py").replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, root / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def sft_like_batch(answer_tokens, seed: int = 0, T: int = 16) -> dict:
    """Random rows whose labels are -100 except each row's last answer_tokens[i] positions (an SFT batch's shape)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 256, (len(answer_tokens), T), generator=g)
    labels = torch.full_like(input_ids, -100)
    for row, n in enumerate(answer_tokens):
        labels[row, T - n:] = input_ids[row, T - n:]
    return {"input_ids": input_ids, "labels": labels}
