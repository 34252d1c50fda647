"""model/api_schema.py in-process: hostile and malformed bodies become OpenAI-shaped 4xx errors, good ones parse."""

import json

import pytest

from model.api_schema import (
    MAX_JSON_DEPTH,
    ApiError,
    ChatRequest,
    CompletionRequest,
    check_origin,
    error_body,
    max_tokens_param,
    merge_consecutive_messages,
    parse_json_body,
    parse_request,
    resolve_max_tokens,
    validation_error,
)


def refusal(fn, *args, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert 400 <= err.status < 500
    body = err.body()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    json.dumps(body, ensure_ascii=False).encode("utf-8")  # the answer itself must encode (no lone surrogates)
    return err


def encode(body) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def user(content="hi", **extra):
    return {"messages": [{"role": "user", "content": content}], **extra}


def prompt(text="Once upon a time", **extra):
    return {"prompt": text, **extra}


# ---- the JSON layer --------------------------------------------------------------------------------------------------

HOSTILE_JSON = {
    "lone surrogate in content": (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages.0.content"),
    "lone low surrogate in content": (b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages.0.content"),
    "lone surrogate in model": (b'{"model": "\\udbff", "messages": []}', "model"),
    "lone surrogate in stop": (b'{"stop": ["ok", "\\ud800"]}', "stop.1"),
    "lone surrogate in a key": (b'{"\\ud800": 1}', "\\ud800"),
    "lone surrogate in a text part": (b'{"messages": [{"role": "user", "content": [{"type": "text", '
                                      b'"text": "\\ud834"}]}]}', "messages.0.content.0.text"),
    "4301-digit int": (b'{"max_tokens": ' + b"9" * 4301 + b"}", None),
    "200-digit int": (b'{"seed": ' + b"1" * 200 + b"}", None),
    "200-digit negative int": (b'{"seed": -' + b"1" * 200 + b"}", None),
    "deep arrays": (b"[" * 10000 + b"]" * 10000, None),
    "deep objects": (b'{"a":' * 10000 + b"1" + b"}" * 10000, None),
    "just past the depth limit": (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), None),
    "deep and unterminated": (b"[" * 100000, None),
    "NaN": (b'{"temperature": NaN}', None),
    "Infinity": (b'{"temperature": Infinity}', None),
    "-Infinity": (b'{"top_p": -Infinity}', None),
    "overflowing float": (b'{"temperature": 1e999}', None),
    "invalid utf-8": (b'{"model": "\xff"}', None),
    "truncated utf-8": (b'{"model": "\xe4\xbd"}', None),
    "utf-16": ('{"model": "x"}'.encode("utf-16"), None),
    "invalid json": (b'{"messages": [', None),
    "trailing garbage": (b'{"a": 1} x', None),
    "empty body": (b"", None),
    "single quotes": (b"{'a': 1}", None),
}


@pytest.mark.parametrize("name", list(HOSTILE_JSON))
def test_hostile_json_is_refused(name):
    body, param = HOSTILE_JSON[name]
    err = refusal(parse_json_body, body)
    assert err.status == 400 and err.code == "invalid_json" and err.param == param
    if param:
        assert err.message.startswith(f"{param}: ")
    # the same through the request parser, for both endpoints
    assert refusal(parse_request, ChatRequest, body).code == "invalid_json"
    assert refusal(parse_request, CompletionRequest, body).code == "invalid_json"


GOOD_JSON = {
    b'{"a": [1, -2, 3.5, 1e300, true, null, "x"]}': {"a": [1, -2, 3.5, 1e300, True, None, "x"]},
    b'["\\ud83d\\ude00", "\\u00e9", "\xe4\xbd\xa0"]': ["\U0001F600", "é", "你"],  # a surrogate *pair* is a character
    b'["\\\\ud800"]': ["\\ud800"],  # an escaped backslash, then plain text
    b'["[[[[{{{{", "\\"[["]': ["[[[[{{{{", '"[['],  # brackets inside strings do not nest
    b"\xef\xbb\xbf{}": {},  # a UTF-8 BOM
    b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH: json.loads("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH),
    b"[" + b"9" * 100 + b"]": [int("9" * 100)],
    b' "plain" ': "plain",
}


@pytest.mark.parametrize("body", list(GOOD_JSON))
def test_good_json_parses(body):
    assert parse_json_body(body) == GOOD_JSON[body]


# ---- /v1/chat/completions ---------------------------------------------------------------------------------------------

BAD_CHAT = {
    # the server's existing contract (tests/test_openai_api.py BAD_REQUESTS), minus what needs the model
    "not an object": ([1, 2], None),
    "missing messages": ({"model": "x"}, "messages"),
    "empty messages": ({"messages": []}, "messages"),
    "messages not a list": ({"messages": "hi"}, "messages"),
    "unknown role": ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    "missing content": ({"messages": [{"role": "user"}]}, "messages.0.content"),
    "number content": (user(5), "messages.0.content"),
    "bool content": (user(True), "messages.0.content"),
    "object content": (user({"text": "hi"}), "messages.0.content"),
    "null content": (user(None), "messages.0.content"),
    "empty parts": (user([]), "messages.0.content"),
    "image content": (user([{"type": "image_url", "image_url": {"url": "x"}}]), "messages.0.content"),
    "part text not a string": (user([{"type": "text", "text": 5}]), "messages.0.content"),
    "message not an object": ({"messages": ["hi"]}, "messages.0"),
    "role not a string": ({"messages": [{"role": 1, "content": "x"}]}, "messages.0.role"),
    "ends with assistant": ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                            "messages"),
    "only a system message": ({"messages": [{"role": "system", "content": "s"}]}, "messages"),
    "negative temperature": (user(temperature=-0.1), "temperature"),
    "temperature above two": (user(temperature=2.5), "temperature"),
    "text temperature": (user(temperature="hot"), "temperature"),
    "numeric-text temperature": (user(temperature="1"), "temperature"),
    "bool temperature": (user(temperature=True), "temperature"),
    "top_p zero": (user(top_p=0), "top_p"),
    "top_p above one": (user(top_p=1.5), "top_p"),
    "text top_p": (user(top_p="0.5"), "top_p"),
    "negative top_k": (user(top_k=-1), "top_k"),
    "float top_k": (user(top_k=1.5), "top_k"),
    "bool top_k": (user(top_k=True), "top_k"),
    "zero repetition_penalty": (user(repetition_penalty=0), "repetition_penalty"),
    "text repetition_penalty": (user(repetition_penalty="1.1"), "repetition_penalty"),
    "frequency_penalty above two": (user(frequency_penalty=2.5), "frequency_penalty"),
    "presence_penalty below minus two": (user(presence_penalty=-3), "presence_penalty"),
    "bool presence_penalty": (user(presence_penalty=False), "presence_penalty"),
    "text max_tokens": (user(max_tokens="10"), "max_tokens"),
    "float max_tokens": (user(max_tokens=10.0), "max_tokens"),
    "bool max_tokens": (user(max_tokens=True), "max_tokens"),
    "text max_completion_tokens": (user(max_completion_tokens="3"), "max_completion_tokens"),
    "text stream": (user(stream="true"), "stream"),
    "int stream": (user(stream=1), "stream"),
    "stream_options not an object": (user(stream=True, stream_options="yes"), "stream_options"),
    "text include_usage": (user(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    "stop not text": (user(stop=5), "stop"),
    "stop list of numbers": (user(stop=[1]), "stop"),
    "five stops": (user(stop=list("abcde")), "stop"),
    "seed out of range": (user(seed=2**70), "seed"),
    "seed below range": (user(seed=-(2**63) - 1), "seed"),
    "text seed": (user(seed="42"), "seed"),
    "float seed": (user(seed=4.2), "seed"),
    "n=2": (user(n=2), "n"),
    "text n": (user(n="1"), "n"),
    "text logprobs": (user(logprobs="true"), "logprobs"),
    "int logprobs": (user(logprobs=1), "logprobs"),
    "top_logprobs without logprobs": (user(top_logprobs=2), "top_logprobs"),
    "top_logprobs with logprobs false": (user(logprobs=False, top_logprobs=2), "top_logprobs"),
    "top_logprobs above 20": (user(logprobs=True, top_logprobs=21), "top_logprobs"),
    "negative top_logprobs": (user(logprobs=True, top_logprobs=-1), "top_logprobs"),
    "text top_logprobs": (user(logprobs=True, top_logprobs="2"), "top_logprobs"),
    "model not a string": (user(model=5), "model"),
    "user not a string": (user(user=5), "user"),
}


@pytest.mark.parametrize("name", list(BAD_CHAT))
def test_bad_chat_request_is_refused(name):
    body, param = BAD_CHAT[name]
    err = refusal(parse_request, ChatRequest, encode(body))
    assert err.status == 400 and err.param == param and err.type == "invalid_request_error"
    assert err.code == "invalid_value"


def test_good_chat_requests():
    req = parse_request(ChatRequest, encode(user("你好", temperature=1, top_p=1, max_tokens=8, seed=-5, stop="\n",
                                                 logprobs=True, top_logprobs=3, n=1, stream=None, top_k=0,
                                                 repetition_penalty=1.1, frequency_penalty=-2, presence_penalty=2,
                                                 user="someone", unknown_field={"anything": [1]})))
    assert req.temperature == 1.0 and isinstance(req.temperature, float) and req.stop == ["\n"]
    assert req.seed == -5 and req.top_logprobs == 3 and req.include_usage is False
    assert parse_request(ChatRequest, encode(user(seed=2**64 - 1))).seed == 2**64 - 1  # torch.Generator's range
    assert parse_request(ChatRequest, encode(user(stop=None))).stop == []
    assert parse_request(ChatRequest, encode(user(stream=True, stream_options={"include_usage": True}))).include_usage
    parts = [{"type": "text", "text": "你"}, {"type": "text", "text": "好", "extra": 1}]
    assert parse_request(ChatRequest, encode(user(parts))).messages[0].content == "你好"
    tool_flow = {"messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "q"},
                              {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
                              {"role": "tool", "content": "42", "tool_call_id": "1"}]}
    assert parse_request(ChatRequest, encode(tool_flow)).prompt_messages() == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
        {"role": "assistant", "content": ""}, {"role": "user", "content": "42"}]


def test_max_tokens_resolution():
    def resolve(**fields):
        return resolve_max_tokens(parse_request(ChatRequest, encode(user(**fields))), limit=100, context_length=128)

    assert resolve() is None and resolve(max_tokens=-1) is None and resolve(max_completion_tokens=-1) is None
    assert resolve(max_tokens=7) == 7 and resolve(max_tokens=100) == 100
    assert resolve(max_tokens=7, max_completion_tokens=9) == 9  # the newer name wins
    assert max_tokens_param(parse_request(ChatRequest, encode(user(max_completion_tokens=2)))) == "max_completion_tokens"
    for fields, param, code in (({"max_tokens": 0}, "max_tokens", "invalid_value"),
                                ({"max_tokens": -5}, "max_tokens", "invalid_value"),
                                ({"max_tokens": 5, "max_completion_tokens": 0}, "max_completion_tokens", "invalid_value"),
                                ({"max_tokens": 101}, "max_tokens", "context_length_exceeded")):
        err = refusal(resolve, **fields)
        assert err.param == param and err.code == code and param in err.message
    assert "128" in refusal(resolve, max_tokens=101).message


# ---- /v1/completions --------------------------------------------------------------------------------------------------

BAD_COMPLETION = {
    "not an object": ("hi", None),
    "missing prompt": ({"model": "x"}, "prompt"),
    "null prompt": (prompt(None), "prompt"),
    "number prompt": (prompt(5), "prompt"),
    "object prompt": (prompt({"text": "x"}), "prompt"),
    "two prompts": (prompt(["a", "b"]), "prompt"),
    "empty prompt list": (prompt([]), "prompt"),
    "token-id prompt": (prompt([1, 2, 3]), "prompt"),
    "nested token ids": (prompt([[1, 2]]), "prompt"),
    "zero max_tokens": (prompt(max_tokens=0), "max_tokens"),
    "-1 max_tokens": (prompt(max_tokens=-1), "max_tokens"),
    "text max_tokens": (prompt(max_tokens="16"), "max_tokens"),
    "bool max_tokens": (prompt(max_tokens=True), "max_tokens"),
    "text temperature": (prompt(temperature="0"), "temperature"),
    "bool temperature": (prompt(temperature=False), "temperature"),
    "top_p zero": (prompt(top_p=0), "top_p"),
    "float top_k": (prompt(top_k=2.0), "top_k"),
    "text stream": (prompt(stream="no"), "stream"),
    "stop not text": (prompt(stop={"a": 1}), "stop"),
    "text seed": (prompt(seed="1"), "seed"),
    "n=3": (prompt(n=3), "n"),
    "logprobs above 5": (prompt(logprobs=6), "logprobs"),
    "bool logprobs": (prompt(logprobs=True), "logprobs"),
    "negative logprobs": (prompt(logprobs=-1), "logprobs"),
    "echo": (prompt(echo=True), "echo"),
    "text echo": (prompt(echo="false"), "echo"),
    "suffix": (prompt(suffix="the end"), "suffix"),
    "best_of=2": (prompt(best_of=2), "best_of"),
    "frequency_penalty text": (prompt(frequency_penalty="0"), "frequency_penalty"),
    "presence_penalty above two": (prompt(presence_penalty=3), "presence_penalty"),
    "bool repetition_penalty": (prompt(repetition_penalty=True), "repetition_penalty"),
    "text include_usage": (prompt(stream=True, stream_options={"include_usage": 1}), "stream_options.include_usage"),
    "model not a string": (prompt(model=["x"]), "model"),
    "user not a string": (prompt(user=1), "user"),
}


@pytest.mark.parametrize("name", list(BAD_COMPLETION))
def test_bad_completion_request_is_refused(name):
    body, param = BAD_COMPLETION[name]
    err = refusal(parse_request, CompletionRequest, encode(body))
    assert err.status == 400 and err.param == param


def test_good_completion_requests():
    req = parse_request(CompletionRequest, encode(prompt()))
    assert req.prompt == "Once upon a time" and req.max_tokens == 16 and req.logprobs is None and not req.echo
    assert resolve_max_tokens(req) == 16
    assert parse_request(CompletionRequest, encode(prompt(max_tokens=None))).max_tokens == 16  # null: the default
    req = parse_request(CompletionRequest, encode(prompt(["only one"], max_tokens=3, logprobs=5, echo=False,
                                                          suffix=None, best_of=1, temperature=0, stop=["\n"])))
    assert req.prompt == "only one" and req.max_tokens == 3 and req.logprobs == 5 and req.stop == ["\n"]
    assert parse_request(CompletionRequest, encode(prompt(""))).prompt == ""


# ---- merging, errors, origins ---------------------------------------------------------------------------------------

def test_merge_consecutive_messages():
    def m(role, content):
        return {"role": role, "content": content}

    assert merge_consecutive_messages([m("user", "hi")]) == [m("user", "hi")]
    assert merge_consecutive_messages([
        m("system", "A"), m("user", "1"), m("user", "2"), m("developer", "B"), m("assistant", "x"),
        m("assistant", None), m("assistant", "y"), m("system", ""), m("tool", "t"), m("user", "3"),
    ]) == [m("system", "A\nB"), m("user", "1\n2"), m("assistant", "x\ny"), m("user", "t\n3")]
    # a system message between two user turns goes to the front and the turns become one
    assert merge_consecutive_messages([m("user", "a"), m("system", "s"), m("user", "b")]) == [
        m("system", "s"), m("user", "a\nb")]
    assert merge_consecutive_messages([m("user", ""), m("user", "b")]) == [m("user", "b")]
    for bad in ([], [m("system", "s")], [m("user", "a"), m("assistant", "b")], [m("user", "a"), m("assistant", None)]):
        err = refusal(merge_consecutive_messages, bad)
        assert err.status == 400 and err.param == "messages" and "the last message must have role 'user'" in err.message


def test_error_shapes():
    assert error_body("boom", "server_error", code="x") == {
        "error": {"message": "boom", "type": "server_error", "param": None, "code": "x"}}
    assert ApiError(404, "no", param="model").body() == error_body("no", "invalid_request_error", "model")

    class FastApiLike:  # RequestValidationError puts "body" first in its paths
        def errors(self):
            return [{"loc": ("body", "messages", 0, "role"), "msg": "Value error, bad role"}, {"loc": ("x",)}]

    err = validation_error(FastApiLike())
    assert (err.status, err.param, err.message) == (400, "messages.0.role", "messages.0.role: bad role")


def test_check_origin():
    check_origin(None, [])  # curl and SDKs send no Origin
    check_origin("https://chat.example", ["https://chat.example"])
    check_origin("https://chat.example", ["https://chat.example/ "])  # a trailing slash in the flag is forgiven
    check_origin("https://anything.example", ["*"])
    check_origin("http://127.0.0.1:8998", [], host="127.0.0.1:8998")  # a page served by the server itself
    check_origin("http://LOCALHOST:8998", [], host="localhost:8998")
    for origin, allowed, host in (("https://evil.example", [], None),
                                  ("https://evil.example", ["https://chat.example"], "127.0.0.1:8998"),
                                  ("http://127.0.0.1:8998", [], "127.0.0.1:9000"),
                                  ("https://chat.example.evil", ["https://chat.example"], None),
                                  ("null", ["https://chat.example"], None),
                                  ("", [], None)):
        err = refusal(check_origin, origin, allowed, host)
        assert err.status == 403 and err.code == "origin_not_allowed"
        assert repr(origin) in err.message and "--cors_origins" in err.message
