"""Pretrain MiniMind on a tokenized corpus (made by `python data_process.py pretrain ...`).

    python 1-pretrain.py                                              # one GPU (or CPU), dataset/pretrain_data.bin
    python 1-pretrain.py --preset minimind-v1 --batch_size 32 --accumulation_steps 2 --compile
    torchrun --nproc_per_node 8 1-pretrain.py                         # N GPUs with DDP
    deepspeed --num_gpus 8 1-pretrain.py                              # ZeRO-2 from ds_config_zero2.json
    deepspeed --num_gpus 8 1-pretrain.py --deepspeed ds_config_zero1.json
    python 1-pretrain.py --resume                                     # continue exactly where a run stopped
    python 1-pretrain.py --mix pretrain_zh-00.jsonl.gz=1 pretrain_zh-01.jsonl.gz=0.5 --max_doc_chars 0
    python 1-pretrain.py --packing bos --doc_mask                     # every window starts at a document's <s>

--mix weights each input file of data_process.py (a document's expected count per epoch), --max_doc_tokens and
--max_doc_chars keep only the shorter documents, --packing bos aligns windows to documents; see model/mixture.py.
By default the epoch is the packed stream of the documents of at most 512 characters, trained with AdamW at 1e-3 on a
warmup-stable-decay schedule: the recipe measured best at equal compute (README "Recipe sweep"; --max_doc_chars 0
packs every document, --lr_schedule cosine --learning_rate 5e-4 is the schedule before it). The start-up log shows
what the filter keeps, each source's share of the epoch and the share of tokens the packing crops away.

Writes out/pretrain_{dim}{_moe}.pth (a plain v1 state dict) every --save_interval steps and at the end, the resume
state next to it, and images/pretrain_{dim}{_moe}_loss.png.
"""

import argparse

from model.checkpoint import ROOT_DIR, add_tokenizer_arg, load_tokenizer
from model.dataset import PretrainDataset
from model.errors import exit_on_usage_error
from model.LMConfig import add_model_args, config_from_args
from model.mixture import add_mixture_args, mixture_kwargs
from model.model import MiniMindForCausalLM
from model.train_utils import add_train_args, compute_cleanup, compute_init, print0, train

parser = argparse.ArgumentParser(description="MiniMind pretraining")
add_model_args(parser)
# The measured recipe (README "Recipe sweep"): AdamW at 1e-3 with warmup-stable-decay beat 5e-4 with cosine (and 2e-3,
# and Muon) at equal compute; the other stages keep cosine.
add_train_args(parser, data_path=str(ROOT_DIR / "dataset" / "pretrain_data.bin"), batch_size=32,
               learning_rate=1e-3, lr_schedule="wsd", warmup_iters=100, save_interval=1000)
parser.add_argument("--doc_mask", action="store_true",
                    help="no attention across documents in a packed window (slower: no flash kernel)")
add_tokenizer_arg(parser)
add_mixture_args(parser)


@exit_on_usage_error
def main(argv=None):
    args = parser.parse_args(argv)

    rt = compute_init(args)
    config = config_from_args(args)
    model = MiniMindForCausalLM(config)  # same seed on every rank, so every rank starts from the same weights
    dataset = PretrainDataset(args.data_path, config.max_seq_len, doc_mask=args.doc_mask, **mixture_kwargs(args))
    print0(f"{args.data_path}: {dataset.n_docs:,} documents, {dataset.n_tokens:,} tokens, "
           f"{len(dataset):,} windows of {config.max_seq_len}")
    if dataset.mixture.filter_note:
        print0(dataset.mixture.filter_note)
    if dataset.windows is not None:  # a mixture or bos packing: what the epoch holds instead of the whole file
        print0("\n".join(["the epoch holds:", *dataset.mixture.describe(config.max_seq_len)]))
    # The data's tokenizer (by default the family's, data_process.py's default for it) turns the loss into bits per
    # character.
    train(args, rt, model, dataset, weights_name=f"pretrain_{config.file_suffix}",
          run_name=f"pretrain_{config.file_suffix}", tokenizer=load_tokenizer(args.tokenizer, config=config))
    compute_cleanup()


if __name__ == "__main__":
    main()
