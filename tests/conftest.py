"""Test-wide set-up: Triton's interpreter on machines without a GPU, and the `gpu` marker."""

import gzip
import json
import os
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before any @triton.jit kernel is defined: kernels then run on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """Twelve KJV books cut to 12 KB each: enough for a tokenizer and a few hundred windows."""
    from fsa_train.data.corpus import demo_corpus_path

    path = tmp_path_factory.mktemp("corpus") / "kjv_small.jsonl"
    with gzip.open(demo_corpus_path(), "rt", encoding="utf-8") as source:
        records = [json.loads(line) for line in source][:12]
    with path.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps({"id": record["id"], "text": record["text"][:12000]}) + "\n")
    return path
