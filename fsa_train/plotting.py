"""``fsa-train plot RUN_DIR``: loss, learning rate, tokens/s and MFU of a run, from the JSON-lines
metrics every run writes (``metrics.jsonl``, ``val.jsonl``), to one PNG. No wandb needed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fsa_train.config import ConfigError

PANELS = (
    ("loss", ("train/loss", "val/loss")),
    ("learning rate", ("lr",)),
    ("tokens/s", ("throughput/tokens_per_s",)),
    ("MFU", ("perf/mfu", "perf/mfu_dense_equiv")),
)
"""One panel per row: its title and the metrics it draws against the step."""


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; a line that is not JSON is a one-line error naming it."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}:{number}: not a JSON line ({error.msg})") from None
    return records


def run_series(run_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """``{metric: (steps, values)}`` of a run directory's ``metrics.jsonl`` and ``val.jsonl``
    (a step logged twice, as after a resume, keeps its last value)."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir} (is it a run directory?)")
    records = read_jsonl(metrics)
    if (run_dir / "val.jsonl").is_file():
        records += read_jsonl(run_dir / "val.jsonl")
    series: dict[str, dict[int, float]] = {}
    for record in records:
        for name, value in record.items():
            if name != "step" and isinstance(value, int | float):
                series.setdefault(name, {})[int(record["step"])] = float(value)
    return {name: (sorted(points), [points[s] for s in sorted(points)])
            for name, points in series.items()}


def pyplot(command: str = "fsa-train plot"):
    """matplotlib's pyplot on the Agg backend, or a one-line ConfigError naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(f"{command} needs matplotlib: pip install 'fsa-train[plot]' "
                          "(or matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_grid(result: dict, out: str | Path, title: str) -> Path:
    """A heatmap of an evaluation grid (``cells`` with length, depth, accuracy: passkey or
    retrieval results) to ``out``: lengths down, depths across, exact match in each cell."""
    plt = pyplot("the evaluation plot")
    lengths, depths = result["lengths"], result["depths"]
    accuracy = {(c["length"], c["depth"]): c["accuracy"] for c in result["cells"]}
    grid = [[accuracy[(n, d)] for d in depths] for n in lengths]
    figure, axis = plt.subplots(figsize=(1.2 * len(depths) + 2, 0.6 * len(lengths) + 1.6))
    image = axis.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    axis.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    axis.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    axis.set(xlabel="depth of the key (0: farthest from the question)", ylabel="tokens",
             title=title)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            axis.text(j, i, f"{value:.2f}", ha="center", va="center",
                      color="white" if value < 0.6 else "black")
    figure.colorbar(image, ax=axis, label="exact match")
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw :data:`PANELS` (those with data) to ``out`` (default ``RUN_DIR/metrics.png``)."""
    plt = pyplot()

    series = run_series(run_dir)
    panels = [(title, [n for n in names if n in series]) for title, names in PANELS]
    panels = [(title, names) for title, names in panels if names]
    out = Path(out) if out is not None else Path(run_dir) / "metrics.png"
    figure, axes = plt.subplots(len(panels), 1, figsize=(8, 2.4 * len(panels)), sharex=True,
                                squeeze=False)
    for axis, (title, names) in zip(axes[:, 0], panels, strict=True):
        for name in names:
            steps, values = series[name]
            axis.plot(steps, values, label=name, marker="o" if len(steps) < 30 else None)
        axis.set_title(title, loc="left")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    figure.suptitle(Path(run_dir).resolve().name)
    figure.tight_layout()
    partial = out.with_name(out.name + ".partial.png")
    figure.savefig(partial, dpi=110)
    plt.close(figure)
    partial.replace(out)
    return out


def plot_main(argv: list[str]) -> None:
    """``fsa-train plot RUN_DIR [--out FILE]``."""
    parser = argparse.ArgumentParser(prog="fsa-train plot", description=__doc__,
                                     allow_abbrev=False)
    parser.add_argument("run_dir", help="a run directory (holds metrics.jsonl)")
    parser.add_argument("--out", default=None,
                        help="the PNG to write (default RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    print(f"plot: {plot_run(args.run_dir, args.out)}")
