#!/usr/bin/env bash
# Serve an exported folder with vLLM and check that its greedy reply is ours, token for token (PASS/FAIL).
#
#   python export_model.py --ckpt out/full_sft_512.pth --format llama --out_dir out/MiniMind-v1-small-llama
#   bash scripts/check_vllm.sh out/MiniMind-v1-small-llama                  # reference: transformers on the folder
#   CKPT=out/full_sft_512.pth bash scripts/check_vllm.sh out/MiniMind-v1-small-llama   # reference: our engine
#
# The folder must be --format llama (v1, dense) or --format qwen3 (the MiniMind-3 family, dense or MoE): vLLM
# has native LlamaForCausalLM / Qwen3ForCausalLM / Qwen3MoeForCausalLM classes and no MiniMind one. vLLM needs a
# GPU (pip install vllm). Environment: PORT (8000), DTYPE (float32; bfloat16 also works, with the reference in the
# same dtype, though a near-tie may then flip a token), PYTHON (this repo's .venv/bin/python, else python).
# The prompt goes to /v1/completions as token ids (our chat template rendered here), so both sides see the same ids.
#
# SGLang serves the same OpenAI API; the equivalent check starts it instead of vLLM and sends the same request:
#   python -m sglang.launch_server --model-path out/MiniMind-v1-small-llama --port 8000 --dtype float32
set -euo pipefail

MODEL=${1:?usage: bash scripts/check_vllm.sh EXPORTED_FOLDER (from export_model.py --format llama or qwen3)}
PORT=${PORT:-8000}
export DTYPE=${DTYPE:-float32}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python
if [ ! -f "$MODEL/config.json" ] || grep -q '"auto_map"' "$MODEL/config.json"; then
  echo "error: $MODEL is not a native folder; export it with python export_model.py --format llama (v1) or --format qwen3 (MiniMind-3)" >&2
  exit 2
fi

LOG=$(mktemp)
vllm serve "$MODEL" --port "$PORT" --dtype "$DTYPE" --served-model-name minimind --seed 0 --enforce-eager >"$LOG" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 600); do  # model loading and warm-up take a minute or two
  curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null && break
  kill -0 "$SERVER" 2>/dev/null || { tail -n 30 "$LOG"; echo "FAIL: vllm serve exited"; exit 1; }
  sleep 1
done

cd "$ROOT"
"$PYTHON" - "$MODEL" "$PORT" "${CKPT:-}" <<'PY'
import json
import os
import sys
import urllib.request

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

folder, port, ckpt = sys.argv[1:4]
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = getattr(torch, os.environ["DTYPE"])
tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
prompt = tokenizer.apply_chat_template([{"role": "user", "content": "请用一句话介绍你自己。"}], tokenize=False,
                                       add_generation_prompt=True)
ids = tokenizer(prompt, add_special_tokens=False).input_ids
if ckpt:  # our engine on the checkpoint the folder was exported from
    from model.checkpoint import load_model
    from model.generate import generate

    new = generate(load_model(ckpt, device=device, dtype=dtype), [ids], temperature=0, max_new_tokens=32)[0]
else:  # transformers on the folder itself (tests/test_export_*.py show it decodes as our engine does)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    with torch.no_grad():
        new = model.generate(torch.tensor([ids], device=device), max_new_tokens=32, do_sample=False)[0, len(ids):]
new = [t for t in list(map(int, new)) if t != tokenizer.eos_token_id]
# return_token_ids: vLLM >= 0.10.2 answers with the ids too (older ones ignore the field; then the text decides)
request = json.dumps({"model": "minimind", "prompt": ids, "max_tokens": 32, "temperature": 0,
                      "return_token_ids": True}).encode()
reply = urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=request,
                                                      headers={"Content-Type": "application/json"}), timeout=120)
choice = json.load(reply)["choices"][0]
if choice.get("token_ids") is not None:
    want, got = new, [t for t in choice["token_ids"] if t != tokenizer.eos_token_id]
else:
    want, got = tokenizer.decode(new, skip_special_tokens=True), choice["text"]
print(f"ours: {want!r}\nvllm: {got!r}")
print("PASS" if got == want else "FAIL")
sys.exit(0 if got == want else 1)
PY
