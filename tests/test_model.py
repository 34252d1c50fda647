"""The model's contract: v1 state-dict layout and math, MoE in every dtype, fresh outputs, transformers Auto round trip."""

import argparse

import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM
from v1_reference import v1_logits

from model.LMConfig import PRESETS, LMConfig, add_model_args, config_from_args
from model.model import MiniMindForCausalLM


def expected_v1_keys(cfg: LMConfig) -> list[str]:
    keys = ["tok_embeddings.weight"]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        keys += [p + f"attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")]
        keys += [p + "attention_norm.weight", p + "ffn_norm.weight"]
        if cfg.use_moe:
            for j in range(cfg.n_routed_experts):
                keys += [p + f"feed_forward.experts.{j}.{w}.weight" for w in ("w1", "w2", "w3")]
            keys.append(p + "feed_forward.gate.weight")
            keys += [p + f"feed_forward.shared_experts.{w}.weight" for w in ("w1", "w2", "w3")]
        else:
            keys += [p + f"feed_forward.{w}.weight" for w in ("w1", "w2", "w3")]
    return keys + ["norm.weight", "output.weight"]


@pytest.mark.parametrize("use_moe", [False, True])
def test_state_dict_keys_are_v1s(use_moe):
    cfg = tiny_config(use_moe=use_moe)
    sd = MiniMindForCausalLM(cfg).state_dict()
    assert sorted(sd) == sorted(expected_v1_keys(cfg))
    # buffers (RoPE tables, masks) must never end up in a checkpoint
    assert all(not name for name, _ in MiniMindForCausalLM(cfg).named_buffers())
    if use_moe:
        assert sd["layers.0.feed_forward.gate.weight"].shape == (cfg.n_routed_experts, cfg.dim)


def test_v1_shapes_for_default_config():
    sd = MiniMindForCausalLM(LMConfig()).state_dict()
    assert sd["layers.0.feed_forward.w1.weight"].shape == (1408, 512)  # v1's hidden-size rule
    assert sd["layers.0.attention.wk.weight"].shape == (256, 512)  # 8 kv heads of 32
    assert sd["output.weight"].data_ptr() == sd["tok_embeddings.weight"].data_ptr()  # tied


def test_preset_parameter_counts_match_v1():
    counts = {name: MiniMindForCausalLM(LMConfig(**kw)).num_parameters_unique() for name, kw in PRESETS.items()}
    assert round(counts["minimind-v1-small"] / 1e6, 2) == 26.88
    assert round(counts["minimind-v1"] / 1e6, 2) == 108.75
    assert round(counts["minimind-v1-moe"] / 1e6, 2) == 96.10
    # MiniMind-3 as published: 64M dense, 198M total for the 4-expert top-1 MoE
    assert round(counts["minimind-3"] / 1e6) == 64 and round(counts["minimind-3-moe"] / 1e6) == 198


@pytest.mark.parametrize("use_moe", [False, True])
def test_save_then_strict_load_gives_same_logits(tmp_path, use_moe):
    model = tiny_model(use_moe=use_moe)
    path = tmp_path / "ckpt.pth"
    torch.save(model.state_dict(), path)
    fresh = MiniMindForCausalLM(tiny_config(use_moe=use_moe)).eval()
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.randint(0, 256, (2, 12))
    torch.testing.assert_close(fresh(x).logits, model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("use_moe", [False, True])
@pytest.mark.parametrize("flash", [True, False])
def test_logits_match_v1_reference(use_moe, flash):
    model = tiny_model(use_moe=use_moe, flash_attn=flash, spread=0.1)
    x = torch.randint(0, 256, (2, 20))
    ref = v1_logits(model.state_dict(), model.config, x)
    out = model(x)
    assert out.logits.shape == (2, 20, 256)
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-4)


def test_loss_is_mean_ce_over_unmasked_labels(dense_model):
    x = torch.randint(0, 256, (2, 10))
    labels = x.clone()
    labels[0, :4] = -100
    out = dense_model(x, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 256)
    ref = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
    # v1 convention: targets are already the next tokens
    out2 = dense_model(x[:, :-1], targets=labels[:, 1:])
    torch.testing.assert_close(out2.loss, ref)


def test_forward_returns_fresh_output_and_keeps_mode(dense_model):
    dense_model.train()
    x = torch.randint(0, 256, (1, 5))
    a, b = dense_model(x), dense_model(x)
    assert a is not b and a.logits is not b.logits
    assert dense_model.training  # forward must not switch modes
    dense_model.eval()
    dense_model(x)
    assert not dense_model.training


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_forward_backward_with_aux_loss(dtype):
    model = tiny_model(use_moe=True, spread=0.05).train()
    x = torch.randint(0, 256, (3, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = model(x, labels=x)
        ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].float().reshape(-1, 256), x[:, 1:].reshape(-1))
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    torch.testing.assert_close(out.loss, ce + out.aux_loss)  # the balance loss reaches the training loss
    out.loss.backward()
    gate = model.layers[0].feed_forward.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())  # even experts that got no tokens
    model.eval()
    assert model(x, labels=x).aux_loss is None  # no balance loss outside training


def test_moe_in_half_precision_weights():
    for dtype in (torch.bfloat16, torch.float16):
        model = tiny_model(use_moe=True, spread=0.05).to(dtype).train()
        x = torch.randint(0, 256, (2, 8))
        out = model(x, labels=x)
        assert out.logits.dtype == dtype and torch.isfinite(out.loss)
        out.loss.backward()


def test_moe_balance_loss_minimal_when_balanced():
    """With a constant router (all scores equal), the sequence balance loss is exactly alpha."""
    model = tiny_model(use_moe=True).train()
    for layer in model.layers:
        layer.feed_forward.gate.weight.data.zero_()
    x = torch.randint(0, 256, (2, 8))
    out = model(x, labels=x)
    alpha = model.config.aux_loss_alpha
    torch.testing.assert_close(out.aux_loss, torch.tensor(alpha * model.config.n_layers))


def test_padded_batch_matches_unpadded(dense_model):
    a = torch.randint(3, 256, (1, 9))
    b = torch.randint(3, 256, (1, 5))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    out = dense_model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[0], dense_model(a).logits[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1, 4:], dense_model(b).logits[0], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(out).all()  # padded query rows must not be NaN


def test_positions_past_max_seq_len_do_not_crash(dense_model):
    x = torch.randint(0, 256, (1, 3 * dense_model.config.max_seq_len))
    assert dense_model(x).logits.shape == (1, x.shape[1], 256)


def test_rope_scaling_changes_positions_only():
    base = tiny_model()
    scaled = tiny_model(rope_scaling_factor=2.0)
    x = torch.randint(0, 256, (1, 1))  # a single token sits at position 0 either way
    torch.testing.assert_close(base(x).logits, scaled(x).logits)
    assert scaled.config.context_length == 2 * scaled.config.max_seq_len


@pytest.mark.parametrize("use_moe", [False, True])
def test_auto_classes_round_trip(tmp_path, use_moe):
    model = tiny_model(use_moe=use_moe)
    model.save_pretrained(tmp_path)
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, LMConfig) and cfg.use_moe == use_moe
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, MiniMindForCausalLM)
    assert loaded.output.weight.data_ptr() == loaded.tok_embeddings.weight.data_ptr()
    x = torch.randint(0, 256, (2, 7))
    torch.testing.assert_close(loaded.eval()(x).logits, model(x).logits)


def test_transformers_generate_uses_its_own_cache(dense_model):
    x = torch.randint(3, 256, (1, 6))
    out = dense_model.generate(x, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape == (1, 11)
    ids = x
    for _ in range(5):  # greedy by full recompute
        ids = torch.cat([ids, dense_model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


def test_model_args_presets_and_overrides():
    parser = add_model_args(argparse.ArgumentParser())
    cfg = config_from_args(parser.parse_args(["--preset", "minimind-v1-moe", "--max_seq_len", "256"]))
    assert cfg.use_moe and cfg.dim == 512 and cfg.max_seq_len == 256
    cfg = config_from_args(parser.parse_args(["--dim", "768", "--n_layers", "16"]))
    assert (cfg.dim, cfg.n_layers, cfg.use_moe, cfg.file_suffix) == (768, 16, False, "768")
    assert LMConfig(use_moe=True).file_suffix == "512_moe"


def test_invalid_head_config_is_rejected():
    with pytest.raises(ValueError, match="n_kv_heads"):
        LMConfig(dim=64, n_heads=4, n_kv_heads=3)


def test_flops_per_token_counts_active_params():
    dense = MiniMindForCausalLM(LMConfig())
    # 6 x matmul weights (the tied embedding counted once, as the output projection) + attention scores
    n = sum(p.numel() for p in dense.parameters() if p.dim() == 2)
    assert dense.flops_per_token(512) == 6 * n + 12 * 8 * 512 * 512
    moe = MiniMindForCausalLM(LMConfig(use_moe=True))
    # only 2 of the 4 routed experts run per token
    idle = 8 * 2 * 3 * 512 * 1408
    n_moe = sum(p.numel() for p in moe.parameters() if p.dim() == 2) - idle
    assert moe.flops_per_token(512) == 6 * n_moe + 12 * 8 * 512 * 512
