"""Loading and saving: v1-style `.pth` state dicts, the bundled tokenizer, atomic writes.

Every script that reads a checkpoint goes through `load_model`, so they all accept the same files: plain v1
state dicts, and ones saved from DDP (`module.`) or `torch.compile` (`_orig_mod.`) wrappers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .LMConfig import LMConfig
from .model import MiniMindForCausalLM

PACKAGE_DIR = Path(__file__).resolve().parent
ROOT_DIR = PACKAGE_DIR.parent
TOKENIZER_DIR = PACKAGE_DIR / "minimind_tokenizer"
OUT_DIR = ROOT_DIR / "out"


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def default_dtype_name(device, fp16_fallback: bool = True) -> str:
    """The precision a device runs best: bfloat16 on GPUs that support it; on older GPUs float16 (float32 when
    `fp16_fallback` is False); float32 elsewhere (half-precision matmuls on a CPU are slower, not faster)."""
    if str(device).startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return "bfloat16"
        return "float16" if fp16_fallback else "float32"
    return "float32"


def resolve_dtype(name: str | None, device, fp16_fallback: bool = True) -> torch.dtype:
    """A --dtype flag's value as a torch dtype; None or "auto" picks `default_dtype_name` for the device."""
    if name in (None, "auto"):
        name = default_dtype_name(device, fp16_fallback)
    return DTYPES[name]


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_tokenizer(path: str | os.PathLike | None = None):
    from transformers import AutoTokenizer

    path = Path(path) if path else TOKENIZER_DIR
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer at {path} (expected tokenizer.json; run train_tokenizer.py)")
    return AutoTokenizer.from_pretrained(str(path))


def clean_state_dict(state: dict) -> dict:
    """Strip wrapper prefixes (DDP's `module.`, torch.compile's `_orig_mod.`) so keys are v1's."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_state_dict(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a resume file: its weights live under "model"
    return clean_state_dict(state)


def load_model(ckpt: str | os.PathLike | None, config: LMConfig, device: str | None = None,
               dtype: torch.dtype | None = None) -> MiniMindForCausalLM:
    """A model in eval mode with weights from `ckpt` (strict: every v1 key must match), or random if ckpt is None."""
    model = MiniMindForCausalLM(config)
    if ckpt is not None:
        state = load_state_dict(ckpt)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise RuntimeError(f"{ckpt} does not match the model shape {config.file_suffix} "
                               f"(dim={config.dim}, n_layers={config.n_layers}, use_moe={config.use_moe}); "
                               f"pass the right --dim/--n_layers/--use_moe or --preset.\n{err}") from None
    model.to(device or default_device())
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save to a temp file in the same folder, then rename: a killed run never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A plain file name (not mkstemp) so the file gets the usual umask permissions rather than 0600.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
