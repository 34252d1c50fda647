"""Training throughput on this machine, per preset and stage: real tokens/s, MFU, peak memory and padding share.

    python benchmark.py                                   # all presets, pretrain + packed SFT, batch 64 x 512, bf16 on GPU, compiled
    python benchmark.py --stages pretrain sft sft-padded  # also SFT padded to max_seq_len (v1's way), for comparison
    python benchmark.py --sft_data dataset/sft_data.bin   # SFT lengths from a real data_process.py sft file
    python benchmark.py --device cpu --steps 2 --batch_size 2 --max_seq_len 64 --no-compile   # CPU smoke check
    python benchmark.py --sync_check                      # CUDA: fail a steady-state step on any host sync

Stages (each step is what the training loop runs: autocast, forward with the loss, backward, clip, AdamW):
- pretrain:   packed windows of random tokens, plain causal attention, every position a real token;
- sft:        conversations packed into windows (model/packing.py), block-diagonal attention, positions restarting
              per conversation, loss on the answer half of each conversation;
- sft-padded: one conversation per row, padded to max_seq_len (what SFT did before packing).
Conversation lengths come from --sft_data, or from a log-normal mix shaped like the real sft_zh dialogues
(median 95 tokens, p90 215). tokens/s counts real (non-padding) tokens only, so the stages compare directly; the
first --warmup steps (compilation, allocator warm-up) are not timed. MFU uses the model's own FLOPs-per-token
count and the GPU's dense bf16 peak.
"""

import argparse
import math
import resource
import time

import numpy as np
import torch

from model.checkpoint import DTYPES, default_device, default_dtype_name
from model.LMConfig import PRESETS, LMConfig
from model.model import MiniMindForCausalLM
from model.packing import pack_lengths
from model.train_utils import Runtime, make_optimizer, peak_flops

STAGES = ("pretrain", "sft", "sft-padded")
# The real sft_zh conversations at max_seq_len 512: median 95 tokens, p90 215 (mean ~120).
SFT_MEDIAN, SFT_P90 = 95, 215


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--stages", nargs="+", default=["pretrain", "sft"], choices=STAGES)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 on GPU, 1 on CPU)")
    parser.add_argument("--device", type=str, default=None)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default bfloat16 on GPUs that have it (float16 on older ones), float32 on CPU")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile (default: on for CUDA)")
    parser.add_argument("--sft_data", type=str, default=None,
                        help="a data_process.py sft file whose conversation lengths the SFT stages use")
    parser.add_argument("--sync_check", action="store_true",
                        help="CUDA: run one steady-state step under torch.cuda.set_sync_debug_mode('error')")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def conversation_lengths(args, n: int, rng: np.random.Generator) -> np.ndarray:
    """n conversation lengths in [8, max_seq_len]: sampled from --sft_data's, or the log-normal mix."""
    if args.sft_data:
        from model.dataset import open_token_file

        _, arrays = open_token_file(args.sft_data, "sft")
        lengths = np.diff(np.asarray(arrays["sample_offsets"], dtype=np.int64))
        return np.clip(rng.choice(lengths, size=n), 8, args.max_seq_len)
    sigma = (math.log(SFT_P90) - math.log(SFT_MEDIAN)) / 1.2816  # the normal's 90th percentile is 1.2816 sigma
    return np.clip(rng.lognormal(math.log(SFT_MEDIAN), sigma, size=n).astype(np.int64), 8, args.max_seq_len)


def sft_batch(args, stage: str, vocab: int, rng: np.random.Generator) -> tuple[dict, int]:
    """A (batch_size, max_seq_len) SFT batch: packed windows with document_ids, or one padded conversation a row.
    Labels are the answer half of each conversation (the prompt half is -100), as the answer mask makes them."""
    B, L = args.batch_size, args.max_seq_len
    ids = torch.from_numpy(rng.integers(3, vocab, size=(B, L)))
    labels = torch.full((B, L), -100, dtype=torch.long)
    docs = torch.full((B, L), -1, dtype=torch.long)
    if stage == "sft":
        lengths = conversation_lengths(args, 8 * B * L // SFT_MEDIAN, rng)
        rows = pack_lengths(lengths.tolist(), L)[:B]
    else:
        rows = [[i] for i in range(B)]
        lengths = conversation_lengths(args, B, rng)
    for r, row in enumerate(rows):
        start = 0
        for d, i in enumerate(row):
            n = int(lengths[i])
            docs[r, start:start + n] = d
            labels[r, start + n // 2:start + n] = ids[r, start + n // 2:start + n]
            start += n
    batch = {"input_ids": ids, "labels": labels}
    if stage == "sft":
        batch["document_ids"] = docs
    return batch, int((docs >= 0).sum())


def make_batch(args, stage: str, vocab: int, device) -> tuple[dict, int]:
    rng = np.random.default_rng(args.seed)
    if stage == "pretrain":
        x = torch.from_numpy(rng.integers(0, vocab, size=(args.batch_size, args.max_seq_len + 1)))
        batch, real = {"input_ids": x[:, :-1], "targets": x[:, 1:]}, args.batch_size * args.max_seq_len
    else:
        batch, real = sft_batch(args, stage, vocab, rng)
    return {k: v.to(device) for k, v in batch.items()}, real


def train_step(rt, step_model, model, optimizer, batch):
    with rt.autocast():
        loss = step_model(**batch).loss
    rt.scaler.scale(loss).backward()
    rt.scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    rt.scaler.step(optimizer)
    rt.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss


def sync_free(rt, step_model, model, optimizer, batch) -> str:
    """'yes' when a steady-state step runs under sync debug mode 'error', else the error's first line."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_step(rt, step_model, model, optimizer, batch)
        return "yes"
    except RuntimeError as err:
        return f"no ({str(err).splitlines()[0][:80]})"
    finally:
        torch.cuda.set_sync_debug_mode(0)


def measure(args, rt, preset: str, stage: str, use_compile: bool, warmup: int) -> dict:
    torch.manual_seed(args.seed)
    device = rt.device
    config = LMConfig(**{**PRESETS[preset], "max_seq_len": args.max_seq_len})
    model = MiniMindForCausalLM(config).to(device).train()
    optimizer = make_optimizer(model, 1e-4, 0.1, device.type)
    step_model = torch.compile(model) if use_compile else model
    batch, real = make_batch(args, stage, config.vocab_size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        train_step(rt, step_model, model, optimizer, batch)
    synced = sync_free(rt, step_model, model, optimizer, batch) if args.sync_check and device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step(rt, step_model, model, optimizer, batch)
    loss.item()  # also waits for the GPU
    tok_s = real * args.steps / (time.perf_counter() - start)
    peak = peak_flops(device)
    if device.type == "cuda":
        mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    else:  # the process's peak resident set (Linux reports KiB)
        mem = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB RSS"
    return {"preset": preset, "stage": stage, "params": model.num_parameters_unique() / 1e6, "tok_s": tok_s,
            "mfu": model.flops_per_token(args.max_seq_len) * tok_s / peak if peak else None, "mem": mem,
            "padding": 1 - real / batch["input_ids"].numel(), "sync_free": synced}


def print_table(rows: list[dict]) -> None:
    sync = any(r["sync_free"] is not None for r in rows)
    print("\n| preset | params | stage | tokens/s (real) | MFU | peak memory | padding |" + (" sync-free |" if sync else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if sync else ""))
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"| {r['preset']} | {r['params']:.1f}M | {r['stage']} | {r['tok_s']:,.0f} | {mfu} | {r['mem']} | "
              f"{100 * r['padding']:.1f}% |" + (f" {r['sync_free']} |" if sync else ""))
    by_stage = {(r["preset"], r["stage"]): r["tok_s"] for r in rows}
    for (preset, stage), tok_s in by_stage.items():
        if stage != "pretrain" and (preset, "pretrain") in by_stage:
            ratio = by_stage[(preset, "pretrain")] / tok_s
            print(f"{preset} {stage}: wall-clock per real token = {ratio:.2f}x pretraining's")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or default_device())
    dtype_name = args.dtype or default_dtype_name(device.type)
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 1)
    rt = Runtime(device=device, device_type=device.type, dtype=DTYPES[dtype_name],
                 scaler=torch.amp.GradScaler(device.type, enabled=dtype_name == "float16"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, dtype {dtype_name}, compile {use_compile}, batch {args.batch_size} x {args.max_seq_len}, "
          f"{args.steps} timed steps after {warmup} warm-up")
    rows = []
    for preset in args.presets:
        for stage in args.stages:
            row = measure(args, rt, preset, stage, use_compile, warmup)
            rows.append(row)
            print(f"{preset} {stage}: {row['tok_s']:,.0f} real tok/s, padding {100 * row['padding']:.1f}%", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print_table(rows)


if __name__ == "__main__":
    main()
