"""A checkpoint knows its shape (the JSON beside it, or its tensors), and every loader turns a broken or
wrong-kind file into one line naming the path, what is wrong and what to do, with a non-zero exit."""

import importlib.util
import json
import sys

import pytest
import torch
from conftest import ROOT, tiny_config, tiny_model
from safetensors.torch import save_file

from model.checkpoint import (
    CheckpointError,
    atomic_save,
    config_path,
    find_checkpoint,
    load_model,
    read_checkpoint,
    save_weights,
)
from model.LMConfig import PRESETS, LMConfig


def test_save_weights_writes_the_config_and_loading_needs_no_flags(tmp_path):
    model = tiny_model(vocab_size=6400, max_seq_len=48)
    path = save_weights(model.state_dict(), tmp_path / "pretrain_64.pth", model.config)
    recorded = json.loads(config_path(path).read_text())
    assert (recorded["dim"], recorded["n_heads"], recorded["n_kv_heads"], recorded["max_seq_len"]) == (64, 4, 2, 48)
    loaded = load_model(path, device="cpu")
    assert (loaded.config.n_heads, loaded.config.n_kv_heads, loaded.config.max_seq_len) == (4, 2, 48)
    x = torch.randint(0, 6400, (1, 9))
    torch.testing.assert_close(loaded(x).logits, model(x).logits)


@pytest.mark.parametrize("preset", ["minimind-v1-small", "minimind-v1-moe"])
def test_a_v1_pth_without_json_loads_with_no_flags(tmp_path, preset):
    torch.manual_seed(0)
    config = LMConfig(**PRESETS[preset])
    state = {k: v for k, v in tiny_state(config).items()}
    torch.save(state, tmp_path / "full_sft_512.pth")  # what v1 wrote: a bare state dict, nothing beside it
    got = read_checkpoint(tmp_path / "full_sft_512.pth").config
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "use_moe", "n_routed_experts",
                  "n_shared_experts", "num_experts_per_tok"):
        assert getattr(got, field) == getattr(config, field), field
    assert got.file_suffix == config.file_suffix
    load_model(tmp_path / "full_sft_512.pth", device="cpu")  # strict


def tiny_state(config):
    """A state dict with the exact keys and shapes of `config`'s model, without paying for its initialisation."""
    with torch.device("meta"):
        from model.model import MiniMindForCausalLM

        shapes = {k: v.shape for k, v in MiniMindForCausalLM(config).state_dict().items()}
    return {k: torch.zeros(s) for k, s in shapes.items()}


def test_flags_that_contradict_the_file_name_both_shapes(tmp_path):
    model = tiny_model()
    path = save_weights(model.state_dict(), tmp_path / "w.pth", model.config)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path, {"dim": 512, "n_layers": 8})
    message = str(err.value)
    assert "\n" not in message and "dim=64 n_layers=2" in message and "dim=512 n_layers=8" in message
    assert "--dim" in message and "--n_layers" in message
    # flags that agree, or that change no tensor shape, are fine
    assert read_checkpoint(path, {"dim": 64, "max_seq_len": 96}).config.max_seq_len == 96


def test_head_flags_are_checked_against_the_wk_width_when_there_is_no_json(tmp_path):
    torch.save(tiny_model().state_dict(), tmp_path / "w.pth")  # dim 64, 4 heads / 2 KV heads: wk is 32 wide
    assert read_checkpoint(tmp_path / "w.pth", {"n_heads": 4, "n_kv_heads": 2}).config.n_heads == 4
    with pytest.raises(CheckpointError, match="--n_kv_heads"):
        read_checkpoint(tmp_path / "w.pth", {"n_heads": 4, "n_kv_heads": 4})


def test_a_json_that_disagrees_with_the_weights_is_refused(tmp_path):
    model = tiny_model()
    path = save_weights(model.state_dict(), tmp_path / "w.pth", model.config)
    config_path(path).write_text(json.dumps({**tiny_config().to_dict(), "dim": 128}))
    with pytest.raises(CheckpointError, match="delete the JSON"):
        read_checkpoint(path)
    config_path(path).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_checkpoint(path)


def test_find_checkpoint_picks_the_newest_stage_file_or_the_flags_shape(tmp_path):
    import os

    for i, name in enumerate(["pretrain_512.pth", "pretrain_128.pth", "pretrain_128.resume.pt", "pretrain_x.pth"]):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    assert find_checkpoint(tmp_path, "pretrain").name == "pretrain_128.pth"
    assert find_checkpoint(tmp_path, "pretrain", {"dim": 512}).name == "pretrain_512.pth"
    with pytest.raises(CheckpointError, match="no full_sft checkpoint"):
        find_checkpoint(tmp_path, "full_sft")
    with pytest.raises(CheckpointError, match="full_sft_768_moe.pth"):
        find_checkpoint(tmp_path, "full_sft", {"dim": 768, "use_moe": True})


# ----------------------------------------------------------------------------------------------------------------
# every kind of bad file, through every loader


def make_bad_files(tmp_path) -> dict:
    model = tiny_model(vocab_size=6400)
    good = tmp_path / "good.pth"
    torch.save(model.state_dict(), good)
    data = good.read_bytes()
    files = {}
    files["empty"] = tmp_path / "empty.pth"
    files["empty"].write_bytes(b"")
    files["truncated"] = tmp_path / "truncated.pth"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["garbage"] = tmp_path / "garbage.pth"
    files["garbage"].write_bytes(b"not a checkpoint at all\n" * 20)
    files["resume"] = tmp_path / "pretrain_64.resume.pt"
    atomic_save({"model": model.state_dict(), "step": 3, "optimizer": None}, files["resume"])
    files["safetensors"] = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "output.weight"}, files["safetensors"])
    files["peft_folder"] = tmp_path / "lora_sft_64"
    files["peft_folder"].mkdir()
    (files["peft_folder"] / "adapter_config.json").write_text("{}")
    files["lora_only"] = tmp_path / "lora_sft_64_adapter.pth"
    torch.save({"base_model.model.layers.0.attention.wq.lora_A.weight": torch.zeros(4, 64)}, files["lora_only"])
    files["missing"] = tmp_path / "missing.pth"
    return files


EXPECTED = {"empty": "is empty", "truncated": "truncated or corrupt", "garbage": "truncated or corrupt",
            "resume": "is a resume file", "safetensors": "safetensors file", "peft_folder": "peft LoRA adapter folder",
            "lora_only": "LoRA adapter weights only", "missing": "not found"}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return make_bad_files(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_read_checkpoint_explains_each_bad_file(bad_files, kind):
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(bad_files[kind])
    message = str(err.value)
    assert EXPECTED[kind] in message and str(bad_files[kind]) in message and "\n" not in message


def script_main(name):
    module_name = "script_" + name.replace("-", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(module_name, ROOT / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses in the script look their module up there
    spec.loader.exec_module(module)
    return module.main


def ceval_folder(tmp_path):
    folder = tmp_path / "ceval"
    (folder / "val").mkdir(parents=True, exist_ok=True)
    (folder / "val" / "math_val.csv").write_text("id,question,A,B,C,D,answer\n0,1+1=?,1,2,3,4,B\n", encoding="utf-8")
    return folder


LOADERS = {
    "0-eval_pretrain.py": lambda p, tmp: ["--ckpt", p, "--device", "cpu"],
    "2-eval.py": lambda p, tmp: ["--ckpt", p, "--device", "cpu", "--prompt", "你好"],
    "3-full_sft.py": lambda p, tmp: ["--init", p, "--device", "cpu", "--out_dir", tmp / "out"],
    "4-lora_sft.py": lambda p, tmp: ["--init", p, "--device", "cpu", "--out_dir", tmp / "out"],
    "5-dpo_train.py": lambda p, tmp: ["--init", p, "--device", "cpu", "--out_dir", tmp / "out"],
    "export_model.py": lambda p, tmp: ["--ckpt", p, "--out_dir", tmp / "export"],
    "eval_ceval.py": lambda p, tmp: ["--ckpt", p, "--data_dir", ceval_folder(tmp), "--device", "cpu"],
}


def run_loader(name, argv, monkeypatch):
    main = script_main(name)
    argv = [str(a) for a in argv]
    if name == "my_openai_api.py":  # its main() reads sys.argv
        monkeypatch.setattr(sys, "argv", [name, *argv])
        argv = None
    try:
        code = main(argv) if argv is not None else main()
    except SystemExit as stop:
        code = stop.code
    return code


@pytest.mark.parametrize("loader", [*LOADERS, "my_openai_api.py"])
def test_every_loader_gives_one_line_for_every_bad_file(bad_files, loader, tmp_path, capsys, monkeypatch):
    for kind, path in bad_files.items():
        argv = LOADERS[loader](path, tmp_path) if loader in LOADERS else ["--ckpt", path, "--device", "cpu"]
        code = run_loader(loader, argv, monkeypatch)
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert code not in (0, None), (loader, kind)
        assert len(err) == 1 and EXPECTED[kind] in err[0] and str(path) in err[0], (loader, kind, err)


@pytest.mark.parametrize("loader", ["3-full_sft.py", "2-eval.py", "export_model.py"])
def test_contradicting_flags_are_one_line_through_the_scripts(loader, tmp_path, capsys, monkeypatch):
    model = tiny_model(vocab_size=6400)
    path = save_weights(model.state_dict(), tmp_path / "full_sft_64.pth", model.config)
    code = run_loader(loader, [*LOADERS[loader](path, tmp_path), "--dim", "512"], monkeypatch)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code not in (0, None) and len(err) == 1 and "dim=64" in err[0] and "dim=512" in err[0], err
