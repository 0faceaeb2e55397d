"""LightningDataModule: a prepared dataset, or a corpus prepared on the fly, → packed batches.

Two sources of data:

* ``dataset``: a directory written by ``fsa-train prepare-data`` (it carries its tokenizer);
* ``corpus`` (default: the bundled KJV demo): files, directories and JSONL files that are turned
  into a tokenizer and a dataset on first use and cached under ``cache_dir`` (default
  ``$FSA_TRAIN_CACHE`` or ``~/.cache/fsa-train``)::

    tokenizers/spm-bpe-v{vocab}-{key}/tokenizer.model   key: corpus fingerprint, text_field,
                                     tokenizer.vocab         vocab, tokenizer recipe version
    datasets/{fingerprint[:12]}-{key}/                  key: corpus fingerprint, text_field,
                                     meta.json ...           tokenizer checksum, val split, seed,
                                                             data format version

  Both are built under temporary names and renamed into place, so concurrent preparers cannot
  leave a half-written entry. ``prepare_data`` builds what is missing; ``setup`` never builds.

Training order is :class:`~fsa_train.data.sampling.ResumableWindowSampler`: seeded, reshuffled
every data epoch, sharded by ``trainer.global_rank`` / ``trainer.world_size``, and restored exactly
(mid-epoch too) from checkpoints (see :meth:`TextDataModule.state_dict`).
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
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Sampler

from fsa_train.config import ConfigError
from fsa_train.data import prepare as prep
from fsa_train.data.corpus import (
    Source,
    corpus_fingerprint,
    demo_corpus_path,
    iter_documents,
    resolve_sources,
)
from fsa_train.data.packing import PackedWindows, check_seq_len, collate_packed
from fsa_train.data.retrieval_mix import RetrievalMix, check_retrieval
from fsa_train.data.sampling import ResumableWindowSampler, ShardedOrderSampler
from fsa_train.data.shards import DatasetFormatError, check_tokenizer, load_split, read_meta
from fsa_train.data.tokenizer import RECIPE_VERSION, Tokenizer, load_tokenizer, train_tokenizer
from fsa_train.parallel.sequence import degree_of


def default_cache_dir() -> Path:
    """``$FSA_TRAIN_CACHE`` if set, else ``~/.cache/fsa-train``."""
    return Path(os.environ.get("FSA_TRAIN_CACHE") or Path.home() / ".cache" / "fsa-train")


def _key(**fields: object) -> str:
    """A short stable hash of some settings, for cache directory names."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableWindowSampler` that counts the batches it hands out.

    Each batch advances the sampler's position as it is yielded, so a checkpoint taken after
    ``k`` training steps resumes after ``k`` batches. (This assumes the consumer does not fetch
    ahead; Lightning does not for a loader with a length.) ``state_dict`` is the sampler's, which
    also makes Lightning treat the loader as resumable.
    """

    sampler: ResumableWindowSampler

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            self.sampler.advance()
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.sampler.load_state_dict(state)


class TextDataModule(L.LightningDataModule):
    """Packed next-token batches from a prepared dataset or a corpus (the KJV demo by default).

    Batches are dicts from :func:`~fsa_train.data.packing.collate_packed`: ``input_ids``,
    ``targets`` (int64 [batch_size*seq_len]), ``cu_seqlens`` (int32) and ``n_windows``.

    Args:
        corpus: files, directories (see ``glob``) or ``.jsonl``/``.jsonl.gz`` files; None and no
            ``dataset`` = the KJV demo.
        dataset: a directory made by ``fsa-train prepare-data`` (instead of ``corpus``).
        text_field: JSON field holding each document's text (JSONL corpora).
        glob: which files of a corpus directory to read.
        cache_dir: where corpus tokenizers and datasets are cached; None = ``default_cache_dir()``.
        vocab_size: tokenizer vocabulary size; must equal a ``dataset``'s.
        seq_len: tokens per window (a multiple of ``nsa.sel_block`` for NSA models).
        batch_size: windows per batch and rank.
        val_documents: documents held out for validation (an int, or a fraction as a float);
            corpus mode only (a dataset's split was fixed by prepare-data).
        document_mask: keep attention and targets inside documents (else plain causal LM).
        num_workers: DataLoader worker processes.
        seed: seeds the training order (and the split of a corpus).
        retrieval_fraction: fraction of training windows replaced by synthetic retrieval
            documents (key sentences in the window's own text, a question about one of them;
            :mod:`fsa_train.data.retrieval_mix`); 0 = none. Validation is never mixed.
        retrieval_keys: key sentences per retrieval document (one of them is asked).
    """

    def __init__(
        self,
        corpus: str | list[str] | None = None,
        dataset: str | None = None,
        text_field: str = "text",
        glob: str = "**/*",
        cache_dir: str | None = None,
        vocab_size: int = 4096,
        seq_len: int = 512,
        batch_size: int = 8,
        val_documents: int | float = 4,
        document_mask: bool = True,
        num_workers: int = 0,
        seed: int = 1234,
        retrieval_fraction: float = 0.0,
        retrieval_keys: int = 4,
    ) -> None:
        super().__init__()
        if corpus is not None and dataset is not None:
            raise ConfigError("set data.corpus or data.dataset, not both")
        self.save_hyperparameters()
        if dataset is None and corpus is None:
            corpus = str(demo_corpus_path())
        self.corpus = [corpus] if isinstance(corpus, str) else corpus
        self.dataset = Path(dataset) if dataset is not None else None
        self.text_field = text_field
        self.glob = glob
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_documents = val_documents
        self.document_mask = document_mask
        self.num_workers = num_workers
        self.seed = seed
        check_retrieval(retrieval_fraction, retrieval_keys)
        self.retrieval_fraction = retrieval_fraction
        self.retrieval_keys = retrieval_keys
        self.tokenizer: Tokenizer | None = None
        self.data_dir: Path | None = None
        self.train_set: PackedWindows | None = None
        self.val_set: PackedWindows | None = None
        self._sources: list[Source] | None = None
        self._fingerprint: str | None = None
        self._train_sampler: ResumableWindowSampler | None = None
        self._pending_state: dict[str, Any] | None = None

    # ---- corpus mode: cache locations ------------------------------------------------------

    def sources(self) -> list[Source]:
        if self._sources is None:
            self._sources = resolve_sources(self.corpus, self.glob)
        return self._sources

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = corpus_fingerprint(self.sources(), self.text_field)
        return self._fingerprint

    def tokenizer_path(self) -> Path:
        """Where this corpus/vocab's tokenizer model is (or will be) cached."""
        if self.dataset is not None:
            return self.dataset / "tokenizer.model"
        key = _key(corpus=self.fingerprint(), vocab_size=self.vocab_size, recipe=RECIPE_VERSION)
        return (
            self.cache_dir / "tokenizers" / f"spm-bpe-v{self.vocab_size}-{key}" / "tokenizer.model"
        )

    def dataset_dir(self, tokenizer: Tokenizer | None = None) -> Path:
        """The prepared dataset: ``dataset``, or where this corpus's is (or will be) cached."""
        if self.dataset is not None:
            return self.dataset
        assert tokenizer is not None
        key = _key(
            corpus=self.fingerprint(),
            tokenizer=tokenizer.checksum,
            val_documents=self.val_documents,
            seed=self.seed,
            format=prep.FORMAT_VERSION,
        )
        return self.cache_dir / "datasets" / f"{self.fingerprint()[:12]}-{key}"

    # ---- Lightning hooks -------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Corpus mode: train the tokenizer and prepare the dataset unless cached.
        Dataset mode: only check that the directory is a dataset of this format."""
        if self.dataset is not None:
            read_meta(self.dataset)
            return
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
        try:
            report = prep.prepare(
                self.sources(), tokenizer, data_dir, self.val_documents, self.seed,
                text_field=self.text_field, num_workers=min(8, prep.default_workers()),
            )
        except FileExistsError:
            if not (data_dir / "meta.json").is_file():
                raise
            print(f"dataset: cached {data_dir} (prepared concurrently)")
            return
        print(f"dataset: prepared {data_dir} ({report.seconds:.1f}s, {report.mb_per_s:.1f} MB/s)")

    def _train_tokenizer_into(self, model_path: Path) -> None:
        """Train into a temp dir beside ``model_path.parent`` and rename it into place."""
        final = model_path.parent
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        tmp.chmod(0o755)
        try:
            texts = iter_documents(self.sources(), self.text_field)
            train_tokenizer(texts, tmp / model_path.stem, self.vocab_size)
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
        """Load the tokenizer and splits (corpus mode: ``prepare_data`` must have run) and check
        them against this module's settings and the model's config."""
        if self.train_set is None:
            self._load()
        self._check_model()

    def _load(self) -> None:
        model_path = self.tokenizer_path()
        if self.dataset is None and not model_path.is_file():
            raise FileNotFoundError(
                f"tokenizer not prepared: {model_path} (call prepare_data() before setup())"
            )
        if self.dataset is None:
            tokenizer = load_tokenizer(model_path)
            data_dir = self.dataset_dir(tokenizer)
            if not (data_dir / "meta.json").is_file():
                raise FileNotFoundError(
                    f"dataset not prepared: {data_dir} (call prepare_data() before setup())"
                )
        else:
            data_dir = self.dataset
            meta = read_meta(data_dir)
            tokenizer = load_tokenizer(model_path)
            check_tokenizer(meta, tokenizer, data_dir)
            if meta["vocab_size"] != self.vocab_size:
                raise DatasetFormatError(
                    f"{data_dir}: made with a {meta['vocab_size']}-piece tokenizer, but "
                    f"data.vocab_size={self.vocab_size} (the model's vocabulary follows it): "
                    f"set data.vocab_size: {meta['vocab_size']}"
                )
        self.data_dir = data_dir
        train = load_split(data_dir, "train", tokenizer)
        val = load_split(data_dir, "val", tokenizer)
        mix = (RetrievalMix(tokenizer, self.retrieval_fraction, self.retrieval_keys, self.seed)
               if self.retrieval_fraction > 0 else None)
        train_set = PackedWindows(train, self.seq_len, self.document_mask, mix)
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

    def _check_model(self) -> None:
        """Vocabulary and window length against the attached LightningModule's ``config``."""
        try:
            config = getattr(self.trainer.lightning_module, "config", None)
        except (AttributeError, RuntimeError):
            return
        if config is None or self.tokenizer is None:
            return
        model_vocab = getattr(config, "vocab_size", None)
        if isinstance(model_vocab, int) and model_vocab < self.tokenizer.vocab_size:
            raise ConfigError(
                f"model.config.vocab_size={model_vocab} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size} pieces ({self.tokenizer.path})"
            )
        if getattr(config, "attention", None) == "nsa":
            check_seq_len(self.seq_len, config.nsa)

    def _rank_and_world(self) -> tuple[int, int]:
        """This rank's data-parallel rank and the data-parallel world: under sequence
        parallelism (``model.sequence_parallel`` = P) the P ranks of a group read the same
        batches."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        try:
            sharing = degree_of(trainer.lightning_module)
        except (AttributeError, RuntimeError):  # no module attached
            sharing = 1
        return trainer.global_rank // sharing, trainer.world_size // sharing

    def train_dataloader(self) -> DataLoader:
        """This rank's shuffled (seeded, per epoch), resumable training batches."""
        return self.train_loader(*self._rank_and_world())

    def train_loader(self, rank: int = 0, world_size: int = 1) -> DataLoader:
        """Training batches of ``rank`` out of ``world_size`` (``train_dataloader`` passes the
        trainer's). The new sampler starts where the state from ``load_state_dict``, or else the
        previous loader's sampler, left off (so reloading the loader keeps the position)."""
        if self.train_set is None:
            raise RuntimeError("call setup() before train_dataloader()")
        sampler = ResumableWindowSampler(
            len(self.train_set), self.batch_size, seed=self.seed, rank=rank, world_size=world_size
        )
        if sampler.batches_per_epoch == 0:
            raise ValueError(
                f"training split has {len(self.train_set)} windows, fewer than one global batch "
                f"of batch_size x world_size = {sampler.global_batch}"
            )
        state = self._pending_state or (
            self._train_sampler.state_dict() if self._train_sampler is not None else None
        )
        if state:
            sampler.load_state_dict(state)
        self._pending_state = None
        self._train_sampler = sampler
        return self._loader(self.train_set, sampler, drop_last=True, cls=ResumableDataLoader)

    def val_dataloader(self) -> DataLoader:
        """Every validation window in order, split across ranks; the last batch may be smaller."""
        if self.val_set is None:
            raise RuntimeError("call setup() before val_dataloader()")
        rank, world = self._rank_and_world()
        sampler = ShardedOrderSampler(len(self.val_set), rank=rank, world_size=world)
        return self._loader(self.val_set, sampler)

    def _loader(
        self, dataset: PackedWindows, sampler: Sampler[int], cls: type[DataLoader] = DataLoader,
        **kw: Any,
    ) -> DataLoader:
        return cls(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=collate_packed,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **kw,
        )

    # ---- resumable order -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{seed, epoch, position, ...}`` of the training order; Lightning saves it in every
        checkpoint and hands it to ``load_state_dict`` on resume."""
        if self._train_sampler is not None:
            return self._train_sampler.state_dict()
        return dict(self._pending_state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training order; applied to the next ``train_dataloader()``'s sampler."""
        if not state_dict:
            return
        if self._train_sampler is not None:
            self._train_sampler.load_state_dict(state_dict)
        else:
            self._pending_state = dict(state_dict)

    def describe(self) -> str:
        """Tokens, documents and windows per split (after ``setup``)."""
        if self.train_set is None or self.val_set is None:
            return "TextDataModule (not set up)"
        source = self.dataset if self.dataset is not None else ", ".join(map(str, self.corpus))
        lines = [f"data {source}, vocab {self.vocab_size}, seq_len {self.seq_len}"]
        for name, ds in (("train", self.train_set), ("val", self.val_set)):
            lines.append(
                f"  {name}: {ds.data.n_tokens:,} tokens, {ds.data.n_documents} documents, "
                f"{len(ds):,} windows"
            )
        if self.train_set.retrieval is not None:
            lines.append(f"  train: {self.retrieval_fraction:.1%} of windows are retrieval "
                         f"documents with {self.retrieval_keys} keys")
        return "\n".join(lines)
