"""MiniMind model configuration.

The fields and defaults are MiniMind v1's, so a v1 checkpoint is described by `LMConfig()` (or one of the presets)
without any extra arguments. The fields added since describe the MiniMind-3 family (Qwen3-style) with the same class:
- `head_dim` (default dim / n_heads), `qk_norm` (a per-head RMSNorm on q and k before RoPE);
- `rope_layout`: "interleaved" (v1: rotate adjacent pairs) or "half" (rotate-half, as Llama/Qwen);
- `rope_theta`, `rope_scaling_factor` (linear position interpolation) and `yarn` (MiniMind-3's YaRN: a dict with
  factor, original_max_position_embeddings, beta_fast, beta_slow, attention_factor), `max_position_embeddings`;
- `moe_hidden_dim` (the experts' FFN width, default the dense one); top-1 routing and no shared expert are just
  `num_experts_per_tok=1`, `n_shared_experts=False`.
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
        # the MiniMind-3 family
        head_dim: int | None = None,
        qk_norm: bool = False,
        rope_layout: str = "interleaved",
        yarn: dict | None = None,
        max_position_embeddings: int | None = None,
        moe_hidden_dim: int | None = None,
        **kwargs,
    ):
        self.dim, self.n_layers, self.n_heads, self.n_kv_heads = dim, n_layers, n_heads, n_kv_heads
        self.vocab_size, self.hidden_dim, self.multiple_of, self.norm_eps = vocab_size, hidden_dim, multiple_of, norm_eps
        self.max_seq_len, self.dropout, self.flash_attn = max_seq_len, dropout, flash_attn
        self.use_moe, self.num_experts_per_tok, self.n_routed_experts = use_moe, num_experts_per_tok, n_routed_experts
        self.n_shared_experts, self.scoring_func, self.aux_loss_alpha = n_shared_experts, scoring_func, aux_loss_alpha
        self.seq_aux, self.norm_topk_prob = seq_aux, norm_topk_prob
        self.rope_theta, self.rope_scaling_factor = rope_theta, rope_scaling_factor
        self._set_family_fields(head_dim, qk_norm, rope_layout, yarn, max_position_embeddings, moe_hidden_dim)
        # v1 ties the output projection to the token embedding; token ids match the bundled tokenizer.
        kwargs.setdefault("tie_word_embeddings", True)
        kwargs.setdefault("bos_token_id", 1)
        kwargs.setdefault("eos_token_id", 2)
        kwargs.setdefault("pad_token_id", 0)
        super().__init__(**kwargs)
        self._check(explicit_head_dim=head_dim is not None)

    def _set_family_fields(self, head_dim, qk_norm, rope_layout, yarn, max_position_embeddings, moe_hidden_dim):
        """The fields MiniMind-3 added to v1's (their defaults describe v1)."""
        self.head_dim = head_dim or self.dim // self.n_heads
        self.qk_norm = qk_norm
        self.rope_layout = rope_layout
        self.yarn = dict(yarn) if yarn else None
        self.max_position_embeddings = max_position_embeddings or self.max_seq_len
        self.moe_hidden_dim = moe_hidden_dim
        if self.yarn:
            self._complete_yarn()

    def _check(self, explicit_head_dim: bool) -> None:
        dim, n_heads, n_kv_heads = self.dim, self.n_heads, self.n_kv_heads
        if (not explicit_head_dim and dim % n_heads) or n_heads % n_kv_heads:
            raise ValueError(f"dim ({dim}) must divide by n_heads ({n_heads}), and n_heads by n_kv_heads ({n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.rope_layout not in ("interleaved", "half"):
            raise ValueError(f"rope_layout must be 'interleaved' (v1) or 'half' (MiniMind-3), got {self.rope_layout!r}")

    def _complete_yarn(self) -> None:
        """`--rope_scaling yarn --rope_factor F` gives only the factor: YaRN then works over the length the model
        was trained at, with MiniMind-3's defaults, and reaches F times it."""
        self.yarn.setdefault("original_max_position_embeddings", self.max_seq_len)
        for key, value in (("beta_fast", 32.0), ("beta_slow", 1.0), ("attention_factor", 1.0)):
            self.yarn.setdefault(key, value)
        reach = int(self.yarn["original_max_position_embeddings"] * self.yarn["factor"])
        self.max_position_embeddings = max(self.max_position_embeddings, reach)

    @property
    def expert_hidden_dim(self) -> int:
        """The FFN width of each routed/shared expert."""
        return self.moe_hidden_dim or self.ffn_hidden_dim

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
        if self.yarn:
            return int(self.yarn.get("original_max_position_embeddings", self.max_seq_len) * self.yarn["factor"])
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
# MiniMind-3 (2026-04): Qwen3-style. FFN ceil(768*pi/64)*64 = 2432; trained at 2,048 positions, YaRN (factor 16)
# optional for up to 32,768. The MoE variant: 4 experts, top-1 (renormalised: weight 1), no shared expert.
MINIMIND3 = dict(dim=768, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=96, hidden_dim=2432, norm_eps=1e-6,
                 qk_norm=True, rope_layout="half", rope_theta=1e6, max_seq_len=2048, max_position_embeddings=32768)
PRESETS["minimind-3"] = dict(MINIMIND3)
PRESETS["minimind-3-moe"] = dict(MINIMIND3, use_moe=True, n_routed_experts=4, num_experts_per_tok=1,
                                 n_shared_experts=False, aux_loss_alpha=5e-4, seq_aux=False, norm_topk_prob=True)
# YaRN as MiniMind-3 defaults it when its config turns `inference_rope_scaling` on without a dict.
MINIMIND3_YARN = dict(factor=16.0, original_max_position_embeddings=2048, beta_fast=32.0, beta_slow=1.0,
                      attention_factor=1.0)


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the model-shape flags every script shares. Explicit flags override the preset's values."""
    g = parser.add_argument_group("model", "the shape of a new model; a script that loads a checkpoint reads the "
                                  "shape from the file, and these flags then only have to agree with it")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a published shape: MiniMind v1 (small, 108M, MoE) or MiniMind-3 (64M, MoE)")
    g.add_argument("--dim", type=int, default=None, help="model width (default 512)")
    g.add_argument("--n_layers", type=int, default=None, help="number of decoder layers (default 8)")
    g.add_argument("--n_heads", type=int, default=None, help="attention heads (default 16)")
    g.add_argument("--n_kv_heads", type=int, default=None, help="key/value heads for GQA (default 8)")
    g.add_argument("--max_seq_len", type=int, default=None, help="training context length (default 512)")
    g.add_argument("--use_moe", action="store_true", default=None, help="mixture-of-experts feed-forward layers")
    g.add_argument("--rope_scaling_factor", type=float, default=None,
                   help="linear RoPE scaling, to run past the training length")
    g.add_argument("--rope_scaling", choices=("linear", "yarn"), default=None,
                   help="with --rope_factor F: reach F times the training length, by linear position interpolation "
                        "or by YaRN (MiniMind-3's: slow frequencies stretched, fast ones kept); either family")
    g.add_argument("--rope_factor", type=float, default=None, help="the factor for --rope_scaling")
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
    scaling, factor = getattr(args, "rope_scaling", None), getattr(args, "rope_factor", None)
    if (scaling is None) != (factor is None):
        # Imported here: LMConfig.py travels alone as exported remote code, where this CLI helper never runs, and
        # transformers 4.x copies only a remote module's top-level relative imports into its cache.
        from . import errors

        raise errors.UsageError("--rope_scaling and --rope_factor go together, e.g. --rope_scaling yarn --rope_factor 4")
    if scaling == "linear":
        fields["rope_scaling_factor"] = factor
    elif scaling == "yarn":
        fields["yarn"] = {"factor": factor}  # over the loaded model's own training length (LMConfig fills it in)
    return fields


def config_from_args(args: argparse.Namespace, **overrides) -> LMConfig:
    """Build an LMConfig from `add_model_args` flags (v1's defaults for the rest), then `overrides`: for a model
    that starts from scratch. A model loaded from a file gets its shape from the file (`checkpoint.read_checkpoint`)."""
    return LMConfig(**{**model_flags(args), **overrides})
