"""Checkpoint helpers: atomic writes, wrapper prefixes, clear errors."""

import pytest
import torch
from conftest import tiny_config, tiny_model

from model.checkpoint import CheckpointError, atomic_save, load_model


def test_atomic_save_leaves_only_the_final_file(tmp_path):
    path = atomic_save({"w": torch.ones(2)}, tmp_path / "sub" / "a.pth")
    assert [p.name for p in path.parent.iterdir()] == ["a.pth"]
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_atomic_save_failure_keeps_the_old_file(tmp_path):
    path = atomic_save({"w": torch.zeros(1)}, tmp_path / "a.pth")
    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"bad": Unpicklable()}, path)  # fails halfway through writing
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(1))
    assert [p.name for p in tmp_path.iterdir()] == ["a.pth"]


def test_load_model_strips_ddp_and_compile_prefixes(tmp_path):
    model = tiny_model()
    wrapped = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    atomic_save(wrapped, tmp_path / "w.pth")
    loaded = load_model(tmp_path / "w.pth", tiny_config(), device="cpu")
    x = torch.randint(0, 256, (1, 6))
    torch.testing.assert_close(loaded(x).logits, model(x).logits)
    assert not loaded.training


def test_clear_errors_for_missing_file_and_wrong_shape(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_model(tmp_path / "nope.pth", tiny_config())
    atomic_save(tiny_model().state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="dim=64 n_layers=2 .* does not match the requested dim=128"):
        load_model(tmp_path / "w.pth", tiny_config(dim=128))


def test_dtype_defaults_per_device(monkeypatch):
    from model.checkpoint import default_dtype_name, resolve_dtype

    assert resolve_dtype(None, "cpu") == torch.float32  # half-precision matmuls on a CPU are slower
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16  # an explicit choice always wins
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert default_dtype_name("cuda:1") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert default_dtype_name("cuda") == "float16"  # older GPUs: fp16 (training scales its loss)
    assert resolve_dtype(None, "cuda", fp16_fallback=False) == torch.float32  # inference without fp16 on them
