"""The MiniMind-3 family exports as native Qwen3 / Qwen3-MoE folders that vanilla transformers loads without remote
code (same logits, same greedy tokens), and back into MiniMind-3's published layout; v1-only formats refuse it."""

import json

import pytest
import torch
from conftest import tiny_model
from test_export_model import assert_same_greedy_generation, assert_same_logits

import export_model
from model.checkpoint import load_model, save_weights
from model.LMConfig import PRESETS, LMConfig
from model.model import MiniMindForCausalLM

SMALL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=6400)
CASES = {
    "dense": dict(),
    "moe": dict(use_moe=True),
    "yarn": dict(max_seq_len=16, max_position_embeddings=64,
                 yarn=dict(factor=4.0, original_max_position_embeddings=16, beta_fast=32.0, beta_slow=1.0,
                           attention_factor=1.1)),
}


def family_model(case: str) -> MiniMindForCausalLM:
    preset = PRESETS["minimind-3-moe" if CASES[case].get("use_moe") else "minimind-3"]
    torch.manual_seed(0)
    model = MiniMindForCausalLM(LMConfig(**{**preset, **SMALL, **CASES[case]})).eval()
    with torch.no_grad():  # weights spread like a trained model's, so greedy decoding is not constant
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5 if "tok_embeddings" in name else 0.15)
    return model


def export(tmp_path, model, fmt, *extra):
    ckpt = save_weights(model.state_dict(), tmp_path / "full_sft_64.pth", model.config)
    out = tmp_path / f"export-{fmt}"
    # no model flags: the shape comes from the JSON beside the .pth
    assert export_model.main(["--ckpt", str(ckpt), "--out_dir", str(out), "--format", fmt, *extra]) == 0
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_qwen3_export_loads_natively_with_the_same_logits_and_tokens(tmp_path, case):
    from transformers import AutoModelForCausalLM

    model = family_model(case)
    out = export(tmp_path, model, "qwen3")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == ("qwen3_moe" if case == "moe" else "qwen3") and "auto_map" not in config
    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(theirs).__name__ == ("Qwen3MoeForCausalLM" if case == "moe" else "Qwen3ForCausalLM")
    assert_same_logits(model, theirs)
    assert_same_greedy_generation(model, theirs)
    # the family's own tokenizer goes with it: ChatML specials
    tokenizer = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer["chat_template"]


@pytest.mark.parametrize("case", ["dense", "moe"])
def test_minimind3_layout_export_reads_back_with_no_flags(tmp_path, case):
    model = family_model(case)
    out = export(tmp_path, model, "minimind3")
    fields = json.loads((out / "config.json").read_text())
    assert fields["model_type"] == "minimind" and fields["hidden_size"] == 64 and "dim" not in fields
    back = load_model(out, device="cpu")
    ids = torch.randint(0, 6400, (1, 20))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


@pytest.mark.parametrize("fmt", ["qwen3", "minimind3"])
def test_v1_models_are_refused_by_the_family_formats(tmp_path, fmt, capsys):
    model = tiny_model(vocab_size=6400)
    ckpt = save_weights(model.state_dict(), tmp_path / "m.pth", model.config)
    assert export_model.main(["--ckpt", str(ckpt), "--out_dir", str(tmp_path / "o"), "--format", fmt]) == 1
    assert "MiniMind-3-family" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_llama_format_refuses_the_minimind3_family(tmp_path, capsys):
    model = family_model("dense")
    ckpt = save_weights(model.state_dict(), tmp_path / "m.pth", model.config)
    assert export_model.main(["--ckpt", str(ckpt), "--out_dir", str(tmp_path / "o"), "--format", "llama"]) == 1
    assert "--format qwen3" in capsys.readouterr().err
