"""Bits per character in the training loop: the arithmetic, what `count_text` counts (loss tokens; characters of
their text without BOS/EOS/padding), and `bpc` / `val_bpc` in a tiny run's log lines and metrics file."""

import math
import random

import pytest
import torch
from conftest import tiny_config
from pipeline_helpers import write_token_file
from test_train_utils import make_args

from model.checkpoint import load_tokenizer
from model.dataset import PretrainDataset
from model.model import MiniMindForCausalLM
from model.run_metrics import MetricsFile, holdout_split
from model.train_utils import (
    TextCount,
    _evenly_spaced,
    compute_init,
    count_text,
    loss_bits_per_char,
    text_counts,
    train,
)

TEXTS = ["你好，世界。", "MiniMind is small.", " 数字 123 and ünïcode ", "x"]
WORDS = ["猫", "喜欢", "鱼", "the", "river", "runs", "北京", "42", "很好", "ok!"]
T = 24


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()  # the bundled v1 tokenizer: <s>=1, </s>=2, <unk>=0 (padding)


def test_bits_per_char_arithmetic():
    # 2 ln2 nats per token = 2 bits per token; 10 tokens over 5 characters: 4 bits per character
    assert loss_bits_per_char(2 * math.log(2), TextCount(tokens=10, chars=5, items=1)) == pytest.approx(4.0)
    assert loss_bits_per_char(1.5, TextCount(7, 21, 3)) == pytest.approx(1.5 * 7 / (math.log(2) * 21))
    with pytest.raises(ValueError, match="at least one character"):  # model/report_card.bits_per_char's check
        loss_bits_per_char(1.0, TextCount(3, 0, 1))


def test_pretraining_window_counts_every_target_and_the_text_without_specials(tmp_path, tok):
    docs = [[tok.bos_token_id, *tok.encode(t, add_special_tokens=False), tok.eos_token_id] for t in TEXTS]
    n = sum(map(len, docs))
    data = PretrainDataset(write_token_file(tmp_path / "c.bin", docs), seq_len=n - 1)  # one window: all of it
    assert len(data) == 1
    count = count_text(data, [0], tok)
    assert count.tokens == n - 1  # every target (the first <s> is only input), the specials included
    assert count.chars == sum(map(len, TEXTS))  # the texts' own characters: no <s>/</s> in them


def sft_item(answer: str, tok, rng: random.Random, first_label: bool = False) -> dict:
    """A prompt of random ids (no loss), then the answer and </s> (loss), then padding (0, no loss)."""
    prompt = [rng.randrange(3, 6400) for _ in range(rng.randrange(2, 6))]
    answer_ids = [*tok.encode(answer, add_special_tokens=False), tok.eos_token_id]
    ids = (prompt + answer_ids)[:T]
    input_ids = torch.zeros(T, dtype=torch.long)
    labels = torch.full((T,), -100, dtype=torch.long)
    input_ids[:len(ids)] = torch.tensor(ids)
    labels[len(prompt):len(ids)] = torch.tensor(ids[len(prompt):])
    if first_label:
        labels[0] = input_ids[0]  # never a target: the model shifts labels, so position 0 predicts nothing
    return {"input_ids": input_ids, "labels": labels}


def answers(k: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 5))) for _ in range(k)]


def independent_count(texts: list[str], tok) -> tuple[int, int]:
    """(loss tokens, characters) straight from the answer strings: their tokens plus </s>, and their length."""
    return (sum(len(tok.encode(a, add_special_tokens=False)) + 1 for a in texts), sum(map(len, texts)))


def test_sft_items_count_their_answers_only(tok):
    texts = answers(6, seed=0)
    rng = random.Random(1)
    items = [sft_item(a, tok, rng, first_label=(i == 0)) for i, a in enumerate(texts)]
    count = count_text(items, range(6), tok)
    assert (count.tokens, count.chars, count.items) == (*independent_count(texts, tok), 6)
    assert count.chars_per_token == count.chars / count.tokens


def test_samples_are_spread_over_the_items(tok):
    picked = _evenly_spaced(range(1000), 200)
    assert len(set(picked)) == 200 and picked[0] == 0 and picked[-1] == 999
    assert _evenly_spaced([4, 8], 200) == [4, 8]
    items = [sft_item("ok", tok, random.Random(i)) for i in range(3)]
    train_count, val_count = text_counts(tok, items, items, [])
    assert train_count.items == 3 and val_count is None  # nothing held out: no val_bpc


def test_tiny_run_logs_bpc_and_val_bpc(tmp_path, tok, capsys):
    texts = answers(24, seed=3)
    rng = random.Random(4)
    items = [sft_item(a, tok, rng) for a in texts]
    args = make_args(tmp_path, "--batch_size", "3", "--max_steps", "4", "--val_fraction", "0.25",
                     "--eval_interval", "2", "--seed", "11", "--learning_rate", "3e-3")
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny_config(vocab_size=6400, max_seq_len=T))
    history = train(args, compute_init(args), model, items, "sft_bpc", tokenizer=tok)

    train_idx, val_idx = holdout_split(len(items), 0.25, 11)
    train_tokens, train_chars = independent_count([texts[i] for i in train_idx], tok)  # 18 items: all sampled
    val_tokens, val_chars = independent_count([texts[i] for i in val_idx], tok)
    records = MetricsFile(tmp_path / "out" / "sft_bpc_metrics.jsonl", is_master=False).read()
    assert [r["step"] for r in records] == [1, 2, 3, 4] and [r["loss"] for r in records] == [h["loss"] for h in history]
    for r in records:
        assert r["bpc"] == pytest.approx(r["loss"] * train_tokens / (math.log(2) * train_chars), rel=1e-12)
    assert [r["step"] for r in records if "val_bpc" in r] == [2, 4]
    for r in records[1::2]:
        assert r["val_bpc"] == pytest.approx(r["val_loss"] * val_tokens / (math.log(2) * val_chars), rel=1e-12)
    assert list(records[1])[:6] == ["step", "epoch", "loss", "bpc", "val_loss", "val_bpc"]

    out = capsys.readouterr().out
    assert f"{train_chars / train_tokens:.3f} chars/token over a training sample (18 items)" in out
    assert f"{val_chars / val_tokens:.3f} chars/token over the held-out items (6 items)" in out
    last = [line for line in out.splitlines() if line.startswith("step 4/4")][0]
    assert f"| bpc {records[-1]['bpc']:.4f} |" in last and f"| val_bpc {records[-1]['val_bpc']:.4f} |" in last
