"""SFT data and training: the loss mask covers exactly the assistant tokens, and the loss goes down.

The expected ids/labels are built here independently of model/dataset.py: each piece of the v1 chat format
("<s>user\\n", the content, "</s>\\n<s>assistant\\n", the answer, "</s>", "\\n") is tokenized on its own and the
labels are set by hand, then compared token by token with what `data_process.py sft` + `SFTDataset` produce.
"""

import argparse
import json

import pytest
import torch
from conftest import ROOT, tiny_config

import data_process
from model.checkpoint import load_tokenizer
from model.dataset import SFTDataset
from model.model import MiniMindForCausalLM
from model.train_utils import add_train_args, compute_init, train

IGNORE = -100


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def pieces(tok, system, turns):
    """[(ids, is_answer)] for a conversation, piece by piece, written from the v1 template by hand."""
    def enc(text, literal=False):
        return tok(text, add_special_tokens=False, split_special_tokens=literal)["input_ids"] if text else []

    out = [(enc(system, True), False)] if system else []
    for question, answer in turns:
        out += [(enc("<s>user\n"), False), (enc(question, True), False), (enc("</s>\n<s>assistant\n"), False),
                (enc(answer, True) + [tok.eos_token_id], True), (enc("\n"), False)]
    return out


def expected(tok, system, turns, max_len=None):
    ids, labels = [], []
    for piece, is_answer in pieces(tok, system, turns):
        ids += piece
        labels += piece if is_answer else [IGNORE] * len(piece)
    if max_len is not None:
        ids, labels = ids[:max_len], labels[:max_len]
    return ids, labels


def process(tmp_path, records, max_seq_len, name="sft"):
    raw = tmp_path / f"{name}.jsonl"
    raw.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / f"{name}.bin"
    # the stored conversations are long; SFTDataset re-truncates them to max_seq_len
    assert data_process.main(["sft", "--input", str(raw), "--output", str(out), "--workers", "1",
                              "--max_seq_len", "4096"]) == 0
    return SFTDataset(out, max_seq_len)


def check_item(item, ids, labels, max_seq_len):
    n = len(ids)
    assert item["input_ids"][:n].tolist() == ids
    assert item["labels"][:n].tolist() == labels
    assert item["input_ids"][n:].eq(0).all() and item["labels"][n:].eq(IGNORE).all()  # padding, no loss
    assert item["input_ids"].shape == (max_seq_len,)


SINGLE = {"input": "中国最长的河流是哪一条？", "output": "长江，全长约六千三百公里。"}
MULTI = {"system": "你是一个乐于助人的助手。", "history": [["什么是质数？", "只能被一和它本身整除的数。"],
                                               ["举个例子", "二、三、五、七。"]],
         "input": "水在多少度沸腾？", "output": "标准大气压下一百摄氏度。"}


def turns_of(rec):
    return [tuple(h) for h in rec.get("history", [])] + [(rec["input"], rec["output"])]


def test_single_and_multi_turn_masks_cover_exactly_the_answers(tok, tmp_path):
    ds = process(tmp_path, [SINGLE, MULTI], max_seq_len=256)
    assert len(ds) == 2 and ds.skipped == 0
    for i, rec in enumerate([SINGLE, MULTI]):
        ids, labels = expected(tok, rec.get("system", ""), turns_of(rec))
        check_item(ds[i], ids, labels, 256)
    # every assistant turn is trained on, not just the last one
    labels = ds[1]["labels"]
    n_answer_tokens = sum(len(tok(a, add_special_tokens=False, split_special_tokens=True)["input_ids"]) + 1
                          for _, a in turns_of(MULTI))
    assert int((labels != IGNORE).sum()) == n_answer_tokens


def test_truncation_drops_oldest_turns_and_never_trains_on_the_prompt(tok, tmp_path):
    system, turns = MULTI["system"], turns_of(MULTI)
    full_len = len(expected(tok, system, turns)[0])
    last_pair_len = len(expected(tok, "", turns[-1:])[0])
    system_len = len(expected(tok, system, [])[0])
    # room for the system prompt and the newest pair only: the two older pairs go, the system prompt stays
    max_len = system_len + last_pair_len + 2
    assert max_len < full_len
    ds = process(tmp_path, [MULTI], max_seq_len=max_len, name="trunc")
    ids, labels = expected(tok, system, turns[-1:])
    check_item(ds[0], ids, labels, max_len)

    # the newest pair alone is too long: its end is cut (a partial answer, no closing </s>), the prompt untouched
    cut = system_len + last_pair_len - 4
    ds = process(tmp_path, [MULTI], max_seq_len=cut, name="cut")
    ids, labels = expected(tok, system, turns[-1:], max_len=cut)
    check_item(ds[0], ids, labels, cut)
    assert tok.eos_token_id not in [t for t, lab in zip(ids, labels) if lab != IGNORE]


def test_sample_without_answer_tokens_is_skipped_and_counted(tok, tmp_path):
    long_question = {"input": "请详细解释。" * 40, "output": "好的。"}
    # the cut falls inside the question / the assistant marker: no answer token left, so nothing is trained on
    prompt_len = len(expected(tok, "", [(long_question["input"], "")])[0]) - 2  # -2: the empty answer's </s>\n
    ds = process(tmp_path, [long_question, SINGLE], max_seq_len=prompt_len - 3, name="skip")
    assert ds.skipped == 1 and len(ds) == 1
    ids, labels = expected(tok, "", turns_of(SINGLE))
    check_item(ds[0], ids, labels, prompt_len - 3)


def test_sft_loss_decreases_on_a_tiny_set(tmp_path):
    with open(ROOT / "dataset" / "sft_sample.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f][:16]
    ds = process(tmp_path, records, max_seq_len=96, name="tiny")
    parser = add_train_args(argparse.ArgumentParser())
    args = parser.parse_args(["--out_dir", str(tmp_path / "out"), "--images_dir", str(tmp_path / "img"),
                              "--device", "cpu", "--batch_size", "4", "--max_steps", "12", "--log_interval", "3",
                              "--learning_rate", "1e-2", "--num_workers", "0", "--save_interval", "1000"])
    rt = compute_init(args)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny_config(vocab_size=6400, max_seq_len=96))
    history = train(args, rt, model, ds, weights_name="sft_test")
    losses = [h["loss"] for h in history]
    assert len(losses) == 4
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.8 * losses[0], losses
    assert (tmp_path / "out" / "sft_test.pth").exists()
