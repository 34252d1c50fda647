"""transformers' own `model.generate()` (GenerationMixin) on our model: whatever cache name and cache class the
installed transformers uses, its decoding must equal our engine's."""

import pytest
import torch
from conftest import tiny_model

from model.generate import generate
from model.model import KVCache

NO_EOS = -1
PROMPTS = [[1, 5, 9, 200, 31, 7], [1, 44, 3000 % 256, 12]]
N_NEW = 8


def peaked_model(use_moe=False):
    """A model whose next-token distribution is nearly one-hot (the final norm scales the logits up), so the
    most likely sequence is the greedy one and beam search must find exactly it."""
    model = tiny_model(use_moe=use_moe)
    with torch.no_grad():
        model.norm.weight.mul_(30.0)
    return model


def hf_new_tokens(model, prompt, **kwargs):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=N_NEW, eos_token_id=None, pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


@pytest.fixture(params=[False, True], ids=["dense", "moe"])
def model_and_expected(request):
    model = peaked_model(request.param)
    with torch.inference_mode():
        expected = generate(model, PROMPTS, temperature=0, max_new_tokens=N_NEW, eos_token_id=NO_EOS)
    return model, expected


@pytest.mark.parametrize("kwargs", [
    dict(do_sample=False),
    dict(do_sample=False, use_cache=False),
    dict(do_sample=True, top_k=1),
    dict(do_sample=False, num_beams=2),
    dict(do_sample=False, num_beams=2, use_cache=False),
], ids=["greedy", "no-cache", "sample-top1", "beams2", "beams2-no-cache"])
@torch.inference_mode()
def test_generate_equals_engine(model_and_expected, kwargs):
    model, expected = model_and_expected
    for prompt, want in zip(PROMPTS, expected):
        assert hf_new_tokens(model, prompt, **kwargs) == want


@torch.inference_mode()
def test_left_padded_batch_equals_engine(model_and_expected):
    model, expected = model_and_expected
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    assert out[:, width:].tolist() == expected


@torch.inference_mode()
def test_beam_search_with_cache_equals_without_on_an_unpeaked_model():
    """On an ordinary model beams diverge from greedy; reordering the cache between steps must still give what
    recomputing every step gives."""
    model = tiny_model()
    for prompt in PROMPTS:
        cached = hf_new_tokens(model, prompt, num_beams=3, do_sample=False)
        assert cached == hf_new_tokens(model, prompt, num_beams=3, do_sample=False, use_cache=False)


@torch.inference_mode()
def test_kv_cache_reorder_keeps_the_chosen_rows():
    cache = KVCache(n_layers=1)
    k = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 4).contiguous()
    cache.update(k, k + 10, layer_idx=0)
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    keys, values = cache.update(k[:, :, :1], k[:, :, :1], layer_idx=0)
    assert keys[:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0] and values[:, 0, 0, 0].tolist() == [12.0, 12.0, 10.0]
    assert keys.shape[2] == 3
