"""Autotuning per size class, and a record of what the autotuner chose.

Triton's autotuner keeps one choice per key; our keys hold the head dim, G and dtypes but no
size, so the first shape a process saw (16K in a benchmark that then runs 64K) picked the
configuration for every later size. :func:`bucketed_autotune` gives each power-of-two class of
the token count its own tuner (training runs one shape, so it still tunes once), and
:func:`autotune_choices` reports the choices so benchmark results can say what they measured.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

import triton
from triton.runtime.autotuner import Autotuner


def size_class(size: int) -> int:
    """The power of two at or above ``size`` (1 for 0 or 1)."""
    return 1 << max(0, int(size) - 1).bit_length()


class BucketedAutotuner:
    """One :class:`triton.runtime.autotuner.Autotuner` per :func:`size_class` of the kernel
    argument ``size_arg``; ``tuned[grid](*args)`` works as with a plain autotuner."""

    def __init__(self, kernel, configs: list, key: list[str], size_arg: str, **kwargs) -> None:
        self.kernel = kernel
        self.configs = configs
        self.key = key
        self.size_arg = size_arg
        self.size_index = kernel.arg_names.index(size_arg)
        self.kwargs = kwargs
        self.tuners: dict[int, Autotuner] = {}

    def for_size(self, size: int) -> Autotuner:
        bucket = size_class(size)
        tuner = self.tuners.get(bucket)
        if tuner is None:
            tuner = triton.autotune(configs=self.configs, key=self.key, **self.kwargs)(self.kernel)
            self.tuners[bucket] = tuner
        return tuner

    def __getitem__(self, grid) -> Callable:
        def run(*args, **kwargs):
            if self.size_index < len(args):
                size = args[self.size_index]
            else:
                size = kwargs[self.size_arg]
            return self.for_size(size)[grid](*args, **kwargs)

        return run


def bucketed_autotune(configs: list, key: list[str], size_arg: str = "total", **kwargs):
    """Decorator like ``triton.autotune`` whose choices are kept per size class."""
    return lambda kernel: BucketedAutotuner(kernel, configs, key, size_arg, **kwargs)


def _entries(tuner: Autotuner, prefix: list[str]) -> list[dict[str, object]]:
    return [{"key": [*prefix, *(str(part) for part in key)], "config": str(config)}
            for key, config in (getattr(tuner, "cache", None) or {}).items()]


def autotune_choices() -> dict[str, list[dict[str, object]]]:
    """``{"module.tuner": [{"key": [...], "config": "BLOCK_M: 64, num_warps: 8, ..."}]}`` for
    every autotuned kernel of ``fsa_train.kernels.triton`` that has tuned at least once."""
    package = importlib.import_module("fsa_train.kernels.triton")
    choices: dict[str, list[dict[str, object]]] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for attr, value in sorted(vars(module).items()):
            if isinstance(value, Autotuner):
                entries = _entries(value, [])
            elif isinstance(value, BucketedAutotuner):
                entries = [entry for bucket, tuner in sorted(value.tuners.items())
                           for entry in _entries(tuner, [f"{value.size_arg} <= {bucket}"])]
            else:
                continue
            if entries:
                choices[f"{info.name}.{attr}"] = entries
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
