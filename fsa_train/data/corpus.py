"""Corpus specification → documents: text files, directories (with a glob) and JSONL files.

A corpus is any mix of paths. A directory contributes every file under it that matches ``glob``
(sorted, so the corpus order is stable); a ``.jsonl`` / ``.jsonl.gz`` file contributes one
document per non-blank line (its ``text_field``); any other file is one document (gunzipped when
it ends in ``.gz``).

Reading is split in two so that the costly half can run in worker processes: :func:`iter_records`
reads raw bytes in corpus order (cheap, one process) and :func:`decode_record` turns one record
into text (UTF-8 decoding, JSON parsing). Both are shared by tokenizer training and data
preparation, so they see the same documents.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

_DEMO_CORPUS = Path(__file__).resolve().parent / "assets" / "kjv.jsonl.gz"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
DEFAULT_GLOB = "**/*"


def demo_corpus_path() -> Path:
    """The packaged demo corpus: 66 books of the King James Bible, one JSON line each."""
    return _DEMO_CORPUS


class RecordError(ValueError):
    """A JSONL line that is not a JSON object with a string text field (message: file:line)."""


@dataclass(frozen=True)
class Source:
    """One input file; ``jsonl`` files hold one document per line, others are one document."""

    path: str
    jsonl: bool


def is_jsonl(path: str | Path) -> bool:
    return str(path).endswith(JSONL_SUFFIXES)


def resolve_sources(
    inputs: str | Path | Sequence[str | Path],
    glob: str = DEFAULT_GLOB,
    exclude: Sequence[str] = (),
) -> list[Source]:
    """Expand files and directories into the corpus's files, in a stable order.

    Files under a directory are those matching ``glob`` and none of the ``exclude`` patterns
    (shell patterns on the path relative to that directory, ``*`` crossing ``/``: for example
    ``site-packages/*``). Raises ``FileNotFoundError`` for a missing path or a directory without
    a matching file. A file named twice is read once, at its first position.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if not inputs:
        raise ValueError("no corpus inputs given")
    seen: set[Path] = set()
    sources = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(
                p for p in path.glob(glob)
                if p.is_file() and not _excluded(p.relative_to(path).as_posix(), exclude)
            )
            if not files:
                raise FileNotFoundError(f"no files matching {glob!r} under directory {path}")
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"corpus path not found: {path}")
        for f in files:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                sources.append(Source(str(f), is_jsonl(f)))
    return sources


def _excluded(relative: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(relative, p) for p in patterns)


def corpus_fingerprint(sources: Sequence[Source], text_field: str = "text") -> str:
    """Hex sha256 over every file's name, position and content: a cache key for the corpus."""
    h = hashlib.sha256(f"text_field={text_field}\n".encode())
    for i, source in enumerate(sources):
        h.update(f"{i}:{Path(source.path).name}:{file_sha256(source.path)}\n".encode())
    return h.hexdigest()


def total_size(sources: Sequence[Source]) -> int:
    """Bytes on disk of all sources (the progress bar's 100%)."""
    return sum(Path(s.path).stat().st_size for s in sources)


# ---- reading raw records ------------------------------------------------------------------------

Record = tuple[int, int, "bytes | str"]
"""``(source index, line number or 0 for a whole file, raw bytes)``; in-memory texts use -1."""


class RecordReader:
    """Iterates the raw records of ``sources`` in corpus order, tracking bytes read for progress."""

    def __init__(self, sources: Sequence[Source]) -> None:
        self.sources = list(sources)
        self.total_bytes = total_size(self.sources)
        self.bytes_read = 0  # on-disk bytes of the files (compressed size for .gz)

    def __iter__(self) -> Iterator[Record]:
        done = 0
        for index, source in enumerate(self.sources):
            size = Path(source.path).stat().st_size
            with open(source.path, "rb") as raw:
                stream = _maybe_gunzip(raw, source.path)
                try:
                    if source.jsonl:
                        for lineno, line in enumerate(stream, start=1):
                            if line.strip():
                                self.bytes_read = done + raw.tell()
                                yield index, lineno, line
                    else:
                        data = stream.read()
                        self.bytes_read = done + size
                        yield index, 0, data
                except (gzip.BadGzipFile, EOFError, zlib.error) as e:
                    raise ValueError(
                        f"{source.path}: corrupt or truncated gzip file ({e})"
                    ) from None
            done += size
            self.bytes_read = done


def _maybe_gunzip(raw: BinaryIO, path: str) -> BinaryIO:
    return gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw


# ---- decoding one record ------------------------------------------------------------------------


def _decode_utf8(data: bytes) -> tuple[str, bool]:
    """UTF-8 text of ``data`` and whether invalid bytes had to be replaced (U+FFFD)."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


_SURROGATE = re.compile("[\ud800-\udfff]")


def _without_surrogates(text: str) -> tuple[str, bool]:
    """JSON escapes can produce lone surrogates, which are not encodable: replace them."""
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text), True


def decode_record(
    record: Record, source: Source | None, text_field: str = "text"
) -> tuple[str, bool]:
    """One raw record → ``(text, had_invalid_utf8)``; raises :class:`RecordError` on a bad line.

    ``source`` is None for in-memory texts (already ``str``).
    """
    _, lineno, data = record
    if isinstance(data, str):
        return _without_surrogates(data)
    text, invalid = _decode_utf8(data)
    if source is None or not source.jsonl:
        return text, invalid
    where = f"{source.path}:{lineno}"
    if lineno == 1:
        text = text.removeprefix("\ufeff")  # a byte order mark is not JSON
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if text_field not in obj:
        raise RecordError(f"{where}: missing field {text_field!r}")
    value = obj[text_field]
    if not isinstance(value, str):
        raise RecordError(f"{where}: field {text_field!r} is {type(value).__name__}, not a string")
    value, bad = _without_surrogates(value)
    return value, invalid or bad


def is_blank(text: str) -> bool:
    """Empty or whitespace-only documents carry nothing to learn: they are skipped (and counted)."""
    return not text.strip()


# ---- documents, sequentially --------------------------------------------------------------------


@dataclass
class CorpusStats:
    """What reading a corpus skipped or repaired."""

    documents: int = 0  # kept
    text_bytes: int = 0  # UTF-8 bytes of the kept documents
    empty: int = 0  # empty or whitespace-only, skipped
    invalid_utf8: int = 0  # kept, invalid bytes replaced by U+FFFD
    invalid_lines: int = 0  # bad JSONL lines skipped (only with skip_invalid_lines)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def describe(self) -> str:
        parts = [f"{self.documents:,} documents", f"{self.text_bytes / 1e6:.1f} MB"]
        if self.empty:
            parts.append(f"{self.empty:,} empty skipped")
        if self.invalid_utf8:
            parts.append(f"{self.invalid_utf8:,} with invalid UTF-8 replaced")
        if self.invalid_lines:
            parts.append(f"{self.invalid_lines:,} invalid JSONL lines skipped")
        return ", ".join(parts)


def iter_documents(
    sources: Sequence[Source],
    text_field: str = "text",
    *,
    skip_invalid_lines: bool = False,
    stats: CorpusStats | None = None,
    reader: RecordReader | None = None,
) -> Iterator[str]:
    """The corpus's non-blank documents in order, in this process (tokenizer training, tests)."""
    stats = stats if stats is not None else CorpusStats()
    reader = reader if reader is not None else RecordReader(sources)
    for record in reader:
        try:
            text, invalid = decode_record(record, reader.sources[record[0]], text_field)
        except RecordError:
            if not skip_invalid_lines:
                raise
            stats.invalid_lines += 1
            continue
        if is_blank(text):
            stats.empty += 1
            continue
        stats.invalid_utf8 += invalid
        stats.documents += 1
        stats.text_bytes += len(text.encode("utf-8"))
        yield text


def read_jsonl_documents(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Every record's ``text_field`` in one ``.jsonl``/``.jsonl.gz`` file, blank ones included.

    Invalid UTF-8 is replaced (U+FFFD); a bad line raises ``ValueError("file:line: reason")``.
    The file's existence is checked at the call, not at the first ``next()``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    source = Source(str(path), jsonl=True)
    return (decode_record(r, source, text_field)[0] for r in RecordReader([source]))


def texts_as_records(texts: Iterable[str]) -> Iterator[Record]:
    """In-memory documents in the record form that :func:`decode_record` accepts."""
    for i, text in enumerate(texts):
        yield -1, i, text


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (cache keys and tokenizer checksums)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()
