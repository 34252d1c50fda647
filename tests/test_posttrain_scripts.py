"""The post-training scripts end to end, from the bundled samples: process -> tiny pretrain (2 steps) -> SFT ->
LoRA -> DPO -> chat, for a few steps on CPU, writing into a temp folder.

Pretraining and the chat run as real subprocesses; the SFT/LoRA/DPO scripts run through their `main(argv)` in this
process (same flags, same files written) because importing torch + transformers + trl anew for each costs more
than the training itself.
"""

import importlib.util
import subprocess
import sys

import pytest
from conftest import ROOT, tiny_config

import data_process
from model.checkpoint import load_model

TINY = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "128"]


def script(name):
    spec = importlib.util.spec_from_file_location(name.replace("-", "_").removesuffix(".py"), ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run(*args, cwd):
    out = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert out.returncode == 0, f"{args[0]} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("posttrain")
    data = ROOT / "dataset"
    for stage, raw, out in [("pretrain", "pretrain_sample.jsonl", "pretrain.bin"), ("sft", "sft_sample.jsonl", "sft.bin"),
                            ("dpo", "dpo_sample.jsonl", "dpo.jsonl")]:
        assert data_process.main([stage, "--input", str(data / raw), "--output", str(tmp / out), "--workers", "1"]) == 0
    common = [*TINY, "--out_dir", tmp / "out", "--images_dir", tmp / "images", "--device", "cpu", "--num_workers", "0",
              "--log_interval", "1"]
    run(ROOT / "1-pretrain.py", *common, "--data_path", tmp / "pretrain.bin", "--max_steps", "2", "--batch_size", "4",
        cwd=tmp)
    assert (tmp / "out" / "pretrain_64.pth").exists()
    return tmp, common


def config():
    return tiny_config(vocab_size=6400, max_seq_len=128)


def main_args(*args):
    return [str(a) for a in args]


def test_full_sft_then_lora_then_dpo_then_chat(work, capsys):
    tmp, common = work
    out = tmp / "out"
    script("3-full_sft.py")(main_args(*common, "--data_path", tmp / "sft.bin", "--max_steps", "3", "--batch_size", "4"))
    assert "step 3/3" in capsys.readouterr().out
    load_model(out / "full_sft_64.pth", config(), device="cpu")  # strict: a plain v1 state dict
    assert (tmp / "images" / "full_sft_64_loss.png").exists()

    script("4-lora_sft.py")(main_args(*common, "--data_path", tmp / "sft.bin", "--max_steps", "2", "--batch_size", "4",
                                      "--merge", "--lora_rank", "4"))
    assert "step 2/2" in capsys.readouterr().out
    load_model(out / "lora_sft_64.pth", config(), device="cpu")
    assert (out / "lora_sft_64" / "adapter_config.json").exists()

    script("5-dpo_train.py")(main_args(*common, "--data_path", tmp / "dpo.jsonl", "--max_steps", "2", "--batch_size", "2",
                                       "--learning_rate", "1e-4"))
    assert "step 2/2 | loss" in capsys.readouterr().out
    load_model(out / "rl_64.pth", config(), device="cpu")
    assert (tmp / "images" / "rl_64_loss.png").exists()

    log = run(ROOT / "2-eval.py", *TINY, "--ckpt", out / "rl_64.pth", "--lora_dir", out / "lora_sft_64",
              "--device", "cpu", "--max_new_tokens", "8", "--temperature", "0", "--prompt", "你好", cwd=tmp)
    assert log.startswith("user> 你好\nassistant> ")


def one_line_error(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(main_args(*argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_scripts_fail_clearly_without_their_inputs(work, capsys):
    tmp, common = work
    for name in ("3-full_sft.py", "4-lora_sft.py", "5-dpo_train.py"):
        assert "missing.pth" in one_line_error(capsys, script(name), [*common, "--init", tmp / "missing.pth"])
    assert "no_such_data" in one_line_error(capsys, script("3-full_sft.py"), [
        *common, "--init", tmp / "out" / "pretrain_64.pth", "--data_path", tmp / "no_such_data.bin"])


def test_wrong_kind_of_data_file_is_one_line(work, capsys):
    tmp, common = work
    init = ["--init", tmp / "out" / "pretrain_64.pth"]
    cases = [
        ("1-pretrain.py", [*common, "--data_path", tmp / "sft.bin"], "holds 'sft' data, expected 'pretrain'"),
        ("1-pretrain.py", [*common, "--data_path", tmp / "nothing.bin"], "not found"),
        ("3-full_sft.py", [*common, *init, "--data_path", tmp / "pretrain.bin"], "holds 'pretrain' data, expected 'sft'"),
        ("4-lora_sft.py", [*common, *init, "--data_path", tmp / "dpo.jsonl"], "not a MiniMind token file"),
        ("5-dpo_train.py", [*common, *init, "--data_path", tmp / "sft.bin"], "is a token file"),
        ("5-dpo_train.py", [*common, *init, "--data_path", tmp / "pretrain.bin"], "is a token file"),
    ]
    for name, argv, expected in cases:
        assert expected in one_line_error(capsys, script(name), argv), name


def test_dpo_logs_its_last_step_and_a_line_per_interval_of_seconds(work, capsys, monkeypatch):
    tmp, common = work
    spec = importlib.util.spec_from_file_location("dpo_train", ROOT / "5-dpo_train.py")
    dpo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dpo)
    argv = main_args(*common, "--init", tmp / "out" / "pretrain_64.pth", "--data_path", tmp / "dpo.jsonl",
                     "--max_steps", "3", "--batch_size", "2", "--log_interval", "100", "--out_dir", tmp / "dpo_log")
    dpo.main(argv)
    out = capsys.readouterr().out
    assert "logging every 100 steps" in out
    assert [line.split(" |")[0] for line in out.splitlines() if line.startswith("step ")] == ["step 3/3"]  # the last
    assert out.rstrip().splitlines()[-5:][0] == "wrote:"  # then the files written, weights first, metrics last
    assert out.rstrip().splitlines()[-4].split()[-1] == str(tmp / "dpo_log" / "rl_64.pth")
    assert out.rstrip().splitlines()[-1].split()[-1] == str(tmp / "dpo_log" / "rl_64_metrics.jsonl")

    monkeypatch.setattr(dpo, "LOG_EVERY_S", 0.0)  # every step is "30 s after the last line"
    dpo.main(argv)
    out = capsys.readouterr().out
    assert [line.split(" |")[0] for line in out.splitlines() if line.startswith("step ")] == [
        "step 1/3", "step 2/3", "step 3/3"]
