"""Training plumbing shared by every training script (pretrain, SFT, LoRA): flags, device/dtype/distributed setup,
optimizer and LR schedule (model/optim.py), logging (loss, and bits per character when the script passes its
tokenizer), checkpoints with exact resume, and the training loop itself.

A numbered script is then just: parse flags, `rt = compute_init(args)`, build the model and dataset,
`train(args, rt, model, dataset, weights_name)`, `compute_cleanup()`.

Launchers: plain `python`, `torchrun --nproc_per_node N` (env vars RANK/LOCAL_RANK/WORLD_SIZE), or
`deepspeed --num_gpus N` (which also passes --local_rank; then the shipped ZeRO config is used unless --deepspeed
names another).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .checkpoint import (
    DTYPES,
    OUT_DIR,
    ROOT_DIR,
    CheckpointError,
    atomic_save,
    check_data_tokenizer,
    clean_state_dict,
    default_device,
    default_dtype_name,
    save_weights,
    torch_load_checked,
)
from .dataset import DataFileError, ShardedSampler, read_token_file_header
from .errors import UsageError
from .model import real_tokens
from .optim import (
    add_optim_args,
    build_optimizer,
    check_optim_args,
    deepspeed_muon_config,
    deepspeed_muon_groups,
    set_scheduled_lrs,
)
from .optim import cosine_lr as cosine_lr  # re-exported: the schedule's old home
from .optim import make_optimizer as make_optimizer  # re-exported: benchmark.py and tests import it from here
from .report_card import bits_per_char
from .run_metrics import MetricsFile, holdout_split, items_left

IMAGES_DIR = ROOT_DIR / "images"
DEFAULT_DS_CONFIG = ROOT_DIR / "ds_config_zero2.json"
LOG_LINES_PER_RUN = 30  # the default --log_interval aims at about this many log lines per run ...
LOG_EVERY_S = 30.0  # ... and a progress line is printed at least this often, so a slow run never looks hung


# ----------------------------------------------------------------------------------------------------------------
# flags


def add_train_args(parser: argparse.ArgumentParser, **defaults) -> argparse.ArgumentParser:
    """The flags every training script shares. Script-specific defaults come as keyword arguments,
    e.g. add_train_args(parser, data_path=..., learning_rate=5e-4)."""
    g = parser.add_argument_group("training")
    g.add_argument("--data_path", type=str, default=None, help="processed data file (data_process.py output)")
    g.add_argument("--out_dir", type=str, default=str(OUT_DIR), help="where weights and the resume file go")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0: epochs)")
    g.add_argument("--batch_size", type=int, default=32, help="sequences per micro-batch per GPU")
    g.add_argument("--accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--learning_rate", type=float, default=5e-4, help="peak learning rate")
    g.add_argument("--min_lr_ratio", type=float, default=0.1,
                   help="the LR schedule's floor, as a fraction of each peak (--learning_rate, --muon_lr)")
    g.add_argument("--warmup_iters", type=int, default=0, help="linear warmup steps")
    g.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    add_optim_args(g)
    g.add_argument("--z_loss", type=float, default=0.0,
                   help="add W x mean(logsumexp(logits)^2) over the loss tokens to the training loss (PaLM's z-loss, "
                        "e.g. 1e-4; 0: off). The logged loss stays the cross-entropy alone")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="autocast dtype (default: bfloat16 on GPUs that have it, float16 on older GPUs, float32 on CPU)")
    g.add_argument("--device", type=str, default=None, help="cuda, cuda:1, cpu, mps (default: best available)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--use_wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works)")
    g.add_argument("--wandb_project", type=str, default="MiniMind")
    g.add_argument("--save_interval", type=int, default=1000, help="save weights and resume state every N steps")
    g.add_argument("--log_interval", type=int, default=None,
                   help=f"log every N steps (default: about {LOG_LINES_PER_RUN} lines per run); a progress line is "
                        f"also printed whenever {LOG_EVERY_S:.0f} s pass without one")
    g.add_argument("--val_fraction", type=float, default=0.005,
                   help="share of the items (windows, packed conversations, pairs) held out for the validation loss; "
                        "at least one when > 0, none at 0")
    g.add_argument("--eval_interval", type=int, default=0,
                   help="validation loss every N steps and at the end (0: about 10 times per run)")
    g.add_argument("--num_workers", type=int, default=1, help="DataLoader worker processes")
    g.add_argument("--resume", action="store_true", help="continue exactly from out_dir's resume file")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--images_dir", type=str, default=str(IMAGES_DIR), help="where the loss-curve PNG goes")
    g.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    g.add_argument("--deepspeed", type=str, default=None, help="DeepSpeed ZeRO config JSON (used under deepspeed)")
    parser.set_defaults(**defaults)
    return parser


# ----------------------------------------------------------------------------------------------------------------
# device, dtype, distributed


@dataclass
class Runtime:
    device: torch.device
    device_type: str
    dtype: torch.dtype
    scaler: torch.amp.GradScaler
    ddp: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    deepspeed_config: str | None = None

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """Autocast to exactly the chosen dtype; float32 runs without autocast."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def _is_distributed_launch() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "RANK" in os.environ and "MASTER_ADDR" in os.environ


def compute_init(args) -> Runtime:
    """Pick device and dtype, join the process group when launched by torchrun/deepspeed, and seed everything."""
    device_name = args.device or default_device()
    launched_by_deepspeed = getattr(args, "local_rank", -1) >= 0 or getattr(args, "deepspeed", None)
    ddp = _is_distributed_launch()
    rank = local_rank = 0
    world_size = 1
    if ddp:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", getattr(args, "local_rank", 0)))
        world_size = int(os.environ["WORLD_SIZE"])
        if device_name.startswith("cuda"):
            device_name = f"cuda:{local_rank}"
            torch.cuda.set_device(device_name)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device_name.startswith("cuda") else "gloo")
    device = torch.device(device_name)
    device_type = device.type

    if args.dtype is None:
        args.dtype = default_dtype_name(device_type)
    dtype = DTYPES[args.dtype]
    # Loss scaling is only needed for float16's narrow exponent range; bfloat16 and float32 run unscaled.
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == torch.float16))
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    ds_config = None
    if launched_by_deepspeed:
        ds_config = args.deepspeed or str(DEFAULT_DS_CONFIG)
    seed_everything(args.seed)
    return Runtime(device=device, device_type=device_type, dtype=dtype, scaler=scaler, ddp=ddp, rank=rank,
                   local_rank=local_rank, world_size=world_size, deepspeed_config=ds_config)


def compute_cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if _rank() == 0:
        print(*args, **kwargs, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# optimisation


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP / torch.compile / deepspeed wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
              "4090": 165e12, "3090": 71e12, "A10": 125e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16/fp16 tensor-core peak of the GPU, for MFU; None when unknown (CPU, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops
    return None


# ----------------------------------------------------------------------------------------------------------------
# logging


class _NoLogger:
    run_id = None

    def log(self, data: dict, step: int | None = None):
        pass

    def finish(self):
        pass


class WandbLogger:
    def __init__(self, project: str, run_name: str, config: dict, resume_id: str | None = None):
        import wandb

        self.run = wandb.init(project=project, name=run_name, config=config, id=resume_id,
                              resume="allow" if resume_id else None)
        self.run_id = self.run.id

    def log(self, data: dict, step: int | None = None):
        self.run.log(data, step=step)

    def finish(self):
        self.run.finish()


def make_logger(args, run_name: str, config: dict, resume_id: str | None = None):
    """wandb on --use_wandb (rank 0 only), else a no-op with the same .log(dict, step) / .finish()."""
    if getattr(args, "use_wandb", False) and _rank() == 0:
        return WandbLogger(args.wandb_project, run_name, config, resume_id)
    return _NoLogger()


def auto_log_interval(total_steps: int, lines: int = LOG_LINES_PER_RUN) -> int:
    """Steps between log lines for a run of `total_steps` when --log_interval is not given: about `lines` lines.

    Rounded rather than floored, so a run of 20 or more steps gets 20 to 45 lines, not up to 59; shorter runs log
    every step. Shared with 5-dpo_train.py, whose trl Trainer takes it as logging_steps.
    """
    return max(1, int(total_steps / lines + 0.5))


def resolve_log_interval(args, total_steps: int) -> int:
    """--log_interval when given (N > 0 means every N steps, as always), else `auto_log_interval`."""
    return args.log_interval if args.log_interval and args.log_interval > 0 else auto_log_interval(total_steps)


def log_interval_note(interval: int) -> str:
    """How often the run logs, for its header."""
    every = "every step" if interval == 1 else f"every {interval:,} steps"
    return f"logging {every} (and at least every {LOG_EVERY_S:.0f} s)"


def loss_item_count(batch: dict) -> torch.Tensor:
    """The positions of a batch that carry loss (a device tensor, so counting never waits for the GPU): labels are
    shifted by the model, so their first column never counts; targets are already shifted."""
    if batch.get("labels") is not None:
        return (batch["labels"][:, 1:] != -100).sum()
    if batch.get("targets") is not None:
        return (batch["targets"] != -100).sum()
    raise ValueError("a training batch needs labels or targets")


def real_token_count(batch: dict) -> torch.Tensor:
    """The real (non-padding) tokens of a batch, as a device tensor, by the model's own rule (`real_tokens`):
    every position when the batch marks no padding."""
    ids = batch["input_ids"]
    real = real_tokens(batch.get("document_ids"), batch.get("attention_mask"), batch.get("token_mask"), ids.shape[1])
    if real is not None:
        return real.sum()
    # A fill on the device rather than a host-to-device copy of the number.
    return torch.full((), ids.numel(), dtype=torch.long, device=ids.device)


# ----------------------------------------------------------------------------------------------------------------
# bits per character: the loss per character of text, which compares across tokenizers (a loss per token does not)


TRAIN_TEXT_SAMPLE = 200  # training items whose characters per token convert the training loss to bits/char
MAX_VAL_TEXT_ITEMS = 20_000  # held-out items counted at most (every one of them under the default --val_fraction
#                              for corpora up to ~2B tokens); a larger held-out set is sampled evenly


@dataclass(frozen=True)
class TextCount:
    """Loss tokens and the characters of text they stand for, over some items (see `count_text`)."""
    tokens: int
    chars: int
    items: int

    @property
    def chars_per_token(self) -> float:
        return self.chars / self.tokens if self.tokens else float("nan")


def loss_bits_per_char(nats_per_token: float, count: TextCount) -> float:
    """Bits per character of a per-token mean loss (nats) over text like `count`'s: loss x tokens / (ln 2 x chars),
    by model/report_card.bits_per_char (summed nats in, bits per character out)."""
    return bits_per_char(nats_per_token * count.tokens, count.chars)


def loss_token_ids(item: dict) -> torch.Tensor:
    """The target ids an item's loss is computed on, in order: `targets` (already shifted) or `labels[1:]` (the
    model shifts them), -100 left out: the positions `loss_item_count` counts."""
    if item.get("labels") is not None:
        targets = torch.as_tensor(item["labels"])[1:]
    elif item.get("targets") is not None:
        targets = torch.as_tensor(item["targets"])
    else:
        raise ValueError("an item needs labels or targets")
    return targets[targets != -100]


def count_text(items, indices, tokenizer) -> TextCount:
    """Loss tokens and characters of `items[i]` for i in `indices`.

    tokens: every loss position (the loss is their mean, so BOS/EOS targets count too).
    chars: len() of the decoded text (Unicode code points, no clean-up of spaces) of those same ids less the
    tokenizer's BOS, EOS and padding ids, which stand for no character (their nats still count, spread over the
    text's characters). Each item's ids are decoded as one string: an SFT item's answer runs are joined, which adds
    no character; a window cut inside a multi-byte character decodes it as one replacement character.
    """
    no_char = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    specials = torch.tensor(sorted(no_char), dtype=torch.long)
    tokens = chars = 0
    indices = list(indices)
    for start in range(0, len(indices), 256):  # batches, for the tokenizer's fast batch decode
        ids = [loss_token_ids(items[int(i)]) for i in indices[start:start + 256]]
        tokens += sum(t.numel() for t in ids)
        texts = tokenizer.batch_decode([t[~torch.isin(t, specials)].tolist() for t in ids],
                                       clean_up_tokenization_spaces=False)
        chars += sum(map(len, texts))
    return TextCount(tokens, chars, len(indices))


def _evenly_spaced(indices, k: int) -> list[int]:
    """At most k of `indices`, spread evenly over them (the first k items of a file are often one source)."""
    indices = list(indices)
    if len(indices) <= k:
        return indices
    return [indices[i] for i in np.linspace(0, len(indices) - 1, k).round().astype(int)]


def text_counts(tokenizer, train_set, dataset, val_idx: list[int]) -> tuple[TextCount | None, TextCount | None]:
    """(a sample of the training items' count, the held-out items' count) at start-up, for `StepLogger`'s bpc and
    val_bpc; None where there is nothing to count (no held-out item, no character)."""
    train = count_text(train_set, _evenly_spaced(range(len(train_set)), TRAIN_TEXT_SAMPLE), tokenizer)
    val = count_text(dataset, _evenly_spaced(val_idx, MAX_VAL_TEXT_ITEMS), tokenizer) if val_idx else None
    return (train if train.chars else None), (val if val is not None and val.chars else None)


def _check_data_tokenizer(data_path, tokenizer) -> None:
    """A token file (data_process.py's output) records the tokenizer that made it: it must be this run's."""
    try:
        header = read_token_file_header(data_path) if data_path else None
    except DataFileError:  # not a token file (jsonl read directly): nothing recorded to compare
        return
    if header is not None:
        check_data_tokenizer(header, data_path, tokenizer)


def _text_counts_note(counts: tuple[TextCount | None, TextCount | None]) -> str:
    parts = [f"{c.chars_per_token:.3f} chars/token over {what} ({c.items:,} items)"
             for c, what in zip(counts, ("a training sample", "the held-out items")) if c is not None]
    return "bits per character from " + "; ".join(parts) if parts else "bits per character: no text to count"


def _scalar(value) -> float | None:
    """A logged number as a float (reading a device tensor here, at log time only), None when absent."""
    if value is None:
        return None
    return value.item() if torch.is_tensor(value) else float(value)


class StepLogger:
    """The training loop's log: a line every `interval` optimizer steps, at each validation and at the last step,
    and a progress line whenever `every_s` seconds pass without any line (so a slow run is never silent for long).

    Only the interval lines close a loss window and go into `history`, wandb and the metrics file. The progress lines
    are printed and nothing else: the history then depends on the step count alone, so a run killed and resumed
    records exactly the same history as one that never stopped, however long its steps took.

    Tokens/s and MFU count real tokens only (padding excluded, see `real_token_count`); the counts stay on the device
    until a line is printed. With `text_counts` (train, held-out) from `text_counts`, the lines also give the loss
    in bits per character (bpc, val_bpc), worked out from the already-reduced loss when the line is written.
    """

    def __init__(self, rt: Runtime, model, total_steps: int, interval: int, start_step: int, history: list,
                 logger, every_s: float | None = None, clock=None, metrics=None, steps_per_epoch: int | None = None,
                 text_counts: tuple[TextCount | None, TextCount | None] = (None, None)):
        self.rt, self.total_steps, self.interval, self.start_step = rt, total_steps, interval, start_step
        self.train_text, self.val_text = text_counts
        self.history, self.logger, self.metrics, self.steps_per_epoch = history, logger, metrics, steps_per_epoch
        # Looked up per run rather than bound as defaults, so a test can shorten LOG_EVERY_S or fake the clock.
        self.every_s = LOG_EVERY_S if every_s is None else every_s
        self.clock = clock or time.time
        self.flops_fn = getattr(unwrap(model), "flops_per_token", None)
        self.peak = peak_flops(rt.device)
        self.loss_sum = torch.zeros((), device=rt.device)  # on the device: no host sync per micro-batch
        self.real_tokens = torch.zeros((), dtype=torch.long, device=rt.device)
        self.window_steps = self.positions = 0
        self.t_start = self.t_line = self.clock()

    def micro_batch(self, loss: torch.Tensor, real_tokens: torch.Tensor, positions: int):
        """One micro-batch of this rank: its detached loss (its share of the step's loss), its real tokens (a device
        tensor) and its positions (input_ids.numel(), padding included)."""
        self.loss_sum += loss
        self.real_tokens += real_tokens.long()
        self.positions += positions

    def exclude(self, seconds: float):
        """Leave `seconds` (a validation pass) out of the tokens/s of the current line."""
        self.t_line += seconds

    def step_done(self, step: int, epoch: int, lr: float, seq_len: int, grad_norm=None, val_loss: float | None = None):
        self.window_steps += 1
        if step % self.interval == 0 or step == self.total_steps or val_loss is not None:
            self._interval_line(step, epoch, lr, seq_len, grad_norm, val_loss)
        elif self.rt.is_master and self.clock() - self.t_line >= self.every_s:
            # Rank 0's own figures (tokens times the world size): an all_reduce here would hang, as the ranks'
            # clocks never agree on when to call it.
            w = self.rt.world_size
            self._print(step, epoch, lr, (self.loss_sum / self.window_steps).item(), seq_len,
                        self.real_tokens.item() * w, self.positions * w, grad_norm,
                        note=" (rank 0)" if self.rt.ddp else "")

    def _interval_line(self, step: int, epoch: int, lr: float, seq_len: int, grad_norm, val_loss):
        loss = self.loss_sum / self.window_steps
        counts = torch.stack([self.real_tokens, torch.full_like(self.real_tokens, self.positions)])
        if self.rt.ddp:  # loss averaged over ranks (SUM then divide: gloo has no AVG), tokens summed
            dist.all_reduce(loss)
            loss = loss / self.rt.world_size
            dist.all_reduce(counts)
        real, positions = counts.tolist()
        record = self._print(step, epoch, lr, loss.item(), seq_len, real, positions, grad_norm, val_loss=val_loss)
        entry = {"step": step, "loss": record["loss"], "lr": lr}
        if val_loss is not None:
            entry["val_loss"] = val_loss
        self.history.append(entry)
        self.logger.log(record, step=step)
        if self.metrics is not None:
            self.metrics.log(self._metrics_record(record, epoch))
        self.loss_sum.zero_()
        self.window_steps = 0

    def _metrics_record(self, record: dict, epoch: int) -> dict:
        """The metrics file's line: fixed keys (null when unknown), val_loss only where computed; epoch as the
        fraction of epochs done, like trl's logs."""
        step = record["step"]
        line = {"step": step, "epoch": step / self.steps_per_epoch if self.steps_per_epoch else epoch + 1,
                "loss": record["loss"]}
        for key in ("bpc", "val_loss", "val_bpc"):  # where known (a tokenizer given, a validation step)
            if key in record:
                line[key] = record[key]
        line.update({k: record.get(k) for k in ("lr", "tokens_per_s", "padding_share", "mfu", "grad_norm")})
        return line

    def _print(self, step: int, epoch: int, lr: float, loss: float, seq_len: int, real: int, positions: int,
               grad_norm=None, val_loss: float | None = None, note: str = "") -> dict:
        now = self.clock()
        tok_s = real / max(now - self.t_line, 1e-9)
        pad = 1.0 - real / positions if positions else 0.0
        record = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tok_s, "padding_share": pad}
        msg = f"step {step}/{self.total_steps} (epoch {epoch + 1}) | loss {loss:.4f}{note}"
        if self.train_text is not None:
            record["bpc"] = loss_bits_per_char(loss, self.train_text)
            msg += f" | bpc {record['bpc']:.4f}"
        if val_loss is not None:
            record["val_loss"] = val_loss
            msg += f" | val_loss {val_loss:.4f}"
            if self.val_text is not None:
                record["val_bpc"] = loss_bits_per_char(val_loss, self.val_text)
                msg += f" | val_bpc {record['val_bpc']:.4f}"
        msg += f" | lr {lr:.2e} | {tok_s:,.0f} tok/s | pad {100 * pad:.1f}%"
        if (norm := _scalar(grad_norm)) is not None:
            record["grad_norm"] = norm
            msg += f" | grad_norm {norm:.3f}"
        if self.flops_fn is not None and self.peak is not None:
            record["mfu"] = self.flops_fn(seq_len) * tok_s / (self.peak * self.rt.world_size)
            msg += f" | MFU {100 * record['mfu']:.1f}%"
        eta = (now - self.t_start) / (step - self.start_step) * (self.total_steps - step)
        print0(msg + f" | ETA {eta / 60:.1f} min")
        self.real_tokens.zero_()
        self.positions, self.t_line = 0, now
        return record


def print_outputs(paths: dict) -> None:
    """The closing block of a run's log: each file or folder it wrote, one per line ({what: path}; None is left out,
    for something this run did not write)."""
    written = {name: path for name, path in paths.items() if path is not None}
    if written:
        width = max(map(len, written))
        print0("wrote:\n" + "\n".join(f"  {name:<{width}}  {path}" for name, path in written.items()))


LOSS_COLOUR, LR_COLOUR, VAL_COLOUR = "tab:blue", "tab:orange", "tab:green"
MARKERS_UP_TO = 20  # points per curve: beyond this, markers would blur the line rather than show the samples
LOSS_BAND, LR_BAND = (0.42, 0.95), (0.04, 0.32)  # fractions of the plot's height each curve is scaled to fill
FULL_BAND = (0.05, 0.95)  # the loss alone, when the history has no LR


def _fit_band(ax, values: list[float], band: tuple[float, float], floor: float | None = None):
    """Scale the y axis so `values` (from `floor` when given) fill `band` of its height, ticks only inside it.

    The loss and the LR live on two y axes; scaled each to its own band they cannot cross, however alike their shapes
    (a DPO loss falling under a cosine LR would otherwise be drawn as one line).
    """
    from matplotlib.ticker import MaxNLocator

    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return
    lo, hi = (min(finite) if floor is None else floor), max(finite)
    if hi == lo:  # one point, or a flat curve: give it a band of its own size around it
        pad = abs(hi) * 0.1 or 1.0
        lo, hi = (lo - pad, hi + pad) if floor is None else (floor, hi + pad)
    bottom, top = band
    per_unit = (hi - lo) / (top - bottom)
    ax.set_ylim(lo - bottom * per_unit, lo + (1 - bottom) * per_unit)
    slack = 0.05 * (hi - lo)
    ax.set_yticks([t for t in MaxNLocator(nbins=5).tick_values(lo, hi) if lo - slack <= t <= hi + slack])
    ax.yaxis.label.set_y((bottom + top) / 2)  # the axis label beside its own band, not the middle of the plot


def save_loss_plot(history: list[dict], path: str | os.PathLike, title: str = "training loss") -> Path | None:
    """Write the loss curve as a PNG: loss against step (left axis, upper band) with the validation loss where the
    history has one (same axis and band), and, when the history has it, the learning rate on its own right-hand axis
    (lower band, from 0), one legend for all. None when nothing to plot."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    steps, losses = [h["step"] for h in history], [h["loss"] for h in history]
    style = {"marker": "o", "markersize": 4} if len(history) <= MARKERS_UP_TO else {}
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    lines = ax.plot(steps, losses, color=LOSS_COLOUR, label=f"loss (last {losses[-1]:.4f})", **style)
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color=LOSS_COLOUR)
    ax.tick_params(axis="y", colors=LOSS_COLOUR)
    # Steps are whole numbers (even in a 3-step run), at round intervals.
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
    if len(set(steps)) == 1:  # a single step: centre it instead of matplotlib's +-5% of the step number
        ax.set_xlim(steps[0] - 1, steps[0] + 1)
    ax.grid(alpha=0.3)
    val = [(h["step"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if val:  # evaluated on fewer steps than logged: markers always, dashed between them
        lines += ax.plot(*zip(*val), color=VAL_COLOUR, linestyle="--", marker="s", markersize=4,
                         label=f"val loss (last {val[-1][1]:.4f})")
    has_lr = all("lr" in h for h in history)
    _fit_band(ax, losses + [v for _, v in val], LOSS_BAND if has_lr else FULL_BAND)
    if has_lr:
        ax2 = ax.twinx()
        lrs = [h["lr"] for h in history]
        lines += ax2.plot(steps, lrs, color=LR_COLOUR, label=f"learning rate (last {lrs[-1]:.2e})", **style)
        ax2.set_ylabel("learning rate", color=LR_COLOUR)
        ax2.tick_params(axis="y", colors=LR_COLOUR)
        # Each tick written out like the log lines' "lr 2.00e-04", instead of a "1e-6" multiplier up in the corner.
        ax2.yaxis.set_major_formatter(FuncFormatter(lambda v, _: "0" if v == 0 else f"{v:.1e}"))
        _fit_band(ax2, lrs, LR_BAND, floor=0.0)  # from 0, so the schedule's shape reads true to scale
    # Title left and legend right, both above the plot, so neither ever covers a curve.
    ax.set_title(title, loc="left")
    ax.legend(lines, [line.get_label() for line in lines], loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2,
              frameon=False, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# checkpoints


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict):
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples_to_lists(obj):
    if isinstance(obj, (tuple, list)):
        return [_tuples_to_lists(x) for x in obj]
    return obj


class CheckpointManager:
    """out/{weights_name}.pth: the weights alone, a plain v1 state dict (what every other script loads).
    out/{weights_name}.resume.pt: weights again plus everything `--resume` needs to continue exactly: optimizer,
    GradScaler, step, epoch and position in it, RNG states, model config, run flags, wandb run id, loss history,
    the held-out split (val_indices).
    Both are written atomically; the weights inside the resume file are what resume loads, so the two files can
    never disagree mid-save.
    """

    def __init__(self, out_dir: str | os.PathLike, weights_name: str, is_master: bool = True, save_state_dict_fn=None):
        self.out_dir = Path(out_dir)
        self.weights_path = self.out_dir / f"{weights_name}.pth"
        self.resume_path = self.out_dir / f"{weights_name}.resume.pt"
        self.is_master = is_master
        self.save_state_dict_fn = save_state_dict_fn

    def weights(self, model) -> dict:
        model = unwrap(model)
        if self.save_state_dict_fn is not None:
            return self.save_state_dict_fn(model)
        return clean_state_dict(model.state_dict())

    def save(self, model, optimizer, scaler, step: int, epoch: int, position: int, config: dict, args,
             wandb_id: str | None = None, history: list | None = None, deepspeed_engine=None,
             extra: dict | None = None) -> None:
        """Call on every rank (deepspeed gathers optimizer state collectively); only rank 0 writes the files.
        `extra` adds entries to the resume file (the training loop's held-out split)."""
        if deepspeed_engine is not None:
            deepspeed_engine.save_checkpoint(str(self.out_dir / f"{self.weights_path.stem}_deepspeed"),
                                             tag="resume")
        if not self.is_master:
            return
        weights = {k: v.detach().to("cpu") for k, v in self.weights(model).items()}
        if "tok_embeddings.weight" in weights:  # a whole model: its config JSON goes beside it
            save_weights(weights, self.weights_path, config)
        else:  # an adapter alone (LoRA without --merge) is not a model, so it gets no model config
            atomic_save(weights, self.weights_path)
        state = {
            "model": clean_state_dict(unwrap(model).state_dict()),
            "optimizer": optimizer.state_dict() if deepspeed_engine is None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "step": step, "epoch": epoch, "position": position,
            "rng": _rng_state(),
            "config": json.loads(json.dumps(config, default=str)),
            "args": json.loads(json.dumps(vars(args), default=str)),
            "wandb_id": wandb_id,
            "history": history or [],
            **(extra or {}),
        }
        atomic_save(state, self.resume_path)

    def load(self) -> dict:
        if not self.resume_path.exists():
            raise CheckpointError(f"--resume: no resume file at {self.resume_path}; run without --resume to start "
                                    f"a new run (or pass the --out_dir that holds it)")
        state = torch_load_checked(self.resume_path)
        if not isinstance(state, dict) or "step" not in state or "model" not in state:
            raise CheckpointError(f"--resume: {self.resume_path} is not a resume file written by this project; "
                                  f"delete it and run without --resume")
        return state


# ----------------------------------------------------------------------------------------------------------------
# the training loop


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _model_config(model) -> dict:
    config = getattr(unwrap(model), "config", None)
    return config.to_dict() if hasattr(config, "to_dict") else {}


def _deepspeed_engine(args, rt: Runtime, model, optimizer):
    import deepspeed

    with open(rt.deepspeed_config) as f:
        ds_config = json.load(f)
    # Fill the "auto" fields from our flags, so one JSON serves every batch size and dtype.
    ds_config["train_micro_batch_size_per_gpu"] = args.batch_size
    ds_config["gradient_accumulation_steps"] = args.accumulation_steps
    ds_config["train_batch_size"] = args.batch_size * args.accumulation_steps * rt.world_size
    ds_config["gradient_clipping"] = args.grad_clip
    ds_config["bf16"] = {"enabled": rt.dtype == torch.bfloat16}
    ds_config["fp16"] = {"enabled": rt.dtype == torch.float16}
    if optimizer is None:  # --optimizer muon: DeepSpeed's own Muon (with its auxiliary Adam) from the config
        ds_config["optimizer"] = deepspeed_muon_config(args)
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, config=ds_config,
                                                          model_parameters=deepspeed_muon_groups(model, args))
        return engine, ds_optimizer
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, ds_optimizer


def _steps_per_epoch(args, rt: Runtime, sampler, n_samples: int, n_held_out: int = 0) -> int:
    steps = sampler.per_rank // (args.batch_size * args.accumulation_steps)
    if steps == 0:
        held = f" (after holding out {n_held_out} for validation; lower --val_fraction)" if n_held_out else ""
        raise UsageError(f"dataset too small: {n_samples} samples{held} over {rt.world_size} rank(s) cannot fill one "
                         f"step of batch_size {args.batch_size} x accumulation_steps {args.accumulation_steps}")
    return steps


class _Items(torch.utils.data.Dataset):
    """`dataset` restricted to `indices` (the training items once the held-out ones are set aside, or one rank's
    share of those). Other attributes (`skipped`, ...) are the wrapped dataset's, which callers and the loop read."""

    def __init__(self, dataset, indices):
        self.dataset = dataset
        # One array rather than a list of Python ints, which every DataLoader worker would copy page by page.
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[int(self.indices[i])]

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("dataset", "indices"):  # unpickling in a worker asks before __init__
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _holdout(args, dataset, state: dict | None) -> tuple[object, list[int]]:
    """(the items to train on, the held-out indices). A resumed run keeps the split its resume file saved rather
    than recomputing it (under another --val_fraction or seed it would differ), so it validates on the same items."""
    n = len(dataset)
    if state is not None and state.get("val_indices") is not None:
        val_idx = [int(i) for i in state["val_indices"]]
        if val_idx and (min(val_idx) < 0 or max(val_idx) >= n):
            raise CheckpointError(f"--resume: the resume file holds out item {max(val_idx)} for validation, but the "
                                  f"dataset has {n:,} items; resume with the data the run was started on")
        train_idx = items_left(n, val_idx)
    else:
        if not 0 <= args.val_fraction < 1:
            raise UsageError(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
        train_idx, val_idx = holdout_split(n, args.val_fraction, args.seed)
    return (_Items(dataset, train_idx) if val_idx else dataset), val_idx


def resolve_eval_interval(args, total_steps: int, log_interval: int) -> int:
    """--eval_interval when given, else about 10 validations per run, rounded to a multiple of the log interval so
    that each validation lands on a line the run logs anyway (a validation step always gets a line)."""
    if args.eval_interval and args.eval_interval > 0:
        return args.eval_interval
    return max(1, round(max(1, total_steps // 10) / log_interval)) * log_interval


def evaluate_loss(model, items, rt: Runtime, batch_size: int, collate_fn=None) -> float:
    """Per-token mean loss of `model` over the held-out items, each rank passing its own share `items`: the loss
    SUM and loss-token COUNT are summed over ranks (every rank must call this, even one whose share is empty).
    Eval mode (no dropout, no MoE balance loss), no grad, autocast; the model goes back to train mode after."""
    acc_dtype = torch.float32 if rt.device_type == "mps" else torch.float64  # sums over many tokens
    totals = torch.zeros(2, dtype=acc_dtype, device=rt.device)
    # Its own generator, so validation never draws from the global RNG stream training runs on.
    loader = DataLoader(items, batch_size=batch_size, shuffle=False, collate_fn=collate_fn, num_workers=0,
                        generator=torch.Generator())
    model.eval()
    with torch.no_grad(), rt.autocast():
        for batch in loader:
            batch = _to_device(batch, rt.device)
            out = model(**batch, num_items_in_batch=1)  # 1: the sum over tokens
            totals += torch.stack([out.loss.to(acc_dtype), loss_item_count(batch).to(acc_dtype)])
    model.train()
    if rt.ddp:
        dist.all_reduce(totals)
    loss_sum, count = totals.tolist()
    return loss_sum / count if count else float("nan")


class _Validation:
    """The held-out loss at every `every` steps and at the last one (nothing when nothing is held out)."""

    def __init__(self, args, rt: Runtime, model, dataset, val_idx: list[int], collate_fn, every: int):
        self.rt, self.model, self.batch_size, self.collate_fn, self.every = rt, model, args.batch_size, collate_fn, every
        self.enabled = bool(val_idx)
        self.items = _Items(dataset, val_idx[rt.rank::rt.world_size])

    def __call__(self, step: int, total_steps: int, log: StepLogger) -> float | None:
        if not self.enabled or (step % self.every and step != total_steps):
            return None
        t0 = log.clock()
        loss = evaluate_loss(self.model, self.items, self.rt, self.batch_size, self.collate_fn)
        log.exclude(log.clock() - t0)  # validation time is not training throughput
        return loss


def _validation_note(n_held: int, n_items: int, every: int) -> str:
    if not n_held:
        return "validation: off (nothing held out: --val_fraction 0)"
    return f"validation: {n_held:,} held-out items ({100 * n_held / n_items:.2g}%), every {every:,} steps and at the end"


def _param_counts(model) -> tuple[int, int]:
    """(all parameters, trainable ones)."""
    params = list(unwrap(model).parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


# The flags that decide which windows an epoch holds and in what order: a resumed run with others would go on over
# other windows without a word. Absent (a resume file from before the flag, or a stage without it) is not compared.
RESUME_DATA_FLAGS = ("mix", "max_doc_tokens", "max_doc_chars", "packing", "seed", "max_seq_len")


def _check_resume_data_flags(ckpt, saved: dict, args) -> None:
    def shown(value) -> str:  # as typed on the command line; None (and 0) mean "no limit"
        if isinstance(value, (list, tuple)):
            return " ".join(map(str, value))
        return str(value or 0)

    for flag in RESUME_DATA_FLAGS if args is not None else ():
        if flag in saved and hasattr(args, flag) and shown(saved[flag]) != shown(getattr(args, flag)):
            raise CheckpointError(f"--resume: {ckpt.resume_path} was trained with --{flag} {shown(saved[flag])}, "
                                  f"this run has --{flag} {shown(getattr(args, flag))}; resume with the run's own "
                                  f"--{flag} (others would give other windows)")


def _resume(ckpt, state: dict, model, optimizer, scaler, strict: bool, args=None) -> tuple[int, list, str | None]:
    """Restore model, optimizer, scaler and RNG from the loaded resume file; (step, history, wandb run id)."""
    saved_cfg, cfg = state.get("config") or {}, json.loads(json.dumps(_model_config(model), default=str))
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "use_moe"):
        if key in saved_cfg and key in cfg and saved_cfg[key] != cfg[key]:
            raise CheckpointError(f"--resume: {ckpt.resume_path} was trained with {key}={saved_cfg[key]}, "
                                  f"this run has {key}={cfg[key]}")
    _check_resume_data_flags(ckpt, state.get("args") or {}, args)
    saved_optimizer = (state.get("args") or {}).get("optimizer", "adamw")  # files from before --optimizer: AdamW
    if args is not None and saved_optimizer != args.optimizer:
        raise CheckpointError(f"--resume: {ckpt.resume_path} was trained with --optimizer {saved_optimizer}, this "
                              f"run has --optimizer {args.optimizer}; resume with --optimizer {saved_optimizer}")
    unwrap(model).load_state_dict(state["model"], strict=strict)
    if state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    print0(f"resumed from {ckpt.resume_path} at step {state['step']}")
    return state["step"], list(state["history"]), state["wandb_id"]


def _training_wrappers(args, rt: Runtime, model, optimizer, ckpt, weights_name: str):
    """(deepspeed engine or None, optimizer, the module to call): deepspeed, or torch.compile and/or DDP."""
    if rt.deepspeed_config:
        engine, optimizer = _deepspeed_engine(args, rt, model, optimizer)
        if args.resume:
            engine.load_checkpoint(str(ckpt.out_dir / f"{weights_name}_deepspeed"), tag="resume",
                                   load_module_strict=False)
        return engine, optimizer, engine
    train_model = torch.compile(model) if args.compile else model
    if rt.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(train_model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
    return None, optimizer, train_model


def _step_loss(out, batches_per_step: int) -> torch.Tensor:
    """out.loss with the MoE balance loss (inside it in train mode) weighted 1/batches_per_step, i.e. its mean over
    the step's micro-batches, while the token loss is already this micro-batch's share of the step."""
    aux = getattr(out, "aux_loss", None)
    if aux is None or batches_per_step == 1:
        return out.loss
    return out.loss - aux * (1 - 1 / batches_per_step)


def _cross_entropy_part(loss: torch.Tensor, out) -> torch.Tensor:
    """The detached loss to log: without the z-loss term (a regulariser, not the fit; so the loss and its bits per
    character mean the same with and without --z_loss)."""
    z = getattr(out, "z_loss", None)
    return loss.detach() if z is None else loss.detach() - z.detach()


def _accumulate(train_model, engine, data_iter, rt: Runtime, scaler, log, batches_per_step: int,
                z_loss: float = 0.0) -> dict:
    """Forward and backward over one step's micro-batches; returns the last batch.

    The token loss is normalised over the whole step: each micro-batch's summed token CE is divided by the loss
    positions of all the step's micro-batches on all ranks, so every token weighs the same however uneven the rows
    and however the batch is split. That count stays on the device (one all_reduce per step, no host sync). It is
    passed divided by the world size because DDP and deepspeed average gradients over ranks: the result is the
    gradient of sum(token losses over all ranks) / their count.
    """
    batches = [_to_device(next(data_iter), rt.device) for _ in range(batches_per_step)]
    total = torch.stack([loss_item_count(b) for b in batches]).sum()
    if rt.ddp:
        dist.all_reduce(total)
    n_items = total.clamp(min=1) / rt.world_size  # a step with no loss token trains on 0, not NaN
    extra = {"z_loss": z_loss} if z_loss else {}  # off: the very call the loop always made
    for micro, batch in enumerate(batches):
        if engine is not None:
            out = engine(**batch, num_items_in_batch=n_items, **extra)
            loss = _step_loss(out, batches_per_step)
            engine.backward(loss * batches_per_step)  # deepspeed divides by its gradient_accumulation_steps: undone
            engine.step()
        else:
            last = micro == batches_per_step - 1
            # Skip the gradient all-reduce on all but the last micro-batch: it is wasted work.
            sync = nullcontext() if (last or not rt.ddp) else train_model.no_sync()
            with sync, rt.autocast():
                out = train_model(**batch, num_items_in_batch=n_items, **extra)
                loss = _step_loss(out, batches_per_step)
            scaler.scale(loss).backward()
        log.micro_batch(_cross_entropy_part(loss, out), real_token_count(batch), batch["input_ids"].numel())
    return batch


def _optimizer_step(model, optimizer, scaler, grad_clip: float) -> torch.Tensor | None:
    """Clip, step, zero; returns the gradient norm before clipping (a device tensor, read only when logged), None
    without clipping."""
    norm = None
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm


@dataclass
class _Run:
    """What the step loop works with, set up by train()."""
    model: torch.nn.Module
    train_model: torch.nn.Module
    engine: object
    optimizer: object
    ckpt: CheckpointManager
    log: StepLogger
    validation: _Validation
    sampler: ShardedSampler
    train_set: object
    collate_fn: object
    steps_per_epoch: int
    total_steps: int
    start_step: int
    val_idx: list
    step_callback: object = None


def _check_loop_flags(args, rt: Runtime, model, tokenizer) -> None:
    """One-line refusals of flag combinations the loop cannot honour (and of data made with another tokenizer than
    the run's), before any work."""
    check_optim_args(args, deepspeed=bool(rt.deepspeed_config))
    if tokenizer is not None:
        _check_data_tokenizer(args.data_path, tokenizer)
    if args.z_loss < 0:
        raise UsageError(f"--z_loss must be >= 0 (0: off), got {args.z_loss}")
    if args.z_loss and not getattr(model, "supports_z_loss", False):
        raise UsageError(f"--z_loss: this stage's model ({type(model).__name__}) computes its own loss and has no "
                         f"z-loss; drop --z_loss")


def train(args, rt: Runtime, model: torch.nn.Module, dataset, weights_name: str, collate_fn=None,
          save_state_dict_fn=None, run_name: str | None = None, step_callback=None,
          outputs: dict | None = None, tokenizer=None) -> list[dict]:
    """Train `model` on `dataset` (items are dicts passed as model(**batch); the loss is out.loss), holding out
    --val_fraction of the items for the validation loss.

    Saves out_dir/{weights_name}.pth (+ .resume.pt) every --save_interval steps and at the end, appends one line per
    log step to out_dir/{run_name}_metrics.jsonl, writes the loss PNG to --images_dir, ends the log with the list
    of paths written, and returns the logged history [{"step", "loss", "lr"} (+ "val_loss" where computed), ...].
    `save_state_dict_fn(model) -> dict` replaces the saved weights (e.g. LoRA merged into the base).
    `step_callback(step, history)` runs after each optimizer step (tests use it to simulate a crash).
    `outputs` ({what: path}) adds what the caller's own save_state_dict_fn writes to that closing list.
    `tokenizer` (the one the data was tokenized with) adds bits per character (bpc, val_bpc) to the log lines and
    the metrics file, from characters per token counted once at start-up (`text_counts`); without it, none.
    """
    run_name = run_name or weights_name
    _check_loop_flags(args, rt, model, tokenizer)
    model.to(rt.device)
    ckpt = CheckpointManager(args.out_dir, weights_name, rt.is_master, save_state_dict_fn)
    state = ckpt.load() if args.resume else None
    train_set, val_idx = _holdout(args, dataset, state)  # the same on every rank: it depends on the flags alone
    sampler = ShardedSampler(len(train_set), rt.rank, rt.world_size, seed=args.seed, shuffle=True)
    steps_per_epoch = _steps_per_epoch(args, rt, sampler, len(train_set), len(val_idx))
    total_steps = args.max_steps if args.max_steps > 0 else args.epochs * steps_per_epoch
    if getattr(dataset, "skipped", 0):
        print0(f"skipped {dataset.skipped} samples with no answer token left after truncation")

    optimizer = build_optimizer(args, model, rt.device_type, deepspeed=bool(rt.deepspeed_config))
    start_step, history, wandb_id = 0, [], None
    if state is not None:
        start_step, history, wandb_id = _resume(ckpt, state, model, optimizer, rt.scaler,
                                                strict=save_state_dict_fn is None, args=args)
    engine, optimizer, train_model = _training_wrappers(args, rt, model, optimizer, ckpt, weights_name)

    logger = make_logger(args, run_name, {**vars(args), "model": _model_config(model)}, wandb_id)
    n_params, n_trainable = _param_counts(model)
    print0(f"{run_name}: {n_params / 1e6:.2f}M params ({n_trainable / 1e6:.2f}M trainable), {len(train_set):,} "
           f"samples, {steps_per_epoch:,} steps/epoch, {total_steps:,} steps, world size {rt.world_size}, "
           f"device {rt.device}, dtype {args.dtype}{', deepspeed' if engine else ''}")
    interval = resolve_log_interval(args, total_steps)
    every = resolve_eval_interval(args, total_steps, interval)
    print0(log_interval_note(interval))
    print0(_validation_note(len(val_idx), len(dataset), every))
    counts = (None, None)
    if tokenizer is not None and rt.is_master:  # only rank 0 writes the lines that carry bpc
        counts = text_counts(tokenizer, train_set, dataset, val_idx)
        print0(_text_counts_note(counts))
    # A resumed run drops the lines the killed run logged after its last save: they are logged again.
    metrics = MetricsFile(Path(args.out_dir) / f"{run_name}_metrics.jsonl",
                          resume_step=start_step if state is not None else None, is_master=rt.is_master)
    log = StepLogger(rt, model, total_steps, interval, start_step, history, logger, metrics=metrics,
                     steps_per_epoch=steps_per_epoch, text_counts=counts)
    validation = _Validation(args, rt, model, dataset, val_idx, collate_fn, every)
    _train_steps(args, rt, _Run(model, train_model, engine, optimizer, ckpt, log, validation, sampler, train_set,
                                collate_fn, steps_per_epoch, total_steps, start_step, val_idx, step_callback))

    if rt.is_master:
        _closing_outputs(args, ckpt, history, weights_name, run_name, engine is not None, outputs, metrics.path)
    logger.finish()
    return history


def _train_steps(args, rt: Runtime, r: _Run) -> None:
    """The optimizer steps from r.start_step to r.total_steps: train, validate when due, log, save."""
    batches_per_step = args.accumulation_steps
    step = r.start_step
    r.train_model.train()
    data_iter, data_epoch = None, None
    while step < r.total_steps:
        epoch, step_in_epoch = divmod(step, r.steps_per_epoch)
        if data_iter is None or data_epoch != epoch:
            # The data position follows from the step alone, so resuming mid-epoch skips exactly what was seen.
            r.sampler.set_epoch(epoch, start=step_in_epoch * batches_per_step * args.batch_size)
            data_iter = iter(_epoch_loader(args, rt, r.train_set, r.sampler, r.collate_fn, epoch))
            data_epoch = epoch
        lr = set_scheduled_lrs(r.optimizer, args, step, r.total_steps)  # each group from its own peak

        batch = _accumulate(r.train_model, r.engine, data_iter, rt, rt.scaler, r.log, batches_per_step,
                            args.z_loss)
        if r.engine is None:
            grad_norm = _optimizer_step(r.model, r.optimizer, rt.scaler, args.grad_clip)
        else:  # deepspeed clipped (and stepped) inside engine.step()
            grad_norm = getattr(r.engine, "get_global_grad_norm", lambda: None)()
        step += 1
        val_loss = r.validation(step, r.total_steps, r.log)
        r.log.step_done(step, epoch, lr, batch["input_ids"].shape[1], grad_norm, val_loss)

        if step % args.save_interval == 0 or step == r.total_steps:
            epoch_after, pos_after = divmod(step, r.steps_per_epoch)
            r.ckpt.save(r.model, r.optimizer, rt.scaler, step, epoch_after,
                        pos_after * batches_per_step * args.batch_size, _model_config(r.model), args,
                        r.log.logger.run_id, r.log.history, deepspeed_engine=r.engine,
                        extra={"val_indices": r.val_idx})
        if r.step_callback is not None:
            r.step_callback(step, r.log.history)


def _epoch_loader(args, rt: Runtime, dataset, sampler, collate_fn, epoch: int) -> DataLoader:
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, collate_fn=collate_fn,
                      num_workers=args.num_workers, pin_memory=rt.device_type == "cuda", drop_last=True,
                      # its own generator, so worker seeding never draws from the global RNG stream
                      generator=torch.Generator().manual_seed(args.seed + epoch))


def _closing_outputs(args, ckpt, history, weights_name: str, run_name: str, deepspeed: bool, outputs,
                     metrics_path=None) -> None:
    """The loss plot, then the closing list of every path the run wrote."""
    plot = save_loss_plot(history, Path(args.images_dir) / f"{weights_name}_loss.png", title=run_name)
    print_outputs({"weights": ckpt.weights_path, "resume state": ckpt.resume_path,
                   "deepspeed state": ckpt.out_dir / f"{weights_name}_deepspeed" if deepspeed else None,
                   **(outputs or {}), "metrics": metrics_path, "loss plot": plot})
