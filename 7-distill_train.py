"""Knowledge distillation: a frozen teacher's next-token distributions teach a smaller student (white-box).

    python 7-distill_train.py --teacher out/full_sft_768.pth --init out/full_sft_512.pth   # -> out/distill_512.pth
    python 7-distill_train.py --teacher out/full_sft_768.pth --dim 512 --n_layers 8 --learning_rate 5e-4
    python 7-distill_train.py --teacher out/pretrain_768.pth --data pretrain --dim 512 --n_layers 8
    python 7-distill_train.py --teacher path/to/MiniMind-3 --preset minimind-3 --dim 512 --n_layers 4 --kl reverse
    python 7-distill_train.py --teacher out/full_sft_768.pth --init out/full_sft_512.pth --device cpu --max_steps 50
    torchrun --nproc_per_node 8 7-distill_train.py --teacher out/full_sft_768.pth --init out/full_sft_512.pth
    python 7-distill_train.py --teacher out/full_sft_768.pth --init out/full_sft_512.pth --resume

The teacher is any checkpoint of either family (a v1 .pth, or a MiniMind-3 folder / safetensors file); its shape
comes from the file. The student starts from --init (its shape from that file too, checked against any model flags)
or, without --init, fresh from the model flags (--preset, --dim, --n_layers, ...). Both must read the same
tokenizer: same family and vocabulary size, or the run stops with an error saying so.

The loss per answer token is alpha * CE + (1 - alpha) * T^2 * KL between the temperature-T distributions
(--alpha, --temperature; --kl forward = KL(teacher || student), reverse, or jsd), in float32, plus the balance loss
of an MoE student (model/distill.py). --data sft reads the SFT token file 3-full_sft.py trains on (packed windows,
answers only: the assistant tokens); --data pretrain reads the pretraining token file 1-pretrain.py trains on (every
token). Each brings that stage's defaults for --data_path, --learning_rate and --batch_size.

Writes out/distill_{dim}{_moe}.pth (a plain v1 state dict of the student, with its config JSON) every
--save_interval steps and at the end, the resume state beside it, out/distill_{dim}{_moe}_metrics.jsonl and
images/distill_{dim}{_moe}_loss.png; every log line is followed by the KL and CE per answer token.
"""

import argparse
import sys
from pathlib import Path

from model.checkpoint import load_model, read_checkpoint
from model.dataset import PretrainDataset
from model.distill import KL_KINDS, DistillationModel, check_same_vocabulary, parts_logger, tokenizer_name
from model.errors import UsageError, exit_on_usage_error
from model.LMConfig import add_model_args, config_from_args, model_flags
from model.model import MiniMindForCausalLM
from model.packing import add_packing_arg, load_sft_data
from model.train_utils import add_train_args, compute_cleanup, compute_init, print0, train

ROOT = Path(__file__).resolve().parent
# Each kind of data brings the defaults of the stage that trains on it (3-full_sft.py, 1-pretrain.py).
DATA_DEFAULTS = {
    "sft": dict(data_path=str(ROOT / "dataset" / "sft_data.bin"), learning_rate=1e-4, batch_size=8),
    "pretrain": dict(data_path=str(ROOT / "dataset" / "pretrain_data.bin"), learning_rate=5e-4, batch_size=32,
                     warmup_iters=100),
}


def build_parser(data: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True,
                        help="the teacher: a .pth of either family, or a MiniMind-3 folder / safetensors file")
    parser.add_argument("--init", default=None,
                        help="the student's starting weights (default: a fresh model of the model flags' shape)")
    parser.add_argument("--data", choices=sorted(DATA_DEFAULTS), default="sft",
                        help="sft: the SFT token file, loss on the answers; pretrain: the pretraining token file")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the CE on the labels (1 - alpha: the KL)")
    parser.add_argument("--temperature", type=float, default=1.5, help="softening temperature T of both distributions")
    parser.add_argument("--kl", choices=KL_KINDS, default="forward",
                        help="forward: KL(teacher || student); reverse: KL(student || teacher); jsd: Jensen-Shannon")
    parser.add_argument("--doc_mask", action="store_true",
                        help="--data pretrain: no attention across documents in a window (slower: no flash kernel)")
    add_packing_arg(parser)
    add_model_args(parser)
    add_train_args(parser, epochs=1, save_interval=1000, **DATA_DEFAULTS[data])
    return parser


def parse_args(argv):
    """The flags, with the defaults of the chosen --data (read first, so the other flags default to that stage's
    values)."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--data", choices=sorted(DATA_DEFAULTS), default="sft")
    known, _ = first.parse_known_args(argv)
    args = build_parser(known.data).parse_args(argv)
    if args.doc_mask and args.data != "pretrain":
        raise UsageError("--doc_mask applies to --data pretrain (packed SFT windows always keep conversations apart)")
    if args.no_packing and args.data != "sft":
        raise UsageError("--no_packing applies to --data sft (pretraining windows hold no padding to pack away)")
    return args


def _describe(config, model) -> str:
    moe = f", MoE {config.n_routed_experts} experts" if config.use_moe else ""
    layers = f"{config.n_layers} layer{'s' if config.n_layers != 1 else ''}"
    return (f"dim {config.dim}, {layers}{moe}, {model.num_parameters_unique() / 1e6:.2f}M params, "
            f"{tokenizer_name(config)} tokenizer")


def load_student(args, teacher_config):
    """(student model, where it came from): --init's weights, or a fresh model of the flags' shape."""
    if args.init:
        ckpt = read_checkpoint(args.init, model_flags(args))  # the shape comes from the file
        check_same_vocabulary(teacher_config, ckpt.config, f"the teacher {args.teacher}", f"the student {args.init}")
        return load_model(ckpt, device="cpu"), str(ckpt.path)
    config = config_from_args(args)
    check_same_vocabulary(teacher_config, config, f"the teacher {args.teacher}", "the student the model flags give")
    return MiniMindForCausalLM(config), "fresh"  # the same seed on every rank: the same weights everywhere


def load_data(args, config):
    """(dataset, one line describing it) over windows of the student's max_seq_len."""
    if args.data == "sft":
        return load_sft_data(args.data_path, config.max_seq_len, packed=not args.no_packing)
    dataset = PretrainDataset(args.data_path, config.max_seq_len, doc_mask=args.doc_mask)
    return dataset, (f"{args.data_path}: {dataset.n_docs:,} documents, {dataset.n_tokens:,} tokens, "
                     f"{len(dataset):,} windows of {config.max_seq_len}")


@exit_on_usage_error
def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rt = compute_init(args)

    teacher_ckpt = read_checkpoint(args.teacher)  # its own shape; the model flags describe the student
    # The teacher never trains, so it needs no float32 master weights: it runs in the training dtype.
    teacher = load_model(teacher_ckpt, device="cpu", dtype=rt.dtype)
    student, source = load_student(args, teacher_ckpt.config)
    config = student.config
    print0(f"teacher {teacher_ckpt.path}: {_describe(teacher_ckpt.config, teacher)}")
    print0(f"student ({source}" + (", weights then replaced by the resume file" if args.resume else "") +
           f"): {_describe(config, student)}")
    print0(f"loss: {args.alpha:g} * CE + {1 - args.alpha:g} * T^2 * {args.kl} KL at T={args.temperature:g}, "
           f"on the {'answer' if args.data == 'sft' else 'text'} tokens")
    if config.max_seq_len > teacher_ckpt.config.context_length:
        print0(f"note: windows of {config.max_seq_len} run past the {teacher_ckpt.config.context_length} positions the "
               f"teacher was trained for; its predictions there may be poor (lower --max_seq_len to stay within)")
    model = DistillationModel(student, teacher, alpha=args.alpha, temperature=args.temperature, kl=args.kl)
    dataset, data_line = load_data(args, config)
    print0(data_line)

    train(args, rt, model, dataset, weights_name=f"distill_{config.file_suffix}",
          step_callback=parts_logger(model, rt, print_fn=print0))
    compute_cleanup()


if __name__ == "__main__":
    main()
