"""Train and load lossless sentencepiece tokenizers.

The training recipe keeps text byte-exact: identity normalization, no whitespace collapsing and
byte fallback for unseen characters, so ``decode(encode(x)) == x`` for any string. Special ids are
fixed (pad 0, unk 1, bos 2, eos 3) so that data files and models agree without extra metadata.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from fsa_train.data.corpus import file_sha256

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
#: Bump when the training options below change, so cached tokenizers are not reused.
RECIPE_VERSION = 1


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
) -> Path:
    """Train a sentencepiece model on ``texts``; writes ``{output_prefix}.model`` and ``.vocab``.

    ``input_sentence_size`` caps the number of lines sampled for training (a seeded shuffle
    picks them when the corpus has more). The model bytes depend only on the texts and the
    options, not on the output path, so equal inputs give equal checksums. Returns the path of
    the ``.model`` file.
    """
    min_vocab = 256 + 4 + 1  # byte fallback pieces + special pieces + at least one learnt piece
    if vocab_size < min_vocab:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte fallback needs >= {min_vocab}"
        )
    output_prefix = Path(output_prefix)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_sentences(texts, max_sentence_length),
        model_writer=model,  # in memory: model_prefix would be recorded in the model bytes
        vocab_size=vocab_size,
        model_type=model_type,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        byte_fallback=True,
        split_digits=True,
        character_coverage=0.9995,  # rarer characters go to byte pieces
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=max_sentence_length,
        num_threads=num_threads,
        minloglevel=2,  # errors only: no per-step training log on the console
    )
    model_path = output_prefix.with_name(output_prefix.name + ".model")
    model_path.write_bytes(model.getvalue())
    _write_vocab(model_path, output_prefix.with_name(output_prefix.name + ".vocab"))
    return model_path


def _write_vocab(model_path: Path, vocab_path: Path) -> None:
    """A human-readable ``piece<TAB>score`` listing, like sentencepiece's own ``.vocab``."""
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    lines = (f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    vocab_path.write_text("".join(lines), encoding="utf-8")


class Tokenizer:
    """A thin wrapper around a sentencepiece model: plain-int encode/decode plus metadata.

    ``encode`` adds no special tokens; callers frame documents with ``bos_id``/``eos_id``.
    Pickles by path, so it can travel to DataLoader workers and DDP processes.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.path}")
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.checksum = file_sha256(self.path)

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

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``.model`` file written by :func:`train_tokenizer`."""
    return Tokenizer(path)
