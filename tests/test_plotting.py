"""fsa-train plot: a run directory's JSON-lines metrics to one PNG."""

import json

import pytest

from fsa_train.cli import main
from fsa_train.plotting import run_series


def _run_dir(tmp_path):
    steps = [{"step": s, "train/loss": 5.0 - 0.1 * s, "lr": 1e-3,
              "throughput/tokens_per_s": 1000.0 + s} for s in range(1, 6)]
    steps.append({"step": 3, "train/loss": 9.0, "lr": 1e-3})  # step 3 again, as after a resume
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    (tmp_path / "val.jsonl").write_text(json.dumps({"step": 5, "val/loss": 4.2}) + "\n")
    return tmp_path


def test_series_keep_the_last_value_of_a_repeated_step(tmp_path):
    series = run_series(_run_dir(tmp_path))
    assert series["train/loss"][0] == [1, 2, 3, 4, 5]
    assert series["train/loss"][1][2] == 9.0
    assert series["val/loss"] == ([5], [4.2])
    assert series["throughput/tokens_per_s"][0] == [1, 2, 3, 4, 5]


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    main(["plot", str(_run_dir(tmp_path))])
    png = tmp_path / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in capsys.readouterr().out


@pytest.mark.parametrize("content", [None, "{not json}\n"])
def test_missing_or_bad_metrics_are_one_line(tmp_path, capsys, content):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert ("metrics.jsonl:1" in err) if content else ("no metrics.jsonl" in err)
