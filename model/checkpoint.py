"""Loading and saving: v1-style `.pth` state dicts, the bundled tokenizer, atomic writes.

Every script that reads a checkpoint goes through `load_model`, so they all accept the same files: plain v1
state dicts, and ones saved from DDP (`module.`) or `torch.compile` (`_orig_mod.`) wrappers.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UsageError
from .LMConfig import LMConfig
from .minimind3_format import read_minimind3
from .model import MiniMindForCausalLM

PACKAGE_DIR = Path(__file__).resolve().parent
ROOT_DIR = PACKAGE_DIR.parent
TOKENIZER_DIR = PACKAGE_DIR / "minimind_tokenizer"
TOKENIZER3_DIR = PACKAGE_DIR / "minimind3_tokenizer"  # the MiniMind-3 family's (ChatML, thinking, tool calls)
OUT_DIR = ROOT_DIR / "out"


class CheckpointError(UsageError):
    """A checkpoint that cannot be used; the message names the path, what is wrong and what to do."""


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


def family_tokenizer_dir(config: LMConfig) -> Path:
    """The bundled tokenizer of the config's family: MiniMind-3's for QK-norm + rotate-half models, else v1's."""
    return TOKENIZER3_DIR if config.qk_norm and config.rope_layout == "half" else TOKENIZER_DIR


def load_tokenizer(path: str | os.PathLike | None = None, config: LMConfig | None = None):
    """The tokenizer at `path`; by default the bundled one of `config`'s family (v1's without a config)."""
    from transformers import AutoTokenizer

    path = Path(path) if path else (family_tokenizer_dir(config) if config is not None else TOKENIZER_DIR)
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer at {path} (expected tokenizer.json; run train_tokenizer.py)")
    return AutoTokenizer.from_pretrained(str(path))


def add_tokenizer_arg(parser) -> None:
    """--tokenizer, as every stage script takes it: the model's tokenizer folder, which the data must be made with."""
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder: the model's, which data_process.py made its data with (default: the "
                             "bundled one of the model's family)")


def vocab_fingerprint(tokenizer) -> str:
    """sha256 of a tokenizer's vocabulary (token -> id, added tokens included): the same for a transformers tokenizer
    and a `tokenizers.Tokenizer` of the same tokenizer.json, different for a retrained one. data_process.py records
    it in each token file, so a run can tell data made with another tokenizer from its own."""
    import hashlib

    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()


def check_data_tokenizer(header: dict, data_path, tokenizer) -> None:
    """Refuse a token file made with another tokenizer than this run's: its ids would mean other text (and its bits
    per character would be wrong). Files from before the fingerprint was recorded pass unchecked."""
    made_with = (header.get("meta") or {}).get("tokenizer") or {}
    if not made_with.get("vocab_sha256") or made_with["vocab_sha256"] == vocab_fingerprint(tokenizer):
        return
    raise UsageError(f"{data_path} was tokenized with {made_with.get('path', 'another tokenizer')}, not with this "
                     f"run's {tokenizer.name_or_path}: pass --tokenizer {made_with.get('path', 'DIR')} if that is "
                     f"the model's tokenizer, else re-run data_process.py with --tokenizer {tokenizer.name_or_path}")


def clean_state_dict(state: dict) -> dict:
    """Strip wrapper prefixes (DDP's `module.`, torch.compile's `_orig_mod.`) so keys are v1's."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------------------
# reading a checkpoint: clear one-line errors for every kind of bad file


def _refuse_folder(path: Path):
    if (path / "adapter_config.json").exists():
        raise CheckpointError(f"{path} is a peft LoRA adapter folder, not model weights; pass the base model's .pth "
                              f"as the checkpoint and this folder as --lora_dir")
    if (path / "config.json").exists():
        raise CheckpointError(f"{path} is an exported transformers folder; load it with "
                              f"AutoModelForCausalLM.from_pretrained, or pass the .pth it was exported from")
    raise CheckpointError(f"{path} is a folder, not a checkpoint file; pass a .pth file such as out/full_sft_512.pth")


def torch_load_checked(path: Path):
    """torch.load(weights_only=True) with one-line errors for empty, truncated, corrupt and safetensors files."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes), probably from an interrupted write; re-run the stage that "
                              f"writes it")
    if head[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
        raise CheckpointError(f"{path} is a safetensors file (an exported folder's weights), not a .pth state dict; "
                              f"pass the .pth it was exported from, or load its folder with transformers")
    if not head.startswith(b"PK") and head[:1] != b"\x80":  # neither torch's zip format nor a legacy pickle
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (truncated or corrupt, or another format); pass a "
                              f".pth written by this project or MiniMind v1")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds Python objects besides tensors, so it is not loaded (weights_only "
                              f"refuses to run pickled code); re-save it as a plain state dict") from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, IndexError) as err:
        why = str(err).splitlines()[0][:80] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} is truncated or corrupt ({why}); re-run the stage that writes it, or restore "
                              f"a good copy") from None


def load_state_dict(path: str | os.PathLike) -> dict:
    """The v1-keyed weights in a .pth file, or a CheckpointError that says what the file is instead."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        _refuse_folder(path)
    state = torch_load_checked(path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "step" in state:
        weights = path.name.replace(".resume.pt", ".pth")
        raise CheckpointError(f"{path} is a resume file (training state for --resume), not model weights; pass the "
                              f"weights saved beside it, {path.with_name(weights)}")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors (it holds a {type(state).__name__}); pass a "
                              f".pth written by this project or MiniMind v1")
    state = clean_state_dict(state)
    if "tok_embeddings.weight" not in state:
        if any("lora_" in k for k in state):
            raise CheckpointError(f"{path} holds LoRA adapter weights only (4-lora_sft.py without --merge); pass the "
                                  f"base .pth with --lora_dir out/lora_sft_<dim>, or re-run 4-lora_sft.py --merge")
        raise CheckpointError(f"{path} has no MiniMind weights (no tok_embeddings.weight among its {len(state)} "
                              f"tensors); pass a checkpoint written by this project or MiniMind v1")
    return state


# ----------------------------------------------------------------------------------------------------------------
# what shape a checkpoint is: from the JSON written beside it, else from the weights themselves

# Fields that describe the architecture; a flag that contradicts the file on one of these is an error.
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "use_moe", "n_routed_experts",
                "n_shared_experts", "num_experts_per_tok")
# Everything a config JSON beside a .pth records (the shape plus what changes the math without changing tensors).
CONFIG_FIELDS = SHAPE_FIELDS + ("multiple_of", "norm_eps", "max_seq_len", "scoring_func", "aux_loss_alpha", "seq_aux",
                                "norm_topk_prob", "rope_theta", "rope_scaling_factor", "head_dim", "qk_norm",
                                "rope_layout", "yarn", "max_position_embeddings", "moe_hidden_dim")


def config_path(weights_path: str | os.PathLike) -> Path:
    """out/full_sft_512.pth -> out/full_sft_512.json."""
    return Path(weights_path).with_suffix(".json")


def shape_from_state_dict(state: dict) -> dict:
    """The config fields the tensors themselves fix. Head counts are not among them: a v1 file stores only the
    width of wk, n_kv_heads * head_dim (see `heads_fit`)."""
    vocab_size, dim = state["tok_embeddings.weight"].shape
    layers = {int(k.split(".")[1]) for k in state if k.startswith("layers.")}
    shape = {"dim": dim, "vocab_size": vocab_size, "n_layers": max(layers) + 1 if layers else 0}
    shape["use_moe"] = "layers.0.feed_forward.gate.weight" in state
    if shape["use_moe"]:
        shape["n_routed_experts"] = state["layers.0.feed_forward.gate.weight"].shape[0]
        shape["n_shared_experts"] = "layers.0.feed_forward.shared_experts.w1.weight" in state
        w1 = state.get("layers.0.feed_forward.experts.0.w1.weight")
    else:
        w1 = state.get("layers.0.feed_forward.w1.weight")
    if w1 is not None and w1.shape[0] != LMConfig(dim=dim, n_heads=1, n_kv_heads=1).ffn_hidden_dim:
        shape["hidden_dim"] = w1.shape[0]
    q_norm = state.get("layers.0.attention.q_norm.weight")
    if q_norm is not None:  # the MiniMind-3 family: head_dim is stored, so the head counts are facts too
        head_dim = q_norm.shape[0]
        shape.update(qk_norm=True, head_dim=head_dim, n_heads=state["layers.0.attention.wq.weight"].shape[0] // head_dim,
                     n_kv_heads=state["layers.0.attention.wk.weight"].shape[0] // head_dim)
    return shape


def _kv_width(state: dict) -> int | None:
    wk = state.get("layers.0.attention.wk.weight")
    return None if wk is None else wk.shape[0]


def heads_fit(fields: dict, kv_width: int | None) -> bool:
    """Whether n_heads / n_kv_heads give the wk width the file has (n_kv_heads * dim / n_heads)."""
    if kv_width is None or "n_heads" not in fields or "n_kv_heads" not in fields:
        return True
    if fields.get("head_dim"):
        return fields["n_kv_heads"] * fields["head_dim"] == kv_width
    return fields["dim"] % fields["n_heads"] == 0 and fields["n_kv_heads"] * fields["dim"] // fields["n_heads"] == kv_width


def default_heads(dim: int, kv_width: int | None) -> dict:
    """v1's 16 query heads (fewer when dim does not divide by 16), with the KV heads the wk width implies."""
    n_heads = next(h for h in (16, 8, 4, 2, 1) if dim % h == 0)
    if kv_width is None or (kv_width * n_heads) % dim:
        return {}
    return {"n_heads": n_heads, "n_kv_heads": kv_width * n_heads // dim}


def _describe(fields: dict) -> str:
    moe = f", MoE {fields.get('n_routed_experts', '?')} experts" if fields.get("use_moe") else ""
    heads = f" heads={fields['n_heads']}/{fields['n_kv_heads']}" if "n_heads" in fields and "n_kv_heads" in fields else ""
    return f"dim={fields.get('dim')} n_layers={fields.get('n_layers')}{heads} vocab={fields.get('vocab_size')}{moe}"


def read_config_json(path: Path) -> dict | None:
    """The fields of the JSON beside a .pth, or None when there is none."""
    side = config_path(path)
    if not side.exists():
        return None
    try:
        fields = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{side} (the config beside {path.name}) is not valid JSON ({err}); delete it to infer "
                              f"the shape from the weights") from None
    if not isinstance(fields, dict):
        raise CheckpointError(f"{side} is not a JSON object; delete it to infer the shape from the weights")
    return {k: fields[k] for k in CONFIG_FIELDS if k in fields}


def _clashes(fields: dict, tensors: dict, kv_width: int | None) -> list[str]:
    wrong = [k for k, v in tensors.items() if k in fields and fields[k] != v]
    if not heads_fit({**tensors, **fields}, kv_width):
        wrong += [k for k in ("n_heads", "n_kv_heads") if k in fields]
    return wrong


def resolve_config(path: Path, state: dict, flags: dict | None = None) -> LMConfig:
    """A checkpoint's config: the JSON beside it (checked against the tensors) or, for a v1 file without one, what
    the tensors fix plus v1's defaults; then `flags` (model fields the user set explicitly) on top. A flag that
    contradicts the file's shape is an error that names both shapes."""
    tensors, kv_width = shape_from_state_dict(state), _kv_width(state)
    recorded = read_config_json(path)
    if recorded is not None and _clashes(recorded, tensors, kv_width):
        raise CheckpointError(f"{config_path(path)} says {_describe(recorded)} but the weights in {path.name} are "
                              f"{_describe({**recorded, **tensors})}; delete the JSON to infer the shape from the "
                              f"weights")
    if recorded is not None:
        fields = {**tensors, **recorded}
    elif tensors.get("qk_norm"):  # a MiniMind-3-family .pth without its JSON: that family's RoPE and norms
        fields = {"rope_layout": "half", "rope_theta": 1e6, "norm_eps": 1e-6, **tensors}
    else:
        fields = {**tensors, **default_heads(tensors["dim"], kv_width)}
    flags = dict(flags or {})
    clash = _clashes(flags, {k: fields[k] for k in SHAPE_FIELDS if k in fields and (recorded or k in tensors)},
                     kv_width)
    if clash:
        raise CheckpointError(f"{path} is a {_describe(fields)} model but the flags ask for "
                              f"{_describe({**fields, **flags})} ({', '.join(f'--{k}' for k in clash)}); drop the "
                              f"model flags (the shape is read from the file) or pass a matching checkpoint")
    return LMConfig(**{**fields, **flags})


@dataclass
class Checkpoint:
    path: Path
    config: LMConfig
    state: dict


def read_checkpoint(path: str | os.PathLike, flags: dict | None = None) -> Checkpoint:
    """Weights and config of a .pth, or of a MiniMind-3 folder (config.json + model.safetensors) or its
    safetensors file: every loader goes through here, so they all accept the same files."""
    path = Path(path)
    if path.exists() and (path.is_dir() or path.suffix == ".safetensors"):
        released = read_minimind3(path)
        if released is not None:
            config, state = released
            return Checkpoint(path, _apply_flags(path, config, flags), state)
    state = load_state_dict(path)
    return Checkpoint(path, resolve_config(path, state, flags), state)


def _apply_flags(path: Path, config: LMConfig, flags: dict | None) -> LMConfig:
    """A released folder's config with the user's model flags on top; a flag that contradicts its shape is refused."""
    fields = config.to_dict()
    clash = [k for k in SHAPE_FIELDS if k in (flags or {}) and flags[k] != fields.get(k)]
    if clash:
        raise CheckpointError(f"{path} is a {_describe(fields)} model but the flags ask for "
                              f"{_describe({**fields, **flags})} ({', '.join(f'--{k}' for k in clash)}); drop the "
                              f"model flags (the shape is read from the folder's config.json)")
    return LMConfig(**{**fields, **(flags or {})}) if flags else config


def find_checkpoint(out_dir: str | os.PathLike, stage: str, flags: dict | None = None) -> Path:
    """The default input of a stage: out/{stage}_{dim}{_moe}.pth for the shape the flags name, or, with no shape
    flags, the newest out/{stage}_*.pth (after the quick start that is out/pretrain_128.pth)."""
    out_dir = Path(out_dir)
    if flags and "dim" in flags:
        path = out_dir / f"{stage}_{LMConfig(**flags).file_suffix}.pth"
        if path.exists():
            return path
        raise CheckpointError(f"no {stage} checkpoint at {path}; train it first, or pass its path")
    found = [p for p in out_dir.glob(f"{stage}_*.pth") if re.fullmatch(rf"{stage}_\d+(_moe)?\.pth", p.name)]
    if not found:
        raise CheckpointError(f"no {stage} checkpoint in {out_dir} (looked for {stage}_<dim>.pth); train it first, "
                              f"or pass its path")
    return max(found, key=lambda p: p.stat().st_mtime)


def read_stage_input(path: str | os.PathLike | None, out_dir: str | os.PathLike, stage: str,
                     flags: dict | None = None) -> Checkpoint:
    """A stage's input checkpoint: `path` when given (--init / --ckpt), else `find_checkpoint`'s default."""
    return read_checkpoint(Path(path) if path else find_checkpoint(out_dir, stage, flags), flags)


def load_model(ckpt, config: LMConfig | None = None, device: str | None = None, dtype: torch.dtype | None = None,
               flags: dict | None = None) -> MiniMindForCausalLM:
    """A model in eval mode with weights from `ckpt` (a path or a `Checkpoint`; strict: every v1 key must match),
    or random weights when ckpt is None. Without `config` the shape comes from the checkpoint (and `flags`)."""
    if ckpt is None:
        model = MiniMindForCausalLM(config)
    else:
        ck = ckpt if isinstance(ckpt, Checkpoint) else read_checkpoint(ckpt, flags)
        config = config or ck.config
        model = MiniMindForCausalLM(config)
        try:
            model.load_state_dict(ck.state, strict=True)
        except RuntimeError:
            raise CheckpointError(f"{ck.path} is a {_describe(ck.config.to_dict())} model, which does not "
                                  f"match the requested {_describe(config.to_dict())}; drop the model flags or pass a "
                                  f"matching checkpoint") from None
    model.to(device or default_device())
    if dtype is not None:
        model.to(dtype)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# writing: atomic (temp file, fsync, rename), with the config JSON beside the weights


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb"):
    """Write to a temp file in the same folder, fsync it, then rename over `path`: a killed run never leaves a
    half-written file, and a failed write keeps the previous one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A plain file name (not mkstemp) so the file gets the usual umask permissions rather than 0600.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_weights(state: dict, path: str | os.PathLike, config: LMConfig | dict) -> Path:
    """A plain v1 state dict at `path` and its config at `config_path(path)`, so later stages need no model flags."""
    fields = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    path = atomic_save(state, path)
    with atomic_open(config_path(path), "w") as f:
        json.dump({k: fields[k] for k in CONFIG_FIELDS if k in fields}, f, indent=2)
        f.write("\n")
    return path


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save through `atomic_open`."""
    with atomic_open(path) as f:
        torch.save(obj, f)
    return Path(path)
