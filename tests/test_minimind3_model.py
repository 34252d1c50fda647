"""The MiniMind-3 family in our model class: released folders load with no flags and compute what the architecture
(as `minimind3_reference` re-states it) computes, dense, MoE and YaRN past the original context; our checkpoints
of the family write the same layout back. v1 stays bit for bit (test_model.py, test_decode_fast_path.py)."""

import json

import pytest
import torch
from conftest import tiny_model
from minimind3_reference import forward as reference_forward
from safetensors.torch import save_file

from model.checkpoint import CheckpointError, load_model, read_checkpoint
from model.LMConfig import MINIMIND3_YARN, PRESETS, LMConfig
from model.minimind3_format import config_from_minimind3, read_minimind3, write_minimind3
from model.model import MiniMindForCausalLM


def released_config(**overrides) -> dict:
    """A tiny config.json in MiniMind-3's published keys."""
    cfg = {"architectures": ["MiniMindForCausalLM"], "model_type": "minimind", "hidden_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
           "intermediate_size": 160, "moe_intermediate_size": 160, "max_position_embeddings": 32768,
           "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": True, "vocab_size": 300,
           "use_moe": False, "num_experts": 4, "num_experts_per_tok": 1, "norm_topk_prob": True,
           "router_aux_loss_coef": 5e-4, "inference_rope_scaling": False}
    cfg.update(overrides)
    return cfg


def released_state(cfg: dict, seed: int = 0) -> dict:
    """Random weights under the published tensor names (what a MiniMind-3 model.safetensors holds)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    D, hd, F = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    sd = {"model.embed_tokens.weight": rand(cfg["vocab_size"], D, scale=1.0), "model.norm.weight": 1 + rand(D)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": 1 + rand(D), p + "post_attention_layernorm.weight": 1 + rand(D),
                   p + "self_attn.q_proj.weight": rand(nh * hd, D), p + "self_attn.k_proj.weight": rand(nkv * hd, D),
                   p + "self_attn.v_proj.weight": rand(nkv * hd, D), p + "self_attn.o_proj.weight": rand(D, nh * hd),
                   p + "self_attn.q_norm.weight": 1 + rand(hd), p + "self_attn.k_norm.weight": 1 + rand(hd)})
        experts = [f"{p}mlp.experts.{j}." for j in range(cfg["num_experts"])] if cfg["use_moe"] else [p + "mlp."]
        if cfg["use_moe"]:
            sd[p + "mlp.gate.weight"] = rand(cfg["num_experts"], D, scale=1.0)
        for e in experts:
            sd.update({e + "gate_proj.weight": rand(F, D), e + "up_proj.weight": rand(F, D),
                       e + "down_proj.weight": rand(D, F)})
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # tied; published files may or may not hold it
    return sd


def write_released(folder, cfg, sd):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items() if k != "lm_head.weight"}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


CASES = {
    "dense": dict(),
    "moe": dict(use_moe=True),
    "moe-top2": dict(use_moe=True, num_experts_per_tok=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_released_folder_loads_without_flags_and_matches_the_reference(tmp_path, case):
    cfg = released_config(**CASES[case])
    sd = released_state(cfg)
    folder = write_released(tmp_path / "MiniMind-3", cfg, sd)
    ids = torch.randint(0, cfg["vocab_size"], (40,), generator=torch.Generator().manual_seed(1))
    want = reference_forward(sd, cfg, ids)
    for path in (folder, folder / "model.safetensors"):  # the folder, or its weights file
        model = load_model(path, device="cpu")
        assert model.config.qk_norm and model.config.rope_layout == "half" and model.config.head_dim == 24
        with torch.no_grad():
            got = model(ids[None]).logits[0].double()
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_yarn_past_the_original_context_matches_the_reference(tmp_path):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0,
            "beta_slow": 1.0, "attention_factor": 1.2}
    cfg = released_config(max_position_embeddings=64, inference_rope_scaling=True, rope_parameters=yarn)
    sd = released_state(cfg)
    model = load_model(write_released(tmp_path / "yarn", cfg, sd), device="cpu")
    assert model.config.yarn["factor"] == 4.0 and model.config.context_length == 64
    ids = torch.randint(0, 300, (48,), generator=torch.Generator().manual_seed(2))  # 3x the original context
    want = reference_forward(sd, {**cfg, "rope_scaling": yarn}, ids)
    with torch.no_grad():
        got = model(ids[None]).logits[0].double()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    # and YaRN really changes the result (it is not silently off)
    plain = reference_forward(sd, {**cfg, "rope_scaling": None}, ids)
    assert (plain - want).abs().max() > 1e-2


def test_config_json_variants():
    assert config_from_minimind3(released_config()).yarn is None
    defaults = config_from_minimind3(released_config(inference_rope_scaling=True))
    assert defaults.yarn == MINIMIND3_YARN and defaults.max_seq_len == 2048
    legacy = config_from_minimind3(released_config(inference_rope_scaling=True, rope_scaling={
        "type": "yarn", "factor": 8.0, "original_max_position_embeddings": 1024}))
    assert legacy.yarn["factor"] == 8.0 and legacy.yarn["beta_fast"] == 32.0 and legacy.max_seq_len == 1024
    # switched off, a saved dict is not applied
    assert config_from_minimind3(released_config(rope_scaling={"type": "yarn", "factor": 8.0})).yarn is None
    moe = config_from_minimind3(released_config(use_moe=True))
    assert moe.n_routed_experts == 4 and moe.num_experts_per_tok == 1 and not moe.n_shared_experts


@pytest.mark.parametrize("preset", ["minimind-3", "minimind-3-moe"])
def test_presets_write_the_published_layout_and_read_back(tmp_path, preset):
    torch.manual_seed(0)
    small = {**PRESETS[preset], "dim": 64, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "hidden_dim": 128,
             "n_layers": 2, "vocab_size": 256}
    model = MiniMindForCausalLM(LMConfig(**small)).eval()
    folder = write_minimind3(model, tmp_path / "export")
    fields = json.loads((folder / "config.json").read_text())
    assert fields["hidden_size"] == 64 and fields["head_dim"] == 16 and "dim" not in fields
    config, state = read_minimind3(folder)
    back = MiniMindForCausalLM(config)
    back.load_state_dict(state, strict=True)
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert torch.equal(back.eval()(ids).logits, model(ids).logits)


def test_v1_models_refuse_the_minimind3_layout(tmp_path):
    with pytest.raises(ValueError, match="MiniMind-3-family"):
        write_minimind3(tiny_model(), tmp_path / "x")


def test_flags_that_contradict_a_released_folder_are_refused(tmp_path):
    folder = write_released(tmp_path / "m3", released_config(), released_state(released_config()))
    assert read_checkpoint(folder, {"dim": 64}).config.dim == 64
    with pytest.raises(CheckpointError, match="--dim"):
        read_checkpoint(folder, {"dim": 512})


def test_family_pth_without_json_reads_its_shape_from_the_tensors(tmp_path):
    torch.manual_seed(0)
    config = LMConfig(**{**PRESETS["minimind-3"], "dim": 64, "n_heads": 4, "n_kv_heads": 2, "head_dim": 24,
                         "hidden_dim": 128, "n_layers": 2, "vocab_size": 256})
    model = MiniMindForCausalLM(config).eval()
    path = tmp_path / "pretrain_64.pth"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, device="cpu")
    assert (loaded.config.head_dim, loaded.config.n_heads, loaded.config.n_kv_heads) == (24, 4, 2)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_pretraining_documents_are_wrapped_in_the_family_tokenizers_own_markers():
    import data_process
    from model.checkpoint import TOKENIZER3_DIR, TOKENIZER_DIR

    assert data_process.document_markers(str(TOKENIZER_DIR)) == ("<s>", "</s>")
    assert data_process.document_markers(str(TOKENIZER3_DIR)) == ("<|im_start|>", "<|im_end|>")


def test_dpo_pairs_in_either_familys_template():
    """The prompt carries the template's generation prompt, so chosen/rejected hold the reply alone."""
    import data_process
    from model.checkpoint import TOKENIZER3_DIR, TOKENIZER_DIR, load_tokenizer

    pair = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    v1 = load_tokenizer(TOKENIZER_DIR)
    assert data_process.dpo_prompt(v1, pair) == "<s>user\n你好</s>\n<s>assistant\n"
    m3 = load_tokenizer(TOKENIZER3_DIR)
    prompt = data_process.dpo_prompt(m3, pair)
    assert prompt == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert m3.apply_chat_template(pair, tokenize=False)[len(prompt):] == "你好！<|im_end|>\n"
