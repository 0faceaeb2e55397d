"""Corpus → a prepared dataset directory (format: :mod:`fsa_train.data.shards`), in parallel.

Pipeline: the main process reads raw records in corpus order and groups them into chunks; worker
processes decode, check and tokenize each chunk (``multiprocessing.Pool``; results are taken in
submission order, so the output does not depend on the number of workers); the main process
appends each document, framed as ``[BOS] + tokens + [EOS]``, to one temporary token stream. At the
end the documents are split into train/validation (a seeded choice by document) and copied into
bounded shards. Everything is written inside a temporary directory beside the output that is
renamed into place at the end, so an interrupted run leaves nothing that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fsa_train.data.corpus import (
    CorpusStats,
    Record,
    RecordError,
    RecordReader,
    Source,
    decode_record,
    is_blank,
    texts_as_records,
)
from fsa_train.data.progress import Progress, human
from fsa_train.data.shards import (  # noqa: F401  (re-exported: the format lives in shards.py)
    DEFAULT_SHARD_TOKENS,
    FORMAT_VERSION,
    SPLITS,
    DatasetFormatError,
    ShardWriter,
    TokenDataset,
    load_split,
    read_meta,
    token_dtype,
)
from fsa_train.data.tokenizer import Tokenizer, load_tokenizer

CHUNK_BYTES = 1 << 20  # raw bytes of documents per worker task (fewer for small corpora)
CHUNK_DOCS = 4096
COPY_TOKENS = 1 << 25  # tokens per copy step when cutting the stream into shards


def split_documents(n_docs: int, val_documents: int | float, seed: int) -> np.ndarray:
    """Boolean mask of the documents that go to validation: a seeded, portable choice.

    ``val_documents`` is a count (int) or a fraction in (0, 1) (float). Documents are ranked by a
    hash of ``(seed, index)``, which unlike a library RNG stream is the same on every platform.
    """
    if isinstance(val_documents, float) and not isinstance(val_documents, bool):
        if not 0.0 <= val_documents < 1.0:
            raise ValueError(f"val_documents fraction must be in [0, 1), got {val_documents}")
        n_val = max(1, round(val_documents * n_docs)) if val_documents > 0 else 0
    else:
        n_val = int(val_documents)
    if not 0 <= n_val < n_docs:
        raise ValueError(
            f"val_documents={val_documents} leaves no training documents out of {n_docs}"
        )
    rank = sorted(range(n_docs), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[rank[:n_val]] = True
    return is_val


# ---- tokenizing chunks (runs in the workers) -------------------------------------------------


@dataclass
class ChunkResult:
    """The kept documents of one chunk, framed and concatenated, plus what was skipped."""

    tokens: np.ndarray
    lengths: np.ndarray  # int64, tokens per kept document (BOS and EOS included)
    origins: np.ndarray  # int64 [n, 2]: (source index, line number)
    stats: CorpusStats = field(default_factory=CorpusStats)
    errors: list[str] = field(default_factory=list)  # bad JSONL lines, in order


def tokenize_chunk(
    records: Sequence[Record],
    tokenizer: Tokenizer,
    sources: Sequence[Source],
    text_field: str,
    dtype: np.dtype,
) -> ChunkResult:
    """Decode, check and tokenize ``records``; empty documents and bad lines are reported."""
    stats, errors = CorpusStats(), []
    ids: list[int] = []
    lengths, origins = [], []
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    for record in records:
        source = sources[record[0]] if record[0] >= 0 else None
        try:
            text, invalid = decode_record(record, source, text_field)
        except RecordError as e:
            errors.append(str(e))
            continue
        if is_blank(text):
            stats.empty += 1
            continue
        doc = tokenizer.encode(text)
        ids.append(bos)
        ids.extend(doc)
        ids.append(eos)
        lengths.append(len(doc) + 2)
        origins.append((record[0], record[1]))
        stats.documents += 1
        stats.invalid_utf8 += invalid
        stats.text_bytes += len(text.encode("utf-8"))
    return ChunkResult(
        tokens=np.asarray(ids, dtype=dtype),
        lengths=np.asarray(lengths, dtype=np.int64),
        origins=np.asarray(origins, dtype=np.int64).reshape(-1, 2),
        stats=stats,
        errors=errors,
    )


_WORKER: dict[str, Any] = {}


def _init_worker(model_path: str, sources: list[Source], text_field: str, dtype: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the main process cleans up
    _WORKER.update(
        tokenizer=load_tokenizer(model_path), sources=sources, text_field=text_field,
        dtype=np.dtype(dtype),
    )


def _work(records: list[Record]) -> ChunkResult:
    w = _WORKER
    return tokenize_chunk(records, w["tokenizer"], w["sources"], w["text_field"], w["dtype"])


def _chunks(records: Iterable[Record], chunk_bytes: int) -> Iterator[list[Record]]:
    """Group records into worker tasks of about ``chunk_bytes`` bytes."""
    chunk: list[Record] = []
    size = 0
    for record in records:
        chunk.append(record)
        size += len(record[2])
        if size >= chunk_bytes or len(chunk) >= CHUNK_DOCS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


@contextlib.contextmanager
def _tokenized(
    chunks: Iterator[list[Record]],
    tokenizer: Tokenizer,
    sources: list[Source],
    text_field: str,
    dtype: np.dtype,
    num_workers: int,
) -> Iterator[Iterator[ChunkResult]]:
    """Chunk results in input order: in this process, or from a pool of ``num_workers``.

    ``apply_async`` with a bounded window of pending tasks, rather than ``imap``: ``imap``'s
    feeder thread would read the whole corpus ahead into memory on a fast disk.
    """
    if num_workers <= 1:
        yield (tokenize_chunk(c, tokenizer, sources, text_field, dtype) for c in chunks)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    pool = mp.get_context(method).Pool(
        num_workers, _init_worker, (str(tokenizer.path), sources, text_field, dtype.str)
    )

    def ordered() -> Iterator[ChunkResult]:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_work, (chunk,)))
            if len(pending) >= 3 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    try:
        yield ordered()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


# ---- the whole preparation ---------------------------------------------------------------------


@dataclass
class PrepareReport:
    """Where the dataset went, what it holds, and how fast it was made."""

    path: Path
    stats: CorpusStats
    splits: dict[str, dict[str, Any]]
    seconds: float
    workers: int

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.splits.values())

    @property
    def mb_per_s(self) -> float:
        return self.stats.text_bytes / 1e6 / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def summary(self) -> str:
        lines = [f"prepared {self.path}"]
        for name, s in self.splits.items():
            lines.append(f"  {name}: {s['documents']:,} documents, {s['tokens']:,} tokens, "
                         f"{len(s['shards'])} shard(s)")
        lines.append(f"  read {self.stats.describe()}")
        lines.append(
            f"  throughput: {self.mb_per_s:.2f} MB/s, {human(self.tokens_per_s)} tokens/s "
            f"({self.seconds:.1f}s, {self.workers} worker(s))"
        )
        return "\n".join(lines)


def _is_sources(corpus: object) -> bool:
    return isinstance(corpus, Sequence) and bool(corpus) and isinstance(corpus[0], Source)


def prepare_dataset(
    corpus: Iterable[str] | Sequence[Source],
    tokenizer: Tokenizer,
    output_dir: str | Path,
    val_documents: int | float = 1,
    seed: int = 1234,
    **options: Any,
) -> Path:
    """:func:`prepare`, returning only the output directory."""
    return prepare(corpus, tokenizer, output_dir, val_documents, seed, **options).path


def prepare(
    corpus: Iterable[str] | Sequence[Source],
    tokenizer: Tokenizer,
    output_dir: str | Path,
    val_documents: int | float = 1,
    seed: int = 1234,
    *,
    text_field: str = "text",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    num_workers: int = 0,
    skip_invalid_lines: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> PrepareReport:
    """Tokenize ``corpus`` into a dataset directory at ``output_dir`` (see the module docstring).

    ``corpus`` is a list of :class:`~fsa_train.data.corpus.Source` (from ``resolve_sources``) or
    an iterable of document strings. The split is by whole documents and keeps corpus order within
    a split. Empty or whitespace-only documents are skipped and counted; invalid UTF-8 is replaced
    and counted; a bad JSONL line raises ``ValueError("file:line: ...")`` unless
    ``skip_invalid_lines``. ``num_workers`` <= 1 tokenizes in this process. Raises
    ``FileExistsError`` if ``output_dir`` holds something and ``overwrite`` is false.
    """
    output_dir = Path(output_dir)
    if not overwrite and output_dir.exists() and (
        output_dir.is_file() or any(output_dir.iterdir())
    ):
        raise FileExistsError(f"dataset directory already exists: {output_dir}")
    dtype = token_dtype(tokenizer.vocab_size)
    if _is_sources(corpus):
        sources = list(corpus)
        reader = RecordReader(sources)
        records: Iterable[Record] = reader
        total = reader.total_bytes
    else:
        sources, reader, total = [], None, None
        records = texts_as_records(corpus)
    workers = max(1, num_workers)
    chunk_bytes = CHUNK_BYTES
    if total is not None:  # small corpora: enough chunks to keep every worker busy
        chunk_bytes = max(1 << 12, min(CHUNK_BYTES, total // (8 * workers)))
    bar = Progress("prepare-data", total, enabled=progress)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published directory should not be
    try:
        stats = CorpusStats()
        with _tokenized(_chunks(records, chunk_bytes), tokenizer, sources, text_field, dtype,
                        workers) as results:
            lengths, origins = _write_stream(
                results, tmp / "stream.tmp", stats, skip_invalid_lines, bar, reader
            )
        bar.close()
        if not len(lengths):
            raise ValueError(f"no documents to prepare: {stats.describe()}")
        is_val = split_documents(len(lengths), val_documents, seed)
        splits = _write_splits(tmp, lengths, origins, is_val, dtype, shard_tokens)
        (tmp / "stream.tmp").unlink()
        shutil.copyfile(tokenizer.path, tmp / "tokenizer.model")
        (tmp / "sources.json").write_text(json.dumps([s.path for s in sources], indent=0) + "\n")
        meta = {
            "format_version": FORMAT_VERSION,
            "tokenizer_checksum": tokenizer.checksum,
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id,
            "dtype": dtype.name,
            "document_framing": "BOS + text tokens + EOS",
            "shard_tokens": shard_tokens,
            "seed": seed,
            "val_documents": val_documents,
            "text_field": text_field,
            "splits": splits,
            "corpus": {"sources": len(sources), **stats.as_dict()},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _publish(tmp, output_dir, overwrite)
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PrepareReport(output_dir, stats, splits, bar.elapsed(), workers)


def _write_stream(
    results: Iterator[ChunkResult],
    path: Path,
    stats: CorpusStats,
    skip_invalid_lines: bool,
    bar: Progress,
    reader: RecordReader | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Append every chunk's tokens to ``path``; returns per-document lengths and origins."""
    lengths, origins = [], []
    n_tokens = 0
    with open(path, "wb") as stream:
        for res in results:
            if res.errors and not skip_invalid_lines:
                raise ValueError(
                    f"{res.errors[0]} (--skip_invalid_lines skips and counts such lines)"
                )
            stats.invalid_lines += len(res.errors)
            for name in ("documents", "text_bytes", "empty", "invalid_utf8"):
                setattr(stats, name, getattr(stats, name) + getattr(res.stats, name))
            res.tokens.tofile(stream)
            lengths.append(res.lengths)
            origins.append(res.origins)
            n_tokens += len(res.tokens)
            done = reader.bytes_read if reader is not None else stats.text_bytes
            bar.update(done, documents=stats.documents, tokens=n_tokens)
    if not lengths:
        return np.zeros(0, np.int64), np.zeros((0, 2), np.int64)
    return np.concatenate(lengths), np.concatenate(origins)


def _runs(mask: np.ndarray) -> Iterator[tuple[int, int]]:
    """``[a, b)`` ranges of consecutive True entries."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    yield from zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True)


def _write_splits(
    out: Path,
    lengths: np.ndarray,
    origins: np.ndarray,
    is_val: np.ndarray,
    dtype: np.dtype,
    shard_tokens: int,
) -> dict[str, dict[str, Any]]:
    """Copy each split's documents from the stream into shards; write the index files."""
    starts = np.concatenate(([0], np.cumsum(lengths)))
    stream = np.memmap(out / "stream.tmp", dtype=dtype, mode="r", shape=(int(starts[-1]),))
    splits = {}
    for split, mask in (("train", ~is_val), ("val", is_val)):
        writer = ShardWriter(out, split, dtype, shard_tokens)
        for a, b in _runs(mask):
            for lo in range(int(starts[a]), int(starts[b]), COPY_TOKENS):
                writer.write(stream[lo : min(lo + COPY_TOKENS, int(starts[b]))])
        shards = writer.close()
        offsets = np.concatenate(([0], np.cumsum(lengths[mask]))).astype(np.int64)
        np.save(out / f"{split}.idx.npy", offsets)
        np.save(out / f"{split}.origin.npy", origins[mask])
        splits[split] = {"tokens": int(offsets[-1]), "documents": int(mask.sum()), "shards": shards}
    del stream
    return splits


def _publish(tmp: Path, output_dir: Path, overwrite: bool) -> None:
    """Rename the finished temp dir into place (replacing an old dataset when ``overwrite``)."""
    old = None
    if overwrite and output_dir.exists():
        if output_dir.is_file() or (output_dir.is_dir() and any(output_dir.iterdir())):
            old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
            os.rename(output_dir, old)
    try:
        os.rename(tmp, output_dir)  # atomic; replaces only an empty directory
    except OSError as e:
        if old is not None:
            os.rename(old, output_dir)
        if output_dir.exists():
            raise FileExistsError(f"dataset directory already exists: {output_dir}") from e
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def default_workers() -> int:
    """Worker processes for tokenization: the CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
