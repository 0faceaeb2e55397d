"""``python -m benchmarks run kernel_resources``: its kernel specs match the kernels' signatures,
and one offline sm_90 compile reports registers and spills. Subprocesses: the kernels must be
compiled ones, not the interpreter's (which the kernel tests switch on)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
TOOL = [sys.executable, "-m", "benchmarks", "run", "kernel_resources"]


def run_tool(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([*TOOL, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_every_spec_matches_its_kernel():
    result = run_tool("--validate_only")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "specs match their kernels" in result.stdout


def test_offline_compile_reports_registers_and_spills(tmp_path):
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton has no bundled cuobjdump")
    result = run_tool("--kernels", "select", "--max_configs", "1", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    (out,) = tmp_path.glob("kernel_resources_sm90_*.md")
    row = next(line for line in out.read_text().splitlines() if line.startswith("| select |"))
    (saved,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert saved["kernel"] == "select" and saved["registers"] > 0
    cells = [c.strip() for c in row.strip("|").split("|")]
    registers, stack, shared, sass = (int(c) for c in cells[4:8])
    assert 32 <= registers <= 255 and stack >= 0 and shared > 0 and sass > 100


def test_interpreter_is_refused():
    env_result = subprocess.run(
        [*TOOL, "--validate_only"], cwd=ROOT, capture_output=True, text=True,
        env=dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT)), timeout=300)
    assert env_result.returncode != 0 and "unset TRITON_INTERPRET" in env_result.stderr
