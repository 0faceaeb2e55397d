"""Every shipped config (and each model × strategy combination) parses through the real CLI."""

from pathlib import Path

import pytest

from fsa_train.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted((ROOT / "configs" / "model").glob("*.yaml"))
STRATEGIES = sorted((ROOT / "configs" / "strategy").glob("*.yaml"))


def parse(capsys, *configs: Path) -> str:
    args = ["fit"]
    for config in configs:
        args += ["--config", str(config)]
    with pytest.raises(SystemExit) as exit_info:
        build_cli([*args, "--print_config"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_presets_exist():
    assert len(MODELS) >= 2 and {p.stem for p in STRATEGIES} >= {"ddp", "zero1", "zero2", "zero3"}


@pytest.mark.parametrize("model", MODELS, ids=lambda p: p.stem)
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda p: p.stem)
def test_base_model_strategy_combination_parses(model, strategy, capsys):
    printed = parse(capsys, ROOT / "configs" / "base.yaml", model, strategy)
    assert "bf16-mixed" in printed
    if strategy.stem.startswith("zero"):
        assert f"stage: {strategy.stem[-1]}" in printed


def test_demo_config_parses(capsys):
    printed = parse(capsys, ROOT / "configs" / "demo.yaml")
    assert "attention: nsa" in printed
