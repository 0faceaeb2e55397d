"""Each NSA op defined once: its public signature and docstring (from its naive reference) and
its backend dispatch.

``backend="reference"`` runs the naive PyTorch op (``ops/<op>/naive.py``); ``backend="triton"``
runs the op's Triton implementation (``ops/<op>/triton.py``; an error if Triton is missing or
the tensors are not on a CUDA device, except under the interpreter); ``backend="auto"`` picks
Triton for CUDA tensors and the naive op otherwise. A Triton module may define
``supports(*args, **kwargs) -> bool``: arguments it does not take (for example NSA geometries the
fused top-k was not written for) run the naive op under every backend.

The Triton function has the naive op's parameters plus a keyword ``settings``
(:class:`~fsa_train.kernels.settings.KernelSettings`), which the dispatcher passes down.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import torch

from fsa_train.kernels.settings import KernelSettings
from fsa_train.kernels.utils import interpreting

Backend = Literal["auto", "reference", "triton"]
BACKENDS = ("auto", "reference", "triton")


_TRITON_MODULES: dict[str, ModuleType | None] = {}
"""Imported Triton modules by name (None: Triton or the module is missing)."""


@dataclass(frozen=True)
class Op:
    """One op: its name, its naive function and the module of its Triton implementation."""

    name: str
    naive: Callable
    triton_module: str

    @property
    def triton_module_or_none(self):
        """The op's Triton module, imported on first use, or None without Triton. Cached in a
        plain dict: ``functools.cached_property`` takes a lock on Python < 3.12, which
        ``torch.compile`` cannot trace (a graph break at every op call)."""
        if self.triton_module not in _TRITON_MODULES:
            try:
                module = importlib.import_module(self.triton_module)
            except ModuleNotFoundError as error:
                if error.name not in (self.triton_module, "triton"):
                    raise
                module = None
            _TRITON_MODULES[self.triton_module] = module
        return _TRITON_MODULES[self.triton_module]

    def triton(self) -> Callable | None:
        """The Triton implementation, or None when there is none (or no Triton)."""
        module = self.triton_module_or_none
        return None if module is None else getattr(module, self.name, None)

    def resolve(self, backend: str, tensor: torch.Tensor, args: tuple, kwargs: dict) -> Callable:
        """The function that runs this op for ``backend`` on these arguments."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto', 'reference' or 'triton', got {backend!r}")
        if backend == "reference":
            return self.naive
        if backend == "auto" and not tensor.is_cuda:
            return self.naive
        impl = self.triton()
        if backend == "triton":
            if impl is None:
                raise NotImplementedError(
                    f"{self.name} has no Triton kernel here; use backend='reference'")
            if not tensor.is_cuda and not interpreting():
                raise ValueError(
                    f"{self.name} with backend='triton' needs CUDA tensors, got {tensor.device}")
        elif impl is None:
            return self.naive
        supports = getattr(self.triton_module_or_none, "supports", None)
        if supports is not None and not supports(*args, **kwargs):
            return self.naive
        return impl


REGISTRY: dict[str, Op] = {}


def define_op(naive: Callable, triton_module: str) -> Callable:
    """The public op ``naive.__name__``: ``naive``'s parameters and docstring, plus the keywords
    ``backend`` (:data:`Backend`) and ``settings`` (Triton launch switches, default: from the
    environment)."""
    op = Op(naive.__name__, naive, triton_module)
    if op.name in REGISTRY:
        raise ValueError(f"op {op.name!r} is defined already")
    REGISTRY[op.name] = op

    @functools.wraps(naive)
    def public(*args, backend: Backend = "auto", settings: KernelSettings | None = None,
               **kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        fn = op.resolve(backend, first, args, kwargs)
        if fn is op.naive:
            return fn(*args, **kwargs)
        return fn(*args, settings=settings, **kwargs)

    signature = inspect.signature(naive)
    extra = [
        inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="auto",
                          annotation="Backend"),
        inspect.Parameter("settings", inspect.Parameter.KEYWORD_ONLY, default=None,
                          annotation="KernelSettings | None"),
    ]
    public.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
    public.__doc__ = (naive.__doc__ or "").rstrip() + (
        "\n\n    ``backend``: \"auto\" (Triton for CUDA tensors), \"reference\" (this naive op) or "
        "\"triton\";\n    ``settings``: the Triton kernels' launch switches (KernelSettings).\n")
    return public


def triton_impl(name: str) -> Callable | None:
    """The Triton implementation of op ``name``, or None when the project has none (or no
    Triton)."""
    return REGISTRY[name].triton()


def preload_triton_modules() -> None:
    """Import every op's Triton module now (a no-op without Triton): ``torch.compile`` cannot
    trace ``importlib``, so compiled code must find them imported already."""
    for op in REGISTRY.values():
        _ = op.triton_module_or_none
