"""C-Eval / CMMLU through lm-evaluation-harness: `python eval_ceval.py --harness lm_eval --model out/<folder> ...`.

lm-eval's `hf` model loads an exported transformers folder (export_model.py: `--format llama` or `--format qwen3`
natively, `--format minimind` with --trust_remote_code) and scores A/B/C/D by log-likelihood after the chat
template's generation prompt. The tasks are written at run time, one per subject found in the local data folder,
each including `_minimind_choice.yaml`, plus a group whose accuracy is weighted by subject size (the micro average
over all questions, eval_ceval.py's TOTAL). They are kept in the output folder, so the same evaluation can be rerun
with the `lm_eval` command (printed at the end). Nothing is downloaded: the hub and datasets are put offline.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

TASKS_DIR = Path(__file__).resolve().parent
BASE_CONFIG = TASKS_DIR / "_minimind_choice.yaml"
LETTERS = ("A", "B", "C", "D")


@dataclass
class HarnessRun:
    summary: list[dict]  # eval_ceval's rows: subject, correct, total, accuracy (lm-eval's acc)
    predictions: dict[str, dict[str, str]]  # {subject: {question id: letter}}
    samples: dict[str, list[dict]]  # {subject: subject_records(...)}
    results: dict  # lm-eval's results, group results and settings (JSON-ready)
    command: str  # the equivalent `lm_eval` command line


class ModelFolderError(UsageError):
    """--model is not a folder lm-eval's `hf` model can load as it stands (or lm-eval is missing)."""


def check_model_folder(model_dir: Path, trust_remote_code: bool) -> None:
    """Refuse, with what to do: lm-eval not installed, a --model that is not a transformers folder, one whose code
    would run without --trust_remote_code, and MiniMind-3's published layout (which transformers has no class for)."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ModelFolderError("--harness lm_eval needs lm-evaluation-harness, which is not installed; "
                               "pip install lm_eval")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ModelFolderError(f"--model {model_dir} is not an exported transformers folder (no config.json); make "
                               f"one with python export_model.py --ckpt out/full_sft_512.pth --format llama "
                               f"--out_dir {model_dir}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFolderError(f"{config_file} is not readable JSON ({err}); export the folder again") from None
    if config.get("auto_map") and not trust_remote_code:
        raise ModelFolderError(f"{model_dir} ships its own model code (auto_map in config.json, export_model.py's "
                               f"minimind format); pass --trust_remote_code to run it, or export with --format llama "
                               f"(v1 family) or --format qwen3 (MiniMind-3) for a folder transformers loads natively")
    if config.get("model_type") == "minimind" and not config.get("auto_map"):
        raise ModelFolderError(f"{model_dir} is in MiniMind-3's published layout, which transformers has no class "
                               f"for; export the checkpoint with --format qwen3 for lm-eval")


def task_name(benchmark: str, split: str, subject: str | None = None) -> str:
    return f"minimind_{benchmark}_{split}" + (f"_{subject}" if subject else "")


def write_task_configs(folder: Path, data_dir: Path, benchmark: str, split: str, shots: dict[str, int]) -> str:
    """One task YAML per subject (`shots`: {subject: number of few-shot examples}) and a group YAML; returns the
    group's name. The instruction heads the question itself at 0 shots and the first example otherwise."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.yaml"):
        old.unlink()  # a previous run's subjects must not join this group
    for subject, n in shots.items():
        config = {"include": str(BASE_CONFIG), "task": task_name(benchmark, split, subject),
                  "dataset_kwargs": {"data_dir": str(data_dir.resolve()), "benchmark": benchmark, "subject": subject,
                                     "split": split, "shots": n},
                  "test_split": split, "num_fewshot": n, "doc_to_text": "plain" if n else "headed"}
        if n:
            config["fewshot_split"] = "dev"
        (folder / f"{config['task']}.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    group = {"group": task_name(benchmark, split), "task": [task_name(benchmark, split, s) for s in shots],
             "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
             "metadata": {"version": 1.0}}
    (folder / f"_{group['group']}.yaml").write_text(yaml.safe_dump(group, allow_unicode=True), encoding="utf-8")
    return group["group"]


def model_arguments(model_dir: Path, device: str, dtype: str, batch_size: int, trust_remote_code: bool) -> dict:
    """lm-eval `hf` arguments; max_length is the context the export wrote into its tokenizer config, so lm-eval
    keeps the same last tokens of an over-long prompt as eval_ceval does."""
    args = {"pretrained": str(model_dir), "dtype": dtype, "device": device, "batch_size": batch_size}
    settings = model_dir / "tokenizer_config.json"
    if settings.exists():
        context = json.loads(settings.read_text(encoding="utf-8")).get("model_max_length")
        if isinstance(context, int) and 0 < context < 10**9:
            args["max_length"] = context
    if trust_remote_code:
        args["trust_remote_code"] = True
    return args


def subject_records(samples: list[dict]) -> list[dict]:
    """One record per question from a task's logged samples: id, the prompt lm-eval scored the letters after,
    their log-likelihoods, the prediction (the most likely letter, as lm-eval's acc takes it), the answer and
    lm-eval's own acc for it."""
    records = []
    for sample in sorted(samples, key=lambda s: int(s["doc_id"])):
        scores = [float(resp[0]) for resp in sample["filtered_resps"]]
        records.append({"id": str(sample["doc"]["id"]), "prompt": sample["arguments"][0][0],
                        "loglikelihoods": scores,
                        "prediction": LETTERS[max(range(len(scores)), key=scores.__getitem__)],
                        "answer": LETTERS[sample["doc"]["label"]], "acc": float(sample["acc"])})
    return records


def cli_command(tasks_dir: Path, group: str, model_args: dict) -> str:
    joined = ",".join(f"{k}={v}" for k, v in model_args.items() if k not in ("device", "batch_size"))
    return (f"lm_eval --model hf --model_args {joined} --include_path {tasks_dir} --tasks {group} "
            f"--apply_chat_template --fewshot_as_multiturn --device {model_args['device']} "
            f"--batch_size {model_args['batch_size']}")


@contextmanager
def offline():
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE for the run, restored after. Nothing here needs the network (the model
    is a local folder, the questions come from local_choice.py, acc needs no metric download); the variables make
    any attempt fail at once instead of waiting on a connection. (They only reach libraries not imported yet.)"""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, "1"))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def evaluate_folder(model_dir: Path, data_dir: Path, benchmark: str, split: str, shots: dict[str, int],
                    tasks_dir: Path, device: str, dtype: str, batch_size: int = 16,
                    trust_remote_code: bool = False) -> HarnessRun:
    """Run lm-eval's `hf` model on `model_dir` over the subjects in `shots` and collect what eval_ceval reports."""
    group = write_task_configs(tasks_dir, data_dir, benchmark, split, shots)
    model_args = model_arguments(model_dir, device, dtype, batch_size, trust_remote_code)
    with offline():
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
        out = simple_evaluate(model="hf", model_args=model_args, tasks=[group], task_manager=manager,
                              apply_chat_template=True, fewshot_as_multiturn=True, log_samples=True)
    summary, predictions, records = [], {}, {}
    for subject in shots:
        name = task_name(benchmark, split, subject)
        records[subject] = subject_records(out["samples"][name])
        correct, total = round(sum(r["acc"] for r in records[subject])), len(records[subject])
        accuracy = float(out["results"][name]["acc,none"])
        if not math.isclose(accuracy, correct / total):
            raise RuntimeError(f"{name}: lm-eval reports acc {accuracy} but its samples give {correct}/{total}")
        predictions[subject] = {r["id"]: r["prediction"] for r in records[subject]}
        summary.append({"subject": subject, "correct": correct, "total": total, "accuracy": accuracy})
    results = {"results": out["results"], "groups": out.get("groups", {}), "n-samples": out.get("n-samples", {}),
               "model_args": model_args, "lm_eval_version": _version()}
    return HarnessRun(summary, predictions, records, json.loads(json.dumps(results, default=str)),
                      cli_command(tasks_dir, group, model_args))


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
