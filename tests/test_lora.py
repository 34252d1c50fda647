"""LoRA: only adapter weights train, the frozen base never changes, and merging gives the same model."""

import pytest
import torch
from conftest import tiny_model

from model.lora import adapter_state_dict, add_lora, apply_adapter, merged_state_dict, save_adapter, trainable_names
from model.model import MiniMindForCausalLM


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_a_few_steps(model, steps=5):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    ids = torch.randint(3, 256, (4, 24))
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("use_moe", [False, True])
def test_only_adapter_parameters_change_and_the_base_is_untouched(use_moe):
    base = tiny_model(use_moe=use_moe)
    before = snapshot(base)
    model = add_lora(base, rank=4, alpha=8)
    names = trainable_names(model)
    assert names and all("lora_" in n for n in names)
    assert not any("tok_embeddings" in n or ".output." in n for n in names)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
    assert adapted == {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    train_a_few_steps(model)
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])}
    # every attention adapter trains (MoE experts that got no token this time may legitimately not)
    assert {n for n in names if ".attention." in n} <= changed
    # the frozen weights are bit-for-bit what they were (peft renames them base_layer.weight)
    base_now = merged_state_dict_without_merging(model)
    assert base_now.keys() == before.keys()
    for k in before:
        assert torch.equal(base_now[k], before[k]), k


def merged_state_dict_without_merging(peft_model):
    """The base weights inside a peft model, under v1 names."""
    out = {}
    for k, v in peft_model.state_dict().items():
        if "lora_" in k:
            continue
        k = k.removeprefix("base_model.model.").replace(".base_layer.", ".")
        out[k] = v
    return out


def test_merged_model_equals_base_plus_adapter(tmp_path):
    base = tiny_model()
    model = train_a_few_steps(add_lora(base, rank=4, alpha=8))
    ids = torch.randint(3, 256, (2, 20))
    with torch.no_grad():
        want = model(input_ids=ids).logits

    merged = merged_state_dict(model)
    assert set(merged) == set(tiny_model().state_dict())  # exactly v1's keys: loads strictly anywhere
    plain = MiniMindForCausalLM(base.config)
    plain.load_state_dict(merged, strict=True)
    with torch.no_grad():
        got = plain.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # merging copied the model: the live peft model still has its adapters and the same outputs
    assert any("lora_" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want)

    # the peft-format adapter round-trips onto a fresh copy of the base
    save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert set(adapter_state_dict(model)) and all("lora_" in k for k in adapter_state_dict(model))
    reloaded = apply_adapter(tiny_model(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


def test_embedding_and_output_head_are_refused():
    for target in ("output", "tok_embeddings"):
        with pytest.raises(ValueError, match="not allowed"):
            add_lora(tiny_model(), targets=["wq", target])
