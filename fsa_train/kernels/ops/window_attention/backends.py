"""Which GPU kernel runs ``window_attention``: ours (Triton) or a maintained library's.

``KernelSettings.window_kernel`` names one ("triton", "cudnn", "flash", "fa4") or leaves the
choice to "auto", which takes, per shape class, the first kernel of :data:`AUTO_ORDER` that
is installed and accepts the inputs (:data:`DETERMINISTIC_ORDER` when PyTorch is asked for
deterministic algorithms). The order is a measurement, not a guess: each entry cites the benchmark
that ranked it (``python -m benchmarks run window``; ``docs/notes/window.md``). Our Triton
kernel ends every list, so "auto" never fails because a library is missing; an explicit
library that cannot run the inputs is a one-line error from its module.
"""

from __future__ import annotations

from types import ModuleType

import torch

from fsa_train.kernels.ops.window_attention import cudnn, fa4, flash
from fsa_train.kernels.settings import KernelSettings

LIBRARY_KERNELS: dict[str, ModuleType] = {"cudnn": cudnn, "flash": flash, "fa4": fa4}
"""The library paths; each module has ``unsupported(q, k, window)`` and ``window_attention``.
FlashAttention-4 (``fa4``) is in no :data:`AUTO_ORDER` list until a benchmark has ranked it:
it runs when named (``FSA_WINDOW_KERNEL=fa4``) and in ``python -m benchmarks run window``."""

AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "dense": ("cudnn", "triton"),
    "window, G < 4": ("flash", "triton"),
    "window, G >= 4": ("cudnn", "triton"),
}
"""Kernels "auto" tries, fastest first, per shape class, when the backward may add in any order
(PyTorch's default). Measured on one H200, bf16, d = 128 (``window_h200_2026-12-03``):
dense packed, cuDNN 1.03-1.09x cuDNN SDPA on one document against ours 1.46-1.71x; W = 512,
cuDNN 257-290 TFLOP/s at G >= 4 against ours and FlashAttention-2 at 175-195 (except 16K tokens
at G = 4, where cuDNN's ~1.3 ms of host work per step shows); at G = 1 FlashAttention-2 190
against ours 176 and cuDNN 145."""

DETERMINISTIC_ORDER: tuple[str, ...] = ("triton",)
"""What "auto" takes under ``torch.use_deterministic_algorithms(True)`` (Lightning's
``trainer.deterministic``): our fused backward is deterministic; cuDNN's deterministic backward
needs a workspace of B·H·S² (129 GiB for one 64K document at 16 heads) and FlashAttention-2's
adds dQ with atomics."""


def shape_class(window: int | None, total: int, groups: int) -> str:
    """The key of :data:`AUTO_ORDER` for a window (None: dense), batch length and G."""
    if window is None or window >= total:
        return "dense"
    return "window, G >= 4" if groups >= 4 else "window, G < 4"


def kernel_for(settings: KernelSettings, q: torch.Tensor, k: torch.Tensor,
               window: int | None) -> str:
    """The kernel that runs these inputs: ``settings.window_kernel``, with "auto" resolved."""
    if settings.window_kernel != "auto":
        return settings.window_kernel
    if not q.is_cuda:
        return "triton"
    order = (DETERMINISTIC_ORDER if torch.are_deterministic_algorithms_enabled() else
             AUTO_ORDER[shape_class(window, q.shape[0], q.shape[1] // k.shape[1])])
    for name in order:
        if name == "triton" or LIBRARY_KERNELS[name].unsupported(q, k, window) is None:
            return name
    return "triton"
