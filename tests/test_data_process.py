"""data_process.py: bad input handling, gz/csv input, the worker pool, dedup, the sft/dpo stages, and token ids
past uint16."""

import csv
import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
from pipeline_helpers import ROOT, tokenizer_dir, write_jsonl

import data_process
from model.checkpoint import load_tokenizer
from model.dataset import PretrainDataset, SFTDataset, load_dpo_records, open_token_file

GOOD = [{"text": "长江是中国最长的河流。"}, {"text": "植物通过光合作用制造养分。" * 40}, {"text": "三角形内角和是一百八十度。"}]
BAD = [b'{"text": "no closing brace"', b'{"title": "no text field"}', b'{"text": 42}', b'["not", "an object"]',
       '{"text": "bad utf-8 \xff"}'.encode("latin-1"), b'{"text": "   "}']


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tokenizer_dir(tmp_path_factory.mktemp("tok"))


def run(stage, inp, out, tok_dir, *extra, workers=1):
    return data_process.main([stage, "--input", *map(str, inp if isinstance(inp, list) else [inp]),
                              "--output", str(out), "--tokenizer", str(tok_dir), "--workers", str(workers), *extra])


def docs_of(path):
    header, arrays = open_token_file(path, "pretrain")
    tokens, offsets = np.asarray(arrays["tokens"]), np.asarray(arrays["doc_offsets"])
    return header, [tokens[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


def test_malformed_lines_are_counted_and_good_records_kept(tmp_path, tok_dir, capsys):
    # good records interleaved with bad lines, and a blank line (not malformed, just skipped)
    lines = [GOOD[0], None, GOOD[1], None, None, None, None, GOOD[2], None]
    path = tmp_path / "mixed.jsonl"
    bad = iter(BAD)
    with open(path, "wb") as f:
        for rec in lines:
            f.write((next(bad) if rec is None else data_process.json.dumps(rec, ensure_ascii=False).encode()) + b"\n")
        f.write(b"\n")
    assert run("pretrain", path, tmp_path / "out.bin", tok_dir) == 0
    out = capsys.readouterr().out
    assert "skipped 6 malformed line(s)" in out
    for lineno in (2, 4, 5, 6, 7, 9):  # the bad lines' numbers, in order
        assert f"mixed.jsonl:{lineno} " in out
    assert "invalid UTF-8" in out and "invalid JSON" in out
    header, docs = docs_of(tmp_path / "out.bin")
    tok = load_tokenizer(tok_dir)
    assert [tok.decode(d[1:-1]) for d in docs] == [g["text"] for g in GOOD]
    assert all(d[0] == tok.bos_token_id and d[-1] == tok.eos_token_id for d in docs)
    assert len(docs[1]) > 300  # a long document is kept whole, not dropped or cut
    assert header["meta"]["malformed_lines"] == 6


def test_all_bad_input_exits_nonzero_and_writes_nothing(tmp_path, tok_dir):
    path = write_jsonl(tmp_path / "bad.jsonl", [], BAD)
    out = tmp_path / "out.bin"
    with pytest.raises(SystemExit) as err:
        run("pretrain", path, out, tok_dir)
    assert "no usable pretrain records" in str(err.value.code) and "6 malformed" in str(err.value.code)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [path]  # no temp files left behind either


def test_empty_file_exits_nonzero_from_the_command_line(tmp_path, tok_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    proc = subprocess.run([sys.executable, str(ROOT / "data_process.py"), "sft", "--input", str(empty), "--output",
                           str(tmp_path / "sft.bin"), "--tokenizer", str(tok_dir), "--workers", "1"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    assert "no usable sft records" in proc.stderr
    assert not (tmp_path / "sft.bin").exists()


def test_gz_and_csv_inputs_match_plain_jsonl_and_the_pool_matches_inline(tmp_path, tok_dir):
    plain = write_jsonl(tmp_path / "a.jsonl", GOOD * 5)
    gz = tmp_path / "a.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(plain.read_bytes())
    with open(tmp_path / "a.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "text"])
        writer.writeheader()
        writer.writerows({"id": i, "text": r["text"]} for i, r in enumerate(GOOD * 5))
    run("pretrain", plain, tmp_path / "plain.bin", tok_dir)
    run("pretrain", gz, tmp_path / "gz.bin", tok_dir, "--chunk_lines", "2", workers=2)
    run("pretrain", tmp_path / "a.csv", tmp_path / "csv.bin", tok_dir)
    expected = docs_of(tmp_path / "plain.bin")[1]
    assert len(expected) == 15
    assert docs_of(tmp_path / "gz.bin")[1] == expected
    assert docs_of(tmp_path / "csv.bin")[1] == expected


def test_dedup_drops_exact_and_near_duplicates(tmp_path, tok_dir, capsys):
    base = "今天我们学习了长江和黄河的知识，长江是中国最长的河流，黄河因为泥沙多而呈现黄色，两条河都孕育了灿烂的文明。"
    near = base.replace("今天", "昨天")
    other = "编写程序时给变量起一个能说明用途的名字，可以让代码更容易读懂，也方便以后修改和测试。"
    path = write_jsonl(tmp_path / "dup.jsonl", [{"text": t} for t in (base, other, base, near)])
    run("pretrain", path, tmp_path / "dedup.bin", tok_dir, "--dedup", "--dedup_threshold", "0.7")
    assert "dedup dropped 2 exact/near-duplicate documents" in capsys.readouterr().out
    tok = load_tokenizer(tok_dir)
    assert [tok.decode(d[1:-1]) for d in docs_of(tmp_path / "dedup.bin")[1]] == [base, other]


def test_sft_stage_keeps_history_and_marks_answers(tmp_path, tok_dir, capsys):
    records = [
        {"instruction": "", "input": "你好", "output": "你好，有什么可以帮你？", "history": []},
        {"q": "一加一等于几？", "a": "等于二。", "history": [["你是谁？", "我是助手。"]]},
        {"input": "没有答案"},  # malformed: no output
        {"input": "x", "output": "y", "history": [["only one"]]},  # malformed history
    ]
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    run("sft", path, tmp_path / "sft.bin", tok_dir)
    assert "skipped 2 malformed line(s)" in capsys.readouterr().out
    ds = SFTDataset(tmp_path / "sft.bin", max_seq_len=256)
    assert len(ds) == 2
    tok = load_tokenizer(tok_dir)
    item = ds[1]
    answer = tok.decode(item["labels"][item["labels"] != -100].tolist())
    assert answer == "我是助手。</s>等于二。</s>"  # both assistant turns, each with its </s>
    text = tok.decode(item["input_ids"][item["input_ids"] != 0].tolist())
    assert text == tok.apply_chat_template([{"role": "user", "content": "你是谁？"},
                                            {"role": "assistant", "content": "我是助手。"},
                                            {"role": "user", "content": "一加一等于几？"},
                                            {"role": "assistant", "content": "等于二。"}], tokenize=False)


def test_sft_stage_truncates_at_processing_time(tmp_path, tok_dir, capsys):
    long_q = "请详细解释。" * 60
    records = [{"input": long_q, "output": "好的。"},  # prompt alone exceeds max_seq_len: dropped
               {"input": "短问题", "output": "短回答。", "history": [[long_q, "旧回答。"]]}]  # oldest pair dropped
    run("sft", write_jsonl(tmp_path / "sft.jsonl", records), tmp_path / "sft.bin", tok_dir, "--max_seq_len", "64")
    assert "1 dropped with no answer token left" in capsys.readouterr().out
    ds = SFTDataset(tmp_path / "sft.bin", max_seq_len=64)
    tok = load_tokenizer(tok_dir)
    assert len(ds) == 1
    labels = ds[0]["labels"]
    assert tok.decode(labels[labels != -100].tolist()) == "短回答。</s>"


def test_dpo_stage_renders_prompts_and_skips_unusable_pairs(tmp_path, tok_dir, capsys):
    user = {"role": "user", "content": "天空是什么颜色？"}
    records = [
        {"chosen": [user, {"role": "assistant", "content": "晴天时是蓝色的。"}],
         "rejected": [user, {"role": "assistant", "content": "绿色。"}]},
        {"chosen": [user, {"role": "assistant", "content": "一样"}], "rejected": [user, {"role": "assistant",
                                                                                      "content": "一样"}]},
        {"chosen": [user, {"role": "assistant", "content": "a"}],
         "rejected": [{"role": "user", "content": "别的问题"}, {"role": "assistant", "content": "b"}]},
        {"chosen": "not a list", "rejected": []},
    ]
    run("dpo", write_jsonl(tmp_path / "dpo.jsonl", records), tmp_path / "dpo_out.jsonl", tok_dir)
    out = capsys.readouterr().out
    assert "skipped 1 with identical chosen and rejected, 1 whose chosen and rejected prompts differ" in out
    assert "skipped 1 malformed line(s)" in out
    recs = load_dpo_records(tmp_path / "dpo_out.jsonl")
    assert recs == [{"prompt": "<s>user\n天空是什么颜色？</s>\n<s>assistant\n", "chosen": "晴天时是蓝色的。</s>\n",
                     "rejected": "绿色。</s>\n"}]


def test_bundled_samples_process(tmp_path, tok_dir):
    for stage, name in (("pretrain", "pretrain.bin"), ("sft", "sft.bin"), ("dpo", "dpo.jsonl")):
        assert run(stage, ROOT / "dataset" / f"{stage}_sample.jsonl", tmp_path / name, tok_dir) == 0
    assert len(docs_of(tmp_path / "pretrain.bin")[1]) >= 24
    assert len(SFTDataset(tmp_path / "sft.bin", 512)) >= 24
    assert len(load_dpo_records(tmp_path / "dpo.jsonl")) >= 24


# ---------------------------------------------------------------------------------------------------------------
# a vocabulary past uint16: ids >= 65,536 must come back exactly, not wrapped modulo 65,536

BIG_VOCAB = 70_010


@pytest.fixture(scope="module")
def big_tok_dir(tmp_path_factory):
    """A word-level tokenizer with BIG_VOCAB ids in which the word 'w<N>' is id N, so a test picks its ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from train_tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS

    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, "user", "assistant"])}
    vocab |= {f"w{i}": i for i in range(len(vocab), BIG_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL_TOKENS)
    out = tmp_path_factory.mktemp("big_tok")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<unk>", "chat_template": CHAT_TEMPLATE}))
    return out


def test_pretrain_ids_past_uint16_round_trip(tmp_path, big_tok_dir):
    texts = ["w70000 w5 w65535", f"w65536 w{BIG_VOCAB - 1} w12"]
    run("pretrain", write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts]), tmp_path / "p.bin", big_tok_dir)
    header, docs = docs_of(tmp_path / "p.bin")
    assert header["arrays"]["tokens"]["dtype"] == "uint32"
    assert docs == [[1, 70000, 5, 65535, 2], [1, 65536, BIG_VOCAB - 1, 12, 2]]
    item = PretrainDataset(tmp_path / "p.bin", seq_len=9)[0]
    assert item["input_ids"].tolist() == docs[0] + docs[1][:-1]
    assert item["targets"].tolist() == docs[0][1:] + docs[1]


def test_sft_ids_past_uint16_round_trip(tmp_path, big_tok_dir):
    conversation = [{"role": "user", "content": "w70001 w12"}, {"role": "assistant", "content": "w70002 w65536"}]
    run("sft", write_jsonl(tmp_path / "s.jsonl", [{"messages": conversation}]), tmp_path / "s.bin", big_tok_dir)
    assert open_token_file(tmp_path / "s.bin", "sft")[0]["arrays"]["tokens"]["dtype"] == "uint32"
    # <s> user q </s> <s> assistant a </s>: the newlines in the template are whitespace to this tokenizer
    ids = [1, 3, 70001, 12, 2, 1, 4, 70002, 65536, 2]
    item = SFTDataset(tmp_path / "s.bin", max_seq_len=16)[0]
    assert item["input_ids"].tolist() == ids + [0] * 6
    assert item["labels"].tolist() == [-100] * 7 + [70002, 65536, 2] + [-100] * 6


def test_token_files_record_their_tokenizer_and_training_refuses_another(tmp_path, tok_dir, capsys):
    """The vocabulary fingerprint in the header stops a run from reading ids made by another tokenizer (here: the
    tokenizer bundled before the general-purpose retrain) as if they were its own."""
    from pipeline_helpers import script_main

    from model.checkpoint import PACKAGE_DIR, vocab_fingerprint
    from model.dataset import read_token_file_header

    old = PACKAGE_DIR / "minimind_tokenizer_v0"
    src = write_jsonl(tmp_path / "p.jsonl", [{"text": "长江是中国最长的河流。" * 4}] * 40)
    assert data_process.main(["pretrain", "--input", str(src), "--output", str(tmp_path / "p.bin"), "--tokenizer",
                              str(old), "--workers", "1"]) == 0
    made_with = read_token_file_header(tmp_path / "p.bin")["meta"]["tokenizer"]
    assert made_with == {"path": str(old), "vocab_sha256": vocab_fingerprint(load_tokenizer(old))}
    assert made_with["vocab_sha256"] != vocab_fingerprint(load_tokenizer())
    from tokenizers import Tokenizer  # the same tokenizer read by the tokenizers library: the same fingerprint
    assert vocab_fingerprint(Tokenizer.from_file(str(old / "tokenizer.json"))) == made_with["vocab_sha256"]

    run = ["--dim", "64", "--n_layers", "1", "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "16",
           "--data_path", str(tmp_path / "p.bin"), "--out_dir", str(tmp_path / "out"), "--images_dir", str(tmp_path),
           "--device", "cpu", "--num_workers", "0", "--batch_size", "2", "--max_steps", "1", "--val_fraction", "0"]
    with pytest.raises(SystemExit) as exit_:
        script_main("1-pretrain.py")(run)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.count("\n") == 0
    assert f"was tokenized with {old}, not with this run's" in err and f"pass --tokenizer {old}" in err
    script_main("1-pretrain.py")([*run, "--tokenizer", str(old)])  # its own tokenizer: trains
    assert (tmp_path / "out" / "pretrain_64.pth").is_file()
