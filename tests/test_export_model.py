"""export_model.py round trips: the exported folder loads through AutoModelForCausalLM (remote code for the minimind
format, plain LlamaForCausalLM for the llama format), gives our logits and our greedy generations, and carries the
tokenizer with its chat template."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
from transformers.dynamic_module_utils import get_class_from_dynamic_module

import export_model
from model.checkpoint import TOKENIZER_DIR, load_tokenizer
from model.generate import generate

SHAPE_FLAGS = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "32"]


def make_model(**overrides):
    """A tiny model with the real vocabulary. The tied embedding is scaled to give logits of a trained model's size
    (|logit| up to ~15 rather than ~35); fp32 rounding differences between equivalent kernels grow with the logits."""
    model = tiny_model(vocab_size=6400, **overrides)
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(0.5)
    return model


def export_cli(model, tmp_path, fmt, *extra):
    ckpt = tmp_path / "model.pth"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / f"export-{fmt}"
    flags = [*SHAPE_FLAGS, *(["--use_moe"] if model.config.use_moe else [])]
    if model.config.rope_scaling_factor:
        flags += ["--rope_scaling_factor", str(model.config.rope_scaling_factor)]
    code = export_model.main(["--ckpt", str(ckpt), "--out_dir", str(out), "--format", fmt, *flags, *extra])
    return code, out


@torch.inference_mode()
def assert_same_logits(ours, theirs, vocab_size=6400):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab_size, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # row 1 is left-padded
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = ours(ids).logits
    assert (ref - theirs(input_ids=ids).logits).abs().max() < 1e-4
    ref = ours(ids, attention_mask=mask).logits
    got = theirs(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert (ref - got)[mask.bool()].abs().max() < 1e-4


def cut_at_eos(tokens, eos=2):
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@torch.inference_mode()
def assert_same_greedy_generation(ours, theirs):
    prompts = [[1, 5, 9, 200, 31, 7], [1, 44, 3000, 12]]
    expected = generate(ours, prompts, temperature=0, max_new_tokens=6)
    for prompt, want in zip(prompts, expected):  # one at a time: no padding
        out = theirs.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
        assert cut_at_eos(out[0, len(prompt):].tolist()) == want
    ids = torch.tensor([[0, 0] + prompts[1], prompts[0]])  # batched, left-padded
    mask = (torch.arange(6) >= torch.tensor([[2], [0]])).long()
    out = theirs.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert [cut_at_eos(row) for row in out[:, 6:].tolist()] == [expected[1], expected[0]]
    assert any(len(set(row)) > 1 for row in expected)  # the comparison is not between two constant sequences


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_minimind_format_round_trip(tmp_path, use_moe):
    model = make_model(use_moe=use_moe)
    code, out = export_cli(model, tmp_path, "minimind")
    assert code == 0
    assert {"config.json", "generation_config.json", "model.safetensors", "model.py", "LMConfig.py",
            "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "LMConfig.LMConfig", "AutoModelForCausalLM": "model.MiniMindForCausalLM"}
    assert config["use_moe"] is use_moe
    assert "register(" not in (out / "model.py").read_text()

    # In this process, which imported our `model` package, transformers prefers our registered class ...
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert_same_logits(model, loaded)
    # ... so load the folder's own copy of the code explicitly too (a clean process does it through auto_map, below).
    remote_class = get_class_from_dynamic_module(config["auto_map"]["AutoModelForCausalLM"], out)
    assert remote_class.__module__.startswith("transformers_modules.") and remote_class.__name__ == "MiniMindForCausalLM"
    remote = remote_class.from_pretrained(out).eval()
    assert_same_logits(model, remote)
    assert_same_greedy_generation(model, remote)


@pytest.mark.parametrize("rope_scaling_factor", [None, 2.0], ids=["plain-rope", "linear-rope-scaling"])
def test_llama_format_round_trip(tmp_path, rope_scaling_factor):
    model = make_model(rope_scaling_factor=rope_scaling_factor)
    code, out = export_cli(model, tmp_path, "llama")
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert not (out / "model.py").exists()

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()  # no remote code
    assert type(loaded) is LlamaForCausalLM
    assert loaded.config.intermediate_size == model.config.ffn_hidden_dim
    assert_same_logits(model, loaded)
    assert_same_greedy_generation(model, loaded)


def test_llama_permutation_is_needed():
    """Without reordering q/k rows the Llama layout computes something else: the permutation is doing real work."""
    model = make_model()
    state = export_model.llama_state_dict(model.state_dict(), model.config)
    llama = LlamaForCausalLM(export_model.llama_config(model.config, torch.float32)).eval()
    llama.load_state_dict(state, strict=False)
    llama.tie_weights()
    assert_same_logits(model, llama)
    q = "model.layers.0.self_attn.q_proj.weight"
    state[q] = model.layers[0].attention.wq.weight  # the original interleaved order
    llama.load_state_dict(state, strict=False)
    with torch.no_grad():
        ids = torch.randint(3, 6400, (1, 12))
        assert (model(ids).logits - llama(ids).logits).abs().max() > 1e-2


def test_exported_tokenizer_keeps_chat_template(tmp_path):
    model = make_model()
    code, out = export_cli(model, tmp_path, "llama", "--no_verify")
    assert code == 0
    ours, exported = load_tokenizer(TOKENIZER_DIR), AutoTokenizer.from_pretrained(out)
    messages = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "1+1=?"}]
    text = exported.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<s>user\n1+1=?</s>\n<s>assistant\n")
    assert exported(text, add_special_tokens=False)["input_ids"] == ours(text, add_special_tokens=False)["input_ids"]
    assert (exported.bos_token_id, exported.eos_token_id) == (1, 2)
    assert exported.model_max_length == model.config.context_length
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)


def test_llama_format_rejects_moe(tmp_path, capsys):
    code, out = export_cli(make_model(use_moe=True), tmp_path, "llama")
    assert code == 1
    err = capsys.readouterr().err
    assert "mixture-of-experts" in err and "--format minimind" in err
    assert not out.exists()


def test_refuses_to_overwrite_unless_forced(tmp_path, capsys):
    model = make_model()
    out = tmp_path / "export-llama"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _ = export_cli(model, tmp_path, "llama", "--no_verify")
    assert code == 1 and "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"

    code, _ = export_cli(model, tmp_path, "llama", "--no_verify", "--force")
    assert code == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    # the temporary build folder and the moved-aside old folder are both gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export-llama", "model.pth"]


def test_minimind_export_loads_in_a_clean_process(tmp_path):
    """Another program, without this repo on its path and offline, loads the folder and gets our logits."""
    model = make_model()
    code, out = export_cli(model, tmp_path, "minimind", "--no_verify")
    assert code == 0
    ids = torch.randint(3, 6400, (1, 10))
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
        "assert 'model' not in sys.modules, 'the repo package was imported'\n"
        f"torch.save(m(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    scratch = tmp_path / "elsewhere"
    scratch.mkdir()
    result = subprocess.run([sys.executable, "-c", script], cwd=scratch, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = model(ids).logits
    assert (torch.load(tmp_path / "logits.pt") - expected).abs().max() < 1e-4


@pytest.mark.parametrize("fmt", ["minimind", "llama"])
def test_exported_tokenizer_loads_with_no_remote_code_and_no_prompt(tmp_path, fmt):
    """The README's tokenizer line, in a clean process with stdin closed: a trust-remote-code prompt would show up
    in its output (and block a terminal), and remote code would show up in sys.modules."""
    code, out = export_cli(make_model(), tmp_path, fmt, "--no_verify")
    assert code == 0
    settings = json.loads((out / "tokenizer_config.json").read_text())
    assert settings["tokenizer_class"] == "PreTrainedTokenizerFast" and "auto_map" not in settings
    load = export_model.TOKENIZER_LOAD.format(folder=out)
    assert export_model.TOKENIZER_LOAD.format(folder="path/to/this/folder") in (out / "README.md").read_text()
    script = (
        "import sys\n"
        "from transformers import PreTrainedTokenizerFast\n"
        f"tok = {load}\n"
        "assert not [m for m in sys.modules if m.startswith('transformers_modules')], 'remote code was imported'\n"
        "print(repr(tok.apply_chat_template([{'role': 'user', 'content': '你好'}], tokenize=False,"
        " add_generation_prompt=True)), tok.eos_token_id, tok.model_max_length)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "trust_remote_code" not in log and "[y/N]" not in log and "custom code" not in log, log
    assert result.stdout.strip() == f"'<s>user\\n你好</s>\\n<s>assistant\\n' 2 {make_model().config.context_length}"
