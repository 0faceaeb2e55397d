"""The model's norms, SwiGLU activation and loss on liger-kernel's fused Triton ops, or on torch's.

``GPTConfig.fused_ops`` picks them (issue 20):

* ``"torch"``: ``nn.RMSNorm``, ``silu(a) * b`` and the chunked, checkpointed cross-entropy of
  :meth:`fsa_train.model.gpt.GPT.loss_terms`, exactly as before the switch existed;
* ``"liger"``: liger-kernel's ``LigerRMSNormFunction`` (torch's rounding: the normalised input
  in fp32, cast to the input's dtype, then times the weight), ``LigerSiLUMulFunction`` between
  our own ``w1``/``w3``/``w2`` linears (one kernel, its backward recomputes the SiLU instead of
  keeping it) and ``LigerFusedLinearCrossEntropyFunction`` for the head and loss (logits made
  chunk by chunk and never kept; the gradients are computed in the forward);
* ``"auto"``: per op, what measured faster on the GPU (``benchmarks/fused_ops.py``, H200,
  2026-12-03, 65,536 tokens per call): liger's fused linear cross-entropy (2.4x our chunked
  loss, a third of its peak) and SiLU-mul (1.04x, 0.7x the peak), torch's RMSNorm (liger's
  took 0.79x its speed) -- liger's ops only where liger-kernel imports and the tensors are on
  CUDA, torch's elsewhere.

Only the computation changes: the modules, their parameters and their names are the same in
every mode, so state dicts and checkpoints move freely between modes. liger-kernel is an
optional dependency (``pip install 'fsa-train[liger]'``); nothing here imports it until a
mode other than ``"torch"`` asks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fsa_train.config import ConfigError

FUSED_OPS = ("auto", "liger", "torch")
"""The values of ``GPTConfig.fused_ops``."""

IGNORE_INDEX = -100

LIGER_MISSING = ("model.config.fused_ops='liger' needs liger-kernel (pip install liger-kernel, "
                 "or pip install 'fsa-train[liger]')")
"""The one-line error when liger is asked for and cannot be imported."""


@dataclass(frozen=True)
class Liger:
    """The liger-kernel ops the model calls (their autograd Functions' ``apply``)."""

    rms_norm: Callable
    """``(x, weight, eps, offset, casting_mode, in_place) -> y``."""
    silu_mul: Callable
    """``(a, b) -> silu(a) * b``."""
    linear_cross_entropy: Callable
    """``(x, weight, target, bias, ce_weight, ignore_index, lse_square_scale,
    label_smoothing, reduction) -> (loss, ...)``."""
    version: str


_LOADED: dict[str, Liger | str] = {}
"""``_load_liger``'s one result. A plain dict, not ``functools.cache``: Dynamo traces through a
cached function's body (``importlib.metadata`` included), but reads a global dict."""


def _load_liger() -> Liger | str:
    """liger-kernel's ops, or why they cannot be imported here (one line); imported once."""
    if "liger" not in _LOADED:
        _LOADED["liger"] = _import_liger()
    return _LOADED["liger"]


def _import_liger() -> Liger | str:
    try:
        from importlib import metadata

        from liger_kernel.ops import (
            LigerFusedLinearCrossEntropyFunction,
            LigerRMSNormFunction,
            LigerSiLUMulFunction,
        )
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] == "liger_kernel":
            return "not installed"
        return f"does not import ({type(error).__name__}: {error})"
    except Exception as error:  # noqa: BLE001 - e.g. its Triton failing to load here
        return f"does not import ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    try:
        version = metadata.version("liger-kernel")
    except metadata.PackageNotFoundError:  # importable from a source tree
        version = "?"
    return Liger(LigerRMSNormFunction.apply, LigerSiLUMulFunction.apply,
                 LigerFusedLinearCrossEntropyFunction.apply, version)


def liger() -> Liger | None:
    """liger-kernel's ops, or None when it is not installed or does not import here."""
    loaded = _load_liger()
    return loaded if isinstance(loaded, Liger) else None


def liger_unavailable() -> str | None:
    """Why liger-kernel cannot be used here ("not installed", "does not import (...)"), or
    None when it can."""
    loaded = _load_liger()
    return None if isinstance(loaded, Liger) else loaded


def check_mode(mode: str) -> None:
    """Raise the one-line :class:`ConfigError` when ``mode`` is ``"liger"`` and liger-kernel
    cannot be imported (called when the model is built, before any tensor exists, and so before
    ``torch.compile`` traces a forward: the import happens here, eagerly, for "auto" too)."""
    reason = liger_unavailable() if mode != "torch" else None
    if mode == "auto":
        return
    if reason is not None:
        raise ConfigError(LIGER_MISSING if reason == "not installed"
                          else f"model.config.fused_ops='liger': liger-kernel {reason}")


LIGER_OPS = ("rms_norm", "silu_mul", "linear_cross_entropy")
"""The ops ``fused_ops`` can move to liger (the fields of :class:`Liger`)."""

AUTO_LIGER_OPS = frozenset({"silu_mul", "linear_cross_entropy"})
"""The ops ``"auto"`` runs on liger: those that measured faster than torch's (module docstring)."""


def use_liger(mode: str, x: torch.Tensor, op: str) -> bool:
    """Whether ``op`` (one of :data:`LIGER_OPS`) on ``x`` runs on liger: ``"liger"`` always
    (CUDA tensors required), ``"auto"`` for :data:`AUTO_LIGER_OPS` when liger imports and
    ``x`` is on CUDA, ``"torch"`` never."""
    if op not in LIGER_OPS:
        raise ValueError(f"unknown fused op {op!r}; expected one of {LIGER_OPS}")
    if mode == "torch":
        return False
    if mode == "auto":
        return op in AUTO_LIGER_OPS and x.is_cuda and liger() is not None
    check_mode(mode)
    if not x.is_cuda:
        raise ConfigError(f"model.config.fused_ops='liger' needs CUDA tensors, got {x.device} "
                          f"(use 'auto' to fall back to torch off the GPU)")
    return True


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same ``weight``), computed by liger's kernel where ``fused_ops`` says.

    liger's backward may write the input gradient into the output gradient's memory
    (``in_place``); it is off here, because autograd can hand the same gradient tensor to
    more than one consumer."""

    def __init__(self, dim: int, eps: float, fused_ops: str = "torch") -> None:
        super().__init__(dim, eps=eps)
        self.fused_ops = fused_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_liger(self.fused_ops, x, "rms_norm"):
            return liger().rms_norm(x, self.weight, self.eps, 0.0, "llama", False)
        return super().forward(x)


def to_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` in autocast's dtype where autocast is on for its device, else ``x`` itself.

    For a block's normed input (the norms compute in fp32): cast once here, the sub-layer's
    projections (q, k, v and NSA's gates; SwiGLU's two inputs) share one half-precision copy
    and keep it once for their backward, where autocast would cast, and keep, a copy per
    projection. The forward is unchanged (each projection saw the same cast); the backward sums
    the projections' input gradients in that dtype, as a model whose weights are in it does."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


def silu_mul(a: torch.Tensor, b: torch.Tensor, mode: str = "torch") -> torch.Tensor:
    """SwiGLU's activation ``silu(a) * b``: liger's one kernel where ``mode`` says, else torch's
    two ops (which keep ``a``, ``silu(a)`` and ``b`` for the backward; liger keeps ``a`` and
    ``b`` and recomputes the SiLU)."""
    if use_liger(mode, a, "silu_mul"):
        return liger().silu_mul(a, b)
    return F.silu(a) * b


class LMHead(nn.Linear):
    """The output head ``[total, D] → [total, vocab]`` (no bias). Called with targets, it
    returns liger's fused linear cross-entropy summed over the targets != -100 instead of the
    logits: the logits are made chunk by chunk inside and never kept. Called as a module either
    way, so that parameter hooks (DeepSpeed ZeRO-3's gathering) see its weight."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, hidden: torch.Tensor,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(hidden)
        check_mode("liger")
        ops = liger()
        # positional: ce_weight None, lse_square_scale 0, label_smoothing 0, reduction "sum"
        loss = ops.linear_cross_entropy(hidden, self.weight, targets, None, None, IGNORE_INDEX,
                                        0.0, 0.0, "sum")[0]
        return loss.float()
