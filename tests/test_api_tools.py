"""Tool calls and reasoning in the chat API (MiniMind-3): the reply parser, request validation and prompts
in-process, and the official `openai` client's tools round trip against the real server.

The server's model is a tiny MiniMind-3-family model trained in the fixture (a few hundred CPU steps) to answer one
tool-using conversation, so greedy decoding reproduces a real tool-call reply and a real answer to the result.
"""

import json

import pytest
import torch
from conftest import TOKENIZER_DIR
from openai import OpenAI
from server_helpers import family_server, tiny_chat_model

from model.api_schema import ApiError, ChatRequest, parse_request
from model.api_server import ServerOptions, chat_prompt
from model.chat_prompt import build_chat_prompt
from model.checkpoint import TOKENIZER3_DIR, load_tokenizer, save_weights
from model.dataset import conversation_segments, encode_prompt
from model.LMConfig import PRESETS, LMConfig
from model.model import MiniMindForCausalLM
from model.serving import ChatEngine
from model.tool_calls import ReplyParser, collect_events, parse_reply

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
QUESTION = {"role": "user", "content": "What's the weather in Paris?"}
REASONING_1, ARGS = "Check the weather.", {"city": "Paris"}
TOOL_RESULT = '{"temp": 21}'
REASONING_2, ANSWER = "It is 21 degrees.", "It is 21 degrees in Paris."
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def streamed(text: str, thinking: bool = False, parse_tools: bool = True):
    """parse_reply's result, from the text fed one character at a time."""
    parser = ReplyParser(thinking=thinking, parse_tools=parse_tools)
    events = [e for ch in text for e in parser.push(ch)] + parser.flush()
    return collect_events(events)


def same(a, b) -> bool:  # call ids are random
    strip = [{k: v for k, v in c.items() if k != "id"} for c in a.tool_calls]
    return (a.reasoning, a.content, strip) == (b.reasoning, b.content,
                                               [{k: v for k, v in c.items() if k != "id"} for c in b.tool_calls])


# ---- the parser -------------------------------------------------------------------------------------------------

def test_reasoning_and_content():
    reply = parse_reply("<think>\nmull it over\n</think>\n\nThe answer.")
    assert (reply.reasoning, reply.content, reply.tool_calls) == ("mull it over", "The answer.", [])


def test_thinking_on_reply_starts_inside_the_block():
    reply = parse_reply("first\n\nsecond\n</think>\n\nDone.", thinking=True)
    assert (reply.reasoning, reply.content) == ("first\n\nsecond", "Done.")
    assert parse_reply("never closed", thinking=True).reasoning == "never closed"


def test_one_and_two_tool_calls():
    one = parse_reply(f"\n</think>\n\n{CALL}", thinking=True)
    assert one.content == "" and one.reasoning == ""
    [call] = one.tool_calls
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": json.dumps(ARGS)}
    two = parse_reply(CALL + "\n" + CALL.replace("Paris", "Oslo"))
    assert [json.loads(c["function"]["arguments"])["city"] for c in two.tool_calls] == ["Paris", "Oslo"]
    assert two.content == "" and len({c["id"] for c in two.tool_calls}) == 2


def test_text_around_calls_is_content():
    reply = parse_reply(f"Let me look.\n{CALL}\nOne moment.")
    assert reply.content == "Let me look.\nOne moment." and len(reply.tool_calls) == 1


def test_malformed_calls_stay_content():
    for body in ('{"name": "f", "arguments": {oops}', '{"arguments": {}}', '["f"]', '{"name": "f", "arguments": 3}'):
        block = f"<tool_call>\n{body}\n</tool_call>"
        reply = parse_reply(block)
        assert reply.tool_calls == [] and reply.content == block
    unclosed = parse_reply('<tool_call>\n{"name": "f"')
    assert unclosed.tool_calls == [] and unclosed.content == '<tool_call>\n{"name": "f"'


def test_tool_choice_none_parses_no_calls():
    reply = parse_reply(CALL, parse_tools=False)
    assert reply.tool_calls == [] and reply.content == CALL


@pytest.mark.parametrize("text,thinking", [
    (f"why\n</think>\n\nok\n{CALL}\n{CALL}", True),
    ("<think>\na\n\nb\n</think>\n\nx </thin y <tool_ z\n\n", False),
    (f"<tool_call>\nnot json\n</tool_call>\n{CALL}tail", False),
    ("plain text, no tags\n", False),
])
def test_streaming_matches_whole_text(text, thinking):
    assert same(streamed(text, thinking), parse_reply(text, thinking))


# ---- requests and prompts in-process ----------------------------------------------------------------------------

def chat_request(**fields) -> ChatRequest:
    return parse_request(ChatRequest, json.dumps({"messages": [QUESTION], **fields}).encode())


@pytest.mark.parametrize("fields,param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"enable_thinking": "yes"}, "enable_thinking"),
])
def test_bad_tool_fields_are_400(fields, param):
    with pytest.raises(ApiError) as err:
        chat_request(**fields)
    assert err.value.status == 400 and err.value.param == param
    assert set(err.value.body()["error"]) == {"message", "type", "param", "code"}


def test_v1_model_refuses_tools():
    chat = ChatEngine(tiny_chat_model(), load_tokenizer(TOKENIZER_DIR))
    with pytest.raises(ApiError) as err:
        chat_prompt(chat, ServerOptions(), chat_request(tools=TOOLS))
    assert err.value.status == 400 and err.value.param == "tools"
    chat_prompt(chat, ServerOptions(), chat_request())  # no tools: fine


def test_native_conversation_errors_are_400():
    chat = ChatEngine(MiniMindForCausalLM(tiny3_config()), load_tokenizer(TOKENIZER3_DIR))
    no_function = [QUESTION, {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
                   {"role": "tool", "content": "42"}]
    unasked = [QUESTION, {"role": "assistant", "content": "hi"}, {"role": "tool", "content": "42"}]
    for messages in (no_function, unasked):
        req = parse_request(ChatRequest, json.dumps({"messages": messages, "tools": TOOLS}).encode())
        with pytest.raises(ApiError) as err:
            chat_prompt(chat, ServerOptions(), req)
        assert err.value.status == 400 and err.value.param == "messages"


def conversation(turns: int) -> list[dict]:
    """`turns` earlier exchanges (one with a tool call), then the question."""
    history = []
    for i in range(turns):
        history += [{"role": "user", "content": f"question {i} " * 5}]
        if i == 0:
            history += [{"role": "assistant", "content": None, "reasoning_content": "r",
                         "tool_calls": [{"id": "call_1", "type": "function",
                                         "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
                        {"role": "tool", "tool_call_id": "call_1", "content": TOOL_RESULT}]
        history += [{"role": "assistant", "content": f"answer {i} " * 5}]
    return history + [QUESTION]


def test_native_prompt_and_oldest_turns_first():
    tok = load_tokenizer(TOKENIZER3_DIR)
    req = parse_request(ChatRequest, json.dumps({"messages": conversation(3), "tools": TOOLS,
                                                 "enable_thinking": True, "max_tokens": 8}).encode())
    messages = req.prompt_messages(native_tools=True)
    assert messages[1]["tool_calls"][0]["function"]["name"] == "get_weather" and messages[2]["role"] == "tool"
    whole = encode_prompt(tok, messages, TOOLS, enable_thinking=True)
    assert build_chat_prompt(tok, messages, None, tools=TOOLS, enable_thinking=True) == whole
    assert tok.decode(whole, skip_special_tokens=False).endswith("<|im_start|>assistant\n<think>\n")
    budget = len(whole) - 1  # one token short: the first exchange (with its tool call) must go
    cut = build_chat_prompt(tok, messages, budget, tools=TOOLS, enable_thinking=True)
    later = messages[4:]  # the first exchange: question, tool call, tool result, answer
    assert cut == encode_prompt(tok, later, TOOLS, enable_thinking=True) and len(cut) <= budget
    none = req.model_copy(update={"tool_choice": "none"})
    assert none.prompt_tools() is None and not none.parse_tool_calls


# ---- the real server with a trained tiny MiniMind-3 model -------------------------------------------------------

def tiny3_config() -> LMConfig:
    return LMConfig(**{**PRESETS["minimind-3"], "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                       "head_dim": 16, "hidden_dim": 128, "max_seq_len": 768})


def tool_conversation() -> list[dict]:
    call = {"type": "function", "function": {"name": "get_weather", "arguments": ARGS}}
    return [QUESTION, {"role": "assistant", "content": "", "reasoning_content": REASONING_1, "tool_calls": [call]},
            {"role": "tool", "content": TOOL_RESULT},
            {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING_2}]


def train_tool_model(steps: int = 300):
    """A tiny MiniMind-3 model that has learnt both replies of `tool_conversation` (thinking on) by heart."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny3_config())
    ids, mask, _ = conversation_segments(load_tokenizer(TOKENIZER3_DIR), tool_conversation(), TOOLS)
    x = torch.tensor([ids])
    labels = torch.where(torch.tensor([mask]), x, torch.full_like(x, -100))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), loss.item()


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    model, loss = train_tool_model()
    assert loss < 0.05, loss
    ckpt = save_weights(model.state_dict(), tmp_path_factory.mktemp("ckpt3") / "tiny3_sft.pth", model.config)
    with family_server(ckpt, tmp_path_factory.mktemp("logs") / "server3.log") as (url, _):
        yield OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client, messages, **kw):
    return client.chat.completions.create(model="tiny3", messages=messages, tools=TOOLS, temperature=0,
                                          max_tokens=60, extra_body={"enable_thinking": True}, **kw)


def test_tool_call_round_trip(tool_server):
    first = ask(tool_server, [QUESTION])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == ARGS
    assert call.id.startswith("call_") and call.type == "function"
    assert choice.message.model_extra["reasoning_content"] == REASONING_1
    assert not choice.message.content

    back = [QUESTION, {"role": "assistant", "content": None, "reasoning_content": REASONING_1,
                       "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": TOOL_RESULT}]
    second = ask(tool_server, back).choices[0]
    assert second.message.content == ANSWER and second.finish_reason == "stop"
    assert second.message.model_extra["reasoning_content"] == REASONING_2 and not second.message.tool_calls


def test_tool_call_streamed(tool_server):
    reasoning, content, calls, finish = "", "", [], None
    for chunk in ask(tool_server, [QUESTION], stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
        calls += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert (reasoning, content, finish) == (REASONING_1, "", "tool_calls")
    [call] = calls
    assert call.index == 0 and call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == ARGS


def test_tool_choice_none_gives_text(tool_server):
    reply = ask(tool_server, [QUESTION], tool_choice="none").choices[0]
    assert reply.finish_reason in ("stop", "length") and not reply.message.tool_calls


def test_tools_that_fill_the_context_are_a_400_not_a_500():
    """The system turn with the tools description is never cut; when it alone fills the context, say so."""
    chat = ChatEngine(MiniMindForCausalLM(LMConfig(**{**tiny3_config().to_dict(), "max_seq_len": 64})),
                      load_tokenizer(TOKENIZER3_DIR))
    with pytest.raises(ApiError) as err:
        chat_prompt(chat, ServerOptions(), chat_request(tools=TOOLS))
    assert err.value.status == 400 and err.value.param == "tools" and "context" in str(err.value)
