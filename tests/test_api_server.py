"""The API server's batching, limits, hostile input, origins, extra endpoints and a soak, against the real server
(a subprocess on loopback) with the official `openai` client and raw httpx."""

import json
import os
import random
import threading
import time

import httpx
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import rss_bytes, server_process

CONTEXT = 64
ORIGIN = "http://localhost:3000"  # an allowed browser origin (say, Open-WebUI's page)


@pytest.fixture(scope="module")
def server(chat_ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with server_process(chat_ckpt, log, "--max_seq_len", CONTEXT, "--max_batch", 16, "--cors_origins", ORIGIN) as sp:
        yield sp


@pytest.fixture(scope="module")
def url(server):
    return server[0]


@pytest.fixture(scope="module")
def client(url):
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, content, **kw):
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], **kw)


def post(url, body, headers=None, path="/v1/chat/completions"):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}{path}", content=content, timeout=60,
                      headers={"Content-Type": "application/json", **(headers or {})})


def health(url):
    return httpx.get(f"{url}/health", timeout=10).json()


def wait_idle(url):
    deadline = time.time() + 60
    while (h := health(url))["running"] or h["pending"] or h["in_flight"]:
        assert time.time() < deadline, h
        time.sleep(0.05)
    return h


# ---- batching ---------------------------------------------------------------------------------------------------

def test_concurrent_requests_share_decode_steps(client, url):
    """16 concurrent greedy requests: identical to their sequential results, and decoded together (the CPU proxy
    for aggregate throughput: tokens per engine step)."""
    prompts = [f"问题{i}：" + "你好" * (i % 5) for i in range(16)]
    sequential = [ask(client, p, max_tokens=24, temperature=0).choices[0].message.content for p in prompts]
    before = wait_idle(url)
    results = [None] * 16
    barrier = threading.Barrier(16)

    def worker(i):
        barrier.wait()
        results[i] = ask(client, prompts[i], max_tokens=24, temperature=0).choices[0].message.content

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    after = wait_idle(url)
    assert results == sequential
    tokens, steps = after["completion_tokens"] - before["completion_tokens"], after["steps"] - before["steps"]
    assert tokens == 16 * 24 and tokens / steps >= 4, (tokens, steps)


def test_max_pending_is_exact_under_a_burst(chat_ckpt, tmp_path):
    with server_process(chat_ckpt, tmp_path / "log", "--max_seq_len", 2048, "--max_batch", 1, "--max_pending", 2) as sp:
        url = sp[0]
        statuses = [None] * 16
        barrier = threading.Barrier(16)

        def worker(i):
            barrier.wait()
            body = {"messages": [{"role": "user", "content": "写一篇长文章"}], "max_tokens": 600, "temperature": 0}
            statuses[i] = post(url, body).status_code

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert sorted(statuses) == [200] * 3 + [429] * 13
        assert health(url)["status"] == "ok" and ask(OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0),
                                                     "hi", max_tokens=2).usage.completion_tokens == 2


# ---- hostile and odd input --------------------------------------------------------------------------------------

def user_body(content="hi", **extra):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


HOSTILE = {
    "lone surrogate in content": b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
    "lone surrogate in model": b'{"model": "\\udfff", "messages": [{"role": "user", "content": "a"}]}',
    "lone surrogate in stop": b'{"stop": ["\\ud83d"], "messages": [{"role": "user", "content": "a"}]}',
    "4301-digit integer": b'{"max_tokens": ' + b"9" * 4301 + b', "messages": [{"role": "user", "content": "a"}]}',
    "huge seed": b'{"seed": ' + b"1" * 300 + b', "messages": [{"role": "user", "content": "a"}]}',
    "deep objects": b'{"messages": [{"role": "user", "content": "a"}], "x": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000
                    + b"}",
    "NaN": b'{"temperature": NaN, "messages": [{"role": "user", "content": "a"}]}',
    "Infinity": b'{"top_p": Infinity, "messages": [{"role": "user", "content": "a"}]}',
    "temperature as text": json.dumps(user_body(temperature="1")).encode(),
    "temperature as bool": json.dumps(user_body(temperature=True)).encode(),
    "max_tokens as float": json.dumps(user_body(max_tokens=2.5)).encode(),
    "max_tokens as text": json.dumps(user_body(max_tokens="2")).encode(),
    "stream as text": json.dumps(user_body(stream="yes")).encode(),
    "messages as object": json.dumps({"messages": {"role": "user"}}).encode(),
    "message as list": json.dumps({"messages": [["user", "hi"]]}).encode(),
    "role as number": json.dumps({"messages": [{"role": 1, "content": "hi"}]}).encode(),
    "stop as object": json.dumps(user_body(stop={"a": 1})).encode(),
    "logprobs as text": json.dumps(user_body(logprobs="yes")).encode(),
    "top_logprobs too many": json.dumps(user_body(logprobs=True, top_logprobs=50)).encode(),
    "stream_options as list": json.dumps(user_body(stream=True, stream_options=[1])).encode(),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_bodies_get_an_openai_4xx(url, name):
    r = post(url, HOSTILE[name])
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert health(url)["status"] == "ok"


def test_consecutive_same_role_messages_are_merged(client):
    two = client.chat.completions.create(model="m", max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": "你好"}, {"role": "user", "content": "在吗"}])
    one = ask(client, "你好\n在吗", max_tokens=4, temperature=0)
    assert two.choices[0].message.content == one.choices[0].message.content
    assert two.usage.prompt_tokens == one.usage.prompt_tokens


def test_a_long_conversation_is_built_in_linear_time(client):
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"第{i}句"} for i in range(4001)]
    start = time.perf_counter()
    resp = client.chat.completions.create(model="m", messages=messages, max_tokens=2, temperature=0)
    assert resp.usage.prompt_tokens <= CONTEXT and time.perf_counter() - start < 30


def test_max_tokens_keeps_the_prompt_or_says_how_many_fit(client):
    question = "请详细地介绍一下长江和黄河的历史"
    small = ask(client, question, max_tokens=4, temperature=0)
    big = ask(client, question, max_tokens=CONTEXT - small.usage.prompt_tokens + 10, temperature=0)
    assert big.usage.prompt_tokens == small.usage.prompt_tokens  # the prompt is kept whole
    assert big.choices[0].finish_reason == "length"
    assert big.usage.prompt_tokens + big.usage.completion_tokens == CONTEXT
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, question, max_tokens=CONTEXT)
    assert "at most" in info.value.message and info.value.param == "max_tokens"


@pytest.mark.parametrize("include_usage", [True, False])
def test_usage_appears_exactly_once_per_stream(url, include_usage):
    body = user_body(max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": include_usage})
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    with_usage = [c for c in chunks if c.get("usage")]
    assert len(with_usage) == 1 and with_usage[0]["usage"]["completion_tokens"] == 5
    assert (with_usage[0]["choices"] == []) is include_usage


def test_browser_origins_are_checked(url):
    body = user_body()
    assert post(url, body, {"Origin": "http://evil.example"}).status_code == 403
    r = post(url, body, {"Origin": "http://evil.example"})
    assert r.json()["error"]["code"] == "origin_not_allowed" and "--cors_origins" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/models", headers={"Origin": "http://evil.example"}, timeout=10).status_code == 403
    ok = post(url, body, {"Origin": ORIGIN})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    assert post(url, body).status_code == 200  # no Origin: curl and SDKs


# ---- extra endpoints --------------------------------------------------------------------------------------------

def test_text_completions(client):
    resp = client.completions.create(model="m", prompt="长江是", max_tokens=6, temperature=0, logprobs=2)
    choice = resp.choices[0]
    assert resp.object == "text_completion" and resp.usage.completion_tokens == 6 and choice.text
    assert len(choice.logprobs.tokens) == 6 and all(len(t) <= 2 for t in choice.logprobs.top_logprobs)
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="m", prompt="长江是", max_tokens=6, temperature=0, stream=True) if c.choices)
    assert streamed == choice.text


def test_chat_logprobs(client):
    resp = ask(client, "你好", max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy picks the likeliest
    assert bytes(b for e in content for b in e.bytes).decode("utf-8", "replace").startswith(
        resp.choices[0].message.content[:1])
    plain = ask(client, "你好", max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None


def test_prometheus_metrics(client, url):
    ask(client, "你好", max_tokens=3)
    text = httpx.get(f"{url}/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("minimind_requests", "minimind_generated_tokens", "minimind_time_to_first_token_seconds",
                 "minimind_time_per_output_token_seconds", "minimind_active_sequences", "minimind_queued_sequences"):
        assert name in families, name
    done = [s for s in families["minimind_requests"].samples
            if s.labels.get("endpoint") == "/v1/chat/completions" and s.labels.get("status") == "200"]
    assert done and done[0].value >= 1
    assert next(s.value for s in families["minimind_generated_tokens"].samples if s.name.endswith("_total")) >= 3


# ---- soak -------------------------------------------------------------------------------------------------------

SOAK_SECONDS = float(os.environ.get("MINIMIND_SOAK_SECONDS", "60"))


def test_soak_64_streaming_clients_with_random_disconnects(client, server):
    url, proc = server
    prompts = [f"第{i}个话题" for i in range(8)]
    expected = [ask(client, p, max_tokens=20, temperature=0).choices[0].message.content for p in prompts]
    baseline = rss_bytes(proc.pid)
    errors, finished, dropped = [], [0], [0]
    deadline = time.time() + SOAK_SECONDS

    def worker(i):
        rng = random.Random(i)
        while time.time() < deadline:
            k = rng.randrange(len(prompts))
            body = user_body(prompts[k], max_tokens=20, temperature=0, stream=True)
            leave_after = rng.choice([None, None, 1, 3])  # half of the requests hang up after 1 or 3 chunks
            try:
                text = stream_chat(url, body, leave_after)
            except Exception as err:  # noqa: BLE001 - any failure is a soak failure
                errors.append(f"{type(err).__name__}: {err}")
                continue
            if leave_after is None:
                finished[0] += 1
                if text != expected[k]:
                    errors.append(f"cross-talk: {text!r} != {expected[k]!r}")
            else:
                dropped[0] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=SOAK_SECONDS + 120)
    assert not errors, errors[:5]
    assert finished[0] > 64 and dropped[0] > 0
    idle = wait_idle(url)
    assert idle["running"] == 0 and idle["in_flight"] == 0
    growth = rss_bytes(proc.pid) - baseline
    print(f"soak: {finished[0]} streams completed, {dropped[0]} hung up early, memory {growth / 2**20:+.1f} MiB")
    assert growth < 64 * 2**20, f"server memory grew by {growth / 2**20:.0f} MiB"


def stream_chat(url, body, leave_after):
    """The streamed text; or, after `leave_after` content chunks, hang up and return what came."""
    pieces = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        if r.status_code != 200:
            raise RuntimeError(f"status {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                pieces.append(chunk["choices"][0]["delta"]["content"])
                if leave_after is not None and len(pieces) >= leave_after:
                    return "".join(pieces)
    return "".join(pieces)
