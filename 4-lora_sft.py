"""LoRA fine-tuning: train small low-rank adapters on a frozen MiniMind, on the same SFT data as 3-full_sft.py.

    python 4-lora_sft.py                                   # adapters on out/full_sft_512.pth
    python 4-lora_sft.py --data_path dataset/lora_identity.bin --lora_rank 16 --lora_alpha 32 --merge
    python 4-lora_sft.py --device cpu --max_steps 50 --batch_size 4
    torchrun --nproc_per_node 4 4-lora_sft.py --merge

Writes, under --out_dir:
- lora_sft_{dim}{_moe}/             the adapter in peft format (adapter_config.json + adapter_model.safetensors),
                                    every --save_interval steps and at the end; use it with
                                    `python 2-eval.py --ckpt out/full_sft_512.pth --lora_dir out/lora_sft_512`;
- lora_sft_{dim}{_moe}.pth          with --merge: the adapters folded into the base, a plain v1 state dict that
                                    every script loads like any other checkpoint;
- lora_sft_{dim}{_moe}_adapter.pth  without --merge: the adapter weights as a torch state dict;
- and the matching .resume.pt for --resume.
"""

import argparse
from pathlib import Path

from model.checkpoint import add_tokenizer_arg, load_model, load_tokenizer, read_stage_input
from model.errors import UsageError, exit_on_usage_error
from model.LMConfig import add_model_args, model_flags
from model.lora import adapter_state_dict, add_lora, add_lora_args, merged_state_dict, save_adapter
from model.packing import add_packing_arg, load_sft_data
from model.train_utils import add_train_args, compute_cleanup, compute_init, print0, train

ROOT = Path(__file__).resolve().parent


@exit_on_usage_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default=None, help="base weights (default: the newest {out_dir}/full_sft_<dim>.pth)")
    add_lora_args(parser)
    parser.add_argument("--merge", action="store_true", help="also save the merged model as a v1 .pth")
    add_tokenizer_arg(parser)
    add_packing_arg(parser)
    add_model_args(parser)
    # Adapters start at zero and are few, so they take a higher LR than full fine-tuning, and no weight decay.
    add_train_args(parser, data_path=str(ROOT / "dataset" / "sft_data.bin"), learning_rate=1e-3, weight_decay=0.0,
                   batch_size=8, epochs=1, save_interval=1000)
    args = parser.parse_args(argv)
    rt = compute_init(args)

    ckpt = read_stage_input(args.init, args.out_dir, "full_sft", model_flags(args))  # the shape comes from the file
    init = ckpt.path
    config = ckpt.config
    base = load_model(ckpt, device="cpu")
    try:
        model = add_lora(base, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
    except ValueError as err:
        raise UsageError(str(err)) from None
    print0(f"LoRA rank {args.lora_rank} alpha {args.lora_alpha} on {' '.join(args.lora_targets)} over {init}")
    dataset, data_line = load_sft_data(args.data_path, config.max_seq_len, packed=not args.no_packing)
    print0(data_line)

    name = f"lora_sft_{config.file_suffix}"
    adapter_dir = Path(args.out_dir) / name

    def weights(peft_model):
        # The shared loop calls this on rank 0 at every save: refresh the peft-format adapter at the same time.
        save_adapter(peft_model, adapter_dir)
        return merged_state_dict(peft_model) if args.merge else adapter_state_dict(peft_model)

    train(args, rt, model, dataset, weights_name=name if args.merge else f"{name}_adapter",
          save_state_dict_fn=weights, run_name=name, outputs={"adapter (peft)": adapter_dir},
          tokenizer=load_tokenizer(args.tokenizer, config=config))
    compute_cleanup()


if __name__ == "__main__":
    main()
