"""Serving benchmark: batch-1 decode speed, and concurrent vs sequential requests through the real HTTP server.

    python benchmark_serving.py                                # the 26.9M v1 shape, random weights, CPU threads as set
    python benchmark_serving.py --threads 2 --concurrent 16 --max_tokens 48
    python benchmark_serving.py --ckpt out/full_sft_512.pth --device cuda --concurrent 64
    python benchmark_serving.py --gguf out/minimind.gguf        # also time llama.cpp (llama-cpp-python) on the same machine

Prints:
- batch-1 decode: tokens/s of our engine and of transformers' `generate` on the same model, 128 greedy tokens, and
  of our engine with the weights in bfloat16 (how many greedy tokens still equal float32's); llama.cpp's, when
  --gguf is given and llama-cpp-python is installed, and the ratios;
- concurrency: N greedy chat requests sent one after another, then all at once, to my_openai_api's app on a
  loopback port with the official `openai` client: aggregate tokens/s of each, the ratio, whether every output is
  identical to its sequential run, and time to first token p50/p99 under the concurrent load.
"""

import argparse
import copy
import statistics
import threading
import time

import torch

from model.checkpoint import default_device, load_model, load_tokenizer
from model.dataset import encode_prompt
from model.engine import Engine
from model.LMConfig import LMConfig
from model.model import MiniMindForCausalLM
from model.sampling import SamplingParams

PROMPT = "请介绍一下你自己，并且说说你最喜欢的一本书。"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None, help="weights to serve (default: a random model of the 26.9M v1 shape)")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--decode_tokens", type=int, default=128)
    p.add_argument("--concurrent", type=int, default=16)
    p.add_argument("--max_tokens", type=int, default=48)
    p.add_argument("--gguf", default=None, help="a GGUF of the same weights, timed with llama-cpp-python")
    p.add_argument("--skip_http", action="store_true", help="only the batch-1 decode figures")
    p.add_argument("--no_bf16", action="store_true", help="skip the bfloat16 batch-1 figure")
    return p.parse_args()


def make_model(args, device):
    if args.ckpt:
        return load_model(args.ckpt, device=device)
    torch.manual_seed(0)
    return MiniMindForCausalLM(LMConfig()).to(device).eval()


def timed(fn, repeats=3):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def batch1_decode(model, prompt_ids, n, gguf, bf16: bool):
    params = SamplingParams(max_new_tokens=n, temperature=0)
    engine = Engine(model, max_batch=1)
    ours = n / timed(lambda: engine.submit(prompt_ids, params, eos_token_id=-1).tokens())
    ids = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    hf = n / timed(lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                          pad_token_id=0, eos_token_id=None), repeats=2)
    print(f"batch-1 decode, {n} greedy tokens: engine {ours:.0f} tokens/s, transformers generate {hf:.0f} tokens/s")
    if bf16:  # --dtype bfloat16 halves the weight bytes each token reads; decode is bound by exactly that
        half = Engine(copy.deepcopy(model).to(torch.bfloat16), max_batch=1)
        ours_bf16 = n / timed(lambda: half.submit(prompt_ids, params, eos_token_id=-1).tokens())
        f32_tokens = engine.submit(prompt_ids, params, eos_token_id=-1).tokens()
        bf16_tokens = half.submit(prompt_ids, params, eos_token_id=-1).tokens()
        same = next((i for i, (a, b) in enumerate(zip(f32_tokens, bf16_tokens)) if a != b), n)
        print(f"engine in bfloat16: {ours_bf16:.0f} tokens/s; greedy tokens equal float32's for the first {same}/{n}")
    if gguf:
        from llama_cpp import Llama

        n_ctx, threads = model.config.context_length, torch.get_num_threads()
        check = Llama(gguf, n_ctx=n_ctx, n_threads=threads, logits_all=True, verbose=False)
        check.eval(prompt_ids)
        theirs = torch.from_numpy(check.scores[:len(prompt_ids)].copy())
        mine = model(ids).logits[0].float().cpu()
        del check
        llm = Llama(gguf, n_ctx=n_ctx, n_threads=threads, verbose=False)
        llama_tokens = _llama_greedy(llm, prompt_ids, n)
        engine_tokens = list(engine.submit(prompt_ids, params, eos_token_id=-1).tokens())
        same = next((i for i, (a, b) in enumerate(zip(llama_tokens, engine_tokens)) if a != b), n)
        print(f"llama.cpp vs engine on the prompt: max |logits difference| {(theirs - mine).abs().max().item():.2e} "
              f"(max |logit| {mine.abs().max().item():.1f}); greedy tokens agree for the first {same}/{n}")
        llama = n / timed(lambda: _llama_greedy(llm, prompt_ids, n))
        print(f"llama.cpp {llama:.0f} tokens/s; engine / llama.cpp = {ours / llama:.2f}"
              + (f" (float32), {ours_bf16 / llama:.2f} (engine in bfloat16)" if bf16 else ""))


def _llama_greedy(llm, prompt_ids, n):
    """Exactly n greedy tokens from a fresh cache; `generate` never stops by itself, so EOS does not end it early."""
    llm.reset()  # n_tokens = 0, so generate re-evaluates the whole prompt rather than reusing a cached prefix
    out = []
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        out.append(token)
        if len(out) == n:
            break
    assert len(out) == n, (len(out), n)
    return out


def serve_in_thread(model, tokenizer, max_batch):
    import socket

    import uvicorn

    from model.api_server import ServerOptions, build_app
    from model.serving import ChatEngine

    chat = ChatEngine(model, tokenizer, max_batch=max_batch).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(chat, ServerOptions(model_name="bench")), port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/v1"


def one_request(client, i, max_tokens):
    start = time.perf_counter()
    first, pieces, usage = None, [], None
    stream = client.chat.completions.create(
        model="bench", messages=[{"role": "user", "content": f"{PROMPT}（第{i}个）"}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    return "".join(pieces), usage.completion_tokens, (first or time.perf_counter()) - start


def concurrency(model, tokenizer, n, max_tokens):
    from openai import OpenAI

    server, url = serve_in_thread(model, tokenizer, max_batch=n)
    client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    one_request(client, 0, 4)  # warm-up
    start = time.perf_counter()
    sequential = [one_request(client, i, max_tokens) for i in range(n)]
    seq_time = time.perf_counter() - start
    results = [None] * n

    def worker(i):
        results[i] = one_request(client, i, max_tokens)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    conc_time = time.perf_counter() - start
    server.should_exit = True
    tokens = sum(r[1] for r in sequential)
    seq_rate, conc_rate = tokens / seq_time, sum(r[1] for r in results) / conc_time
    same = [r[0] for r in results] == [r[0] for r in sequential]
    ttft = sorted(r[2] for r in results)
    p99 = ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))]
    print(f"{n} requests x {max_tokens} tokens: sequential {seq_rate:.0f} tokens/s, concurrent {conc_rate:.0f} "
          f"tokens/s, ratio {conc_rate / seq_rate:.2f}x; outputs identical to sequential: {same}")
    print(f"time to first token under concurrent load: p50 {statistics.median(ttft) * 1000:.0f} ms, "
          f"p99 {p99 * 1000:.0f} ms")


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or default_device()
    model = make_model(args, device)
    tokenizer = load_tokenizer()
    print(f"{model.num_parameters_unique() / 1e6:.1f}M params on {device}, {torch.get_num_threads()} CPU threads")
    prompt_ids = encode_prompt(tokenizer, [{"role": "user", "content": PROMPT}])
    with torch.inference_mode():
        batch1_decode(model, prompt_ids, args.decode_tokens, args.gguf, bf16=not args.no_bf16)
    if not args.skip_http:
        concurrency(model, tokenizer, args.concurrent, args.max_tokens)


if __name__ == "__main__":
    main()
