"""GRPO on the bundled arithmetic set raises held-out accuracy above the SFT start (fixed seeds, CPU).

The start is tests/data/grpo_start_64.pth: a 0.5M-parameter model SFT'd from scratch for 300 steps on arithmetic
dialogues (tests/data/make_grpo_start.py reproduces it). GRPO trains on sums of 0..2 in many wordings; the held-out
prompts are wordings it never trains on. Both held-out measures must rise: greedy replies and sampled replies
(8 per prompt, the same seeds before and after). Measured when this test was written (seeds 0 and 1): greedy
0.233 -> 0.358 and 0.242 -> 0.375, sampled 0.148 -> 0.261 and 0.157 -> 0.268, after 40 steps.
"""

import json
import os

from conftest import ROOT
from pipeline_helpers import script_main

from model.arithmetic import make_problems, write_jsonl_atomic

START = ROOT / "tests" / "data" / "grpo_start_64.pth"
TOKENIZER = ROOT / "model" / "minimind_tokenizer_v0"  # the one the start was trained with (make_grpo_start.py)


def test_forty_grpo_steps_beat_the_sft_start_on_held_out_prompts(tmp_path):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    lines = run_grpo(tmp_path)
    start, end = lines[0], lines[-1]
    assert start["step"] == 0 and end["step"] == 40
    for key in ("val_accuracy", "val_accuracy_sampled"):
        assert end[key] >= start[key] + 0.05, (key, start[key], end[key])


def run_grpo(tmp_path) -> list[dict]:
    problems = make_problems(600, seed=0, max_value=2, word_share=0.5, kinds=("add",))
    write_jsonl_atomic(tmp_path / "rl.jsonl", [{"prompt": p["prompt"], "answer": p["answer"]} for p in problems])
    argv = ["--init", START, "--data_path", tmp_path / "rl.jsonl", "--out_dir", tmp_path, "--images_dir", tmp_path,
            "--device", "cpu", "--max_steps", "40", "--batch_size", "64", "--num_generations", "8",
            "--max_completion_length", "40", "--learning_rate", "1e-3", "--val_fraction", "0.2",
            "--eval_interval", "40", "--seed", "0", "--tokenizer", TOKENIZER]
    script_main("6-grpo_train.py", "grpo_train_improves")([str(a) for a in argv])
    metrics = (tmp_path / "grpo_64_metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in metrics]
