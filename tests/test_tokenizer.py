"""Tests for the shipped tokenizer (model/minimind_tokenizer) and train_tokenizer.py."""

import gzip
import importlib.util
import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_tokenizer.py"
SHIPPED = ROOT / "model" / "minimind_tokenizer"

ROUND_TRIP = {
    "chinese": "你好，世界！今天天气很好。《中华人民共和国宪法》第一条：中华人民共和国是工人阶级领导的国家。",
    "english": "The quick brown fox jumps over the lazy dog. Don't stop -- it's 3.14159, isn't it?",
    "code": "def f(x):\n\tif x:\n\t\treturn [i ** 2 for i in range(x)]  # sq\n    else:\n        return {}\r\n",
    "emoji": "😀👍🏽 family: 👨\u200d👩\u200d👧\u200d👦 flag: 🇨🇳 rainbow: 🏳️\u200d🌈 keycap: 1️⃣",
    "zero_width": "a\u200bb\u200dc\ufeffd\u200b\u200b \ufeff开头",
    "whitespace": "  lead\u3000全角 \t\t mixed \n\n\n \u00a0nbsp \r\n\x0b\x0c trail   ",
    "mixed": "中英mixed文本 with 数字123 and symbols ©®™ ∑∫ √2 ≈ 1.414 — “引号” ‘单’ …",
    "rare": "\x00\x01 control, 𠀀𪚥 ext-B, ﷽ arabic ligature, ᄀ jamo",
    "special_like": "<s> </s> <unk> are just text here",
}


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def ids_of(encoded):
    return encoded["input_ids"] if isinstance(encoded, Mapping) else encoded


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(SHIPPED))


def test_shipped_files():
    assert (SHIPPED / "tokenizer.json").is_file()
    assert (SHIPPED / "tokenizer_config.json").is_file()


def test_special_tokens(tok):
    assert tok.vocab_size == 6400
    assert len(tok) == 6400
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<unk>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    # No BOS/EOS is added implicitly.
    assert tok("你好")["input_ids"] == tok.encode("你好", add_special_tokens=False)
    assert 1 not in tok("你好")["input_ids"] and 2 not in tok("你好")["input_ids"]


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_round_trip(tok, name):
    s = ROUND_TRIP[name]
    ids = tok.encode(s, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == s
    if name != "special_like":
        assert not {0, 1, 2} & set(ids)


def test_chinese_is_compressed(tok):
    s = ROUND_TRIP["chinese"]
    assert len(s) / len(tok.encode(s, add_special_tokens=False)) > 1.0


def test_chat_template_system_multi_turn(tok):
    messages = [
        {"role": "system", "content": "你是MiniMind。"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": "1+1=?"},
        {"role": "assistant", "content": "2"},
    ]
    expected = ("你是MiniMind。<s>user\n你好</s>\n<s>assistant\n你好！有什么可以帮你？</s>\n"
                "<s>user\n1+1=?</s>\n<s>assistant\n2</s>\n")
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == expected
    short = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tok.apply_chat_template(short, tokenize=False) == "S<s>user\nhi</s>\n<s>assistant\nyo</s>\n"

    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(1) == text.count("<s>") == 4
    assert ids.count(2) == text.count("</s>") == 4
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert ids_of(tok.apply_chat_template(messages, tokenize=True)) == ids


def test_chat_template_no_system(tok):
    messages = [{"role": "user", "content": "你好"}]
    expected = "<s>user\n你好</s>\n<s>assistant\n"
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    two = messages + [{"role": "assistant", "content": "嗨"}, {"role": "user", "content": "再见"}]
    assert tok.apply_chat_template(two, tokenize=False) == expected + "嗨</s>\n<s>user\n再见</s>\n<s>assistant\n"
    ids = tok.encode(expected, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1
    assert tok.encode("<s>", add_special_tokens=False) == [1]
    assert tok.encode("</s>", add_special_tokens=False) == [2]


def test_script_default_dir_is_relative_to_script():
    spec = importlib.util.spec_from_file_location("train_tokenizer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert Path(module.DEFAULT_DIR) == SHIPPED


def _corpus_lines(n):
    samples = list(ROUND_TRIP.values())
    return [json.dumps({"text": f"{samples[i % len(samples)]} 第{i}段 line {i}"}, ensure_ascii=False)
            for i in range(n)]


def test_script_end_to_end(tmp_path):
    lines = _corpus_lines(60)
    plain = tmp_path / "a.jsonl"
    plain.write_text("\n".join(lines[:30] + ["{not json", '{"content": "no text field"}']) + "\n", encoding="utf-8")
    gz = tmp_path / "b.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines[30:] + ['{"text": 123}', "[1, 2]", "", '{"text": "tail"}']) + "\n")
    out = tmp_path / "tok"

    result = run_script("--data_path", plain, str(tmp_path / "*.gz"), "--vocab_size", 300,
                        "--tokenizer_dir", out, "--eval_every", 10)
    assert result.returncode == 0, result.stderr
    assert "skipped 4 bad line(s)" in result.stdout
    assert f"{plain}:31 (invalid JSON)" in result.stdout
    assert "vocab size 300" in result.stdout
    assert "chars/token" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]

    trained = AutoTokenizer.from_pretrained(str(out))
    assert len(trained) == 300
    assert trained.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]
    assert trained.pad_token_id == 0
    for s in ROUND_TRIP.values():
        assert trained.decode(trained.encode(s, add_special_tokens=False)) == s
    assert trained.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == \
        "<s>user\nx</s>\n<s>assistant\n"


@pytest.mark.parametrize("content", ["", "\n\n", '{bad\n{"text": 5}\n{"other": "x"}\n{"text": ""}\n'])
def test_script_no_usable_text(tmp_path, content):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content, encoding="utf-8")
    out = tmp_path / "tok"
    result = run_script("--data_path", bad, "--vocab_size", 300, "--tokenizer_dir", out)
    assert result.returncode != 0
    assert "no usable 'text'" in result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_script_missing_path(tmp_path):
    result = run_script("--data_path", tmp_path / "nothing-*.jsonl", "--tokenizer_dir", tmp_path / "tok")
    assert result.returncode != 0
    assert "matches no file" in result.stderr


def test_script_minimind3_family(tmp_path):
    """--family minimind-3: Qwen-style specials at fixed ids, ChatML template, and SFT dialogues read as text."""
    from model.chat_template3 import SPECIAL_TOKENS as SPECIAL_3

    data = tmp_path / "mixed.jsonl"
    sft = [{"history": [["早上好", "早上好！"]], "input": "今天星期几", "output": "星期三"},
           {"conversations": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]}]
    data.write_text("\n".join(_corpus_lines(40) + [json.dumps(r, ensure_ascii=False) for r in sft]) + "\n",
                    encoding="utf-8")
    out = tmp_path / "tok3"
    result = run_script("--family", "minimind-3", "--data_path", data, "--vocab_size", 400,
                        "--tokenizer_dir", out, "--eval_every", 0)
    assert result.returncode == 0, result.stderr
    assert "on 42 docs" in result.stdout and "skipped" not in result.stdout

    trained = AutoTokenizer.from_pretrained(str(out))
    assert len(trained) == 400
    assert trained.convert_ids_to_tokens(list(range(len(SPECIAL_3)))) == SPECIAL_3
    assert trained.convert_tokens_to_ids(["<tool_call>", "</tool_call>", "<think>", "</think>"]) == [21, 22, 25, 26]
    assert (trained.eos_token_id, trained.pad_token_id) == (2, 0)
    for s in ROUND_TRIP.values():
        assert trained.decode(trained.encode(s, add_special_tokens=False)) == s
    assert trained.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                       add_generation_prompt=True) == \
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_corpus_balances_sources_by_characters(tmp_path):
    """--max_chars_per_file: each file gives documents until it has given the cap (the document crossing it is the
    last one), so a large pretraining file and a small SFT file contribute about the same text."""
    spec = importlib.util.spec_from_file_location("train_tokenizer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    big, small = tmp_path / "big.jsonl", tmp_path / "sft.jsonl"
    big.write_text("".join(json.dumps({"text": "长" * 100}) + "\n" for _ in range(50)), encoding="utf-8")
    small.write_text("".join(json.dumps({"input": "问" * 20, "output": "答" * 29}) + "\n" for _ in range(50)),
                     encoding="utf-8")  # 20 + "\n" + 29 = 50 characters per dialogue
    corpus = module.Corpus([str(big), str(small)], eval_every=0, max_chars_per_file=1000)
    texts = list(corpus)
    assert texts.count("长" * 100) == 10 and texts.count("问" * 20 + "\n" + "答" * 29) == 20
    assert corpus.train_chars == 2000
    uncapped = module.Corpus([str(big), str(small)], eval_every=0)
    assert len(list(uncapped)) == 100
