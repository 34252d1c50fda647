"""Sync-free MoE: the grouped GEMM op, the three dispatch paths, and a balance loss over real tokens only.

The contract (issue 10): no `.item()`, `.tolist()` or data-dependent Python control flow in a training forward or
backward, every expert gets a gradient, nothing is dropped, and logits/gradients equal the previous host-side loop
over experts within float tolerance (`MoEFeedForward._chosen_experts` is that loop, kept for CPU inference).
"""

import pytest
import torch
from conftest import tiny_config, tiny_model
from torch.overrides import TorchFunctionMode

from model import model as model_module
from model.grouped_mm import grouped_mm
from model.model import MiniMindForCausalLM, MoEFeedForward


def loop_grouped_mm(x, w, offs):
    ends = offs.tolist()
    return torch.cat([x[s:e] @ w[g] for g, (s, e) in enumerate(zip([0, *ends[:-1]], ends))])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [16, 6], ids=["kernel", "unaligned-loop"])
def test_grouped_mm_matches_a_loop_forward_and_backward_with_empty_groups(dtype, width):
    torch.manual_seed(0)
    x = torch.randn(11, 8, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 8, width, dtype=dtype, requires_grad=True)
    offs = torch.tensor([3, 3, 9, 11], dtype=torch.int32)  # expert 1 has no rows
    y = grouped_mm(x, w, offs)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = loop_grouped_mm(x2, w2, offs)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, ref, **tol)
    y.sum().backward()  # a stride-0 upstream gradient, which the kernel itself refuses
    ref.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, **tol)
    torch.testing.assert_close(w.grad, w2.grad, **tol)
    assert w.grad[1].abs().sum() == 0  # the empty group's weights get a zero gradient, not none


def test_grouped_mm_traces_as_one_graph_in_float32():
    """torch._grouped_mm's own shape rule accepts bfloat16 only; the custom op traces at any dtype."""
    x, w, offs = torch.randn(10, 8), torch.randn(3, 8, 4), torch.tensor([2, 7, 10], dtype=torch.int32)
    explained = torch._dynamo.explain(lambda a, b, o: grouped_mm(a, b, o) * 2)(x, w, offs)
    assert explained.graph_break_count == 0


def moe_layer(seed=0, **overrides):
    torch.manual_seed(seed)
    return MoEFeedForward(tiny_config(use_moe=True, **overrides))


@pytest.mark.parametrize("path", ["_grouped", "_every_expert"])
def test_sync_free_paths_equal_the_loop_over_busy_experts(path):
    layer = moe_layer()
    x = torch.randn(3, 20, 64)
    flat = x.reshape(-1, 64)
    idx, weight, _ = layer.gate(x)
    ref_in, new_in = flat.clone().requires_grad_(), flat.clone().requires_grad_()
    ref = layer._chosen_experts(ref_in, idx, weight)
    out = getattr(layer, path)(new_in, idx, weight)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * g).sum(), [ref_in, *layer.experts.parameters()], allow_unused=True)
    new_grads = torch.autograd.grad((out * g).sum(), [new_in, *layer.experts.parameters()])
    for a, b in zip(new_grads, ref_grads):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, rtol=1e-4, atol=1e-6)
    # every expert gets a gradient tensor (DDP waits for all), even one no token chose
    assert all(grad is not None for grad in new_grads)


class NoHostReads(TorchFunctionMode):
    """Fails on every way a tensor's value can reach Python."""

    FORBIDDEN = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
                 torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy, torch.nonzero}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FORBIDDEN:
            raise AssertionError(f"host read of a tensor: {getattr(func, '__name__', func)}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("tokens", [16, 96], ids=["every-expert", "grouped"])
def test_training_step_reads_nothing_on_the_host(tokens):
    model = tiny_model(use_moe=True, max_seq_len=128).train()
    ids = torch.randint(3, 256, (2, tokens // 2))
    docs = torch.zeros_like(ids)
    docs[:, ids.shape[1] // 2:] = 1
    docs[1, -2:] = -1
    with NoHostReads():
        out = model(ids, labels=ids, document_ids=docs, num_items_in_batch=torch.tensor(10))
        out.loss.backward()
    assert out.aux_loss is not None and model.layers[0].feed_forward.gate.weight.grad is not None


@pytest.mark.parametrize("seq_aux", [True, False])
def test_balance_loss_counts_real_tokens_only(seq_aux):
    """Right-padding a batch with junk, marked as padding, leaves the balance loss unchanged."""
    model = tiny_model(use_moe=True, seq_aux=seq_aux, max_seq_len=64).train()
    ids = torch.randint(3, 256, (2, 12))
    plain = model(ids, labels=ids).aux_loss
    padded = torch.cat([ids, torch.randint(3, 256, (2, 5))], dim=1)
    real = torch.zeros_like(padded)
    real[:, :12] = 1
    via_token_mask = model(padded, labels=padded, token_mask=real).aux_loss
    via_document_ids = model(padded, labels=padded, document_ids=real - 1 + real).aux_loss  # 0 real, -1 padding
    torch.testing.assert_close(via_token_mask, plain, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(via_document_ids, plain, rtol=1e-5, atol=1e-7)
    unmasked = model(padded, labels=padded).aux_loss
    assert not torch.allclose(unmasked, plain)  # the junk would have moved it


def test_seq_aux_averages_rows_of_different_real_lengths():
    model = tiny_model(use_moe=True, seq_aux=True, max_seq_len=64).train()
    rows = [torch.randint(3, 256, (1, n)) for n in (12, 7)]
    alone = torch.stack([model(r, labels=r).aux_loss for r in rows]).mean()
    batch = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, :r.shape[1]], mask[i, :r.shape[1]] = r[0], 1
    torch.testing.assert_close(model(batch, labels=batch, token_mask=mask).aux_loss, alone, rtol=1e-5, atol=1e-7)


def test_cpu_inference_keeps_the_exact_loop_and_training_takes_the_sync_free_paths(monkeypatch):
    calls = []
    for name in ("_chosen_experts", "_every_expert", "_grouped"):
        original = getattr(MoEFeedForward, name)
        monkeypatch.setattr(MoEFeedForward, name,
                            lambda self, *a, _n=name, _o=original: calls.append(_n) or _o(self, *a))
    model = tiny_model(use_moe=True, n_layers=1, max_seq_len=128)
    with torch.no_grad():
        model(torch.randint(3, 256, (1, 50)))
    model.train()
    model(torch.randint(3, 256, (1, 50)))
    model(torch.randint(3, 256, (1, model_module.DENSE_MOE_TOKENS)))
    assert calls == ["_chosen_experts", "_grouped", "_every_expert"]


def test_lora_wrapped_experts_run_as_modules():
    """peft replaces an expert's nn.Linear with a LoRA layer; the grouped GEMM would bypass the adapter."""
    from model.lora import add_lora

    model = tiny_model(use_moe=True, max_seq_len=128)
    peft_model = add_lora(model, rank=4)
    for module in peft_model.modules():  # make the adapters matter (B starts at zero)
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.5)
    ids = torch.randint(3, 256, (2, 40))
    peft_model.train()
    trained = peft_model(input_ids=ids).logits
    with torch.no_grad():
        peft_model.eval()
        inference = peft_model(input_ids=ids).logits  # the exact loop, through the adapted modules
    torch.testing.assert_close(trained.detach(), inference, rtol=1e-4, atol=1e-5)


def test_v1_preset_shapes_route_through_grouped_gemm():
    model = MiniMindForCausalLM(tiny_config(use_moe=True, n_routed_experts=4, num_experts_per_tok=2,
                                            n_shared_experts=1)).train()
    ids = torch.randint(3, 256, (4, 32))
    out = model(ids, labels=ids)
    out.loss.backward()
    for expert in model.layers[0].feed_forward.experts:
        assert expert.w1.weight.grad is not None
