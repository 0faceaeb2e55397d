"""``fsa-train presets``: the shipped configs (``configs/**/*.yaml``), one line each."""

from __future__ import annotations

import argparse
from pathlib import Path


def configs_dir() -> Path:
    """The ``configs/`` folder beside the package (a source checkout or editable install), else
    the working directory's."""
    beside = Path(__file__).resolve().parents[1] / "configs"
    return beside if beside.is_dir() else Path("configs")


def summary(path: Path) -> str:
    """The first sentence of the file's leading comment block (empty without one)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    end = text.find(". ")
    return text[: end + 1] if end >= 0 else text


def presets_main(argv: list[str]) -> None:
    """``fsa-train presets``: list the shipped configs with one line each."""
    parser = argparse.ArgumentParser(prog="fsa-train presets", description=__doc__,
                                     allow_abbrev=False)
    parser.parse_args(argv)
    root = configs_dir()
    files = sorted(root.rglob("*.yaml"))
    if not files:
        raise FileNotFoundError(f"no presets found in {root}")
    width = max(len(str(p.relative_to(root.parent))) for p in files)
    for path in files:
        print(f"{str(path.relative_to(root.parent)):<{width}}  {summary(path)}")
