"""The prepared-dataset format: token shards, document index and metadata; writing and reading.

Layout of a dataset directory (format version 2)::

    meta.json                 format version, tokenizer checksum and ids, vocab size, dtype,
                              shard list and counts per split, corpus statistics
    tokenizer.model           a copy of the tokenizer the tokens were made with
    sources.json              the input files, in corpus order
    train-00000.bin ...       the split's token stream cut into shards of at most shard_tokens
                              tokens (uint16 when the vocabulary fits, else uint32); each document
                              is [BOS] + tokens + [EOS]; a document may continue into the next shard
    train.idx.npy             int64 [n_docs + 1]: document start offsets in the split's stream
    train.origin.npy          int64 [n_docs, 2]: (index in sources.json, line number; 0 for a
                              whole-file document) of each document
    val-00000.bin, val.idx.npy, val.origin.npy

A split is read as one logical token array (:class:`ShardedTokens`) over memory maps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 2
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 1 << 28  # 256M tokens: 512 MB shards at uint16


class DatasetFormatError(ValueError):
    """A prepared dataset directory is incomplete, of another format, or from another tokenizer."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


class ShardWriter:
    """Appends tokens to ``{split}-NNNNN.bin`` files of at most ``shard_tokens`` tokens each."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.directory, self.split = Path(directory), split
        self.dtype, self.shard_tokens = np.dtype(dtype), shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._room = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=self.dtype)
        while len(tokens):
            if self._room == 0:
                self._next_shard()
            take = min(self._room, len(tokens))
            tokens[:take].tofile(self._file)
            self.shards[-1]["tokens"] += take
            self._room -= take
            tokens = tokens[take:]

    def _next_shard(self) -> None:
        self._close_file()
        name = shard_name(self.split, len(self.shards))
        self._file = open(self.directory / name, "wb")
        self.shards.append({"file": name, "tokens": 0})
        self._room = self.shard_tokens

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> list[dict[str, Any]]:
        """Flush to disk; returns ``[{"file": name, "tokens": n}, ...]``."""
        self._close_file()
        return self.shards


class ShardedTokens:
    """A read-only token array spread over shard files, sliced like a numpy array.

    Memory maps are opened lazily and dropped when pickled, so DataLoader workers reopen the
    files instead of receiving a copy of the tokens.
    """

    def __init__(self, paths: Sequence[Path], counts: Sequence[int], dtype: np.dtype) -> None:
        self.paths = [Path(p) for p in paths]
        self.counts = [int(c) for c in counts]
        self.dtype = np.dtype(dtype)
        self.starts = np.concatenate(([0], np.cumsum(self.counts, dtype=np.int64)))
        self._maps: list[np.ndarray] | None = None

    def _shards(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [
                np.memmap(p, dtype=self.dtype, mode="r", shape=(n,)) if n else
                np.zeros(0, self.dtype) for p, n in zip(self.paths, self.counts, strict=True)
            ]
        return self._maps

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key: int | slice) -> np.ndarray | np.integer:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self[start:stop][::step] if stop > start else np.zeros(0, self.dtype)
            return self._read(start, max(start, stop))
        i = int(key) + (len(self) if key < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"token index {key} out of range for {len(self)} tokens")
        return self._read(i, i + 1)[0]

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)``: a view when inside one shard, else a concatenated copy."""
        if start >= stop:
            return np.zeros(0, self.dtype)
        shards = self._shards()
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        last = int(np.searchsorted(self.starts, stop, side="left")) - 1
        pieces = [
            shards[s][max(start, self.starts[s]) - self.starts[s] : min(stop, self.starts[s + 1])
                      - self.starts[s]]
            for s in range(first, last + 1)
        ]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._read(0, len(self))
        return out.astype(dtype) if dtype is not None else np.array(out)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}


class TokenDataset:
    """One split: a flat token array and its document start offsets.

    Build it with :func:`load_split`, or directly from arrays (tests, in-memory data).
    """

    def __init__(
        self,
        tokens: np.ndarray | ShardedTokens,
        doc_offsets: np.ndarray,
        *,
        split: str = "",
        meta: dict[str, Any] | None = None,
        origins: np.ndarray | None = None,
    ) -> None:
        self.tokens = tokens
        self.doc_offsets = np.asarray(doc_offsets, dtype=np.int64)
        self.split = split
        self.meta = meta or {}
        self.origins = origins

    @property
    def n_tokens(self) -> int:
        return int(self.doc_offsets[-1])

    @property
    def n_documents(self) -> int:
        return len(self.doc_offsets) - 1

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens at stream positions ``[start, stop)``."""
        return np.asarray(self.tokens[start:stop])

    def document(self, i: int) -> np.ndarray:
        """Tokens of document ``i``, BOS and EOS included."""
        return self.read(int(self.doc_offsets[i]), int(self.doc_offsets[i + 1]))

    def __repr__(self) -> str:
        return (
            f"TokenDataset(split={self.split!r}, tokens={self.n_tokens}, "
            f"documents={self.n_documents})"
        )


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """``meta.json`` of a prepared dataset, with its format version checked."""
    path = Path(data_dir) / "meta.json"
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"dataset directory not found: {data_dir}")
    if not path.is_file():
        raise FileNotFoundError(f"not a prepared dataset (no meta.json): {data_dir}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFormatError(f"{path}: unreadable ({e})") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise DatasetFormatError(
            f"{path}: format_version {version}, expected {FORMAT_VERSION}; "
            "re-run fsa-train prepare-data"
        )
    return meta


def check_tokenizer(meta: dict[str, Any], tokenizer: Any, where: str | Path) -> None:
    """Raise ``DatasetFormatError`` unless ``tokenizer`` is the one the data was made with."""
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise DatasetFormatError(
            f"{where}: made with vocab_size {meta['vocab_size']}, "
            f"tokenizer has {tokenizer.vocab_size}"
        )
    if tokenizer.checksum != meta["tokenizer_checksum"]:
        raise DatasetFormatError(
            f"{where}: made with tokenizer {meta['tokenizer_checksum'][:12]}, "
            f"given {tokenizer.checksum[:12]} ({tokenizer.path})"
        )


def load_split(data_dir: str | Path, split: str, tokenizer: Any = None) -> TokenDataset:
    """Open one split of a prepared dataset, checking its files against ``meta.json``.

    With ``tokenizer``, its vocab size and checksum must match the ones the data was made with.
    """
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    if split not in meta["splits"]:
        raise DatasetFormatError(f"{data_dir}: no split {split!r} (has {sorted(meta['splits'])})")
    if tokenizer is not None:
        check_tokenizer(meta, tokenizer, data_dir)
    info = meta["splits"][split]
    dtype = np.dtype(meta["dtype"])
    idx_path, origin_path = data_dir / f"{split}.idx.npy", data_dir / f"{split}.origin.npy"
    paths = [data_dir / s["file"] for s in info["shards"]]
    for path in [idx_path, origin_path, *paths]:
        if not path.is_file():
            raise FileNotFoundError(f"missing dataset file: {path}")
    for shard, path in zip(info["shards"], paths, strict=True):
        if path.stat().st_size != shard["tokens"] * dtype.itemsize:
            raise DatasetFormatError(
                f"{data_dir}: {path.name} has {path.stat().st_size} bytes, meta.json says "
                f"{shard['tokens']} tokens of {dtype.name}: the files do not match meta.json"
            )
    offsets = np.load(idx_path)
    origins = np.load(origin_path)
    n_tokens = sum(s["tokens"] for s in info["shards"])
    if (
        offsets.ndim != 1
        or len(offsets) != info["documents"] + 1
        or offsets[0] != 0
        or offsets[-1] != info["tokens"]
        or n_tokens != info["tokens"]
        or origins.shape != (info["documents"], 2)
        or (np.diff(offsets) < 2).any()  # every document holds at least BOS and EOS
    ):
        raise DatasetFormatError(
            f"{data_dir}: {split} files do not match meta.json ({info['tokens']} tokens, "
            f"{info['documents']} documents)"
        )
    tokens = ShardedTokens(paths, [s["tokens"] for s in info["shards"]], dtype)
    return TokenDataset(tokens, offsets, split=split, meta=meta, origins=origins)
