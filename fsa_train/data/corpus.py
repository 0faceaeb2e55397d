"""Corpus readers: documents as plain strings from JSON Lines files (optionally gzipped)."""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

_DEMO_CORPUS = Path(__file__).resolve().parent / "assets" / "kjv.jsonl.gz"


def demo_corpus_path() -> Path:
    """The packaged demo corpus: 66 books of the King James Bible, one JSON line each."""
    return _DEMO_CORPUS


def _open_binary(path: Path) -> BinaryIO:
    """Open ``path`` for reading bytes, transparently gunzipping ``*.gz`` files."""
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def read_jsonl_documents(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield the ``text_field`` string of every JSON line in ``path`` (.jsonl or .jsonl.gz).

    Blank lines are skipped. A line that is not a JSON object with a string ``text_field``
    raises ``ValueError("file:line: reason")``. The file's existence is checked eagerly so
    that a bad path fails at the call, not at the first ``next()``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    return _iter_documents(path, text_field)


def _iter_documents(path: Path, text_field: str) -> Iterator[str]:
    with _open_binary(path) as f:
        try:
            for lineno, raw in enumerate(f, start=1):
                text = _parse_line(raw, path, lineno, text_field)
                if text is not None:
                    yield text
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip file ({e})") from None


def _parse_line(raw: bytes, path: Path, lineno: int, text_field: str) -> str | None:
    """One JSON line → its text (None for a blank line); ValueError("file:line: reason")."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start}") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise ValueError(f"{path}:{lineno}: missing field {text_field!r}")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(
            f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string"
        )
    return text


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (cache keys and tokenizer checksums)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()
