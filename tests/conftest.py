"""Shared fixtures: tiny configs (dim 64, 2 layers) that run in milliseconds on a CPU."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.LMConfig import LMConfig  # noqa: E402
from model.model import MiniMindForCausalLM  # noqa: E402

TOKENIZER_DIR = ROOT / "model" / "minimind_tokenizer"


def tiny_config(**overrides) -> LMConfig:
    fields = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=32)
    fields.update(overrides)
    return LMConfig(**fields)


def tiny_model(seed: int = 0, spread: float = 0.3, **overrides) -> MiniMindForCausalLM:
    """A tiny model in eval mode whose weights are spread wide enough that greedy decoding does not just repeat
    the last token (as a freshly initialised tied-embedding model does)."""
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(tiny_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, spread if "tok_embeddings" not in name else 1.0)
    return model.eval()


@pytest.fixture
def dense_model():
    return tiny_model()


@pytest.fixture
def moe_model():
    return tiny_model(use_moe=True)


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    """A tiny chat checkpoint on disk for the API server tests (see server_helpers.tiny_chat_model)."""
    from server_helpers import write_chat_ckpt

    return write_chat_ckpt(tmp_path_factory.mktemp("ckpt") / "tiny_sft.pth")


@pytest.fixture
def corpus(tmp_path):
    """A small pretraining token file of 40 random documents, as windows of 16 (the training-loop tests)."""
    from pipeline_helpers import write_token_file

    from model.dataset import PretrainDataset

    g = torch.Generator().manual_seed(0)
    docs = [[1, *torch.randint(3, 256, (int(n),), generator=g).tolist(), 2]
            for n in torch.randint(5, 60, (40,), generator=g)]
    return PretrainDataset(write_token_file(tmp_path / "corpus.bin", docs), seq_len=16)
