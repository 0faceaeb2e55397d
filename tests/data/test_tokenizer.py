"""Tokenizer training and the lossless round trip."""

from __future__ import annotations

import hashlib
import pickle

import pytest

from fsa_train.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    load_tokenizer,
    train_tokenizer,
    training_sentences,
)

TRICKY = [
    "",
    " ",
    "\n",
    "  leading and trailing  ",
    "many    spaces\tand\ttabs\r\nCRLF\n\n\nblank lines",
    "digits 0123456789 and 3.14159, 1611 A.D.",
    "unicode: café, naïve, Ωμέγα, 中文, emoji 🙂, zero-width\u200bspace",
    "control \x00\x01 chars and \ufeff BOM",
]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky_strings(small_tokenizer, text):
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


def test_round_trip_kjv(small_tokenizer, kjv_texts):
    # Whole books, including ones the tokenizer never saw (it was trained on part of Genesis).
    for text in [kjv_texts[0], kjv_texts[18], kjv_texts[-1]]:
        assert small_tokenizer.decode(small_tokenizer.encode(text)) == text
    excerpt = "\n".join(kjv_texts[1][:2000].split(" ")) + "   " + kjv_texts[2][:2000]
    assert small_tokenizer.decode(small_tokenizer.encode(excerpt)) == excerpt


def test_digits_are_split(small_tokenizer):
    pieces = [small_tokenizer.decode([i]) for i in small_tokenizer.encode("in 1611 A.D.")]
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert [p.strip() for p in digit_pieces] == ["1", "6", "1", "1"]


def test_special_ids_and_metadata(small_tokenizer):
    tok = small_tokenizer
    assert (tok.pad_id, tok.unk_id) == (PAD_ID, UNK_ID)
    assert (tok.bos_id, tok.eos_id) == (BOS_ID, EOS_ID)
    assert tok.vocab_size == 400  # conftest.SMALL_VOCAB
    assert tok.checksum == hashlib.sha256(tok.path.read_bytes()).hexdigest()
    assert all(0 <= i < tok.vocab_size for i in tok.encode("In the beginning"))
    assert BOS_ID not in tok.encode("<s> </s>")  # special pieces are not parsed from text


def test_pickles_by_path(small_tokenizer):
    data = pickle.dumps(small_tokenizer)
    assert len(data) < 1000
    clone = pickle.loads(data)
    assert clone.checksum == small_tokenizer.checksum
    assert clone.encode("And God said") == small_tokenizer.encode("And God said")


def test_training_is_deterministic_and_quiet(kjv_texts, tmp_path, capfd):
    texts = [kjv_texts[5][:20_000]]
    a = load_tokenizer(train_tokenizer(texts, tmp_path / "a", 330))
    b = load_tokenizer(train_tokenizer(texts, tmp_path / "sub" / "b", 330))
    assert a.checksum == b.checksum  # the output path does not leak into the model bytes
    assert (tmp_path / "a.vocab").read_text().splitlines()[:4] == [
        "<pad>\t0",
        "<unk>\t0",
        "<s>\t0",
        "</s>\t0",
    ]
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_long_lines_are_cut_not_dropped():
    line = ("word " * 30 + "ñ" * 40 + " ") * 3
    pieces = list(training_sentences(["short\n" + line + "\n\nend"], max_sentence_length=64))
    assert pieces[0] == "short" and pieces[-1] == "end"
    middle = pieces[1:-1]
    assert "".join(middle) == line
    assert all(0 < len(p.encode()) <= 64 for p in middle)


def test_vocab_too_small(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_tokenizer(["abc"], tmp_path / "t", 100)


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(tmp_path / "nope.model")


def test_unigram_and_special_tokens_round_trip(kjv_texts, tmp_path):
    tok = load_tokenizer(
        train_tokenizer([kjv_texts[3][:30_000]], tmp_path / "u", 400, "unigram",
                        special_tokens=["<|fim|>", "<|sep|>"])
    )
    assert tok.vocab_size == 400
    assert (tok.piece_to_id("<|fim|>"), tok.piece_to_id("<|sep|>")) == (4, 5)
    for text in [*TRICKY, kjv_texts[40][:3000]]:
        assert tok.decode(tok.encode(text)) == text
    assert 4 not in tok.encode("<|fim|> text")  # control tokens never come from text


def test_lossy_options_are_honoured(kjv_texts, tmp_path):
    tok = load_tokenizer(
        train_tokenizer([kjv_texts[3][:30_000]], tmp_path / "l", 300, byte_fallback=False,
                        keep_whitespace=False)
    )
    assert tok.decode(tok.encode("a   b")) == "a b"  # whitespace collapsed, as asked


def test_training_errors_are_one_line_and_leave_no_model(tmp_path):
    with pytest.raises(ValueError, match=r"Vocabulary size too high \(5000\)") as info:
        train_tokenizer(["tiny corpus"] * 20, tmp_path / "t", 5000)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="the corpus has no text"):
        train_tokenizer([], tmp_path / "t", 300)
    with pytest.raises(ValueError, match="model_type must be one of"):
        train_tokenizer(["x"], tmp_path / "t", 300, "wordpiece")
    assert list(tmp_path.iterdir()) == []


def test_not_a_model_file(tmp_path):
    (tmp_path / "x.model").write_text("not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        load_tokenizer(tmp_path / "x.model")
