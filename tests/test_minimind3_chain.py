"""The README's MiniMind-3 chain, exactly as printed: tokenize with the family tokenizer, pretrain a
minimind-3-shaped model, SFT on the bundled thinking/tool-call dialogues, chat with thinking, and serve a request
that carries tools to the official openai client.

Like tests/test_readme_chain.py, it runs in a copy of the repository, so default paths resolve there.
"""

import os
import re
import shutil
import sys

import pytest
from conftest import ROOT
from test_readme_chain import SKIP, port_is_free, served, shell

MARKER = "<!-- minimind3-chain"
TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "计算算式",
                                           "parameters": {"type": "object", "properties": {"expr": {"type": "string"}},
                                                          "required": ["expr"]}}}]


def chain_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(re.escape(MARKER) + r".*?```bash\n(.*?)```", text, re.S)
    assert block, "README lost its minimind3-chain block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def serve_with_tools(command: str, cwd, env):
    port = int(command.rsplit("--port", 1)[1].split()[0])
    if not port_is_free(port):
        pytest.skip(f"port {port} is taken on this machine")
    with served(command, cwd, env, port) as (client, _):
        reply = client.chat.completions.create(model="full_sft_128", messages=[{"role": "user", "content": "3*7=?"}],
                                               tools=TOOLS, max_tokens=16, temperature=0,
                                               extra_body={"enable_thinking": True})
        choice = reply.choices[0]
        assert choice.message.role == "assistant" and reply.usage.completion_tokens >= 1
        assert choice.finish_reason in ("stop", "length", "tool_calls")


def test_minimind3_chain_as_printed(tmp_path):
    repo = tmp_path / "minimind"
    shutil.copytree(ROOT, repo, ignore=SKIP)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
    *commands, serve = chain_commands()
    assert serve.startswith("python my_openai_api.py")
    for command in commands:
        log = shell(command, repo, env)
        assert "Traceback" not in log, log[-3000:]
    config = (repo / "out3" / "full_sft_128.json").read_text()
    assert '"qk_norm": true' in config and '"rope_layout": "half"' in config
    assert log.startswith("loaded ") or "assistant> " in log
    serve_with_tools(serve, repo, env)
