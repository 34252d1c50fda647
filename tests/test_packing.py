"""model/packing.py: bin packing, and packed SFT windows that hold exactly SFTDataset's conversations.

Most tests use a synthetic `sft` token file (random tokens, hand-made turns) so lengths, truncation and skipping are
under control; one runs data_process.py on the bundled sample. The model tests check that a packed window trains
exactly as its conversations do one by one.
"""

import inspect
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_model
from pipeline_helpers import tokenizer_dir

import data_process
import model.model as model_module
from model.dataset import IGNORE_INDEX, SFTDataset, TokenFileWriter
from model.model import MiniMindForCausalLM
from model.packing import PackedSFTDataset, conversation_lengths, load_sft_data, pack_lengths

VOCAB = 6400


# ---------------------------------------------------------------------------------------------------------------
# pack_lengths


def check_bins(bins, lengths, capacity):
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))  # every index exactly once
    assert all(b and sum(lengths[i] for i in b) <= capacity for b in bins)


def test_pack_lengths_covers_every_index_once_within_capacity_and_is_deterministic():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 513, size=2000).tolist()
    bins = pack_lengths(lengths, 512)
    check_bins(bins, lengths, 512)
    assert pack_lengths(lengths, 512) == bins
    assert pack_lengths([], 512) == []
    # 6 opens a bin (room 4), 5 another (room 5), the second 5 takes the room-5 bin, 4 the room-4 one
    assert sorted(map(sorted, pack_lengths([6, 5, 4, 5], 10))) == [[0, 2], [1, 3]]


def test_pack_lengths_fills_close_to_the_lower_bound_on_a_mix_of_lengths():
    rng = np.random.default_rng(1)
    # mostly short conversations with a long tail, like real SFT data
    lengths = np.minimum(rng.lognormal(4.5, 0.8, size=5000).astype(int) + 1, 512)
    bins = pack_lengths(lengths, 512)
    check_bins(bins, lengths.tolist(), 512)
    lower_bound = -(-int(lengths.sum()) // 512)
    assert len(bins) <= lower_bound * 1.01 + 1, (len(bins), lower_bound)


def test_pack_lengths_refuses_an_item_longer_than_the_capacity():
    with pytest.raises(ValueError, match="1..8"):
        pack_lengths([3, 9], 8)
    with pytest.raises(ValueError, match="1..8"):
        pack_lengths([0, 3], 8)


def test_pack_lengths_speed_on_100k_items(capsys):
    lengths = np.random.default_rng(2).integers(1, 513, size=100_000)
    start = time.perf_counter()
    bins = pack_lengths(lengths, 512)
    seconds = time.perf_counter() - start
    with capsys.disabled():  # the figure is for the record; nothing is asserted about time
        print(f"\npack_lengths: 100,000 items into {len(bins):,} bins of 512 in {seconds:.3f} s")
    assert sum(map(len, bins)) == 100_000


# ---------------------------------------------------------------------------------------------------------------
# PackedSFTDataset over a synthetic token file


def write_sft_file(path, conversations):
    """A `data_process.py sft` file from [(system_len, [(prompt_len, answer_len), ...])], random token ids."""
    rng = np.random.default_rng(3)
    arrays = {"tokens": "uint16", "answer_mask": "uint8", "sample_offsets": "uint64", "turn_bounds": "uint32",
              "turn_offsets": "uint64"}
    with TokenFileWriter(path, "sft", arrays) as w:
        n_tokens, n_bounds = 0, 0
        w.append("sample_offsets", [0])
        w.append("turn_offsets", [0])
        for system_len, pairs in conversations:
            mask = [0] * system_len
            bounds = [system_len]
            for prompt_len, answer_len in pairs:
                mask += [0] * prompt_len + [1] * answer_len
                bounds.append(len(mask))
            w.append("tokens", rng.integers(3, VOCAB, size=len(mask)))
            w.append("answer_mask", mask)
            w.append("turn_bounds", bounds)
            n_tokens, n_bounds = n_tokens + len(mask), n_bounds + len(bounds)
            w.append("sample_offsets", [n_tokens])
            w.append("turn_offsets", [n_bounds])
        w.close()
    return path


def random_conversations(n, seed=4):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        # at most 9 + 2 * (12 + 15) = 63 tokens: shorter than L, so only SPECIAL needs truncating
        pairs = [(int(rng.integers(1, 13)), int(rng.integers(1, 16))) for _ in range(rng.integers(1, 3))]
        out.append((int(rng.integers(0, 2)) * int(rng.integers(1, 10)), pairs))
    return out


L = 64
# a prompt alone longer than L: skipped (no answer left); one exactly L long; some that need their turns dropped
SPECIAL = [(0, [(L + 5, 3)]), (4, [(10, L - 14)]), (3, [(20, 30), (15, 20)]), (0, [(10, 10), (30, 40)])]


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    return write_sft_file(tmp_path_factory.mktemp("pack") / "sft.bin", SPECIAL + random_conversations(120))


def check_windows_hold_exactly_the_sft_items(packed, sft):
    seen = []
    for w in range(len(packed)):
        item, start = packed[w], 0
        assert set(item) == {"input_ids", "labels", "document_ids"}
        for doc, j in enumerate(packed.window_conversations(w)):
            ref, n = sft[j], int(packed.lengths[j])
            assert ref["labels"][n:].eq(IGNORE_INDEX).all()  # the SFT item is n tokens, then padding
            assert item["input_ids"][start:start + n].tolist() == ref["input_ids"][:n].tolist()
            assert item["labels"][start:start + n].tolist() == ref["labels"][:n].tolist()
            assert item["labels"][start] == IGNORE_INDEX and item["document_ids"][start:start + n].eq(doc).all()
            start += n
            seen.append(j)
        # the rest is padding: no token, no loss, no document
        assert item["input_ids"][start:].eq(0).all() and item["labels"][start:].eq(IGNORE_INDEX).all()
        assert item["document_ids"][start:].eq(-1).all()
    assert sorted(seen) == list(range(len(sft)))  # every conversation exactly once


def test_windows_hold_exactly_sftdatasets_conversations(sft_file):
    packed, sft = PackedSFTDataset(sft_file, L), SFTDataset(sft_file, L)
    check_windows_hold_exactly_the_sft_items(packed, sft)
    assert packed.skipped == sft.skipped == 1
    assert packed.n_conversations == len(sft) == len(SPECIAL) + 120 - 1
    lengths = [int((sft[i]["input_ids"] != 0).sum()) for i in range(len(sft))]  # random ids are never 0
    assert packed.lengths.tolist() == lengths and packed.real_tokens == sum(lengths)
    assert packed.fill == pytest.approx(sum(lengths) / (len(packed) * L))
    assert len(packed) <= -(-sum(lengths) // L) + 2  # close to the lower bound
    assert packed.summary() == (f"packed {len(sft)} conversations into {len(packed)} windows of {L} "
                                f"(fill {packed.fill:.1%})")


def test_packing_is_deterministic(sft_file):
    a, b = PackedSFTDataset(sft_file, L), PackedSFTDataset(sft_file, L)
    assert [a.window_conversations(w) for w in range(len(a))] == [b.window_conversations(w) for w in range(len(b))]
    for w in range(len(a)):
        assert all(torch.equal(a[w][k], b[w][k]) for k in a[w])


def test_a_conversation_of_max_seq_len_fills_a_window_alone(sft_file):
    packed = PackedSFTDataset(sft_file, L)
    full = [w for w in range(len(packed)) if packed[w]["document_ids"].eq(0).all()]
    # SPECIAL[1] (item 0, after the skipped one) is L long as stored; SPECIAL[3] (item 2) is cut to L
    assert [packed.window_conversations(w) for w in full] == [[0], [2]]
    item = packed[full[0]]
    assert item["labels"][0] == IGNORE_INDEX and (item["labels"] != IGNORE_INDEX).sum() == L - 14


def test_padded_fallback_reports_its_fill(sft_file):
    dataset, line = load_sft_data(sft_file, L, packed=False)
    assert isinstance(dataset, SFTDataset)
    fill = conversation_lengths(dataset).sum() / (len(dataset) * L)
    assert line == f"{len(dataset)} conversations, each padded to {L} (fill {fill:.1%})"
    packed, line = load_sft_data(sft_file, L)
    assert isinstance(packed, PackedSFTDataset) and line.startswith("packed ") and packed.fill > fill
    # the padded items mark their real tokens, so the loop's tokens/s and the MoE balance loss skip the padding
    plain = SFTDataset(sft_file, L)
    for i in range(len(dataset)):
        item, ref = dataset[i], plain[i]
        assert torch.equal(item["input_ids"], ref["input_ids"]) and torch.equal(item["labels"], ref["labels"])
        assert item["token_mask"].sum() == dataset.lengths[i] and item["token_mask"][: dataset.lengths[i]].all()


def test_bundled_sample_packs_exactly(tmp_path):
    raw = ROOT / "dataset" / "sft_sample.jsonl"
    out = tmp_path / "sft.bin"
    assert data_process.main(["sft", "--input", str(raw), "--output", str(out), "--workers", "1",
                              "--tokenizer", str(tokenizer_dir(tmp_path))]) == 0
    sft, packed = SFTDataset(out, 128), PackedSFTDataset(out, 128)
    # the first token of a real conversation is never an answer token, so forcing its label to -100 changes nothing
    assert all(sft[i]["labels"][0] == IGNORE_INDEX for i in range(len(sft)))
    check_windows_hold_exactly_the_sft_items(packed, sft)
    assert packed.skipped == sft.skipped and packed.n_conversations == len(sft)


# ---------------------------------------------------------------------------------------------------------------
# the model sees a packed window exactly as its conversations one by one


def needs_document_ids():
    if "document_ids" not in inspect.signature(MiniMindForCausalLM.forward).parameters:
        pytest.skip("the model has no document_ids argument yet")


@pytest.mark.parametrize("use_moe", [False, True])
def test_packed_loss_and_logits_equal_separate_forwards(sft_file, use_moe, monkeypatch):
    needs_document_ids()
    # The grouped expert GEMM takes no float64; the per-expert path it stands in for computes the same function.
    monkeypatch.setattr(model_module, "DENSE_MOE_TOKENS", 1 << 30)
    packed, sft = PackedSFTDataset(sft_file, L), SFTDataset(sft_file, L)
    w = max(range(len(packed)), key=lambda i: len(packed.window_conversations(i)))
    window = packed[w]
    assert len(packed.window_conversations(w)) >= 3
    # eval mode: no MoE balance loss. float64, because in float32 the masked and the plain causal attention differ
    # by rounding (~1.6e-5 on these logits of up to ~50), which would hide a real difference of that size.
    model = tiny_model(vocab_size=VOCAB, max_seq_len=L, use_moe=use_moe).double()
    n_items = int((window["labels"][1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        out = model(**{k: v[None] for k, v in window.items()}, num_items_in_batch=n_items)
        separate_loss, start = 0.0, 0
        for j in packed.window_conversations(w):
            n = int(packed.lengths[j])
            alone = model(input_ids=sft[j]["input_ids"][None, :n], labels=sft[j]["labels"][None, :n],
                          num_items_in_batch=n_items)
            separate_loss += alone.loss
            torch.testing.assert_close(out.logits[0, start:start + n], alone.logits[0], rtol=1e-5, atol=1e-5)
            start += n
    torch.testing.assert_close(out.loss, separate_loss, rtol=1e-5, atol=1e-6)
