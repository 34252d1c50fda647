"""model/mixture.py through PretrainDataset and 1-pretrain.py: --mix shares, the length filters, BOS-aligned
packing and its cropped share, defaults equal to the plain stream, exact resume, and token files from before."""

import numpy as np
import pytest
import torch
from conftest import tiny_model
from pipeline_helpers import script_main, tokenizer_dir, write_jsonl, write_token_file

import data_process
from model.dataset import PretrainDataset, TokenFileWriter, open_token_file
from model.mixture import MixtureError, pack_bos, parse_mix

BOS, EOS = 1, 2
TINY = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "16"]


def sourced_docs(sizes: dict[str, int], seed=0, max_len=40):
    """{source: documents}; source k's text tokens lie in 10 + 100k .. 10 + 100k + 99, so a token names its source."""
    rng = np.random.default_rng(seed)
    return {name: [[BOS, *rng.integers(10 + 100 * k, 110 + 100 * k, size=rng.integers(1, max_len)).tolist(), EOS]
                   for _ in range(n)]
            for k, (name, n) in enumerate(sizes.items())}


def write_sourced_file(path, by_source: dict[str, list], chars=None):
    """A token file as `data_process.py pretrain` now writes it: the sources' documents interleaved, each with its
    source index and a character count (default: its text token count)."""
    names = list(by_source)
    order = [(k, d) for i in range(max(map(len, by_source.values())))
             for k, name in enumerate(names) if i < len(by_source[name]) for d in [by_source[name][i]]]
    docs = [d for _, d in order]
    arrays = {"tokens": "uint16", "doc_offsets": "uint64", "doc_source": "uint16", "doc_chars": "uint32"}
    with TokenFileWriter(path, "pretrain", arrays) as w:
        w.append("tokens", np.concatenate([np.array(d, np.uint16) for d in docs]))
        w.append("doc_offsets", np.concatenate([[0], np.cumsum([len(d) for d in docs])]))
        w.append("doc_source", [k for k, _ in order])
        w.append("doc_chars", chars if chars is not None else [len(d) - 2 for d in docs])
        w.close(meta={"sources": names, "source_names": names})
    return path, docs


def source_of(token: int) -> int:
    return (token - 10) // 100


def test_mix_weights_give_the_expected_token_shares(tmp_path):
    by_source = sourced_docs({"a.jsonl": 600, "b.jsonl": 600, "c.jsonl": 300, "d.jsonl": 100})
    path, _ = write_sourced_file(tmp_path / "p.bin", by_source)
    weights = {"a.jsonl": 1, "b.jsonl": 0.5, "c.jsonl": 2, "d.jsonl": 0}
    ds = PretrainDataset(path, 32, mix=weights, seed=3)
    seen = np.bincount([source_of(t) for i in range(len(ds)) for t in ds[i]["targets"].tolist() if t > EOS],
                       minlength=4)
    text_tokens = np.array([sum(len(d) - 2 for d in docs) for docs in by_source.values()])
    expected = np.array(list(weights.values())) * text_tokens
    np.testing.assert_allclose(seen / seen.sum(), expected / expected.sum(), atol=0.03)
    assert seen[3] == 0  # weight 0 drops the source
    assert ds.mixture.documents.tolist()[2:] == [600, 0]  # weight 2: every document of c twice
    assert 240 <= ds.mixture.documents[1] <= 360  # weight 0.5: about half of b, seeded
    again = PretrainDataset(path, 32, mix=weights, seed=3)
    assert all(torch.equal(ds[i]["input_ids"], again[i]["input_ids"]) for i in range(len(ds)))  # deterministic
    other = PretrainDataset(path, 32, mix=weights, seed=4)  # another seed keeps another half of b
    assert [other[i]["input_ids"].tolist() for i in range(len(other))] != \
        [ds[i]["input_ids"].tolist() for i in range(len(ds))]


def test_mix_errors_are_one_line_and_name_the_sources(tmp_path):
    path, _ = write_sourced_file(tmp_path / "p.bin", sourced_docs({"a.jsonl": 5, "b.jsonl": 5}))
    with pytest.raises(MixtureError, match=r"no source 'c.jsonl'; its sources are: a.jsonl, b.jsonl$"):
        PretrainDataset(path, 8, mix={"c.jsonl": 1})
    for bad in (["a.jsonl"], ["a.jsonl=-1"], ["a.jsonl=x"], ["a.jsonl=1", "a.jsonl=2"]):
        with pytest.raises(MixtureError, match="--mix"):
            parse_mix(bad)
    assert parse_mix(["odd=name.jsonl=0.25"]) == {"odd=name.jsonl": 0.25}
    with pytest.raises(MixtureError, match="no document is left"):
        PretrainDataset(path, 8, mix={"a.jsonl": 0, "b.jsonl": 0})


def test_defaults_and_identity_flags_give_todays_windows(tmp_path):
    docs = [d for ds in sourced_docs({"a": 30, "b": 30}).values() for d in ds]
    stream = np.concatenate(docs)
    path = write_token_file(tmp_path / "p.bin", docs)
    T = 16
    for flags in ({}, {"mix": {"p.bin": 1.0}}, {"max_doc_tokens": 10_000}):
        ds = PretrainDataset(path, T, doc_mask=True, **flags)
        assert ds.windows is None and len(ds) == (len(stream) - 1) // T
        for i in range(len(ds)):  # today's definition: window i is stream[i*T : i*T + T + 1]
            assert ds[i]["input_ids"].tolist() == stream[i * T:i * T + T].tolist()
            assert ds[i]["targets"].tolist() == stream[i * T + 1:i * T + T + 1].tolist()


def test_length_filter_streams_exactly_the_kept_documents(tmp_path):
    by_source = sourced_docs({"a": 40, "b": 40}, max_len=30)
    path, docs = write_sourced_file(tmp_path / "p.bin", by_source, chars=None)
    kept = [d for d in docs if len(d) <= 20]
    filtered = PretrainDataset(path, 12, doc_mask=True, max_doc_tokens=20)
    # the same windows (and document masks) as a file holding only the kept documents, read today's way
    plain = PretrainDataset(write_token_file(tmp_path / "kept.bin", kept), 12, doc_mask=True)
    assert filtered.windows is not None and len(filtered) == len(plain)
    for i in range(len(plain)):
        a, b = filtered[i], plain[i]
        assert all(torch.equal(a[k], b[k]) for k in b)
    by_chars = PretrainDataset(path, 12, max_doc_chars=18)  # characters here = text tokens = length - 2
    assert [by_chars[i]["input_ids"].tolist() for i in range(len(by_chars))] == \
        [filtered[i]["input_ids"].tolist() for i in range(len(filtered))]


def test_bos_packing_by_hand():
    # window 8, pool of 3 (5, 3, 10): the longest heads, cut to 8; then 5 + 3; then 4 + 2 cannot fill a window
    packed = pack_bos([5, 3, 10, 2, 4], 8, pool_size=3)
    assert packed.window_ptr.tolist() == [0, 1, 3]
    assert packed.piece_doc.tolist() == [2, 0, 1] and packed.piece_len.tolist() == [8, 5, 3]
    assert packed.total_tokens == 24 and packed.cropped_tokens == 2 + 6
    assert packed.cropped_share == pytest.approx(8 / 24)
    # best fit: after the 6-token head the 2 (not the first-come 1) fills the window; then 4 + 3 + 1: none cropped
    exact = pack_bos([6, 1, 2, 3, 4], 8)
    assert exact.window_ptr.tolist() == [0, 2, 5] and exact.piece_doc.tolist() == [0, 2, 4, 3, 1]
    assert exact.piece_len.tolist() == [6, 2, 4, 3, 1] and exact.cropped_tokens == 0
    # nothing fits the last 2 places: the shortest document (3 tokens, the earlier of two) gives its head
    crop = pack_bos([6, 3, 3], 8)
    assert crop.piece_doc.tolist() == [0, 1] and crop.piece_len.tolist() == [6, 2] and crop.cropped_tokens == 1 + 3


def test_bos_windows_start_at_a_document_and_crop_only_their_end(tmp_path):
    by_source = sourced_docs({"a": 150, "b": 150}, max_len=60)
    path, docs = write_sourced_file(tmp_path / "p.bin", by_source)
    T = 24
    ds = PretrainDataset(path, T, doc_mask=True, packing="bos")
    lengths = np.array([len(d) for d in docs])
    placed = 0
    for i in range(len(ds)):
        item = ds[i]
        assert item["input_ids"][0] == BOS and item["position_ids"][0] == 0
        starts = np.nonzero(np.diff(item["document_ids"].numpy(), prepend=-1))[0]
        assert (item["input_ids"][starts] == BOS).all() and (item["position_ids"][starts] == 0).all()
        file_docs, firsts, counts = ds.windows.pieces(i)
        assert (firsts == 0).all() and counts.sum() == T + 1
        assert (counts[:-1] == lengths[file_docs[:-1]]).all()  # whole documents, only the last one cut
        window = np.concatenate([docs[d][:n] for d, n in zip(file_docs, counts)])
        assert item["input_ids"].tolist() == window[:-1].tolist() and item["targets"].tolist() == window[1:].tolist()
        placed += counts.sum()
    assert ds.windows.cropped_tokens == lengths.sum() - placed
    assert ds.windows.total_tokens == lengths.sum()
    # the model sees a packed document exactly as it would alone (document_ids + position_ids)
    item = next(ds[i] for i in range(len(ds)) if ds[i]["document_ids"].max() >= 1)
    second = int(np.nonzero(item["document_ids"].numpy() == 1)[0][0])
    length = int((item["document_ids"] == 1).sum())
    with torch.no_grad():
        model = tiny_model()
        packed = model(**{k: v.unsqueeze(0) for k, v in item.items() if k != "targets"}).logits[0]
        alone = model(input_ids=item["input_ids"][second:second + length].unsqueeze(0)).logits[0]
    torch.testing.assert_close(packed[second:second + length], alone, rtol=1e-4, atol=1e-4)


def test_data_process_records_sources_and_lengths_and_old_files_still_load(tmp_path):
    tok = tokenizer_dir(tmp_path)
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "长江是中国最长的河流。"}, {"text": "光合作用。" * 30}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "三角形内角和是一百八十度。"}])
    assert data_process.main(["pretrain", "--input", str(a), str(b), "--output", str(tmp_path / "p.bin"),
                              "--tokenizer", str(tok), "--workers", "1"]) == 0
    header, arrays = open_token_file(tmp_path / "p.bin", "pretrain")
    assert header["meta"]["source_names"] == ["a.jsonl", "b.jsonl"]
    assert arrays["doc_source"].tolist() == [0, 0, 1] and arrays["doc_chars"].tolist() == [11, 150, 13]
    short = PretrainDataset(tmp_path / "p.bin", 8, max_doc_chars=20)
    assert short.mixture.documents.tolist() == [1, 1]
    # a file from before (no doc_source/doc_chars): one source, named after the file; no --max_doc_chars
    old = write_token_file(tmp_path / "old.bin", [[BOS, *range(10, 30), EOS], [BOS, 5, 6, EOS]])
    ds = PretrainDataset(old, 8)
    assert ds.windows is None and len(ds) == 3 and ds.mixture.names == ["old.bin"]
    # bos at 4 (windows of 5): doc 0's head, then doc 1 (4 tokens) alone cannot fill a window
    bos = PretrainDataset(old, 4, packing="bos", mix={"old.bin": 1})
    assert len(bos) == 1 and bos[0]["input_ids"].tolist() == [BOS, 10, 11, 12] and bos.windows.cropped_tokens == 21
    assert PretrainDataset(old, 2, max_doc_tokens=4)[0]["input_ids"].tolist() == [BOS, 5]
    with pytest.raises(MixtureError, match="records no document lengths in characters"):
        PretrainDataset(old, 8, max_doc_chars=100)


class Crash(Exception):
    pass


def test_resume_with_mix_and_bos_packing_sees_the_same_windows(tmp_path, monkeypatch):
    path, _ = write_sourced_file(tmp_path / "p.bin", sourced_docs({"a.jsonl": 60, "b.jsonl": 60}, max_len=30))
    seen = []
    getitem = PretrainDataset.__getitem__

    def recording_getitem(self, index):
        item = getitem(self, index)
        seen.append(item["input_ids"].tolist())
        return item

    monkeypatch.setattr(PretrainDataset, "__getitem__", recording_getitem)

    def pretrain(out, *extra, crash_at=None):
        main = script_main("1-pretrain.py")
        script_globals = main.__wrapped__.__globals__  # main is wrapped by exit_on_usage_error
        train = script_globals["train"]

        def crashing_train(*args, **kwargs):
            kwargs.pop("tokenizer", None)  # its bits/char sample reads items at start-up; the test compares training's

            def die(step, history):
                if step == crash_at:
                    raise Crash
            return train(*args, step_callback=die if crash_at else None, **kwargs)

        monkeypatch.setitem(script_globals, "train", crashing_train)
        main([*TINY, "--data_path", str(path), "--out_dir", str(tmp_path / out), "--images_dir", str(tmp_path / "img"),
              "--device", "cpu", "--num_workers", "0", "--batch_size", "2", "--max_steps", "6", "--save_interval", "3",
              "--val_fraction", "0", "--log_interval", "1", "--mix", "a.jsonl=1", "b.jsonl=0.5", "--packing", "bos",
              "--doc_mask", *extra])

    pretrain("straight")
    straight, seen[:] = list(seen), []
    with pytest.raises(Crash):
        pretrain("killed", crash_at=4)  # step 4 ran but was never saved
    first_part, seen[:] = seen[:3 * 2], []
    pretrain("killed", "--resume")
    assert first_part + seen == straight and len(straight) == 6 * 2
    a = torch.load(tmp_path / "straight" / "pretrain_64.pth", weights_only=True)
    b = torch.load(tmp_path / "killed" / "pretrain_64.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_mix_source_is_a_one_line_error_from_the_script(tmp_path, capsys):
    path, _ = write_sourced_file(tmp_path / "p.bin", sourced_docs({"a.jsonl": 5, "b.jsonl": 5}))
    with pytest.raises(SystemExit) as exit_:
        script_main("1-pretrain.py")([*TINY, "--data_path", str(path), "--out_dir", str(tmp_path), "--device", "cpu",
                                      "--mix", "typo.jsonl=1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "its sources are: a.jsonl, b.jsonl" in err


def mixture_flags(*argv):
    import argparse

    from model.mixture import add_mixture_args, mixture_kwargs
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)  # add_train_args's
    add_mixture_args(parser)
    return mixture_kwargs(parser.parse_args(list(argv)))


def test_default_keeps_documents_of_at_most_512_characters_and_says_so(tmp_path):
    by_source = sourced_docs({"a.jsonl": 3}, max_len=20)
    path, docs = write_sourced_file(tmp_path / "p.bin", by_source, chars=[100, 600, 512])
    default = PretrainDataset(path, 8, **mixture_flags())
    assert default.mixture.documents.tolist() == [2]
    share = (len(docs[0]) + len(docs[2])) / sum(map(len, docs))
    assert default.mixture.filter_note == (f"documents of <= 512 characters: kept 2 of 3 ({share:.1%} of the file's "
                                           "tokens); --max_doc_chars 0 keeps every document")
    every = PretrainDataset(path, 8, **mixture_flags("--max_doc_chars", "0"))
    assert every.windows is None and every.mixture.filter_note is None and len(every) == len(
        PretrainDataset(path, 8))
    # a token file from before character lengths were recorded: the default is skipped with a note, a typed value
    # (even the same number) is an error
    old = write_token_file(tmp_path / "old.bin", [[BOS, *range(10, 30), EOS], [BOS, 5, 6, EOS]])
    skipped = PretrainDataset(old, 8, **mixture_flags())
    assert skipped.windows is None and len(skipped) == 3
    assert "--max_doc_chars 512 (the default) not applied" in skipped.mixture.filter_note
    with pytest.raises(MixtureError, match="records no document lengths in characters"):
        PretrainDataset(old, 8, **mixture_flags("--max_doc_chars", "512"))


def test_resume_refuses_other_data_flags(tmp_path, capsys):
    path, _ = write_sourced_file(tmp_path / "p.bin", sourced_docs({"a.jsonl": 40}, max_len=30))
    run = [*TINY, "--data_path", str(path), "--out_dir", str(tmp_path / "out"), "--images_dir", str(tmp_path),
           "--device", "cpu", "--num_workers", "0", "--batch_size", "2", "--max_steps", "2", "--val_fraction", "0"]
    script_main("1-pretrain.py")(run)
    with pytest.raises(SystemExit) as exit_:
        script_main("1-pretrain.py")([*run, "--resume", "--max_doc_chars", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "was trained with --max_doc_chars 512, this run has --max_doc_chars 0" in err
