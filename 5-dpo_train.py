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
atomically), the loss curve in images/, and trainer checkpoints for --resume in out/rl_{dim}{_moe}_trainer/.
"""

import argparse
import copy
import os
import sys
from pathlib import Path

from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from trl import DPOConfig

from model.checkpoint import (
    atomic_save,
    clean_state_dict,
    default_device,
    default_dtype_name,
    load_state_dict,
    load_tokenizer,
)
from model.dataset import load_dpo_records
from model.dpo import MiniMindDPOTrainer, MiniMindForDPO, records_to_dataset
from model.LMConfig import add_model_args, config_from_args
from model.lora import DEFAULT_TARGETS, lora_config, merged_state_dict, save_adapter
from model.train_utils import add_train_args, save_loss_plot

ROOT = Path(__file__).resolve().parent


class LogLines(TrainerCallback):
    """One line per logging step on rank 0 (instead of the Trainer's dicts), and the history for the loss plot."""

    def __init__(self):
        self.history = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        self.history.append({"step": state.global_step, "loss": logs["loss"], "lr": logs.get("learning_rate", 0.0)})
        print(f"step {state.global_step}/{state.max_steps} | loss {logs['loss']:.4f} | "
              f"margin {logs.get('rewards/margins', 0.0):.4f} | acc {logs.get('rewards/accuracies', 0.0):.2f} | "
              f"chosen {logs.get('rewards/chosen', 0.0):.4f} | rejected {logs.get('rewards/rejected', 0.0):.4f} | "
              f"lr {logs.get('learning_rate', 0.0):.2e}", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default=None, help="policy to start from (default: {out_dir}/full_sft_{dim}{_moe}.pth)")
    parser.add_argument("--beta", type=float, default=0.1, help="strength of the pull towards the reference")
    parser.add_argument("--max_length", type=int, default=None,
                        help="prompt + answer tokens (default: --max_seq_len); long prompts keep their end")
    parser.add_argument("--use_lora", action="store_true", help="train LoRA adapters instead of all weights")
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--lora_alpha", type=float, default=16)
    parser.add_argument("--lora_dropout", type=float, default=0.0)
    parser.add_argument("--lora_targets", nargs="+", default=list(DEFAULT_TARGETS))
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: model/minimind_tokenizer)")
    add_model_args(parser)
    # DPO moves a fine-tuned model a little: a small LR, small batches of (chosen, rejected) pairs.
    add_train_args(parser, data_path=str(ROOT / "dataset" / "dpo_data.jsonl"), learning_rate=5e-6,
                   weight_decay=0.0, batch_size=8, epochs=1, save_interval=1000, log_interval=10, num_workers=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    config = config_from_args(args)
    suffix = config.file_suffix
    device = args.device or default_device()
    if args.dtype is None:
        args.dtype = default_dtype_name(device)
    out_dir = Path(args.out_dir)
    is_master = int(os.environ.get("RANK", "0")) == 0

    init = Path(args.init) if args.init else out_dir / f"full_sft_{suffix}.pth"
    if not init.exists():
        sys.exit(f"no policy to start from at {init}: run 3-full_sft.py first, or pass --init")
    try:
        dataset = records_to_dataset(load_dpo_records(args.data_path))
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    tokenizer = load_tokenizer(args.tokenizer)

    policy = MiniMindForDPO(config)
    try:
        policy.load_state_dict(load_state_dict(init), strict=True)
    except RuntimeError as err:
        sys.exit(f"{init} does not match the model flags (dim={config.dim}, n_layers={config.n_layers}, "
                 f"use_moe={config.use_moe}):\n{err}")
    ref_model, peft_config = None, None
    if args.use_lora:
        peft_config = lora_config(args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
    else:
        ref_model = copy.deepcopy(policy).eval().requires_grad_(False)

    if args.use_wandb:
        os.environ.setdefault("WANDB_PROJECT", args.wandb_project)
    dpo_args = DPOConfig(
        output_dir=str(out_dir / f"rl_{suffix}_trainer"),
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
        logging_steps=args.log_interval,
        save_strategy="steps",
        save_steps=args.save_interval,
        save_total_limit=1,
        report_to=["wandb"] if args.use_wandb else "none",
        run_name=f"rl_{suffix}",
        seed=args.seed,
        use_cpu=device == "cpu",
        bf16=args.dtype == "bfloat16",
        fp16=args.dtype == "float16",
        gradient_checkpointing=False,  # MiniMind does not implement it; the models are small
        torch_compile=args.compile,
        dataloader_num_workers=args.num_workers,
        deepspeed=args.deepspeed,
        disable_tqdm=True,
    )
    trainer = MiniMindDPOTrainer(model=policy, ref_model=ref_model, args=dpo_args, train_dataset=dataset,
                                 processing_class=tokenizer, peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    log = LogLines()
    trainer.add_callback(log)
    if is_master:
        n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        print(f"DPO on {len(dataset):,} pairs from {init}: beta {args.beta}, max_length {dpo_args.max_length}, "
              f"{n_train / 1e6:.2f}M trainable params{' (LoRA)' if args.use_lora else ''}, device {device}, "
              f"dtype {args.dtype}, world size {dpo_args.world_size}", flush=True)
    trainer.train(resume_from_checkpoint=True if args.resume else None)

    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        if args.use_lora:
            save_adapter(model, out_dir / f"rl_{suffix}_lora")
            state = merged_state_dict(model)
        else:
            state = clean_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
        path = atomic_save(state, out_dir / f"rl_{suffix}.pth")
        save_loss_plot(log.history, Path(args.images_dir) / f"rl_{suffix}_loss.png", title=f"DPO rl_{suffix}")
        print(f"saved {path}", flush=True)
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
