"""Prepared datasets: shard contents, split, metadata, parallel determinism, atomicity, errors."""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from fsa_train.data import prepare as prep
from fsa_train.data.corpus import resolve_sources
from fsa_train.data.prepare import (
    DatasetFormatError,
    load_split,
    prepare,
    prepare_dataset,
    split_documents,
    token_dtype,
)
from fsa_train.data.shards import ShardedTokens
from fsa_train.data.tokenizer import load_tokenizer, train_tokenizer

SHARD = 500  # tokens per shard in these tests: several shards, documents cut across them


@pytest.fixture
def docs(kjv_texts):
    texts = [t[: 300 + 150 * i] for i, t in enumerate(kjv_texts[:12])]
    return texts + ["", "A\n\n  B  ", " \n\t "]  # one empty and one whitespace-only document


@pytest.fixture
def prepared(docs, small_tokenizer, tmp_path):
    return prepare_dataset(
        docs, small_tokenizer, tmp_path / "ds", val_documents=3, seed=7, shard_tokens=SHARD
    )


def test_shards_hold_framed_tokens_document_by_document(docs, small_tokenizer, prepared):
    tok = small_tokenizer
    kept = [i for i, d in enumerate(docs) if d.strip()]
    is_val = split_documents(len(kept), 3, seed=7)
    for split, want in (("train", ~is_val), ("val", is_val)):
        ds = load_split(prepared, split, tok)
        expected = [i for i, keep in zip(kept, want, strict=True) if keep]  # corpus order
        assert ds.n_documents == len(expected)
        assert ds.tokens.dtype == np.uint16
        for j, i in enumerate(expected):
            doc = ds.document(j)
            assert doc.tolist() == [tok.bos_id, *tok.encode(docs[i]), tok.eos_id]
            assert tok.decode(doc[1:-1].tolist()) == docs[i]
            assert ds.origins[j].tolist() == [-1, i]  # in-memory texts: (no file, index)
        assert ds.doc_offsets[0] == 0 and ds.doc_offsets[-1] == ds.n_tokens == len(ds.tokens)
    train = load_split(prepared, "train")
    assert len(train.tokens.paths) > 1 and max(train.tokens.counts) <= SHARD


def test_meta(prepared, small_tokenizer):
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["format_version"] == prep.FORMAT_VERSION
    assert meta["tokenizer_checksum"] == small_tokenizer.checksum
    assert meta["vocab_size"] == small_tokenizer.vocab_size
    assert meta["dtype"] == "uint16"
    assert (meta["bos_id"], meta["eos_id"]) == (small_tokenizer.bos_id, small_tokenizer.eos_id)
    assert meta["splits"]["val"]["documents"] == 3
    assert meta["splits"]["train"]["documents"] == 10
    assert meta["corpus"]["empty"] == 2 and meta["corpus"]["documents"] == 13
    for split in ("train", "val"):
        info = meta["splits"][split]
        sizes = [(prepared / s["file"]).stat().st_size for s in info["shards"]]
        assert sizes == [2 * s["tokens"] for s in info["shards"]]
        assert sum(sizes) == 2 * info["tokens"]
        assert np.load(prepared / f"{split}.idx.npy").dtype == np.int64
    assert (prepared / "tokenizer.model").read_bytes() == small_tokenizer.path.read_bytes()


def write_corpus(root: Path, kjv_texts: list[str]) -> Path:
    """A directory mixing text files (one document each) and JSONL files (one per line)."""
    corpus = root / "corpus"
    (corpus / "books").mkdir(parents=True)
    for i, text in enumerate(kjv_texts[:8]):
        (corpus / "books" / f"{i:02d}.txt").write_text(text[: 2000 + 300 * i])
    (corpus / "books" / "empty.txt").write_text("   \n")
    lines = [json.dumps({"text": t[:800], "id": i}) for i, t in enumerate(kjv_texts[8:20])]
    (corpus / "more.jsonl").write_text("\n".join(lines[:6]) + "\n")
    (corpus / "most.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines[6:]) + "\n").encode()))
    return corpus


def test_parallel_output_equals_sequential(kjv_texts, small_tokenizer, tmp_path):
    sources = resolve_sources(write_corpus(tmp_path, kjv_texts))
    one = prepare(sources, small_tokenizer, tmp_path / "one", 0.1, num_workers=0,
                  shard_tokens=4096)
    two = prepare(sources, small_tokenizer, tmp_path / "two", 0.1, num_workers=2,
                  shard_tokens=4096)
    files = sorted(p.name for p in one.path.iterdir())
    assert files == sorted(p.name for p in two.path.iterdir())
    for name in files:
        if name != "meta.json":  # differs only in its creation time
            assert (one.path / name).read_bytes() == (two.path / name).read_bytes(), name
    assert one.splits == two.splits and one.stats == two.stats
    assert one.stats.empty == 1 and one.stats.documents == 8 + 12
    assert two.mb_per_s > 0 and two.tokens_per_s > 0 and "MB/s" in two.summary()


def test_origins_point_back_to_files_and_lines(kjv_texts, small_tokenizer, tmp_path):
    corpus = write_corpus(tmp_path, kjv_texts)
    out = prepare_dataset(resolve_sources(corpus), small_tokenizer, tmp_path / "ds", 0)
    names = json.loads((out / "sources.json").read_text())
    ds = load_split(out, "train")
    for j in range(ds.n_documents):
        src, line = ds.origins[j]
        path = Path(names[src])
        if line == 0:
            text = path.read_text()
        else:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            text = json.loads(raw.decode().splitlines()[line - 1])["text"]
        assert small_tokenizer.decode(ds.document(j)[1:-1].tolist()) == text


def test_sharded_tokens_slice_like_an_array(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 999, n).astype(np.uint16) for n in (7, 0, 5, 13)]
    paths = []
    for i, p in enumerate(parts):
        paths.append(tmp_path / f"s{i}.bin")
        p.tofile(paths[-1])
    whole = np.concatenate(parts)
    st = ShardedTokens(paths, [len(p) for p in parts], np.uint16)
    assert len(st) == len(whole) == 25
    for a in range(0, 26, 3):
        for b in range(a, 26, 2):
            assert st[a:b].tolist() == whole[a:b].tolist()
    assert st[3:20:4].tolist() == whole[3:20:4].tolist()
    assert st[-1] == whole[-1] and st[12] == whole[12]
    with pytest.raises(IndexError):
        st[25]
    clone = pickle.loads(pickle.dumps(st))
    assert np.array_equal(np.asarray(clone), whole)


def test_split_is_seeded_and_sized():
    a = split_documents(100, 10, seed=1)
    assert a.sum() == 10
    assert (split_documents(100, 10, seed=1) == a).all()
    assert (split_documents(100, 10, seed=2) != a).any()
    assert split_documents(100, 0.05, seed=1).sum() == 5
    assert split_documents(100, 0.001, seed=1).sum() == 1
    assert split_documents(5, 0, seed=1).sum() == 0
    with pytest.raises(ValueError, match="leaves no training documents"):
        split_documents(4, 4, seed=1)


def test_token_dtype():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_interrupted_prepare_leaves_nothing(docs, small_tokenizer, tmp_path, monkeypatch):
    calls = {"n": 0}
    encode = small_tokenizer.encode

    def failing_encode(text):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # also the BaseException path, like Ctrl-C
        return encode(text)

    monkeypatch.setattr(small_tokenizer, "encode", failing_encode)
    out = tmp_path / "data" / "ds"
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(docs, small_tokenizer, out, val_documents=2)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # the temp dir is cleaned up too


def test_existing_output_is_not_overwritten(docs, small_tokenizer, prepared):
    with pytest.raises(FileExistsError, match="already exists"):
        prepare_dataset(docs, small_tokenizer, prepared, val_documents=3)
    before = load_split(prepared, "val").n_documents
    prepare_dataset(docs, small_tokenizer, prepared, val_documents=1, overwrite=True)
    assert load_split(prepared, "val").n_documents == 1 != before
    assert [p.name for p in prepared.parent.iterdir()] == ["ds"]  # no temp or old copies left


def test_format_version_mismatch(prepared):
    meta_path = prepared / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    expected = f"format_version 99, expected {prep.FORMAT_VERSION}"
    with pytest.raises(DatasetFormatError, match=expected) as info:
        load_split(prepared, "train")
    assert "\n" not in str(info.value)


def test_missing_files(prepared, tmp_path):
    (prepared / "val-00000.bin").unlink()
    load_split(prepared, "train")
    with pytest.raises(FileNotFoundError, match="val-00000.bin"):
        load_split(prepared, "val")
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        load_split(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="dataset directory not found"):
        load_split(tmp_path / "nope", "train")
    with pytest.raises(DatasetFormatError, match="no split 'test'"):
        load_split(prepared, "test")


def test_truncated_shard(prepared):
    with open(prepared / "train-00001.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DatasetFormatError, match="do not match meta.json"):
        load_split(prepared, "train")


def test_tokenizer_mismatch(prepared, kjv_texts, tmp_path):
    other_vocab = load_tokenizer(train_tokenizer([kjv_texts[1][:20_000]], tmp_path / "v", 350))
    with pytest.raises(DatasetFormatError, match="made with vocab_size 400, tokenizer has 350"):
        load_split(prepared, "train", other_vocab)
    other_model = load_tokenizer(train_tokenizer([kjv_texts[1][:20_000]], tmp_path / "m", 400))
    with pytest.raises(DatasetFormatError, match="made with tokenizer"):
        load_split(prepared, "train", other_model)


def test_token_dataset_pickles_without_tokens(prepared):
    ds = load_split(prepared, "train")
    tokens = np.asarray(ds.tokens)
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < tokens.nbytes
    assert (np.asarray(clone.tokens) == tokens).all()


def test_empty_split_loads(docs, small_tokenizer, tmp_path):
    out = prepare_dataset(docs, small_tokenizer, tmp_path / "ds", val_documents=0)
    val = load_split(out, "val")
    assert val.n_tokens == 0 and val.n_documents == 0 and len(val.tokens) == 0


def test_bad_jsonl_line_stops_with_file_and_line(small_tokenizer, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "good one"}\n{"text": "two"}\n{"txt": "three"}\n{"text": "4"}\n')
    out = tmp_path / "ds"
    for workers in (0, 2):
        with pytest.raises(ValueError, match=r"c.jsonl:3: missing field 'text'") as info:
            prepare(resolve_sources(path), small_tokenizer, out, 1, num_workers=workers)
        assert "\n" not in str(info.value) and "--skip_invalid_lines" in str(info.value)
        assert list(tmp_path.iterdir()) == [path]  # nothing left behind
    report = prepare(resolve_sources(path), small_tokenizer, out, 1, skip_invalid_lines=True)
    assert report.stats.invalid_lines == 1 and report.stats.documents == 3


def test_corpus_without_documents(small_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="no documents to prepare: 0 documents.*2 empty skipped"):
        prepare_dataset(["", "  \n "], small_tokenizer, tmp_path / "ds", 0)
    assert list(tmp_path.iterdir()) == []
