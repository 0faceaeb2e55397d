"""Shared fixtures for the data-pipeline tests: KJV texts and a small, quickly trained tokenizer."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from fsa_train.data.corpus import demo_corpus_path, read_jsonl_documents
from fsa_train.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

SMALL_VOCAB = 400


@pytest.fixture(scope="session")
def kjv_texts() -> list[str]:
    return list(read_jsonl_documents(demo_corpus_path()))


@pytest.fixture(scope="session")
def small_tokenizer(kjv_texts: list[str], tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A 400-piece BPE trained on ~40 KB of Genesis: enough to be realistic, fast to train."""
    prefix = tmp_path_factory.mktemp("tok") / "small"
    return load_tokenizer(train_tokenizer([kjv_texts[0][:40_000]], prefix, SMALL_VOCAB))


def _write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    """Write ``texts`` as a JSONL corpus (gzipped when ``path`` ends in .gz)."""
    data = "".join(json.dumps({"id": i, field: t}) + "\n" for i, t in enumerate(texts)).encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.fixture(scope="session")
def write_jsonl():
    """The JSONL writer, as a fixture so test modules need not import conftest."""
    return _write_jsonl


@pytest.fixture
def tiny_corpus(kjv_texts: list[str], tmp_path: Path) -> Path:
    """Ten short KJV excerpts (1-3 KB each, some with newlines) as a .jsonl file."""
    texts = [t[: 1000 + 200 * i] for i, t in enumerate(kjv_texts[:10])]
    texts[3] = texts[3][:500] + "\n\n  Chapter 2:\n" + texts[3][500:]
    return _write_jsonl(tmp_path / "tiny.jsonl", texts)
