"""Device and precision choices shared by the evaluation commands."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@contextlib.contextmanager
def precision(device: torch.device, name: str = "auto") -> Iterator[None]:
    """Inference precision: ``auto`` is bf16 autocast on CUDA and fp32 elsewhere."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    use_bf16 = name == "bf16" or (name == "auto" and device.type == "cuda")
    if use_bf16:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield
