"""The benchmarks of fsa-train, one runner for all of them.

``python -m benchmarks list`` names every benchmark; ``python -m benchmarks run NAME [flags]``
runs one (``run NAME --help`` lists its flags). Each benchmark lives in its own module
``benchmarks/<name>.py`` and registers itself here with :func:`register`: its name, a one-line
summary, the function that adds its flags to an argument parser and its main function. The
timing, memory and run-metadata helpers, and the writer of the result files
(``<benchmark>_<device>_<date>[_<tag>].{json,md}`` under ``--out``), are in
:mod:`benchmarks.common`. ``benchmarks/device.sh`` holds the device-session plumbing (carried
wheels, the GPU tests, the loss-parity steps, the multi-GPU trainer check).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

NOT_BENCHMARKS = ("common",)
"""Modules of this package that define no benchmark."""


@dataclass(frozen=True)
class Benchmark:
    """One registered benchmark.

    Attributes:
        name: the name ``run`` takes (the module's name).
        summary: one line for ``list``.
        add_arguments: adds the benchmark's flags to a parser.
        main: runs it on the parsed arguments (what it returns is the benchmark's business).
        gpu: needs a CUDA GPU (some have a CPU smoke mode: ``--device cpu``).
        record: writes its results with :class:`benchmarks.common.Record` (the parser then gets
            ``--out`` and ``--tag``).
    """

    name: str
    summary: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    main: Callable[[argparse.Namespace], object]
    gpu: bool = True
    record: bool = True

    def parser(self, prog: str | None = None) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=prog or f"python -m benchmarks run {self.name}",
                                         description=self.summary)
        self.add_arguments(parser)
        if self.record:
            from benchmarks.common import add_output_arguments

            add_output_arguments(parser)
        return parser

    def run(self, argv: list[str] | None = None) -> object:
        """Parse ``argv`` (default: the command line) with this benchmark's parser and run it."""
        return self.main(self.parser().parse_args(argv))


REGISTRY: dict[str, Benchmark] = {}


def register(name: str, *, summary: str, arguments: Callable[[argparse.ArgumentParser], None],
             gpu: bool = True, record: bool = True) -> Callable:
    """Decorator of a benchmark's main function: registers it under ``name``."""

    def decorate(main: Callable[[argparse.Namespace], object]) -> Callable:
        if name in REGISTRY and REGISTRY[name].main is not main:
            raise ValueError(f"a benchmark named {name!r} is registered already")
        REGISTRY[name] = Benchmark(name, summary, arguments, main, gpu, record)
        return main

    return decorate


def module_names() -> list[str]:
    """The benchmark modules of this package, by name."""
    return sorted(info.name for info in pkgutil.iter_modules(__path__)
                  if not info.name.startswith("_") and info.name not in NOT_BENCHMARKS)


def get(name: str) -> Benchmark:
    """The benchmark ``name`` (importing its module registers it)."""
    if name not in module_names():
        raise KeyError(name)
    importlib.import_module(f"{__name__}.{name}")
    return REGISTRY[name]


def load_all() -> dict[str, Benchmark]:
    """Every benchmark, by name."""
    for name in module_names():
        importlib.import_module(f"{__name__}.{name}")
    return dict(sorted(REGISTRY.items()))
