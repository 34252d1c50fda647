"""model/dataset.py: the token file format, packing, document masks, rank sharding, SFT masks and truncation."""

import numpy as np
import pytest
import torch
from conftest import tiny_model
from pipeline_helpers import tokenizer_dir, write_jsonl, write_token_file

from model.checkpoint import load_tokenizer
from model.dataset import (
    PretrainDataset,
    SFTDataset,
    ShardedSampler,
    TokenFileWriter,
    conversation_segments,
    encode_conversation,
    load_dpo_records,
    open_token_file,
    token_dtype,
)

BOS, EOS = 1, 2


def make_docs(n_docs=9, seed=0):
    rng = np.random.default_rng(seed)
    return [[BOS, *rng.integers(3, 250, size=rng.integers(3, 40)).tolist(), EOS] for _ in range(n_docs)]


def test_packing_has_no_padding_and_covers_every_token_once(tmp_path):
    docs = make_docs()
    stream = np.concatenate(docs)
    ds = PretrainDataset(write_token_file(tmp_path / "p.bin", docs), seq_len=16)
    assert len(ds) == (len(stream) - 1) // 16
    covered = np.zeros(len(stream), dtype=int)
    for i in range(len(ds)):
        item = ds[i]
        assert item["input_ids"].shape == item["targets"].shape == (16,)
        start = i * 16
        # a contiguous slice of the document stream (so no padding), targets shifted by one
        assert item["input_ids"].tolist() == stream[start:start + 16].tolist()
        assert item["targets"].tolist() == stream[start + 1:start + 17].tolist()
        covered[start + 1:start + 17] += 1
    used = len(ds) * 16
    assert (covered[1:used + 1] == 1).all()  # every token in the epoch is a target exactly once
    assert len(stream) - 1 - used < 16  # only a partial window is left out
    # boundaries are kept: </s> is always followed by <s>
    for i in range(len(ds)):
        inp, tgt = ds[i]["input_ids"], ds[i]["targets"]
        assert ((tgt == BOS) == (inp == EOS)).all()


def test_doc_mask_blocks_attention_across_documents(tmp_path):
    docs = [[BOS, 5, 6, 7, EOS], [BOS, 8, 9, 10, 11, 12, EOS], [BOS, 13, 14, 15, 16, 17, 18, 19, EOS]]
    ds = PretrainDataset(write_token_file(tmp_path / "p.bin", docs), seq_len=12, doc_mask=True)
    item = ds[0]
    assert item["position_ids"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]
    assert item["document_ids"].tolist() == [0] * 5 + [1] * 7
    # the model sees each packed document exactly as it would alone
    model = tiny_model()
    batch = {k: v.unsqueeze(0) for k, v in item.items() if k != "targets"}
    with torch.no_grad():
        packed = model(**batch).logits[0]
        alone = model(input_ids=torch.tensor([docs[1][:7]])).logits[0]
    torch.testing.assert_close(packed[5:12], alone, rtol=1e-4, atol=1e-4)


def test_sharded_sampler_is_disjoint_deterministic_and_resumable():
    n, world = 103, 4
    shards = [ShardedSampler(n, rank, world, seed=3) for rank in range(world)]
    for s in shards:
        s.set_epoch(1)
    parts = [s.indices() for s in shards]
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) == (n // world) * world  # disjoint, equal shares
    assert all(len(p) == n // world == len(s) for p, s in zip(parts, shards))
    again = ShardedSampler(n, 2, world, seed=3)
    again.set_epoch(1)
    assert again.indices() == parts[2]  # deterministic
    again.set_epoch(2)
    assert again.indices() != parts[2]  # a new order each epoch
    again.set_epoch(1, start=5)
    assert again.indices() == parts[2][5:] and len(again) == len(parts[2]) - 5


def test_token_file_rejects_truncated_and_wrong_kind(tmp_path):
    path = write_token_file(tmp_path / "p.bin", make_docs())
    with pytest.raises(ValueError, match="expected 'sft'"):
        SFTDataset(path, 64)
    data = path.read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        PretrainDataset(tmp_path / "cut.bin", 8)
    (tmp_path / "junk.bin").write_bytes(b"hello world" * 10)
    with pytest.raises(ValueError, match="bad magic"):
        PretrainDataset(tmp_path / "junk.bin", 8)


def test_writer_leaves_nothing_when_aborted(tmp_path):
    with pytest.raises(RuntimeError), TokenFileWriter(tmp_path / "x.bin", "pretrain", {"tokens": "uint16"}) as w:
        w.append("tokens", [1, 2, 3])
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_token_dtype_fits_every_id_of_the_vocabulary():
    assert token_dtype(6400) == token_dtype(65536) == "uint16"  # ids 0..65535
    assert token_dtype(65537) == token_dtype(151_936) == "uint32"
    with pytest.raises(ValueError, match="vocab_size 0"):
        token_dtype(0)


@pytest.mark.parametrize("bad", [65536, 70000, -1])
def test_writer_refuses_ids_that_do_not_fit_rather_than_wrapping(tmp_path, bad):
    with TokenFileWriter(tmp_path / "x.bin", "pretrain", {"tokens": "uint16", "doc_offsets": "uint64"}) as w:
        w.append("tokens", np.array([1, 65535, 2]))
        with pytest.raises(ValueError, match=f"tokens value {bad} does not fit uint16"):
            w.append("tokens", np.array([1, bad, 2], dtype=np.int64))
        w.append("doc_offsets", [0, 3])
        w.close()
    _, arrays = open_token_file(tmp_path / "x.bin", "pretrain")
    assert arrays["tokens"].tolist() == [1, 65535, 2]  # the refused chunk wrote nothing


# ---------------------------------------------------------------------------------------------------------------
# SFT masks, checked token by token


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(tokenizer_dir(tmp_path_factory.mktemp("tok")))


def enc(tok, text):
    return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def expected_tokens(tok, messages):
    """(ids, mask) built by hand from the v1 template: '<s>user\\n' q '</s>\\n<s>assistant\\n' a '</s>' '\\n'."""
    ids, mask = [], []

    def add(part, on):
        ids.extend(part)
        mask.extend([on] * len(part))

    glue = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    for m in messages:
        if m["role"] == "system":
            add(enc(tok, m["content"]), False)
        elif m["role"] == "user":
            add(glue("<s>user\n"), False)
            add(enc(tok, m["content"]), False)
            add(glue("</s>\n<s>assistant\n"), False)
        else:
            add(enc(tok, m["content"]) + [tok.eos_token_id], True)
            add(glue("\n"), False)
    return ids, mask


SINGLE = [{"role": "user", "content": "中国的首都是哪里？"}, {"role": "assistant", "content": "北京。"}]
MULTI = [{"role": "system", "content": "你是一个助手。"},
         {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
         {"role": "user", "content": "一加一等于几？"}, {"role": "assistant", "content": "等于二。"},
         {"role": "user", "content": "谢谢"}, {"role": "assistant", "content": "不客气。"}]


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single-turn", "multi-turn"])
def test_encode_conversation_marks_exactly_the_assistant_tokens(tok, messages):
    ids, mask = encode_conversation(tok, messages, max_len=1000)
    exp_ids, exp_mask = expected_tokens(tok, messages)
    assert ids == exp_ids
    assert mask == exp_mask
    # and the ids are the chat template's rendering
    assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)
    answers = [tok.decode([t]) for t, m in zip(ids, mask) if m]
    assert "".join(answers) == "".join(m["content"] + "</s>" for m in messages if m["role"] == "assistant")


def test_encode_conversation_truncates_oldest_turns_first(tok):
    full_ids, _, bounds = conversation_segments(tok, MULTI)
    system_end, pair1_end, pair2_end = bounds[0], bounds[1], bounds[2]
    # room for the system prompt and the last pair only: pairs 1 and 2 go, the system prompt stays
    budget = system_end + (len(full_ids) - pair2_end)
    ids, mask = encode_conversation(tok, MULTI, max_len=budget)
    kept = [MULTI[0], *MULTI[5:]]
    assert (ids, mask) == expected_tokens(tok, kept)
    # one token more room is still not enough for pair 2, so the result is the same
    assert encode_conversation(tok, MULTI, max_len=budget + 1) == (ids, mask)
    # room for pairs 2 and 3
    ids2, mask2 = encode_conversation(tok, MULTI, max_len=system_end + len(full_ids) - pair1_end)
    assert (ids2, mask2) == expected_tokens(tok, [MULTI[0], *MULTI[3:]])
    # the last pair alone too long: its answer is cut at the end, the prompt is never trained on
    last_prompt = len(expected_tokens(tok, [MULTI[0], MULTI[5]])[0])
    ids3, mask3 = encode_conversation(tok, MULTI, max_len=last_prompt + 2)
    assert len(ids3) == last_prompt + 2 and mask3 == [False] * last_prompt + [True, True]
    # not even one answer token fits: nothing to train on
    assert encode_conversation(tok, MULTI, max_len=last_prompt) is None


def test_encode_conversation_rejects_malformed(tok):
    with pytest.raises(ValueError):
        encode_conversation(tok, [{"role": "user", "content": "only a question"}], 100)
    with pytest.raises(ValueError):
        encode_conversation(tok, [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], 100)


def test_sft_dataset_pads_masks_and_retruncates(tmp_path, tok):
    from data_process import main

    records = [{"input": m["content"], "output": a["content"]} for m, a in [(SINGLE[0], SINGLE[1])]]
    records.append({"system": MULTI[0]["content"], "input": MULTI[5]["content"], "output": MULTI[6]["content"],
                    "history": [[MULTI[1]["content"], MULTI[2]["content"]], [MULTI[3]["content"], MULTI[4]["content"]]]})
    records.append({"input": "很长的问题" * 30, "output": "短答"})
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    main(["sft", "--input", str(path), "--output", str(tmp_path / "sft.bin"), "--tokenizer", tok.name_or_path,
          "--workers", "1"])
    full = SFTDataset(tmp_path / "sft.bin", max_seq_len=512)
    assert len(full) == 3 and full.skipped == 0
    item = full[1]
    ids, mask = expected_tokens(tok, MULTI)
    n = len(ids)
    assert item["input_ids"][:n].tolist() == ids and (item["input_ids"][n:] == 0).all()
    assert item["labels"][:n].tolist() == [t if m else -100 for t, m in zip(ids, mask)]
    assert (item["labels"][n:] == -100).all()

    # a shorter max_seq_len re-truncates with the same rules, and skips the sample whose prompt no longer fits
    short_len = len(expected_tokens(tok, [MULTI[0], *MULTI[3:]])[0])
    short = SFTDataset(tmp_path / "sft.bin", max_seq_len=short_len)
    assert short.skipped == 1 and len(short) == 2
    ids2, mask2 = expected_tokens(tok, [MULTI[0], *MULTI[3:]])
    assert short[1]["input_ids"].tolist() == ids2
    assert short[1]["labels"].tolist() == [t if m else -100 for t, m in zip(ids2, mask2)]


def test_load_dpo_records_validates(tmp_path):
    good = {"prompt": "<s>user\n问</s>\n<s>assistant\n", "chosen": "好</s>\n", "rejected": "坏</s>\n"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, {"prompt": "p", "chosen": 1, "rejected": "r"}], [b"{oops"])
    assert load_dpo_records(path) == [good]
    with pytest.raises(ValueError, match="no usable DPO records"):
        load_dpo_records(write_jsonl(tmp_path / "e.jsonl", [], [b"{oops"]))


def test_open_token_file_maps_arrays(tmp_path):
    docs = make_docs(3)
    header, arrays = open_token_file(write_token_file(tmp_path / "p.bin", docs), "pretrain")
    assert header["arrays"]["tokens"]["length"] == sum(map(len, docs))
    assert isinstance(arrays["tokens"], np.memmap) and arrays["doc_offsets"][-1] == sum(map(len, docs))
