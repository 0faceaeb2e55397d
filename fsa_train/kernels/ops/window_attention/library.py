"""What the library paths of ``window_attention`` (``cudnn.py``, ``fa4.py``, ``flash.py``) share:
their input checks, the prologue of each entry point, and the autograd function that ties a
library's forward and backward custom ops together."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fsa_train.kernels.libraries import device_capability, unsupported_inputs


def unsupported_library(kernel: str, loaded: object | None, missing: str, q: torch.Tensor,
                        k: torch.Tensor, min_capability: tuple[int, int],
                        generation: str) -> str | None:
    """Why library ``kernel`` cannot run these inputs (None when it can): ``missing`` when it
    did not load, then the shared input checks (head dim up to 128), then the GPU generation
    (``generation`` names it, e.g. "an Ampere or newer GPU")."""
    if loaded is None:
        return missing
    reason = unsupported_inputs(kernel, q, k, max_head_dim=128)
    if reason is None and device_capability(q.device) < min_capability:
        major, minor = device_capability(q.device)
        reason = (f"window_kernel={kernel!r} needs {generation}, got compute capability "
                  f"{major}.{minor}")
    return reason


def checked_scale(reason: str | None, q: torch.Tensor, scale: float | None) -> float:
    """The softmax scale of a library call (default ``1/sqrt(d)``), after raising ``reason``
    (the path's :func:`unsupported_library` answer) as a one-line ValueError."""
    if reason is not None:
        raise ValueError(reason)
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def gradients_fake(do, q, k, v, *options):
    """The fake implementation of a library backward op: ``(dq, dk, dv)`` like q, k, v."""
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))


def library_attention(name: str, forward: Callable,
                      backward: Callable) -> type[torch.autograd.Function]:
    """An autograd function named ``name`` (its backward node ``<name>Backward``, which the
    memory benchmark reports) over a library's custom ops: ``forward(q, k, v, cu, *options) ->
    (o, lse)`` and ``backward(do, q, k, v, o, lse, cu, *options, deterministic) -> (dq, dk,
    dv)``. ``apply(q, k, v, cu, *options, deterministic)`` returns ``o``."""

    def forward_(ctx, q, k, v, cu, *options):
        *forward_options, _ = options
        o, lse = forward(q, k, v, cu, *forward_options)
        ctx.save_for_backward(q, k, v, o, lse, cu)
        ctx.options = options
        return o

    def backward_(ctx, do):
        q, k, v, o, lse, cu = ctx.saved_tensors
        dq, dk, dv = backward(do, q, k, v, o, lse, cu, *ctx.options)
        return dq, dk, dv, None, *(None for _ in ctx.options)

    # built with its name: autograd names the backward node when the class is created
    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward_), "backward": staticmethod(backward_),
        "__module__": forward.__module__})
