"""How tests/data/grpo_start_64.pth was made: a 0.5M-parameter model SFT'd from scratch for 300 steps on the
arithmetic dialogues, about 5 minutes on a CPU. tests/test_grpo_improves.py starts GRPO from it; CI cannot spend
those minutes on every run, so the result is bundled.

    python tests/data/make_grpo_start.py /tmp/grpo_start     # writes /tmp/grpo_start/full_sft_64.pth (+ .json)

It uses model/minimind_tokenizer_v0 (the tokenizer bundled when it was made), so the test passes --tokenizer too.
"""

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from model.arithmetic import make_problems, sft_record, write_jsonl_atomic  # noqa: E402
from model.checkpoint import save_weights  # noqa: E402
from model.LMConfig import LMConfig  # noqa: E402
from model.model import MiniMindForCausalLM  # noqa: E402

# The model was made with the tokenizer bundled before the general-purpose retrain; GRPO reads it with the same one.
TOKENIZER = ROOT / "model" / "minimind_tokenizer_v0"


def script_main(filename: str):
    spec = importlib.util.spec_from_file_location(filename.replace("-", "_")[:-3], ROOT / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out / "sft.jsonl", [sft_record(p) for p in make_problems(3000, seed=1, max_value=9,
                                                                                   word_share=0.3)])
    torch.manual_seed(0)
    config = LMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
    save_weights(MiniMindForCausalLM(config).state_dict(), out / "pretrain_64.pth", config)
    script_main("data_process.py")(["sft", "--input", str(out / "sft.jsonl"), "--output", str(out / "sft.bin"),
                                    "--max_seq_len", "128", "--workers", "1", "--tokenizer", str(TOKENIZER)])
    script_main("3-full_sft.py")(["--device", "cpu", "--init", str(out / "pretrain_64.pth"), "--data_path",
                                  str(out / "sft.bin"), "--out_dir", str(out), "--images_dir", str(out),
                                  "--max_steps", "300", "--batch_size", "16", "--learning_rate", "3e-3",
                                  "--val_fraction", "0", "--num_workers", "0", "--warmup_iters", "20",
                                  "--tokenizer", str(TOKENIZER)])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
