"""MiniMind model configuration.

The fields and defaults are MiniMind v1's, so a v1 checkpoint is described by `LMConfig()` (or one of the presets)
without any extra arguments. Two fields are new: `rope_theta` and `rope_scaling_factor` (linear position
interpolation, for running past the training length).
"""

from __future__ import annotations

import argparse

from transformers import PretrainedConfig


class LMConfig(PretrainedConfig):
    model_type = "minimind"
    # The names transformers-aware tools (peft, trl, generation caches) look for.
    attribute_map = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                     "num_key_value_heads": "n_kv_heads"}

    def __init__(
        self,
        dim: int = 512,
        n_layers: int = 8,
        n_heads: int = 16,
        n_kv_heads: int = 8,
        vocab_size: int = 6400,
        hidden_dim: int | None = None,
        multiple_of: int = 64,
        norm_eps: float = 1e-5,
        max_seq_len: int = 512,
        dropout: float = 0.0,
        flash_attn: bool = True,
        # MoE (DeepSeek-style: routed experts + shared expert, top-k softmax gate)
        use_moe: bool = False,
        num_experts_per_tok: int = 2,
        n_routed_experts: int = 4,
        n_shared_experts: bool = True,
        scoring_func: str = "softmax",
        aux_loss_alpha: float = 0.01,
        seq_aux: bool = True,
        norm_topk_prob: bool = True,
        # added in this project
        rope_theta: float = 10000.0,
        rope_scaling_factor: float | None = None,
        **kwargs,
    ):
        self.dim = dim
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.vocab_size = vocab_size
        self.hidden_dim = hidden_dim
        self.multiple_of = multiple_of
        self.norm_eps = norm_eps
        self.max_seq_len = max_seq_len
        self.dropout = dropout
        self.flash_attn = flash_attn
        self.use_moe = use_moe
        self.num_experts_per_tok = num_experts_per_tok
        self.n_routed_experts = n_routed_experts
        self.n_shared_experts = n_shared_experts
        self.scoring_func = scoring_func
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux
        self.norm_topk_prob = norm_topk_prob
        self.rope_theta = rope_theta
        self.rope_scaling_factor = rope_scaling_factor
        # v1 ties the output projection to the token embedding; token ids match the bundled tokenizer.
        kwargs.setdefault("tie_word_embeddings", True)
        kwargs.setdefault("bos_token_id", 1)
        kwargs.setdefault("eos_token_id", 2)
        kwargs.setdefault("pad_token_id", 0)
        super().__init__(**kwargs)
        if dim % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"dim ({dim}) must divide by n_heads ({n_heads}), and n_heads by n_kv_heads ({n_kv_heads})")
        if (dim // n_heads) % 2:
            raise ValueError(f"head_dim {dim // n_heads} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """v1's rule: 2/3 of 4*dim, rounded up to a multiple of `multiple_of` (1408 for dim 512)."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def context_length(self) -> int:
        """Positions the model can attend over without going past what RoPE was trained (or scaled) for."""
        return int(self.max_seq_len * (self.rope_scaling_factor or 1.0))

    @property
    def file_suffix(self) -> str:
        """The `{dim}{_moe}` part of v1 checkpoint names, e.g. `512_moe` in `out/full_sft_512_moe.pth`."""
        return f"{self.dim}{'_moe' if self.use_moe else ''}"


# The three published MiniMind v1 models.
PRESETS: dict[str, dict] = {
    "minimind-v1-small": dict(dim=512, n_layers=8),
    "minimind-v1": dict(dim=768, n_layers=16),
    "minimind-v1-moe": dict(dim=512, n_layers=8, use_moe=True, n_routed_experts=4, n_shared_experts=True,
                            num_experts_per_tok=2),
}


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the model-shape flags every script shares. Explicit flags override the preset's values."""
    g = parser.add_argument_group("model", "the shape of a new model; a script that loads a checkpoint reads the "
                                  "shape from the file, and these flags then only have to agree with it")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a published MiniMind v1 shape")
    g.add_argument("--dim", type=int, default=None, help="model width (default 512)")
    g.add_argument("--n_layers", type=int, default=None, help="number of decoder layers (default 8)")
    g.add_argument("--n_heads", type=int, default=None, help="attention heads (default 16)")
    g.add_argument("--n_kv_heads", type=int, default=None, help="key/value heads for GQA (default 8)")
    g.add_argument("--max_seq_len", type=int, default=None, help="training context length (default 512)")
    g.add_argument("--use_moe", action="store_true", default=None, help="mixture-of-experts feed-forward layers")
    g.add_argument("--rope_scaling_factor", type=float, default=None,
                   help="linear RoPE scaling, to run past the training length")
    return parser


_ARG_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "use_moe", "rope_scaling_factor")


def model_flags(args: argparse.Namespace) -> dict:
    """The model fields the user asked for on the command line: the preset's, then any explicit flag. Loaders
    apply these on top of a checkpoint's own config (and refuse ones that contradict its shape)."""
    fields = dict(PRESETS[args.preset]) if getattr(args, "preset", None) else {}
    for name in _ARG_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    return fields


def config_from_args(args: argparse.Namespace, **overrides) -> LMConfig:
    """Build an LMConfig from `add_model_args` flags (v1's defaults for the rest), then `overrides`: for a model
    that starts from scratch. A model loaded from a file gets its shape from the file (`checkpoint.read_checkpoint`)."""
    return LMConfig(**{**model_flags(args), **overrides})
