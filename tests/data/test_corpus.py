"""Corpus reading: files, directories, JSONL; skipped and repaired documents; file:line errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from fsa_train.data.corpus import (
    CorpusStats,
    corpus_fingerprint,
    demo_corpus_path,
    iter_documents,
    read_jsonl_documents,
    resolve_sources,
)


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


def test_invalid_utf8_is_replaced(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "a\xffb"}\n')
    assert list(read_jsonl_documents(path)) == ["ok", "a\ufffdb"]


def test_truncated_gzip(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:-20])
    with pytest.raises(ValueError, match="corrupt or truncated gzip"):
        list(read_jsonl_documents(path))


def test_missing_file_fails_at_call(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl_documents(tmp_path / "nope.jsonl")


# ---- corpus specifications: files, directories, globs, decoding ------------------------------


def make_tree(root):
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "b.py").write_text("print('b')\n")
    (root / "pkg" / "a.py").write_text("print('a')\n")
    (root / "pkg" / "sub" / "c.py").write_text("x = 1\n")
    (root / "pkg" / "notes.txt").write_text("notes\n")
    (root / "pkg" / "site-packages").mkdir()
    (root / "pkg" / "site-packages" / "z.py").write_text("z = 0\n")
    return root / "pkg"


def test_resolve_sources_order_glob_exclude(tmp_path, write_jsonl):
    pkg = make_tree(tmp_path)
    jsonl = write_jsonl(tmp_path / "extra.jsonl.gz", ["j1", "j2"])
    sources = resolve_sources([pkg, jsonl, pkg / "a.py"], glob="**/*.py",
                              exclude=["site-packages/*"])
    names = [Path(s.path).relative_to(tmp_path).as_posix() for s in sources]
    # sorted within the directory, command-line order across inputs, a.py only once
    assert names == ["pkg/a.py", "pkg/b.py", "pkg/sub/c.py", "extra.jsonl.gz"]
    assert [s.jsonl for s in sources] == [False, False, False, True]
    assert list(iter_documents(sources)) == ["print('a')\n", "print('b')\n", "x = 1\n", "j1", "j2"]


def test_missing_path_and_empty_glob(tmp_path):
    pkg = make_tree(tmp_path)
    with pytest.raises(FileNotFoundError, match="corpus path not found: .*nope") as info:
        resolve_sources([pkg, tmp_path / "nope"])
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"no files matching '\*\*/\*.rs' under directory"):
        resolve_sources(pkg, glob="**/*.rs")
    with pytest.raises(ValueError, match="no corpus inputs"):
        resolve_sources([])


def test_documents_skip_and_count(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "1.txt").write_bytes(b"caf\xe9 latin-1\n")  # invalid UTF-8: replaced, kept, counted
    (d / "2.txt").write_text("  \n\t \n")  # whitespace only: skipped, counted
    (d / "3.txt").write_text("")  # empty: skipped, counted
    (d / "4.txt.gz").write_bytes(gzip.compress(b"gzipped text\n"))
    (d / "5.jsonl").write_bytes(
        b'\xef\xbb\xbf{"text": "after a BOM"}\n'  # a UTF-8 BOM before the first record
        b'{"text": "lone \\ud800 surrogate"}\n'  # JSON escape of an unpaired surrogate
        b"not json\n"
        b'{"other": 1}\n'
    )
    stats = CorpusStats()
    docs = list(iter_documents(resolve_sources(d), skip_invalid_lines=True, stats=stats))
    assert docs == ["caf\ufffd latin-1\n", "gzipped text\n", "after a BOM", "lone \ufffd surrogate"]
    assert (stats.documents, stats.empty, stats.invalid_utf8, stats.invalid_lines) == (4, 2, 2, 2)
    assert stats.text_bytes == sum(len(t.encode()) for t in docs)
    with pytest.raises(ValueError, match=r"5.jsonl:3: invalid JSON"):
        list(iter_documents(resolve_sources(d)))


def test_fingerprint_tracks_content_and_order(tmp_path):
    pkg = make_tree(tmp_path)
    a = resolve_sources([pkg / "a.py", pkg / "b.py"])
    b = resolve_sources([pkg / "b.py", pkg / "a.py"])
    fa = corpus_fingerprint(a)
    assert fa == corpus_fingerprint(resolve_sources([pkg / "a.py", pkg / "b.py"]))
    assert fa != corpus_fingerprint(b) and fa != corpus_fingerprint(a, text_field="body")
    (pkg / "a.py").write_text("changed\n")
    assert fa != corpus_fingerprint(a)
