"""Documents → per-split token files plus a document index, written atomically.

Layout of a prepared dataset directory::

    train.bin        all train documents' tokens, [BOS] + text + [EOS] each, back to back
    train.idx.npy    int64 [n_docs + 1]: document start offsets into train.bin (last = n_tokens)
    val.bin, val.idx.npy
    meta.json        format version, tokenizer checksum, vocab size, dtype, counts per split

The directory is built under a temporary name beside ``output_dir`` and renamed at the end, so an
interrupted run never leaves anything that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fsa_train.data.tokenizer import Tokenizer

FORMAT_VERSION = 1
SPLITS = ("train", "val")


class DatasetFormatError(ValueError):
    """A prepared dataset directory is incomplete, of another format, or from another tokenizer."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


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


def prepare_dataset(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    output_dir: str | Path,
    val_documents: int | float = 1,
    seed: int = 1234,
) -> Path:
    """Tokenize ``documents`` into ``output_dir`` (see the module docstring); returns it.

    Each document becomes ``[BOS] + tokens + [EOS]``; the train/val split is by whole documents
    and keeps corpus order within a split. ``documents`` is materialized to count it for the
    split. Raises ``FileExistsError`` if ``output_dir`` already holds something (also when another
    process finished the same directory first).
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"dataset directory already exists: {output_dir}")
    docs: Sequence[str] = documents if isinstance(documents, Sequence) else list(documents)
    is_val = split_documents(len(docs), val_documents, seed)
    dtype = token_dtype(tokenizer.vocab_size)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published directory should not be
    try:
        counts = _write_splits(docs, is_val, tokenizer, tmp, dtype)
        meta = {
            "format_version": FORMAT_VERSION,
            "tokenizer_checksum": tokenizer.checksum,
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "dtype": dtype.name,
            "seed": seed,
            "val_documents": val_documents,
            "splits": counts,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _publish(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def _write_splits(
    docs: Sequence[str], is_val: np.ndarray, tokenizer: Tokenizer, out: Path, dtype: np.dtype
) -> dict[str, dict[str, int]]:
    """Stream every document's tokens into its split's ``.bin``; then write the ``.idx.npy``."""
    files = {split: open(out / f"{split}.bin", "wb") for split in SPLITS}
    lengths: dict[str, list[int]] = {split: [] for split in SPLITS}
    try:
        for text, val in zip(docs, is_val, strict=True):
            split = "val" if val else "train"
            ids = np.asarray([tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id], dtype)
            ids.tofile(files[split])
            lengths[split].append(len(ids))
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()
    counts = {}
    for split in SPLITS:
        offsets = np.zeros(len(lengths[split]) + 1, dtype=np.int64)
        np.cumsum(lengths[split], out=offsets[1:])
        np.save(out / f"{split}.idx.npy", offsets)
        counts[split] = {"tokens": int(offsets[-1]), "documents": len(lengths[split])}
    return counts


def _publish(tmp: Path, output_dir: Path) -> None:
    """Rename the finished temp dir into place; losing a race to another writer is an error."""
    try:
        os.rename(tmp, output_dir)  # atomic; replaces only an empty directory
    except OSError as e:
        if output_dir.exists():
            raise FileExistsError(f"dataset directory already exists: {output_dir}") from e
        raise


class TokenDataset:
    """One split: a flat token array (memory-mapped lazily) and its document start offsets.

    Build it with :func:`load_split`, or directly from arrays (tests, in-memory data). Pickling
    drops the memory map and reopens the file, so DataLoader workers do not copy the tokens.
    """

    def __init__(
        self,
        tokens: np.ndarray | None,
        doc_offsets: np.ndarray,
        *,
        bin_path: Path | None = None,
        dtype: np.dtype | None = None,
        split: str = "",
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.doc_offsets = np.asarray(doc_offsets, dtype=np.int64)
        self._tokens = tokens
        self._bin_path = bin_path
        self._dtype = np.dtype(dtype) if dtype is not None else None
        self.split = split
        self.meta = meta or {}
        if tokens is None and bin_path is None:
            raise ValueError("TokenDataset needs tokens or a bin_path")

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            if self.n_tokens == 0:
                self._tokens = np.zeros(0, dtype=self._dtype)
            else:
                self._tokens = np.memmap(
                    self._bin_path, dtype=self._dtype, mode="r", shape=(self.n_tokens,)
                )
        return self._tokens

    @property
    def n_tokens(self) -> int:
        return int(self.doc_offsets[-1])

    @property
    def n_documents(self) -> int:
        return len(self.doc_offsets) - 1

    def document(self, i: int) -> np.ndarray:
        """Tokens of document ``i``, BOS and EOS included."""
        return self.tokens[self.doc_offsets[i] : self.doc_offsets[i + 1]]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._bin_path is not None:
            state["_tokens"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"TokenDataset(split={self.split!r}, tokens={self.n_tokens}, "
            f"documents={self.n_documents})"
        )


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """``meta.json`` of a prepared dataset, with its format version checked."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"not a prepared dataset (no meta.json): {data_dir}")
    meta = json.loads(path.read_text())
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise DatasetFormatError(
            f"{path}: format_version {version}, expected {FORMAT_VERSION}; re-run data preparation"
        )
    return meta


def load_split(
    data_dir: str | Path, split: str, tokenizer: Tokenizer | None = None
) -> TokenDataset:
    """Open one split of a prepared dataset, checking it against ``meta.json``.

    With ``tokenizer``, its vocab size and checksum must match the ones the data was made with.
    """
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    if split not in meta["splits"]:
        raise DatasetFormatError(f"{data_dir}: no split {split!r} (has {sorted(meta['splits'])})")
    if tokenizer is not None:
        if tokenizer.vocab_size != meta["vocab_size"]:
            raise DatasetFormatError(
                f"{data_dir}: made with vocab_size {meta['vocab_size']}, "
                f"tokenizer has {tokenizer.vocab_size}"
            )
        if tokenizer.checksum != meta["tokenizer_checksum"]:
            raise DatasetFormatError(
                f"{data_dir}: made with tokenizer {meta['tokenizer_checksum'][:12]}, "
                f"given {tokenizer.checksum[:12]} ({tokenizer.path})"
            )
    bin_path, idx_path = data_dir / f"{split}.bin", data_dir / f"{split}.idx.npy"
    for path in (bin_path, idx_path):
        if not path.is_file():
            raise FileNotFoundError(f"missing dataset file: {path}")
    offsets = np.load(idx_path)
    counts = meta["splits"][split]
    dtype = np.dtype(meta["dtype"])
    n_bytes = bin_path.stat().st_size
    if (
        offsets.ndim != 1
        or len(offsets) != counts["documents"] + 1
        or offsets[0] != 0
        or offsets[-1] != counts["tokens"]
        or n_bytes != counts["tokens"] * dtype.itemsize
    ):
        raise DatasetFormatError(
            f"{data_dir}: {split} files do not match meta.json ({counts['tokens']} tokens, "
            f"{counts['documents']} documents; {bin_path.name} has {n_bytes} bytes)"
        )
    return TokenDataset(None, offsets, bin_path=bin_path, dtype=dtype, split=split, meta=meta)
