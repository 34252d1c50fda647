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

from trl import DPOConfig

from model.checkpoint import (
    add_tokenizer_arg,
    default_device,
    default_dtype_name,
    load_tokenizer,
    read_stage_input,
)
from model.dataset import load_dpo_records
from model.dpo import (
    DPOLogLines,
    MiniMindDPOTrainer,
    MiniMindForTRL,
    dpo_eval_steps,
    last_checkpoint_step,
    records_to_dataset,
    split_pairs,
)
from model.errors import exit_on_usage_error
from model.LMConfig import add_model_args, model_flags
from model.lora import add_lora_args, lora_config
from model.run_metrics import MetricsFile
from model.train_utils import (
    LOG_EVERY_S,
    add_train_args,
    log_interval_note,
    resolve_log_interval,
)
from model.trl_stage import choose_optimizer, is_master, quiet, save_results, trainer_fields, world_size

ROOT = Path(__file__).resolve().parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default=None, help="policy to start from (default: the newest {out_dir}/full_sft_<dim>.pth)")
    parser.add_argument("--beta", type=float, default=0.1, help="strength of the pull towards the reference")
    parser.add_argument("--max_length", type=int, default=None,
                        help="prompt + answer tokens (default: --max_seq_len); long prompts keep their end")
    add_lora_args(parser, with_switch=True)
    add_tokenizer_arg(parser)
    add_model_args(parser)
    # DPO moves a fine-tuned model a little: a small LR, small batches of (chosen, rejected) pairs.
    add_train_args(parser, data_path=str(ROOT / "dataset" / "dpo_data.jsonl"), learning_rate=5e-6,
                   weight_decay=0.0, batch_size=8, epochs=1, save_interval=1000, num_workers=0)
    return parser.parse_args(argv)


def dpo_steps(args, n_pairs: int) -> int:
    """The optimizer steps the Trainer will take: --max_steps, or the epochs over the pairs split across the ranks."""
    if args.max_steps > 0:
        return args.max_steps
    return args.epochs * math.ceil(n_pairs / (args.batch_size * args.accumulation_steps * world_size()))


def make_dpo_config(args, config, device: str, n_pairs: int, validate: bool) -> DPOConfig:
    """trl's settings from our flags (the same flags and defaults as the other training scripts)."""
    total_steps = dpo_steps(args, n_pairs)
    logging_steps = resolve_log_interval(args, total_steps)
    # trl turns activation checkpointing on by default; MiniMind's models are small enough not to need it here.
    common = trainer_fields(args, device, Path(args.out_dir) / f"rl_{config.file_suffix}_trainer",
                            f"rl_{config.file_suffix}", logging_steps, activation_checkpointing=False)
    return DPOConfig(
        beta=args.beta,
        max_length=args.max_length or config.max_seq_len,
        eval_strategy="steps" if validate else "no",
        eval_steps=dpo_eval_steps(args.eval_interval, total_steps, logging_steps) if validate else None,
        per_device_eval_batch_size=args.batch_size,
        pad_to_multiple_of=None,  # to the longest row of each batch ("auto" would pick 128 on Neuron devices)
        **common,
    )


@exit_on_usage_error
def main(argv=None):
    args = parse_args(argv)
    device = args.device or default_device()
    if args.dtype is None:
        args.dtype = default_dtype_name(device)
    out_dir = Path(args.out_dir)

    ckpt = read_stage_input(args.init, out_dir, "full_sft", model_flags(args))  # the shape comes from the file
    init = ckpt.path
    config, suffix = ckpt.config, ckpt.config.file_suffix
    train_set, val_set = split_pairs(records_to_dataset(load_dpo_records(args.data_path)), args.val_fraction,
                                     args.seed)
    tokenizer = load_tokenizer(args.tokenizer, config)

    policy = MiniMindForTRL(config)
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
    resume_step = last_checkpoint_step(dpo_args.output_dir) if args.resume else None
    metrics = MetricsFile(out_dir / f"rl_{suffix}_metrics.jsonl", resume_step=resume_step, is_master=is_master())
    log = DPOLogLines(metrics, LOG_EVERY_S)
    choose_optimizer(trainer, args)
    quiet(trainer, log)
    if is_master():
        n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        every = f"val_loss every {dpo_args.eval_steps} steps"
        held_out = "" if val_set is None else f" (+{len(val_set):,} held out, {every})"
        lora = " (LoRA)" if args.use_lora else ""
        print(f"DPO on {len(train_set):,} pairs{held_out} from {init}: beta {args.beta}, "
              f"max_length {dpo_args.max_length}, {n_train / 1e6:.2f}M trainable params{lora}, device {device}, "
              f"dtype {args.dtype}, world size {dpo_args.world_size}, {log_interval_note(dpo_args.logging_steps)}",
              flush=True)
    trainer.train(resume_from_checkpoint=True if args.resume else None)

    save_results(trainer, config, out_dir, "rl", args.use_lora, log, metrics, args.images_dir, f"DPO rl_{suffix}")

if __name__ == "__main__":
    main()
