"""2-eval.py: the history stays within the context (oldest turns dropped first), and `--prompt` returns text."""

import importlib.util
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_model

from model.checkpoint import load_tokenizer

spec = importlib.util.spec_from_file_location("chat_cli", ROOT / "2-eval.py")
chat_cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(chat_cli)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


HISTORY = [(f"第{i}个问题是什么？", f"这是第{i}个回答。") for i in range(5)]


def test_oldest_turns_are_dropped_first_and_the_system_prompt_stays(tok):
    system = "你是一个助手。"
    full = chat_cli.render(tok, system, HISTORY, "新问题")
    last_two = chat_cli.render(tok, system, HISTORY[-2:], "新问题")
    last_three = chat_cli.render(tok, system, HISTORY[-3:], "新问题")
    assert len(last_two) < len(last_three) < len(full)

    ids, kept = chat_cli.fit_prompt(tok, system, HISTORY, "新问题", budget=len(last_three) - 1)
    assert kept == HISTORY[-2:] and ids == last_two
    assert tok.decode(ids).startswith(system)
    ids, kept = chat_cli.fit_prompt(tok, system, HISTORY, "新问题", budget=len(full))
    assert kept == HISTORY and ids == full
    ids, kept = chat_cli.fit_prompt(tok, system, HISTORY, "新问题", budget=len(full), max_turns=1)
    assert kept == HISTORY[-1:]
    # a single message longer than the budget keeps its end (where the prompt asks for the answer)
    alone = chat_cli.render(tok, "", [], "很长" * 50)
    ids, kept = chat_cli.fit_prompt(tok, "", HISTORY, "很长" * 50, budget=20)
    assert kept == [] and ids == alone[-20:]


def test_prompt_budget_leaves_room_for_the_answer():
    assert chat_cli.prompt_budget(512, 128) == 384
    assert chat_cli.prompt_budget(512, 4096) == 256  # never less than half the context


def test_prompt_flag_answers_with_text(tmp_path, tok):
    """A real subprocess, as a user runs it (the end-to-end test in test_posttrain_scripts.py runs it on trained
    checkpoints too)."""
    model = tiny_model(vocab_size=6400, max_seq_len=64)
    ckpt = tmp_path / "chat.pth"
    torch.save(model.state_dict(), ckpt)
    cmd = [sys.executable, str(ROOT / "2-eval.py"), "--ckpt", str(ckpt), "--dim", "64", "--n_layers", "2",
           "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "64", "--device", "cpu", "--temperature", "0",
           "--max_new_tokens", "12", "--prompt", "你好", "--prompt", "再说一遍"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    replies = [line.split("assistant> ", 1)[1] for line in out.stdout.splitlines() if line.startswith("assistant> ")]
    assert len(replies) == 2 and all(r.strip() for r in replies), out.stdout
    assert "loaded" in out.stderr


def test_batch_file_and_missing_checkpoint(tmp_path, tok, capsys):
    model = tiny_model(vocab_size=6400, max_seq_len=64)
    torch.save(model.state_dict(), tmp_path / "chat.pth")
    (tmp_path / "q.txt").write_text("你好\n\n一加一等于几？\n", encoding="utf-8")
    flags = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "64",
             "--device", "cpu", "--temperature", "0", "--max_new_tokens", "6"]
    chat_cli.main(["--ckpt", str(tmp_path / "chat.pth"), "--batch_file", str(tmp_path / "q.txt"), *flags])
    out = capsys.readouterr().out
    assert out.count("user> ") == 2 and "user> 一加一等于几？\nassistant> " in out  # the blank line is skipped
    with pytest.raises(SystemExit, match="checkpoint not found"):
        chat_cli.main(["--ckpt", str(tmp_path / "nope.pth"), "--prompt", "hi", *flags])
