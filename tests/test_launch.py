"""Launch scripts: valid shell, and every config file they name exists and parses."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "launch").iterdir())


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_bash(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_named_configs_exist(script):
    text = script.read_text(encoding="utf-8")
    named = set(re.findall(r"configs/[\w/.-]+\.yaml", text))
    assert named, "a launch script should start from a config file"
    for path in named:
        assert (ROOT / path).is_file(), path
    if "${strategy}" in text:
        assert (ROOT / "configs" / "strategy" / "zero2.yaml").is_file()


def test_one_node_refuses_a_machine_without_gpus(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")
    (fake_bin / "nvidia-smi").chmod(0o755)
    result = subprocess.run(
        ["bash", str(ROOT / "launch" / "one_node.sh")], capture_output=True, text=True,
        env={"PATH": f"{fake_bin}:/usr/bin:/bin"}, cwd=ROOT,
    )
    assert result.returncode == 1
    assert "no GPU found" in result.stderr
