"""fast_inference.py: streamlit's AppTest drives the page in-process (missing checkpoint, chat turns with history,
clearing); a smoke test serves it with `streamlit run` and chats through it in headless Chromium.

The page reads its flags from sys.argv (what follows `--` in `streamlit run fast_inference.py -- ...`), so the tests
set sys.argv to point it at a tiny checkpoint.
"""

import base64
import itertools
import json
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch
from conftest import ROOT, TOKENIZER_DIR, tiny_model

from model.checkpoint import atomic_save, load_tokenizer
from model.generate import SamplingParams
from model.serving import ChatEngine

streamlit_testing = pytest.importorskip("streamlit.testing.v1")
PAGE = ROOT / "fast_inference.py"
CONTEXT = 128  # room for two turns of history next to a 32-token reply
FLAGS = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", str(CONTEXT),
         "--device", "cpu", "--tokenizer_dir", str(TOKENIZER_DIR)]


@pytest.fixture(scope="module")
def tiny_model_and_ckpt(tmp_path_factory):
    model = tiny_model(vocab_size=6400, max_seq_len=CONTEXT)
    with torch.no_grad():
        model.tok_embeddings.weight[2].zero_()  # no early EOS: replies are never empty
    path = tmp_path_factory.mktemp("ckpt") / "tiny_sft.pth"
    atomic_save(model.state_dict(), path)
    return model, path


def page(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", [str(PAGE), *map(str, argv)])
    at = streamlit_testing.AppTest.from_file(str(PAGE), default_timeout=120)
    return at.run()


def texts(elements):
    return [e.value for e in elements]


def test_missing_checkpoint_is_a_friendly_message(monkeypatch, tmp_path):
    at = page(monkeypatch, "--ckpt", tmp_path / "nothing_here.pth", *FLAGS)
    assert not at.exception
    assert any("No checkpoint" in t and "nothing_here.pth" in t for t in texts(at.info))
    assert len(at.chat_input) == 0  # no chat box without a model


def test_wrong_shape_is_a_friendly_error(monkeypatch, tiny_model_and_ckpt):
    _, ckpt = tiny_model_and_ckpt
    at = page(monkeypatch, "--ckpt", ckpt, *FLAGS, "--dim", "128")
    assert not at.exception
    assert any("does not match" in t for t in texts(at.error))


def test_chat_turns_keep_history_and_clear(monkeypatch, tiny_model_and_ckpt):
    model, ckpt = tiny_model_and_ckpt
    at = page(monkeypatch, "--ckpt", ckpt, *FLAGS)
    assert not at.exception
    next(s for s in at.sidebar.slider if s.label.startswith("Temperature")).set_value(0.0)
    max_new = int(at.sidebar.number_input[0].value)
    at.sidebar.text_area[0].input("你是MiniMind。")

    at.chat_input[0].set_value("你好").run()
    at.chat_input[0].set_value("再见").run()
    assert not at.exception
    shown = [(m.name, "".join(texts(m.markdown))) for m in at.chat_message]
    assert [name for name, _ in shown] == ["user", "assistant", "user", "assistant"]
    assert shown[0][1] == "你好" and shown[2][1] == "再见"

    # Each reply is what the model says to the whole conversation so far (system prompt included).
    engine = ChatEngine(model, load_tokenizer(TOKENIZER_DIR))
    conversation = [{"role": "system", "content": "你是MiniMind。"}]
    for i in (0, 2):
        conversation.append({"role": "user", "content": shown[i][1]})
        ids = engine.build_prompt(conversation, CONTEXT - min(max_new, CONTEXT // 2))
        expected = "".join(engine.reply(ids, SamplingParams(max_new_tokens=max_new, temperature=0)))
        assert shown[i + 1][1] == expected.strip()  # markdown drops surrounding whitespace
        conversation.append({"role": "assistant", "content": expected})
    without_history = engine.build_prompt([conversation[0], conversation[3]], CONTEXT - min(max_new, CONTEXT // 2))
    assert without_history != engine.build_prompt(conversation[:4], CONTEXT - min(max_new, CONTEXT // 2))

    next(b for b in at.sidebar.button if b.label == "Clear history").click().run()
    assert not at.exception and len(at.chat_message) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_chromium():
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def wait_until(check, what: str, timeout: float = 90):
    deadline = time.time() + timeout
    while True:
        try:
            if check():
                return
        except httpx.TransportError:
            pass
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


class HeadlessChromium:
    """Headless Chromium driven over the DevTools protocol (a websocket; `websockets` comes with streamlit).

    Plain `chromium --screenshot` cannot wait for the page: streamlit renders over its own websocket after load.
    """

    def __init__(self, binary: str, profile_dir):
        port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             "--window-size=1200,800", f"--remote-debugging-port={port}", f"--user-data-dir={profile_dir}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pages = []

        def page_target():
            pages[:] = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
                        if t["type"] == "page"]
            return pages

        wait_until(page_target, "Chromium's DevTools endpoint", timeout=60)
        from websockets.sync.client import connect

        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None)
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        call_id = next(self.ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:  # skip events until our answer arrives
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == call_id:
                assert "error" not in message, message
                return message["result"]

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def press_enter(self):
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)

    def close(self):
        self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


CHAT_BOX = "document.querySelector('textarea[placeholder=\"Message MiniMind\"]')"
MESSAGES = "Array.from(document.querySelectorAll('[data-testid=\"stChatMessage\"]')).map(e => e.innerText)"
SCRIPT_STATE = "document.querySelector('[data-testid=\"stApp\"]').dataset.testScriptState"


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium (Debian: apt-get install chromium)")
def test_page_chat_in_headless_chromium(tiny_model_and_ckpt, tmp_path):
    """`streamlit run` serves the page; a real browser loads it, sends one message, gets a reply, screenshots it."""
    pytest.importorskip("websockets.sync.client", reason="the DevTools client needs websockets>=11")
    _, ckpt = tiny_model_and_ckpt
    port = free_port()
    log_path = tmp_path / "streamlit.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(PAGE), "--server.headless", "true", "--server.port",
             str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
             "--", "--ckpt", str(ckpt), *FLAGS], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    browser = None
    try:
        wait_until(lambda: server.poll() is None and httpx.get(f"{url}_stcore/health", timeout=2).text == "ok",
                   "streamlit to start")
        browser = HeadlessChromium(find_chromium(), tmp_path / "profile")
        browser.call("Page.navigate", url=url)
        wait_until(lambda: browser.js(f"{CHAT_BOX} !== null"), "the chat box")  # the script ran, model loaded
        browser.js(f"{CHAT_BOX}.focus()")
        browser.call("Input.insertText", text="你好")
        browser.press_enter()
        wait_until(lambda: len(browser.js(MESSAGES)) == 2 and browser.js(SCRIPT_STATE) != "running", "a reply")
        messages = browser.js(MESSAGES)
        page_text = browser.js("document.body.innerText")
        problems = browser.js("document.querySelectorAll('[data-testid=\"stException\"], [data-testid=\"stAlert\"]')"
                              ".length")
        screenshot = tmp_path / "fast_inference.png"
        screenshot.write_bytes(base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"]))
    finally:
        if browser is not None:
            browser.close()
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    assert "MiniMind chat" in page_text and "Clear history" in page_text
    assert problems == 0  # no exception box, no error/warning/info message
    assert messages[0].strip().endswith("你好") and messages[1].strip()
    assert screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")
