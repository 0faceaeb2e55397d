"""Fixtures for the evaluation tests: a small tokenizer, a tiny NSA GPT and its export file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from fsa_train.config import GPTConfig, NSAConfig
from fsa_train.data.corpus import demo_corpus_path, read_jsonl_documents
from fsa_train.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from fsa_train.export import EXPORT_FORMAT
from fsa_train.model import GPT

TINY_NSA = NSAConfig(
    cmp_kernel=8, cmp_stride=4, sel_block=16, sel_topk=4, init_blocks=1, local_blocks=2, window=16
)


@pytest.fixture(scope="session")
def texts() -> list[str]:
    """The first KJV books, a few KB each."""
    documents = read_jsonl_documents(demo_corpus_path())
    return [next(documents)[:6000] for _ in range(6)]


@pytest.fixture(scope="session")
def tokenizer(texts: list[str], tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A 320-piece BPE trained on the texts and the passkey sentences."""
    extra = "The grass is green. The sky is blue. What is the pass key? 0123456789"
    prefix = tmp_path_factory.mktemp("tok") / "tok"
    return load_tokenizer(train_tokenizer([*texts, extra], prefix, 320))


def tiny_config(vocab_size: int, attention: str = "nsa") -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, n_layer=1, n_head=2, n_kv_head=1, d_model=32,
                     attention=attention, nsa=TINY_NSA, loss_chunk=48)


@pytest.fixture(scope="session")
def tiny_model(tokenizer: Tokenizer) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config(tokenizer.vocab_size)).eval()


@pytest.fixture(scope="session")
def exported(tiny_model: GPT, tokenizer: Tokenizer, tmp_path_factory) -> Path:
    """The tiny model in the `fsa-train export` format, tokenizer included."""
    path = tmp_path_factory.mktemp("export") / "tiny.pt"
    torch.save({
        "format": EXPORT_FORMAT,
        "config": dataclasses.asdict(tiny_model.cfg),
        "state_dict": tiny_model.state_dict(),
        "tokenizer_model": Path(tokenizer.path).read_bytes(),
        "step": 0,
    }, path)
    return path
