"""Synthetic retrieval documents in the training stream (fsa_train.data.retrieval_mix)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fsa_train.config import ConfigError
from fsa_train.data.datamodule import TextDataModule
from fsa_train.data.packing import PackedWindows
from fsa_train.data.prepare import load_split, prepare_dataset
from fsa_train.data.retrieval_mix import (
    RetrievalMix,
    build_document,
    check_retrieval,
    key_sentence,
    question,
)


def _contains(ids: list[int], part: list[int], at: int) -> bool:
    return ids[at:at + len(part)] == part


def test_document_layout(small_tokenizer):
    tok = small_tokenizer
    filler = tok.encode("In the beginning God created the heaven and the earth. " * 20)
    for trial in range(20):
        rng = random.Random(trial)
        doc = build_document(tok, filler, 300, 4, rng)
        assert len(doc.ids) == 300
        assert doc.ids[0] == tok.bos_id and doc.ids[-1] == tok.eos_id
        assert len(doc.needles) == 4 and len({name for _, name, _ in doc.needles}) == 4
        offsets = [at for at, _, _ in doc.needles]
        assert offsets == sorted(offsets)
        starts = tok.word_starts()
        for at, name, key in doc.needles:
            needle = tok.encode(key_sentence(name, key))
            assert _contains(doc.ids, needle, at)
            assert starts[doc.ids[at + len(needle)]]  # the text goes on with a whole word
        _, name, key = doc.needles[doc.asked]
        start, n = doc.answer
        assert tok.decode(doc.ids[start:start + n]).strip() == key
        asked = tok.encode(question(name))
        assert doc.ids[start - len(asked):start] == asked
        assert 0 < doc.distance < 300
    with pytest.raises(ConfigError, match="needs at least"):
        build_document(tok, filler, 40, 4, random.Random(0))


def test_word_boundary_moves_a_cut_to_the_nearest_word_start(small_tokenizer):
    from fsa_train.data.retrieval_mix import word_boundary

    text = small_tokenizer.encode("In the beginning God created the heaven and the earth.")
    starts = small_tokenizer.word_starts()
    assert starts.dtype == bool and starts.shape == (small_tokenizer.vocab_size,)
    for cut in range(len(text) + 1):
        moved = word_boundary(small_tokenizer, text, cut)
        assert moved in (0, len(text)) or starts[text[moved]]
        assert abs(moved - cut) <= 16

    class Plain:  # a tokenizer without word information keeps the cut
        pass

    assert word_boundary(Plain(), text, 3) == 3


def test_questions_cover_every_key_and_distances_spread(small_tokenizer):
    filler = small_tokenizer.encode("And the earth was without form, and void. " * 40)
    docs = [build_document(small_tokenizer, filler, 512, 4, random.Random(i)) for i in range(200)]
    assert {d.asked for d in docs} == {0, 1, 2, 3}
    distances = [d.distance for d in docs]
    assert min(distances) < 100 and max(distances) > 350


def test_mix_is_a_function_of_seed_and_window(small_tokenizer):
    mix = RetrievalMix(small_tokenizer, 0.1, keys=3, seed=7)
    chosen = [w for w in range(3000) if mix.chooses(w)]
    assert 0.07 < len(chosen) / 3000 < 0.13
    assert chosen == [w for w in range(3000) if RetrievalMix(small_tokenizer, 0.1, 3, 7).chooses(w)]
    assert chosen != [w for w in range(3000) if RetrievalMix(small_tokenizer, 0.1, 3, 8).chooses(w)]
    assert not any(RetrievalMix(small_tokenizer, 0.0).chooses(w) for w in range(500))
    chunk = np.arange(10, 10 + 257, dtype=np.int64)
    a, b = mix.window(chosen[0], chunk), mix.window(chosen[0], chunk)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], mix.window(chosen[1], chunk)["input_ids"])


@pytest.mark.parametrize("fraction,keys", [(1.0, 4), (-0.1, 4), (0.1, 0), (0.1, 99)])
def test_bad_settings_are_one_line_errors(fraction, keys):
    with pytest.raises(ConfigError) as error:
        check_retrieval(fraction, keys)
    assert "\n" not in str(error.value) and "data.retrieval_" in str(error.value)


def test_windows_are_replaced_with_the_windows_own_text(kjv_texts, small_tokenizer, tmp_path):
    out = prepare_dataset([t[:3000] for t in kjv_texts[:8]], small_tokenizer, tmp_path / "ds",
                          val_documents=1)
    train = load_split(out, "train", small_tokenizer)
    mix = RetrievalMix(small_tokenizer, 0.3, keys=2, seed=1)
    mixed, plain = PackedWindows(train, 128, retrieval=mix), PackedWindows(train, 128)
    chosen = [w for w in range(len(mixed)) if mix.chooses(w)]
    assert chosen and len(chosen) < len(mixed)
    special = {small_tokenizer.bos_id, small_tokenizer.eos_id}
    for w in range(len(mixed)):
        item, natural = mixed[w], plain[w]
        if w not in chosen:
            assert all(torch.equal(item[k], natural[k]) for k in item)
            continue
        assert item["cu_seqlens"].tolist() == [0, 128]  # one document: the key is reachable
        assert torch.equal(item["input_ids"][1:], item["targets"][:-1])
        assert item["input_ids"][0] == small_tokenizer.bos_id
        own = set(natural["input_ids"].tolist()) | set(natural["targets"].tolist())
        sentences = set()
        ids = item["input_ids"].tolist()
        inner = [t for t in ids[1:] if t not in special]
        # every token is the window's own text, a key sentence's or the question's
        needles = _needles(small_tokenizer, ids)
        assert len(needles) == 2
        for _, name, key in needles:
            sentences |= set(small_tokenizer.encode(key_sentence(name, key)))
            sentences |= set(small_tokenizer.encode(question(name) + " " + key))
        assert set(inner) <= own | sentences
    with pytest.raises(ConfigError, match="data.seq_len"):
        PackedWindows(train, 32, retrieval=RetrievalMix(small_tokenizer, 0.3, keys=4))


def _needles(tokenizer, ids: list[int]):
    """The (offset, name, key) of every key sentence found in ``ids``."""
    from fsa_train.data.retrieval_mix import NAMES

    text = tokenizer.decode(ids)
    found = []
    for name in NAMES:
        marker = f"The pass key of the {name} is "
        at = text.find(marker)
        if at >= 0:
            found.append((at, name, text[at + len(marker):at + len(marker) + 5]))
    return found


def test_datamodule_mixes_training_only_and_records_the_option(kjv_texts, small_tokenizer,
                                                               tmp_path):
    out = prepare_dataset([t[:3000] for t in kjv_texts[:8]], small_tokenizer, tmp_path / "ds",
                          val_documents=2)
    dm = TextDataModule(dataset=str(out), vocab_size=400, seq_len=128, batch_size=2,
                        retrieval_fraction=0.25, retrieval_keys=2)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.train_set.retrieval is not None and dm.val_set.retrieval is None
    assert dm.hparams["retrieval_fraction"] == 0.25 and dm.hparams["retrieval_keys"] == 2
    assert "retrieval documents with 2 keys" in dm.describe()
    with pytest.raises(ConfigError, match="data.retrieval_fraction"):
        TextDataModule(dataset=str(out), retrieval_fraction=1.5)
