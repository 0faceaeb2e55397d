"""Which GPU kernel runs ``window_attention``: ours (Triton) or a maintained library's.

``KernelSettings.window_kernel`` names one ("triton", "cudnn", "flash") or leaves the choice to
"auto", which takes, per shape class, the first kernel of :data:`AUTO_ORDER` that is installed
and accepts the inputs. The order is a measurement, not a guess: each entry cites the benchmark
that ranked it (``python -m benchmarks run window``; ``docs/notes/window.md``). Our Triton
kernel ends every list, so "auto" never fails because a library is missing; an explicit
library that cannot run the inputs is a one-line error from its module.
"""

from __future__ import annotations

from types import ModuleType

import torch

from fsa_train.kernels.ops.window_attention import cudnn, flash
from fsa_train.kernels.settings import KernelSettings

LIBRARY_KERNELS: dict[str, ModuleType] = {"cudnn": cudnn, "flash": flash}
"""The library paths; each module has ``unsupported(q, k, window)`` and ``window_attention``."""

AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "dense": ("triton",),
    "window": ("triton",),
}
"""Kernels "auto" tries, fastest first, per shape class ("dense": no window, or one at least as
long as the batch; "window": a sliding window)."""


def shape_class(window: int | None, total: int) -> str:
    """"dense" or "window" (the keys of :data:`AUTO_ORDER`)."""
    return "dense" if window is None or window >= total else "window"


def kernel_for(settings: KernelSettings, q: torch.Tensor, k: torch.Tensor,
               window: int | None) -> str:
    """The kernel that runs these inputs: ``settings.window_kernel``, with "auto" resolved."""
    if settings.window_kernel != "auto":
        return settings.window_kernel
    if not q.is_cuda:
        return "triton"
    for name in AUTO_ORDER[shape_class(window, q.shape[0])]:
        if name == "triton" or LIBRARY_KERNELS[name].unsupported(q, k, window) is None:
            return name
    return "triton"
