"""Synthetic retrieval documents mixed into the training stream (issue 22's data option).

A small model trained on natural text never needs to look thousands of tokens back, so the
usual long-context evaluations (a passkey at 16K) score zero for dense and sparse attention
alike and cannot tell them apart. Mixing a small fraction of retrieval documents into training
makes the skill learnable at small scale:

    <BOS> natural text ... The pass key of the otter is 48213. ... natural text ...
    The pass key of the lantern is 90317. ... natural text ...
    What is the pass key of the otter? The pass key of the otter is 48213 <EOS>

``keys`` such sentences sit at random token offsets of one window's own text (the corpus, not
random tokens), and the question asks one of them, so the answer is 1-in-``keys`` even for a
model that copies "a" key and the distance from key to question spans the whole window.

Which windows are replaced is a pure function of ``(seed, window index)``: the same run, a
resumed run and every data-parallel rank agree, and the choice does not depend on the order the
sampler visits windows in. Only the training split is mixed; validation loss stays natural text.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from fsa_train.config import ConfigError

NAMES = (
    "otter", "lantern", "maple", "comet", "harbor", "violin", "falcon", "pebble", "meadow",
    "anchor", "cedar", "glacier", "walnut", "beacon", "thistle", "canyon", "sparrow", "quartz",
    "orchard", "ember", "willow", "marble", "heron", "saffron", "lagoon", "copper", "juniper",
    "badger", "tundra", "clover", "nickel", "raven",
)
"""What the keys belong to: common words, so every tokenizer spells them in a few pieces."""


class RetrievalTokenizer(Protocol):
    """What the generator needs from a tokenizer (``fsa_train.data.tokenizer.Tokenizer``)."""

    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...


def key_sentence(name: str, key: str) -> str:
    """The sentence that hides ``key`` for ``name``."""
    return f"The pass key of the {name} is {key}."


def question(name: str) -> str:
    """The closing question; the answer follows it as `` <key>``."""
    return f"What is the pass key of the {name}? The pass key of the {name} is"


@dataclass(frozen=True)
class RetrievalDocument:
    """One retrieval document of exactly ``len(ids)`` tokens: BOS, filler with the key sentences
    (``needles``: their token offsets, names and keys), question, answer, EOS. ``answer`` is the
    answer's offset and length; ``asked`` indexes ``needles``."""

    ids: list[int]
    needles: tuple[tuple[int, str, str], ...]
    asked: int
    answer: tuple[int, int]

    @property
    def distance(self) -> int:
        """Tokens from the asked key sentence to the answer."""
        return self.answer[0] - self.needles[self.asked][0]


def word_boundary(tokenizer: RetrievalTokenizer, text: Sequence[int], cut: int,
                  reach: int = 16) -> int:
    """``cut`` moved to the nearest offset of ``text`` where a word starts (at most ``reach``
    tokens away; else unchanged), so a key sentence never splits a word. Tokenizers without
    ``word_starts()`` keep ``cut``."""
    starts = getattr(tokenizer, "word_starts", None)
    if starts is None or cut in (0, len(text)):
        return cut
    starts = starts()
    for step in range(reach + 1):
        for at in (cut - step, cut + step):
            if 0 <= at < len(text) and starts[text[at]]:
                return at
    return cut


def build_document(tokenizer: RetrievalTokenizer, filler: Sequence[int], length: int,
                   n_keys: int, rng: random.Random,
                   asked_depth: float | None = None) -> RetrievalDocument:
    """A document of exactly ``length`` tokens from ``filler`` tokens (natural text; cut or
    cycled to fit) with ``n_keys`` key sentences at uniform random offsets of the text and a
    question about one of them; ``asked_depth`` in [0, 1] puts the asked sentence at that
    fraction of the text instead (evaluations by distance). A ConfigError when ``length``
    cannot hold the sentences."""
    check_retrieval(0.0, n_keys)
    if asked_depth is not None and not 0.0 <= asked_depth <= 1.0:
        raise ValueError(f"asked_depth must be in [0, 1], got {asked_depth}")
    names = rng.sample(NAMES, n_keys)
    keys = [str(rng.randint(10000, 99999)) for _ in names]
    asked = rng.randrange(n_keys)
    needles = [tokenizer.encode(key_sentence(n, k)) for n, k in zip(names, keys, strict=True)]
    prompt = tokenizer.encode(question(names[asked]))
    full = tokenizer.encode(f"{question(names[asked])} {keys[asked]}")
    answer = full[len(prompt):] if full[:len(prompt)] == prompt else tokenizer.encode(keys[asked])
    fixed = 2 + sum(map(len, needles)) + len(prompt) + len(answer)  # + BOS, EOS
    room = length - fixed
    if room < 0:
        raise ConfigError(f"a retrieval document with {n_keys} key(s) needs at least {fixed} "
                          f"tokens, more than data.seq_len + 1 = {length}: use fewer "
                          "data.retrieval_keys or a longer data.seq_len")
    if len(filler) == 0:
        raise ValueError("build_document needs some filler tokens")
    text = [int(filler[i % len(filler)]) for i in range(room)]
    cuts = [rng.randint(0, room) for _ in range(n_keys)]
    if asked_depth is not None:
        cuts[asked] = round(asked_depth * room)
    cuts = [word_boundary(tokenizer, text, cut) for cut in cuts]
    order = sorted(range(n_keys), key=lambda i: (cuts[i], i))
    ids = [tokenizer.bos_id]
    placed = []
    previous = 0
    for i in order:
        ids += text[previous:cuts[i]]
        placed.append((len(ids), names[i], keys[i]))
        ids += needles[i]
        previous = cuts[i]
    ids += text[previous:] + prompt
    answer_at = len(ids)
    ids += answer + [tokenizer.eos_id]
    return RetrievalDocument(ids, tuple(placed), order.index(asked), (answer_at, len(answer)))


def check_retrieval(fraction: float, keys: int) -> None:
    """One-line ConfigError for a mixture fraction outside [0, 1) or a key count outside
    1..len(NAMES)."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"data.retrieval_fraction must be in [0, 1), got {fraction}")
    if not 1 <= keys <= len(NAMES):
        raise ConfigError(f"data.retrieval_keys must be in 1..{len(NAMES)}, got {keys}")


@dataclass(frozen=True)
class RetrievalMix:
    """Replace a ``fraction`` of training windows by retrieval documents with ``keys`` keys.

    ``chooses(w)`` and the document of window ``w`` depend only on ``(seed, w)``."""

    tokenizer: RetrievalTokenizer
    fraction: float
    keys: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        check_retrieval(self.fraction, self.keys)

    def _rng(self, window: int) -> random.Random:
        return random.Random(f"retrieval:{self.seed}:{window}")

    def chooses(self, window: int) -> bool:
        """Whether window ``window`` is a retrieval document."""
        return self.fraction > 0 and self._rng(window).random() < self.fraction

    def check_fits(self, seq_len: int) -> None:
        """A ConfigError now (not at some later step) when ``seq_len`` cannot hold a document."""
        build_document(self.tokenizer, [self.tokenizer.eos_id], seq_len + 1, self.keys,
                       random.Random(0))

    def window(self, window: int, chunk: np.ndarray) -> dict[str, torch.Tensor]:
        """The item of window ``window`` (``chunk``: its ``seq_len + 1`` natural tokens, the
        filler with document frames removed) in :class:`~.packing.PackedWindows`' layout: one
        document, plain next-token targets."""
        rng = self._rng(window)
        rng.random()  # the draw of chooses()
        special = (self.tokenizer.bos_id, self.tokenizer.eos_id)
        filler = chunk[~np.isin(chunk, special)]
        if filler.size == 0:
            filler = chunk
        doc = build_document(self.tokenizer, filler, len(chunk), self.keys, rng)
        ids = torch.tensor(doc.ids, dtype=torch.int64)
        return {"input_ids": ids[:-1].clone(), "targets": ids[1:].clone(),
                "cu_seqlens": torch.tensor([0, len(chunk) - 1], dtype=torch.int32)}
