"""Online RL with group-relative advantages (GRPO and its variants) with trl's GRPOTrainer, on verifiable rewards.

    python data_process.py arithmetic                       # dataset/grpo_arithmetic.jsonl (+ sft_arithmetic.jsonl)
    python 6-grpo_train.py                                  # out/full_sft_512.pth -> out/grpo_512.pth
    python 6-grpo_train.py --rewards math:1 format:0.2 length:0.1 --loss_type cispo --beta 0.01
    python 6-grpo_train.py --rewards math rm:0.5 --reward_model out/my_reward_model
    python 6-grpo_train.py --task tools --init out/full_sft_768.pth --max_tool_turns 3   # MiniMind-3 family
    python 6-grpo_train.py --use_lora --learning_rate 5e-5 --gradient_checkpointing     # small GPUs
    python 6-grpo_train.py --device cpu --max_steps 40 --batch_size 16 --num_generations 8
    torchrun --nproc_per_node 8 6-grpo_train.py
    accelerate launch --config_file my_deepspeed.yaml 6-grpo_train.py --use_vllm   # trl's vLLM rollouts

Each step samples --num_generations replies per prompt, scores them with the --rewards functions (model/rewards.py),
and pushes the policy towards the replies that beat their group's mean. Rollouts go through our batched engine
(model/engine.py); --generator trl uses trl's own generate, --use_vllm trl's vLLM mode. With --beta 0 (the
default) no reference model is kept; with --use_lora the reference is the base with the adapter off.

Writes out/grpo_{dim}{_moe}.pth (a plain v1 state dict, written atomically), the reward curve in images/, one JSON
line per log step in out/grpo_{dim}{_moe}_metrics.jsonl (reward total and per function, kl, completion length,
clip ratio, val_accuracy on --val_fraction of the prompts), and trainer checkpoints for --resume.
"""

import argparse
import copy
import math
import os
from pathlib import Path

from trl import GRPOConfig

from model.checkpoint import add_tokenizer_arg, default_device, default_dtype_name, load_tokenizer, read_stage_input
from model.dpo import MiniMindForTRL, last_checkpoint_step
from model.errors import UsageError, exit_on_usage_error
from model.grpo import (
    EngineRollout,
    GRPOLogLines,
    MiniMindGRPOTrainer,
    ToolRollout,
    load_grpo_records,
    records_to_dataset,
    save_reward_plot,
    split_records,
)
from model.LMConfig import add_model_args, model_flags
from model.lora import add_lora_args, lora_config
from model.rewards import build_rewards
from model.run_metrics import MetricsFile
from model.train_utils import LOG_EVERY_S, add_train_args, log_interval_note, resolve_log_interval
from model.trl_stage import choose_optimizer, is_master, quiet, save_results, trainer_fields, world_size

ROOT = Path(__file__).resolve().parent
DEFAULT_REWARDS = {"math": ["math:1", "format:0.2", "length:0.1"], "tools": ["tool:1", "format:0.2", "length:0.1"]}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default=None, help="policy to start from (default: the newest {out_dir}/full_sft_<dim>.pth)")
    parser.add_argument("--task", choices=["math", "tools"], default="math", help="tools: multi-turn tool-use episodes")
    parser.add_argument("--rewards", nargs="+", default=None,
                        help="name[:weight] from math, format, length, tool, rm (default: math:1 format:0.2 length:0.1; "
                             "tools: tool:1 format:0.2 length:0.1)")
    parser.add_argument("--reward_model", default=None, help="sequence-classification model folder for the rm reward")
    parser.add_argument("--length_target", type=int, default=None,
                        help="replies longer than this lose reward (default 3/4 of --max_completion_length)")
    parser.add_argument("--num_generations", type=int, default=8, help="replies sampled per prompt (the group)")
    parser.add_argument("--max_completion_length", type=int, default=128, help="new tokens per reply (episode)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--loss_type", choices=["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo"], default="dapo")
    parser.add_argument("--beta", type=float, default=0.0, help="KL weight to the reference (0: no reference kept)")
    parser.add_argument("--epsilon", type=float, default=0.2, help="clipping range (cispo: see trl's docs)")
    parser.add_argument("--epsilon_high", type=float, default=None, help="upper clipping range (DAPO's clip-higher)")
    parser.add_argument("--num_iterations", type=int, default=1, help="optimisation passes over each generation batch")
    parser.add_argument("--scale_rewards", choices=["group", "batch", "none"], default="group")
    parser.add_argument("--mask_truncated_completions", action="store_true")
    parser.add_argument("--max_tool_turns", type=int, default=3, help="--task tools: tool-call rounds per episode")
    parser.add_argument("--think", action="store_true", help="MiniMind-3 family: prompts open a <think> block")
    parser.add_argument("--generator", choices=["engine", "trl"], default="engine", help="who generates the rollouts")
    parser.add_argument("--use_vllm", action="store_true", help="trl's vLLM rollouts (GPU, vllm installed)")
    parser.add_argument("--vllm_mode", choices=["colocate", "server"], default="colocate")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations: less memory")
    add_lora_args(parser, with_switch=True)
    add_tokenizer_arg(parser)
    add_model_args(parser)
    add_train_args(parser, data_path=str(ROOT / "dataset" / "grpo_arithmetic.jsonl"), learning_rate=1e-6,
                   weight_decay=0.0, batch_size=16, epochs=1, save_interval=1000, num_workers=0, val_fraction=0.05)
    return parser.parse_args(argv)


def grpo_steps(args, n_prompts: int) -> int:
    """Optimizer steps: --max_steps, or the epochs over the prompts (each step takes batch/num_generations prompts
    per micro-batch and rank)."""
    if args.max_steps > 0:
        return args.max_steps
    prompts_per_step = args.batch_size * args.accumulation_steps * world_size() // args.num_generations
    return args.epochs * math.ceil(n_prompts / max(1, prompts_per_step)) * args.num_iterations


def accuracy_interval(total_steps: int) -> int:
    """--eval_interval 0: about 10 held-out evaluations per run (besides the start); a short run only at its end."""
    return total_steps if total_steps < 20 else total_steps // 10


def check_args(args, config, tokenizer) -> None:
    if (args.batch_size * args.accumulation_steps * world_size()) % args.num_generations:
        raise UsageError(f"--batch_size x --accumulation_steps x ranks must be a multiple of --num_generations "
                         f"({args.num_generations}); e.g. --batch_size {args.num_generations * 2}")
    if args.task == "tools" and (args.use_vllm or args.generator == "trl"):
        raise UsageError("--task tools runs its episodes on our engine; drop --use_vllm / --generator trl")
    if args.task == "tools" and "tools" not in (tokenizer.chat_template or ""):
        raise UsageError("--task tools needs a chat template with tools (the MiniMind-3 family); this policy's "
                         "tokenizer has none: SFT a MiniMind-3 model first (--preset minimind-3)")
    if args.reward_model and not (Path(args.reward_model) / "config.json").is_file():
        raise UsageError(f"--reward_model {args.reward_model}: not a transformers model folder (no config.json); "
                         "save one with model.save_pretrained(folder) and its tokenizer beside it")


def make_grpo_config(args, config, device: str, n_prompts: int, reward_weights: list[float]) -> GRPOConfig:
    total_steps = grpo_steps(args, n_prompts)
    common = trainer_fields(args, device, Path(args.out_dir) / f"grpo_{config.file_suffix}_trainer",
                            f"grpo_{config.file_suffix}", resolve_log_interval(args, total_steps),
                            activation_checkpointing=args.gradient_checkpointing)
    return GRPOConfig(
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, loss_type=args.loss_type,
        beta=args.beta, epsilon=args.epsilon, epsilon_high=args.epsilon_high, num_iterations=args.num_iterations,
        scale_rewards=args.scale_rewards, mask_truncated_completions=args.mask_truncated_completions,
        reward_weights=reward_weights, use_vllm=args.use_vllm, vllm_mode=args.vllm_mode,
        max_tool_calling_iterations=args.max_tool_turns, remove_unused_columns=False,
        **common)


def make_rollout(args, tokenizer):
    if args.use_vllm or args.generator == "trl":
        return None  # trl's own generation
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if args.task == "tools":
        return ToolRollout(tokenizer, args.max_completion_length, args.max_tool_turns,
                           thinking=args.think if args.think else None, **sampling)
    return EngineRollout(tokenizer, args.max_completion_length, **sampling)


@exit_on_usage_error
def main(argv=None):
    args = parse_args(argv)
    # trl marks rollout_func experimental on every run; requirements.txt pins the trl range it was tested with.
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    device = args.device or default_device()
    args.dtype = args.dtype or default_dtype_name(device)
    out_dir = Path(args.out_dir)
    ckpt = read_stage_input(args.init, out_dir, "full_sft", model_flags(args))  # the shape comes from the file
    config, suffix = ckpt.config, ckpt.config.file_suffix
    tokenizer = load_tokenizer(args.tokenizer, config)
    check_args(args, config, tokenizer)
    train_records, val_records = split_records(load_grpo_records(args.data_path), args.val_fraction, args.seed)
    thinking = True if args.think else None
    train_set = records_to_dataset(train_records, tokenizer, thinking, args.task)
    val_set = records_to_dataset(val_records, tokenizer, thinking, args.task) if val_records else None

    policy = MiniMindForTRL(config)
    policy.load_state_dict(ckpt.state, strict=True)
    peft_config = lora_config(args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets) \
        if args.use_lora else None
    ref_model = copy.deepcopy(policy).eval().requires_grad_(False) if args.beta and not args.use_lora else None
    funcs, weights = build_rewards(args.rewards or DEFAULT_REWARDS[args.task], tokenizer, args.max_completion_length,
                                   args.reward_model, args.length_target)
    grpo_args = make_grpo_config(args, config, device, len(train_set), weights)
    trainer = MiniMindGRPOTrainer(model=policy, ref_model=ref_model, reward_funcs=funcs, args=grpo_args,
                                  train_dataset=train_set, processing_class=tokenizer, peft_config=peft_config,
                                  rollout_func=make_rollout(args, tokenizer), val_dataset=val_set,
                                  accuracy_every=args.eval_interval or accuracy_interval(grpo_steps(args, len(train_set))))
    resume_step = last_checkpoint_step(grpo_args.output_dir) if args.resume else None
    metrics = MetricsFile(out_dir / f"grpo_{suffix}_metrics.jsonl", resume_step=resume_step, is_master=is_master())
    log = GRPOLogLines(metrics, LOG_EVERY_S)
    choose_optimizer(trainer, args)
    quiet(trainer, log)
    if is_master():
        start = trainer.accuracy_now()
        if resume_step is None:
            log.log_start(start)
        n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        print(f"GRPO ({args.loss_type}) on {len(train_set):,} prompts (+{len(val_records):,} held out) from "
              f"{ckpt.path}: {args.num_generations} replies each, rewards {' '.join(args.rewards or DEFAULT_REWARDS[args.task])}, "
              f"beta {args.beta}, {n_train / 1e6:.2f}M trainable params, device {device}, world size "
              f"{grpo_args.world_size}, {log_interval_note(grpo_args.logging_steps)}"
              + "".join(f"; {k} at the start {v:.3f}" for k, v in start.items()), flush=True)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    save_results(trainer, config, out_dir, "grpo", args.use_lora, log, metrics, args.images_dir, f"GRPO grpo_{suffix}",
                 plot=save_reward_plot)


if __name__ == "__main__":
    main()
