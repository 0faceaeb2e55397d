"""Maintained attention kernels of other libraries that our ops can hand work to.

We write kernels only where nobody else has a fast one: where a maintained library runs an op's
shape faster, the op's GPU path calls it and keeps our Triton kernel as the fallback. Each entry
here answers two questions without importing anything heavy twice: is the library usable in
this process, and if not, what one line tells the user how to get it.

* ``flash_varlen``: FlashAttention on packed documents through PyTorch's
  ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 as built into torch; FA3/FA4 when
  activated with ``torch.nn.attention.activate_flash_attention_impl``). Nothing to install
  beyond a CUDA build of torch that has the module.
* ``cudnn_sdpa``: cuDNN's fused attention on packed documents through ``nvidia-cudnn-frontend``
  (its ``torch.ops.cudnn.sdpa_fwd`` / ``sdpa_bwd`` custom ops: ragged layout, causal and
  sliding-window bands, GQA). The optional extra ``pip install fsa-train[gpu]``.
* ``flash_attn_4``: FlashAttention-4 (``flash-attn-4``, CuTe DSL kernels for Hopper and
  Blackwell): its packed-sequence forward and backward entry points. The optional extra
  ``pip install fsa-train[fa4]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class VarlenAttention:
    """``varlen_attn`` of this torch, and whether it takes ``enable_gqa`` (newer releases
    check the head counts behind that flag; older ones pass grouped heads straight through)."""

    fn: Callable
    takes_enable_gqa: bool
    takes_window_size: bool


_LOADED: dict[str, object] = {}
"""What :func:`flash_varlen` and :func:`cudnn_sdpa` found, by name: a plain dict, not
``functools.cache``, so that compiled code reads the result instead of tracing the imports
(:func:`~fsa_train.kernels.registry.preload_triton_modules` fills it before compiling)."""


def _once(name: str, load: Callable[[], object]):
    if name not in _LOADED:
        _LOADED[name] = load()
    return _LOADED[name]


def device_capability(device) -> tuple[int, int]:
    """The CUDA compute capability of ``device``, read once per device."""
    import torch

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    return _once(f"capability {index}", lambda: torch.cuda.get_device_capability(index))


def flash_varlen() -> VarlenAttention | None:
    """torch's packed-sequence FlashAttention, or None when this torch has none."""
    return _once("flash", _load_flash_varlen)


def _load_flash_varlen() -> VarlenAttention | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return VarlenAttention(varlen_attn, "enable_gqa" in params, "window_size" in params)


FLASH_VARLEN_MISSING = ("window_kernel='flash' needs torch.nn.attention.varlen.varlen_attn with "
                        "window_size (torch >= 2.10, a CUDA build)")
"""The one-line error when the FlashAttention path is asked for and this torch lacks it."""


@dataclass(frozen=True)
class CudnnSdpa:
    """nvidia-cudnn-frontend's packed-sequence SDPA ops: ``fwd(q, k, v, scale, ...) -> (o,
    lse)``, ``bwd(do, q, k, v, o, padded_lse, scale, ...) -> (dq, dk, dv)`` and
    ``padded_lse(lse, cu_seqlens, max_seqlen)`` (the packed LSE in the backward's layout)."""

    fwd: Callable
    bwd: Callable
    padded_lse: Callable
    version: str


def cudnn_sdpa() -> CudnnSdpa | None:
    """cuDNN's SDPA ops, or None when nvidia-cudnn-frontend is missing or cannot load here
    (no CUDA, no libcudnn): callers then keep another kernel."""
    return _once("cudnn", _load_cudnn_sdpa)


def _load_cudnn_sdpa() -> CudnnSdpa | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        import cudnn
        from cudnn.sdpa.fwd import torch_op
    except Exception:  # noqa: BLE001 - ImportError, or OSError/RuntimeError loading libcudnn
        return None
    return CudnnSdpa(torch.ops.cudnn.sdpa_fwd, torch.ops.cudnn.sdpa_bwd,
                     torch_op.thd_lse_to_padded, getattr(cudnn, "__version__", "?"))


CUDNN_SDPA_MISSING = ("window_kernel='cudnn' needs nvidia-cudnn-frontend >= 1.32 and a CUDA GPU "
                      "(pip install 'fsa-train[gpu]')")
"""The one-line error when the cuDNN path is asked for and cannot load."""


@dataclass(frozen=True)
class FlashAttn4:
    """flash-attn-4's forward ``fwd(q, k, v, ...) -> (o, lse, ...)`` and backward
    ``bwd(q, k, v, o, do, lse, scale, causal, softcap, ...) -> (dq, dk, dv, ...)`` entry points
    (its internal ``_flash_attn_fwd`` / ``_flash_attn_bwd``, read in 4.0.0b40)."""

    fwd: Callable
    bwd: Callable
    version: str


FLASH_ATTN_4_KEYWORDS = {
    "fwd": {"cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "softmax_scale",
            "causal", "window_size_left", "window_size_right", "return_lse"},
    "bwd": {"cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "window_size_left",
            "window_size_right", "deterministic"},
}
"""The keywords our FA4 path passes to each entry point: a release whose entry points lack one
is treated as missing (its internal API changed) rather than called wrongly."""


def flash_attn_4() -> FlashAttn4 | None:
    """FlashAttention-4's entry points, or None when flash-attn-4 is missing, cannot load here
    (no CUDA) or has entry points other than the ones read (:data:`FLASH_ATTN_4_KEYWORDS`)."""
    return _once("fa4", _load_flash_attn_4)


def _load_flash_attn_4() -> FlashAttn4 | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        from flash_attn.cute import interface
    except Exception:  # noqa: BLE001 - ImportError, or the CuTe DSL runtime failing to load
        return None
    fwd = getattr(interface, "_flash_attn_fwd", None)
    bwd = getattr(interface, "_flash_attn_bwd", None)
    for name, fn in (("fwd", fwd), ("bwd", bwd)):
        if fn is None or not FLASH_ATTN_4_KEYWORDS[name] <= set(inspect.signature(fn).parameters):
            return None
    try:
        from importlib.metadata import version

        found = version("flash-attn-4")
    except Exception:  # noqa: BLE001 - installed without metadata
        found = "?"
    return FlashAttn4(fwd, bwd, found)


FLASH_ATTN_4_MISSING = ("window_kernel='fa4' needs flash-attn-4 (4.0.0b40's packed-sequence entry "
                        "points) and a CUDA GPU (pip install 'fsa-train[fa4]')")
"""The one-line error when the FlashAttention-4 path is asked for and cannot load."""


def unsupported_inputs(kernel: str, q, k, max_head_dim: int) -> str | None:
    """The input checks every library path shares: CUDA, fp16/bf16, head dim a multiple of 8 up
    to ``max_head_dim``, grouped heads. One line naming ``kernel`` and what is wrong, or None."""
    import torch

    if not q.is_cuda:
        return f"window_kernel={kernel!r} needs CUDA tensors, got {q.device}"
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype:
        return f"window_kernel={kernel!r} needs fp16 or bf16 q, k and v, got {q.dtype}, {k.dtype}"
    d = q.shape[-1]
    if d % 8 or d > max_head_dim:
        return (f"window_kernel={kernel!r} needs a head dim that is a multiple of 8 up to "
                f"{max_head_dim}, got {d}")
    if q.shape[1] % k.shape[1]:
        return f"window_kernel={kernel!r} needs H divisible by h, got {q.shape[1]} and {k.shape[1]}"
    return None
