"""The dataset loader and few-shot sampler that `_minimind_choice.yaml` names with `!function`.

lm-eval imports this file by its path (not as part of the `model` package), so it imports eval_ceval by absolute
name from the repository root, which it puts on sys.path itself: the standalone `lm_eval` command does not start
in the repository.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from lm_eval.api.samplers import FirstNSampler  # noqa: E402

import eval_ceval  # noqa: E402


def subject_docs(data_dir: str, benchmark: str, subject: str, split: str) -> list[dict]:
    """One subject's questions as lm-eval documents, read and filtered exactly as eval_ceval.py reads them.

    `headed` is the question with the instruction in front (eval_ceval's first user message), `plain` the question
    alone (the later turns), `shot` what a few-shot example shows (plain; the sampler heads the first one).
    """
    folder = Path(data_dir)
    path = eval_ceval.subject_files(folder, benchmark, split).get(subject)
    if path is None:
        raise FileNotFoundError(f"no {split} file for subject {subject!r} in {eval_ceval.split_folder(folder, split)}")
    questions, labelled = eval_ceval.read_questions(path, [])
    if not labelled:
        raise ValueError(f"{path} has no answer column; lm-eval can only score labelled splits")
    title = eval_ceval.subject_title(eval_ceval.subject_titles(folder), subject)
    docs = []
    for q in questions:
        plain = eval_ceval.format_question(q)
        headed = eval_ceval.build_messages(title, q, [])[0]["content"]
        docs.append({"id": q.id, "subject": subject, "headed": headed, "plain": plain, "shot": plain,
                     "label": eval_ceval.LETTERS.index(q.answer)})
    return docs


def load_subject(data_dir: str, benchmark: str, subject: str, split: str, shots: int = 0, **_metadata):
    """lm-eval's `custom_dataset`: {split: Dataset} for the evaluated split, plus dev when there are shots.

    lm-eval calls it with the task's dataset_kwargs and metadata together; the metadata (version, model
    arguments) is not needed here.
    """
    from datasets import Dataset, DatasetDict

    splits = {split: Dataset.from_list(subject_docs(data_dir, benchmark, subject, split))}
    if shots and split != "dev":
        splits["dev"] = Dataset.from_list(subject_docs(data_dir, benchmark, subject, "dev"))
    return DatasetDict(splits)


class FirstShotsSampler(FirstNSampler):
    """The subject's first n dev questions in file order (the question itself left out when it is one of them),
    with the instruction heading the first example, as eval_ceval.build_messages lays out a few-shot prompt."""

    def sample(self, n: int, eval_doc=None, df=None, **kwargs):
        picked = list(super().sample(n, eval_doc=eval_doc, df=df, **kwargs))
        if picked:
            picked[0] = {**picked[0], "shot": picked[0]["headed"]}
        return picked
