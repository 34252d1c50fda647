"""2-eval.py with a MiniMind-3-family model: reasoning shown apart from the answer, tool calls as structured items,
only the answer kept in the history; `--think` switches the template's thinking on."""

import importlib.util
import io
import subprocess
import sys

import torch
from conftest import ROOT

from model.checkpoint import TOKENIZER3_DIR, load_tokenizer, save_weights
from model.LMConfig import PRESETS, LMConfig
from model.model import MiniMindForCausalLM

spec = importlib.util.spec_from_file_location("chat_cli", ROOT / "2-eval.py")
chat_cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(chat_cli)


def test_reply_view_separates_reasoning_answer_and_tool_calls():
    pieces = ["先算", "一下。\n</th", "ink>\n\n答案", "是4。\n<tool_call>\n", '{"name": "calc", "arguments": ',
              '{"expr": "2+2"}}\n</tool_call>']
    out = io.StringIO()
    parsed = chat_cli.show_reply(pieces, think=True, out=out)
    assert out.getvalue() == "┆ 先算一下。\n答案是4。\ntool call: calc {\"expr\": \"2+2\"}\n"
    assert parsed.reasoning == "先算一下。" and parsed.content == "答案是4。"
    assert parsed.tool_calls[0]["function"]["name"] == "calc"


def test_reply_view_with_thinking_off_shows_the_answer_alone():
    out = io.StringIO()
    assert chat_cli.show_reply(["你好", "！"], think=False, out=out).content == "你好！"
    assert out.getvalue() == "你好！\n"


def family_model():
    torch.manual_seed(0)
    config = LMConfig(**{**PRESETS["minimind-3"], "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                         "head_dim": 16, "hidden_dim": 128, "max_seq_len": 128})
    return MiniMindForCausalLM(config).eval()


def test_think_flag_reaches_the_template_and_the_history_keeps_the_answer():
    model, tokenizer = family_model(), load_tokenizer(TOKENIZER3_DIR)
    params = chat_cli.SamplingParams(max_new_tokens=8, temperature=0)
    for think, tail in ((True, "<|im_start|>assistant\n<think>\n"), (False, "<think>\n\n</think>\n\n")):
        chat = chat_cli.Chat(model, tokenizer, params, think=think)
        assert tokenizer.decode(chat.prompt("你好")).endswith(tail)
        shown = io.StringIO()
        answer = chat.reply("你好", out=shown)
        assert chat.history == [("你好", answer)] and "<think>" not in answer
    # the reply stream shows the format's tags to the parser, and no other special token
    hidden = chat.engine.hidden_special_ids
    assert tokenizer.convert_tokens_to_ids("<think>") not in hidden
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") in hidden


def test_cli_runs_a_family_checkpoint_with_think(tmp_path):
    model = family_model()
    ckpt = save_weights(model.state_dict(), tmp_path / "full_sft_64.pth", model.config)
    done = subprocess.run([sys.executable, str(ROOT / "2-eval.py"), "--ckpt", str(ckpt), "--device", "cpu",
                           "--prompt", "你好", "--think", "--max_new_tokens", "6", "--temperature", "0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("user> 你好\nassistant> ")
