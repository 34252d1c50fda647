"""LoRA for MiniMind with peft: wrap, save, merge.

Adapters go on the attention and feed-forward projections (wq wk wv wo, w1 w2 w3; in MoE layers every expert's
and the shared expert's w1/w2/w3). Never on `tok_embeddings` or `output`: the two are one tied matrix, so an adapter
on the head would also change the embedding (v1's mistake), and the vocabulary does not need adapting.
"""

from __future__ import annotations

import copy
import os

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

from .checkpoint import clean_state_dict
from .errors import UsageError

DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
FORBIDDEN_TARGETS = ("tok_embeddings", "output")


def add_lora_args(parser, with_switch: bool = False) -> None:
    """The LoRA flags every stage that trains adapters shares (with_switch: also --use_lora, for stages where
    adapters are an option)."""
    if with_switch:
        parser.add_argument("--use_lora", action="store_true", help="train LoRA adapters instead of all weights")
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--lora_alpha", type=float, default=16, help="scale = alpha / rank")
    parser.add_argument("--lora_dropout", type=float, default=0.0)
    parser.add_argument("--lora_targets", nargs="+", default=list(DEFAULT_TARGETS),
                        help="module names to adapt (never tok_embeddings/output)")


def lora_config(rank: int = 8, alpha: float = 16, dropout: float = 0.0, targets=DEFAULT_TARGETS) -> LoraConfig:
    targets = list(targets)
    bad = [t for t in targets if t in FORBIDDEN_TARGETS]
    if bad:
        raise ValueError(f"LoRA targets {bad} are not allowed: the embedding and the tied output head stay frozen")
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                      task_type="CAUSAL_LM")


def add_lora(model, rank: int = 8, alpha: float = 16, dropout: float = 0.0, targets=DEFAULT_TARGETS) -> PeftModel:
    """Freeze `model` and attach fresh adapters (B = 0, so the wrapped model starts out computing what `model` did)."""
    return get_peft_model(model, lora_config(rank, alpha, dropout, targets))


def adapter_state_dict(peft_model) -> dict:
    """The adapter weights alone, in peft's naming (what `save_pretrained` stores)."""
    return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(peft_model).items()}


def merged_state_dict(peft_model) -> dict:
    """A plain v1 state dict with the adapters folded into the base weights; the peft model itself is unchanged."""
    merged = copy.deepcopy(peft_model).merge_and_unload()
    return clean_state_dict({k: v.detach().cpu() for k, v in merged.state_dict().items()})


def save_adapter(peft_model, path: str | os.PathLike) -> None:
    """peft's format (adapter_config.json + adapter_model.safetensors), loadable with `apply_adapter`."""
    peft_model.save_pretrained(str(path))


def apply_adapter(model, adapter_dir: str | os.PathLike, merge: bool = True):
    """Load a saved adapter onto `model`; merged into the weights (a plain model again) unless merge=False."""
    if not os.path.exists(os.path.join(adapter_dir, "adapter_config.json")):
        raise UsageError(f"no peft adapter in {adapter_dir} (expected adapter_config.json from 4-lora_sft.py)")
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except Exception as err:  # peft raises many kinds (JSON, safetensors, size mismatch); all mean "bad folder"
        why = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise UsageError(f"{adapter_dir}: the LoRA adapter does not load onto this model ({why}); pass the adapter "
                         f"trained on this checkpoint, or re-run 4-lora_sft.py") from None
    return peft_model.merge_and_unload() if merge else peft_model


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]
