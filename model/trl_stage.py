"""What the trl-driven stages (5-dpo_train.py, 6-grpo_train.py) share: the Trainer settings our flags map to, the
quiet console, and the files written at the end (weights, adapter, loss plot, metrics)."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import PrinterCallback, ProgressCallback, TrainingArguments
from transformers.utils import logging as hf_logging

from .checkpoint import clean_state_dict, save_weights
from .lora import merged_state_dict, save_adapter
from .optim import refuse_loop_only_flags
from .train_utils import print_outputs, save_loss_plot


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_master() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def trainer_fields(args, device: str, output_dir: Path, run_name: str, logging_steps: int,
                   activation_checkpointing: bool = False) -> dict:
    """TrainingArguments fields from the shared training flags (model/train_utils.add_train_args)."""
    refuse_loop_only_flags(args)  # trl brings its own schedule: --lr_schedule and --z_loss would do nothing
    # transformers 5 renamed gradient_checkpointing and warns on the old name, which transformers 4 still needs.
    name = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    return dict(
        output_dir=str(output_dir),
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": args.min_lr_ratio},
        warmup_steps=args.warmup_iters,
        weight_decay=args.weight_decay,
        max_grad_norm=args.grad_clip if args.grad_clip > 0 else 1e9,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulation_steps,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps if args.max_steps > 0 else -1,
        logging_steps=logging_steps,
        save_strategy="steps",
        save_steps=args.save_interval,
        save_total_limit=1,
        report_to=["wandb"] if args.use_wandb else "none",
        run_name=run_name,
        seed=args.seed,
        use_cpu=device == "cpu",
        bf16=args.dtype == "bfloat16",
        fp16=args.dtype == "float16",
        torch_compile=args.compile,
        dataloader_num_workers=args.num_workers,
        deepspeed=args.deepspeed,
        disable_tqdm=True,
        **{name: activation_checkpointing},
    )


def choose_optimizer(trainer, args) -> None:
    """--optimizer muon: the trainer (a `MuonInTrainer`) builds Muon + AdamW instead of its AdamW."""
    trainer.muon_flags = args if args.optimizer == "muon" else None


def quiet(trainer, log_callback) -> None:
    """Our one line per log step instead of the Trainer's dicts and progress bars."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    # Each trainer checkpoint would also draw a one-shard "Writing model shards" progress bar into the log.
    hf_logging.disable_progress_bar()
    trainer.add_callback(log_callback)


def save_results(trainer, config, out_dir: Path, stage: str, use_lora: bool, log, metrics, images_dir: str,
                 title: str, plot=save_loss_plot) -> None:
    """Rank 0 writes {stage}_{suffix}.pth (a plain v1 state dict; LoRA merged, its adapter beside it), the loss
    plot and lists the outputs; every rank waits for it."""
    if trainer.is_world_process_zero():
        suffix = config.file_suffix
        model = trainer.accelerator.unwrap_model(trainer.model)
        lora_dir = out_dir / f"{stage}_{suffix}_lora" if use_lora else None
        if use_lora:
            save_adapter(model, lora_dir)
            state = merged_state_dict(model)
        else:
            state = clean_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
        path = save_weights(state, out_dir / f"{stage}_{suffix}.pth", config)
        figure = plot(log.history, Path(images_dir) / f"{stage}_{suffix}_loss.png", title=title)
        print_outputs({"weights": path, "adapter (peft)": lora_dir, "resume state": Path(trainer.args.output_dir),
                       "loss plot": figure, "metrics": metrics.path})
    trainer.accelerator.wait_for_everyone()
