"""LightningDataModule: JSONL corpus → cached tokenizer + token files → packed batches.

Cache layout under ``cache_dir`` (default ``$FSA_TRAIN_CACHE`` or ``~/.cache/fsa-train``)::

    tokenizers/spm-bpe-v{vocab}-{key}/tokenizer.model   key: corpus sha256, text_field, vocab,
                                     tokenizer.vocab         tokenizer recipe version
    datasets/{corpus_sha[:12]}-{key}/                   key: corpus sha256, text_field,
                                     train.bin ...           tokenizer checksum, val split, seed,
                                                             data format version

Both are built under temporary names and renamed into place, so concurrent preparers (one per
node, say) cannot leave a half-written entry; the loser of a race just uses the winner's result.
``prepare_data`` builds what is missing; ``setup`` only loads and never builds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from fsa_train.data import prepare as prep
from fsa_train.data.corpus import demo_corpus_path, file_sha256, read_jsonl_documents
from fsa_train.data.packing import PackedWindows, collate_packed
from fsa_train.data.tokenizer import RECIPE_VERSION, Tokenizer, load_tokenizer, train_tokenizer


def default_cache_dir() -> Path:
    """``$FSA_TRAIN_CACHE`` if set, else ``~/.cache/fsa-train``."""
    return Path(os.environ.get("FSA_TRAIN_CACHE") or Path.home() / ".cache" / "fsa-train")


def _key(**fields: object) -> str:
    """A short stable hash of some settings, for cache directory names."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


class EpochShuffleSampler(Sampler[int]):
    """A seeded random order of ``range(n)``, a different one per epoch set by ``set_epoch``.

    The order depends only on ``(seed, epoch)``, so runs are reproducible. Lightning calls
    ``set_epoch`` at the start of every epoch.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


class TextDataModule(L.LightningDataModule):
    """Packed next-token batches from a JSONL corpus (the packaged KJV demo by default).

    Batches are dicts from :func:`~fsa_train.data.packing.collate_packed`: ``input_ids``,
    ``targets`` (int64 [batch_size*seq_len]), ``cu_seqlens`` (int32) and ``n_windows``.

    Args:
        corpus: path to a ``.jsonl``/``.jsonl.gz`` file of documents; None = the KJV demo.
        text_field: JSON field holding each document's text.
        cache_dir: where tokenizers and prepared data are cached; None = ``default_cache_dir()``.
        vocab_size: tokenizer vocabulary size (sentencepiece BPE, byte fallback).
        seq_len: tokens per window.
        batch_size: windows per batch.
        val_documents: documents held out for validation (an int, or a fraction as a float).
        document_mask: keep attention and targets inside documents (else plain causal LM).
        num_workers: DataLoader worker processes.
        seed: seeds the validation split and the training order.
    """

    def __init__(
        self,
        corpus: str | None = None,
        text_field: str = "text",
        cache_dir: str | None = None,
        vocab_size: int = 4096,
        seq_len: int = 512,
        batch_size: int = 8,
        val_documents: int | float = 4,
        document_mask: bool = True,
        num_workers: int = 0,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.corpus = Path(corpus) if corpus is not None else demo_corpus_path()
        self.text_field = text_field
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_documents = val_documents
        self.document_mask = document_mask
        self.num_workers = num_workers
        self.seed = seed
        self.tokenizer: Tokenizer | None = None
        self.train_set: PackedWindows | None = None
        self.val_set: PackedWindows | None = None
        self._corpus_sha: str | None = None

    # ---- cache locations -------------------------------------------------------------------

    def corpus_sha256(self) -> str:
        if self._corpus_sha is None:
            if not self.corpus.is_file():
                raise FileNotFoundError(f"corpus file not found: {self.corpus}")
            self._corpus_sha = file_sha256(self.corpus)
        return self._corpus_sha

    def tokenizer_path(self) -> Path:
        """Where this corpus/vocab's tokenizer model is (or will be) cached."""
        key = _key(
            corpus=self.corpus_sha256(),
            text_field=self.text_field,
            vocab_size=self.vocab_size,
            recipe=RECIPE_VERSION,
        )
        return (
            self.cache_dir / "tokenizers" / f"spm-bpe-v{self.vocab_size}-{key}" / "tokenizer.model"
        )

    def dataset_dir(self, tokenizer: Tokenizer) -> Path:
        """Where the prepared token files for this corpus, tokenizer and split are cached."""
        key = _key(
            corpus=self.corpus_sha256(),
            text_field=self.text_field,
            tokenizer=tokenizer.checksum,
            val_documents=self.val_documents,
            seed=self.seed,
            format=prep.FORMAT_VERSION,
        )
        return self.cache_dir / "datasets" / f"{self.corpus_sha256()[:12]}-{key}"

    def _documents(self) -> Iterator[str]:
        return read_jsonl_documents(self.corpus, self.text_field)

    # ---- Lightning hooks -------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Train the tokenizer and tokenize the corpus, unless the cache already has them."""
        model_path = self.tokenizer_path()
        if model_path.is_file():
            print(f"tokenizer: cached {model_path}")
        else:
            t0 = time.perf_counter()
            self._train_tokenizer_into(model_path)
            print(f"tokenizer: trained {model_path} ({time.perf_counter() - t0:.1f}s)")
        tokenizer = load_tokenizer(model_path)

        data_dir = self.dataset_dir(tokenizer)
        if (data_dir / "meta.json").is_file():
            print(f"dataset: cached {data_dir}")
            return
        t0 = time.perf_counter()
        try:
            prep.prepare_dataset(
                self._documents(), tokenizer, data_dir, self.val_documents, self.seed
            )
        except FileExistsError:
            if not (data_dir / "meta.json").is_file():
                raise
            print(f"dataset: cached {data_dir} (prepared concurrently)")
            return
        print(f"dataset: prepared {data_dir} ({time.perf_counter() - t0:.1f}s)")

    def _train_tokenizer_into(self, model_path: Path) -> None:
        """Train into a temp dir beside ``model_path.parent`` and rename it into place."""
        final = model_path.parent
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        tmp.chmod(0o755)
        try:
            train_tokenizer(self._documents(), tmp / model_path.stem, self.vocab_size)
            try:
                os.rename(tmp, final)
            except OSError:
                if not model_path.is_file():
                    raise
                shutil.rmtree(tmp)  # another process published the same tokenizer first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def setup(self, stage: str | None = None) -> None:
        """Load the cached tokenizer and splits (``prepare_data`` must have run)."""
        if self.train_set is not None:
            return
        model_path = self.tokenizer_path()
        if not model_path.is_file():
            raise FileNotFoundError(
                f"tokenizer not prepared: {model_path} (call prepare_data() before setup())"
            )
        tokenizer = load_tokenizer(model_path)
        data_dir = self.dataset_dir(tokenizer)
        if not (data_dir / "meta.json").is_file():
            raise FileNotFoundError(
                f"dataset not prepared: {data_dir} (call prepare_data() before setup())"
            )
        train = prep.load_split(data_dir, "train", tokenizer)
        val = prep.load_split(data_dir, "val", tokenizer)
        train_set = PackedWindows(train, self.seq_len, self.document_mask)
        val_set = PackedWindows(val, self.seq_len, self.document_mask)
        if len(val_set) == 0:
            raise ValueError(
                f"validation split has {val.n_tokens} tokens in {val.n_documents} documents, "
                f"less than one window of seq_len={self.seq_len} (+1): "
                "use a smaller seq_len or more val_documents"
            )
        if len(train_set) < self.batch_size:
            raise ValueError(
                f"training split has {len(train_set)} windows of seq_len={self.seq_len}, fewer "
                f"than batch_size={self.batch_size}: use a smaller seq_len or batch_size"
            )
        self.tokenizer, self.train_set, self.val_set = tokenizer, train_set, val_set

    def _loader(self, dataset: PackedWindows, sampler: Sampler[int] | None, **kw) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=collate_packed,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **kw,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded, reshuffled per epoch), full batches only."""
        if self.train_set is None:
            raise RuntimeError("call setup() before train_dataloader()")
        sampler = EpochShuffleSampler(len(self.train_set), self.seed)
        return self._loader(self.train_set, sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        """Every validation window in order; the last batch may be smaller."""
        if self.val_set is None:
            raise RuntimeError("call setup() before val_dataloader()")
        return self._loader(self.val_set, None, shuffle=False)

    def describe(self) -> str:
        """Tokens, documents and windows per split (after ``setup``)."""
        if self.train_set is None or self.val_set is None:
            return "TextDataModule (not set up)"
        lines = [f"corpus {self.corpus}, vocab {self.vocab_size}, seq_len {self.seq_len}"]
        for name, ds in (("train", self.train_set), ("val", self.val_set)):
            lines.append(
                f"  {name}: {ds.data.n_tokens:,} tokens, {ds.data.n_documents} documents, "
                f"{len(ds):,} windows"
            )
        return "\n".join(lines)
