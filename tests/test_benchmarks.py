"""Benchmark scripts run end to end in their CPU smoke mode and write their tables."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_nsa_core_benchmark_smoke(tmp_path):
    command = [sys.executable, "benchmarks/bench_nsa.py", "--device", "cpu", "--tokens", "256",
               "--groups", "2", "--head_dim", "32", "--kv_heads", "1", "--tiny_nsa",
               "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "nsa_core.json").read_text())["rows"]
    methods = {row["method"] for row in rows}
    expected = {"nsa core", "branch: selected_attention", "dense: ours (window_attention None)"}
    assert expected <= methods
    assert all(row["fwd_ms"] > 0 for row in rows)
    assert "| nsa core |" in (tmp_path / "nsa_core.md").read_text()
