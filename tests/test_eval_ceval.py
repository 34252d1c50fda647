"""eval_ceval.py on small generated C-Eval / CMMLU folders: batched scoring agrees with scoring one question at a time,
few-shot prompts hold the dev examples, bad rows and files are reported and skipped, the test split gives predictions
only."""

import csv
import json
import random

import pytest
import torch
from conftest import tiny_model

import eval_ceval
from model.checkpoint import TOKENIZER_DIR, load_tokenizer
from model.dataset import encode_prompt

MODEL_FLAGS = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "2048"]
TITLES = {"computer_network": "计算机网络", "modern_chinese_history": "中国近现代史"}


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def make_questions(rng, subject, n, prefix):
    """Questions of varied lengths, so batches mix prompt lengths (left padding) and answers vary."""
    out = []
    for i in range(n):
        text = f"{prefix}{subject}第{i}题：" + "下列哪一项是正确的" * rng.randint(1, 6) + "？"
        options = [f"选项{c}{rng.randint(0, 999)}" for c in "ABCD"]
        out.append(eval_ceval.Question(id=str(i), question=text, options=options, answer=rng.choice("ABCD"), line=0))
    return out


def make_ceval(root, splits=("dev", "val", "test")):
    """C-Eval's layout: {split}/{subject}_{split}.csv, dev with an explanation column, test without answers.

    Returns {split: {subject: good questions}} and the (file name, line) of every bad row written.
    """
    rng = random.Random(0)
    good, bad = {}, []
    for split in splits:
        good[split] = {}
        for subject in TITLES:
            qs = make_questions(rng, subject, 5 if split == "dev" else 7, split)
            good[split][subject] = qs
            header = ["id", "question", "A", "B", "C", "D"]
            rows = [[q.id, q.question, *q.options] for q in qs]
            if split == "dev":
                header += ["answer", "explanation"]
                rows = [row + [q.answer, "因为如此。"] for row, q in zip(rows, qs)]
            elif split == "val":
                header += ["answer"]
                rows = [row + [q.answer] for row, q in zip(rows, qs)]
            if split == "val" and subject == "computer_network":
                # three bad rows: answer not a letter, a missing field, an empty question (lines 9..11)
                rows += [["90", "坏答案", "1", "2", "3", "4", "E"], ["91", "少一列", "1", "2", "3", "4"],
                         ["92", " ", "1", "2", "3", "4", "A"]]
                bad += [(f"{subject}_val.csv", line) for line in (9, 10, 11)]
            write_csv(root / split / f"{subject}_{split}.csv", header, rows)
    (root / "subject_mapping.json").write_text(
        json.dumps({k: [k, v, "STEM"] for k, v in TITLES.items()}, ensure_ascii=False), encoding="utf-8")
    return good, bad


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model with the real tokenizer's vocabulary, saved as a v1 .pth file."""
    model = tiny_model(vocab_size=6400, max_seq_len=2048)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(model.state_dict(), path)
    return path, model


@torch.inference_mode()
def unbatched_predictions(model, tokenizer, title, questions, shots):
    """One question at a time, no padding: the argmax over the logits of the tokens "A".."D", and their softmax."""
    letter_ids = tokenizer.convert_tokens_to_ids(list("ABCD"))
    preds, probs = [], []
    for q in questions:
        ids = encode_prompt(tokenizer, eval_ceval.build_messages(title, q, shots))
        logits = model(torch.tensor([ids])).logits[0, -1, letter_ids]
        preds.append("ABCD"[int(logits.argmax())])
        probs.append(logits.softmax(-1).tolist())
    return preds, probs


def assert_probs_match(rows, probs):
    """The written letter probabilities (4 decimals) equal the unbatched ones: padding changed nothing."""
    written = [[float(r[f"p_{c}"]) for c in "ABCD"] for r in rows]
    torch.testing.assert_close(torch.tensor(written), torch.tensor(probs), atol=2e-4, rtol=0)


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_letters_are_single_tokens(tokenizer):
    ids = eval_ceval.letter_token_ids(tokenizer)
    assert [tokenizer.decode([i]) for i in ids] == list("ABCD")


def test_ceval_accuracy_matches_unbatched_argmax(tmp_path, tokenizer, checkpoint, capsys):
    ckpt, model = checkpoint
    good, bad = make_ceval(tmp_path / "ceval", splits=("dev", "val"))
    out, chart = tmp_path / "out", tmp_path / "chart.png"
    code = eval_ceval.main(["--ckpt", str(ckpt), "--data_dir", str(tmp_path / "ceval"), "--split", "val",
                            "--shots", "2", "--batch_size", "3", "--out_dir", str(out), "--chart", str(chart),
                            *MODEL_FLAGS])
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))

    total_correct = total = 0
    letters = set()
    for row in summary["subjects"]:
        subject = row["subject"]
        questions = good["val"][subject]
        expected, probs = unbatched_predictions(model, tokenizer, TITLES[subject], questions, good["dev"][subject][:2])
        written = read_rows(out / f"{subject}.csv")
        assert [r["id"] for r in written] == [q.id for q in questions]  # the bad rows were skipped
        assert [r["prediction"] for r in written] == expected
        assert_probs_match(written, probs)
        letters.update(expected)
        correct = sum(p == q.answer for p, q in zip(expected, questions))
        assert (row["correct"], row["total"]) == (correct, len(questions))
        assert row["accuracy"] == pytest.approx(correct / len(questions))
        total_correct, total = total_correct + correct, total + len(questions)
    assert len(letters) > 1  # a mix-up of rows in a batch would show, which it cannot if every answer is one letter
    assert 0 < total_correct < total
    assert sorted(r["subject"] for r in summary["subjects"]) == sorted(TITLES)
    assert summary["total"] == {"correct": total_correct, "total": total, "accuracy": pytest.approx(total_correct / total)}

    # every bad row is reported with its file and line, and nothing else is
    for name, line in bad:
        assert f"{name}:{line}:" in printed
    assert len(summary["problems"]) == len(bad)
    # the printed table and the CSV end with the total
    assert "TOTAL" in printed and f"{total_correct / total:.4f}" in printed
    assert read_rows(out / "summary.csv")[-1] == {"subject": "TOTAL", "correct": str(total_correct),
                                                  "total": str(total), "accuracy": f"{total_correct / total:.4f}"}
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_few_shot_prompt_holds_dev_examples(tmp_path, tokenizer):
    good, _ = make_ceval(tmp_path, splits=("dev", "val"))
    dev, _ = eval_ceval.read_questions(tmp_path / "dev" / "computer_network_dev.csv", [])
    target = good["val"]["computer_network"][0]
    ids, n, cut = eval_ceval.build_prompt(tokenizer, "计算机网络", target, dev[:3], max_tokens=4096)
    text = tokenizer.decode(ids)
    assert (n, cut) == (3, False)
    assert "计算机网络" in text
    positions = []
    for shot in dev[:3]:
        turn = f"{eval_ceval.format_question(shot)}</s>\n<s>assistant\n{shot.answer}</s>"
        assert turn in text  # each example is a user turn answered by its letter
        positions.append(text.index(turn))
    assert dev[3].question not in text
    assert positions == sorted(positions) and text.index(target.question) > positions[-1]
    assert text.endswith(f"{eval_ceval.format_question(target)}</s>\n<s>assistant\n")

    # too long for the context: examples go first, then the beginning of the prompt
    zero_shot = len(eval_ceval.build_prompt(tokenizer, "计算机网络", target, [], 4096)[0])
    ids, n, cut = eval_ceval.build_prompt(tokenizer, "计算机网络", target, dev[:3], max_tokens=zero_shot + 5)
    assert (n, cut) == (0, False) and len(ids) == zero_shot
    ids, n, cut = eval_ceval.build_prompt(tokenizer, "计算机网络", target, dev[:3], max_tokens=zero_shot - 5)
    assert (n, cut) == (0, True) and len(ids) == zero_shot - 5


def test_dev_split_never_uses_a_question_as_its_own_example(tmp_path, checkpoint):
    ckpt, _ = checkpoint
    make_ceval(tmp_path / "ceval", splits=("dev",))
    out = tmp_path / "out"
    eval_ceval.main(["--ckpt", str(ckpt), "--data_dir", str(tmp_path / "ceval"), "--split", "dev", "--shots", "5",
                     "--out_dir", str(out), "--chart", str(tmp_path / "c.png"), *MODEL_FLAGS])
    rows = read_rows(out / "computer_network.csv")
    assert len(rows) == 5 and {r["shots"] for r in rows} == {"4"}


def test_data_dir_may_be_the_split_folder(tmp_path, checkpoint):
    """`--data_dir ceval-exam/val` works too, and still finds the dev examples and subject names beside it."""
    ckpt, _ = checkpoint
    make_ceval(tmp_path / "ceval", splits=("dev", "val"))
    out = tmp_path / "out"
    assert eval_ceval.main(["--ckpt", str(ckpt), "--data_dir", str(tmp_path / "ceval" / "val"), "--split", "val",
                            "--shots", "3", "--out_dir", str(out), "--chart", str(tmp_path / "c.png"),
                            *MODEL_FLAGS]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert sorted(r["subject"] for r in summary["subjects"]) == sorted(TITLES)
    assert {r["shots"] for r in read_rows(out / "computer_network.csv")} == {"3"}
    assert eval_ceval.subject_titles(tmp_path / "ceval" / "val") == TITLES


def test_cmmlu_layout(tmp_path, tokenizer, checkpoint, capsys):
    ckpt, model = checkpoint
    rng = random.Random(1)
    header = ["", "Question", "A", "B", "C", "D", "Answer"]
    good = {}
    for split in ("dev", "test"):
        for subject in ("agronomy", "anatomy"):
            qs = make_questions(rng, subject, 5 if split == "dev" else 6, split)
            good[split, subject] = qs
            rows = [[q.id, q.question, *q.options, q.answer] for q in qs]
            if split == "test" and subject == "anatomy":
                rows.insert(2, ["x", "坏行", "1", "2", "3", "4", "Z"])  # line 4
            write_csv(tmp_path / "cmmlu" / split / f"{subject}.csv", header, rows)
    out = tmp_path / "out"
    assert eval_ceval.main(["--ckpt", str(ckpt), "--data_dir", str(tmp_path / "cmmlu"), "--benchmark", "cmmlu",
                            "--split", "test", "--shots", "1", "--batch_size", "4", "--out_dir", str(out),
                            "--chart", str(tmp_path / "c.png"), *MODEL_FLAGS]) == 0
    assert "anatomy.csv:4: answer 'Z'" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert [r["subject"] for r in summary["subjects"]] == ["agronomy", "anatomy"]
    for row in summary["subjects"]:
        questions = good["test", row["subject"]]
        expected, probs = unbatched_predictions(model, tokenizer, row["subject"], questions,
                                                good["dev", row["subject"]][:1])
        written = read_rows(out / f"{row['subject']}.csv")
        assert [r["prediction"] for r in written] == expected
        assert_probs_match(written, probs)
        assert row["correct"] == sum(p == q.answer for p, q in zip(expected, questions))
        assert row["total"] == len(questions)

    # CMMLU has no val split: a clear argparse error
    with pytest.raises(SystemExit) as err:
        eval_ceval.main(["--ckpt", str(ckpt), "--data_dir", str(tmp_path / "cmmlu"), "--benchmark", "cmmlu",
                         "--split", "val"])
    assert err.value.code == 2


def test_test_split_writes_predictions_only(tmp_path, checkpoint, capsys):
    ckpt, _ = checkpoint
    good, _ = make_ceval(tmp_path / "ceval", splits=("dev", "test"))
    out, chart = tmp_path / "out", tmp_path / "chart.png"
    assert eval_ceval.main(["--ckpt", str(ckpt), "--data_dir", str(tmp_path / "ceval"), "--split", "test",
                            "--out_dir", str(out), "--chart", str(chart), *MODEL_FLAGS]) == 0
    assert "predictions only" in capsys.readouterr().out
    assert not (out / "summary.csv").exists() and not (out / "summary.json").exists() and not chart.exists()
    predictions = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    for subject, questions in good["test"].items():
        rows = read_rows(out / f"{subject}.csv")
        assert "answer" not in rows[0] and "correct" not in rows[0]
        assert [r["id"] for r in rows] == [q.id for q in questions]
        assert predictions[subject] == {r["id"]: r["prediction"] for r in rows}
        assert {r["prediction"] for r in rows} <= set("ABCD")


def test_bad_files_are_reported_and_skipped(tmp_path, checkpoint, capsys):
    ckpt, _ = checkpoint
    make_ceval(tmp_path / "ceval", splits=("val",))
    write_csv(tmp_path / "ceval" / "val" / "no_options_val.csv", ["id", "question", "A", "B", "answer"],
              [["0", "题", "1", "2", "A"]])
    (tmp_path / "ceval" / "val" / "latin1_val.csv").write_bytes("id,question,A,B,C,D,answer\n0,caf\xe9".encode("latin-1"))
    out = tmp_path / "out"
    args = ["--ckpt", str(ckpt), "--split", "val", "--out_dir", str(out), "--chart", str(tmp_path / "c.png"),
            *MODEL_FLAGS]
    assert eval_ceval.main(["--data_dir", str(tmp_path / "ceval"), *args]) == 0
    printed = capsys.readouterr().out
    assert "no_options_val.csv: no column(s) c, d" in printed and "latin1_val.csv: cannot read" in printed
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert sorted(r["subject"] for r in summary["subjects"]) == sorted(TITLES)

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as err:
        eval_ceval.main(["--data_dir", str(tmp_path / "empty"), *args])
    assert "no {subject}_val.csv files in" in str(err.value.code)
