"""The README's promise to a new user: after `bash quickstart.sh`, the post-training commands printed under
"Then: the rest of the pipeline" run exactly as written (no model flags) through to a served model.

The repository is copied to a temp folder first, so the commands' default paths (dataset/, out/) resolve there and
the checkout stays clean. The quick start runs with fewer steps (QUICKSTART_STEPS, its documented knob).
"""

import contextlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT

MARKER = "<!-- after-quickstart"
SKIP = shutil.ignore_patterns(".git", ".venv", "venv", "out", "wandb", "__pycache__", ".pytest_cache", ".ruff_cache",
                              "*.png", "eval_results")


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(re.escape(MARKER) + r".*?```bash\n(.*?)```", text, re.S)
    assert block, "README lost its after-quickstart block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def shell(command: str, cwd, env, timeout=600) -> str:
    out = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"`{command}` failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@contextlib.contextmanager
def served(command: str, cwd, env, port: int):
    """(openai client, its model list) while a server command from the README runs on `port`."""
    from openai import OpenAI

    server = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
        deadline = time.time() + 120
        while True:
            try:
                models = client.models.list()
                break
            except Exception:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"`{command}` did not come up:\n{server.stdout.read()[-3000:]}")
                time.sleep(0.5)
        yield client, models
    finally:
        server.terminate()
        server.wait(timeout=30)


def serve_and_chat(command: str, cwd, env):
    port = 8998
    if not port_is_free(port):  # someone else's server: the same command on another port
        command += " --port 18998"
        port = 18998
    with served(command, cwd, env, port) as (client, models):
        assert [m.id for m in models.data] == ["rl_128"]
        reply = client.chat.completions.create(model="rl_128", messages=[{"role": "user", "content": "你好"}],
                                               max_tokens=8, temperature=0)
        assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens >= 1


def test_quickstart_then_readme_commands_as_printed(tmp_path):
    repo = tmp_path / "minimind"
    shutil.copytree(ROOT, repo, ignore=SKIP)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}",
           "QUICKSTART_STEPS": "30", "PYTHON": sys.executable}
    log = shell("bash quickstart.sh", repo, env)
    assert "step 30/30" in log and (repo / "out" / "pretrain_128.json").exists()
    assert log.split("[长江是]", 1)[1].split("\n", 1)[0].strip()  # it printed a continuation of the prompt

    *commands, serve = readme_commands()
    assert serve.startswith("python my_openai_api.py")
    for command in commands:
        log = shell(command, repo, env)
        assert "Traceback" not in log, log[-3000:]
    for name in ("full_sft_128", "lora_sft_128", "rl_128", "grpo_128"):
        assert (repo / "out" / f"{name}.pth").exists() and (repo / "out" / f"{name}.json").exists()
    # report.py put the quick start's checkpoints side by side, each with a finite held-out bits/char
    report = json.loads((repo / "out" / "report" / "report.json").read_text(encoding="utf-8"))
    rows = report["checkpoints"]
    assert [r["stage"] for r in rows] == ["pretrain", "full_sft", "rl", "grpo"]
    assert all(math.isfinite(r["bits_per_char"]) for r in rows)
    assert (repo / "out" / "report" / "report.png").exists()
    assert (repo / "out" / "MiniMind-128" / "config.json").exists()
    serve_and_chat(serve, repo, env)
