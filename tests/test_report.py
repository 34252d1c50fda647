"""report.py on two tiny checkpoints (pretrain_*.pth, and a full_sft_*.pth trained a few steps on the held-out
text): both rows in the JSON, bits per character as the model's own summed loss gives it, C-Eval totals as
eval_ceval.py scores them, the repetition arithmetic on hand-written cases, and the Markdown / PNG files."""

import copy
import csv
import json
import math
import random

import pytest
import torch
from conftest import ROOT, tiny_model

import eval_ceval
import report
from model.checkpoint import TOKENIZER_DIR, load_model, load_tokenizer, save_weights
from model.report_card import bits_per_char, read_prompts, read_texts, repeated_ngrams, repetition_rate

TEXTS = ["春天来了，河边的柳树发出了嫩芽，小燕子从南方飞回来，在屋檐下忙着筑巢。",
         "图书馆里很安静，同学们有的在看书，有的在写作业，偶尔能听到翻书的声音。"]


def write_ceval(root):
    rng = random.Random(1)
    for split, n in (("dev", 2), ("val", 6)):
        path = root / split / f"logic_{split}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([["id", "question", "A", "B", "C", "D", "answer"]] + [
                [str(i), f"第{i}题：" + "哪一个对" * rng.randint(1, 3), *(f"选{rng.randint(0, 99)}" for _ in "ABCD"),
                 rng.choice("ABCD")] for i in range(n)])
    return root


def trained_copy(model, tokenizer, steps: int = 5):
    """The model after a few Adam steps on the held-out texts, so its bits per character must go down."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = [torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode(t, add_special_tokens=False)]]) for t in TEXTS]
    for _ in range(steps):
        for ids in batch:
            optimizer.zero_grad()
            model(ids, labels=ids).loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    base = tiny_model(vocab_size=6400, max_seq_len=256)
    pretrain = save_weights(base.state_dict(), tmp / "pretrain_64.pth", base.config)
    sft = save_weights(trained_copy(base, tokenizer).state_dict(), tmp / "full_sft_64.pth", base.config)
    text = tmp / "held_out.txt"
    text.write_text("\n\n".join(TEXTS) + "\n", encoding="utf-8")
    ceval = write_ceval(tmp / "ceval-exam")
    out = tmp / "out"
    code = report.main([str(pretrain), str(sft), "--text", str(text), "--ceval_dir", str(ceval), "--out_dir", str(out),
                        "--max_new_tokens", "12", "--samples", "2", "--device", "cpu"])
    assert code == 0
    return {"tmp": tmp, "out": out, "pretrain": pretrain, "sft": sft, "tokenizer": tokenizer, "ceval": ceval,
            "report": json.loads((out / "report.json").read_text(encoding="utf-8"))}


def test_both_checkpoints_side_by_side(run):
    rows = run["report"]["checkpoints"]
    assert [r["name"] for r in rows] == ["pretrain_64.pth", "full_sft_64.pth"]
    assert [r["stage"] for r in rows] == ["pretrain", "full_sft"] and [r["chat"] for r in rows] == [False, True]
    for r in rows:
        assert math.isfinite(r["bits_per_char"]) and r["bits_per_char"] > 0
        assert r["text_chars"] == sum(map(len, TEXTS))
        assert len(r["samples"]) == 2 and r["samples"][0]["prompt"] == read_prompts(report.DEFAULT_PROMPTS)[0]
        assert 0 < r["answer_tokens"] <= 12 and 0 <= r["repetition_rate"] <= 1
    # a few steps on the held-out text itself must make it cheaper to encode
    assert rows[1]["bits_per_char"] < rows[0]["bits_per_char"]
    markdown = (run["out"] / "report.md").read_text(encoding="utf-8")
    assert "| held-out bits/char |" in markdown and "full_sft_64.pth" in markdown and "## Sample answers" in markdown
    assert (run["out"] / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in run["out"].iterdir() if p.name.startswith(".")]  # no temp file left behind


@torch.inference_mode()
def test_bits_per_char_matches_the_models_own_summed_loss(run):
    model = load_model(run["pretrain"], device="cpu")
    tok = run["tokenizer"]
    total = 0.0
    for text in TEXTS:  # each shorter than the context: one window, BOS given, every text token predicted
        ids = torch.tensor([[tok.bos_token_id, *tok.encode(text, add_special_tokens=False)]])
        total += float(model(ids, labels=ids, num_items_in_batch=1).loss)
    row = run["report"]["checkpoints"][0]
    assert row["bits_per_char"] == pytest.approx(total / math.log(2) / sum(map(len, TEXTS)), rel=1e-5)
    assert row["heldout_loss"] == pytest.approx(total / row["text_tokens"], rel=1e-5)


def test_ceval_total_is_eval_cevals(run, tmp_path):
    assert eval_ceval.main(["--ckpt", str(run["sft"]), "--data_dir", str(run["ceval"]), "--device", "cpu",
                            "--out_dir", str(tmp_path / "ev"), "--chart", str(tmp_path / "ev.png")]) == 0
    total = json.loads((tmp_path / "ev" / "summary.json").read_text())["total"]
    ours = run["report"]["checkpoints"][1]["ceval"]
    assert (ours["correct"], ours["total"]) == (total["correct"], total["total"]) == (ours["correct"], 6)
    assert run["report"]["checkpoints"][0]["cmmlu"] is None


def test_repetition_and_bits_arithmetic_by_hand():
    assert repeated_ngrams("abcabc", 3) == (1, 4)  # abc bca cab abc
    assert repeated_ngrams("aaaa", 2) == (2, 3)
    assert repeated_ngrams("abc", 4) == (0, 0)
    assert repetition_rate(["abab", "xyz"], 2) == pytest.approx(1 / 5)  # ab ba ab | xy yz
    assert repetition_rate(["ab", "ab"], 2) == 0.0  # a repeat counts only within one answer
    assert repetition_rate(["好好好好好"], 4) == pytest.approx(1 / 2)
    assert repetition_rate([""], 4) == 0.0
    assert bits_per_char(10 * math.log(2), 5) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        bits_per_char(1.0, 0)


def test_bundled_prompts_and_bad_files(tmp_path, capsys):
    prompts = read_prompts(ROOT / "dataset" / "report_prompts.jsonl")
    assert len(prompts) >= 15 and len(set(prompts)) == len(prompts)
    assert len(read_texts(ROOT / "dataset" / "report_prompts.jsonl")) == len(prompts)  # the reference answers
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "你好"}\n{"question": "x"}\n', encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path / "missing.pth"), "--prompts", str(bad)])
    assert exit_info.value.code == 2 and f"{bad}:2" in capsys.readouterr().err


def test_minimind3_checkpoint_gets_its_own_tokenizer_and_template(tmp_path):
    from model.checkpoint import TOKENIZER3_DIR
    from model.dataset import encode_prompt
    from model.LMConfig import PRESETS, LMConfig
    from model.model import MiniMindForCausalLM
    from model.report_card import prompt_ids

    torch.manual_seed(0)
    small = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=6400,
                 max_seq_len=256)
    model = MiniMindForCausalLM(LMConfig(**{**PRESETS["minimind-3"], **small})).eval()
    ckpt = save_weights(model.state_dict(), tmp_path / "rl_64.pth", model.config)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("你好\n天空为什么是蓝色的？\n", encoding="utf-8")
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": TEXTS[0]}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert report.main([str(ckpt), "--text", str(text), "--prompts", str(prompts), "--out_dir", str(tmp_path / "out"),
                        "--max_new_tokens", "4", "--device", "cpu"]) == 0
    row = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))["checkpoints"][0]
    assert row["family"] == "minimind-3" and row["chat"] and math.isfinite(row["bits_per_char"])
    tokenizer = load_tokenizer(TOKENIZER3_DIR)
    assert row["text_chars"] == len(TEXTS[0])
    assert prompt_ids(tokenizer, "你好", True) == encode_prompt(tokenizer, [{"role": "user", "content": "你好"}])
