"""MiniMind-3's published folder layout (config.json + model.safetensors) <-> our LMConfig and state dict, in one place.

MiniMind-3 folders say `"model_type": "minimind"`, as ours do; they are told apart by their keys (`hidden_size`,
`num_hidden_layers`, ... instead of `dim`, `n_layers`). Their tensors use transformers' Qwen3-style names
(`model.layers.{i}.self_attn.q_proj.weight`, `...mlp.experts.{j}.gate_proj.weight`); ours keep v1's
(`layers.{i}.attention.wq.weight`, `...feed_forward.experts.{j}.w1.weight`). The math is the same module: RoPE is
rotate-half in both (no weight permutation), and the q/k norms map one to one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .LMConfig import MINIMIND3_YARN, LMConfig

CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")

# (ours, theirs) per layer, with {i} the layer; experts add {j}.
_LAYER_NAMES = [
    ("attention_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
    ("attention.wq", "self_attn.q_proj"), ("attention.wk", "self_attn.k_proj"),
    ("attention.wv", "self_attn.v_proj"), ("attention.wo", "self_attn.o_proj"),
    ("attention.q_norm", "self_attn.q_norm"), ("attention.k_norm", "self_attn.k_norm"),
    ("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w3", "mlp.up_proj"), ("feed_forward.w2", "mlp.down_proj"),
    ("feed_forward.gate", "mlp.gate"),
]
_EXPERT_NAMES = [("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")]
_TOP_NAMES = [("tok_embeddings.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]


def is_minimind3_config(fields: dict) -> bool:
    return all(k in fields for k in CONFIG_KEYS) and "dim" not in fields


def yarn_from_fields(fields: dict) -> dict | None:
    """The YaRN dict of a MiniMind-3 config.json: under `rope_scaling`, or `rope_parameters` (what a recent
    transformers writes); the defaults when `inference_rope_scaling` is on without one; None when off."""
    if fields.get("inference_rope_scaling") is False:
        return None
    for key in ("rope_scaling", "rope_parameters"):
        found = fields.get(key)
        if isinstance(found, dict) and (found.get("rope_type") or found.get("type")) == "yarn":
            yarn = dict(MINIMIND3_YARN)
            yarn.update({k: found[k] for k in MINIMIND3_YARN if found.get(k) is not None})
            return yarn
    return dict(MINIMIND3_YARN) if fields.get("inference_rope_scaling") else None


def config_from_minimind3(fields: dict) -> LMConfig:
    """LMConfig for a MiniMind-3 config.json (the shape and every field that changes the math)."""
    yarn = yarn_from_fields(fields)
    max_positions = int(fields.get("max_position_embeddings", 32768))
    trained = (yarn or MINIMIND3_YARN)["original_max_position_embeddings"]
    use_moe = bool(fields.get("use_moe", False))
    return LMConfig(
        dim=fields["hidden_size"], n_layers=fields["num_hidden_layers"], n_heads=fields["num_attention_heads"],
        n_kv_heads=fields["num_key_value_heads"], vocab_size=fields.get("vocab_size", 6400),
        head_dim=fields.get("head_dim"), hidden_dim=fields.get("intermediate_size"),
        moe_hidden_dim=fields.get("moe_intermediate_size") if use_moe else None,
        norm_eps=fields.get("rms_norm_eps", 1e-6), rope_theta=fields.get("rope_theta", 1e6),
        max_seq_len=min(int(trained), max_positions), max_position_embeddings=max_positions, yarn=yarn,
        qk_norm=True, rope_layout="half", use_moe=use_moe, n_routed_experts=fields.get("num_experts", 4),
        num_experts_per_tok=fields.get("num_experts_per_tok", 1), n_shared_experts=False,
        norm_topk_prob=fields.get("norm_topk_prob", True), aux_loss_alpha=fields.get("router_aux_loss_coef", 5e-4),
        seq_aux=False, tie_word_embeddings=fields.get("tie_word_embeddings", True),
    )


def minimind3_fields(config: LMConfig) -> dict:
    """The config.json MiniMind-3 publishes, for a model of this family (the inverse of `config_from_minimind3`)."""
    fields = {
        "architectures": ["MiniMindForCausalLM"], "model_type": "minimind", "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
        "intermediate_size": config.ffn_hidden_dim, "moe_intermediate_size": config.expert_hidden_dim,
        "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "tie_word_embeddings": True, "vocab_size": config.vocab_size,
        "use_moe": config.use_moe, "num_experts": config.n_routed_experts,
        "num_experts_per_tok": config.num_experts_per_tok, "norm_topk_prob": config.norm_topk_prob,
        "router_aux_loss_coef": config.aux_loss_alpha, "inference_rope_scaling": bool(config.yarn),
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "torch_dtype": "float32",
    }
    if config.yarn:
        fields["rope_scaling"] = {"type": "yarn", **config.yarn}
    return fields


def check_family(config: LMConfig) -> None:
    """This layout holds the MiniMind-3 math only: rotate-half RoPE, QK-norm, no shared expert."""
    if config.rope_layout != "half" or not config.qk_norm or (config.use_moe and config.n_shared_experts):
        raise ValueError("only MiniMind-3-family models (rope_layout 'half', qk_norm, no shared expert) have the "
                         "MiniMind-3 folder layout; export v1 models with --format minimind or llama")


def _renames(n_layers: int, n_experts: int) -> list[tuple[str, str]]:
    pairs = list(_TOP_NAMES)
    for i in range(n_layers):
        for ours, theirs in _LAYER_NAMES:
            pairs.append((f"layers.{i}.{ours}.weight", f"model.layers.{i}.{theirs}.weight"))
        for j in range(n_experts):
            for ours, theirs in _EXPERT_NAMES:
                pairs.append((f"layers.{i}.feed_forward.experts.{j}.{ours}.weight",
                              f"model.layers.{i}.mlp.experts.{j}.{theirs}.weight"))
    return pairs


def state_dict_from_minimind3(state: dict, config: LMConfig) -> dict:
    """Their tensors under our names. `lm_head.weight` is tied to the embedding (and may be absent)."""
    theirs_to_ours = {t: o for o, t in _renames(config.n_layers, config.n_routed_experts if config.use_moe else 0)}
    out, unknown = {}, []
    for key, value in state.items():
        if key == "lm_head.weight":
            continue
        if key in theirs_to_ours:
            out[theirs_to_ours[key]] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"tensors a MiniMind-3 model of this config does not have: {unknown[:5]}")
    out["output.weight"] = out["tok_embeddings.weight"]
    return out


def state_dict_to_minimind3(state: dict, config: LMConfig) -> dict:
    """Our tensors under their names (contiguous, without the tied head), for model.safetensors."""
    pairs = _renames(config.n_layers, config.n_routed_experts if config.use_moe else 0)
    return {theirs: state[ours].detach().contiguous() for ours, theirs in pairs if ours in state}


def read_minimind3(path: Path) -> tuple[LMConfig, dict] | None:
    """(config, our state dict) for a MiniMind-3 folder or its model.safetensors; None for anything else."""
    folder = path if path.is_dir() else path.parent
    weights = path if path.suffix == ".safetensors" else folder / "model.safetensors"
    config_file = folder / "config.json"
    if not (config_file.exists() and weights.exists()):
        return None
    try:
        fields = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(fields, dict) or not is_minimind3_config(fields):
        return None
    from safetensors.torch import load_file

    config = config_from_minimind3(fields)
    state = load_file(str(weights))
    return config, state_dict_from_minimind3(state, config)


def shard_names(folder: Path) -> list[str]:
    """Sharded safetensors are not published for these small models; name them if found, for the error."""
    return sorted(p.name for p in folder.glob("model-*.safetensors") if re.match(r"model-\d+-of-\d+", p.name))


def write_minimind3(model, folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write `model` (MiniMind-3 family) as config.json + model.safetensors, the published layout."""
    from safetensors.torch import save_file

    config = model.config
    check_family(config)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype) for k, v in state_dict_to_minimind3(model.state_dict(), config).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    fields = minimind3_fields(config)
    fields["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(fields, indent=2), encoding="utf-8")
    return folder
