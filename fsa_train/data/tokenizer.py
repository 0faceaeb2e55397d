"""Train and load sentencepiece tokenizers (BPE or unigram), lossless by default.

The default recipe keeps text byte-exact: identity normalization, no whitespace collapsing and
byte fallback for unseen characters, so ``decode(encode(x)) == x`` for any string. Special ids are
fixed (pad 0, unk 1, bos 2, eos 3) so that data files and models agree without extra metadata;
extra special tokens (``special_tokens``) are control symbols with ids 4, 5, ...: they are never
produced from text, only inserted by code.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from fsa_train.data.corpus import file_sha256
from fsa_train.data.progress import Progress, human

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
#: Bump when the default training options below change, so cached tokenizers are not reused.
RECIPE_VERSION = 1
MODEL_TYPES = ("bpe", "unigram")


def _split_long(line: str, max_bytes: int) -> Iterator[str]:
    """Cut ``line`` into pieces of at most ``max_bytes`` UTF-8 bytes, preferably before a space.

    sentencepiece skips sentences longer than ``max_sentence_length`` bytes; cutting them keeps
    their text in the training sample instead.
    """
    data = line.encode("utf-8")
    while len(data) > max_bytes:
        cut = data.rfind(b" ", 0, max_bytes + 1)
        if cut <= 0:  # no space to cut at: cut at the last UTF-8 character boundary
            cut = max_bytes
            while data[cut] & 0xC0 == 0x80:
                cut -= 1
        yield data[:cut].decode("utf-8")
        data = data[cut:]
    if data:
        yield data.decode("utf-8")


def training_sentences(texts: Iterable[str], max_sentence_length: int) -> Iterator[str]:
    """Documents → non-empty lines, each at most ``max_sentence_length`` bytes."""
    for text in texts:
        for line in text.split("\n"):
            yield from _split_long(line, max_sentence_length)


def _with_progress(sentences: Iterator[str], progress: Progress) -> Iterator[str]:
    """Pass sentences through, reporting how much text sentencepiece has read."""
    n_bytes = n_lines = 0
    for s in sentences:
        n_lines += 1
        n_bytes += len(s) + 1
        progress.update(n_bytes, lines=n_lines)
        yield s
    progress.close()
    progress.message(f"read {human(n_lines)} lines ({n_bytes / 1e6:.1f} MB); training...")


def train_tokenizer(
    texts: Iterable[str],
    output_prefix: str | Path,
    vocab_size: int,
    model_type: str = "bpe",
    *,
    input_sentence_size: int = 2_000_000,
    max_sentence_length: int = 4192,
    num_threads: int = 2,
    seed: int = 1234,
    byte_fallback: bool = True,
    normalization: str = "identity",
    keep_whitespace: bool = True,
    split_digits: bool = True,
    special_tokens: Sequence[str] = (),
    progress: bool = False,
) -> Path:
    """Train a sentencepiece model on ``texts``; writes ``{output_prefix}.model`` and ``.vocab``.

    ``input_sentence_size`` is the sample size: at most that many lines (a seeded reservoir sample
    of the corpus) are used for training. The model bytes depend only on the texts and the options,
    not on the output path, so equal inputs give equal checksums. Both files are written under
    temporary names and renamed, the model last, so an interrupted run leaves no ``.model``.
    Returns the path of the ``.model`` file. Bad options or a corpus too small for the vocabulary
    raise ``ValueError`` (one line).
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    min_vocab = 4 + len(special_tokens) + (256 if byte_fallback else 0) + 1
    if vocab_size < min_vocab:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: special pieces"
            f"{' and byte fallback' if byte_fallback else ''} need >= {min_vocab}"
        )
    output_prefix = Path(output_prefix)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    sentences = training_sentences(texts, max_sentence_length)
    if progress:
        sentences = _with_progress(sentences, Progress("train-tokenizer"))
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    t0 = time.perf_counter()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences,
            model_writer=model,  # in memory: model_prefix would be recorded in the model bytes
            vocab_size=vocab_size,
            model_type=model_type,
            normalization_rule_name=normalization,
            remove_extra_whitespaces=not keep_whitespace,
            allow_whitespace_only_pieces=keep_whitespace,
            byte_fallback=byte_fallback,
            split_digits=split_digits,
            character_coverage=0.9995 if byte_fallback else 1.0,  # rarer chars go to bytes
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            control_symbols=list(special_tokens),
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=max_sentence_length,
            num_threads=num_threads,
            minloglevel=2,  # errors only: no per-step training log on the console
        )
    except RuntimeError as e:
        raise ValueError(_explain_spm_error(str(e))) from None
    model_path = output_prefix.with_name(output_prefix.name + ".model")
    vocab_path = output_prefix.with_name(output_prefix.name + ".vocab")
    _write_atomically(vocab_path, _vocab_listing(model.getvalue()).encode("utf-8"))
    _write_atomically(model_path, model.getvalue())
    if progress:
        print(f"train-tokenizer  trained {model_type} ({vocab_size} pieces) in "
              f"{time.perf_counter() - t0:.1f}s: {model_path}", flush=True)
    return model_path


def _explain_spm_error(message: str) -> str:
    """sentencepiece's ``INTERNAL: file.cc(123) [check] reason`` → a one-line user message."""
    reason = message.splitlines()[0] if message else "unknown error"
    if "sentences_.empty()" in reason:
        return "sentencepiece training failed: the corpus has no text"
    if "]" in reason:
        reason = reason.rsplit("]", 1)[1].strip() or reason
    return f"sentencepiece training failed: {reason}"


def _vocab_listing(model_bytes: bytes) -> str:
    """A human-readable ``piece<TAB>score`` listing, like sentencepiece's own ``.vocab``."""
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    pieces = range(sp.get_piece_size())
    return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in pieces)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Tokenizer:
    """A thin wrapper around a sentencepiece model: plain-int encode/decode plus metadata.

    ``encode`` adds no special tokens; callers frame documents with ``bos_id``/``eos_id``.
    Pickles by path, so it can travel to DataLoader workers and DDP processes.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.path}")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"not a sentencepiece model: {self.path} ({e})") from None
        self.checksum = file_sha256(self.path)
        self._word_starts: np.ndarray | None = None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def piece_to_id(self, piece: str) -> int:
        """Id of a piece (e.g. a special token); ``unk_id`` if it is not in the vocabulary."""
        return self._sp.piece_to_id(piece)

    def word_starts(self) -> np.ndarray:
        """``bool [vocab_size]``: which pieces begin a word (sentencepiece's ``▁`` prefix), so
        that text can be cut between words; computed once."""
        if self._word_starts is None:
            self._word_starts = np.array(
                [self._sp.id_to_piece(i).startswith("\u2581") for i in range(self.vocab_size)])
        return self._word_starts

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``.model`` file written by :func:`train_tokenizer`."""
    return Tokenizer(path)
