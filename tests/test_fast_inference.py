"""fast_inference.py: streamlit's AppTest drives the page in-process (missing checkpoint, chat turns with history,
clearing); a smoke test serves it with `streamlit run` and chats through it in headless Chromium.

The page reads its flags from sys.argv (what follows `--` in `streamlit run fast_inference.py -- ...`), so the tests
set sys.argv to point it at a tiny checkpoint.
"""

import base64
import contextlib
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
    assert any("dim=64" in t and "dim=128" in t and "--dim" in t for t in texts(at.error))


def test_a_corrupt_checkpoint_is_a_friendly_error(monkeypatch, tmp_path):
    (tmp_path / "broken.pth").write_bytes(b"")
    at = page(monkeypatch, "--ckpt", tmp_path / "broken.pth", *FLAGS)
    assert not at.exception
    assert any("broken.pth" in t and "is empty" in t for t in texts(at.error))


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


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def zh_font_families() -> set[str] | None:
    """The font families fontconfig says cover Chinese (Chromium on Linux falls back through fontconfig, so these
    are what it can draw 你好 with), or None where there is no fc-list to ask."""
    if shutil.which("fc-list") is None:
        return None
    listing = subprocess.run(["fc-list", ":lang=zh", "family"], capture_output=True, text=True, check=True).stdout
    return {name for line in listing.splitlines() for name in line.split(",") if name}


class HeadlessChromium:
    """Headless Chromium driven over the DevTools protocol (a websocket; `websockets` comes with streamlit).

    Plain `chromium --screenshot` cannot wait for the page: streamlit renders over its own websocket after load.
    """

    def __init__(self, binary: str, profile_dir):
        port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             # a CI machine has nothing to reach: no QUIC probes, updaters, sync or first-run work beside the page
             "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--window-size=1200,800", f"--remote-debugging-port={port}",
             f"--user-data-dir={profile_dir}", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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

    def fonts_used(self, selector: str) -> dict[str, int]:
        """{font family: glyphs drawn with it} for the text directly inside the first element matching selector.

        A character no installed font has is still drawn, as a box, so these are the fonts Chromium really used."""
        self.call("DOM.enable")
        self.call("CSS.enable")
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        assert node, f"no element matches {selector}"
        fonts = self.call("CSS.getPlatformFontsForNode", nodeId=node)["fonts"]
        return {f["familyName"]: f["glyphCount"] for f in fonts}

    def close(self):
        self.ws.close()
        stop(self.proc)


CHAT_BOX = "document.querySelector('textarea[placeholder=\"Message MiniMind\"]')"
MESSAGES = "Array.from(document.querySelectorAll('[data-testid=\"stChatMessage\"]')).map(e => e.innerText)"
SCRIPT_STATE = "document.querySelector('[data-testid=\"stApp\"]').dataset.testScriptState"
FIRST_MESSAGE_TEXT = '[data-testid="stChatMessage"] [data-testid="stMarkdownContainer"] p'


@contextlib.contextmanager
def streamlit_server(ckpt, log_path):
    """`streamlit run` the page on a free port; yields its URL once it answers its health check."""
    port = free_port()
    with open(log_path, "wb") as log:
        # No file watcher: it watches the whole checkout, .venv included, and its inotify churn costs seconds here.
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(PAGE), "--server.headless", "true", "--server.port",
             str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none", "--", "--ckpt", str(ckpt), *FLAGS],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until(lambda: server.poll() is None and httpx.get(f"{url}_stcore/health", timeout=2).text == "ok",
                   "streamlit to start")
        yield url
    finally:
        stop(server)


@pytest.fixture(scope="module")
def browser_chat(tiny_model_and_ckpt, tmp_path_factory):
    """A real browser loads the served page, sends 你好 and waits for the reply; what it showed, for the tests below
    (one browser session for both: starting the page is most of their time)."""
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no chromium, chromium-browser or google-chrome on PATH (Debian: apt-get install chromium "
                    "fonts-noto-cjk; .ci/run does when it can)")
    pytest.importorskip("websockets.sync.client", reason="the DevTools client needs websockets>=11")
    tmp = tmp_path_factory.mktemp("browser")
    with streamlit_server(tiny_model_and_ckpt[1], tmp / "streamlit.log") as url:
        browser = HeadlessChromium(chromium, tmp / "profile")  # a fresh profile: no state from an earlier run
        try:
            browser.call("Page.navigate", url=url)
            wait_until(lambda: browser.js(f"{CHAT_BOX} !== null"), "the chat box")  # the script ran, model loaded
            browser.js(f"{CHAT_BOX}.focus()")
            browser.call("Input.insertText", text="你好")
            browser.press_enter()
            wait_until(lambda: len(browser.js(MESSAGES)) == 2 and browser.js(SCRIPT_STATE) != "running", "a reply")
            shown = dict(
                messages=browser.js(MESSAGES), page_text=browser.js("document.body.innerText"),
                problems=browser.js("document.querySelectorAll('[data-testid=\"stException\"], "
                                    "[data-testid=\"stAlert\"]').length"),
                first_text=browser.js(f"document.querySelector('{FIRST_MESSAGE_TEXT}').textContent"),
                fonts=browser.fonts_used(FIRST_MESSAGE_TEXT), screenshot=tmp / "fast_inference.png")
            shown["screenshot"].write_bytes(base64.b64decode(browser.call("Page.captureScreenshot")["data"]))
        finally:
            browser.close()
    print(f"screenshot: {shown['screenshot']}")
    return shown


def test_page_chat_in_headless_chromium(browser_chat):
    """`streamlit run` serves the page; a real browser loads it, sends one message, gets a reply, screenshots it."""
    assert "MiniMind chat" in browser_chat["page_text"] and "Clear history" in browser_chat["page_text"]
    assert browser_chat["problems"] == 0  # no exception box, no error/warning/info message
    messages = browser_chat["messages"]
    assert messages[0].strip().endswith("你好") and messages[1].strip()
    assert browser_chat["screenshot"].stat().st_size > 10_000


def test_page_draws_chinese_with_a_cjk_font(browser_chat):
    """The user's 你好 is drawn with fonts that cover Chinese; without one Chromium draws boxes ("tofu") instead."""
    families = zh_font_families()
    if families is None:
        pytest.skip("no fc-list to tell which fonts cover Chinese (Debian: apt-get install fontconfig)")
    assert families, "no font covers Chinese (`fc-list :lang=zh` is empty): apt-get install fonts-noto-cjk"
    assert browser_chat["first_text"] == "你好"
    used = browser_chat["fonts"]
    assert sum(used.values()) == 2 and set(used) <= families, f"你好 was drawn with {used}, not a Chinese font"


def test_minimind3_model_shows_thinking_in_a_collapsible_block(monkeypatch, tmp_path):
    from model.checkpoint import save_weights
    from model.LMConfig import PRESETS, LMConfig
    from model.model import MiniMindForCausalLM

    torch.manual_seed(0)
    config = LMConfig(**{**PRESETS["minimind-3"], "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                         "head_dim": 16, "hidden_dim": 128, "max_seq_len": 128})
    model = MiniMindForCausalLM(config)
    with torch.no_grad():  # weights spread as a trained model's, so greedy decoding writes text
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 if "tok_embeddings" in name else 0.3)
        model.tok_embeddings.weight[2].zero_()  # no early <|im_end|>: the reply is never empty
    ckpt = save_weights(model.state_dict(), tmp_path / "full_sft_64.pth", config)
    at = page(monkeypatch, "--ckpt", ckpt, "--device", "cpu")  # the family's tokenizer is picked by default
    assert not at.exception
    at.sidebar.toggle[0].set_value(True)
    next(s for s in at.sidebar.slider if s.label.startswith("Temperature")).set_value(0.0)
    at.sidebar.number_input[0].set_value(12)
    at.chat_input[0].set_value("你好").run()
    assert not at.exception
    reply = at.session_state.messages[-1]
    assert reply["role"] == "assistant" and reply.get("reasoning_content")  # it started inside <think>
    assert any(e.label == "Thinking" for e in at.expander)
    at.chat_input[0].set_value("再说一次").run()  # the history re-renders with the block collapsed
    assert not at.exception and len(at.session_state.messages) == 4
