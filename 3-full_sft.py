"""Supervised fine-tuning: turn a pretrained MiniMind into a chat model (all weights trained).

    python data_process.py sft --input ../shared/data/sft_zh.jsonl.gz --output dataset/sft_data.bin
    python 3-full_sft.py                                    # out/pretrain_512.pth -> out/full_sft_512.pth
    python 3-full_sft.py --device cpu --max_steps 100 --batch_size 8
    torchrun --nproc_per_node 8 3-full_sft.py --batch_size 32
    deepspeed --num_gpus 8 3-full_sft.py --batch_size 32    # ZeRO config: ds_config_zero2.json (or --deepspeed)
    python 3-full_sft.py --resume                           # continue exactly where the last save left off

Single-turn and multi-turn samples (the `history` field) come from the data itself. The loss covers the
assistant's answers only, every assistant turn of a conversation included; system and user tokens and the chat
template's glue are masked out. Conversations longer than --max_seq_len lose their oldest turns first, and a
sample with no answer token left is skipped and counted (see model/dataset.py). Whole conversations are packed
into windows of --max_seq_len, attending only within themselves, so no compute goes to padding (model/packing.py;
--no_packing pads each one instead, as v1 did).
"""

import argparse
from pathlib import Path

from model.checkpoint import add_tokenizer_arg, load_model, load_tokenizer, read_stage_input
from model.errors import exit_on_usage_error
from model.LMConfig import add_model_args, model_flags
from model.packing import add_packing_arg, load_sft_data
from model.train_utils import add_train_args, compute_cleanup, compute_init, print0, train

ROOT = Path(__file__).resolve().parent


@exit_on_usage_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default=None,
                        help="weights to start from (default: the newest {out_dir}/pretrain_<dim>.pth)")
    add_tokenizer_arg(parser)
    add_packing_arg(parser)
    add_model_args(parser)
    # v1's SFT recipe: a lower peak LR than pretraining, small batches. 8 packed windows of 512 hold ~34 real
    # conversations, about the real tokens of v1's 32 padded ones, so a step means what it meant in v1.
    add_train_args(parser, data_path=str(ROOT / "dataset" / "sft_data.bin"), learning_rate=1e-4, batch_size=8,
                   epochs=1, save_interval=1000)
    args = parser.parse_args(argv)
    rt = compute_init(args)

    # The model's shape comes from the file (its JSON, or its tensors); model flags only have to agree with it.
    ckpt = read_stage_input(args.init, args.out_dir, "pretrain", model_flags(args))  # the shape comes from the file
    init = ckpt.path
    config = ckpt.config
    # With --resume the loop replaces these weights with the resume file's; their shape is the same.
    model = load_model(ckpt, device="cpu")
    print0(f"initialised from {init}" + (" (weights then replaced by the resume file)" if args.resume else ""))
    dataset, data_line = load_sft_data(args.data_path, config.max_seq_len, packed=not args.no_packing)
    print0(data_line)

    # The data's tokenizer (by default the family's, data_process.py's default for it) turns the loss into bits per
    # character.
    train(args, rt, model, dataset, weights_name=f"full_sft_{config.file_suffix}",
          tokenizer=load_tokenizer(args.tokenizer, config=config))
    compute_cleanup()


if __name__ == "__main__":
    main()
