"""Direct Preference Optimization with trl's DPOTrainer: prefer the chosen answer over the rejected one.

    python data_process.py dpo --input ../shared/data/dpo_zh.jsonl.gz --output dataset/dpo_data.jsonl
    python 5-dpo_train.py                                   # out/full_sft_512.pth -> out/rl_512.pth
    python 5-dpo_train.py --beta 0.1 --learning_rate 5e-6 --max_length 512
    python 5-dpo_train.py --use_lora --learning_rate 5e-5   # train adapters; the reference is the frozen base
    python 5-dpo_train.py --device cpu --max_steps 20 --batch_size 2
    torchrun --nproc_per_node 8 5-dpo_train.py
    python 5-dpo_train.py --resume                          # continue from the last trainer checkpoint

The reference model is a frozen copy of the starting policy; with --use_lora it is the policy with its adapters
switched off, so no second copy of the weights is kept. The data are `data_process.py dpo` records: the prompt
rendered with the chat template up to "<s>assistant\\n", and each answer as "{content}</s>\\n".

trl (pinned >=1.0,<2) does the batching, the loss and the optimizer; model/dpo.py adapts it to MiniMind. trl's
Trainer launches its own distributed setup from the torchrun environment, so this script does not call the
shared `compute_init`; it does write the same files: out/rl_{dim}{_moe}.pth (a plain v1 state dict, written
atomically), the loss curve in images/, one JSON line per log step in out/rl_{dim}{_moe}_metrics.jsonl, and
trainer checkpoints for --resume in out/rl_{dim}{_moe}_trainer/. --val_fraction of the pairs are held out for the
validation loss (val_loss), every --eval_interval steps and at the end.
"""

import argparse
import copy
import math
import os
from pathlib import Path

from transformers import PrinterCallback, ProgressCallback
from transformers.utils import logging as hf_logging
from trl import DPOConfig

from model.checkpoint import (
    clean_state_dict,
    default_device,
    default_dtype_name,
    load_tokenizer,
    read_stage_input,
    save_weights,
)
from model.dataset import load_dpo_records
from model.dpo import (
    DPOLogLines,
    MiniMindDPOTrainer,
    MiniMindForDPO,
    dpo_eval_steps,
    last_checkpoint_step,
    records_to_dataset,
    split_pairs,
)
from model.errors import exit_on_usage_error
from model.LMConfig import add_model_args, model_flags
from model.lora import DEFAULT_TARGETS, lora_config, merged_state_dict, save_adapter
from model.run_metrics import MetricsFile
from model.train_utils import (
    LOG_EVERY_S,
    add_train_args,
    log_interval_note,
    print_outputs,
    resolve_log_interval,
    save_loss_plot,
)

ROOT = Path(__file__).resolve().parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default=None, help="policy to start from (default: the newest {out_dir}/full_sft_<dim>.pth)")
    parser.add_argument("--beta", type=float, default=0.1, help="strength of the pull towards the reference")
    parser.add_argument("--max_length", type=int, default=None,
                        help="prompt + answer tokens (default: --max_seq_len); long prompts keep their end")
    parser.add_argument("--use_lora", action="store_true", help="train LoRA adapters instead of all weights")
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--lora_alpha", type=float, default=16)
    parser.add_argument("--lora_dropout", type=float, default=0.0)
    parser.add_argument("--lora_targets", nargs="+", default=list(DEFAULT_TARGETS))
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the bundled one of the model's family)")
    add_model_args(parser)
    # DPO moves a fine-tuned model a little: a small LR, small batches of (chosen, rejected) pairs.
    add_train_args(parser, data_path=str(ROOT / "dataset" / "dpo_data.jsonl"), learning_rate=5e-6,
                   weight_decay=0.0, batch_size=8, epochs=1, save_interval=1000, num_workers=0)
    return parser.parse_args(argv)


def dpo_steps(args, n_pairs: int) -> int:
    """The optimizer steps the Trainer will take: --max_steps, or the epochs over the pairs split across the ranks."""
    if args.max_steps > 0:
        return args.max_steps
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return args.epochs * math.ceil(n_pairs / (args.batch_size * args.accumulation_steps * world))


def make_dpo_config(args, config, device: str, n_pairs: int, validate: bool) -> DPOConfig:
    """trl's settings from our flags (the same flags and defaults as the other training scripts)."""
    total_steps = dpo_steps(args, n_pairs)
    logging_steps = resolve_log_interval(args, total_steps)
    # trl turns checkpointing on by default; MiniMind does not implement it (the models are small). transformers 5
    # renamed the field and warns on the old name, which transformers 4 still needs.
    name = "activation_checkpointing" if "activation_checkpointing" in DPOConfig.__dataclass_fields__ \
        else "gradient_checkpointing"
    no_activation_checkpointing = {name: False}
    return DPOConfig(
        output_dir=str(Path(args.out_dir) / f"rl_{config.file_suffix}_trainer"),
        beta=args.beta,
        max_length=args.max_length or config.max_seq_len,
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
        eval_strategy="steps" if validate else "no",
        eval_steps=dpo_eval_steps(args.eval_interval, total_steps, logging_steps) if validate else None,
        per_device_eval_batch_size=args.batch_size,
        pad_to_multiple_of=None,  # to the longest row of each batch ("auto" would pick 128 on Neuron devices)
        save_strategy="steps",
        save_steps=args.save_interval,
        save_total_limit=1,
        report_to=["wandb"] if args.use_wandb else "none",
        run_name=f"rl_{config.file_suffix}",
        seed=args.seed,
        use_cpu=device == "cpu",
        bf16=args.dtype == "bfloat16",
        fp16=args.dtype == "float16",
        **no_activation_checkpointing,
        torch_compile=args.compile,
        dataloader_num_workers=args.num_workers,
        deepspeed=args.deepspeed,
        disable_tqdm=True,
    )


@exit_on_usage_error
def main(argv=None):
    args = parse_args(argv)
    device = args.device or default_device()
    if args.dtype is None:
        args.dtype = default_dtype_name(device)
    out_dir = Path(args.out_dir)
    is_master = int(os.environ.get("RANK", "0")) == 0

    ckpt = read_stage_input(args.init, out_dir, "full_sft", model_flags(args))  # the shape comes from the file
    init = ckpt.path
    config, suffix = ckpt.config, ckpt.config.file_suffix
    train_set, val_set = split_pairs(records_to_dataset(load_dpo_records(args.data_path)), args.val_fraction,
                                     args.seed)
    tokenizer = load_tokenizer(args.tokenizer, config)

    policy = MiniMindForDPO(config)
    policy.load_state_dict(ckpt.state, strict=True)
    ref_model, peft_config = None, None
    if args.use_lora:
        peft_config = lora_config(args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
    else:
        ref_model = copy.deepcopy(policy).eval().requires_grad_(False)

    if args.use_wandb:
        os.environ.setdefault("WANDB_PROJECT", args.wandb_project)
    dpo_args = make_dpo_config(args, config, device, len(train_set), validate=val_set is not None)
    trainer = MiniMindDPOTrainer(model=policy, ref_model=ref_model, args=dpo_args, train_dataset=train_set,
                                 eval_dataset=val_set, processing_class=tokenizer, peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    # Each trainer checkpoint would also draw a one-shard "Writing model shards" progress bar into the log.
    hf_logging.disable_progress_bar()
    resume_step = last_checkpoint_step(dpo_args.output_dir) if args.resume else None
    metrics = MetricsFile(out_dir / f"rl_{suffix}_metrics.jsonl", resume_step=resume_step, is_master=is_master)
    log = DPOLogLines(metrics, LOG_EVERY_S)
    trainer.add_callback(log)
    if is_master:
        n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        every = f"val_loss every {dpo_args.eval_steps} steps"
        held_out = "" if val_set is None else f" (+{len(val_set):,} held out, {every})"
        lora = " (LoRA)" if args.use_lora else ""
        print(f"DPO on {len(train_set):,} pairs{held_out} from {init}: beta {args.beta}, "
              f"max_length {dpo_args.max_length}, {n_train / 1e6:.2f}M trainable params{lora}, device {device}, "
              f"dtype {args.dtype}, world size {dpo_args.world_size}, {log_interval_note(dpo_args.logging_steps)}",
              flush=True)
    trainer.train(resume_from_checkpoint=True if args.resume else None)

    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        lora_dir = out_dir / f"rl_{suffix}_lora" if args.use_lora else None
        if args.use_lora:
            save_adapter(model, lora_dir)
            state = merged_state_dict(model)
        else:
            state = clean_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
        path = save_weights(state, out_dir / f"rl_{suffix}.pth", config)
        plot = save_loss_plot(log.history, Path(args.images_dir) / f"rl_{suffix}_loss.png", title=f"DPO rl_{suffix}")
        print_outputs({"weights": path, "adapter (peft)": lora_dir, "resume state": Path(dpo_args.output_dir),
                       "loss plot": plot, "metrics": metrics.path})
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
