"""Training forwards trace as exactly one graph, and document masks compute what separate forwards compute.

Before issue 10, `torch._dynamo.explain` on a 2-layer training forward found 3 breaks with a padding mask
(`bool(attention_mask.all())`), 9 for MoE (`bincount(...).tolist()` and data-dependent shapes, per layer) and 11 for
MoE with a padding mask. Every case below must now be one graph with no break.
"""

import pytest
import torch
from conftest import tiny_model

from model import model as model_module

CASES = ["plain", "padding-mask", "document-mask"]


def batch_for(case: str, B: int = 2, T: int = 40) -> dict:
    torch.manual_seed(0)
    ids = torch.randint(3, 256, (B, T))
    batch = {"input_ids": ids, "labels": ids.clone()}
    if case == "padding-mask":
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, : T // 3] = 0  # left padding, as batched generation and eval use
        batch["attention_mask"] = mask
    elif case == "document-mask":
        docs = torch.zeros(B, T, dtype=torch.long)
        docs[:, T // 2:] = 1
        docs[0, -5:] = -1  # trailing padding of a packed window
        batch["document_ids"] = docs
    return batch


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("T", [8, 40], ids=["small-batch", "grouped-gemm"])
def test_training_forward_is_one_graph(case, use_moe, T):
    torch._dynamo.reset()
    model = tiny_model(use_moe=use_moe, max_seq_len=64).train()
    batch = batch_for(case, T=T)
    explained = torch._dynamo.explain(lambda **b: model(**b, num_items_in_batch=torch.tensor(50)).loss)(**batch)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_document_mask_equals_separate_forwards(use_moe):
    model = tiny_model(use_moe=use_moe, max_seq_len=64)
    lengths = [9, 14, 6]
    docs_ids = [torch.randint(3, 256, (n,)) for n in lengths]
    window = torch.cat([*docs_ids, torch.zeros(3, dtype=torch.long)])[None]
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((3,), -1)])[None]
    with torch.no_grad():
        packed = model(window, document_ids=doc).logits[0]
        start = 0
        for ids in docs_ids:
            alone = model(ids[None]).logits[0]
            torch.testing.assert_close(packed[start:start + len(ids)], alone, rtol=1e-4, atol=1e-4)
            start += len(ids)


def test_positions_restart_at_each_document():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [5, 5, 5, 5, 5, 5, 5, 5]])
    assert model_module._document_positions(doc).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_block_mask_matches_the_dense_mask(monkeypatch):
    """The CUDA + compile path builds a flex_attention BlockMask; on CPU its eager reference runs the same math."""
    model = tiny_model(max_seq_len=64)
    batch = batch_for("document-mask", T=32)
    batch.pop("labels")
    with torch.no_grad():
        dense = model(**batch).logits
        monkeypatch.setattr(model_module, "use_flex_attention", lambda device, dropout: True)
        flex = model(**batch).logits
    torch.testing.assert_close(flex, dense, rtol=1e-4, atol=1e-4)


def test_padding_mask_equals_the_unpadded_forward():
    model = tiny_model(max_seq_len=64)
    ids = torch.randint(3, 256, (1, 12))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 4:], model(ids).logits,
                                   rtol=1e-5, atol=1e-5)
