"""Packed windows and their collation: coverage, segment boundaries, target masking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fsa_train.data.packing import IGNORE_INDEX, PackedWindows, check_seq_len, collate_packed
from fsa_train.data.prepare import TokenDataset, load_split, prepare_dataset


def synthetic(doc_lengths: list[int], seed: int = 0) -> TokenDataset:
    rng = np.random.default_rng(seed)
    offsets = np.concatenate(([0], np.cumsum(doc_lengths))).astype(np.int64)
    tokens = rng.integers(4, 1000, size=int(offsets[-1])).astype(np.uint16)
    return TokenDataset(tokens, offsets)


def doc_ids(ds: TokenDataset) -> np.ndarray:
    """Document index of every stream position."""
    return np.repeat(np.arange(ds.n_documents), np.diff(ds.doc_offsets))


DOC_LENGTHS = [2, 5, 17, 3, 40, 2, 2, 9, 64, 1, 30, 8, 100, 6]


@pytest.mark.parametrize("seq_len", [1, 4, 7, 16, 64, 296])
@pytest.mark.parametrize("document_mask", [True, False])
def test_window_invariants(seq_len, document_mask):
    ds = synthetic(DOC_LENGTHS)
    stream = ds.tokens.astype(np.int64)
    doc = doc_ids(ds)
    pw = PackedWindows(ds, seq_len, document_mask)
    assert len(pw) == (ds.n_tokens - 1) // seq_len
    inputs = []
    for w in range(len(pw)):
        item = pw[w]
        x, y, cu = item["input_ids"], item["targets"], item["cu_seqlens"]
        assert x.dtype == y.dtype == torch.int64 and cu.dtype == torch.int32
        assert x.shape == y.shape == (seq_len,)
        cu = cu.numpy()
        assert cu[0] == 0 and cu[-1] == seq_len and (np.diff(cu) > 0).all()
        pos = w * seq_len + np.arange(seq_len)  # stream positions of the inputs
        same_doc = doc[pos] == doc[pos + 1]
        if document_mask:
            want_y = np.where(same_doc, stream[pos + 1], IGNORE_INDEX)
            for a, b in zip(cu[:-1], cu[1:], strict=True):
                assert len(set(doc[pos[a:b]])) == 1  # a segment lies in one document
            # ...and segments are maximal: every document change inside is a segment edge.
            changes = np.flatnonzero(doc[pos[1:]] != doc[pos[:-1]]) + 1
            assert changes.tolist() == cu[1:-1].tolist()
        else:
            want_y = stream[pos + 1]
            assert cu.tolist() == [0, seq_len]
        assert y.tolist() == want_y.tolist()
        inputs.append(x.numpy())
    # Every token appears exactly once as an input, in order, except the final remainder.
    covered = np.concatenate(inputs) if inputs else np.zeros(0, dtype=np.int64)
    assert covered.tolist() == stream[: len(pw) * seq_len].tolist()
    assert ds.n_tokens - len(covered) <= seq_len


def test_out_of_range_and_bad_seq_len():
    pw = PackedWindows(synthetic([10, 10]), 4)
    assert len(pw) == 4
    with pytest.raises(IndexError):
        pw[4]
    with pytest.raises(IndexError):
        pw[-1]
    with pytest.raises(ValueError, match="seq_len"):
        PackedWindows(synthetic([10]), 0)
    assert len(PackedWindows(synthetic([3]), 8)) == 0


def test_empty_documents_add_no_segment():
    pw = PackedWindows(synthetic([3, 0, 0, 5]), 7)
    assert pw[0]["cu_seqlens"].tolist() == [0, 3, 7]


def test_collate_offsets():
    ds = synthetic(DOC_LENGTHS)
    pw = PackedWindows(ds, 16)
    windows = [pw[i] for i in (3, 0, 7)]
    batch = collate_packed(windows)
    assert batch["n_windows"] == 3
    assert batch["input_ids"].shape == batch["targets"].shape == (48,)
    assert batch["cu_seqlens"].dtype == torch.int32
    expected = [0]
    for k, win in enumerate(windows):
        expected += (win["cu_seqlens"][1:] + 16 * k).tolist()
    assert batch["cu_seqlens"].tolist() == expected
    assert 16 in expected and 32 in expected  # window edges are always segment edges
    assert isinstance(batch["max_seqlen"], int)
    assert batch["max_seqlen"] == max(b - a for a, b in zip(expected, expected[1:], strict=False))
    for k, win in enumerate(windows):
        assert torch.equal(batch["input_ids"][16 * k : 16 * (k + 1)], win["input_ids"])
        assert torch.equal(batch["targets"][16 * k : 16 * (k + 1)], win["targets"])


def test_collate_without_document_mask():
    pw = PackedWindows(synthetic(DOC_LENGTHS), 10, document_mask=False)
    batch = collate_packed([pw[0], pw[1]])
    assert batch["cu_seqlens"].tolist() == [0, 10, 20]
    assert batch["max_seqlen"] == 10


def test_windows_over_prepared_files(kjv_texts, small_tokenizer, tmp_path):
    docs = [t[:400] for t in kjv_texts[:6]]
    out = prepare_dataset(docs, small_tokenizer, tmp_path / "ds", val_documents=1)
    ds = load_split(out, "train", small_tokenizer)
    pw = PackedWindows(ds, 32)
    x = torch.cat([pw[i]["input_ids"] for i in range(len(pw))])
    assert x.tolist() == np.asarray(ds.tokens[: len(pw) * 32], dtype=np.int64).tolist()
    assert (x == small_tokenizer.bos_id).sum() >= 4


def test_windows_across_shards_match_the_stream(small_tokenizer, kjv_texts, tmp_path):
    docs = [t[:700] for t in kjv_texts[:8]]
    out = prepare_dataset(docs, small_tokenizer, tmp_path / "ds", val_documents=0,
                          shard_tokens=97)  # windows straddle shard edges
    ds = load_split(out, "train")
    stream = np.asarray(ds.tokens).astype(np.int64)
    pw = PackedWindows(ds, 50)
    for w in range(len(pw)):
        assert pw[w]["input_ids"].tolist() == stream[50 * w : 50 * w + 50].tolist()


def test_check_seq_len():
    from fsa_train.config import ConfigError, NSAConfig

    nsa = NSAConfig(cmp_kernel=32, cmp_stride=16, sel_block=64, sel_topk=4, window=128)
    check_seq_len(512, nsa)
    check_seq_len(500, None)  # dense attention: any length
    with pytest.raises(ConfigError, match=r"seq_len=500 must be a multiple of .*sel_block=64") as e:
        check_seq_len(500, nsa)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="shorter than model.config.nsa.cmp_kernel=128"):
        check_seq_len(64, NSAConfig(cmp_kernel=128, cmp_stride=32, sel_block=64, sel_topk=4))
    with pytest.raises(ConfigError, match="positive integer"):
        check_seq_len(0, None)
