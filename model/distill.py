"""White-box knowledge distillation: a frozen teacher's next-token distributions teach a smaller student.

The loss per answer token (every position whose label is not -100) is

    alpha * CE(student, label) + (1 - alpha) * T^2 * D(teacher_T, student_T)

where X_T is the softmax of the logits divided by the temperature T (the T^2 keeps the soft term's gradient at the
scale of the hard one as T grows) and D is one of
- `forward`: KL(teacher || student), which makes the student cover every token the teacher gives mass to;
- `reverse`: KL(student || teacher), which lets the student settle on the teacher's main modes;
- `jsd`: the Jensen-Shannon divergence, the mean KL of both to their even mixture (bounded by log 2).

`DistillationModel` wraps student and teacher into one module that the shared training loop
(`model.train_utils.train`) drives exactly like a plain model: `forward(**batch, num_items_in_batch=n)` returns
`out.loss` (this micro-batch's summed token losses over n, plus the student's MoE balance loss in train mode) and
`out.aux_loss`, and its state dict is the student's alone, so the saved weights and the resume file hold a plain
student checkpoint.

Why not trl's DistillationTrainer (or GKD): it is an on-policy trainer that generates completions from a "prompt"
column through the transformers Trainer. Our data are token files (packed SFT windows with their loss masks, and
pretraining windows), and our stages share one loop with its own resume, held-out split, metrics file and
DDP/deepspeed launch; the loss itself is a few lines over the two models' logits.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .checkpoint import TOKENIZER3_DIR, family_tokenizer_dir
from .errors import UsageError
from .model import MiniMindCausalLMOutput

KL_KINDS = ("forward", "reverse", "jsd")
IGNORE_INDEX = -100
# Rows per chunk of the loss: about this many logits, so the float32 softmaxes of one chunk stay near 32 MiB each
# whatever the batch (backward recomputes them per chunk instead of keeping them all).
CHUNK_ELEMENTS = 1 << 23


class VocabularyMismatchError(UsageError):
    """Teacher and student do not share one tokenizer, so their distributions cannot be compared."""


def tokenizer_name(config) -> str:
    """The family tokenizer a config reads its token ids with, for messages."""
    return "MiniMind-3" if family_tokenizer_dir(config) == TOKENIZER3_DIR else "v1"


def check_same_vocabulary(teacher_config, student_config, teacher_name: str = "the teacher",
                          student_name: str = "the student") -> None:
    """Raise a one-line VocabularyMismatchError unless both read the same token ids: the same vocabulary size and
    the same family tokenizer (both families have 6,400 tokens, but different ones)."""
    teacher = (tokenizer_name(teacher_config), teacher_config.vocab_size)
    student = (tokenizer_name(student_config), student_config.vocab_size)
    if teacher != student:
        shape = ("--preset minimind-3 with a smaller --dim/--n_layers" if teacher[0] == "MiniMind-3" else
                 "--dim/--n_layers without a MiniMind-3 preset")
        raise VocabularyMismatchError(
            f"{teacher_name} reads the {teacher[0]} tokenizer ({teacher[1]:,} tokens) but {student_name} the "
            f"{student[0]} one ({student[1]:,} tokens); distillation compares next-token distributions over one "
            f"vocabulary, so give the student the teacher's: an --init checkpoint of the {teacher[0]} family with "
            f"{teacher[1]:,} tokens, or a fresh student from {shape}")


def divergence(teacher_logp: torch.Tensor, student_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row divergence between two (N, V) log-distributions: `forward` KL(teacher || student), `reverse`
    KL(student || teacher), `jsd` the mean KL of both to their mixture."""
    if kind == "forward":
        return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    if kind == "reverse":
        return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
    if kind == "jsd":
        mixture_logp = torch.logaddexp(teacher_logp, student_logp) - math.log(2.0)
        return 0.5 * (divergence(teacher_logp, mixture_logp, "forward") + divergence(student_logp, mixture_logp,
                                                                                      "forward"))
    raise ValueError(f"kl must be one of {', '.join(KL_KINDS)}, got {kind!r}")


def _chunk_sums(student_logits, teacher_logits, targets, temperature: float, kind: str) -> torch.Tensor:
    """[divergence sum, CE sum] over the loss rows of one chunk, in float32."""
    student, teacher = student_logits.float(), teacher_logits.float()
    loss_rows = targets != IGNORE_INDEX
    student_logp = F.log_softmax(student / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher / temperature, dim=-1)
    # torch.where rather than a product, so a non-finite value on an ignored row cannot leak into the sum.
    div = torch.where(loss_rows, divergence(teacher_logp, student_logp, kind), 0.0).sum()
    ce = F.cross_entropy(student, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return torch.stack([div, ce])


def next_token_targets(labels: torch.Tensor | None, targets: torch.Tensor | None) -> torch.Tensor:
    """(B, T) targets aligned with the logits: `targets` as given (v1's pretraining windows, already shifted), or
    `labels` shifted left by one with -100 in the last column (transformers' convention, as the SFT data use)."""
    if targets is not None:
        return targets
    if labels is None:
        raise ValueError("distillation needs labels or targets to know which positions carry loss")
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)


def distillation_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 1.0, kind: str = "forward") -> torch.Tensor:
    """[divergence sum, CE sum, loss-token count] over the positions where `targets` (aligned with the logits) is not
    -100: the divergence between the temperature-T distributions (without the T^2 factor), the CE at T = 1.

    Computed in float32 in chunks of rows; with gradients on, each chunk is recomputed in backward
    (activation checkpointing), so only one chunk's vocabulary-sized float32 tensors exist at a time. Everything
    stays on the device: no host sync.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kl must be one of {', '.join(KL_KINDS)}, got {kind!r}")
    vocab = student_logits.shape[-1]
    if teacher_logits.shape[-1] != vocab:
        raise VocabularyMismatchError(f"teacher logits have {teacher_logits.shape[-1]:,} tokens, the student's "
                                      f"{vocab:,}; distillation needs one vocabulary")
    student_rows, teacher_rows = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    target_rows = targets.reshape(-1).to(student_rows.device)
    rows = max(1, CHUNK_ELEMENTS // vocab)
    recompute = torch.is_grad_enabled() and student_rows.requires_grad
    sums = student_rows.new_zeros(2, dtype=torch.float32)
    for start in range(0, student_rows.shape[0], rows):
        chunk = (student_rows[start:start + rows], teacher_rows[start:start + rows], target_rows[start:start + rows],
                 temperature, kind)
        sums = sums + (checkpoint(_chunk_sums, *chunk, use_reentrant=False) if recompute else _chunk_sums(*chunk))
    count = (target_rows != IGNORE_INDEX).sum().to(torch.float32)
    return torch.cat([sums, count[None]])


def combine(sums: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """The summed distillation loss from `distillation_sums`' output: alpha * CE + (1 - alpha) * T^2 * divergence."""
    return alpha * sums[1] + (1.0 - alpha) * temperature ** 2 * sums[0]


class DistillationModel(nn.Module):
    """The student plus a frozen teacher, called like a MiniMind model by the shared training loop.

    forward(input_ids, labels | targets, document_ids / token_mask / position_ids / attention_mask,
    num_items_in_batch): both models see the same inputs (the teacher in eval mode, without gradients); the loss is
    `combine(distillation_sums(...))` divided by num_items_in_batch (by the loss-token count without it), plus the
    student's MoE balance loss in train mode, which `out.aux_loss` also reports (what the loop's accumulation needs).

    `state_dict` / `load_state_dict` are the student's, and `config` is the student's, so the loop's checkpoints are
    a plain student checkpoint. In train mode the divergence and CE sums are also added up on the device, for
    `window_means` to report per token between log lines.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, alpha: float = 0.5, temperature: float = 1.5,
                 kl: str = "forward"):
        super().__init__()
        check_same_vocabulary(teacher.config, student.config)
        if not 0.0 <= alpha <= 1.0:
            raise UsageError(f"--alpha must be in [0, 1] (the weight of the CE term), got {alpha}")
        if temperature <= 0:
            raise UsageError(f"--temperature must be > 0, got {temperature}")
        if kl not in KL_KINDS:
            raise UsageError(f"--kl must be one of {', '.join(KL_KINDS)}, got {kl!r}")
        self.student = student
        self.teacher = teacher.requires_grad_(False).eval()
        self.alpha, self.temperature, self.kl = alpha, temperature, kl
        self._window = None  # [divergence sum, CE sum, count] since the last report, allocated on first use

    @property
    def config(self):
        return self.student.config

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # no dropout and no balance loss in the teacher, ever
        return self

    def state_dict(self, *args, **kwargs):
        return self.student.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.student.load_state_dict(state_dict, strict=strict, assign=assign)

    def flops_per_token(self, seq_len: int) -> float:
        """The student's training FLOPs plus the teacher's forward pass (a third of its forward + backward)."""
        return self.student.flops_per_token(seq_len) + self.teacher.flops_per_token(seq_len) / 3

    def forward(self, input_ids, labels=None, targets=None, num_items_in_batch=None, **inputs):
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=input_ids, **inputs).logits
        out = self.student(input_ids=input_ids, **inputs)
        sums = distillation_sums(out.logits, teacher_logits, next_token_targets(labels, targets), self.temperature,
                                 self.kl)
        denominator = num_items_in_batch if num_items_in_batch is not None else sums[2].clamp(min=1)
        loss = combine(sums, self.alpha, self.temperature) / denominator
        if out.aux_loss is not None and self.training:
            loss = loss + out.aux_loss
        if self.training:
            detached = sums.detach()
            self._window = detached.clone() if self._window is None else self._window.add_(detached)
        return MiniMindCausalLMOutput(loss=loss, logits=out.logits, aux_loss=out.aux_loss)

    def window_means(self, ddp: bool = False) -> tuple[float, float] | None:
        """(divergence, CE) per loss token since the last call, over all ranks when `ddp` (every rank must call it
        then); None before any training forward. Reads the device: call it at log time only."""
        if self._window is None:
            return None
        window = self._window.clone()
        if ddp:
            dist.all_reduce(window)
        self._window.zero_()
        div, ce, count = window.tolist()
        return (div / count, ce / count) if count else (float("nan"), float("nan"))


def parts_logger(model: DistillationModel, rt, print_fn=print):
    """A `train(step_callback=...)` that prints the divergence and CE on every step the loop logged a line
    (the loop's StepLogger takes no extra scalars, so they go on a line of their own)."""
    def log_parts(step: int, history: list) -> None:
        if not history or history[-1]["step"] != step:
            return
        means = model.window_means(ddp=rt.ddp)
        if means is not None:
            print_fn(f"    {model.kl} kl {means[0]:.4f} | ce {means[1]:.4f} (per answer token since the last line, "
                     f"T={model.temperature:g})")
    return log_parts
