"""The one way every kernel chooses its launch configuration, and a record of the choices.

A :class:`KernelTuner` wraps one ``@triton.jit`` kernel with all of its launch configurations:

* under the interpreter (CPU tests) a fixed, small configuration, so tiny inputs span many tiles;
* for fp32 inputs a fixed configuration validated with "ieee" dots;
* for fp16/bf16 either a **rule** (hand-measured choices: the rule picks one of the tuner's
  configurations from the launch's constexprs, nothing is timed) or Triton's autotuner over the
  configurations, one autotuner per power-of-two class of the token count. Triton keeps one
  choice per key, and our keys hold the head dim, G and dtypes but no size, so without classes
  the first shape a process saw (16K in a benchmark that then runs 64K) chose for every later
  size; training runs one shape, so it still tunes once.

Callers may pass ``config=`` (a benchmark sweep's or a settings override) or ``autotune=False``
(only the first configuration of the list: ``KernelSettings.*_autotune``). Every tuner is
registered by name, and :func:`autotune_choices` reports what each chose, so that benchmark
results can say what they measured. Autotuned choices are also kept on disk and reused by later
processes (:mod:`fsa_train.kernels.tuning_cache`, ``FSA_TUNING_CACHE``).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence

import torch
import triton
from triton.runtime.autotuner import Autotuner

from fsa_train.kernels import tuning_cache
from fsa_train.kernels.settings import tuning_cache_dir
from fsa_train.kernels.utils import interpreting

Config = dict[str, object]
"""A launch configuration: constexpr values plus ``num_warps`` / ``num_stages``."""

_TUNERS: dict[str, KernelTuner] = {}


def size_class(size: int) -> int:
    """The power of two at or above ``size`` (1 for 0 or 1)."""
    return 1 << max(0, int(size) - 1).bit_length()


def as_triton_config(config: Config | triton.Config) -> triton.Config:
    """``config`` as a :class:`triton.Config` (for the autotuner; Triton's defaults for the
    launch options it does not name)."""
    if isinstance(config, triton.Config):
        return config
    options = {k: int(config[k]) for k in ("num_warps", "num_stages") if k in config}
    return triton.Config({k: v for k, v in config.items() if k not in options}, **options)


def launch_kwargs(config: Config | triton.Config) -> Config:
    """``config`` as the keyword arguments of a direct launch ``kernel[grid](..., **kwargs)``."""
    if isinstance(config, triton.Config):
        return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    return config


class KernelTuner:
    """A kernel with its launch configurations (see the module docstring).

    Args:
        name: the registry name, ``"<op>.<kernel>"`` (unique).
        kernel: the ``@triton.jit`` function.
        configs: fp16/bf16 configurations, the autotuner's list or the rule's choices.
        key: the kernel arguments the autotuner's choice depends on (besides the size class).
        size_arg: the kernel argument holding the token count (None: one class for all sizes).
        fp32: the configuration for fp32 inputs (None: as fp16/bf16).
        interpret: the configuration under ``TRITON_INTERPRET=1`` (None: ``configs[0]``).
        rule: ``rule(meta) -> config`` from the launch's constexprs; replaces the autotuner.
        reset_to_zero: kernel arguments the autotuner zeroes before timing each configuration.
    """

    def __init__(
        self,
        name: str,
        kernel,
        configs: Sequence[Config | triton.Config],
        key: Sequence[str] = (),
        *,
        size_arg: str | None = "total",
        fp32: Config | None = None,
        interpret: Config | None = None,
        rule: Callable[[dict], Config] | None = None,
        reset_to_zero: Sequence[str] | None = None,
    ) -> None:
        if name in _TUNERS:
            raise ValueError(f"a kernel tuner named {name!r} exists already")
        if size_arg is not None and size_arg not in kernel.arg_names:
            raise ValueError(f"{name}: the kernel has no argument {size_arg!r}")
        if not configs:
            raise ValueError(f"{name}: at least one configuration is needed")
        self.name = name
        self.kernel = kernel
        self.configs = list(configs)
        self.key = list(key)
        self.size_arg = size_arg
        self.size_index = kernel.arg_names.index(size_arg) if size_arg is not None else None
        self.fp32 = fp32
        self.interpret = interpret
        self.rule = rule
        self.reset_to_zero = list(reset_to_zero) if reset_to_zero else None
        self.tuners: dict[tuple[int, bool], Autotuner] = {}
        self.ruled: dict[tuple, Config] = {}
        self._chosen: dict[tuple, Config] = {}
        _TUNERS[name] = self

    def autotuner(self, size: int, autotune: bool = True) -> Autotuner:
        """The autotuner of ``size``'s class (all configurations, or the first one only)."""
        bucket = (size_class(size) if self.size_arg is not None else 0, bool(autotune))
        tuner = self.tuners.get(bucket)
        if tuner is None:
            configs = self.configs if autotune else self.configs[:1]
            tuner = triton.autotune(
                configs=[as_triton_config(c) for c in configs], key=self.key,
                reset_to_zero=self.reset_to_zero,
            )(self.kernel)
            if autotune:
                tuning_cache.attach(tuner, tuning_cache_dir(), self.name, size_class=bucket[0],
                                    autotune=True, kernel=self.kernel,
                                    reset_to_zero=self.reset_to_zero)
            self.tuners[bucket] = tuner
        return tuner

    def choose(self, meta: dict) -> Config:
        """The rule's configuration for the launch constexprs ``meta``, decided (and checked and
        recorded) once per distinct ``meta``: a launch on the hot path is one dict lookup."""
        key = tuple(meta.items())
        config = self._chosen.get(key)
        if config is None:
            config = self.rule(meta)
            if config not in self.configs:
                raise ValueError(f"{self.name}: the rule chose {config}, not one of its configs")
            self._chosen[key] = config
            self.ruled[tuple(sorted((k, str(v)) for k, v in meta.items()))] = config
        return config

    def run(
        self,
        grid,
        args: Sequence,
        *,
        dtype: torch.dtype,
        autotune: bool = True,
        config: Config | None = None,
        **meta,
    ) -> None:
        """Launch on ``grid`` with positional ``args`` and constexprs ``meta`` (see the class)."""
        if config is not None:
            self.kernel[grid](*args, **meta, **config)
        elif interpreting():
            self.kernel[grid](*args, **meta, **launch_kwargs(self.interpret or self.configs[0]))
        elif dtype == torch.float32 and self.fp32 is not None:
            self.kernel[grid](*args, **meta, **self.fp32)
        elif self.rule is not None:
            self.kernel[grid](*args, **meta, **self.choose(meta))
        else:
            size = args[self.size_index] if self.size_index is not None else 0
            self.autotuner(size, autotune)[grid](*args, **meta)


def _import_kernel_modules() -> None:
    """Import every op's Triton module, so that all their tuners are registered."""
    package = importlib.import_module("fsa_train.kernels.ops")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}.triton")


def tuners() -> dict[str, KernelTuner]:
    """Every registered tuner by name (the op kernels' and any a caller made)."""
    _import_kernel_modules()
    return dict(_TUNERS)


def _entries(tuner: Autotuner, prefix: list[str]) -> list[dict[str, object]]:
    return [{"key": [*prefix, *(str(part) for part in key)], "config": str(config)}
            for key, config in (getattr(tuner, "cache", None) or {}).items()]


def autotune_choices() -> dict[str, list[dict[str, object]]]:
    """``{"op.kernel": [{"key": [...], "config": "BLOCK_M: 64, num_warps: 8, ..."}]}`` for every
    tuner that has chosen at least once (autotuned or by its rule) in this process."""
    choices: dict[str, list[dict[str, object]]] = {}
    for name, tuner in sorted(tuners().items()):
        entries = []
        for (bucket, autotune), autotuner in sorted(tuner.tuners.items()):
            prefix = [f"{tuner.size_arg} <= {bucket}"] if tuner.size_arg is not None else []
            if not autotune:
                prefix.append("first config only")
            entries += _entries(autotuner, prefix)
        for key, config in tuner.ruled.items():
            entries.append({"key": ["rule", *(f"{k}={v}" for k, v in key)],
                            "config": str(as_triton_config(config))})
        if entries:
            choices[name] = entries
    return choices


def choices_markdown(choices: dict[str, list[dict[str, object]]]) -> list[str]:
    """The choices as Markdown lines (a heading and one bullet per tuning key)."""
    if not choices:
        return []
    lines = ["", "## Autotuner choices", ""]
    for tuner, entries in choices.items():
        for entry in entries:
            lines.append(f"- `{tuner}` key ({', '.join(entry['key'])}): {entry['config']}")
    return lines
