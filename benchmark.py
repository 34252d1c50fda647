"""Pretraining throughput of the three MiniMind presets on this machine: tokens/s, MFU and peak memory.

    python benchmark.py                                   # all presets, batch 64 x 512, bf16 on GPU, compiled
    python benchmark.py --presets minimind-v1-small --batch_size 64 --no-compile
    python benchmark.py --device cpu --steps 2 --batch_size 2 --max_seq_len 64 --no-compile   # CPU smoke check

Each step is what 1-pretrain.py runs (autocast to --dtype, forward with targets, backward, clip, AdamW from the
shared plumbing) on random tokens, so the figure measures the model and the training step, not the data loader
(which memory-maps packed windows and is not the bottleneck). The first --warmup steps (compilation, allocator
warm-up) are not timed. MFU uses the model's own FLOPs-per-token count and the GPU's dense bf16 peak.
"""

import argparse
import resource
import time

import torch

from model.checkpoint import DTYPES, default_device, default_dtype_name
from model.LMConfig import PRESETS, LMConfig
from model.model import MiniMindForCausalLM
from model.train_utils import Runtime, make_optimizer, peak_flops

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
parser.add_argument("--batch_size", type=int, default=64)
parser.add_argument("--max_seq_len", type=int, default=512)
parser.add_argument("--steps", type=int, default=20, help="timed steps")
parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 on GPU, 1 on CPU)")
parser.add_argument("--device", type=str, default=None)
parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bfloat16 on GPUs that have it (float16 on older ones), float32 on CPU")
parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile (default: on for CUDA)")
args = parser.parse_args()

device = torch.device(args.device or default_device())
dtype_name = args.dtype or default_dtype_name(device.type)
use_compile = args.compile if args.compile is not None else device.type == "cuda"
warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 1)
rt = Runtime(device=device, device_type=device.type, dtype=DTYPES[dtype_name],
             scaler=torch.amp.GradScaler(device.type, enabled=dtype_name == "float16"))
if device.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
peak = peak_flops(device)
name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
print(f"device {name}, dtype {dtype_name}, compile {use_compile}, batch {args.batch_size} x {args.max_seq_len}, "
      f"{args.steps} timed steps after {warmup} warm-up")


def train_step(step_model, model, optimizer, inputs, targets):
    with rt.autocast():
        loss = step_model(input_ids=inputs, targets=targets).loss
    rt.scaler.scale(loss).backward()
    rt.scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    rt.scaler.step(optimizer)
    rt.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss


rows = []
for preset in args.presets:
    torch.manual_seed(0)
    config = LMConfig(**PRESETS[preset], max_seq_len=args.max_seq_len)
    model = MiniMindForCausalLM(config).to(device).train()
    optimizer = make_optimizer(model, 1e-4, 0.1, device.type)
    step_model = torch.compile(model) if use_compile else model
    x = torch.randint(0, config.vocab_size, (args.batch_size, args.max_seq_len + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    for _ in range(warmup):
        train_step(step_model, model, optimizer, inputs, targets)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step(step_model, model, optimizer, inputs, targets)
    loss = loss.item()  # also waits for the GPU
    elapsed = time.perf_counter() - start
    tok_s = args.batch_size * args.max_seq_len * args.steps / elapsed
    mfu = model.flops_per_token(args.max_seq_len) * tok_s / peak if peak else None
    if device.type == "cuda":
        mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    else:  # the process's peak resident set (Linux reports KiB)
        mem = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB RSS"
    rows.append((preset, model.num_parameters_unique() / 1e6, tok_s, mfu, mem, loss))
    print(f"{preset}: {tok_s:,.0f} tok/s" + (f", MFU {100 * mfu:.1f}%" if mfu is not None else "") + f", {mem}")
    del model, optimizer, step_model
    if device.type == "cuda":
        torch.cuda.empty_cache()

print("\n| preset | params | tokens/s | MFU | peak memory |\n|---|---|---|---|---|")
for preset, params, tok_s, mfu, mem, _ in rows:
    mfu_s = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
    print(f"| {preset} | {params:.1f}M | {tok_s:,.0f} | {mfu_s} | {mem} |")
