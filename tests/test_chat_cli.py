"""2-eval.py: the history stays within the context (oldest turns dropped first), and `--prompt` returns text."""

import importlib.util
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_model

from model.checkpoint import load_tokenizer
from model.dataset import encode_prompt

spec = importlib.util.spec_from_file_location("chat_cli", ROOT / "2-eval.py")
chat_cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(chat_cli)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


HISTORY = [(f"第{i}个问题是什么？", f"这是第{i}个回答。") for i in range(5)]


def test_oldest_turns_are_dropped_first_and_the_system_prompt_stays(tok):
    system = "你是一个助手。"
    model = tiny_model(vocab_size=len(tok), max_seq_len=1024)
    chat = chat_cli.Chat(model, tok, chat_cli.SamplingParams(max_new_tokens=8), system=system)
    chat.history = list(HISTORY)

    def expected(history, question="新问题", sys_prompt=system):
        return encode_prompt(tok, chat_cli.chat_messages(sys_prompt, history, question))

    full, last_two, last_three = expected(HISTORY), expected(HISTORY[-2:]), expected(HISTORY[-3:])
    assert len(last_two) < len(last_three) < len(full)
    chat.budget = len(last_three) - 1
    assert chat.prompt("新问题") == last_two
    assert tok.decode(last_two).startswith(system)
    chat.budget = len(full)
    assert chat.prompt("新问题") == full
    chat.max_history_turns = 1
    assert chat.prompt("新问题") == expected(HISTORY[-1:])

    # a single message longer than the budget is cut inside its text, keeping its end; the template stays whole
    chat.system, chat.max_history_turns, chat.budget = "", None, 20
    question = "很长" * 50 + "结尾的问题？"
    ids = chat.prompt(question)
    assert len(ids) <= 20
    text = tok.decode(ids)
    assert text.startswith("<s>user\n") and text.endswith("结尾的问题？</s>\n<s>assistant\n")


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
    with pytest.raises(SystemExit) as exit_info:
        chat_cli.main(["--ckpt", str(tmp_path / "nope.pth"), "--prompt", "hi", *flags])
    assert exit_info.value.code == 2 and "checkpoint not found" in capsys.readouterr().err
