"""Which launch configuration Triton's autotuner chose for each of our kernels, so benchmark
results can say what they measured (the choice depends on the device and the first shape seen)."""

from __future__ import annotations

import importlib
import pkgutil

from triton.runtime.autotuner import Autotuner


def autotune_choices() -> dict[str, list[dict[str, object]]]:
    """``{"module.tuner": [{"key": [...], "config": "BLOCK_M: 64, num_warps: 8, ..."}]}`` for
    every autotuned kernel of ``fsa_train.kernels.triton`` that has tuned at least once."""
    package = importlib.import_module("fsa_train.kernels.triton")
    choices: dict[str, list[dict[str, object]]] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for attr, value in sorted(vars(module).items()):
            if not isinstance(value, Autotuner) or not getattr(value, "cache", None):
                continue
            choices[f"{info.name}.{attr}"] = [
                {"key": [str(part) for part in key], "config": str(config)}
                for key, config in value.cache.items()
            ]
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
