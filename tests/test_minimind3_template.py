"""MiniMind-3's shipped tokenizer (model/minimind3_tokenizer): special ids and exact ChatML template strings."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from model.chat_template3 import SPECIAL_TOKENS
from model.dataset import _encode_messages

SHIPPED = Path(__file__).resolve().parents[1] / "model" / "minimind3_tokenizer"

SYS = "<|im_start|>system\n你是MiniMind。<|im_end|>\n"
USER = "<|im_start|>user\n你好<|im_end|>\n"
EMPTY_THINK = "<think>\n\n</think>\n\n"

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "查询城市天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOLS_TEXT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + json.dumps(WEATHER_TOOL, ensure_ascii=False) +
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n"
)

# user asks, the assistant thinks and calls a tool, the tool answers, the assistant answers
TOOL_CONVERSATION = [
    {"role": "user", "content": "北京天气？"},
    {"role": "assistant", "content": "", "reasoning_content": "要查天气。",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]},
    {"role": "tool", "content": '{"weather": "晴"}'},
    {"role": "assistant", "content": "北京今天晴。", "reasoning_content": "工具说晴。"},
]
TOOL_CONVERSATION_TEXT = (
    "<|im_start|>user\n北京天气？<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n要查天气。\n</think>\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call><|im_end|>\n'
    '<|im_start|>user\n<tool_response>\n{"weather": "晴"}\n</tool_response><|im_end|>\n'
    "<|im_start|>assistant\n<think>\n工具说晴。\n</think>\n\n北京今天晴。<|im_end|>\n"
)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(SHIPPED))


def render(tok, messages, **kwargs):
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


def test_special_tokens(tok):
    assert len(tok) == tok.vocab_size == 6400
    assert tok.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == SPECIAL_TOKENS
    named = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<tool_call>": 21, "</tool_call>": 22,
             "<tool_response>": 23, "</tool_response>": 24, "<think>": 25, "</think>": 26}
    assert {t: SPECIAL_TOKENS.index(t) for t in named} == named
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", "<|im_start|>")
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (2, 0, 1)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.encode(token, add_special_tokens=False) == [i]
        assert tok.encode(f"前{token}后", add_special_tokens=False).count(i) == 1
    assert tok("你好")["input_ids"] == tok.encode("你好", add_special_tokens=False)  # nothing added implicitly


@pytest.mark.parametrize("typed", ["<think>", "</think>", "<tool_call>", "<|im_end|>", "<|im_start|>"])
def test_typed_special_text_stays_literal(tok, typed):
    text = f"用户输入了{typed}这段文字"
    literal = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert not set(literal) & set(range(len(SPECIAL_TOKENS)))
    assert tok.decode(literal) == text
    assert SPECIAL_TOKENS.index(typed) in tok(text, add_special_tokens=False)["input_ids"]


def test_round_trip(tok):
    s = "中英mixed文本 with 数字123, emoji 😀, tabs\t and\nnewlines。《宪法》第一条"
    assert tok.decode(tok.encode(s, add_special_tokens=False)) == s


def test_plain_user_assistant(tok):
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    assert render(tok, messages) == USER + "<|im_start|>assistant\n" + EMPTY_THINK + "你好！<|im_end|>\n"
    assert render(tok, messages[:1]) == USER


def test_system_and_multi_turn(tok):
    messages = [
        {"role": "system", "content": "你是MiniMind。"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "1+1=?"},
        {"role": "assistant", "content": "2"},
    ]
    assert render(tok, messages) == (
        SYS + USER + "<|im_start|>assistant\n" + EMPTY_THINK + "你好！<|im_end|>\n"
        "<|im_start|>user\n1+1=?<|im_end|>\n<|im_start|>assistant\n" + EMPTY_THINK + "2<|im_end|>\n")


def test_generation_prompt_thinking_switch(tok):
    messages = [{"role": "system", "content": "你是MiniMind。"}, {"role": "user", "content": "你好"}]
    header = SYS + USER + "<|im_start|>assistant\n"
    assert render(tok, messages, add_generation_prompt=True) == header + EMPTY_THINK  # off by default
    assert render(tok, messages, add_generation_prompt=True, enable_thinking=False) == header + EMPTY_THINK
    assert render(tok, messages, add_generation_prompt=True, enable_thinking=True) == header + "<think>\n"
    # the name MiniMind-3's own scripts use
    assert render(tok, messages, add_generation_prompt=True, open_thinking=True) == header + "<think>\n"
    assert render(tok, messages, enable_thinking=True) == SYS + USER


def test_assistant_reasoning(tok):
    user = [{"role": "user", "content": "你好"}]
    field = render(tok, user + [{"role": "assistant", "content": "答案", "reasoning_content": "\n想一想\n"}])
    assert field == USER + "<|im_start|>assistant\n<think>\n想一想\n</think>\n\n答案<|im_end|>\n"
    # reasoning written into the content is split out the same way
    inline = render(tok, user + [{"role": "assistant", "content": "<think>\n想一想\n</think>\n\n答案"}])
    assert inline == field
    # thinking on at generation time continues into the same layout as a training turn
    prompt = render(tok, user, add_generation_prompt=True, enable_thinking=True)
    assert field.startswith(prompt)
    assert render(tok, user + [{"role": "assistant", "content": "答案"}]).startswith(
        render(tok, user, add_generation_prompt=True))


def test_earlier_turns_keep_their_reasoning(tok):
    messages = [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "r1"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "reasoning_content": "r2"},
    ]
    text = render(tok, messages)
    assert "<think>\nr1\n</think>\n\nb<|im_end|>" in text and "<think>\nr2\n</think>\n\nd<|im_end|>" in text


def test_tools_in_system_turn(tok):
    user = [{"role": "user", "content": "你好"}]
    assert render(tok, user, tools=[WEATHER_TOOL]) == "<|im_start|>system\n" + TOOLS_TEXT + USER
    with_system = [{"role": "system", "content": "你是MiniMind。"}] + user
    assert render(tok, with_system, tools=[WEATHER_TOOL]) == (
        "<|im_start|>system\n你是MiniMind。\n\n" + TOOLS_TEXT + USER)
    assert render(tok, with_system, tools=[]) == SYS + USER


def test_tool_call_response_answer(tok):
    assert render(tok, TOOL_CONVERSATION, tools=[WEATHER_TOOL]) == (
        "<|im_start|>system\n" + TOOLS_TEXT + TOOL_CONVERSATION_TEXT)
    assert render(tok, TOOL_CONVERSATION) == TOOL_CONVERSATION_TEXT


def test_tool_call_forms(tok):
    calls = [{"name": "f", "arguments": '{"x": 1}'},  # flat, arguments already JSON text: kept verbatim
             {"type": "function", "function": {"name": "g", "arguments": {"y": "是"}}}]
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "好的", "tool_calls": calls},
                {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}]
    assert render(tok, messages) == (
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n" + EMPTY_THINK + "好的\n"
        '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "g", "arguments": {"y": "是"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n1\n</tool_response>\n<tool_response>\n2\n</tool_response><|im_end|>\n")


def test_renders_incrementally(tok):
    """Rendering messages[:k+1] starts with the rendering of messages[:k] (what model/dataset.py relies on)."""
    for tools in (None, [WEATHER_TOOL]):
        previous = ""
        for k in range(1, len(TOOL_CONVERSATION) + 1):
            text = render(tok, TOOL_CONVERSATION[:k], tools=tools)
            assert text.startswith(previous), k
            previous = text


def test_dataset_prefix_encoding(tok):
    """model/dataset.py's prefix-difference encoding reproduces the whole conversation's tokens, with each
    message's content found in its own piece."""
    pieces = list(_encode_messages(tok, TOOL_CONVERSATION))
    ids = [i for _, pre, body, post in pieces for i in pre + body + post]
    assert ids == tok.encode(TOOL_CONVERSATION_TEXT, add_special_tokens=False)
    bodies = [tok.decode(body) for _, _, body, _ in pieces]
    assert bodies == ["北京天气？", "", '{"weather": "晴"}', "北京今天晴。"]
    # reasoning sits in the text before the answer, tool calls in the text after it
    assert tok.decode(pieces[3][1]) == "<|im_start|>assistant\n<think>\n工具说晴。\n</think>\n\n"
    assert tok.decode(pieces[3][3]) == "<|im_end|>\n"
