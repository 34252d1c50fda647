"""benchmark_serving.py end to end on a tiny checkpoint: both figures are printed, and batching changed no output."""

import re
import subprocess
import sys

from conftest import ROOT


def test_benchmark_prints_decode_and_concurrency_figures(chat_ckpt):
    run = subprocess.run([sys.executable, str(ROOT / "benchmark_serving.py"), "--ckpt", str(chat_ckpt), "--device",
                          "cpu", "--decode_tokens", "8", "--concurrent", "4", "--max_tokens", "4"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert re.search(r"batch-1 decode, 8 greedy tokens: engine \d+ tokens/s, transformers generate \d+", run.stdout)
    assert re.search(r"engine in bfloat16: \d+ tokens/s; greedy tokens equal float32's for the first \d+/8", run.stdout)
    assert re.search(r"4 requests x 4 tokens: .* ratio [\d.]+x; outputs identical to sequential: True", run.stdout)
    assert re.search(r"time to first token under concurrent load: p50 \d+ ms, p99 \d+ ms", run.stdout)
