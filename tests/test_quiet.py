"""model/quiet.py: the library noise MiniMind's scripts used to print is gone, and nothing else is silenced."""

import os
import subprocess
import sys

import torch
from conftest import ROOT, tiny_model

from model.lora import add_lora, save_adapter

TINY = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "64"]
# What used to appear: transformers' cache-rename notice (mid-answer; fixed in model/model.py), peft's FutureWarning,
# deepspeed's accelerator notice; and the generic markers any new library warning would carry.
NOISE = ["past_key_values", "is_gradient_checkpointing", "Setting accelerator", "deprecated", "Warning",
         "warnings.warn"]


def quiet_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("MINIMIND_SHOW_ALL_WARNINGS", "PYTHONWARNINGS")}
    return {**env, **extra}


def test_chat_with_a_lora_adapter_prints_no_library_noise(tmp_path):
    model = tiny_model(vocab_size=6400, max_seq_len=64)
    torch.save(model.state_dict(), tmp_path / "tiny.pth")
    save_adapter(add_lora(tiny_model(vocab_size=6400, max_seq_len=64), rank=2), tmp_path / "lora")
    out = subprocess.run([sys.executable, str(ROOT / "2-eval.py"), *TINY, "--ckpt", str(tmp_path / "tiny.pth"),
                          "--lora_dir", str(tmp_path / "lora"), "--device", "cpu", "--max_new_tokens", "8",
                          "--temperature", "0", "--prompt", "你好"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=quiet_env(),
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("user> 你好\nassistant> ")
    log = out.stdout + out.stderr
    assert [word for word in NOISE if word in log] == [], log


EMIT = """
import logging, warnings
import model  # noqa: F401  (installs the filters)
for name, text in [("DeepSpeed", "Setting accelerator to CPU. If you have GPU ..."),
                   ("DeepSpeed", "another deepspeed warning"),
                   ("somewhere.else", "Setting accelerator to CPU, says another library")]:
    logging.getLogger(name).warning(text)
for text, module in [("`is_gradient_checkpointing` is deprecated and will be removed in v6.", "transformers.modeling_utils"),
                     ("`is_gradient_checkpointing` is deprecated and will be removed in v6.", "somewhere.else"),
                     ("another deprecation", "transformers.modeling_utils")]:
    warnings.warn_explicit(text, FutureWarning, "f.py", 1, module=module)
"""


def run_emit(**env):
    out = subprocess.run([sys.executable, "-c", EMIT], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env=quiet_env(**env))
    assert out.returncode == 0, out.stderr
    return out.stderr


def test_only_the_named_messages_from_the_named_modules_are_dropped():
    err = run_emit()
    assert "Setting accelerator to CPU. If" not in err
    assert "another deepspeed warning" in err and "says another library" in err  # other messages, other loggers
    assert err.count("is_gradient_checkpointing") == 1  # from somewhere.else: not the module the filter names
    assert "another deprecation" in err


def test_everything_shows_with_the_escape_hatch():
    err = run_emit(MINIMIND_SHOW_ALL_WARNINGS="1")
    assert "Setting accelerator to CPU. If" in err
    assert err.count("is_gradient_checkpointing") == 2
