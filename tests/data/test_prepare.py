"""Token files written by prepare_dataset: contents, split, metadata, atomicity, load errors."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from fsa_train.data import prepare as prep
from fsa_train.data.prepare import (
    DatasetFormatError,
    load_split,
    prepare_dataset,
    split_documents,
    token_dtype,
)
from fsa_train.data.tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture
def docs(kjv_texts):
    return [t[: 300 + 150 * i] for i, t in enumerate(kjv_texts[:12])] + ["", "A\n\n  B  "]


@pytest.fixture
def prepared(docs, small_tokenizer, tmp_path):
    return prepare_dataset(docs, small_tokenizer, tmp_path / "ds", val_documents=3, seed=7)


def test_files_hold_framed_tokens_document_by_document(docs, small_tokenizer, prepared):
    tok = small_tokenizer
    is_val = split_documents(len(docs), 3, seed=7)
    for split, want in (("train", ~is_val), ("val", is_val)):
        ds = load_split(prepared, split, tok)
        expected = [d for d, keep in zip(docs, want, strict=True) if keep]  # corpus order
        assert ds.n_documents == len(expected)
        assert ds.tokens.dtype == np.uint16
        for i, text in enumerate(expected):
            doc = ds.document(i)
            assert doc.tolist() == [tok.bos_id, *tok.encode(text), tok.eos_id]
            assert tok.decode(doc[1:-1].tolist()) == text
        assert ds.doc_offsets[0] == 0 and ds.doc_offsets[-1] == ds.n_tokens == len(ds.tokens)


def test_meta(prepared, small_tokenizer):
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["format_version"] == prep.FORMAT_VERSION
    assert meta["tokenizer_checksum"] == small_tokenizer.checksum
    assert meta["vocab_size"] == small_tokenizer.vocab_size
    assert meta["dtype"] == "uint16"
    assert meta["splits"]["val"]["documents"] == 3
    assert meta["splits"]["train"]["documents"] == 11
    for split in ("train", "val"):
        n_bytes = (prepared / f"{split}.bin").stat().st_size
        assert n_bytes == 2 * meta["splits"][split]["tokens"]
        assert np.load(prepared / f"{split}.idx.npy").dtype == np.int64


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


def test_format_version_mismatch(prepared):
    meta_path = prepared / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DatasetFormatError, match="format_version 99, expected 1") as info:
        load_split(prepared, "train")
    assert "\n" not in str(info.value)


def test_missing_files(prepared, tmp_path):
    (prepared / "val.bin").unlink()
    load_split(prepared, "train")
    with pytest.raises(FileNotFoundError, match="val.bin"):
        load_split(prepared, "val")
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        load_split(tmp_path, "train")
    with pytest.raises(DatasetFormatError, match="no split 'test'"):
        load_split(prepared, "test")


def test_truncated_token_file(prepared):
    with open(prepared / "train.bin", "r+b") as f:
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
    tokens = np.array(ds.tokens)
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < tokens.nbytes
    assert (np.asarray(clone.tokens) == tokens).all()


def test_empty_split_loads(docs, small_tokenizer, tmp_path):
    out = prepare_dataset(docs, small_tokenizer, tmp_path / "ds", val_documents=0)
    val = load_split(out, "val")
    assert val.n_tokens == 0 and val.n_documents == 0 and len(val.tokens) == 0
