"""Optimizers and learning-rate schedules of the shared training loop (model/train_utils.py).

- `--optimizer adamw` (the default): one AdamW over every trainable parameter, matrices decayed (`make_optimizer`).
- `--optimizer muon`: `torch.optim.Muon` on the hidden matrices (the attention and feed-forward projections, every
  MoE expert's too) and AdamW on the rest (the tied embedding / output head, norms, MoE routers), stepped together
  as one `MuonWithAdamW`. Under DeepSpeed, DeepSpeed's own Muon (`"optimizer": {"type": "Muon"}`) instead.
- `--lr_schedule cosine|wsd|linear`: each param group follows the schedule from its own peak (--learning_rate for
  AdamW's groups, --muon_lr for Muon's), down to the same fraction (--min_lr_ratio) of it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .checkpoint import CheckpointError
from .errors import UsageError

OPTIMIZERS = ("adamw", "muon")
LR_SCHEDULES = ("cosine", "wsd", "linear")
# Keller Jordan's Muon defaults (also nanochat's matrix LR): lr 0.02 in units of the update's spectral norm, with
# torch's adjust_lr_fn="original" (x sqrt(max(1, rows/cols))) and DeepSpeed's equivalent aspect-ratio scale, so the
# same --muon_lr means the same step under torch and under DeepSpeed. Momentum 0.95 with Nesterov, as there.
MUON_LR, MUON_MOMENTUM, MUON_WEIGHT_DECAY = 0.02, 0.95, 0.01
ADAMW_BETAS = (0.9, 0.95)


def add_optim_args(group) -> None:
    """The optimizer and schedule flags (part of model/train_utils.add_train_args)."""
    group.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                       help="adamw: AdamW on everything; muon: Muon on the hidden matrices (attention, FFN, MoE "
                            "experts) and AdamW (--learning_rate) on embeddings, norms and MoE routers")
    group.add_argument("--muon_lr", type=float, default=MUON_LR,
                       help="--optimizer muon: peak LR of the Muon matrices (the schedule scales it like "
                            "--learning_rate)")
    group.add_argument("--muon_weight_decay", type=float, default=MUON_WEIGHT_DECAY,
                       help="--optimizer muon: decoupled weight decay of the Muon matrices (applied as lr x decay "
                            "per step, so it is much smaller than AdamW's for Muon's ~40x larger LR)")
    group.add_argument("--lr_schedule", choices=LR_SCHEDULES, default="cosine",
                       help="after --warmup_iters of linear warmup: cosine to the floor; wsd: constant at the peak, "
                            "then a linear decay to the floor over the last --decay_fraction of the steps; linear: "
                            "a linear decay to the floor")
    group.add_argument("--decay_fraction", type=float, default=0.2,
                       help="--lr_schedule wsd: the share of the steps (at the end) that decay linearly to the floor")


def check_optim_args(args, deepspeed: bool) -> None:
    """One-line refusals of flag values the loop cannot honour."""
    if not 0 < args.decay_fraction <= 1:
        raise UsageError(f"--decay_fraction must be in (0, 1], got {args.decay_fraction}")
    if args.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
        raise UsageError(f"--optimizer muon needs torch.optim.Muon (torch 2.9 or later); this is torch "
                         f"{torch.__version__}: upgrade torch, or use --optimizer adamw")
    if args.optimizer == "muon" and args.muon_lr <= 0:
        raise UsageError(f"--muon_lr must be > 0, got {args.muon_lr}")
    if args.optimizer == "muon" and deepspeed:
        _check_deepspeed_muon(args)


def refuse_loop_only_flags(args) -> None:
    """For the trl-driven stages (5-dpo_train.py, 6-grpo_train.py): they share add_train_args's flags but train
    with trl's own schedule and loss, so the flags only the shared loop honours are refused in one line rather than
    ignored. --optimizer muon is theirs too (`MuonInTrainer`), but not under DeepSpeed, which would build its own."""
    given = [f"{flag} {value}" for flag, value, default in (("--lr_schedule", args.lr_schedule, "cosine"),
                                                            ("--z_loss", args.z_loss, 0.0)) if value != default]
    if given:
        raise UsageError(f"{', '.join(given)}: only the shared training loop (1-pretrain.py, 3-full_sft.py, "
                         f"4-lora_sft.py, 7-distill_train.py) has these; this stage trains with trl's cosine "
                         f"schedule and loss, so drop them")
    if args.optimizer == "muon" and args.deepspeed:
        raise UsageError("--optimizer muon with --deepspeed: the trl stages take Muon under torchrun or one process "
                         "only; drop --deepspeed, or use --optimizer adamw")


class MuonInTrainer:
    """Mixin for our trl trainers: with `muon_flags` set (the flags of an --optimizer muon run), `create_optimizer`
    builds `MuonWithAdamW` over the model the Trainer trains (peft's wrapper included, so LoRA's adapters are what
    Muon gets) instead of the Trainer's AdamW. The Trainer's cosine schedule then scales every group from its own
    peak (--muon_lr, --learning_rate), as a LambdaLR does."""

    muon_flags = None

    def create_optimizer(self, *args, **kwargs):  # transformers 5 passes an optional model; 4.x passes nothing
        if self.muon_flags is not None and self.optimizer is None:
            model = (args[0] if args else kwargs.get("model")) or self.model
            self.optimizer = make_muon(model, self.muon_flags, self.args.device.type)
        return super().create_optimizer(*args, **kwargs)


def _check_deepspeed_muon(args) -> None:
    if not deepspeed_has_muon():
        import deepspeed

        raise UsageError(f"--optimizer muon: this deepspeed ({deepspeed.__version__}) has no Muon optimizer; "
                         f"upgrade deepspeed, or launch with torchrun (plain DDP)")
    if args.grad_clip > 0:
        # ZeRO orthogonalises Muon's gradients before it takes the global norm, so its clip sees the updates' norm
        # (about the square root of the summed matrix ranks: ~31 for the 0.12M-parameter test model) and would
        # shrink every step, AdamW's parameters' too. Our own loop clips the raw gradients instead.
        raise UsageError(f"--optimizer muon under DeepSpeed: DeepSpeed clips the norm of Muon's orthogonalised "
                         f"updates, so --grad_clip {args.grad_clip:g} would shrink every step; pass --grad_clip 0, or "
                         f"launch with torchrun (which clips the raw gradients)")


# ----------------------------------------------------------------------------------------------------------------
# learning-rate schedules


def cosine_lr(step: int, total_steps: int, warmup: int, max_lr: float, min_lr: float) -> float:
    """Linear warmup to max_lr over `warmup` steps, then a cosine down to min_lr at total_steps."""
    if warmup > 0 and step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total_steps:
        return min_lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def decay_start(schedule: str, total_steps: int, warmup: int, decay_fraction: float) -> int:
    """The step a linear schedule starts decaying at: right after warmup (linear), or for wsd at the last
    round(decay_fraction x total_steps) steps (never before warmup ends)."""
    if schedule == "linear":
        return warmup
    return max(warmup, total_steps - max(1, round(decay_fraction * total_steps)))


def scheduled_lr(schedule: str, step: int, total_steps: int, warmup: int, max_lr: float, min_lr: float,
                 decay_fraction: float = 0.2) -> float:
    """The LR of optimizer step `step` (0-based) of `total_steps`. Every schedule warms up linearly the same way
    (max_lr x (step + 1) / warmup) and reaches min_lr at step == total_steps. cosine is `cosine_lr` itself; wsd holds
    max_lr until `decay_start`, then falls linearly; linear falls linearly from the end of warmup."""
    if schedule == "cosine":
        return cosine_lr(step, total_steps, warmup, max_lr, min_lr)
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown LR schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    if warmup > 0 and step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total_steps:
        return min_lr
    start = decay_start(schedule, total_steps, warmup, decay_fraction)
    if step < start:
        return max_lr
    progress = (step - start) / max(1, total_steps - start)
    return max_lr + progress * (min_lr - max_lr)


def group_peak_lr(group: dict, args) -> float:
    """A param group's peak LR: --muon_lr for Muon's groups (ours and DeepSpeed's carry use_muon=True), else
    --learning_rate. Read from the flags rather than stored, so a resumed run follows the same schedule."""
    return args.muon_lr if group.get("use_muon") else args.learning_rate


def set_scheduled_lrs(optimizer, args, step: int, total_steps: int) -> float:
    """Set every param group's LR for `step`, each from its own peak down to --min_lr_ratio of it; returns the
    AdamW (--learning_rate) LR, the one the log shows."""
    def lr_for(peak: float) -> float:
        return scheduled_lr(args.lr_schedule, step, total_steps, args.warmup_iters, peak, peak * args.min_lr_ratio,
                            args.decay_fraction)

    for group in optimizer.param_groups:
        group["lr"] = lr_for(group_peak_lr(group, args))
    return lr_for(args.learning_rate)


# ----------------------------------------------------------------------------------------------------------------
# optimizers


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, device_type: str,
                   betas=ADAMW_BETAS) -> torch.optim.AdamW:
    """AdamW over trainable parameters only (so LoRA trains just its adapters). Matrices (embeddings included)
    get weight decay; vectors (norm weights, biases) do not. The fused kernel on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    return _adamw(params, lr, weight_decay, device_type, betas)


def _adamw(params: list, lr: float, weight_decay: float, device_type: str, betas=ADAMW_BETAS) -> torch.optim.AdamW:
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device_type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **extra)


def _embedding_weights(model: nn.Module) -> set[int]:
    """ids of the input embeddings and output heads anywhere in `model` (a MiniMind model, or one wrapped by peft or
    the distillation model): Muon is for hidden matrices, and these are not (the head is the tied embedding)."""
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for m in model.modules():
        head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
        if head is not None and getattr(head, "weight", None) is not None:
            ids.add(id(head.weight))
    return ids


def muon_split(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(named params for Muon, named params for AdamW) over the trainable parameters.

    Muon: the weight of every nn.Linear (the attention wq/wk/wv/wo, the FFN w1/w2/w3, each MoE expert's and the
    shared expert's, LoRA's adapter matrices) that is not an output head tied to or standing in for the embedding.
    AdamW: everything else: the embedding (= the tied output head), RMSNorm weights, MoE routers (`gate.weight` is a
    plain parameter, not an nn.Linear: its rows are per-expert scores, not a hidden map), any vector.
    """
    embeddings = _embedding_weights(model)
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hidden = id(p) in linear and id(p) not in embeddings and p.dim() == 2
        (muon if hidden else adamw).append((name, p))
    return muon, adamw


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on the hidden matrices and AdamW on the rest, stepped together as one torch optimizer: `param_groups`
    (Muon's first, marked use_muon=True), `step`, `zero_grad`, `state_dict`, `load_state_dict`. Its param groups are
    the two inner optimizers' own dicts, so an LR set on them (by our loop, or by a torch/transformers scheduler,
    which needs a real `Optimizer`) is the LR they step with. GradScaler works with it as with any optimizer: it
    unscales the grads of `param_groups` and calls `step()` only when they are finite."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        super().__init__(muon.param_groups + adamw.param_groups, defaults={})
        # Optimizer.__init__ keeps the group dicts it is given (re-listing their params in place), so they stay the
        # inner optimizers' own.
        assert all(a is b for a, b in zip(self.param_groups, muon.param_groups + adamw.param_groups))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != {"muon", "adamw"}:
            raise CheckpointError("--resume: the resume file holds a plain AdamW state (an --optimizer adamw run); "
                                  "resume it with --optimizer adamw")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
        # torch's load_state_dict gives each inner optimizer new group dicts: share those again.
        self.param_groups = self.muon.param_groups + self.adamw.param_groups


def make_muon(model: nn.Module, args, device_type: str) -> MuonWithAdamW:
    """`--optimizer muon` for plain torch and DDP (DDP all-reduces the gradients before the step, so Muon
    orthogonalises the full gradient on every rank and the ranks stay identical)."""
    muon_named, adamw_named = muon_split(model)
    if not muon_named:
        raise UsageError("--optimizer muon: the model has no trainable hidden matrix for Muon; use --optimizer adamw")
    muon = torch.optim.Muon([{"params": [p for _, p in muon_named], "use_muon": True}], lr=args.muon_lr,
                            weight_decay=args.muon_weight_decay, momentum=MUON_MOMENTUM, nesterov=True,
                            adjust_lr_fn="original")
    adamw = _adamw([p for _, p in adamw_named], args.learning_rate, args.weight_decay, device_type)
    return MuonWithAdamW(muon, adamw)


def build_optimizer(args, model: nn.Module, device_type: str, deepspeed: bool = False):
    """The loop's optimizer for --optimizer: AdamW (exactly `make_optimizer`), `MuonWithAdamW`, or None under
    DeepSpeed with Muon (DeepSpeed builds its own from `deepspeed_muon_config`)."""
    if args.optimizer == "adamw":
        return make_optimizer(model, args.learning_rate, args.weight_decay, device_type)
    if deepspeed:
        return None
    return make_muon(model, args, device_type)


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed's Muon


def deepspeed_has_muon() -> bool:
    try:
        from deepspeed.runtime.config import MUON_OPTIMIZER  # noqa: F401
    except ImportError:
        return False
    return True


def deepspeed_muon_config(args) -> dict:
    """The ds_config "optimizer" section for --optimizer muon. DeepSpeed itself decides which parameters Muon takes
    (every parameter of 2 or more dimensions whose name holds neither "embed" nor "lm_head": with MiniMind's names
    that is `muon_split`'s choice plus the MoE routers); its auxiliary Adam takes the rest at --learning_rate."""
    return {"type": "Muon", "params": {"lr": args.learning_rate, "muon_lr": args.muon_lr, "adam_lr": args.learning_rate,
                                       "momentum": MUON_MOMENTUM, "betas": list(ADAMW_BETAS),
                                       "weight_decay": args.weight_decay}}


def deepspeed_muon_groups(model: nn.Module, args) -> list[dict]:
    """model_parameters for deepspeed.initialize under --optimizer muon: the weight decay of each parameter by
    DeepSpeed's own Muon/Adam choice (see `deepspeed_muon_config`), since a group's weight_decay overrides the
    config's for both of its halves."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def takes_muon(name: str, p) -> bool:
        return p.dim() >= 2 and not any(k in name.lower() for k in ("embed", "lm_head"))

    muon = [p for n, p in trainable if takes_muon(n, p)]
    decay = [p for n, p in trainable if not takes_muon(n, p) and p.dim() >= 2]
    no_decay = [p for n, p in trainable if p.dim() < 2]
    groups = [{"params": muon, "weight_decay": args.muon_weight_decay},
              {"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
