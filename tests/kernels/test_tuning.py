"""Per-size-class autotuning and the record of autotuner choices."""

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

from fsa_train.kernels.triton import tuning  # noqa: E402
from fsa_train.kernels.triton.tuning import (  # noqa: E402
    autotune_choices,
    bucketed_autotune,
    choices_markdown,
    size_class,
)

topk = importlib.import_module("fsa_train.kernels.triton.topk")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _scale_kernel(X, Y, total, factor, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    tl.store(Y + offs, tl.load(X + offs, mask=ok) * factor, mask=ok)


def test_size_class_is_the_next_power_of_two():
    assert [size_class(n) for n in (0, 1, 2, 3, 16, 17, 65536, 65537)] == \
        [1, 1, 2, 4, 16, 32, 65536, 131072]


def test_each_size_class_gets_its_own_tuner_and_the_kernel_runs():
    tuned = bucketed_autotune([triton.Config({"BLOCK": 32})], key=[])(_scale_kernel)
    for total in (100, 70, 5000):
        x = torch.randn(total, device=DEVICE)
        y = torch.empty_like(x)
        tuned[lambda meta, n=total: (triton.cdiv(n, meta["BLOCK"]),)](x, y, total, 2.0)
        torch.testing.assert_close(y, 2 * x)
    assert sorted(tuned.tuners) == [128, 8192]  # 100 and 70 share a class
    assert tuned.for_size(90) is tuned.tuners[128]
    with pytest.raises(ValueError):
        bucketed_autotune([triton.Config({"BLOCK": 32})], key=[], size_arg="n")(_scale_kernel)


def test_choices_are_reported_per_size_class(monkeypatch):
    monkeypatch.setattr(topk._tuned, "tuners", {})
    assert "topk._tuned" not in autotune_choices()
    config = triton.Config({"BLOCK_M": 64}, num_warps=8, num_stages=2)
    tuner = topk._tuned.for_size(60000)
    monkeypatch.setattr(tuner, "cache", {(128, 2, "torch.bfloat16"): config})
    choices = autotune_choices()
    assert choices["topk._tuned"] == [
        {"key": ["total <= 65536", "128", "2", "torch.bfloat16"], "config": str(config)}]
    lines = choices_markdown(choices)
    assert lines[1] == "## Autotuner choices"
    assert "- `topk._tuned` key (total <= 65536, 128, 2, torch.bfloat16): " + str(config) in lines
    assert choices_markdown({}) == []


def test_every_tuned_kernel_of_the_ops_is_bucketed_on_its_token_count():
    for name in ("compressed_attention", "window_attention", "topk"):
        module = importlib.import_module(f"fsa_train.kernels.triton.{name}")
        tuners = [v for v in vars(module).values()
                  if isinstance(v, (tuning.BucketedAutotuner, Autotuner))]
        assert tuners and all(isinstance(t, tuning.BucketedAutotuner) for t in tuners), name
        assert all(t.size_arg == "total" for t in tuners)
