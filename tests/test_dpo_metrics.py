"""What 5-dpo_train.py records besides its weights: the held-out validation loss, and one metrics-file line per log
step (trl's DPO metrics, throughput, the MoE balance loss), kept consistent across --resume.

The script runs through its `main(argv)` on the bundled DPO sample, from a tiny random init checkpoint.
"""

import json
import math

import pytest
import torch
from conftest import ROOT, tiny_config
from pipeline_helpers import script_main

import data_process
from model.checkpoint import save_weights
from model.dpo import dpo_eval_steps
from model.model import MiniMindForCausalLM

DPO_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected")


def dpo_main():
    return script_main("5-dpo_train.py", "dpo_train_metrics")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo_metrics")
    assert data_process.main(["dpo", "--input", str(ROOT / "dataset" / "dpo_sample.jsonl"), "--output",
                              str(tmp / "dpo.jsonl"), "--workers", "1"]) == 0
    for name, extra in (("dense", {}), ("moe", {"use_moe": True})):
        torch.manual_seed(0)
        config = tiny_config(vocab_size=6400, max_seq_len=128, **extra)
        save_weights(MiniMindForCausalLM(config).state_dict(), tmp / f"init_{name}.pth", config)
    return tmp


def run(work, init, *extra):
    argv = ["--init", work / f"init_{init}.pth", "--data_path", work / "dpo.jsonl", "--out_dir", work / f"out_{init}",
            "--images_dir", work / "images", "--device", "cpu", "--num_workers", "0", "--batch_size", "2",
            "--log_interval", "1", *extra]
    dpo_main()([str(a) for a in argv])


def records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_eval_steps_default_to_about_ten_per_run_on_log_steps():
    assert dpo_eval_steps(5, 1000, 30) == 5  # --eval_interval wins
    assert dpo_eval_steps(0, 10_000, 100) == 1000
    assert dpo_eval_steps(0, 1000, 30) == 120  # 100 rounded up to a log step
    assert dpo_eval_steps(0, 3, 100) == 100  # shorter than one log interval: only the evaluation at the end


def test_val_loss_and_metrics_file_then_resume(work, capsys):
    run(work, "dense", "--max_steps", "4", "--eval_interval", "2", "--val_fraction", "0.1", "--save_interval", "2")
    out = capsys.readouterr().out
    assert "(+4 held out, val_loss every 2 steps)" in out  # 36 pairs, 10 % held out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [("val_loss" in line) for line in lines] == [False, True, False, True]
    path = work / "out_dense" / "rl_64_metrics.jsonl"
    assert str(path) in out.split("wrote:")[-1]
    assert (work / "images" / "rl_64_loss.png").exists()

    recs = records(path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert [r["step"] for r in recs if "val_loss" in r] == [2, 4]
    assert abs(recs[1]["val_loss"] - math.log(2)) < 0.05  # a random init barely moves in 2 steps of lr 5e-6
    for r in recs:
        assert all(k in r for k in ("epoch", "loss", "lr", "grad_norm", "num_tokens", *DPO_KEYS)), r
        assert r["tokens_per_s"] > 0 and 0 <= r["padding_share"] < 1
        assert "aux_loss" not in r  # dense
    # padding share: 1 - real tokens / padded batch elements of the 2 batches (of 2 pairs) between two lines
    assert recs[1]["num_tokens"] > recs[0]["num_tokens"]

    # a killed run may have logged past its last checkpoint (step 4): --resume drops that line and logs it again
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 5, "loss": 123.0}) + "\n")
    run(work, "dense", "--max_steps", "6", "--eval_interval", "2", "--val_fraction", "0.1", "--save_interval", "2",
        "--resume")
    out = capsys.readouterr().out
    assert [line.split(" |")[0] for line in out.splitlines() if line.startswith("step ")] == ["step 5/6", "step 6/6"]
    recs = records(path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert recs[4]["loss"] != 123.0 and [r["step"] for r in recs if "val_loss" in r] == [2, 4, 6]


def test_moe_run_logs_its_balance_loss(work, capsys):
    run(work, "moe", "--max_steps", "2")  # default --val_fraction (1 pair held out) and --eval_interval
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and all("| aux " in line and "val_loss" in line for line in lines)
    recs = records(work / "out_moe" / "rl_64_moe_metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2]
    assert all(r["aux_loss"] > 0 and "val_loss" in r for r in recs)
