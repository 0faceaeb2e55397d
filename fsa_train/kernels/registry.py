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

Under ``torch.compile`` nothing here breaks the graph or reads the host:

* :func:`kernel_op` registers a Triton module's launcher (forward or backward of one kernel)
  as a custom op ``fsa::<name>`` with a fake implementation (shapes only), so Dynamo neither
  traces the launch nor the autotuner; the module's ``autograd.Function`` stays a thin layer
  over such ops, which Dynamo traces.
* A naive op that reads the host (per-document loops over ``cu_seqlens``) runs as one opaque
  custom op when compiled (``fake=`` of :func:`define_op`, from :mod:`.shapes`), differentiated
  by recomputing the naive op in its backward op.

Eager calls run the plain functions, so eager behaviour and numerics do not change.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import torch

from fsa_train.kernels.naive_attention import kept_activations
from fsa_train.kernels.settings import KernelSettings, default_settings
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
    fake: Callable | None = None
    params: tuple[str, ...] = ()
    defaults: tuple[tuple[str, object], ...] = ()

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


    def bound(self, args: tuple, kwargs: dict) -> dict:
        """The call's arguments by parameter name, defaults filled in (traceable, unlike
        ``inspect.Signature.bind``)."""
        values = dict(self.defaults)
        values.update(zip(self.params, args, strict=False))
        values.update(kwargs)
        return values

    def opaque_naive(self, args: tuple, kwargs: dict):
        """The naive op as the opaque custom op ``fsa::reference`` (its tensors, and the other
        arguments as the ``repr`` of ``(names of the tensors, (name, value) pairs)``), outputs
        as :attr:`fake` shapes them."""
        values = self.bound(args, kwargs)
        tensor_names = tuple(k for k, v in values.items() if isinstance(v, torch.Tensor))
        # integers travel as SymInt[]: a value that changes between calls (a batch's longest
        # document) becomes symbolic under Dynamo, and a symbol has no repr to put in `static`
        int_names = tuple(k for k, v in values.items()
                          if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool))
        static = tuple((k, v) for k, v in values.items()
                       if k not in tensor_names and k not in int_names)
        outs = _reference_op(self.name, [values[k] for k in tensor_names],
                             repr((tensor_names, int_names, static)),
                             [values[k] for k in int_names])
        return outs[0] if len(outs) == 1 else tuple(outs)


REGISTRY: dict[str, Op] = {}


def define_op(naive: Callable, triton_module: str, fake: Callable | None = None) -> Callable:
    """The public op ``naive.__name__``: ``naive``'s parameters and docstring, plus the keywords
    ``backend`` (:data:`Backend`) and ``settings`` (Triton launch switches, default: from the
    environment).

    ``fake``: for a naive op that reads the host, its output shapes (:mod:`.shapes`, same
    signature): compiled code then runs the naive op as one opaque custom op, zero-padding a
    data-dependent first dimension to the fake's static size."""
    signature = inspect.signature(naive)
    op = Op(naive.__name__, naive, triton_module, fake, tuple(signature.parameters),
            tuple((k, p.default) for k, p in signature.parameters.items()
                  if p.default is not inspect.Parameter.empty))
    if op.name in REGISTRY:
        raise ValueError(f"op {op.name!r} is defined already")
    REGISTRY[op.name] = op

    @functools.wraps(naive)
    def public(*args, backend: Backend = "auto", settings: KernelSettings | None = None,
               **kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        fn = op.resolve(backend, first, args, kwargs)
        if fn is op.naive:
            if op.fake is not None and torch.compiler.is_compiling():
                return op.opaque_naive(args, kwargs)
            return fn(*args, **kwargs)
        return fn(*args, settings=settings, **kwargs)

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
    """Import every op's Triton module now (a no-op without Triton) and read the default
    settings: ``torch.compile`` cannot trace ``importlib`` (nor the settings' JSON), so compiled
    code must find them ready."""
    from fsa_train.kernels import libraries

    default_settings()
    libraries.flash_varlen()
    libraries.cudnn_sdpa()
    for op in REGISTRY.values():
        _ = op.triton_module_or_none


def kernel_op(name: str, fake: Callable) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` (a kernel launcher with op-schema types: tensors, ints, floats, bools,
    strings, dtypes; fresh output tensors, never views of its inputs) becomes the custom op
    ``fsa::<name>`` with the fake implementation ``fake`` (same signature; empty outputs of the
    right shapes, no data reads). Compiled code calls the op, which Dynamo does not trace into;
    eager code calls ``fn`` itself (no dispatcher overhead). The op is ``.op`` of the result."""

    def register(fn: Callable) -> Callable:
        op = torch.library.custom_op(f"fsa::{name}", fn, mutates_args=())
        op.register_fake(fake)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if torch.compiler.is_compiling():
                return op(*args, **kwargs)
            return fn(*args, **kwargs)

        call.op = op
        return call

    return register


def _naive_call(name: str, tensors: list, static: str, ints: list[int]) -> tuple[Op, dict]:
    """The op and the arguments of an opaque naive call."""
    op = REGISTRY[name]
    tensor_names, int_names, pairs = ast.literal_eval(static)
    values = dict(pairs)
    values.update(zip(tensor_names, tensors, strict=True))
    values.update(zip(int_names, ints, strict=True))
    return op, values


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _fit(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` as a fresh contiguous tensor of ``like``'s shape: zero rows appended where the
    naive op returned fewer (data-dependent sizes; the Triton kernels pad the same way)."""
    if x.shape[0] == like.shape[0]:
        return x.contiguous().clone()
    out = x.new_zeros(like.shape)
    out[: x.shape[0]] = x
    return out


@torch.library.custom_op("fsa::reference", mutates_args=())
def _reference_op(name: str, tensors: list[torch.Tensor | None], static: str,
                  ints: list[int]) -> list[torch.Tensor]:
    """Naive op ``name`` on ``tensors``, the ``repr``'d ``static`` arguments and the integer
    arguments ``ints``, opaque to Dynamo."""
    op, values = _naive_call(name, tensors, static, ints)
    with torch.no_grad():
        outs = _as_tuple(op.naive(**values))
    return [_fit(x, like) for x, like in zip(outs, _as_tuple(op.fake(**values)), strict=True)]


@_reference_op.register_fake
def _(name, tensors, static, ints):
    op, values = _naive_call(name, tensors, static, ints)
    return list(_as_tuple(op.fake(**values)))


def _autograd_inside_op() -> torch._C._ForceDispatchKeyGuard:
    """Autograd back on inside a custom op's kernel (which runs below autograd: the dispatcher
    excludes its keys); the other exclusions (autocast) stay."""
    keys, key_set = torch._C.DispatchKey, torch._C.DispatchKeySet
    autograd = (key_set(keys.AutogradFunctionality) | key_set(keys.AutogradOther)
                | key_set(keys.AutogradNestedTensor))
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(),
                                           torch._C._dispatch_tls_local_exclude_set() - autograd)


@torch.library.custom_op("fsa::reference_backward", mutates_args=())
def _reference_backward_op(name: str, tensors: list[torch.Tensor | None], static: str,
                           ints: list[int], grads: list[torch.Tensor | None],
                           ) -> list[torch.Tensor]:
    """The gradients of the floating-point ``tensors`` of an opaque naive call (zeros where
    none flows): the naive op recomputed under autograd, padding rows' gradients dropped."""
    leaves = [t.detach().requires_grad_() if t is not None and t.is_floating_point() else t
              for t in tensors]
    wanted = [t for t in leaves if t is not None and t.is_floating_point()]
    op, values = _naive_call(name, leaves, static, ints)
    with _autograd_inside_op(), torch.enable_grad(), kept_activations():
        outs = _as_tuple(op.naive(**values))
    pairs = [(y, g[: y.shape[0]]) for y, g in zip(outs, grads, strict=True)
             if g is not None and y.requires_grad]
    found = [None] * len(wanted)
    if pairs:
        found = torch.autograd.grad([y for y, _ in pairs], wanted, [g for _, g in pairs],
                                    allow_unused=True)
    return [_like(g, t) for g, t in zip(found, wanted, strict=True)]


def _like(grad: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
    """``grad`` (zeros when None) in ``t``'s strides, as the fake declares them: Inductor checks
    the strides of an op's outputs, and autograd may return a permuted layout."""
    if grad is None:
        return torch.zeros_like(t)
    if grad.stride() == t.stride():
        return grad
    return torch.empty_like(t).copy_(grad)


@_reference_backward_op.register_fake
def _(name, tensors, static, ints, grads):
    return [torch.empty_like(t) for t in tensors if t is not None and t.is_floating_point()]


def _reference_setup(ctx, inputs, output) -> None:
    name, tensors, static, ints = inputs
    ctx.name, ctx.static, ctx.ints = name, static, ints
    ctx.save_for_backward(*tensors)


def _reference_backward(ctx, grads):
    tensors = list(ctx.saved_tensors)
    found = iter(_reference_backward_op(ctx.name, tensors, ctx.static, ctx.ints, list(grads)))
    return None, [next(found) if t is not None and t.is_floating_point() else None
                  for t in tensors], None, None


_reference_op.register_autograd(_reference_backward, setup_context=_reference_setup)
