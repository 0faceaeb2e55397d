"""autotune_choices lists what each autotuned kernel picked, and nothing for untuned ones."""

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from fsa_train.kernels.triton.tuning import autotune_choices, choices_markdown  # noqa: E402

topk = importlib.import_module("fsa_train.kernels.triton.topk")


def test_reports_a_tuned_kernel_and_skips_untuned_ones(monkeypatch):
    monkeypatch.setattr(topk._tuned, "cache", {})
    assert "topk._tuned" not in autotune_choices()
    config = triton.Config({"BLOCK_M": 64}, num_warps=8, num_stages=2)
    monkeypatch.setattr(topk._tuned, "cache", {(128, 2, "torch.bfloat16"): config})
    choices = autotune_choices()
    assert choices["topk._tuned"] == [
        {"key": ["128", "2", "torch.bfloat16"], "config": str(config)}]
    lines = choices_markdown(choices)
    assert lines[1] == "## Autotuner choices"
    assert any(line.startswith("- `topk._tuned` key (128, 2, torch.bfloat16): BLOCK_M: 64")
               for line in lines)
    assert choices_markdown({}) == []
