"""JSONL corpus reading: plain and gzipped files, error messages that point at file:line."""

from __future__ import annotations

import gzip

import pytest

from fsa_train.data.corpus import demo_corpus_path, read_jsonl_documents


def test_demo_corpus_is_packaged():
    docs = list(read_jsonl_documents(demo_corpus_path()))
    assert len(docs) == 66
    assert docs[0].startswith("In the beginning God created")


@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.gz"])
def test_reads_plain_and_gzip(tmp_path, write_jsonl, name):
    texts = ["first\nline", "", "  ünïcødé 123  "]
    path = write_jsonl(tmp_path / name, texts, field="body")
    assert list(read_jsonl_documents(path, text_field="body")) == texts


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n')
    assert list(read_jsonl_documents(path)) == ["a", "b"]


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"text": "unterminated', "invalid JSON"),
        ('["text"]', "expected a JSON object"),
        ('{"body": "x"}', "missing field 'text'"),
        ('{"text": 3}', "field 'text' is int, not a string"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:2: {reason}") as info:
        list(read_jsonl_documents(path))
    assert "\n" not in str(info.value)


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: invalid UTF-8"):
        list(read_jsonl_documents(path))


def test_truncated_gzip(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:-20])
    with pytest.raises(ValueError, match="corrupt or truncated gzip"):
        list(read_jsonl_documents(path))


def test_missing_file_fails_at_call(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl_documents(tmp_path / "nope.jsonl")
