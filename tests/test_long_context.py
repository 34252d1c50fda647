"""`--rope_scaling yarn --rope_factor F`: a model run at 4x the length it was trained at keeps a lower loss with YaRN
than with no scaling (both families share the code; the v1-layout quick-start model is measured here).

Measured with this test's setup (the quick start's 128-wide model, 200 steps at 64 tokens on the bundled sample,
evaluated on windows of the same sample): loss 0.03 at 64 tokens; at 256 tokens 0.36 with no scaling, 0.25 with
YaRN x4 and 0.91 with linear x4.
"""

import argparse
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from model.checkpoint import load_model, read_checkpoint
from model.dataset import PretrainDataset
from model.errors import UsageError
from model.LMConfig import LMConfig, add_model_args, model_flags


@pytest.fixture(scope="module")
def quickstart_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("long")
    env = {**os.environ, "QUICKSTART_OUT_DIR": str(out), "QUICKSTART_IMAGES_DIR": str(out), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "2"}
    done = subprocess.run(["bash", str(ROOT / "quickstart.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out / "pretrain_128.pth", out / "pretrain_sample.bin"


def loss_at(ckpt, data, length: int, flags: dict) -> float:
    windows = PretrainDataset(data, length)
    items = [windows[i] for i in range(min(len(windows), 24))]
    model = load_model(read_checkpoint(ckpt, flags), device="cpu")
    with torch.no_grad():
        return model(torch.stack([b["input_ids"] for b in items]),
                     targets=torch.stack([b["targets"] for b in items])).loss.item()


def test_yarn_keeps_a_lower_loss_at_four_times_the_training_length(quickstart_model):
    ckpt, data = quickstart_model
    trained = read_checkpoint(ckpt).config.max_seq_len
    plain = loss_at(ckpt, data, 4 * trained, {})
    yarn = loss_at(ckpt, data, 4 * trained, model_flags(parse(["--rope_scaling", "yarn", "--rope_factor", "4"])))
    print(f"loss at {4 * trained} tokens: no scaling {plain:.4f}, YaRN x4 {yarn:.4f}")
    assert yarn < plain


def test_eval_script_takes_the_yarn_flags(quickstart_model):
    ckpt, _ = quickstart_model
    done = subprocess.run([sys.executable, str(ROOT / "0-eval_pretrain.py"), "--ckpt", str(ckpt), "--device", "cpu",
                           "--prompt", "长江是", "--max_new_tokens", "8", "--rope_scaling", "yarn", "--rope_factor", "4"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def parse(argv):
    return add_model_args(argparse.ArgumentParser()).parse_args(argv)


def test_flags_become_a_yarn_config_over_the_training_length():
    flags = model_flags(parse(["--rope_scaling", "yarn", "--rope_factor", "4"]))
    config = LMConfig(max_seq_len=64, **flags)
    assert config.yarn == {"factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
                           "beta_slow": 1.0, "attention_factor": 1.0}
    assert config.max_position_embeddings == 256 and config.context_length == 256
    assert model_flags(parse(["--rope_scaling", "linear", "--rope_factor", "2"]))["rope_scaling_factor"] == 2.0
    with pytest.raises(UsageError, match="go together"):
        model_flags(parse(["--rope_scaling", "yarn"]))
