"""What the GPU sweeps (``sweep_*.py``) share: the run's metadata and the shape loop that writes
``{stem}.json`` and ``{stem}.md`` after every shape, so a run cut short still reports."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from collections.abc import Callable

import torch
import triton


def gpu_meta() -> dict:
    """Device, versions and UTC time of the run."""
    return {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def run_sweep(description: str, stem: str, shapes: list[tuple], run_shape: Callable[..., dict],
              markdown: Callable[[dict], str]) -> dict:
    """Parse ``--out``, run ``run_shape(*shape[1:])`` for every ``(name, ...)`` in ``shapes``,
    write the results after each, print the table at the end."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = {"meta": gpu_meta(), "shapes": {}}
    for name, *shape in shapes:
        results["shapes"][name] = run_shape(*shape)
        print(name, results["shapes"][name], flush=True)
        torch.cuda.empty_cache()
        with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
            f.write(markdown(results))
    print(markdown(results))
    return results
