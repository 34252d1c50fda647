"""The real API server as a subprocess on a loopback port, for the API test modules (not a test module itself)."""

import contextlib
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch
from conftest import ROOT, TOKENIZER_DIR, tiny_model

from model.checkpoint import atomic_save

MODEL_FLAGS = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2"]


def tiny_chat_model(**overrides):
    model = tiny_model(vocab_size=6400, **overrides)
    with torch.no_grad():
        model.tok_embeddings.weight[2].zero_()  # EOS id 2: never chosen greedily (see the module docstring)
    return model


def write_chat_ckpt(path):
    atomic_save(tiny_chat_model().state_dict(), path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(ckpt, log_path, *extra):
    """The server's base URL while it runs."""
    with server_process(ckpt, log_path, *extra) as (url, _):
        yield url


@contextlib.contextmanager
def server_process(ckpt, log_path, *extra):
    """(base URL, Popen) of a server started on a free port, stopped on exit."""
    with serve([str(ckpt), "--tokenizer_dir", str(TOKENIZER_DIR), *MODEL_FLAGS, *map(str, extra)], log_path) as sp:
        yield sp


@contextlib.contextmanager
def family_server(ckpt, log_path, *extra):
    """(base URL, Popen) of a server for a checkpoint with its config beside it: no model flags, and the
    tokenizer of the model's family (MiniMind-3's for a MiniMind-3 model)."""
    with serve([str(ckpt), *map(str, extra)], log_path) as sp:
        yield sp


@contextlib.contextmanager
def serve(ckpt_and_flags, log_path):
    """(base URL, Popen) of my_openai_api.py --ckpt CKPT_AND_FLAGS... on a free port, on the CPU."""
    port = free_port()
    cmd = [sys.executable, str(ROOT / "my_openai_api.py"), "--ckpt", *ckpt_and_flags, "--device", "cpu",
           "--port", str(port), "--log_level", "warning"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                pytest.fail(f"server did not come up:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")
